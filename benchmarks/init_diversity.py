"""How different do images look to the untrained network? Statistics at initialisation that
decide whether DINO/iBOT's CLS objective has anything to start from (see
benchmarks/RESULTS.md), for the ``examples/pretrain.py`` config given by its flags (digits defaults).

    python benchmarks/init_diversity.py                       # digits defaults
    python benchmarks/init_diversity.py --patch_size 8 --depth 12
    python benchmarks/init_diversity.py --backbone runs/digits/teacher_backbone.keras   # after training

Prints, over the first 256 evaluation views: the mean pairwise cosine of the final-norm CLS
features, the standard deviation over images of the batch-centred teacher CLS logits, and the
teacher entropy those logits give at temperature 0.04 (ln(out_dim) = uniform); then, for the
two global crops the loss pairs (the config's multi-crop recipe), the cross-view correlation of
the batch-centred teacher CLS logits: mean cosine between the two views of the same image, and
between views of different images. The CLS loss asks the student to predict one view's centred
teacher output from the other view, so only the same-image part of that signal is learnable.
The same two cosines are printed for the batch-centred CLS features of the backbone itself.

``--backbone PATH`` (a ``.keras`` VisionTransformer of the config's shape, e.g. the teacher a
run exported) replaces the teacher backbone's weights; the head stays at initialisation, so
the backbone line is the one to compare with the untrained network.
"""

import argparse

import keras
import numpy as np
from keras import ops

import ibot_keras
from ibot_keras.cli import add_config_arguments, config_from_args, source_from_args
from ibot_keras.data import augmentation_from_config
from ibot_keras.eval import eval_views


def centred_unit(logits):
    centred = logits - logits.mean(0)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True)


def _same_and_different(first, second):
    first, second = centred_unit(first), centred_unit(second)
    similarity = first @ second.T
    count = len(first)
    return np.diag(similarity).mean(), (similarity.sum() - np.trace(similarity)) / (count * (count - 1))


def cross_view_correlation(model, config, source, count=256, seed=0):
    """``{"backbone CLS": (same, different), "teacher logits": (same, different)}``: mean
    cosine, between the first two global crops of ``count`` images, of the batch-centred CLS
    features and of the batch-centred teacher CLS logits (same image, different images)."""
    augmentation = augmentation_from_config(config)
    rng = np.random.default_rng(seed)
    pairs = [augmentation(source[i], rng)[0][:2] for i in range(count)]
    views = [np.stack([pair[v] for pair in pairs]) for v in (0, 1)]
    features = [model.teacher_backbone(v)[:, 0] for v in views]
    logits = [ops.convert_to_numpy(model.teacher_head(f)) for f in features]
    features = [ops.convert_to_numpy(f) for f in features]
    return {"backbone CLS": _same_and_different(*features), "teacher logits": _same_and_different(*logits)}


def main(argv=None):
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--backbone", help="a .keras VisionTransformer whose weights replace the teacher backbone's")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=1)
    if args.backbone:
        trained = keras.saving.load_model(args.backbone, compile=False)
        if [w.shape for w in trained.weights] != [w.shape for w in model.teacher_backbone.weights]:
            raise SystemExit(f"{args.backbone} does not match the config's backbone (pass the flags it was trained with)")
        model.teacher_backbone.set_weights(trained.get_weights())
    source = source_from_args(args)
    views = eval_views(source, config.global_crop_size)[:256]
    cls = ops.convert_to_numpy(model.teacher_backbone(views))[:, 0]
    unit = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    cosine = (unit @ unit.T)[np.triu_indices(len(unit), 1)].mean()
    logits = ops.convert_to_numpy(model.teacher_head(ops.convert_to_tensor(cls)))
    centred = (logits - logits.mean(0)) / 0.04
    probs = np.exp(centred - centred.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs + 1e-12)).sum(-1).mean()
    print(f"mean pairwise cosine of CLS features {cosine:.4f}; centred teacher logit std "
          f"{(logits - logits.mean(0)).std():.4f}; teacher entropy at 0.04 {entropy:.2f} of ln K = {np.log(logits.shape[-1]):.2f}")
    for name, (same, different) in cross_view_correlation(model, config, source).items():
        print(f"cross-view cosine of centred {name} (global crops 1 and 2): same image {same:.3f}, "
              f"different images {different:.3f}")


if __name__ == "__main__":
    main()
