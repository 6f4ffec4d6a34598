"""How different do images look to the untrained network? Statistics at initialisation that
decide whether DINO/iBOT's CLS objective has anything to start from (see README, "Measured
figures"), for the ``examples/pretrain.py`` config given by its flags (digits defaults).

    python benchmarks/init_diversity.py                       # digits defaults
    python benchmarks/init_diversity.py --patch_size 8 --depth 12

Prints, over the first 256 evaluation views: the mean pairwise cosine of the final-norm CLS
features, the standard deviation over images of the batch-centred teacher CLS logits, and the
teacher entropy those logits give at temperature 0.04 (ln(out_dim) = uniform); then, for the
two global crops the loss pairs (the config's multi-crop recipe), the cross-view correlation of
the batch-centred teacher CLS logits: mean cosine between the two views of the same image, and
between views of different images. The CLS loss asks the student to predict one view's centred
teacher output from the other view, so only the same-image part of that signal is learnable.
"""

import os
import sys

import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import pretrain  # noqa: E402

import ibot_keras  # noqa: E402
from ibot_keras.eval import eval_views  # noqa: E402


def centred_unit(logits):
    centred = logits - logits.mean(0)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True)


def cross_view_correlation(model, config, source, count=256, seed=0):
    """(same image, different images) mean cosine of the batch-centred teacher CLS logits of
    the first two global crops of ``count`` images."""
    augmentation = pretrain.make_augmentation(config)
    rng = np.random.default_rng(seed)
    pairs = [augmentation(source[i], rng)[0][:2] for i in range(count)]
    views = [np.stack([pair[v] for pair in pairs]) for v in (0, 1)]
    first, second = (centred_unit(ops.convert_to_numpy(model.teacher_head(model.teacher_backbone(v)[:, 0]))) for v in views)
    similarity = first @ second.T
    same = np.diag(similarity).mean()
    different = (similarity.sum() - np.trace(similarity)) / (count * (count - 1))
    return same, different


def main(argv=None):
    args = pretrain.parser().parse_args(argv)
    config = pretrain.make_config(args)
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=1)
    source = pretrain.load_source(args)
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
    same, different = cross_view_correlation(model, config, source)
    print(f"cross-view cosine of centred teacher logits (global crops 1 and 2): same image {same:.3f}, "
          f"different images {different:.3f}")


if __name__ == "__main__":
    main()
