"""Fine-tune a pretrained ViT end to end: BEiT layer-wise lr decay, AdamW, linear warmup then
cosine, stochastic depth (the official iBOT fine-tuning recipe without mixup/cutmix,
RandAugment and label smoothing).

    KERAS_BACKEND=jax python examples/finetune.py --checkpoint runs/digits/teacher_backbone.keras
    KERAS_BACKEND=jax python examples/finetune.py      # the same network at random init, to compare

Default data: the embedded digits with the fixed 70/30 split of knn_eval.py (evaluation views,
no training augmentation: flips and colour changes do not preserve digit labels). Prints the
validation top-1 after every epoch and the best and last at the end.
"""

import argparse

import keras
import numpy as np
from eval_data import add_backbone_arguments, labelled_split, load_backbone

import ibot_keras
from ibot_keras.eval import build_finetune_model, finetune_optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    # Digits-sized defaults (a 16-px ViT-Tiny from scratch needs a larger lr than ImageNet recipes).
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-3, help="base lr, scaled by batch_size / 256 (official scaling)")
    parser.add_argument("--warmup_epochs", type=int, default=5)
    parser.add_argument("--layer_decay", type=float, default=0.75, help="official: 0.75 ViT-S, 0.65 ViT-B")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--drop_path", type=float, default=0.1, help="official: 0.1 ViT-S, 0.2 ViT-B")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args()
    if args.epochs < 1 or args.warmup_epochs >= args.epochs:
        parser.error(f"need 0 <= --warmup_epochs < --epochs (got {args.warmup_epochs}, {args.epochs})")

    backbone = load_backbone(args)
    train_x, train_y, val_x, val_y = labelled_split(args, args.image_size or backbone.image_size)
    num_classes = int(max(train_y.max(), val_y.max())) + 1

    ibot_keras.config.set_random_seed(args.seed)  # head init, drop path and shuffling
    model = build_finetune_model(backbone, num_classes, drop_path_rate=args.drop_path, seed=args.seed)
    steps_per_epoch = -(-len(train_x) // args.batch_size)
    peak_lr = args.lr * args.batch_size / 256
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=peak_lr, warmup_steps=args.warmup_epochs * steps_per_epoch,
        decay_steps=(args.epochs - args.warmup_epochs) * steps_per_epoch,
    )
    model.compile(
        optimizer=finetune_optimizer(model, learning_rate=schedule, layer_decay=args.layer_decay,
                                     weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")],
    )
    print(f"{len(train_x)} training / {len(val_x)} validation images, {num_classes} classes, "
          f"peak lr {peak_lr:.3g}, layer decay {args.layer_decay}")
    history = model.fit(train_x, train_y, validation_data=(val_x, val_y), epochs=args.epochs,
                        batch_size=args.batch_size, verbose=args.verbose)
    val_top1 = 100 * np.asarray(history.history["val_top1"])
    print(f"fine-tuned top-1: best {val_top1.max():.2f}% (epoch {int(val_top1.argmax()) + 1}), "
          f"last {val_top1[-1]:.2f}%")


if __name__ == "__main__":
    main()
