"""Head outputs at the masked patch positions only (the training step's ``max_masked_patches``)."""

import keras
from keras import ops


def masked_position_logits(teacher_head, student_head, teacher_tokens, student_tokens, masks, num_positions):
    """Teacher and student head outputs at ``M = num_positions`` patch positions per crop:
    every masked position first (in index order), then unmasked ones as padding.

    ``teacher_tokens``, ``student_tokens``: backbone outputs ``(R, 1+N, D)`` (R crops, [CLS]
    first); ``masks``: ``(R, N)`` bool. Returns a dict: ``teacher_cls``/``student_cls``
    ``(R, K)``, ``teacher_patch``/``student_patch`` ``(R, M, Kp)``, ``masks`` ``(R, M)`` (which
    of the M positions are masked), ``teacher_patch_mean`` ``(R, Kp)`` (the teacher's mean patch
    logits over all N patches, for the patch center) and ``masked_dropped`` (masked positions
    beyond M, summed over the crops; their patch loss is lost).
    """
    num_patches = masks.shape[1]
    order = ops.cast(masks, "float32") - ops.arange(num_patches, dtype="float32") / (2.0 * num_patches)
    _, index = ops.top_k(order, k=num_positions, sorted=True)  # (R, M)

    def gather(x):
        wide = ops.broadcast_to(index[..., None], (ops.shape(x)[0], num_positions, x.shape[-1]))
        return ops.take_along_axis(x, wide, axis=1)

    with keras.name_scope(teacher_head.name):  # op names as in a call of the head (profiles)
        teacher_z = teacher_head.bottleneck(teacher_tokens)  # (R, 1+N, bottleneck)
        outputs = {
            "teacher_cls": teacher_head.last_layer(teacher_z[:, 0]),
            "teacher_patch": teacher_head.patch_logits(gather(teacher_z[:, 1:])),
            # The prototype layer is linear: mean of logits = logits of the mean.
            "teacher_patch_mean": teacher_head.patch_logits(ops.mean(teacher_z[:, 1:], axis=1)),
        }
    student_input = ops.concatenate([student_tokens[:, :1], gather(student_tokens[:, 1:])], axis=1)
    outputs["student_cls"], outputs["student_patch"] = student_head(student_input)
    outputs["masks"] = ops.take_along_axis(masks, index, axis=1)
    outputs["masked_dropped"] = ops.sum(ops.maximum(ops.sum(ops.cast(masks, "int32"), axis=1) - num_positions, 0))
    return outputs
