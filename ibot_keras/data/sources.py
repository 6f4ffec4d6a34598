"""Image sources: in-memory arrays, a folder of images, and the embedded offline dataset."""

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ArraySource:
    """Images held in memory: ``(N, H, W)``, ``(N, H, W, 1|3|4)`` uint8, or a list of such arrays
    (sizes may differ); optional integer ``labels`` ``(N,)``."""

    def __init__(self, images, labels=None):
        if len(images) == 0:
            raise ValueError("The image array is empty.")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels.")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return np.asarray(self.images[index])


class ImageFolderSource:
    """A folder of images, ImageNet layout (``root/<class>/<image>``) or flat (``root/<image>``).

    Unreadable or corrupt files are skipped with one warning that counts them; grey and RGBA
    images are converted to RGB when read. ``labels`` are class-folder indices (sorted names),
    or ``None`` for a flat folder.
    """

    def __init__(self, root, verify=True):
        if not root or not os.path.isdir(root):
            raise ValueError(f"--data_path {root!r} is not a directory.")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        entries = []
        if classes:
            for label, name in enumerate(classes):
                for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                    entries += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        entries += [
            (os.path.join(root, f), -1)
            for f in sorted(os.listdir(root))
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))
        ]
        if verify:
            good, bad = [], []
            for path, label in entries:
                try:
                    with Image.open(path) as image:
                        image.verify()
                    good.append((path, label))
                except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
                    bad.append(path)
            if bad:
                warnings.warn(
                    f"Skipped {len(bad)} unreadable image file(s) in {root}, e.g. {bad[0]}.",
                    stacklevel=2,
                )
            entries = good
        if not entries:
            raise ValueError(f"No readable images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}.")
        self.root = root
        self.classes = classes
        self.paths = [path for path, _ in entries]
        labels = np.array([label for _, label in entries])
        self.labels = labels if classes and (labels >= 0).all() else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")


def load_digits():
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes,
    CC BY 4.0; shipped inside scikit-learn, nothing is downloaded) as uint8 ``(N, 8, 8)``
    images and ``(N,)`` labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "The embedded digits dataset comes with scikit-learn: pip install scikit-learn "
            "(or pip install 'ibot-keras[examples]')."
        ) from error
    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)
