"""KoLeo (DINOv2's optional spreading term; iBOT does not have it): the standalone loss against
NumPy and a closed form, and its wiring into the training step."""

import numpy as np
import pytest
from conftest import to_numpy, value_and_grad
from keras import ops
from test_model import tiny_batch, tiny_config

from ibot_keras import build_pretrainer
from ibot_keras.losses import koleo_loss

# float32 on every backend against a float64 NumPy reference: 1e-5.
TOL = 1e-5


def numpy_koleo(x):
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    return -np.mean(np.log(dist.min(axis=1)))


def test_koleo_matches_numpy():
    x = np.random.default_rng(0).standard_normal((7, 5)).astype("float32") * 3.0
    assert float(to_numpy(koleo_loss(ops.convert_to_tensor(x)))) == pytest.approx(numpy_koleo(x), abs=TOL)


def test_koleo_over_sets_is_the_mean_of_the_per_set_terms():
    # (crops, B, D): neighbours are searched within each crop's batch, never across crops.
    x = np.random.default_rng(1).standard_normal((2, 6, 5)).astype("float32")
    expected = (numpy_koleo(x[0]) + numpy_koleo(x[1])) / 2
    assert float(to_numpy(koleo_loss(ops.convert_to_tensor(x)))) == pytest.approx(expected, abs=TOL)


def test_koleo_of_orthogonal_rows_is_minus_log_sqrt2():
    # Orthonormal rows are all sqrt(2) apart, whatever their scale.
    x = np.eye(4, dtype="float32") * np.array([[1.0], [2.0], [0.5], [3.0]], "float32")
    assert float(to_numpy(koleo_loss(ops.convert_to_tensor(x)))) == pytest.approx(-np.log(np.sqrt(2.0)), abs=TOL)


def test_koleo_gradient_is_finite_for_duplicate_rows():
    # Two equal rows are each other's nearest neighbour at distance 0: large but finite loss,
    # and no NaN gradient (d sqrt / d u at u = 0 would be infinite).
    x = np.random.default_rng(1).standard_normal((4, 3)).astype("float32")
    x[1] = x[0]
    value, (grad,) = value_and_grad(koleo_loss, x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_koleo_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(ops.ones((1, 3)))


def test_training_step_adds_weighted_koleo_of_the_student_cls():
    weight = 0.5
    model = build_pretrainer(tiny_config(drop_path=0.0, koleo_loss_weight=weight), steps_per_epoch=1)
    batch = tiny_batch(batch=4, seed=1)
    # Same weights and masks as the step's forward pass (no dropout, drop_path 0).
    features = to_numpy(model.student_backbone(
        ops.reshape(batch["global_crops"], (-1, 16, 16, 3)),
        masks=ops.reshape(batch["masks"], (-1, 4, 4)), training=True,
    ))[:, 0].reshape(4, 2, -1)
    expected = np.mean([numpy_koleo(features[:, crop]) for crop in range(2)])
    history = model.fit(batch, batch_size=4, epochs=1, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["koleo"] == pytest.approx(expected, abs=TOL)
    assert logs["loss"] == pytest.approx(logs["cls"] + logs["patch"] + weight * logs["koleo"], abs=1e-5)


def test_default_has_no_koleo_metric():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=1)
    history = model.fit(tiny_batch(), batch_size=2, epochs=1, verbose=0)
    assert "koleo" not in history.history
    assert model.get_config()["koleo_loss_weight"] == 0.0
