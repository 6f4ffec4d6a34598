"""k-NN evaluation of a frozen backbone (the official eval_knn protocol: final-norm CLS,
L2-normalised, cosine top-k, votes weighted by exp(sim / 0.07), k in {10, 20, 100, 200}).

    KERAS_BACKEND=jax python examples/knn_eval.py --checkpoint runs/digits/teacher_backbone.keras
    KERAS_BACKEND=jax python examples/knn_eval.py --checkpoint vit.keras \\
        --train_path /data/imagenet/train --val_path /data/imagenet/val --image_size 224

Default data: the embedded digits with a fixed 70/30 split.
"""

import argparse

from eval_data import add_backbone_arguments, labelled_split, load_backbone

from ibot_keras.eval import extract_features, knn_classify


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    parser.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args()

    backbone = load_backbone(args)
    train_x, train_y, val_x, val_y = labelled_split(args, args.image_size or backbone.image_size)
    train_f = extract_features(backbone, train_x)
    val_f = extract_features(backbone, val_x)
    classes = int(max(train_y.max(), val_y.max())) + 1
    for k in args.nb_knn:
        top1, top5 = knn_classify(train_f, train_y, val_f, val_y, classes, k=k, temperature=args.temperature)
        print(f"{k}-NN: top-1 {top1:.2f}%  top-5 {top5:.2f}%")


if __name__ == "__main__":
    main()
