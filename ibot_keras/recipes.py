"""Settings chosen for a dataset instead of the official ImageNet recipe.

``small_data(num_images, image_size)`` is for what users most often bring first: a few thousand
to ~100k images of at most ~96 px, trained for minutes to hours on a CPU or one GPU. The
official recipe (ViT-S/16, 8192 prototypes, 100+ epochs, 224-px crops) collapses or does not
move there (dino#43, #246; dinov2#272; ibot#17). Measured on the datasets of
``benchmarks/learning.py`` (``docs/training.md`` has the figures); every choice is a
``PretrainConfig`` field, so any of them can be overridden.

``derive_warmups(values, given)``: warm-up lengths that fit a run of ``values["epochs"]``.
``measure_seconds_per_step(config, source)`` and ``epochs_for_budget(...)``: fewer epochs where
this machine would not finish them in a given time.
"""

import math
import time

SMALL_DATA_MAX_IMAGES = 200_000
SMALL_DATA_MAX_SIZE = 96


def is_small_data(num_images, image_size):
    """True where ``small_data`` applies (up to 200k images of at most 96 px)."""
    return num_images <= SMALL_DATA_MAX_IMAGES and image_size <= SMALL_DATA_MAX_SIZE


def _patch_size(global_size, given):
    """The patch that cuts ``global_size`` into a grid closest to 4 x 4 (6 x 6 above 48 px),
    the larger patch on a tie; ``given``: the size is the user's, so only its divisors qualify."""
    target = 4 if global_size <= 48 else 6
    divisors = [p for p in range(2, global_size + 1) if global_size % p == 0]
    if given and divisors:
        return min(divisors, key=lambda p: (abs(global_size / p - target), -p))
    fitting = [p for p in divisors if 3 <= global_size // p <= 8]
    if fitting:
        return min(fitting, key=lambda p: (abs(global_size / p - target), -p))
    return max(2, round(global_size / target))


def small_data(num_images, image_size, epochs=None, global_crop_size=None, local_crop_size=None):
    """``PretrainConfig`` fields for ``num_images`` images of about ``image_size`` px.

    - Patches that cut the global crop (``global_crop_size``, default the image size) into about
      4 x 4 tokens (6 x 6 above 48 px): 7 px for 28-px images. On 28-px images a 4 x 4 grid
      learned several times faster per epoch than a 7 x 7 one (4-px patches), at a third of
      the cost per step.
    - Four local crops of about half the global crop in whole patches (14 px at 28), or
      ``local_crop_size`` if given; a given size that is not a whole number of patches gets
      no local crops (``local_crops_number=0``) rather than patches cut short.
    - A small ViT (D=128, 4 blocks, 4 heads) and head (1024 prototypes, hidden 256, bottleneck
      64).
    - Sinkhorn-Knopp centering (DINOv2) with teacher temperature 0.04, and KoLeo 0.1: the
      centered softmax of the official recipe puts every crop on a few prototypes here.
    - Teacher momentum 0.99 (dino#43's advice for short runs), lr 2e-3 at batch 64, 2 data workers.
    - ``epochs`` (default: about 150k images seen with local crops, 220k without, at least 5);
      lr warm-up a tenth and teacher-temperature warm-up a third of the run.

    Measured on ``benchmarks/learning.py``'s datasets (``docs/training.md`` has the figures).
    """
    num_images, image_size = int(num_images), int(image_size)
    if num_images < 1 or image_size < 1:
        raise ValueError(f"small_data needs num_images >= 1 and image_size >= 1, got {num_images}, {image_size}.")
    global_size = int(global_crop_size or image_size)
    patch = _patch_size(global_size, given=global_crop_size is not None)
    global_size = max(patch, global_size // patch * patch)
    if local_crop_size is None:
        local_size = max(patch, round(0.5 * global_size / patch) * patch)
    else:
        local_size = int(local_crop_size)
    local_number = 4 if local_size % patch == 0 else 0
    batch_size = 64 if num_images >= 640 else max(8, num_images // 10 // 8 * 8)
    if epochs is None:
        epochs = max(5, math.ceil((150_000 if local_number else 220_000) / num_images))
    values = dict(
        arch="vit_tiny", patch_size=patch, embed_dim=128, depth=4, num_heads=4,
        image_size=global_size, global_crop_size=global_size, local_crop_size=local_size,
        global_crops_scale=(0.3, 1.0), local_crops_scale=(0.05, 0.3), local_crops_number=local_number,
        out_dim=1024, patch_out_dim=1024, shared_head=True, norm_last_layer=True,
        head_hidden_dim=256, head_bottleneck_dim=64,
        centering="sinkhorn_knopp", warmup_teacher_temp=0.04, teacher_temp=0.04,
        warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, koleo_loss_weight=0.1,
        momentum_teacher=0.99, batch_size=batch_size, lr=2e-3, min_lr=1e-5, drop_path=0.0,
        epochs=int(epochs), warmup_epochs=max(1, int(epochs) // 10), warmup_teacher_temp_epochs=max(1, int(epochs) // 3),
        pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), num_workers=2,
        solarize_p=0.0, blur_radius=(0.1 * global_size / 224, 2.0 * global_size / 224),
        saveckp_freq=5,
    )
    return values


def derive_warmups(values, given, base_epochs=None):
    """``values`` with the warm-ups not named in ``given`` fitted to ``values["epochs"]``.

    With ``base_epochs`` (the run length the warm-ups were chosen for) they scale with the run:
    ``warmup * epochs // base_epochs``. Without, they are kept unless the run is too short for
    them, and then cut to a tenth (lr) and a third (teacher temperature) of the run: a 4-epoch
    run of the official settings gets 0 and 1.
    """
    values = dict(values)
    epochs = int(values.get("epochs", 100))
    limits = {"warmup_epochs": epochs // 10, "warmup_teacher_temp_epochs": epochs // 3}
    too_short = {
        "warmup_epochs": values.get("warmup_epochs", 0) > epochs,
        "warmup_teacher_temp_epochs": values.get("warmup_teacher_temp_epochs", 0) + values.get("pred_start_epoch", 0) > epochs,
    }
    for name, limit in limits.items():
        if name in given or name not in values:
            continue
        if base_epochs:
            values[name] = int(values[name]) * epochs // int(base_epochs)
        elif too_short[name]:
            values[name] = limit
    return values


def measure_seconds_per_step(config, source, steps=3):
    """Seconds a training step of ``config`` takes on this machine, making its batch included.

    A throwaway model (``build_pretrainer``, seeded like the run) is compiled on one batch of
    ``source``; then ``steps`` batches are each made in this process and trained on, both timed.
    The sum is what a step costs when the augmentation workers share the cores with the step
    (the case on a small CPU machine); with cores to spare for the workers it overestimates.
    """
    from ibot_keras.builder import build_pretrainer
    from ibot_keras.data import build_pipeline

    pipeline = build_pipeline(config, source, workers=0)
    if pipeline.total_steps < steps + 1:
        raise ValueError(f"measure_seconds_per_step needs {steps + 1} batches; the run has {pipeline.total_steps}.")
    model = build_pretrainer(config, steps_per_epoch=len(pipeline))
    model.train_on_batch(pipeline.batch(0))  # compiles
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train_on_batch(pipeline.batch(step))  # returns NumPy logs: the step has finished
    return (time.perf_counter() - start) / steps


def epochs_for_budget(epochs, budget_seconds, seconds_per_step, steps_per_epoch, min_epochs=2):
    """``epochs``, or fewer where ``epochs * steps_per_epoch`` steps of ``seconds_per_step``
    would run past ``budget_seconds``; never fewer than ``min_epochs``."""
    if budget_seconds <= 0 or seconds_per_step <= 0:
        raise ValueError(f"epochs_for_budget needs positive times; got budget_seconds={budget_seconds}, "
                         f"seconds_per_step={seconds_per_step}.")
    affordable = int(budget_seconds // (seconds_per_step * int(steps_per_epoch)))
    return int(max(min(int(epochs), affordable), min(int(min_epochs), int(epochs))))
