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
        stratified: DINOv2's batch-level stratification (off: the official per-crop draws).
            The ``n`` crops of a batch get the ratios at quantiles ``(k + U_k) / n`` of the
            configured ratio distribution, one per stratum ``k = 0 .. n-1`` in a shuffled
            order (``batch_ratios``). Each crop's ratio keeps its distribution; the batch
            covers it evenly. With the README ratios ``[0, 0.3] +- [0, 0.2]`` and ``n`` even
            this is DINOv2's collate: ``n/2`` empty masks, and ``n/2`` crops at
            ``U(r_i, r_(i+1))`` with ``r = linspace(0.1, 0.5, n/2 + 1)``. Applies to
            ``batch`` and to the ratios given to ``image_masks`` (the pipeline); a single
            ``masking(rows, cols)`` draws unstratified.

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
        stratified=False,
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
        self.stratified = bool(stratified)
        # (low, high) of each ratio entry, by increasing ratio: the quantile map of ratio_at.
        self._ranges = sorted((r - v, r + v) if v > 0 else (r, r) for r, v in pairs)
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

    def ratio_at(self, quantile):
        """The ratio at ``quantile`` in ``[0, 1]`` of the configured distribution: entry ``j``
        of the ``m`` ratio entries (sorted by ratio) covers ``[j/m, (j+1)/m)`` and maps it
        linearly onto ``[r_j - v_j, r_j + v_j]``. A uniform ``quantile`` gives ``sample_ratio``'s
        distribution (without the ``pred_start_epoch`` gate)."""
        m = len(self._ranges)
        scaled = min(max(float(quantile), 0.0), 1.0) * m
        j = min(int(scaled), m - 1)
        low, high = self._ranges[j]
        return low + (high - low) * min(scaled - j, 1.0)

    def batch_ratios(self, n, rng):
        """``(n,)`` stratified ratios of the ``n`` crops of a batch: crop ``i`` gets
        ``ratio_at((perm[i] + U_i) / n)``, ``perm`` a permutation of ``0 .. n-1`` and ``U`` uniform
        draws of ``rng`` (a ``numpy.random.Generator``; consumed: one permutation, ``n`` floats)."""
        n = int(n)
        strata = rng.permutation(n)
        offsets = rng.random(n)
        return np.array([self.ratio_at((k + u) / n) for k, u in zip(strata, offsets)])

    def max_masked_patches(self, num_patches):
        """The most patches one crop of ``num_patches`` can have masked:
        ``floor(max(pred_ratio + pred_ratio_var) * num_patches)`` (stratified or not)."""
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

    def __call__(self, rows, cols, ratio=None):
        """One ``(rows, cols)`` bool mask, at ``ratio`` when given (still 0 before
        ``pred_start_epoch``), else at a ``sample_ratio()`` draw."""
        if ratio is None:
            ratio = self.sample_ratio()
        elif self.epoch < self.pred_start_epoch:
            ratio = 0.0
        target = ratio * rows * cols
        if self.pred_shape == "block":
            return self._block_mask(rows, cols, target)
        return self._random_mask(rows, cols, target)

    def image_masks(self, num_crops, rows, cols, rng, epoch=None, ratios=None):
        """``(num_crops, rows, cols)`` masks of one image from ``rng`` (a ``numpy.random.Generator``)
        instead of the instance's stream: the masks depend only on ``rng``, ``epoch`` (which
        gates ``pred_start_epoch``; default the instance's) and ``ratios``, so worker order
        cannot change them. ``ratios``: ``(num_crops,)`` ratios to use (the image's part of
        ``batch_ratios``) instead of per-crop draws. The instance is left untouched."""
        private = copy.copy(self)
        private._random = random.Random(int(rng.integers(2**63)))
        private._numpy = np.random.default_rng(int(rng.integers(2**63)))
        private.epoch = self.epoch if epoch is None else int(epoch)
        if ratios is None:
            return np.stack([private(rows, cols) for _ in range(num_crops)])
        if len(ratios) != num_crops:
            raise ValueError(f"image_masks: {len(ratios)} ratios for {num_crops} crops.")
        return np.stack([private(rows, cols, float(ratio)) for ratio in ratios])

    def batch(self, batch_size, num_crops, rows, cols):
        """``(batch_size, num_crops, rows, cols)`` masks, image by image, crop by crop (when
        ``stratified``, the ``batch_size * num_crops`` crops' ratios are ``batch_ratios`` drawn
        from the instance's NumPy stream first)."""
        masks = np.zeros((batch_size, num_crops, rows, cols), dtype=bool)
        ratios = None
        if self.stratified:
            ratios = self.batch_ratios(batch_size * num_crops, self._numpy).reshape(batch_size, num_crops)
        for b in range(batch_size):
            for c in range(num_crops):
                masks[b, c] = self(rows, cols, None if ratios is None else float(ratios[b, c]))
        return masks

    def get_config(self):
        return {
            "pred_ratio": self.pred_ratio,
            "pred_ratio_var": self.pred_ratio_var,
            "pred_shape": self.pred_shape,
            "pred_aspect_ratio": self.pred_aspect_ratio,
            "pred_start_epoch": self.pred_start_epoch,
            "seed": self.seed,
            "stratified": self.stratified,
        }
