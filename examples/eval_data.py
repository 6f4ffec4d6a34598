"""What the evaluation examples share: the backbone to evaluate and the labelled split.

Imported by knn_eval.py, linear_probe.py and visualize_attention.py (run them from any folder:
Python puts the script's own folder on the path).
"""

import keras
import numpy as np

import ibot_keras
from ibot_keras.data import ArraySource, ImageFolderSource, load_digits
from ibot_keras.eval import eval_views


def add_backbone_arguments(parser, data=True):
    parser.add_argument("--checkpoint", help="a .keras VisionTransformer (e.g. runs/digits/teacher_backbone.keras); default: random init")
    parser.add_argument("--image_size", type=int, help="default: the model's image_size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ViT when no --checkpoint "
                        "(0 = the network examples/pretrain.py starts from) and of the evaluation's own randomness")
    if data:
        parser.add_argument("--train_path", help="an image folder (class subfolders); default: embedded digits")
        parser.add_argument("--val_path")


def load_backbone(args):
    """The ``--checkpoint`` backbone, or a random ViT of the digits example's size."""
    if args.checkpoint:
        return keras.saving.load_model(args.checkpoint)
    print(f"No --checkpoint: a randomly initialised ViT (seed {args.seed}).")
    ibot_keras.config.set_random_seed(args.seed)  # the same random network on every run
    return ibot_keras.VisionTransformer(patch_size=4, embed_dim=128, depth=4, num_heads=4, image_size=16)


def labelled_split(args, size):
    """``(train_x, train_y, val_x, val_y)`` eval views: the ``--train_path``/``--val_path``
    folders, or the embedded digits with a fixed 70/30 split."""
    if args.train_path:
        train, val = ImageFolderSource(args.train_path), ImageFolderSource(args.val_path)
        return eval_views(train, size), train.labels, eval_views(val, size), val.labels
    images, labels = load_digits()
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.7 * len(order))
    views = eval_views(ArraySource(images), size)
    return views[order[:cut]], labels[order[:cut]], views[order[cut:]], labels[order[cut:]]
