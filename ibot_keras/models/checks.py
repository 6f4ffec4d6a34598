"""Checks of an ``IBOT`` model: its components at construction (``check_components``,
``check_unique_paths``), the batch dicts the step receives (``unpack_batch``, traced in the
step) and the host-side look at training data before ``fit`` (``check_data``). Each error
names the key or setting, the value and the fix."""

import warnings
import weakref

import keras
import numpy as np
from keras import ops

# ``{model: keys already warned}``: each data warning once per model.
_warned = weakref.WeakKeyDictionary()


def check_components(model):
    """Student and teacher backbones, heads and the loss must agree in their sizes."""
    sb, tb = model.student_backbone, model.teacher_backbone
    sh, th, loss = model.student_head, model.teacher_head, model.ibot_loss
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


def check_unique_paths(model):
    """No two components (student and teacher backbones and heads) share a variable path."""
    seen = {}
    for layer in (model.student_backbone, model.student_head, model.teacher_backbone, model.teacher_head):
        for variable in layer.weights:
            other = seen.setdefault(variable.path, layer)
            if other is not layer:
                raise ValueError(
                    f"Two components share the variable path {variable.path!r} ({other.name} and "
                    f"{layer.name}). Give the student and teacher backbones and heads different "
                    "names (e.g. name='student_backbone' / 'teacher_backbone')."
                )


def check_crops(model, key, kind, crops, count, setting):
    """Validate ``(B, count, H, W, C)`` crops; returns the patch grid ``(H/p, W/p)``."""
    shape = tuple(crops.shape)
    p, channels = model.student_backbone.patch_size, model.student_backbone.in_channels
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


def unpack_batch(model, inputs, training=False):
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
    ng, nl, p = model.num_global_crops, model.num_local_crops, model.student_backbone.patch_size
    rows, cols = check_crops(model, "global_crops", "Global", global_crops, ng, "global_crops_number")
    size = model.global_crop_size
    if training and size is not None and (rows * p, cols * p) != (size, size):
        raise ValueError(
            f"The global crops are {rows * p}x{cols * p} but the model was configured with "
            f"global_crop_size={size} (its max_masked_patches={model.max_masked_patches} was derived "
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
        check_crops(model, "local_crops", "Local", local_crops, nl, "local_crops_number")
    elif local_crops is not None and local_crops.shape[1]:
        raise ValueError(
            "The batch has 'local_crops' but the model was configured with local_crops_number=0."
        )
    return global_crops, (local_crops if nl else None), masks


def check_data(model, x, batch_size=None, steps_per_epoch=None):
    """Host-side checks of training data against the model, before ``fit`` traces a step.

    Raises when masks can exceed ``max_masked_patches`` (their patch loss would be lost) or
    are not 0/1; warns (once per model) when an epoch of ``x`` is not ``steps_per_epoch``
    batches (the schedules would run at another pace) or float crops look like 0-255
    pixels. ``x``: a ``Pipeline``, a loader with ``maker``, or a dict of arrays."""
    maker = getattr(x, "maker", None)
    if maker is not None:
        grid = maker.grid
        most = maker.masking.max_masked_patches(grid * grid)
        check_mask_count(model, most, f"the data's masking (pred_ratio {maker.masking.pred_ratio}, "
                                     f"pred_ratio_var {maker.masking.pred_ratio_var})")
        if not hasattr(x, "stream"):  # fit_pipeline checks a Pipeline's epochs itself
            warn_length(model, len(x) if steps_per_epoch is None else steps_per_epoch, "len(data)")
        return
    if isinstance(x, dict) and all(hasattr(v, "shape") and not keras.ops.is_tensor(v) for v in x.values()):
        masks = x.get("masks")
        if masks is not None and masks.size:
            masks = np.asarray(masks)
            if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
                raise ValueError("'masks' holds values other than 0 and 1; masks must be bool or 0/1 integers.")
            per_crop = masks.reshape(masks.shape[0] * masks.shape[1], -1).astype(bool).sum(axis=1)
            check_mask_count(model, int(per_crop.max()), "the 'masks' given")
        crops = np.asarray(x.get("global_crops", np.zeros((0,))))
        if crops.size and np.issubdtype(crops.dtype, np.floating) and float(np.nanmax(crops)) > 20:
            warn_once(model, 
                "range", f"'global_crops' reach {float(np.nanmax(crops)):.0f}: crops should be normalised "
                "with the ImageNet mean and std (about -2.1 to 2.6), not 0-255 pixels.", stacklevel=5
            )
        if crops.ndim and batch_size and steps_per_epoch is None:
            warn_length(model, -(-crops.shape[0] // int(batch_size)), f"ceil({crops.shape[0]} / batch_size)")


def check_mask_count(model, most, what):
    cap = model.max_masked_patches
    if cap is not None and most > cap:
        raise ValueError(
            f"{what} can mask {most} patches of a global crop, but the model computes the patch loss "
            f"at max_masked_patches={cap} positions: the excess would be lost. Build the pretrainer "
            "with the same pred_ratio / pred_ratio_var and global_crop_size as the data."
        )


def warn_length(model, length, what):
    if length != model.steps_per_epoch:
        warn_once(model, 
            "length", f"An epoch of this data is {length} batch{'es' if length != 1 else ''} ({what}) but "
            "the model was built with "
            f"steps_per_epoch={model.steps_per_epoch}: the lr, weight-decay, momentum and temperature "
            f"schedules assume {model.steps_per_epoch}. Build with steps_per_epoch={length} to train "
            "on the official schedules.", stacklevel=6
        )


def warn_once(model, key, message, stacklevel):
    warned = _warned.setdefault(model, set())
    if key not in warned:
        warned.add(key)
        warnings.warn(message, stacklevel=stacklevel)
