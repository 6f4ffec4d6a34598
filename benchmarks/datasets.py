"""Small labelled image datasets for the learning benchmark, each with a fixed train/test split,
written once as PNG image folders that ``examples/pretrain.py --data_path`` reads.

    python benchmarks/datasets.py digits shapes glyphs            # writes, or reuses, the folders
    python benchmarks/datasets.py shapes --num_train 500 --preview shapes.png

Layout (``ImageFolderSource``'s, labels are the sorted class-folder names):
``<root>/<name>/train/<class>/<index>.png`` and ``<root>/<name>/test/<class>/<index>.png``,
28 x 28 8-bit grey, plus ``<root>/<name>/meta.json`` (the settings that made it; a folder
written with other settings is replaced). Sizes or seeds other than the defaults go to
``<name>-train<N>-test<M>-seed<S>``. Default root: ``<system temp dir>/ibot_keras_datasets``.
Nothing is downloaded.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 images, 10 classes;
  the UCI optdigits data, CC BY 4.0, shipped inside scikit-learn, BSD-3-Clause), scaled to
  0..255 as ``ibot_keras.data.load_digits`` does and resized to 28 px with the bicubic filter
  of ``ibot_keras.eval.eval_views``; stratified 70/30 split (1,257 / 540; ``num_train`` and
  ``num_test`` do not apply).
- ``shapes``: 10 procedural shape classes (circle, square, triangle, pentagon, hexagon, star,
  cross, heart, arrow, crescent) near the centre (+-6 %), radius 28-40 % of the image, aspect
  +-20 %, rotation +-20 degrees, filled (70 %) or outlined, bright (90 %) or dark, on a cluttered
  background (gradient, strokes, blobs), blurred and noisy. Made here; CC0.
- ``glyphs``: the letters A-J (notMNIST-like) rendered from the TrueType fonts found under
  ``/usr/share/fonts`` (random font, lower case 25 %, stroke width), with an affine distortion
  (rotation +-11 degrees, shear, scale, shift), a smooth elastic warp, the same clutter, blur
  and noise. Made here; CC0 (the DejaVu fonts are under the Bitstream Vera / DejaVu licence,
  which allows this use). The images depend on the fonts installed (Pillow's built-in font
  when there are none): ``meta.json`` lists the ones used.
- ``silhouettes``: 10 procedural animal-like side views (horse, dog, cat, bird, fish, rabbit,
  elephant, giraffe, snake, turtle) built from ellipses, limbs and wedges, with jittered
  proportions (log-normal, sigma 0.21) and pose (limb, neck and tail angles), facing left or
  right, rotated +-15 degrees; white on black, fitted into a box of 16-22 px and centred by
  mass as MNIST is (then shifted +-1 px), lightly blurred. No clutter: pixels are strong
  there, as on real silhouette data. Made here; CC0.

Raw-pixel k-NN (k = 20, the benchmark's protocol) at the default sizes: digits 97.96 %,
shapes 76.50 %, glyphs 76.05 %, silhouettes 91.10 % (``python benchmarks/learning.py
--pixels_only``). Writing shapes and glyphs takes about 10 and 25 s on a 2-core CPU.

Generated images are deterministic: image ``i`` of a split comes from
``np.random.default_rng([seed, split, i])`` and has label ``i % 10``, so a larger
``num_train`` adds images without changing the first ones, and the test set does not depend on
``num_train``.
"""

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

VERSION = 1  # bump when a generator changes: cached folders of another version are rewritten
SIZE = 28
SUPERSAMPLE = 4  # drawn at 4 x 28 px, then reduced (anti-aliasing)
DATASETS = ("digits", "shapes", "glyphs", "silhouettes")
SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "heart", "arrow", "crescent")
LETTERS = "ABCDEFGHIJ"
ANIMALS = ("horse", "dog", "cat", "bird", "fish", "rabbit", "elephant", "giraffe", "snake", "turtle")
SPLITS = {"train": 0, "test": 1}


def default_root():
    return os.path.join(tempfile.gettempdir(), "ibot_keras_datasets")


def class_names(name):
    """Class-folder names of a dataset, in label order (their sorted order)."""
    if name == "digits":
        return [str(d) for d in range(10)]
    if name == "shapes":
        return [f"{i}_{s}" for i, s in enumerate(SHAPES)]
    if name == "glyphs":
        return list(LETTERS)
    if name == "silhouettes":
        return [f"{i}_{a}" for i, a in enumerate(ANIMALS)]
    raise ValueError(f"Unknown dataset {name!r}; choose from {', '.join(DATASETS)}.")


# -- digits -------------------------------------------------------------------------------------
def digits_arrays(seed=0):
    """``{"train": (images, labels), "test": (images, labels)}``: ``(N, 28, 28)`` uint8 and ``(N,)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # as ibot_keras.data.load_digits
    images = np.stack([np.asarray(Image.fromarray(x).resize((SIZE, SIZE), Image.BICUBIC)) for x in small])
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.3, stratify=labels, random_state=seed)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


# -- shared pieces of the procedural datasets ---------------------------------------------------
def _background(rng, canvas):
    """A cluttered grey background ``(canvas, canvas)`` float32 in 0..255 and its mean level."""
    level = rng.uniform(10, 110)
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = rng.uniform(0, 60) * (xs * math.cos(angle) + ys * math.sin(angle))
    clutter = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(1, 6)):
        value = int(rng.uniform(40, 200))
        if rng.random() < 0.6:  # a stroke across the image
            points = [tuple(rng.uniform(-0.1, 1.1, 2) * canvas) for _ in range(rng.integers(2, 4))]
            draw.line(points, fill=value, width=int(rng.uniform(0.02, 0.07) * canvas))
        else:  # a blob
            x, y = rng.uniform(0, canvas, 2)
            r = rng.uniform(0.04, 0.14) * canvas
            draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=value)
    clutter = np.asarray(clutter, np.float32) * rng.uniform(0.15, 0.5)
    return level + gradient + clutter, level


def _finish(rng, background, level, mask):
    """Composite ``mask`` (canvas-size ``L`` image, 255 = object) onto ``background``, reduce to
    28 px, blur and add noise: a ``(28, 28)`` uint8 image."""
    alpha = np.asarray(mask, np.float32) / 255.0
    if rng.random() < 0.9:  # a brighter object than its surroundings, else a darker one
        value = min(255.0, level + rng.uniform(70, 190))
    else:
        value = max(0.0, level - rng.uniform(0, level)) if level > 60 else 0.0
        background = background + 80.0  # a light background for a dark object
    shade = rng.uniform(-30, 30) * (np.linspace(-1, 1, alpha.shape[0], dtype=np.float32)[:, None])
    image = background * (1 - alpha) + (value + shade) * alpha
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BOX)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.9)))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 16), (SIZE, SIZE))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# -- shapes -------------------------------------------------------------------------------------
def _shape_polygons(kind, rng):
    """Polygons of a unit-radius shape centred at 0: ``[(points (P, 2), filled_value)]``, drawn in
    order (value 0 cuts a hole)."""
    def regular(n, radius=1.0, phase=0.0):
        t = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)

    if kind == "circle":
        return [(regular(48), 255)]
    if kind == "square":
        return [(regular(4, phase=math.pi / 4), 255)]
    if kind == "triangle":
        return [(regular(3, phase=-math.pi / 2), 255)]
    if kind == "pentagon":
        return [(regular(5, phase=-math.pi / 2), 255)]
    if kind == "hexagon":
        return [(regular(6), 255)]
    if kind == "star":
        outer, inner = regular(5, phase=-math.pi / 2), regular(5, rng.uniform(0.38, 0.5), -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], axis=1).reshape(-1, 2), 255)]
    if kind == "cross":
        a = rng.uniform(0.22, 0.34)
        q = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        return [(np.array(q, np.float64), 255)]
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        points = np.stack([x, y + 2.5], axis=1) / 16.5
        return [(points, 255)]
    if kind == "arrow":
        s, h, w = rng.uniform(0.14, 0.24), rng.uniform(0.45, 0.7), rng.uniform(0.5, 0.75)
        q = [(-1, -s), (1 - h, -s), (1 - h, -w), (1, 0), (1 - h, w), (1 - h, s), (-1, s)]
        return [(np.array(q, np.float64), 255)]
    if kind == "crescent":
        offset, inner = rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.95)
        return [(regular(48), 255), (regular(48, inner) + [offset, 0.0], 0)]
    raise ValueError(kind)


def shape_image(label, rng):
    """One ``(28, 28)`` uint8 image of shape class ``label``."""
    canvas = SIZE * SUPERSAMPLE
    background, level = _background(rng, canvas)
    kind = SHAPES[label]
    radius = rng.uniform(0.28, 0.4) * canvas
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    angle = rng.uniform(-0.35, 0.35)
    centre = canvas / 2 + rng.uniform(-0.06, 0.06, 2) * canvas
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    filled = kind == "crescent" or rng.random() < 0.7
    width = max(2, int(rng.uniform(0.05, 0.12) * canvas))
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for points, value in _shape_polygons(kind, rng):
        xy = (points * [aspect, 1 / aspect]) @ rotation.T * radius + centre
        xy = [tuple(p) for p in xy]
        if filled:
            draw.polygon(xy, fill=value)
        else:
            draw.line(xy + xy[:2], fill=value, width=width, joint="curve")
    return _finish(rng, background, level, mask)


# -- glyphs -------------------------------------------------------------------------------------
def font_paths():
    """The TrueType/OpenType fonts under ``/usr/share/fonts`` (sorted), or ``[]``."""
    found = glob.glob("/usr/share/fonts/**/*.ttf", recursive=True) + glob.glob("/usr/share/fonts/**/*.otf", recursive=True)
    return sorted(found)


_FONT_CACHE = {}


def _font(path, size):
    key = (path, size)
    if key not in _FONT_CACHE:
        if path:
            _FONT_CACHE[key] = ImageFont.truetype(path, size)
        else:
            try:
                _FONT_CACHE[key] = ImageFont.load_default(size)  # Pillow >= 10.1 with FreeType
            except TypeError:
                _FONT_CACHE[key] = ImageFont.load_default()
    return _FONT_CACHE[key]


def _warp_mesh(canvas, inverse, offset, fields, cells=8):
    """A ``PIL.Image.MESH`` of ``cells x cells`` quads mapping output pixel ``p`` to input
    ``inverse @ p + offset + fields(p)`` (``fields``: ``(2, cells + 1, cells + 1)`` x/y
    displacements at the grid corners): a piecewise-affine smooth warp."""
    step = canvas / cells
    grid = np.arange(cells + 1) * step
    gx, gy = np.meshgrid(grid, grid)  # (cells + 1, cells + 1), [row = y, column = x]
    sx = inverse[0, 0] * gx + inverse[0, 1] * gy + offset[0] + fields[0]
    sy = inverse[1, 0] * gx + inverse[1, 1] * gy + offset[1] + fields[1]
    mesh = []
    for r in range(cells):
        for c in range(cells):
            box = (int(round(grid[c])), int(round(grid[r])), int(round(grid[c + 1])), int(round(grid[r + 1])))
            corners = ((r, c), (r + 1, c), (r + 1, c + 1), (r, c + 1))  # upper left, lower left, lower right, upper right
            mesh.append((box, tuple(v for rc in corners for v in (sx[rc], sy[rc]))))
    return mesh


def glyph_image(label, rng, fonts):
    """One ``(28, 28)`` uint8 image of letter ``LETTERS[label]`` from one of ``fonts`` (paths;
    ``[None]``: Pillow's built-in font)."""
    canvas = SIZE * SUPERSAMPLE
    background, level = _background(rng, canvas)
    letter = LETTERS[label] if rng.random() < 0.75 else LETTERS[label].lower()
    font = _font(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(0.65, 0.85)))
    stroke = int(rng.integers(0, 4))
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font, stroke_width=stroke)
    draw.text(((canvas - left - right) / 2, (canvas - top - bottom) / 2), letter, fill=255, font=font, stroke_width=stroke)
    # Affine: rotation, shear, anisotropic scale, shift (the inverse map, output -> input pixel).
    angle, shear = rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25)
    scale = rng.uniform(0.85, 1.05, 2)
    forward = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ np.array(
        [[1, shear], [0, 1]]
    ) @ np.diag(scale)
    inverse = np.linalg.inv(forward)
    shift = rng.uniform(-0.06, 0.06, 2) * canvas
    c = canvas / 2
    offset = np.array([c, c]) - inverse @ (np.array([c, c]) + shift)
    # Elastic warp: a smooth random displacement field (4 x 4 normal draws, bicubically upsampled).
    strength = rng.uniform(0, 0.04) * canvas
    fields = np.stack([
        np.asarray(Image.fromarray(rng.normal(0, 1, (4, 4)).astype(np.float32), "F").resize((9, 9), Image.BICUBIC))
        for _ in range(2)
    ]) * strength
    mask = mask.transform((canvas, canvas), Image.MESH, _warp_mesh(canvas, inverse, offset, fields), resample=Image.BILINEAR)
    return _finish(rng, background, level, mask)


# -- silhouettes --------------------------------------------------------------------------------
def _ellipse(cx, cy, rx, ry, angle=0.0, n=32):
    t = 2 * math.pi * np.arange(n) / n
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _limb(start, length, angle, width):
    """A limb from ``start`` at ``angle`` (radians from straight down): ``("line", points, width)``."""
    end = (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle))
    return ("line", [start, end], width)


def _animal_parts(kind, rng):
    """Parts of one animal in a unit side view (x forward, y down): ``("poly", points)`` or
    ``("line", points, width)``, with jittered proportions and pose."""
    j = lambda x, s=0.15: x * math.exp(rng.normal(0, 1.4 * s))  # noqa: E731
    a = lambda d=15: math.radians(rng.uniform(-1.4 * d, 1.4 * d))  # noqa: E731
    parts = []
    if kind in ("horse", "dog", "cat", "elephant", "giraffe"):
        body = {"horse": (1.0, 0.38), "dog": (0.8, 0.32), "cat": (0.75, 0.28), "elephant": (0.95, 0.55), "giraffe": (0.6, 0.3)}[kind]
        leg = {"horse": 1.1, "dog": 0.7, "cat": 0.5, "elephant": 0.7, "giraffe": 1.4}[kind]
        thick = {"horse": 0.14, "dog": 0.13, "cat": 0.1, "elephant": 0.3, "giraffe": 0.1}[kind]
        rx, ry, leg = j(body[0]), j(body[1]), j(leg)
        parts.append(("poly", _ellipse(0, 0, rx, ry)))
        stride = a(20)
        for x, sign in ((-0.75, 1), (-0.55, -1), (0.55, 1), (0.75, -1)):
            parts.append(_limb((x * rx, 0.5 * ry), leg, sign * stride, j(thick, 0.1)))
        if kind == "giraffe":
            neck_base, neck_len, neck_angle = (0.8 * rx, -0.3 * ry), j(1.5), math.radians(155) + a(10)
        elif kind == "elephant":
            neck_base, neck_len, neck_angle = (0.8 * rx, -0.2 * ry), j(0.35), math.radians(120) + a(10)
        else:
            neck_base = (0.8 * rx, -0.3 * ry)
            neck_len = j({"horse": 0.8, "dog": 0.4, "cat": 0.25}[kind])
            neck_angle = math.radians({"horse": 145, "dog": 135, "cat": 130}[kind]) + a(12)
        parts.append(_limb(neck_base, neck_len, neck_angle, j(0.3 if kind != "giraffe" else 0.16, 0.1)))
        hx = neck_base[0] + neck_len * math.sin(neck_angle)
        hy = neck_base[1] + neck_len * math.cos(neck_angle)
        head = {"horse": (0.32, 0.14), "dog": (0.28, 0.18), "cat": (0.22, 0.2), "elephant": (0.42, 0.38), "giraffe": (0.24, 0.11)}[kind]
        head_angle = {"horse": 0.6, "dog": 0.2, "cat": 0.0, "elephant": 0.0, "giraffe": 0.3}[kind] + a(10)
        parts.append(("poly", _ellipse(hx + 0.6 * head[0], hy, j(head[0]), j(head[1]), head_angle)))
        if kind == "cat":
            for dx in (-0.05, 0.18):
                parts.append(("poly", np.array([(hx + dx, hy - 0.1), (hx + dx + 0.1, hy - 0.1), (hx + dx + 0.05, hy - j(0.35))])))
            parts.append(("line", [(-rx, 0), (-rx - j(0.35), -j(0.3)), (-rx - j(0.2), -j(0.8))], 0.09))
        elif kind == "dog":
            parts.append(_limb((-rx, -0.2 * ry), j(0.45), math.radians(200) + a(20), 0.1))
        elif kind == "horse":
            parts.append(_limb((-rx, -0.1 * ry), j(0.7), math.radians(25) + a(15), 0.14))
        elif kind == "elephant":
            parts.append(("line", [(hx + 0.9 * head[0], hy), (hx + j(0.75), hy + j(0.45)), (hx + j(0.7), hy + j(0.95))], j(0.16, 0.1)))
            parts.append(("poly", _ellipse(hx + 0.1, hy + 0.05, j(0.22), j(0.32))))
        elif kind == "giraffe":
            parts.append(_limb((-rx, -0.1 * ry), j(0.5), math.radians(15) + a(10), 0.06))
    elif kind == "bird":
        rx, ry = j(0.6), j(0.38)
        tilt = math.radians(-15) + a(10)
        parts.append(("poly", _ellipse(0, 0, rx, ry, tilt)))
        parts.append(("poly", _ellipse(0.6 * rx, -0.9 * ry, j(0.22), j(0.2))))
        bx, by = 0.6 * rx + 0.2, -0.9 * ry
        parts.append(("poly", np.array([(bx, by - 0.06), (bx + j(0.25), by + 0.02), (bx, by + 0.08)])))
        parts.append(("poly", np.array([(-0.8 * rx, -0.1), (-rx - j(0.5), -j(0.25) + a(10)), (-rx - j(0.45), j(0.2)), (-0.8 * rx, 0.15)])))
        for x in (-0.15, 0.15):
            parts.append(_limb((x, 0.8 * ry), j(0.55), a(15), 0.06))
    elif kind == "fish":
        rx, ry = j(1.0), j(0.42)
        parts.append(("poly", _ellipse(0, 0, rx, ry)))
        spread = j(0.5)
        parts.append(("poly", np.array([(-0.85 * rx, 0), (-rx - j(0.55), -spread), (-rx - j(0.4), 0), (-rx - j(0.55), spread)])))
        parts.append(("poly", np.array([(-0.2, -0.9 * ry), (0.15, -ry - j(0.35)), (0.35, -0.9 * ry)])))
    elif kind == "rabbit":
        rx, ry = j(0.6), j(0.45)
        parts.append(("poly", _ellipse(0, 0.1, rx, ry)))
        hx, hy = 0.65 * rx, -0.45
        parts.append(("poly", _ellipse(hx, hy, j(0.27), j(0.22))))
        for dx, tilt in ((-0.08, -0.25), (0.08, -0.05)):
            parts.append(("poly", _ellipse(hx + dx, hy - j(0.5), j(0.09), j(0.42), tilt + a(12))))
        parts.append(("poly", _ellipse(-rx, 0.0, j(0.14), j(0.14))))
        parts.append(("poly", _ellipse(0.1, 0.1 + ry, j(0.35), j(0.1))))
    elif kind == "snake":
        phase, waves, amp = rng.uniform(0, 2 * math.pi), rng.uniform(1.2, 1.8), j(0.3)
        xs = np.linspace(-1.3, 1.1, 40)
        points = [(x, amp * math.sin(2 * math.pi * waves * (x + 1.3) / 2.4 + phase)) for x in xs]
        parts.append(("line", points, j(0.22, 0.1)))
        hx, hy = points[-1]
        parts.append(("poly", _ellipse(hx + 0.12, hy, j(0.22), j(0.14))))
    elif kind == "turtle":
        rx, ry = j(0.9), j(0.6)
        t = np.linspace(math.pi, 2 * math.pi, 24)
        parts.append(("poly", np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)))
        parts.append(("poly", _ellipse(0, 0, rx * 1.05, 0.12)))
        parts.append(("poly", _ellipse(rx + j(0.2), -0.1 + a(10), j(0.24), j(0.15))))
        for x in (-0.6, -0.25, 0.3, 0.6):
            parts.append(_limb((x * rx, 0.05), j(0.3), a(25), 0.15))
        parts.append(("poly", np.array([(-rx, -0.05), (-rx - j(0.25), 0.05), (-rx, 0.1)])))
    else:
        raise ValueError(kind)
    return parts


def silhouette_image(label, rng):
    """One ``(28, 28)`` uint8 silhouette of animal class ``label``."""
    canvas = SIZE * SUPERSAMPLE * 2
    parts = _animal_parts(ANIMALS[label], rng)
    angle = math.radians(rng.uniform(-15, 15))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ np.diag([flip, 1.0])
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    scale = canvas / 6
    to_canvas = lambda points: [tuple(p) for p in (np.asarray(points, np.float64) @ rotation.T) * scale + canvas / 2]  # noqa: E731
    for part in parts:
        if part[0] == "poly":
            draw.polygon(to_canvas(part[1]), fill=255)
        else:
            draw.line(to_canvas(part[1]), fill=255, width=max(1, int(part[2] * scale)), joint="curve")
    # MNIST's normalisation: fit into 20 x 20 (aspect kept), then centre the mass in 28 x 28.
    box = mask.getbbox()
    mask = mask.crop(box)
    fit = rng.uniform(16, 22) * SUPERSAMPLE / max(mask.size)
    mask = mask.resize((max(1, round(mask.size[0] * fit)), max(1, round(mask.size[1] * fit))), Image.BILINEAR)
    big = SIZE * SUPERSAMPLE
    alpha = np.asarray(mask, np.float32)
    ys, xs = np.nonzero(alpha > 0)
    weights = alpha[ys, xs]
    cy, cx = (ys * weights).sum() / weights.sum(), (xs * weights).sum() / weights.sum()
    placed = Image.new("L", (big, big), 0)
    shift = rng.uniform(-1, 1, 2) * SUPERSAMPLE
    placed.paste(mask, (int(round(big / 2 - cx + shift[0])), int(round(big / 2 - cy + shift[1]))))
    image = placed.resize((SIZE, SIZE), Image.BOX).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
    return np.asarray(image, np.uint8)


def procedural_arrays(name, split, num, seed=0, fonts=None):
    """``(images (num, 28, 28) uint8, labels (num,) int64)`` of ``shapes``, ``glyphs`` or ``silhouettes``."""
    labels = np.arange(num, dtype=np.int64) % 10
    if name == "glyphs":
        fonts = fonts if fonts is not None else (font_paths() or [None])
    images = np.empty((num, SIZE, SIZE), np.uint8)
    for i in range(num):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        if name == "shapes":
            images[i] = shape_image(labels[i], rng)
        elif name == "silhouettes":
            images[i] = silhouette_image(labels[i], rng)
        else:
            images[i] = glyph_image(labels[i], rng, fonts)
    return images, labels


def dataset_arrays(name, num_train=10000, num_test=2000, seed=0):
    """``{"train": (images, labels), "test": (images, labels)}`` of a dataset, in memory."""
    if name == "digits":
        return digits_arrays(seed)
    class_names(name)  # refuses an unknown name
    return {split: procedural_arrays(name, split, num, seed) for split, num in (("train", num_train), ("test", num_test))}


def _write_split(folder, names, images, labels):
    for name in names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, "L").save(os.path.join(folder, names[label], f"{i:06d}.png"), compress_level=1)


def prepare(name, root=None, num_train=10000, num_test=2000, seed=0, verbose=True):
    """Write ``<root>/<name>/{train,test}`` once (reused while ``meta.json`` matches the
    settings; other sizes or seeds go to ``<name>-train<N>-test<M>-seed<S>``) and return
    ``{"train": path, "test": path, "meta": dict}``."""
    root = root or default_root()
    if name == "digits":
        suffix = "" if seed == 0 else f"-seed{seed}"
    else:
        suffix = "" if (num_train, num_test, seed) == (10000, 2000, 0) else f"-train{num_train}-test{num_test}-seed{seed}"
    folder = os.path.join(root, name + suffix)
    meta = {"name": name, "version": VERSION, "seed": seed, "image_size": SIZE, "classes": class_names(name)}
    if name != "digits":
        meta.update(num_train=num_train, num_test=num_test)
    if name == "glyphs":
        meta["fonts"] = [os.path.basename(p) for p in font_paths()] or ["PIL built-in"]
    paths = {"train": os.path.join(folder, "train"), "test": os.path.join(folder, "test")}
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in meta} == meta:
            return dict(paths, meta=saved)
    if verbose:
        print(f"writing {name} to {folder} ...", file=sys.stderr, flush=True)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    arrays = dataset_arrays(name, num_train, num_test, seed)
    for split, (images, labels) in arrays.items():
        _write_split(os.path.join(staging, split), meta["classes"], images, labels)
        meta[f"{split}_images"] = int(len(images))
    with open(os.path.join(staging, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return dict(paths, meta=meta)


def preview(name, path, seed=0, per_class=12):
    """Save a grid (classes x ``per_class``) of training images, 2x enlarged, to ``path``."""
    images, labels = dataset_arrays(name, num_train=10 * per_class, num_test=0, seed=seed)["train"]
    rows = [images[labels == c][:per_class] for c in range(10)]
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=DATASETS)
    parser.add_argument("--root", default=default_root())
    parser.add_argument("--num_train", type=int, default=10000)
    parser.add_argument("--num_test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", help="save a grid of training images to this PNG instead (one dataset)")
    args = parser.parse_args(argv)
    if args.preview:
        preview(args.names[0], args.preview, args.seed)
        return 0
    for name in args.names:
        done = prepare(name, args.root, args.num_train, args.num_test, args.seed)
        print(f"{name}: {done['train']} ({done['meta']['train_images']}), {done['test']} ({done['meta']['test_images']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
