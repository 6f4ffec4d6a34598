"""The official iBOT multi-crop recipe (``DataAugmentationiBOT``), per image, on the host.

Implemented with Pillow so that every operation has the semantics of the torchvision
transforms on PIL images that the official code uses (bicubic RandomResizedCrop, PIL
ImageEnhance colour jitter in random order, PIL Gaussian blur and solarize). Randomness
comes from a ``numpy.random.Generator`` passed per image, so results do not depend on
worker scheduling.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ibot_keras.data.sources import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_pil(image):
    """``(H, W, 3)``/``(H, W)`` uint8 array or PIL image -> RGB PIL image (grey/RGBA converted;
    a PIL image of another mode as ``sources.to_rgb`` reads it, e.g. 16-bit grey by its high byte)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else to_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"Images must be uint8 arrays (0..255); got dtype {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(array).convert("RGB")
    raise ValueError(f"Images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}.")


def random_resized_crop_box(width, height, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest central crop with an aspect ratio inside ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def check_view_recipe(rates, blur_radius):
    """Raise ``ValueError`` unless every ``rates`` value (``{name: rate}``) is a probability and
    ``blur_radius`` is ``(min, max)`` with ``0 <= min <= max``."""
    for name, p in rates.items():
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1]; got {p}.")
    if len(blur_radius) != 2 or not 0 <= blur_radius[0] <= blur_radius[1]:
        raise ValueError(f"blur_radius must be (min, max) with 0 <= min <= max; got {blur_radius}.")


def _adjust_hue(image, factor):
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(factor * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


class MultiCropAugmentation:
    """Per-image multi-crop augmentation with the official probabilities.

    ``augment(image, rng)`` returns ``(global_crops, local_crops)``: lists of
    ``(size, size, 3)`` float32 arrays, ImageNet-normalised.

    Global crop 1: RandomResizedCrop(``global_crop_size``, ``global_crops_scale``, bicubic),
    flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur
    (radius U(0.1, 2)) p=1.0. Other global crops: blur p=0.1 and solarisation p=0.2.
    Local crops: ``local_crop_size``, ``local_crops_scale``, blur p=0.5, no solarisation.
    ``blur_radius`` (pixels) is the official (0.1, 2.0) unless given.

    ``flip_p``, ``color_jitter_p``, ``grayscale_p`` and ``solarize_p`` (the solarisation rate of
    the second and later global crops) default to the official rates; lower them for data where
    these views change the meaning (a flipped or inverted digit is another glyph). They are the
    ``PretrainConfig`` field names; ``jitter_p``, the earlier name of ``color_jitter_p``, is
    accepted as an alias.
    """

    jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    solarize_threshold = 128

    def __init__(
        self,
        global_crops_number=2,
        local_crops_number=0,
        global_crops_scale=(0.14, 1.0),
        local_crops_scale=(0.05, 0.4),
        global_crop_size=224,
        local_crop_size=96,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        blur_radius=(0.1, 2.0),
        flip_p=0.5,
        color_jitter_p=0.8,
        grayscale_p=0.2,
        solarize_p=0.2,
        jitter_p=None,
    ):
        if jitter_p is not None:  # the earlier name of color_jitter_p
            if color_jitter_p != 0.8 and color_jitter_p != jitter_p:
                raise ValueError(
                    f"color_jitter_p={color_jitter_p} and its alias jitter_p={jitter_p} disagree; give one."
                )
            color_jitter_p = jitter_p
        if global_crops_number < 1:
            raise ValueError("global_crops_number must be >= 1.")
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1; got {scale}.")
        self.global_crops_number = int(global_crops_number)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.global_crop_size = int(global_crop_size)
        self.local_crop_size = int(local_crop_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        # Official radius range in pixels, meant for 224/96-px crops; scale it down for tiny
        # crops, where a 2-px blur erases the content.
        self.blur_radius = tuple(float(r) for r in blur_radius)
        rates = dict(flip_p=flip_p, color_jitter_p=color_jitter_p, grayscale_p=grayscale_p, solarize_p=solarize_p)
        check_view_recipe(rates, self.blur_radius)
        self.flip_p = float(flip_p)
        self.color_jitter_p = float(color_jitter_p)
        self.grayscale_p = float(grayscale_p)
        self.solarize_p = float(solarize_p)

    @property
    def jitter_p(self):
        """``color_jitter_p`` under its earlier name."""
        return self.color_jitter_p

    @jitter_p.setter
    def jitter_p(self, value):
        self.color_jitter_p = float(value)

    # probabilities per crop kind: (blur, solarize)
    def crop_recipe(self, index):
        """``(blur_p, solarize_p)`` of global crop ``index`` (``None``: a local crop)."""
        if index is None:
            return 0.5, 0.0
        return (1.0, 0.0) if index == 0 else (0.1, self.solarize_p)

    def _color(self, image, rng, log):
        if rng.random() < self.flip_p:
            log.append("flip")
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < self.color_jitter_p:
            log.append("jitter")
            b, c, s, h = self.jitter
            factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h))
            for op in rng.permutation(4):
                if op == 0:
                    image = ImageEnhance.Brightness(image).enhance(factors[0])
                elif op == 1:
                    image = ImageEnhance.Contrast(image).enhance(factors[1])
                elif op == 2:
                    image = ImageEnhance.Color(image).enhance(factors[2])
                else:
                    image = _adjust_hue(image, factors[3])
        if rng.random() < self.grayscale_p:
            log.append("grayscale")
            image = image.convert("L").convert("RGB")
        return image

    def crop(self, image, size, scale, blur_p, solarize_p, rng, log=None):
        """One augmented crop of a PIL image as a normalised ``(size, size, 3)`` float32 array.

        ``log``, when a list, receives the decisions taken (``"box"`` with the crop box, then
        ``"flip"``, ``"jitter"``, ``"grayscale"``, ``"blur"``, ``"solarize"``), for inspection.
        """
        log = [] if log is None else log
        top, left, h, w = random_resized_crop_box(image.width, image.height, scale, rng)
        log.append(("box", top, left, h, w))
        out = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        out = self._color(out, rng, log)
        if rng.random() <= blur_p:  # official: random.random() <= p
            log.append("blur")
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_radius)))
        if rng.random() < solarize_p:
            log.append("solarize")
            out = ImageOps.solarize(out, self.solarize_threshold)
        array = np.asarray(out, np.float32) / 255.0
        return (array - self.mean) / self.std

    def __call__(self, image, rng, logs=None):
        """``logs``, when a list, receives one decision list per crop (globals first)."""
        image = to_pil(image)
        globals_, locals_ = [], []
        for index in list(range(self.global_crops_number)) + [None] * self.local_crops_number:
            log = [] if logs is None else logs.append([]) or logs[-1]
            blur_p, solarize_p = self.crop_recipe(index)
            if index is None:
                size, scale, out = self.local_crop_size, self.local_crops_scale, locals_
            else:
                size, scale, out = self.global_crop_size, self.global_crops_scale, globals_
            out.append(self.crop(image, size, scale, blur_p, solarize_p, rng, log))
        return globals_, locals_
