"""The iBOT loss: [CLS] self-distillation across views + masked patch self-distillation; and
DINOv2's optional stabilisers (not part of iBOT): ``koleo_loss`` (a spreading regulariser) and
``sinkhorn_knopp`` (balanced teacher targets, ``IBOTLoss(centering="sinkhorn_knopp")``)."""

import keras
import numpy as np
from keras import ops

from ibot_keras import backend_specific
from ibot_keras.schedules import teacher_temperature_schedule


def koleo_loss(features, eps=1e-8):
    """Kozachenko-Leonenko entropy term (DINOv2's KoLeo): ``-mean_i log d_i``, where ``d_i``
    is the distance from row ``i`` of the L2-normalised ``features`` ``(B, D)`` to its
    nearest other row. Falls as the rows spread over the sphere. ``B >= 2``.

    ``(..., B, D)``: one term per leading index (neighbours searched within each ``(B, D)``
    set, e.g. per crop), averaged.
    """
    if features.shape[-2] is not None and features.shape[-2] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows (a nearest neighbour), got {features.shape[-2]}.")
    x = ops.cast(features, "float32")
    x = x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), eps)
    rows = ops.shape(x)[-2]
    similarity = ops.matmul(x, ops.swapaxes(x, -1, -2)) - 3.0 * ops.eye(rows)  # never pick itself
    nearest_index = ops.expand_dims(ops.argmax(similarity, axis=-1), -1)
    nearest = ops.take_along_axis(x, nearest_index, axis=-2)
    # eps**2 under the root: identical rows (duplicates in a batch) get a finite gradient.
    distance = ops.sqrt(ops.sum(ops.square(x - nearest), axis=-1) + eps * eps)
    return -ops.mean(ops.log(distance + eps))


CENTERINGS = ("ema", "sinkhorn_knopp")
PATCH_NORMALIZATIONS = ("image", "token")
_EXCLUDED = -1e30  # log-domain value of a row that takes no part (exp gives exactly 0)


def _global_logsumexp_over_rows(x, present):
    """``log sum_m exp(x[m, k])`` over the rows of every replica: ``(M, K) -> (1, K)``.

    Each replica's log-sum-exp is shifted by the mean of the replicas' values (the same on
    all of them, so the combined sum is exact) before the all-reduce; replicas without a
    present row take no part. On one device the shift is the value itself: exactly the local
    log-sum-exp."""
    local = ops.logsumexp(ops.where(present, x, _EXCLUDED), axis=0, keepdims=True)
    has_rows = ops.cast(ops.any(present), "float32")
    shift = backend_specific.cross_replica_sum(has_rows * local) / ops.maximum(
        backend_specific.cross_replica_sum(has_rows), 1.0
    )
    total = backend_specific.cross_replica_sum(has_rows * ops.exp(local - shift))
    return shift + ops.log(ops.maximum(total, 1e-30))  # total >= 1 when any row is present


def sinkhorn_knopp(logits, temperature, iterations=3, weights=None):
    """Balanced teacher targets (DINOv2's ``SinkhornKnoppTeacher``): ``(M, K) -> (M, K)``.

    From ``Q = exp(logits / temperature)``, ``iterations`` times: scale each prototype (column
    ``k``) to total ``1/K``, then each row to total ``1/M``; return ``M * Q`` (every row sums
    to 1). Computed in float32 in the log domain (each scaling subtracts a log-sum-exp, which
    subtracts the max before ``exp``), so large logits cannot overflow; no gradient flows
    (the result is a target).

    ``weights``: optional ``(M,)`` 0/1 marking the rows that take part (e.g. masked patch
    tokens); ``M`` is then their number and unmarked rows return zeros. Under data parallel
    training, ``M`` and the prototype sums run over the global batch (every replica's rows),
    as in DINOv2; ``temperature`` is a float or scalar tensor.
    """
    if int(iterations) < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be >= 1, got {iterations}.")
    x = ops.stop_gradient(ops.cast(logits, "float32"))
    x = x / ops.cast(temperature, "float32")
    num_prototypes = x.shape[-1]
    if weights is None:
        present = ops.ones_like(x[:, :1], dtype="bool")
    else:
        present = ops.cast(ops.reshape(weights, (-1, 1)), "float32") > 0
    rows = backend_specific.cross_replica_sum(ops.sum(ops.cast(present, "float32")))
    log_rows = ops.log(ops.maximum(rows, 1.0))
    log_prototypes = float(np.log(num_prototypes))
    for _ in range(int(iterations)):
        x = x - (_global_logsumexp_over_rows(x, present) + log_prototypes)
        x = x - (ops.logsumexp(x, axis=-1, keepdims=True) + log_rows)
    return ops.exp(ops.where(present, x + log_rows, _EXCLUDED))


@keras.saving.register_keras_serializable(package="ibot_keras")
class IBOTLoss(keras.layers.Layer):
    """iBOT loss with EMA centers and per-epoch teacher temperature warmups (official
    ``iBOTLoss``), usable on its own::

        out = loss(student_cls, student_patch, teacher_cls, teacher_patch,
                   student_local_cls, masks, epoch, update_center=True)

    Shapes are batch-first: ``student_cls``/``teacher_cls`` ``(B, ng, K)``, ``student_patch``/
    ``teacher_patch`` ``(B, ng, N, Kp)``, ``student_local_cls`` ``(B, nl, K)`` or ``None``,
    ``masks`` ``(B, ng, N)`` (or ``(B, ng, h, w)``) bool. Student outputs come from the
    *masked* global crops, teacher outputs from the unmasked ones. Returns
    ``{"cls", "patch", "loss"}`` (lambdas applied, ``loss = cls + patch``).

    - CLS term: cross-entropy of every student view ``v`` against every teacher global view
      ``q != v``, averaged over the batch, summed over pairs, divided by ``ng*(ng+nl) - ng``.
    - Patch term: per image, the mean cross-entropy over its masked patches (0 for an image
      without masked patches), averaged over *all* images, summed over the ``ng`` views and
      divided by ``ng``. Computed with static shapes (no gather on masks).
    - After the loss, ``center`` ``(1, K)`` and ``patch_center`` ``(1, 1, Kp)`` move by EMA
      towards the mean raw teacher CLS logits and the mean of per-image mean patch logits
      (all patches), over the global batch. A non-finite batch leaves them unchanged.

    Teacher temperatures are chosen by ``epoch`` (int or scalar tensor) from the official
    tables ``teacher_temp_schedule`` / ``teacher_patch_temp_schedule``; epochs past the end use
    the last value.

    Options from DINOv2/v3 (the defaults are official iBOT):

    - ``centering``: ``"ema"`` (official) centers and softmaxes the teacher outputs as above.
      ``"sinkhorn_knopp"`` replaces center-and-softmax by ``sinkhorn_knopp`` (3 iterations,
      the same temperatures), computed over the ``B*ng`` teacher global [CLS] rows and,
      separately, over the masked patch positions only (``masks`` as weights), global batch
      under data parallel; the centers are then neither used nor updated (``update_center``
      is ignored).
    - ``patch_normalization``: ``"image"`` (official; DINOv2 normalises the same way) is the
      patch term above: each image's masked mean, averaged over all ``B`` images (those
      without a masked patch count as 0), summed over views and divided by ``ng``.
      ``"token"`` weighs every masked patch alike (dinov3 #302: per-image means weigh
      heavily masked images less per patch): ``sum over images, views and positions of
      ce * mask / max(1, number of masked patches)``, both sums over the global batch.
    """

    def __init__(
        self,
        out_dim,
        patch_out_dim,
        num_global_crops,
        num_local_crops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_patch_temp,
        teacher_patch_temp,
        warmup_teacher_temp_epochs,
        epochs,
        student_temp=0.1,
        center_momentum=0.9,
        patch_center_momentum=0.9,
        lambda1=1.0,
        lambda2=1.0,
        mim_start_epoch=0,
        centering="ema",
        patch_normalization="image",
        **kwargs,
    ):
        kwargs["dtype"] = "float32"
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.out_dim = int(out_dim)
        self.patch_out_dim = int(patch_out_dim)
        self.num_global_crops = int(num_global_crops)
        self.num_local_crops = int(num_local_crops)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_patch_temp = float(warmup_teacher_patch_temp)
        self.teacher_patch_temp = float(teacher_patch_temp)
        self.warmup_teacher_temp_epochs = int(warmup_teacher_temp_epochs)
        self.epochs = int(epochs)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.patch_center_momentum = float(patch_center_momentum)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.mim_start_epoch = int(mim_start_epoch)
        for name, value, allowed in (
            ("centering", centering, CENTERINGS),
            ("patch_normalization", patch_normalization, PATCH_NORMALIZATIONS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"IBOTLoss: {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
                )
        self.centering = centering
        self.patch_normalization = patch_normalization
        if self.num_global_crops < 1:
            raise ValueError("num_global_crops must be >= 1.")
        if self.num_global_crops == 1 and self.num_local_crops == 0:
            raise ValueError("With one global crop and no local crops the CLS loss has no pair.")

        self.teacher_temp_schedule = teacher_temperature_schedule(
            self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs, self.epochs
        )
        self.teacher_patch_temp_schedule = teacher_temperature_schedule(
            self.warmup_teacher_patch_temp,
            self.teacher_patch_temp,
            self.warmup_teacher_temp_epochs,
            self.epochs,
            start_epoch=self.mim_start_epoch,
        )
        self.center = self.add_weight(
            name="center", shape=(1, self.out_dim), initializer="zeros", trainable=False
        )
        self.patch_center = self.add_weight(
            name="patch_center",
            shape=(1, 1, self.patch_out_dim),
            initializer="zeros",
            trainable=False,
        )
        self.built = True

    # -- temperatures -----------------------------------------------------------------------
    def temperatures(self, epoch):
        """``(teacher_temp, teacher_patch_temp)`` float32 scalars for ``epoch``."""
        index = ops.minimum(ops.cast(epoch, "int32"), self.epochs - 1)
        temps = ops.take(
            ops.convert_to_tensor(self.teacher_temp_schedule.astype("float32")), index
        )
        patch_temps = ops.take(
            ops.convert_to_tensor(self.teacher_patch_temp_schedule.astype("float32")), index
        )
        return temps, patch_temps

    # -- checks -----------------------------------------------------------------------------
    def _check_shapes(self, student_cls, student_patch, teacher_cls, teacher_patch, local, masks):
        ng, nl = self.num_global_crops, self.num_local_crops

        def expect(name, tensor, rank, dims):
            shape = tuple(tensor.shape)
            if len(shape) != rank or any(d is not None and s is not None and s != d for s, d in zip(shape, dims)):
                want = ", ".join("B" if d is None else str(d) for d in dims)
                raise ValueError(f"IBOTLoss: {name} must have shape ({want}); got {shape}.")

        expect("student_cls", student_cls, 3, (None, ng, self.out_dim))
        expect("teacher_cls", teacher_cls, 3, (None, ng, self.out_dim))
        num_patches = student_patch.shape[2] if len(student_patch.shape) == 4 else None
        expect("student_patch", student_patch, 4, (None, ng, num_patches, self.patch_out_dim))
        expect("teacher_patch", teacher_patch, 4, (None, ng, num_patches, self.patch_out_dim))
        if nl:
            if local is None:
                raise ValueError(f"IBOTLoss was built for {nl} local crops but student_local_cls is None.")
            expect("student_local_cls", local, 3, (None, nl, self.out_dim))
        elif local is not None and local.shape[1] != 0:
            raise ValueError("IBOTLoss was built with num_local_crops=0 but student_local_cls was given.")
        if len(masks.shape) == 4:
            masks = ops.reshape(masks, (-1, ng, masks.shape[2] * masks.shape[3]))
        expect("masks", masks, 3, (None, ng, num_patches))
        return masks

    # -- loss -------------------------------------------------------------------------------
    def call(
        self,
        student_cls,
        student_patch,
        teacher_cls,
        teacher_patch,
        student_local_cls=None,
        masks=None,
        epoch=0,
        update_center=True,
        temperatures=None,
        teacher_patch_mean=None,
    ):
        """``temperatures``: optional ``(teacher_temp, teacher_patch_temp)`` that replace the
        per-epoch schedule (used by ``ibot_keras.callbacks.TeacherTemperatureScheduler``).

        ``teacher_patch_mean``: optional ``(B, ng, Kp)`` mean of the teacher patch logits over
        *all* patches of each crop, for the patch center. It lets callers pass patch logits of a
        subset of positions (every masked one plus padding, marked by ``masks``): the loss reads
        masked positions only, and the mean is the only use of the others."""
        ng = self.num_global_crops
        if masks is None:
            raise ValueError("IBOTLoss needs the masks of the global crops, (B, ng, N) bool.")
        masks = self._check_shapes(
            student_cls, student_patch, teacher_cls, teacher_patch, student_local_cls, masks
        )
        temp, patch_temp = self.temperatures(epoch) if temperatures is None else temperatures
        f32 = lambda t: ops.cast(t, "float32")  # noqa: E731
        teacher_cls = ops.stop_gradient(f32(teacher_cls))
        teacher_patch = ops.stop_gradient(f32(teacher_patch))

        # CLS term over all (teacher global view q, student view v != q) pairs.
        student_views = f32(student_cls)
        if self.num_local_crops:
            student_views = ops.concatenate([student_views, f32(student_local_cls)], axis=1)
        student_logp = ops.log_softmax(student_views / self.student_temp, axis=-1)  # (B, V, K)
        if self.centering == "sinkhorn_knopp":
            flat = sinkhorn_knopp(ops.reshape(teacher_cls, (-1, self.out_dim)), temp)
            teacher_p = ops.reshape(flat, ops.shape(teacher_cls))  # (B, ng, K)
        else:
            teacher_p = ops.softmax((teacher_cls - ops.convert_to_tensor(self.center)) / temp, axis=-1)
        ce = -ops.einsum("bqk,bvk->bqv", teacher_p, student_logp)  # (B, ng, V)
        same_view = ops.convert_to_tensor(
            np.eye(ng, ng + self.num_local_crops, dtype="float32")
        )
        num_pairs = ng * (ng + self.num_local_crops) - ng
        cls_per_image = ops.sum(ce * (1.0 - same_view), axis=(1, 2)) / num_pairs
        loss_cls = self.lambda1 * ops.mean(cls_per_image)

        # Patch term on masked tokens of the same view.
        student_patch_logp = ops.log_softmax(f32(student_patch) / self.student_temp, axis=-1)
        weights = f32(masks)
        if self.centering == "sinkhorn_knopp":
            flat = sinkhorn_knopp(ops.reshape(teacher_patch, (-1, self.patch_out_dim)), patch_temp,
                                  weights=ops.reshape(weights, (-1,)))  # masked positions only
            teacher_patch_p = ops.reshape(flat, ops.shape(teacher_patch))
        else:
            teacher_patch_p = ops.softmax(
                (teacher_patch - ops.convert_to_tensor(self.patch_center)) / patch_temp, axis=-1)
        patch_ce = -ops.sum(teacher_patch_p * student_patch_logp, axis=-1)  # (B, ng, N)
        if self.patch_normalization == "token":
            masked = backend_specific.cross_replica_sum(ops.sum(weights))
            replicas = backend_specific.cross_replica_sum(ops.ones(()))
            # This replica's share: the mean over replicas is the global-batch value.
            loss_patch = self.lambda2 * ops.sum(patch_ce * weights) * replicas / ops.maximum(masked, 1.0)
        else:
            masked = ops.sum(weights, axis=-1)
            per_view = ops.sum(patch_ce * weights, axis=-1) / ops.maximum(masked, 1.0)  # (B, ng)
            loss_patch = self.lambda2 * ops.mean(ops.sum(per_view, axis=1)) / ng

        if update_center and self.centering == "ema":
            if teacher_patch_mean is None:
                teacher_patch_mean = ops.mean(teacher_patch, axis=2)
            self.update_center(teacher_cls, ops.stop_gradient(f32(teacher_patch_mean)))
        return {"cls": loss_cls, "patch": loss_patch, "loss": loss_cls + loss_patch}

    def update_center(self, teacher_cls, teacher_patch_mean):
        """EMA of the centers from raw teacher CLS logits ``(B, ng, K)`` and the per-crop mean
        of the teacher patch logits over all patches ``(B, ng, Kp)``."""
        batch_center = ops.mean(teacher_cls, axis=(0, 1))[None]  # (1, K)
        batch_patch_center = ops.mean(teacher_patch_mean, axis=(0, 1))[None, None]
        batch_center = backend_specific.cross_replica_mean(batch_center)
        batch_patch_center = backend_specific.cross_replica_mean(batch_patch_center)
        for variable, batch_value, momentum in (
            (self.center, batch_center, self.center_momentum),
            (self.patch_center, batch_patch_center, self.patch_center_momentum),
        ):
            old = ops.convert_to_tensor(variable)
            new = old * momentum + batch_value * (1.0 - momentum)
            variable.assign(ops.where(ops.all(ops.isfinite(new)), new, old))

    def get_config(self):
        config = super().get_config()
        for key in ("dtype", "autocast"):
            config.pop(key, None)
        config.update(
            out_dim=self.out_dim,
            patch_out_dim=self.patch_out_dim,
            num_global_crops=self.num_global_crops,
            num_local_crops=self.num_local_crops,
            warmup_teacher_temp=self.warmup_teacher_temp,
            teacher_temp=self.teacher_temp,
            warmup_teacher_patch_temp=self.warmup_teacher_patch_temp,
            teacher_patch_temp=self.teacher_patch_temp,
            warmup_teacher_temp_epochs=self.warmup_teacher_temp_epochs,
            epochs=self.epochs,
            student_temp=self.student_temp,
            center_momentum=self.center_momentum,
            patch_center_momentum=self.patch_center_momentum,
            lambda1=self.lambda1,
            lambda2=self.lambda2,
            mim_start_epoch=self.mim_start_epoch,
            centering=self.centering,
            patch_normalization=self.patch_normalization,
        )
        return config
