"""Linear probe of a frozen backbone (the official eval_linear_multi recipe: concatenated
final-norm CLS of the last 4 blocks, one linear head per learning rate all trained at once,
SGD momentum 0.9, no weight decay, lr x batch/256, cosine over the epochs).

    KERAS_BACKEND=jax python examples/linear_probe.py --checkpoint runs/digits/teacher_backbone.keras
    KERAS_BACKEND=jax python examples/linear_probe.py --checkpoint vit_base.keras \\
        --train_path /data/imagenet/train --val_path /data/imagenet/val --image_size 224 \\
        --n_last_blocks 1 --avgpool_patchtokens

Default data: the embedded digits with the same fixed 70/30 split as knn_eval.py.
"""

import argparse

from eval_data import add_backbone_arguments, labelled_split, load_backbone

from ibot_keras.eval import linear_probe, official_lr_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    parser.add_argument("--n_last_blocks", type=int, default=4, help="official: 4 for ViT-S, 1 for ViT-B/L")
    parser.add_argument("--avgpool_patchtokens", action="store_true", help="append the mean patch token (ViT-B/L)")
    parser.add_argument("--lrs", type=float, nargs="+", help="base lrs; default: the official 45-value grid")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--top", type=int, default=5, help="rows of the per-lr table printed")
    args = parser.parse_args()

    backbone = load_backbone(args)
    train_x, train_y, val_x, val_y = labelled_split(args, args.image_size or backbone.image_size)

    result = linear_probe(
        backbone, train_x, train_y, val_x, val_y,
        n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
        base_learning_rates=args.lrs or official_lr_grid(), epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed,
    )
    print(f"{len(result.learning_rates)} linear heads, {args.epochs} epochs, batch {args.batch_size}")
    print("base lr     lr (x batch/256)   top-1    top-5")
    for base, lr, top1, top5 in result.table()[: args.top]:
        print(f"{base:<11.4g} {lr:<18.4g} {top1:6.2f}%  {top5:6.2f}%")
    print(f"best: base lr {result.best_base_lr:g}  top-1 {result.best_top1:.2f}%  top-5 {result.best_top5:.2f}%")


if __name__ == "__main__":
    main()
