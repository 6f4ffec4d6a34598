"""Building from a ``PretrainConfig``: ``build_pretrainer`` (the compiled ``IBOT``) and the
training input pipeline (``build_pipeline``, ``augmentation_from_config``,
``masking_from_config``).

The pipeline builders live in ``ibot_keras.data.pipeline``, which the grain worker processes
receive by value and which must not import Keras; they are re-exported here.
"""

import keras

from ibot_keras.backend_specific import set_random_seed
from ibot_keras.config import PretrainConfig
from ibot_keras.data.pipeline import augmentation_from_config, build_pipeline, masking_from_config
from ibot_keras.losses import IBOTLoss
from ibot_keras.models.head import IBOTHead
from ibot_keras.models.ibot import IBOT
from ibot_keras.models.vit import VisionTransformer
from ibot_keras.optimizers import IBOTAdamW
from ibot_keras.schedules import CosineSchedule

__all__ = ["augmentation_from_config", "build_pipeline", "build_pretrainer", "masking_from_config"]


def build_pretrainer(config, steps_per_epoch, jit_compile="auto", seed=None):
    """A compiled ``IBOT`` for ``config`` with official schedules, ready for ``fit``.

    Sets the random seeds to ``config.seed`` (as the official ``fix_random_seeds``; see
    ``set_random_seed``) unless ``seed=False``. ``config.use_fp16`` builds under the
    ``mixed_float16`` policy (the global policy is restored afterwards); otherwise the model
    takes the global policy. ``steps_per_epoch`` is the number of batches per epoch: lr, weight
    decay and teacher momentum are per-iteration schedules over ``epochs * steps_per_epoch``
    and the teacher temperatures change per epoch.
    """
    if isinstance(config, dict):
        config = PretrainConfig.from_dict(config)
    if not config.use_fp16:
        return _build_pretrainer(config, steps_per_epoch, jit_compile, seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        return _build_pretrainer(config, steps_per_epoch, jit_compile, seed)
    finally:
        keras.config.set_dtype_policy(previous)


def _build_pretrainer(config, steps_per_epoch, jit_compile, seed):
    if seed is not False:
        set_random_seed(config.seed if seed is None else seed)
    steps_per_epoch = int(steps_per_epoch)
    embed_dim, depth, num_heads = config.model_dims
    vit_kwargs = dict(
        patch_size=config.patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        image_size=config.image_size,
        num_registers=config.num_registers,
    )
    student_backbone = VisionTransformer(
        drop_path_rate=config.drop_path,
        use_mask_token=config.use_masked_im_modeling,
        seed=config.seed,
        remat=config.remat,
        name="student_backbone",
        **vit_kwargs,
    )
    teacher_backbone = VisionTransformer(name="teacher_backbone", **vit_kwargs)
    head_kwargs = dict(
        out_dim=config.out_dim,
        patch_out_dim=config.patch_out_dim,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        nlayers=config.head_nlayers,
        norm=config.norm_in_head,
        act=config.act_in_head,
        in_dim=embed_dim,
    )
    student_head = IBOTHead(
        norm_last_layer=config.norm_last_layer,
        shared_head=config.shared_head,
        name="student_head",
        **head_kwargs,
    )
    # As in main_ibot.py the teacher head keeps the default norm_last_layer=True.
    teacher_head = IBOTHead(
        norm_last_layer=True,
        shared_head=config.shared_head_teacher,
        name="teacher_head",
        **head_kwargs,
    )
    loss = IBOTLoss(
        out_dim=config.out_dim,
        patch_out_dim=config.loss_patch_out_dim,
        num_global_crops=config.global_crops_number,
        num_local_crops=config.local_crops_number,
        warmup_teacher_temp=config.warmup_teacher_temp,
        teacher_temp=config.teacher_temp,
        warmup_teacher_patch_temp=config.warmup_teacher_patch_temp,
        teacher_patch_temp=config.teacher_patch_temp,
        warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
        epochs=config.epochs,
        lambda1=config.lambda1,
        lambda2=config.lambda2,
        mim_start_epoch=config.pred_start_epoch,
        centering=config.centering,
        patch_normalization=config.patch_normalization,
        name="ibot_loss",
    )
    model = IBOT(
        student_backbone,
        student_head,
        teacher_backbone,
        teacher_head,
        loss,
        steps_per_epoch=steps_per_epoch,
        momentum_teacher=config.momentum_teacher,
        max_masked_patches=config.max_masked_patches,
        koleo_loss_weight=config.koleo_loss_weight,
        global_crop_size=config.global_crop_size,
        max_consecutive_skips=config.max_consecutive_skips,
        name="ibot",
    )
    optimizer = IBOTAdamW(
        learning_rate=CosineSchedule(
            config.scaled_lr, config.min_lr, config.epochs, steps_per_epoch, config.warmup_epochs
        ),
        weight_decay=CosineSchedule(
            config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch
        ),
        clip_grad=config.clip_grad,
        freeze_steps=config.freeze_last_layer * steps_per_epoch,
    )
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    return model
