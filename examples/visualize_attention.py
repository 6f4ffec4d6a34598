"""Last-block [CLS] attention per head, saved as a PNG grid (image + one heat map per head).

    KERAS_BACKEND=jax python examples/visualize_attention.py \\
        --checkpoint runs/digits/teacher_backbone.keras --output attention.png
    KERAS_BACKEND=jax python examples/visualize_attention.py --image_path photo.jpg \\
        --checkpoint my_vit.keras --image_size 224

Without ``--image_path`` a few images of the embedded digits dataset are shown; without
``--checkpoint`` a randomly initialised ViT is used (its maps are near uniform).
"""

import argparse

import numpy as np
from eval_data import add_backbone_arguments, load_backbone
from PIL import Image

from ibot_keras.data import IMAGENET_MEAN, IMAGENET_STD, load_digits
from ibot_keras.data.augment import to_pil
from ibot_keras.eval import save_attention_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser, data=False)
    parser.add_argument("--image_path", help="an image file; default: embedded digits")
    parser.add_argument("--num_images", type=int, default=4, help="digits shown (no --image_path)")
    parser.add_argument("--scale", type=int, default=4, help="pixel repeat factor of the PNG")
    parser.add_argument("--output", default="attention.png")
    args = parser.parse_args()

    backbone = load_backbone(args)
    size = args.image_size or backbone.image_size
    if args.image_path:
        pictures = [to_pil(Image.open(args.image_path))]
    else:
        images, _ = load_digits()
        pictures = [to_pil(images[i]) for i in range(args.num_images)]
    rows = []
    for picture in pictures:
        resized = np.asarray(picture.resize((size, size), Image.BICUBIC))
        normalized = ((resized / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype("float32")
        rows.append(save_attention_grid(args.output, backbone, resized, normalized, args.scale))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.output)
    print(f"wrote {args.output}: {len(rows)} image(s) x (picture + {backbone.num_heads} heads)")


if __name__ == "__main__":
    main()
