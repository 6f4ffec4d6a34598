"""One backend's run of the cross-backend parity scenario: ``python parity_run.py OUT.npz``.

Run under each ``KERAS_BACKEND`` by ``test_parity.py``; everything it feeds the model
(weights, crops, masks) is made with NumPy from fixed seeds, so all backends see the same.
The scenario differs from trajectory A on purpose: separate student/teacher patch heads,
LayerNorm in the head, 2-layer MLP, frozen g (norm_last_layer=True), 3 local crops of 12 px
(3x3 grid: bicubic interpolation from 4x4), pred_start_epoch=1 (delayed patch temperature),
lambda2 = 0.5 and clip 0.5.
"""

import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import keras  # noqa: E402
from trajectory import StepRecorder  # noqa: E402

from ibot_keras import BlockMasking, PretrainConfig, build_pretrainer, checkpoint  # noqa: E402

STEPS_PER_EPOCH, EPOCHS, BATCH = 2, 3, 4


def config():
    return PretrainConfig(
        arch="vit_tiny", patch_size=4, embed_dim=24, depth=2, num_heads=2, image_size=16,
        global_crop_size=16, local_crop_size=12, out_dim=48, patch_out_dim=40, shared_head=False,
        shared_head_teacher=False, norm_last_layer=True, norm_in_head="ln", head_nlayers=2,
        head_hidden_dim=32, head_bottleneck_dim=16, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_patch_temp=0.05, teacher_patch_temp=0.08, warmup_teacher_temp_epochs=2,
        epochs=4, batch_size=BATCH, lr=5e-4, warmup_epochs=1, momentum_teacher=0.99,
        clip_grad=0.5, freeze_last_layer=1, local_crops_number=3, pred_start_epoch=1,
        lambda2=0.5, drop_path=0.0, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2),
    )


def initial_weights(model):
    state = checkpoint.export_official(model)
    rng = np.random.default_rng(2026)
    student = {}
    for name in sorted(state["student"]):
        shape = state["student"][name].shape
        if name.endswith("weight_g"):
            student[name] = np.ones(shape, np.float32)
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
            student[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            student[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    teacher = {k: v for k, v in student.items() if k != "backbone.masked_embed"}
    return {"student": student, "teacher": teacher}


def batches():
    rng = np.random.default_rng(7)
    masking = BlockMasking((0.0, 0.3), (0.0, 0.2), pred_start_epoch=1, seed=3)
    out = []
    for step in range(STEPS_PER_EPOCH * EPOCHS):
        masking.set_epoch(step // STEPS_PER_EPOCH)
        out.append(
            {
                "global_crops": rng.standard_normal((BATCH, 2, 16, 16, 3)).astype(np.float32),
                "local_crops": rng.standard_normal((BATCH, 3, 12, 12, 3)).astype(np.float32),
                "masks": masking.batch(BATCH, 2, 4, 4),
            }
        )
    return out


def main(path):
    model = build_pretrainer(config(), steps_per_epoch=STEPS_PER_EPOCH)
    checkpoint.load_official(model, initial_weights(model))
    data = batches()
    recorder = StepRecorder()
    model.fit(
        ((b,) for b in data), epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, verbose=0, callbacks=[recorder]
    )
    state = checkpoint.export_official(model)
    features = model.teacher_backbone(data[0]["global_crops"][:, 0], training=False)[:, 0]
    arrays = {
        "loss": recorder.series("loss"),
        "cls": recorder.series("cls"),
        "patch": recorder.series("patch"),
        "center": np.array(recorder.centers),
        "patch_center": np.array(recorder.patch_centers),
        "teacher_cls_feat": keras.ops.convert_to_numpy(features),
    }
    for part in ("student", "teacher"):
        for name, value in state[part].items():
            arrays[f"{part}:{name}"] = value
    np.savez(path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
