"""How different do images look to the untrained network? Statistics at initialisation that
decide whether DINO/iBOT's CLS objective has anything to start from (see README, "Measured
figures"), for the ``examples/pretrain.py`` config given by its flags (digits defaults).

    python benchmarks/init_diversity.py                       # digits defaults
    python benchmarks/init_diversity.py --patch_size 8 --depth 12

Prints, over the first 256 evaluation views: the mean pairwise cosine of the final-norm CLS
features, the standard deviation over images of the batch-centred teacher CLS logits, and the
teacher entropy those logits give at temperature 0.04 (ln(out_dim) = uniform).
"""

import os
import sys

import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import pretrain  # noqa: E402

import ibot_keras  # noqa: E402
from ibot_keras.eval import eval_views  # noqa: E402


def main(argv=None):
    args = pretrain.parser().parse_args(argv)
    config = pretrain.make_config(args)
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=1)
    views = eval_views(pretrain.load_source(args), config.global_crop_size)[:256]
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


if __name__ == "__main__":
    main()
