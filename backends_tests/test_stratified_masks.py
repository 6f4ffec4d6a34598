"""BlockMasking(stratified=True): DINOv2's batch-stratified mask ratios, off by default."""

import numpy as np
import pytest

import ibot_keras
from ibot_keras import BlockMasking
from ibot_keras.data import ArraySource, build_pipeline
from ibot_keras.data.pipeline import BatchMaker

README = dict(pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2])  # DINOv2's 50% masked, U(0.1, 0.5)


class Views:
    """Two blank global crops of ``size`` px; consumes the generator like a real recipe."""

    global_crops_number, local_crops_number = 2, 0

    def __init__(self, size):
        self.global_crop_size = self.local_crop_size = size

    def __call__(self, image, rng):
        rng.random()
        crop = np.zeros((self.global_crop_size, self.global_crop_size, 3), np.float32)
        return [crop, crop], []


def maker(masking, size=32, batch=8, seed=4, images=16, **kwargs):
    return BatchMaker(ArraySource(np.zeros((images, 6, 6, 3), np.uint8)), Views(size), masking, 2, batch,
                      seed=seed, **kwargs)


def dinov2_strata(n, low=0.1, high=0.5):
    """DINOv2's collate: masked crop i of n gets U(r_i, r_(i+1)), r = linspace(low, high, n + 1)."""
    edges = np.linspace(low, high, n + 1)
    return edges[:-1], edges[1:]


def test_each_batch_covers_every_stratum_once():
    batch_maker = maker(BlockMasking(**README, pred_shape="rand", stratified=True))  # rand: int(ratio * N) cells
    cells = 16 * 16
    orders = set()
    for step in (0, 1, 5):
        epoch, position = divmod(step, batch_maker.steps_per_epoch)
        ratios = np.concatenate([batch_maker.mask_ratios(epoch, p, 2) for p in range(position * 8, position * 8 + 8)])
        counts = batch_maker(step)["masks"].reshape(16, cells).sum(1)
        # Half the 16 crops unmasked, the other 8 one per stratum of [0.1, 0.5].
        assert (ratios == 0).sum() == 8 and (counts == 0).sum() == 8
        low, high = dinov2_strata(8)
        masked = np.sort(ratios[ratios > 0])
        assert ((low <= masked) & (masked < high)).all(), masked
        np.testing.assert_array_equal(np.sort(counts[counts > 0]), np.floor(masked * cells))
        assert (np.floor(low * cells) <= np.sort(counts[counts > 0])).all()
        orders.add(tuple(np.argsort(ratios, kind="stable")))
    assert len(orders) == 3  # the strata go to other crops in every batch
    # Block masks: one ratio per stratum of U(0.1, 0.5) (scalar 0.3 +- 0.2, every crop masked);
    # the generator never exceeds floor(ratio * N), so the k-th smallest count stays within the
    # k-th stratum's upper edge (it may fall short of the lower one).
    masking = BlockMasking(0.3, 0.2, stratified=True)
    counts = np.sort(maker(masking)(0)["masks"].reshape(16, cells).sum(1))
    low, high = dinov2_strata(16)
    assert (counts <= np.floor(high * cells)).all() and counts.max() <= masking.max_masked_patches(cells)
    assert (counts > 0).all() and counts[-1] > counts[0] + 50


def test_instance_batches_are_stratified_and_reproducible():
    first = BlockMasking(0.3, 0.2, pred_shape="rand", seed=1, stratified=True).batch(4, 2, 10, 10)
    second = BlockMasking(0.3, 0.2, pred_shape="rand", seed=1, stratified=True).batch(4, 2, 10, 10)
    np.testing.assert_array_equal(first, second)
    low, high = dinov2_strata(8)
    counts = np.sort(first.reshape(8, 100).sum(1))
    assert ((np.floor(low * 100) <= counts) & (counts <= np.floor(high * 100))).all(), counts


def test_stratified_masks_depend_only_on_seed_epoch_and_position():
    masking = dict(**README, stratified=True)
    whole = maker(BlockMasking(**masking))(3)["masks"]
    np.testing.assert_array_equal(maker(BlockMasking(**masking))(3)["masks"], whole)  # another build
    # Data-parallel shards (and workers, which call sample position by position) get their part.
    shards = [maker(BlockMasking(**masking), num_shards=2, shard_index=i)(3)["masks"] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(shards), whole)
    epoch, position = divmod(3, 2)
    alone = maker(BlockMasking(**masking))
    np.testing.assert_array_equal(np.stack([alone.sample(epoch, p)[2] for p in range(8, 16)]), whole)
    assert not np.array_equal(maker(BlockMasking(**masking), seed=5)(3)["masks"], whole)
    # Before pred_start_epoch every mask is empty, stratified or not.
    late = maker(BlockMasking(**masking, pred_start_epoch=2))
    assert not late(3)["masks"].any() and late(4)["masks"].any()


# Masks of today's (unstratified) code path, produced by running BatchMaker BEFORE the
# stratified option existed (2026-12-01): np.packbits(maker(step)["masks"].ravel()).hex()
# with maker(..., size=16, batch=4, seed=3, images=8), i.e. (4, 2, 8, 8) masks per step.
TODAY = {
    ("block", 0): "0000000000000000f0fcf8f81818380000f8fbfbfb03010000c0c40404040000007c7820202020000000000000"
                  "0000000000000000000000001818181818f010",
    ("block", 3): "00000000000000000000000000000000000000000000000000c0c0c0c0c000001f1f1f1f000000000000000f"
                  "0f0f7f7f000000000000000000000c0c0c0c0c00",
    ("rand", 0): "04600408c40443210048942403308011200c9483f6e8190a84c11644b0104abd642c0008c92405012a828500"
                 "0b58024202810600030870116e164089002bf8b0",
    ("rand", 3): "6818851020c2481dea0a52a28687021900641142b1014a84989280b02200504061444c044f06221810090f00"
                 "2880219aa003000038d5c54c8440600144282009",
}


@pytest.mark.parametrize("shape", ["block", "rand"])
@pytest.mark.parametrize("stratified", [None, False])
def test_default_stream_is_unchanged(shape, stratified):
    settings = dict(README) if shape == "block" else dict(pred_ratio=0.3, pred_ratio_var=0.1, pred_shape="rand")
    if stratified is not None:
        settings["stratified"] = stratified
    batch_maker = maker(BlockMasking(**settings), size=16, batch=4, seed=3, images=8)
    for step in (0, 3):
        masks = batch_maker(step)["masks"]
        assert masks.shape == (4, 2, 8, 8)
        assert np.packbits(masks.ravel()).tobytes().hex() == TODAY[shape, step]


def test_option_reaches_the_pipeline_and_round_trips():
    config = ibot_keras.PretrainConfig(
        patch_size=4, image_size=16, global_crop_size=16, local_crop_size=8, batch_size=4, epochs=2,
        warmup_teacher_temp_epochs=1, warmup_epochs=1, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2),
    )
    source = ArraySource(np.zeros((8, 16, 16, 3), np.uint8))
    assert not build_pipeline(config, source).maker.masking.stratified
    pipeline = build_pipeline(config, source, pred_ratio_stratified=True)
    assert pipeline.maker.masking.stratified
    assert (pipeline.batch(0)["masks"].reshape(8, 16).sum(1) == 0).sum() == 4
    masking = BlockMasking(**README, stratified=True)
    assert BlockMasking(**masking.get_config()).get_config() == masking.get_config()
    assert masking.get_config()["stratified"] is True
