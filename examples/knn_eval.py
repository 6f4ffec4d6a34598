"""k-NN evaluation of a frozen backbone (the official eval_knn protocol: final-norm CLS,
L2-normalised, cosine top-k, votes weighted by exp(sim / 0.07), k in {10, 20, 100, 200}).

    KERAS_BACKEND=jax python examples/knn_eval.py --checkpoint runs/digits/teacher_backbone.keras
    KERAS_BACKEND=jax python examples/knn_eval.py --checkpoint vit.keras \\
        --train_path /data/imagenet/train --val_path /data/imagenet/val --image_size 224

Default data: the embedded digits with a fixed 70/30 split.
"""

import argparse

import keras
import numpy as np

import ibot_keras
from ibot_keras.data import ArraySource, ImageFolderSource, load_digits
from ibot_keras.eval import eval_views, extract_features, knn_classify


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a .keras VisionTransformer; default: random init")
    parser.add_argument("--train_path")
    parser.add_argument("--val_path")
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args()

    if args.checkpoint:
        backbone = keras.saving.load_model(args.checkpoint)
    else:
        print("No --checkpoint: a randomly initialised ViT.")
        backbone = ibot_keras.VisionTransformer(patch_size=4, embed_dim=128, depth=4, num_heads=4, image_size=16)
    size = args.image_size or backbone.image_size
    if args.train_path:
        train, val = ImageFolderSource(args.train_path), ImageFolderSource(args.val_path)
        train_x, train_y = eval_views(train, size), train.labels
        val_x, val_y = eval_views(val, size), val.labels
    else:
        images, labels = load_digits()
        order = np.random.default_rng(0).permutation(len(images))
        cut = int(0.7 * len(order))
        views = eval_views(ArraySource(images), size)
        train_x, train_y = views[order[:cut]], labels[order[:cut]]
        val_x, val_y = views[order[cut:]], labels[order[cut:]]
    train_f = extract_features(backbone, train_x)
    val_f = extract_features(backbone, val_x)
    classes = int(max(train_y.max(), val_y.max())) + 1
    for k in args.nb_knn:
        top1, top5 = knn_classify(train_f, train_y, val_f, val_y, classes, k=k, temperature=args.temperature)
        print(f"{k}-NN: top-1 {top1:.2f}%  top-5 {top5:.2f}%")


if __name__ == "__main__":
    main()
