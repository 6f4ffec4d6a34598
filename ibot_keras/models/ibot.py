"""The iBOT pretrainer: student and EMA teacher, the loss, and the training step."""

import warnings

import keras
from keras import ops

from ibot_keras import backend_specific, resume
from ibot_keras.backend_specific import PostOptimizerStep
from ibot_keras.callbacks import NonFiniteStop
from ibot_keras.losses import IBOTLoss, koleo_loss
from ibot_keras.metrics import LastValue
from ibot_keras.models.head import IBOTHead
from ibot_keras.models.vit import VisionTransformer
from ibot_keras.schedules import CosineSchedule


def _schedule_value(schedule, step):
    if schedule is None:
        return None
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) or callable(schedule):
        return ops.cast(schedule(step), "float32")
    return ops.cast(schedule, "float32")


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
    stay out of the logged metrics; the step counter still advances (that batch is consumed). ``skipped_steps`` (the run's total) and
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
            student_backbone = deserialize(student_backbone)
            student_head = deserialize(student_head)
            teacher_backbone = deserialize(teacher_backbone)
            teacher_head = deserialize(teacher_head)
            ibot_loss = deserialize(ibot_loss)
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
        self._check_components()
        self._check_unique_paths()

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
        self.step = self.add_weight(
            name="step", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        # Overrides set between epochs by ibot_keras.callbacks (a negative value means "use
        # the official schedule"). Model variables, so the compiled step reads them each step.
        self.teacher_temp_override = self._override("teacher_temp_override")
        self.teacher_patch_temp_override = self._override("teacher_patch_temp_override")
        self.momentum_override = self._override("momentum_override")
        self.skipped_steps = self.add_weight(
            name="skipped_steps", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self.consecutive_skips = self.add_weight(
            name="consecutive_skips", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self.cls_tracker = keras.metrics.Mean(name="cls")
        self.patch_tracker = keras.metrics.Mean(name="patch")
        self.lr_tracker = LastValue(name="lr")
        self.wd_tracker = LastValue(name="wd")
        self.teacher_temp_tracker = LastValue(name="teacher_temp")
        self.momentum_tracker = LastValue(name="teacher_momentum")
        # Collapse diagnostics of the teacher's CLS distributions (see compute_loss).
        self.teacher_entropy_tracker = keras.metrics.Mean(name="teacher_entropy")
        self.teacher_batch_entropy_tracker = keras.metrics.Mean(name="teacher_batch_entropy")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.prototype_usage_tracker = keras.metrics.Mean(name="prototype_usage")
        # Masked positions beyond max_masked_patches (their patch loss is lost): must stay 0.
        self.masked_dropped_tracker = keras.metrics.Sum(name="masked_dropped")
        self.koleo_tracker = keras.metrics.Mean(name="koleo")
        self.skipped_tracker = LastValue(name="skipped_steps")
        self.consecutive_tracker = LastValue(name="consecutive_skips")
        self._ema_pairs = self._pair_teacher_with_student()
        self.copy_student_to_teacher()
        self.built = True

    # -- construction -----------------------------------------------------------------------
    def _override(self, name):
        return self.add_weight(
            name=name, shape=(), dtype="float32", initializer=keras.initializers.Constant(-1.0),
            trainable=False, autocast=False,
        )

    def _check_components(self):
        sb, tb = self.student_backbone, self.teacher_backbone
        sh, th, loss = self.student_head, self.teacher_head, self.ibot_loss
        for attr in ("patch_size", "embed_dim", "depth", "num_heads", "image_size"):
            if getattr(sb, attr) != getattr(tb, attr):
                raise ValueError(
                    f"Student and teacher backbones differ in {attr}: "
                    f"{getattr(sb, attr)} vs {getattr(tb, attr)}."
                )
        if sh.out_dim != th.out_dim or sh.out_dim != loss.out_dim:
            raise ValueError(
                f"out_dim differs: student head {sh.out_dim}, teacher head {th.out_dim}, "
                f"loss {loss.out_dim}."
            )
        if not (sh.patch_out_dim == th.patch_out_dim == loss.patch_out_dim):
            raise ValueError(
                "Patch output sizes differ: student head "
                f"{sh.patch_out_dim}, teacher head {th.patch_out_dim}, loss {loss.patch_out_dim}. "
                "A shared head (shared_head=True) forces patch_out_dim = out_dim; with an unshared "
                "student and a shared teacher, patch_out_dim must equal out_dim (official issue #4)."
            )
        if not sb.use_mask_token:
            raise ValueError("The student backbone needs use_mask_token=True for masked image modeling.")

    def _check_unique_paths(self):
        seen = {}
        for layer in (self.student_backbone, self.student_head, self.teacher_backbone, self.teacher_head):
            for variable in layer.weights:
                other = seen.setdefault(variable.path, layer)
                if other is not layer:
                    raise ValueError(
                        f"Two components share the variable path {variable.path!r} ({other.name} and "
                        f"{layer.name}). Give the student and teacher backbones and heads different "
                        "names (e.g. name='student_backbone' / 'teacher_backbone')."
                    )

    def student_weights(self, include_aliases=False):
        """``[(official name, variable, layout)]`` of the student (``backbone.*``, ``head.*``)."""
        return [("backbone." + n, v, l) for n, v, l in self.student_backbone.official_weights()] + [
            ("head." + n, v, l) for n, v, l in self.student_head.official_weights(include_aliases)
        ]

    def teacher_weights(self, include_aliases=False):
        """``[(official name, variable, layout)]`` of the teacher."""
        return [("backbone." + n, v, l) for n, v, l in self.teacher_backbone.official_weights()] + [
            ("head." + n, v, l) for n, v, l in self.teacher_head.official_weights(include_aliases)
        ]

    def _pair_teacher_with_student(self):
        # Official EMA: every parameter name present in both named_parameters() lists.
        student = {name: var for name, var, _ in self.student_weights()}
        pairs = []
        for name, teacher_var, _ in self.teacher_weights():
            if name in student:
                if tuple(student[name].shape) != tuple(teacher_var.shape):
                    raise ValueError(
                        f"Teacher and student shapes differ for {name}: "
                        f"{teacher_var.shape} vs {student[name].shape}."
                    )
                pairs.append((student[name], teacher_var))
        return pairs

    def copy_student_to_teacher(self):
        """Initialise the teacher from the student like the official
        ``teacher.load_state_dict(student.state_dict(), strict=False)``: state-dict entries in
        order, shared-head aliases included (so with an unshared student and a shared teacher
        the teacher's prototypes start as the student's ``last_layer2``)."""
        student = {name: var for name, var, _ in self.student_weights(include_aliases=True)}
        for name, teacher_var, _ in self.teacher_weights(include_aliases=True):
            if name in student:
                # Through NumPy: a fresh buffer (JAX would otherwise alias, then donate it twice).
                teacher_var.assign(ops.convert_to_numpy(student[name]))

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
        if hasattr(x, "stream") and hasattr(x, "total_steps"):
            if args:
                raise ValueError("fit(pipeline, ...) takes keyword arguments only (epochs=..., callbacks=...).")
            return resume.fit_pipeline(self, x, super().fit, callbacks=callbacks, **kwargs)
        if resume.resumed_mid_epoch(self):
            warnings.warn(
                f"The model was restored from a mid-epoch checkpoint (step {resume.model_step(self)}); only a "
                "Pipeline (ibot_keras.data.build_pipeline) continues at that step. With this data the epoch "
                "starts again from its first batch while the schedules continue from the saved step.",
                stacklevel=2,
            )
        if hasattr(x, "epoch_callback"):
            callbacks = list(callbacks or []) + [x.epoch_callback()]
            kwargs["shuffle"] = False
        return super().fit(x, *args, callbacks=callbacks, **kwargs)

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
    def _check_crops(self, key, kind, crops, count, setting):
        """Validate ``(B, count, H, W, C)`` crops; returns the patch grid ``(H/p, W/p)``."""
        shape = tuple(crops.shape)
        p, channels = self.student_backbone.patch_size, self.student_backbone.in_channels
        if len(shape) != 5 or shape[-1] != channels:
            raise ValueError(
                f"'{key}' must be (B, {'ng' if kind == 'Global' else 'nl'}, H, W, {channels}) "
                f"channels-last; got shape {shape}."
            )
        if any(d is None for d in shape[1:]):
            raise ValueError(
                f"'{key}' has shape {shape}: the crop count and size must be known when the step is "
                "traced. On TensorFlow this happens when the batches of one fit call differ in crop "
                "count or size (Keras then retraces with unknown sizes): keep the crop sizes fixed "
                "within a fit call (one Pipeline / loader per size) and the crop counts those of the model."
            )
        if shape[0] == 0:
            raise ValueError(f"'{key}' holds an empty batch (B=0); every batch needs at least one image.")
        if shape[1] != count:
            raise ValueError(
                f"'{key}' has {shape[1]} crops per image but the model was configured with "
                f"{setting}={count}."
            )
        if shape[2] % p or shape[3] % p:
            raise ValueError(f"{kind} crop size {shape[2]}x{shape[3]} is not a multiple of patch_size={p}.")
        dtype = keras.backend.standardize_dtype(crops.dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise TypeError(
                f"'{key}' has dtype {dtype}; crops must be floating point, normalised with the ImageNet "
                "mean and std as the official transform does (build_pipeline / MultiCropAugmentation "
                "make them): (x / 255 - mean) / std."
            )
        return shape[2] // p, shape[3] // p

    def _unpack(self, inputs, training=False):
        if not isinstance(inputs, dict):
            raise ValueError(
                "IBOT expects a dict batch with 'global_crops' (B, ng, H, W, C), 'local_crops' "
                f"(B, nl, h, w, C) and 'masks' (B, ng, H/p, W/p); got {type(inputs).__name__}."
            )
        unknown = set(inputs) - {"global_crops", "local_crops", "masks"}
        if unknown:
            raise ValueError(f"Unknown batch keys {sorted(unknown)}; expected global_crops, local_crops, masks.")
        if "global_crops" not in inputs:
            raise ValueError("The batch has no 'global_crops' (B, ng, H, W, C).")
        global_crops = inputs["global_crops"]
        ng, nl, p = self.num_global_crops, self.num_local_crops, self.student_backbone.patch_size
        rows, cols = self._check_crops("global_crops", "Global", global_crops, ng, "global_crops_number")
        size = self.global_crop_size
        if training and size is not None and (rows * p, cols * p) != (size, size):
            raise ValueError(
                f"The global crops are {rows * p}x{cols * p} but the model was configured with "
                f"global_crop_size={size} (its max_masked_patches={self.max_masked_patches} was derived "
                f"for {size}-px crops). Build the pretrainer with global_crop_size={rows * p}, or make "
                f"{size}-px crops (build_pipeline(config, ...) uses the config's sizes)."
            )
        masks = inputs.get("masks")
        if masks is None:
            masks = ops.zeros((ops.shape(global_crops)[0], ng, rows, cols), "bool")
        elif tuple(masks.shape[1:]) != (ng, rows, cols):
            raise ValueError(
                f"'masks' must be (B, {ng}, {rows}, {cols}) for {rows * p}x{cols * p} global crops "
                f"with patch_size={p}; got shape {tuple(masks.shape)}."
            )
        elif training:  # (Keras' build call under tf.distribute averages uint8 masks to float)
            mask_dtype = keras.backend.standardize_dtype(masks.dtype)
            if mask_dtype != "bool" and not mask_dtype.startswith(("int", "uint")):
                raise TypeError(
                    f"'masks' has dtype {mask_dtype}; masks must be bool (True = masked) or 0/1 integers "
                    "(a float mask would be read as True wherever it is not exactly 0)."
                )
        masks = ops.cast(masks, "bool")
        local_crops = inputs.get("local_crops")
        if nl:
            if local_crops is None:
                raise ValueError(
                    f"The model was configured with local_crops_number={nl} but the batch has no "
                    "'local_crops'."
                )
            self._check_crops("local_crops", "Local", local_crops, nl, "local_crops_number")
        elif local_crops is not None and local_crops.shape[1]:
            raise ValueError(
                "The batch has 'local_crops' but the model was configured with local_crops_number=0."
            )
        return global_crops, (local_crops if nl else None), masks

    def check_data(self, x, batch_size=None, steps_per_epoch=None):
        """Host-side checks of training data against the model, before ``fit`` traces a step.

        Raises when masks can exceed ``max_masked_patches`` (their patch loss would be lost) or
        are not 0/1; warns (once per model) when an epoch of ``x`` is not ``steps_per_epoch``
        batches (the schedules would run at another pace) or float crops look like 0-255
        pixels. ``x``: a ``Pipeline``, a loader with ``maker``, or a dict of arrays."""
        maker = getattr(x, "maker", None)
        if maker is not None:
            grid = maker.grid
            most = maker.masking.max_masked_patches(grid * grid)
            self._check_mask_count(most, f"the data's masking (pred_ratio {maker.masking.pred_ratio}, "
                                         f"pred_ratio_var {maker.masking.pred_ratio_var})")
            if not hasattr(x, "stream"):  # fit_pipeline checks a Pipeline's epochs itself
                self._warn_length(len(x) if steps_per_epoch is None else steps_per_epoch, "len(data)")
            return
        if isinstance(x, dict) and all(hasattr(v, "shape") and not keras.ops.is_tensor(v) for v in x.values()):
            import numpy as np

            masks = x.get("masks")
            if masks is not None and masks.size:
                masks = np.asarray(masks)
                if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
                    raise ValueError("'masks' holds values other than 0 and 1; masks must be bool or 0/1 integers.")
                per_crop = masks.reshape(masks.shape[0] * masks.shape[1], -1).astype(bool).sum(axis=1)
                self._check_mask_count(int(per_crop.max()), "the 'masks' given")
            crops = np.asarray(x.get("global_crops", np.zeros((0,))))
            if crops.size and np.issubdtype(crops.dtype, np.floating) and float(np.nanmax(crops)) > 20:
                self._warn_once(
                    "range", f"'global_crops' reach {float(np.nanmax(crops)):.0f}: crops should be normalised "
                    "with the ImageNet mean and std (about -2.1 to 2.6), not 0-255 pixels.", stacklevel=4
                )
            if crops.ndim and batch_size and steps_per_epoch is None:
                self._warn_length(-(-crops.shape[0] // int(batch_size)), f"ceil({crops.shape[0]} / batch_size)")

    def _check_mask_count(self, most, what):
        cap = self.max_masked_patches
        if cap is not None and most > cap:
            raise ValueError(
                f"{what} can mask {most} patches of a global crop, but the model computes the patch loss "
                f"at max_masked_patches={cap} positions: the excess would be lost. Build the pretrainer "
                "with the same pred_ratio / pred_ratio_var and global_crop_size as the data."
            )

    def _warn_length(self, length, what):
        if length != self.steps_per_epoch:
            self._warn_once(
                "length", f"An epoch of this data is {length} batch{'es' if length != 1 else ''} ({what}) but "
                "the model was built with "
                f"steps_per_epoch={self.steps_per_epoch}: the lr, weight-decay, momentum and temperature "
                f"schedules assume {self.steps_per_epoch}. Build with steps_per_epoch={length} to train "
                "on the official schedules.", stacklevel=5
            )

    def _warn_once(self, key, message, stacklevel):
        warned = self.__dict__.setdefault("_data_warnings", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(message, stacklevel=stacklevel)

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
            # Masked positions first (index order), then unmasked ones as padding.
            order = ops.cast(flat_masks, "float32") - ops.arange(num_patches, dtype="float32") / (2.0 * num_patches)
            _, index = ops.top_k(order, k=cap, sorted=True)  # (B*ng, M)
            selected_masks = ops.take_along_axis(flat_masks, index, axis=1)

            def gather(x):
                wide = ops.broadcast_to(index[..., None], (ops.shape(x)[0], cap, x.shape[-1]))
                return ops.take_along_axis(x, wide, axis=1)

            teacher_z = self.teacher_head.bottleneck(teacher_tokens)  # (B*ng, 1+N, bottleneck)
            teacher_cls = self.teacher_head.last_layer(teacher_z[:, 0])
            teacher_patch = self.teacher_head.patch_logits(gather(teacher_z[:, 1:]))
            # The prototype layer is linear: mean of logits = logits of the mean.
            teacher_patch_mean = self.teacher_head.patch_logits(ops.mean(teacher_z[:, 1:], axis=1))
            outputs["teacher_patch_mean"] = ops.stop_gradient(ops.reshape(teacher_patch_mean, (batch, ng, -1)))
            student_input = ops.concatenate([student_tokens[:, :1], gather(student_tokens[:, 1:])], axis=1)
            student_cls, student_patch = self.student_head(student_input)
            outputs["masked_dropped"] = ops.sum(
                ops.maximum(ops.sum(ops.cast(flat_masks, "int32"), axis=1) - cap, 0)
            )
            positions, loss_masks = cap, selected_masks
        else:
            teacher_cls, teacher_patch = self.teacher_head(teacher_tokens)
            student_cls, student_patch = self.student_head(student_tokens)
            positions, loss_masks = num_patches, flat_masks
        outputs.update(
            student_cls=ops.reshape(student_cls, (batch, ng, -1)),
            student_patch=ops.reshape(student_patch, (batch, ng, positions, -1)),
            teacher_cls=ops.stop_gradient(ops.reshape(teacher_cls, (batch, ng, -1))),
            teacher_patch=ops.stop_gradient(ops.reshape(teacher_patch, (batch, ng, positions, -1))),
            masks=ops.reshape(loss_masks, (batch, ng, positions)),
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
        teacher_entropy = self._update_collapse_diagnostics(y_pred["teacher_cls"], temperatures[0])
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
        # Under data parallelism these are this replica's values; metric_value makes the logs
        # global-batch values on every backend (see backend_specific).
        metric = backend_specific.metric_value
        if "masked_dropped" in y_pred:
            self.masked_dropped_tracker.update_state(metric(y_pred["masked_dropped"], "sum"))
        if self.ibot_loss.lambda1:
            # KL(teacher || student) averaged over the CLS pairs = CE - teacher entropy.
            self.kl_tracker.update_state(metric(out["cls"] / self.ibot_loss.lambda1 - teacher_entropy))
        self.cls_tracker.update_state(metric(out["cls"]))
        self.patch_tracker.update_state(metric(out["patch"]))
        self.teacher_temp_tracker.update_state(temperatures[0])
        self.momentum_tracker.update_state(1.0 - self.teacher_momentum_one_minus(step))
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if inner is not None:
            schedule = getattr(inner, "learning_rate_schedule", None)
            self.lr_tracker.update_state(_schedule_value(inner.learning_rate if schedule is None else schedule, step))
            wd = getattr(inner, "weight_decay_value", getattr(inner, "weight_decay", None))
            if wd is not None:
                self.wd_tracker.update_state(_schedule_value(wd, step))
        loss = out["loss"]
        if self.koleo_loss_weight:
            koleo = koleo_loss(ops.swapaxes(y_pred["student_cls_features"], 0, 1))  # per crop, averaged
            self.koleo_tracker.update_state(metric(koleo))
            loss = loss + self.koleo_loss_weight * koleo
        # A non-finite loss makes every gradient NaN (NaN * g), so the optimizer skips the step.
        loss = loss * ops.stop_gradient(ops.where(ops.isfinite(loss), 1.0, float("nan")))
        # The global-batch mean loss; under data parallelism, scaled so that the gradients are
        # those of the global batch (not the replica count times them).
        return backend_specific.replica_loss(loss)

    def _update_collapse_diagnostics(self, teacher_cls, temp):
        """Teacher CLS distribution statistics (nats), with the centers the loss uses:

        - ``teacher_entropy``: mean entropy of a teacher output. Near ``log(out_dim)`` with a
          small ``kl``: uniform collapse (every image gets the same flat distribution).
        - ``teacher_batch_entropy``: entropy of the batch-mean teacher output. Near 0: one
          prototype wins for every image (the other collapse).
        - ``kl``: KL(teacher || student) over the loss's view pairs: what is left to learn.
        - ``prototype_usage``: fraction of prototypes that are the teacher's argmax for at
          least one crop of the batch.
        Healthy training keeps ``teacher_entropy`` well below ``log(out_dim)`` and
        ``teacher_batch_entropy`` well above 0.
        """
        logits = (ops.cast(teacher_cls, "float32") - ops.convert_to_tensor(self.ibot_loss.center)) / temp
        logits = ops.reshape(logits, (-1, logits.shape[-1]))
        log_p = ops.log_softmax(logits, axis=-1)
        p = ops.exp(log_p)
        entropy = -ops.mean(ops.sum(p * log_p, axis=-1))
        # Batch statistics over the global batch (identical on every data-parallel replica).
        mean_p = backend_specific.cross_replica_mean(ops.mean(p, axis=0))
        batch_entropy = -ops.sum(mean_p * ops.log(ops.maximum(mean_p, 1e-30)))
        winners = ops.max(ops.one_hot(ops.argmax(logits, axis=-1), logits.shape[-1]), axis=0)
        winners = ops.cast(backend_specific.cross_replica_mean(winners) > 0, "float32")
        self.teacher_entropy_tracker.update_state(backend_specific.metric_value(entropy))
        self.teacher_batch_entropy_tracker.update_state(batch_entropy)
        self.prototype_usage_tracker.update_state(ops.mean(winners))
        return entropy

    def _skip_trackers(self):
        return (self.skipped_tracker, self.consecutive_tracker)

    def _restored_metric_variables(self):
        """Metric variables a skipped step leaves as they were (all but the skip counters)."""
        excluded = {id(v) for tracker in self._skip_trackers() for v in tracker.variables}
        return [v for v in self.metrics_variables if id(v) not in excluded]

    def step_snapshot_variables(self):
        """Variables whose pre-step values the train step hands to ``after_optimizer_step``:
        the optimizer's iteration count, both centers and the metric variables."""
        return [self.optimizer.iterations, self.ibot_loss.center, self.ibot_loss.patch_center,
                *self._restored_metric_variables()]

    def step_applied(self, iterations_before):
        """Whether the optimizer applied this step (a bool tensor; call after it ran).

        False when a ``LossScaleOptimizer`` skipped it (``iterations`` did not advance) or
        ``IBOTAdamW`` skipped non-finite gradients (its ``update_skipped``)."""
        applied = ops.not_equal(ops.convert_to_tensor(self.optimizer.iterations), iterations_before)
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        skipped = getattr(inner, "update_skipped", None)
        if skipped is not None:
            applied = ops.logical_and(applied, ops.equal(ops.convert_to_tensor(skipped), 0))
        return applied

    def after_optimizer_step(self, snapshot):
        """Teacher EMA with this step's momentum, then ``step += 1`` (runs in the train step);
        returns the step's logs.

        ``snapshot``: the pre-step values of ``step_snapshot_variables()``. On a skipped step
        (``step_applied`` False: non-finite loss or gradients, or a float16 overflow) the
        centers and metrics get their pre-step values back, the teacher does not move and the
        skip counters advance. As in the official code the iteration still counts for the
        lr/wd/freeze schedules (the official ``it``), while the per-parameter Adam step counts
        do not advance: Keras' loss-scale optimizer leaves ``iterations`` behind on a skipped
        step, so catch it up. (Deviation: the official fp16 loop skips only the AdamW step and
        still moves the centers and the teacher.) Variables are float32 and no autocast scope is
        active here, so the EMA (``1 - m`` down to 1e-4) runs in float32 under any dtype policy.
        """
        step = ops.convert_to_tensor(self.step)
        one_minus_m = self.teacher_momentum_one_minus(step)
        momentum = 1.0 - one_minus_m
        iterations_before, center_before, patch_center_before, *metrics_before = snapshot
        applied = self.step_applied(iterations_before)
        self.optimizer.iterations.assign(iterations_before + ops.ones_like(iterations_before))
        for variable, before in ((self.ibot_loss.center, center_before),
                                 (self.ibot_loss.patch_center, patch_center_before)):
            variable.assign(ops.where(applied, ops.convert_to_tensor(variable), before))
        # A skipped step whose logged values are not finite is left out of the epoch's metrics
        # (a float16 overflow skip, with a finite loss, is still logged).
        metric_variables = self._restored_metric_variables()
        values = [ops.convert_to_tensor(v) for v in metric_variables]
        all_finite = ops.all(ops.stack([ops.all(ops.isfinite(ops.cast(v, "float32"))) for v in values]))
        keep = ops.logical_or(applied, all_finite)
        for variable, value, before in zip(metric_variables, values, metrics_before):
            variable.assign(ops.where(keep, value, before))
        for student_var, teacher_var in self._ema_pairs:
            student_value = ops.stop_gradient(ops.convert_to_tensor(student_var))
            teacher_value = ops.convert_to_tensor(teacher_var)
            new_value = teacher_value * momentum + student_value * one_minus_m
            teacher_var.assign(ops.where(applied, new_value, teacher_value))
        missed = ops.cast(ops.logical_not(applied), "int32")
        skipped = ops.convert_to_tensor(self.skipped_steps) + missed
        consecutive = (ops.convert_to_tensor(self.consecutive_skips) + 1) * missed
        self.skipped_steps.assign(skipped)
        self.consecutive_skips.assign(consecutive)
        self.skipped_tracker.update_state(skipped)
        self.consecutive_tracker.update_state(consecutive)
        self.step.assign(step + 1)
        return self.get_metrics_result()

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
        config.update(
            student_backbone=serialize(self.student_backbone),
            student_head=serialize(self.student_head),
            teacher_backbone=serialize(self.teacher_backbone),
            teacher_head=serialize(self.teacher_head),
            ibot_loss=serialize(self.ibot_loss),
            steps_per_epoch=self.steps_per_epoch,
            momentum_teacher=self.momentum_teacher,
            max_masked_patches=self.max_masked_patches,
            koleo_loss_weight=self.koleo_loss_weight,
            max_consecutive_skips=self.max_consecutive_skips,
            global_crop_size=self.global_crop_size,
        )
        return config
