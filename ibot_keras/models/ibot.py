"""The iBOT pretrainer: student and EMA teacher, the loss, and the training step."""

import keras
from keras import ops

from ibot_keras import backend_specific, pipeline_fit
from ibot_keras.backend_specific import PostOptimizerStep
from ibot_keras.callbacks import NonFiniteStop
from ibot_keras.losses import IBOTLoss, koleo_loss
from ibot_keras.metrics import LastValue
from ibot_keras.models import after_step, checks, step_logs
from ibot_keras.models.ema import copy_by_name, pair_by_name
from ibot_keras.models.head import IBOTHead
from ibot_keras.models.masked_positions import masked_position_logits
from ibot_keras.models.skipped_steps import optimizer_applied
from ibot_keras.models.vit import VisionTransformer
from ibot_keras.schedules import CosineSchedule


# get_config: the components (serialized) and the settings, as the constructor takes them.
_COMPONENTS = ("student_backbone", "student_head", "teacher_backbone", "teacher_head", "ibot_loss")
_SETTINGS = ("steps_per_epoch", "momentum_teacher", "max_masked_patches", "koleo_loss_weight",
             "max_consecutive_skips", "global_crop_size")


def _named_weights(backbone, head, include_aliases):
    return [("backbone." + n, v, l) for n, v, l in backbone.official_weights()] + [
        ("head." + n, v, l) for n, v, l in head.official_weights(include_aliases)]


@keras.saving.register_keras_serializable(package="ibot_keras")
class IBOT(PostOptimizerStep, keras.Model):
    """iBOT pretraining as a ``keras.Model``: ``model.fit(dataset)`` runs the official step.

    Batches are dicts: ``"global_crops"`` ``(B, ng, H, W, C)``, ``"local_crops"``
    ``(B, nl, h, w, C)`` (absent when ``nl == 0``) and ``"masks"`` ``(B, ng, H/p, W/p)`` bool
    (absent means nothing is masked).

    One training step, all inside the compiled step:
    1. teacher (backbone + head, no gradient) on the unmasked global crops;
    2. student on the masked global crops (CLS + patch logits) and on the local crops (CLS);
    3. ``IBOTLoss`` with the temperatures of the current epoch, then both centers;
    4. gradients and the optimizer (``IBOTAdamW``: per-parameter clip, last-layer freeze,
       scheduled lr and weight decay);
    5. teacher <- m * teacher + (1 - m) * student for every parameter present in both
       (the student-only mask token is not), with the cosine momentum ``m`` of this step;
       then ``step += 1``.

    The step counter, both centers and the teacher are model variables (saved with the
    weights); ``epoch = step // steps_per_epoch`` picks the teacher temperatures.

    ``max_masked_patches``: an upper bound on masked patches per crop (``build_pretrainer``
    derives it from ``pred_ratio``/``pred_ratio_var``); the training step then computes patch
    logits at that many positions instead of all (see ``call``). A batch with more masked
    patches loses the excess from the patch loss and counts it in the ``masked_dropped``
    metric. ``None`` computes all positions.

    ``global_crop_size`` (``build_pretrainer`` sets it from the config): training batches must
    have global crops of that size, for which ``max_masked_patches`` was derived.

    ``koleo_loss_weight`` (default 0, as iBOT): adds that times DINOv2's KoLeo term
    (``ibot_keras.losses.koleo_loss``) on the student's final-norm [CLS] of each global crop,
    averaged over the crops, and logs it as ``koleo``. Under data parallelism on TensorFlow and
    torch the nearest neighbours are searched within each replica's shard (as DINOv2 does per
    GPU); on JAX within the global batch.

    Non-finite steps (a NaN or inf in the loss or any gradient, e.g. from one NaN pixel) are
    skipped: no weight, teacher, center or optimizer slot changes, and its non-finite values
    stay out of the logged metrics; the step counter still advances (that batch is consumed).
    ``skipped_steps`` (the run's total) and
    ``consecutive_skips`` are model variables, saved with the weights, and logged. With
    ``max_consecutive_skips`` > 0, ``fit`` stops with a ``NonFiniteTrainingError`` naming the
    epoch and step once that many steps in a row were skipped (0: never). Skipping needs
    ``IBOTAdamW`` (the default optimizer) or a ``LossScaleOptimizer``; another optimizer
    applies whatever it is given.
    """

    def __init__(
        self,
        student_backbone,
        student_head,
        teacher_backbone,
        teacher_head,
        ibot_loss,
        steps_per_epoch,
        momentum_teacher=0.996,
        max_masked_patches=None,
        koleo_loss_weight=0.0,
        max_consecutive_skips=25,
        global_crop_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        deserialize = keras.saving.deserialize_keras_object
        if isinstance(student_backbone, dict):
            student_backbone, student_head, teacher_backbone, teacher_head, ibot_loss = (
                deserialize(c) for c in (student_backbone, student_head, teacher_backbone, teacher_head, ibot_loss))
        self.student_backbone = student_backbone
        self.student_head = student_head
        self.teacher_backbone = teacher_backbone
        self.teacher_head = teacher_head
        self.ibot_loss = ibot_loss
        self.steps_per_epoch = int(steps_per_epoch)
        self.momentum_teacher = float(momentum_teacher)
        self.max_masked_patches = None if max_masked_patches is None else max(1, int(max_masked_patches))
        self.koleo_loss_weight = float(koleo_loss_weight)
        if self.koleo_loss_weight < 0:
            raise ValueError(f"koleo_loss_weight must be >= 0, got {koleo_loss_weight}.")
        if isinstance(max_consecutive_skips, bool) or int(max_consecutive_skips) != max_consecutive_skips \
                or max_consecutive_skips < 0:
            raise ValueError(
                f"max_consecutive_skips must be an integer >= 0 (0: never stop), got {max_consecutive_skips!r}."
            )
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.global_crop_size = None if global_crop_size is None else int(global_crop_size)
        self.epochs = ibot_loss.epochs
        self.num_global_crops = ibot_loss.num_global_crops
        self.num_local_crops = ibot_loss.num_local_crops
        checks.check_components(self)
        checks.check_unique_paths(self)

        for head, backbone in ((student_head, student_backbone), (teacher_head, teacher_backbone)):
            if not head.built:
                head.build((None, backbone.embed_dim))
        for layer in (self.teacher_backbone, self.teacher_head):
            layer.trainable = False
            for variable in layer.weights:
                variable.trainable = False
        self.momentum_schedule = CosineSchedule(
            self.momentum_teacher, 1.0, self.epochs, self.steps_per_epoch
        )
        self.step = self._counter("step")
        # Overrides set between epochs by ibot_keras.callbacks (a negative value means "use
        # the official schedule"). Model variables, so the compiled step reads them each step.
        self.teacher_temp_override = self._override("teacher_temp_override")
        self.teacher_patch_temp_override = self._override("teacher_patch_temp_override")
        self.momentum_override = self._override("momentum_override")
        self.skipped_steps = self._counter("skipped_steps")
        self.consecutive_skips = self._counter("consecutive_skips")
        self.cls_tracker = keras.metrics.Mean(name="cls")
        self.patch_tracker = keras.metrics.Mean(name="patch")
        self.lr_tracker = LastValue(name="lr")
        self.wd_tracker = LastValue(name="wd")
        self.teacher_temp_tracker = LastValue(name="teacher_temp")
        self.momentum_tracker = LastValue(name="teacher_momentum")
        # Collapse diagnostics of the teacher's CLS distributions (see models.step_logs).
        self.teacher_entropy_tracker = keras.metrics.Mean(name="teacher_entropy")
        self.teacher_batch_entropy_tracker = keras.metrics.Mean(name="teacher_batch_entropy")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.prototype_usage_tracker = keras.metrics.Mean(name="prototype_usage")
        # Masked positions beyond max_masked_patches (their patch loss is lost): must stay 0.
        self.masked_dropped_tracker = keras.metrics.Sum(name="masked_dropped")
        self.koleo_tracker = keras.metrics.Mean(name="koleo")
        self.skipped_tracker = LastValue(name="skipped_steps")
        self.consecutive_tracker = LastValue(name="consecutive_skips")
        self._ema_pairs = pair_by_name(self.student_weights(), self.teacher_weights())
        self.copy_student_to_teacher()
        self.built = True

    # -- construction -----------------------------------------------------------------------
    def _counter(self, name):
        return self.add_weight(name=name, shape=(), dtype="int32", initializer="zeros", trainable=False)

    def _override(self, name):
        return self.add_weight(name=name, shape=(), dtype="float32", initializer=keras.initializers.Constant(-1.0),
                               trainable=False, autocast=False)

    def student_weights(self, include_aliases=False):
        """``[(official name, variable, layout)]`` of the student (``backbone.*``, ``head.*``)."""
        return _named_weights(self.student_backbone, self.student_head, include_aliases)

    def teacher_weights(self, include_aliases=False):
        """``[(official name, variable, layout)]`` of the teacher."""
        return _named_weights(self.teacher_backbone, self.teacher_head, include_aliases)

    def ema_pairs(self):
        """``[(student variable, teacher variable)]`` that the teacher EMA updates: every
        official parameter name present in both (not the student-only mask token)."""
        return list(self._ema_pairs)

    def copy_student_to_teacher(self):
        """Initialise the teacher from the student like the official
        ``teacher.load_state_dict(student.state_dict(), strict=False)``: state-dict entries in
        order, shared-head aliases included (so with an unshared student and a shared teacher
        the teacher's prototypes start as the student's ``last_layer2``)."""
        copy_by_name(self.student_weights(include_aliases=True), self.teacher_weights(include_aliases=True))

    def last_layer_variables(self):
        """Student variables frozen during the first ``freeze_last_layer`` epochs."""
        return [var for name, var, _ in self.student_weights() if "last_layer" in name]

    def fit(self, x=None, *args, callbacks=None, **kwargs):
        """``keras.Model.fit``.

        On a ``Pipeline`` (``ibot_keras.data.build_pipeline``) training continues from
        ``model.step``: batch ``model.step`` comes next, also after a restart from a mid-epoch
        checkpoint (``ibot_keras.resume``); ``initial_epoch`` and ``steps_per_epoch`` follow
        from the step and the pipeline. A data source with ``epoch_callback()``
        (``MultiCropLoader``) gets its epoch set at the start of every epoch, as the official
        loop does, and keeps its own per-epoch order (Keras would otherwise shuffle the batch
        order with a random state that no checkpoint captures)."""
        self.check_data(x, kwargs.get("batch_size"), kwargs.get("steps_per_epoch"))
        if self.max_consecutive_skips:
            callbacks = list(callbacks or []) + [NonFiniteStop(self.max_consecutive_skips)]
        return pipeline_fit.fit_data(self, super().fit, x, *args, callbacks=callbacks, **kwargs)

    def compile(self, optimizer="adamw", **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if hasattr(inner, "freeze_variables"):
            inner.freeze_variables(self.last_layer_variables())

    def compile_from_config(self, config):
        # Keras skips compile() on .keras loading when compile() is overridden; ours only adds
        # the last-layer freeze, so restoring through it is safe.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # -- inputs -----------------------------------------------------------------------------
    def _unpack(self, inputs, training=False):
        return checks.unpack_batch(self, inputs, training)

    def check_data(self, x, batch_size=None, steps_per_epoch=None):
        """Host-side checks of training data against the model, before ``fit`` traces a step.

        Raises when masks can exceed ``max_masked_patches`` (their patch loss would be lost) or
        are not 0/1; warns (once per model) when an epoch of ``x`` is not ``steps_per_epoch``
        batches (the schedules would run at another pace) or float crops look like 0-255
        pixels. ``x``: a ``Pipeline``, a loader with ``maker``, or a dict of arrays. See
        ``ibot_keras.models.batch_checks``."""
        checks.check_data(self, x, batch_size, steps_per_epoch)

    # -- forward ----------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """Teacher and student outputs for the loss (batch-first).

        In training with ``max_masked_patches`` set, patch logits are computed only at
        ``M = max_masked_patches`` positions per crop (every masked position first, then
        padding), ``"masks"`` marks which are masked, and ``"teacher_patch_mean"`` carries
        the teacher's mean patch logits over all patches for the center. The loss reads
        nothing else, so the result is the same as with all ``N`` positions, for about half
        the head cost. Otherwise (inference, or no cap) all ``N`` positions are returned.
        """
        global_crops, local_crops, masks = self._unpack(inputs, training)
        batch = ops.shape(global_crops)[0]
        ng, nl = self.num_global_crops, self.num_local_crops
        _, _, height, width, channels = global_crops.shape
        rows, cols = masks.shape[2], masks.shape[3]
        num_patches = rows * cols
        flat_globals = ops.reshape(global_crops, (-1, height, width, channels))
        flat_masks = ops.reshape(masks, (-1, num_patches))
        cap = self.max_masked_patches
        subset = training and cap is not None and cap < num_patches

        teacher_tokens = self.teacher_backbone(flat_globals, training=False)
        student_masks = ops.reshape(masks, (-1, rows, cols)) if self.student_backbone.use_mask_token else None
        student_tokens = self.student_backbone(flat_globals, masks=student_masks, training=training)
        outputs = {}
        if subset:
            heads = masked_position_logits(self.teacher_head, self.student_head, teacher_tokens, student_tokens,
                                           flat_masks, cap)
            outputs["teacher_patch_mean"] = ops.stop_gradient(ops.reshape(heads["teacher_patch_mean"], (batch, ng, -1)))
            outputs["masked_dropped"] = heads["masked_dropped"]
            positions = cap
        else:
            heads = {"masks": flat_masks}
            heads["teacher_cls"], heads["teacher_patch"] = self.teacher_head(teacher_tokens)
            heads["student_cls"], heads["student_patch"] = self.student_head(student_tokens)
            positions = num_patches
        outputs.update(
            student_cls=ops.reshape(heads["student_cls"], (batch, ng, -1)),
            student_patch=ops.reshape(heads["student_patch"], (batch, ng, positions, -1)),
            teacher_cls=ops.stop_gradient(ops.reshape(heads["teacher_cls"], (batch, ng, -1))),
            teacher_patch=ops.stop_gradient(ops.reshape(heads["teacher_patch"], (batch, ng, positions, -1))),
            masks=ops.reshape(heads["masks"], (batch, ng, positions)),
        )
        if self.koleo_loss_weight:
            outputs["student_cls_features"] = ops.reshape(student_tokens[:, 0], (batch, ng, -1))
        if nl:
            _, _, lh, lw, _ = local_crops.shape
            local_tokens = self.student_backbone(
                ops.reshape(local_crops, (-1, lh, lw, channels)), training=training
            )
            # The head is row-wise: running it on the CLS tokens only gives the official CLS
            # logits without the discarded local patch logits.
            local_cls = self.student_head(local_tokens[:, 0])
            outputs["student_local_cls"] = ops.reshape(local_cls, (batch, nl, -1))
        return outputs

    def teacher_temperatures(self, step):
        """``(teacher_temp, teacher_patch_temp)`` used at ``step`` (schedule or override)."""
        temp, patch_temp = self.ibot_loss.temperatures(step // self.steps_per_epoch)
        temp_override = ops.convert_to_tensor(self.teacher_temp_override)
        patch_override = ops.convert_to_tensor(self.teacher_patch_temp_override)
        return (
            ops.where(temp_override > 0, temp_override, temp),
            ops.where(patch_override > 0, patch_override, patch_temp),
        )

    def teacher_momentum_one_minus(self, step):
        """``1 - m`` of the teacher EMA at ``step`` (cosine schedule or override)."""
        override = ops.convert_to_tensor(self.momentum_override)
        return ops.where(override >= 0, 1.0 - override, self.momentum_schedule.one_minus(step))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        step = ops.convert_to_tensor(self.step)
        epoch = step // self.steps_per_epoch
        temperatures = self.teacher_temperatures(step)
        teacher_entropy = step_logs.log_collapse_statistics(self, y_pred["teacher_cls"], temperatures[0])
        out = self.ibot_loss(
            y_pred["student_cls"],
            y_pred["student_patch"],
            y_pred["teacher_cls"],
            y_pred["teacher_patch"],
            y_pred.get("student_local_cls"),
            y_pred["masks"],
            epoch=epoch,
            update_center=training,
            temperatures=temperatures,
            teacher_patch_mean=y_pred.get("teacher_patch_mean"),
        )
        step_logs.log_loss_terms(self, y_pred, out, step, temperatures[0], teacher_entropy)
        loss = out["loss"]
        if self.koleo_loss_weight:
            koleo = koleo_loss(ops.swapaxes(y_pred["student_cls_features"], 0, 1))  # per crop, averaged
            self.koleo_tracker.update_state(backend_specific.metric_value(koleo))
            loss = loss + self.koleo_loss_weight * koleo
        # A non-finite loss makes every gradient NaN (NaN * g), so the optimizer skips the step.
        loss = loss * ops.stop_gradient(ops.where(ops.isfinite(loss), 1.0, float("nan")))
        # The global-batch mean loss; under data parallelism, scaled so that the gradients are
        # those of the global batch (not the replica count times them).
        return backend_specific.replica_loss(loss)

    def step_snapshot_variables(self):
        """Variables whose pre-step values the train step hands to ``after_optimizer_step``:
        the optimizer's iteration count, both centers and the metric variables."""
        return after_step.snapshot_variables(self)

    def step_applied(self, iterations_before):
        """Whether the optimizer applied this step (a bool tensor; call after it ran): see
        ``ibot_keras.models.skipped_steps.optimizer_applied``."""
        return optimizer_applied(self.optimizer, iterations_before)

    def after_optimizer_step(self, snapshot):
        """Teacher EMA with this step's momentum, then ``step += 1`` (runs in the train step);
        returns the step's logs. ``snapshot``: the pre-step values of
        ``step_snapshot_variables()``. A skipped step is undone: see
        ``ibot_keras.models.after_step.finish_step``."""
        return after_step.finish_step(self, snapshot)

    @property
    def metrics(self):
        hidden = []
        if self.optimizer is None:
            hidden += [self.lr_tracker, self.wd_tracker]
        if self.max_masked_patches is None:
            hidden.append(self.masked_dropped_tracker)
        if not self.koleo_loss_weight:
            hidden.append(self.koleo_tracker)
        return [m for m in super().metrics if all(m is not h for h in hidden)]

    # -- serialization ------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update({name: serialize(getattr(self, name)) for name in _COMPONENTS})
        config.update({name: getattr(self, name) for name in _SETTINGS})
        return config
