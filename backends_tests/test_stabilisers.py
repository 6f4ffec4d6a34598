"""DINOv2-family loss options: ``sinkhorn_knopp`` and ``IBOTLoss(centering=...,
patch_normalization=...)`` against float64 NumPy references written here.

Tolerances: float32 (log-domain, each backend's reductions) against float64: rtol 1e-5 /
atol 1e-6 on probabilities and losses of order 1 (observed <= 1e-6).
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy, value_and_grad

from ibot_keras import IBOTLoss
from ibot_keras.losses import sinkhorn_knopp

RTOL, ATOL = 1e-5, 1e-6
B, NG, NL, N, K = 3, 2, 2, 4, 5
STUDENT_TEMP = 0.1
# IBOTLoss(..., 0.04, 0.07, 0.05, 0.06, 30, 100) at epoch 3: linear warmups over 30 epochs.
EPOCH = 3
TEMP = 0.04 + 0.03 * EPOCH / 29
PATCH_TEMP = 0.05 + 0.01 * EPOCH / 29


def reference_sinkhorn(logits, temperature, iterations=3, weights=None):
    """DINOv2's algorithm on a (K, M) matrix in float64; unmarked rows give zeros."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones(len(logits), bool) if weights is None else np.asarray(weights) > 0
    out = np.zeros_like(logits)
    if not keep.any():
        return out
    x = logits[keep] / temperature
    q = np.exp(x - x.max()).T  # (K, M); a global shift cancels in the first normalisation
    prototypes, rows = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= rows
    out[keep] = (q * rows).T
    return out


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def reference_loss(inputs, centering, patch_normalization, center, patch_center):
    """The whole IBOTLoss with the options, float64, batch-first inputs."""
    f64 = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    masks = f64["masks"]
    if centering == "sinkhorn_knopp":
        teacher = reference_sinkhorn(f64["teacher_cls"].reshape(-1, K), TEMP).reshape(B, NG, K)
        teacher_patch = reference_sinkhorn(
            f64["teacher_patch"].reshape(-1, K), PATCH_TEMP, weights=masks.reshape(-1)
        ).reshape(B, NG, N, K)
    else:
        teacher = softmax((f64["teacher_cls"] - center) / TEMP)
        teacher_patch = softmax((f64["teacher_patch"] - patch_center) / PATCH_TEMP)
    views = np.concatenate([f64["student_cls"], f64["student_local_cls"]], axis=1)
    student = log_softmax(views / STUDENT_TEMP)
    total, pairs = 0.0, 0
    for q in range(NG):
        for v in range(NG + NL):
            if v != q:
                total += np.mean(-(teacher[:, q] * student[:, v]).sum(-1))
                pairs += 1
    loss_cls = total / pairs
    ce = -(teacher_patch * log_softmax(f64["student_patch"] / STUDENT_TEMP)).sum(-1)  # (B, NG, N)
    if patch_normalization == "token":
        loss_patch = (ce * masks).sum() / max(masks.sum(), 1.0)
    else:
        per_image = (ce * masks).sum(-1) / np.maximum(masks.sum(-1), 1.0)
        loss_patch = per_image.mean(axis=0).sum() / NG
    return loss_cls, loss_patch


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((B, NG, N)) < 0.5
    masks[0, 0] = False  # a view without masked patches
    masks[1, 1] = True  # a fully masked one
    return dict(
        student_cls=rng.normal(size=(B, NG, K)).astype("float32"),
        student_patch=rng.normal(size=(B, NG, N, K)).astype("float32"),
        teacher_cls=rng.normal(size=(B, NG, K)).astype("float32"),
        teacher_patch=rng.normal(size=(B, NG, N, K)).astype("float32"),
        student_local_cls=rng.normal(size=(B, NL, K)).astype("float32"),
        masks=masks,
    )


def make_loss(**options):
    return IBOTLoss(K, K, NG, NL, 0.04, 0.07, 0.05, 0.06, 30, 100, **options)


# -- sinkhorn_knopp ------------------------------------------------------------------------
def test_sinkhorn_matches_reference_and_its_marginals():
    logits = np.random.default_rng(1).normal(size=(7, K)).astype("float32")
    got = to_numpy(sinkhorn_knopp(logits, 0.5))
    np.testing.assert_allclose(got, reference_sinkhorn(logits, 0.5), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=RTOL)  # the last scaling is per row
    # Converged, each prototype also gets an equal share M/K of the mass.
    converged = to_numpy(sinkhorn_knopp(logits, 0.5, iterations=30))
    np.testing.assert_allclose(converged.sum(axis=0), 7 / K, rtol=RTOL)
    np.testing.assert_allclose(converged, reference_sinkhorn(logits, 0.5, 30), rtol=RTOL, atol=ATOL)


def test_sinkhorn_weights_select_rows():
    logits = np.random.default_rng(2).normal(size=(8, K)).astype("float32")
    weights = np.array([1, 0, 1, 1, 0, 0, 1, 1], "float32")
    got = to_numpy(sinkhorn_knopp(logits, 0.3, weights=weights))
    np.testing.assert_allclose(got, reference_sinkhorn(logits, 0.3, weights=weights), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got[weights == 0], 0.0)
    np.testing.assert_array_equal(to_numpy(sinkhorn_knopp(logits, 0.3, weights=np.zeros(8))), 0.0)


def test_sinkhorn_large_logits_stay_finite():
    rng = np.random.default_rng(3)
    # exp(logits / 0.04) overflows float32 (> exp(88)) but not float64 after the max shift.
    logits = rng.uniform(0.0, 10.0, size=(6, K)).astype("float32")
    got = to_numpy(sinkhorn_knopp(logits, 0.04))
    np.testing.assert_allclose(got, reference_sinkhorn(logits, 0.04), rtol=1e-4, atol=ATOL)
    huge = to_numpy(sinkhorn_knopp(1e4 * rng.normal(size=(6, K)).astype("float32"), 0.04))
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge.sum(axis=1), 1.0, rtol=RTOL)


# -- IBOTLoss options -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "centering, patch_normalization",
    [("sinkhorn_knopp", "token"), ("sinkhorn_knopp", "image"), ("ema", "token"), ("ema", "image")],
)
def test_loss_options_match_reference(centering, patch_normalization):
    inputs = make_inputs()
    rng = np.random.default_rng(4)
    center = rng.normal(size=(1, K)).astype("float32")
    patch_center = rng.normal(size=(1, 1, K)).astype("float32")
    loss = make_loss(centering=centering, patch_normalization=patch_normalization)
    loss.center.assign(center)
    loss.patch_center.assign(patch_center)
    out = loss(**inputs, epoch=EPOCH)
    ref_cls, ref_patch = reference_loss(inputs, centering, patch_normalization, center, patch_center)
    np.testing.assert_allclose(to_numpy(out["cls"]), ref_cls, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(out["patch"]), ref_patch, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(out["loss"]), ref_cls + ref_patch, rtol=RTOL, atol=ATOL)
    moved = not np.allclose(to_numpy(loss.center), center)
    assert moved == (centering == "ema")  # Sinkhorn-Knopp neither reads nor updates the centers
    assert np.allclose(to_numpy(loss.patch_center), patch_center) == (centering != "ema")


def test_sinkhorn_token_gradients_wrt_student_patches():
    """d loss / d student_patch = lambda2 * mask / #masked * (softmax(s / 0.1) - Q) / 0.1."""
    inputs = make_inputs(seed=5)
    loss = make_loss(centering="sinkhorn_knopp", patch_normalization="token", lambda2=0.5)
    others = {k: v for k, v in inputs.items() if k != "student_patch"}
    _, (grad,) = value_and_grad(lambda s: loss(student_patch=s, **others, epoch=EPOCH)["loss"],
                                inputs["student_patch"])
    masks = inputs["masks"].astype(np.float64)
    target = reference_sinkhorn(inputs["teacher_patch"].reshape(-1, K), PATCH_TEMP,
                                weights=masks.reshape(-1)).reshape(B, NG, N, K)
    student = softmax(inputs["student_patch"].astype(np.float64) / STUDENT_TEMP)
    expected = 0.5 * masks[..., None] / masks.sum() * (student - target) / STUDENT_TEMP
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_defaults_are_official_and_bad_values_name_the_argument():
    loss = make_loss()
    assert (loss.centering, loss.patch_normalization) == ("ema", "image")
    with pytest.raises(ValueError, match=r"centering must be one of 'ema', 'sinkhorn_knopp'; got 'sk'"):
        make_loss(centering="sk")
    with pytest.raises(ValueError, match=r"patch_normalization must be one of 'image', 'token'; got 'patch'"):
        make_loss(patch_normalization="patch")
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        sinkhorn_knopp(np.zeros((2, K), "float32"), 0.1, iterations=0)


def test_options_serialization_round_trip():
    loss = make_loss(centering="sinkhorn_knopp", patch_normalization="token")
    config = loss.get_config()
    assert (config["centering"], config["patch_normalization"]) == ("sinkhorn_knopp", "token")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert (restored.centering, restored.patch_normalization) == ("sinkhorn_knopp", "token")
    inputs = make_inputs(seed=6)
    for key in ("cls", "patch"):
        np.testing.assert_allclose(to_numpy(restored(**inputs, epoch=EPOCH)[key]),
                                   to_numpy(loss(**inputs, epoch=EPOCH)[key]), rtol=1e-6)
