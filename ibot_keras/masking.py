"""Block-wise (BEiT-style) and random patch masks, as the official ``ImageFolderMask`` makes them.

Masks are made on the host in NumPy, one per crop, and fed to the model as ordinary inputs:
this keeps them reproducible and identical across backends. The random stream is Python's
``random`` algorithm (a private ``random.Random``), consumed in the official order, so a
``BlockMasking(seed=s)`` reproduces ``random.seed(s)`` runs of the official generator.
"""

import copy
import math
import random

import numpy as np


class BlockMasking:
    """Mask generator for iBOT.

    Args:
        pred_ratio: fraction of patches to mask, a float or a list of floats (one of the
            per-entry draws is picked at random per crop; README: ``[0, 0.3]``).
        pred_ratio_var: the ratio is drawn from ``U(r - var, r + var)`` when ``var > 0``;
            a float, or a list matching ``pred_ratio`` (README: ``[0, 0.2]``).
        pred_shape: ``"block"`` (BEiT-style rectangles) or ``"rand"`` (uniform cells).
        pred_aspect_ratio: range of block aspect ratios, sampled log-uniformly.
        pred_start_epoch: before this epoch (see ``set_epoch``) every mask is empty.
        seed: seed of the private random stream.

    ``masking(rows, cols)`` returns one ``(rows, cols)`` bool mask;
    ``masking.batch(batch, crops, rows, cols)`` returns ``(batch, crops, rows, cols)``.
    """

    def __init__(
        self,
        pred_ratio=0.3,
        pred_ratio_var=0.0,
        pred_shape="block",
        pred_aspect_ratio=(0.3, 1 / 0.3),
        pred_start_epoch=0,
        seed=None,
    ):
        ratios = list(pred_ratio) if isinstance(pred_ratio, (list, tuple, np.ndarray)) else None
        if ratios is not None and len(ratios) == 1:
            ratios = None
            pred_ratio = float(np.ravel(pred_ratio)[0])
        if ratios is None:
            variances = pred_ratio_var
            if isinstance(variances, (list, tuple, np.ndarray)):
                if len(variances) != 1:
                    raise ValueError("pred_ratio_var is a list but pred_ratio is a scalar.")
                variances = float(np.ravel(variances)[0])
            self.pred_ratio, self.pred_ratio_var = float(pred_ratio), float(variances)
            pairs = [(self.pred_ratio, self.pred_ratio_var)]
        else:
            if isinstance(pred_ratio_var, (list, tuple, np.ndarray)):
                variances = [float(v) for v in pred_ratio_var]
                if len(variances) != len(ratios):
                    raise ValueError(
                        f"pred_ratio has {len(ratios)} entries but pred_ratio_var has {len(variances)}."
                    )
            else:
                variances = [float(pred_ratio_var)] * len(ratios)
            self.pred_ratio = [float(r) for r in ratios]
            self.pred_ratio_var = variances
            pairs = list(zip(self.pred_ratio, variances))
        for ratio, var in pairs:
            if not 0.0 <= ratio < 1.0 or var < 0.0 or ratio - var < 0.0 or ratio + var > 1.0:
                raise ValueError(
                    f"Each masking ratio r and variation v need 0 <= r - v and r + v <= 1; got "
                    f"r={ratio}, v={var}."
                )
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"pred_shape must be 'block' or 'rand', got {pred_shape!r}.")
        low, high = pred_aspect_ratio
        if not 0 < low <= high:
            raise ValueError(f"pred_aspect_ratio must be (low, high) with 0 < low <= high; got {pred_aspect_ratio}.")
        self.pred_shape = pred_shape
        self.pred_aspect_ratio = (float(low), float(high))
        self.log_aspect_ratio = (math.log(low), math.log(high))
        self.pred_start_epoch = int(pred_start_epoch)
        self.seed = seed
        self.epoch = 0
        self._random = random.Random(seed)
        self._numpy = np.random.default_rng(seed)

    # -- state ------------------------------------------------------------------------------
    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def get_state(self):
        """Everything needed to continue the exact same stream (for resumable training)."""
        return {
            "epoch": self.epoch,
            "random": self._random.getstate(),
            "numpy": self._numpy.bit_generator.state,
        }

    def set_state(self, state):
        self.epoch = state["epoch"]
        version, internal, gauss = state["random"]
        self._random.setstate((version, tuple(internal), gauss))
        self._numpy.bit_generator.state = state["numpy"]

    # -- sampling ---------------------------------------------------------------------------
    def sample_ratio(self):
        """The masking ratio of one crop (0 before ``pred_start_epoch``)."""
        if self.epoch < self.pred_start_epoch:
            return 0.0
        rng = self._random
        if isinstance(self.pred_ratio, list):
            draws = [
                rng.uniform(r - v, r + v) if v > 0 else r
                for r, v in zip(self.pred_ratio, self.pred_ratio_var)
            ]
            return rng.choice(draws)
        if self.pred_ratio_var > 0:
            return rng.uniform(self.pred_ratio - self.pred_ratio_var, self.pred_ratio + self.pred_ratio_var)
        return self.pred_ratio

    def max_masked_patches(self, num_patches):
        """The most patches one crop of ``num_patches`` can have masked:
        ``floor(max(pred_ratio + pred_ratio_var) * num_patches)``."""
        if isinstance(self.pred_ratio, list):
            highest = max(r + v for r, v in zip(self.pred_ratio, self.pred_ratio_var))
        else:
            highest = self.pred_ratio + self.pred_ratio_var
        return min(int(num_patches), int(highest * num_patches))

    def _block_mask(self, rows, cols, target):
        rng = self._random
        mask = np.zeros((rows, cols), dtype=bool)
        min_area = (min(rows, cols) // 3) ** 2
        count = 0
        while count < target:
            budget = target - count
            added = 0
            for _ in range(10):
                area = rng.uniform(min_area, budget)
                aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < cols and h < rows:
                    top = rng.randint(0, rows - h)
                    left = rng.randint(0, cols - w)
                    window = mask[top : top + h, left : left + w]
                    new_cells = h * w - int(window.sum())
                    if 0 < new_cells <= budget:
                        window[...] = True
                        added += new_cells
                if added > 0:
                    break
            if added == 0:
                break
            count += added
        return mask

    def _random_mask(self, rows, cols, target):
        count = int(target)
        flat = np.zeros(rows * cols, dtype=bool)
        flat[:count] = True
        self._numpy.shuffle(flat)
        return flat.reshape(rows, cols)

    def __call__(self, rows, cols):
        """One ``(rows, cols)`` bool mask."""
        target = self.sample_ratio() * rows * cols
        if self.pred_shape == "block":
            return self._block_mask(rows, cols, target)
        return self._random_mask(rows, cols, target)

    def image_masks(self, num_crops, rows, cols, rng, epoch=None):
        """``(num_crops, rows, cols)`` masks of one image from ``rng`` (a ``numpy.random.Generator``)
        instead of the instance's stream: the masks depend only on ``rng`` and ``epoch`` (which
        gates ``pred_start_epoch``; default the instance's), so worker order cannot change them.
        The instance is left untouched."""
        private = copy.copy(self)
        private._random = random.Random(int(rng.integers(2**63)))
        private._numpy = np.random.default_rng(int(rng.integers(2**63)))
        private.epoch = self.epoch if epoch is None else int(epoch)
        return np.stack([private(rows, cols) for _ in range(num_crops)])

    def batch(self, batch_size, num_crops, rows, cols):
        """``(batch_size, num_crops, rows, cols)`` masks, image by image, crop by crop."""
        masks = np.zeros((batch_size, num_crops, rows, cols), dtype=bool)
        for b in range(batch_size):
            for c in range(num_crops):
                masks[b, c] = self(rows, cols)
        return masks

    def get_config(self):
        return {
            "pred_ratio": self.pred_ratio,
            "pred_ratio_var": self.pred_ratio_var,
            "pred_shape": self.pred_shape,
            "pred_aspect_ratio": self.pred_aspect_ratio,
            "pred_start_epoch": self.pred_start_epoch,
            "seed": self.seed,
        }
