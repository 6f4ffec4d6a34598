"""Image sources: in-memory arrays, a folder of images, and the embedded offline dataset."""

import os
import warnings

import keras
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ArraySource:
    """Images held in memory: ``(N, H, W)``, ``(N, H, W, 1|3|4)`` uint8, or a list of such arrays
    (sizes may differ); optional integer ``labels`` ``(N,)``.

    Other dtypes are converted once, by the rules of ``IterableSource`` (integers in 0..255;
    floats in [0, 1] or [0, 255]; negative, above-255 and non-finite values refused). One
    ``(H, W, 3)`` image is refused rather than read as H grey images.
    """

    def __init__(self, images, labels=None):
        if len(images) == 0:
            raise ValueError("The image array is empty.")
        if isinstance(images, (list, tuple)):
            images = [_checked_image(image, f"image {i}") for i, image in enumerate(images)]
        else:
            images = _checked_images(images)
        self.images = images
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels; pass one label per image.")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return np.asarray(self.images[index])


def _checked_images(images):
    """An ``(N, H, W)`` / ``(N, H, W, C)`` array as uint8 (uint8 arrays are kept as given)."""
    shape = tuple(np.shape(images) if getattr(images, "shape", None) is None else images.shape)
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise ValueError(
            f"ArraySource got one (H, W, {shape[-1]}) image (shape {shape}); pass images[None] or a "
            f"(N, H, W, {shape[-1]}) array (N grey images {shape[-1]} pixels wide: images[..., None])."
        )
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        hint = " (one (H, W) grey image: pass images[None]; flattened images: reshape them)" if len(shape) == 2 else ""
        raise ValueError(
            f"ArraySource takes (N, H, W) grey or (N, H, W, C) images with C 1, 3 or 4; got shape {shape}{hint}."
        )
    if getattr(images, "dtype", None) == np.uint8:
        return images
    return _as_uint8(images, "the image array", stacked=True)


def _checked_image(image, what):
    """One ``(H, W)`` / ``(H, W, C)`` image of a list, as uint8 (PIL images are kept)."""
    if isinstance(image, Image.Image):
        return image
    array = _to_numpy(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{what} has shape {array.shape}; an image is (H, W) or (H, W, C) with C 1, 3 or 4.")
    return _as_uint8(array, what)


class ImageFolderSource:
    """A folder of images, ImageNet layout (``root/<class>/<image>``) or flat (``root/<image>``).

    Files that fail Pillow's quick check (``verify``; it does not decode, so a truncated file
    passes) or that exceed ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs) are skipped
    with one warning that counts them. Images are read as 8-bit RGB (``read_image``); a file
    that cannot be decoded raises ``UnreadableImageError`` naming it, which the training
    pipeline answers by a deterministic replacement. ``labels`` are class-folder indices
    (sorted names), or ``None`` for a flat folder.
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
                        _refuse_bomb(image)
                        image.verify()
                    good.append((path, label))
                except _PIL_ERRORS as error:
                    bad.append((path, _reason(error)))
            if bad:
                warnings.warn(
                    f"Skipped {len(bad)} unreadable image file(s) in {root}, e.g. {bad[0][0]} ({bad[0][1]}).",
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
        return read_image(self.paths[index])


# What Pillow raises for a bad file: truncated or corrupt data, an unknown format, a
# decompression bomb (not an OSError), a file that disappeared.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """An image file that cannot be read; ``path`` names it and ``reason`` says why."""

    def __init__(self, path, reason):
        super().__init__(f"Cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


def _reason(error):
    return error.reason if isinstance(error, UnreadableImageError) else f"{type(error).__name__}: {error}"


def _refuse_bomb(image):
    """Refuse, without decoding, an image above ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow only
    warns up to twice the limit, and decodes)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise UnreadableImageError(
            image.filename,
            f"{image.width}x{image.height} = {image.width * image.height} pixels exceed "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}: a possible decompression bomb, not decoded (raise the "
            "limit to read it)",
        )


def read_image(path):
    """The image file at ``path`` as an 8-bit RGB PIL image (``to_rgb``); raises
    ``UnreadableImageError`` naming the file when it cannot be decoded: truncated or corrupt
    data, an unknown format, a decompression bomb (see ``_refuse_bomb``), out-of-range pixels.
    Pillow's ``LOAD_TRUNCATED_IMAGES`` is left as it is (off: a truncated file is unreadable)."""
    try:
        with Image.open(path) as image:
            _refuse_bomb(image)
            return to_rgb(image)
    except UnreadableImageError:
        raise
    except _PIL_ERRORS as error:
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error


def to_rgb(image):
    """A PIL image as 8-bit RGB. 16-bit grey (``I;16*``, and ``I`` read as 16-bit, 0..65535)
    keeps the high byte, ``value >> 8``, as Pillow reads 16-bit colour PNGs; ``F`` (float) maps
    by the float rules of ``IterableSource``; every other mode (grey, palette, RGBA, LA, CMYK,
    ...) is Pillow's ``convert("RGB")``, what the official loader does."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode I pixels must lie in 0..65535 (16 bits); got {values.min()}..{values.max()}.")
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_as_uint8(np.asarray(image), "the image"), "L").convert("RGB")
    return image.convert("RGB")  # a loaded copy, also of an RGB image: the file is closed after


class IterableSource(ArraySource):
    """Images from a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a generator or any
    iterable, read once into memory (the loader needs random access for its per-index random
    streams; for large datasets prefer ``ImageFolderSource``, which reads lazily).

    Elements may be an image, ``(image, label)``, ``(image,)`` or a dict with ``image_key``
    (``"image"``) and optionally ``label_key`` (``"label"``); images or labels may come in
    batches (a leading batch axis, as from a ``PyDataset`` or a batched ``tf.data``) and as
    tensors of any backend (an ``(N, H, W)`` array whose last size is 1, 3 or 4 reads as one
    image, not a batch of grey ones). uint8 images are kept; integer ones must lie in 0..255;
    floating-point ones are read as ``[0, 1]`` when their maximum is at most 1, else as
    ``[0, 255]``, and refused (naming the element) when they hold NaN, inf, negative values
    (e.g. normalised to [-1, 1]: undo the normalisation first) or values above 255.

    Args:
        iterable: the data.
        max_images: stop after this many images (``None``: all).
        image_key, label_key: dict keys of dict elements.
        verbose: show a progress bar while reading (1) or not (0).
    """

    def __init__(self, iterable, max_images=None, image_key="image", label_key="label", verbose=1):
        images, labels = [], []
        progress = keras.utils.Progbar(max_images, unit_name="image") if verbose else None
        for number, element in enumerate(iterable):
            image, label = _split_element(element, image_key, label_key)
            image = _to_numpy(image)
            if image.ndim not in (2, 3, 4):
                raise ValueError(
                    f"Element {number} has an image of shape {image.shape}; expected (H, W), (H, W, C) or a "
                    "batch (B, H, W) / (B, H, W, C)."
                )
            batched = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4))
            image = _as_uint8(image, f"element {number}", stacked=batched)
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


def _as_uint8(image, what, stacked=False):
    """``image`` as uint8. uint8 is kept; integers must lie in 0..255; floats are read as [0, 1]
    (scaled by 255) when their maximum is at most 1, else as [0, 255], and refused when
    non-finite, negative or above 255. ``what`` names the data in errors; ``stacked``: axis 0
    indexes images (the first one with a non-finite pixel is named)."""
    array = _to_numpy(image)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            if stacked:
                what = f"image {int(np.argmin(finite.reshape(len(array), -1).all(axis=1)))} of {what}"
            raise ValueError(f"Images must be finite; {what} has NaN or infinite pixels.")
        if not array.size:
            return array.astype(np.uint8)
        low, high = float(array.min()), float(array.max())
        if low < 0:
            raise ValueError(
                f"Float images must lie in [0, 1] or [0, 255]; {what} has values in [{low:g}, {high:g}]. Undo "
                "the normalisation first: (x + 1) / 2 for images in [-1, 1], x * std + mean for standardised ones."
            )
        if high > 255:
            raise ValueError(f"Float images must lie in [0, 1] or [0, 255]; {what} has values up to {high:g}.")
        return np.round(array * (255.0 if high <= 1.0 else 1.0)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"Integer images must lie in 0..255; {what} has values {array.min()}..{array.max()}.")
        return array.astype(np.uint8)
    raise ValueError(f"Images must be numeric arrays; {what} has dtype {array.dtype}.")


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
