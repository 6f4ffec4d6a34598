"""Image sources: in-memory arrays, a folder of images, and the embedded offline dataset."""

import os
import warnings

import keras
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


class IterableSource(ArraySource):
    """Images from a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a generator or any
    iterable, read once into memory (the loader needs random access for its per-index random
    streams; for large datasets prefer ``ImageFolderSource``, which reads lazily).

    Elements may be an image, ``(image, label)``, ``(image,)`` or a dict with ``image_key``
    (``"image"``) and optionally ``label_key`` (``"label"``); images or labels may come in
    batches (a leading batch axis, as from a ``PyDataset`` or a batched ``tf.data``) and as
    tensors of any backend (an ``(N, H, W)`` array whose last size is 1, 3 or 4 reads as one
    image, not a batch of grey ones). uint8 images are kept; floating-point images are read as
    ``[0, 1]`` when their maximum is at most 1, else as ``[0, 255]``.

    Args:
        iterable: the data.
        max_images: stop after this many images (``None``: all).
        image_key, label_key: dict keys of dict elements.
        verbose: show a progress bar while reading (1) or not (0).
    """

    def __init__(self, iterable, max_images=None, image_key="image", label_key="label", verbose=1):
        images, labels = [], []
        progress = keras.utils.Progbar(max_images, unit_name="image") if verbose else None
        for element in iterable:
            image, label = _split_element(element, image_key, label_key)
            image = _as_uint8(image)
            batched = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4))
            batch_images = list(image) if batched else [image]
            if label is None:
                batch_labels = [None] * len(batch_images)
            else:
                label = np.asarray(_to_numpy(label)).reshape(-1)
                if len(label) != len(batch_images):
                    raise ValueError(f"An element has {len(batch_images)} image(s) but {len(label)} label(s).")
                batch_labels = list(label)
            room = len(batch_images) if max_images is None else max_images - len(images)
            images += batch_images[:room]
            labels += batch_labels[:room]
            if progress is not None:
                progress.update(len(images))
            if max_images is not None and len(images) >= max_images:
                break
        if not images:
            raise ValueError("The iterable yielded no images.")
        has_labels = [label is not None for label in labels]
        if any(has_labels) and not all(has_labels):
            raise ValueError("Some elements have labels and others do not.")
        super().__init__(images, np.asarray(labels, dtype=np.int64) if all(has_labels) else None)


def _to_numpy(x):
    if hasattr(x, "numpy"):  # TensorFlow eager tensors, torch CPU tensors
        try:
            return x.numpy()
        except (TypeError, RuntimeError):
            return x.detach().cpu().numpy()
    return np.asarray(x)


def _split_element(element, image_key, label_key):
    """``(image, label or None)`` of one element of an ``IterableSource``."""
    if isinstance(element, dict):
        if image_key not in element:
            raise ValueError(f"A dict element has no {image_key!r} key (keys: {sorted(element)}); pass image_key=.")
        return element[image_key], element.get(label_key)
    if isinstance(element, (tuple, list)):
        if len(element) == 1:
            return element[0], None
        if len(element) >= 2:
            return element[0], element[1]
        raise ValueError("An element is an empty tuple.")
    return element, None


def _as_uint8(image):
    array = _to_numpy(image)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
        return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"Integer images must lie in 0..255; got {array.min()}..{array.max()}.")
        return array.astype(np.uint8)
    raise ValueError(f"Images must be numeric arrays; got dtype {array.dtype}.")


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
