"""A non-finite step (one NaN pixel) is skipped, counted and survived; nothing is lost."""

import glob
import os

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_model import stacked, tiny_batch, tiny_config

from ibot_keras import IBOTAdamW, build_pretrainer
from ibot_keras.callbacks import NonFiniteTrainingError
from ibot_keras.resume import TrainingCheckpoint, restore_training_state


def state(model):
    """Every array a step may change, except the step and iteration counters."""
    skip = {id(model.step), id(model.skipped_steps), id(model.consecutive_skips), id(model.optimizer.iterations),
            id(model.optimizer.update_skipped)}
    arrays = {v.path: to_numpy(v) for v in model.weights if id(v) not in skip}
    arrays.update({"opt/" + v.path: to_numpy(v) for v in model.optimizer.variables if id(v) not in skip})
    return arrays


def finite(model):
    return all(np.isfinite(to_numpy(v)).all() for v in model.weights + model.optimizer.variables)


def test_a_nan_pixel_changes_no_weight_teacher_center_or_optimizer_slot():
    model = build_pretrainer(tiny_config(drop_path=0.0, warmup_epochs=0), steps_per_epoch=1)
    model.fit(tiny_batch(seed=1), batch_size=2, epochs=1, verbose=0)
    before = state(model)
    bad = tiny_batch(seed=2)
    bad["local_crops"][0, 1, 3, 3, 2] = np.inf
    history = model.fit(bad, batch_size=2, epochs=1, verbose=0)
    after = state(model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # The batch is consumed and the schedules move on; the skip is counted and logged.
    assert int(to_numpy(model.step)) == 2 and int(to_numpy(model.optimizer.iterations)) == 2
    assert int(to_numpy(model.skipped_steps)) == 1
    assert history.history["skipped_steps"] == [1.0] and history.history["consecutive_skips"] == [1.0]
    # Metrics of a skipped step are left out of the epoch means (the last finite values stay).
    assert np.isfinite(history.history["loss"][0])
    model.fit(tiny_batch(seed=3), batch_size=2, epochs=1, verbose=0)
    assert int(to_numpy(model.consecutive_skips)) == 0 and int(to_numpy(model.skipped_steps)) == 1
    assert finite(model)


def test_three_epochs_with_one_nan_batch_keep_every_checkpoint_finite(tmp_path):
    batches = [tiny_batch(seed=s) for s in range(9)]
    batches[4]["global_crops"][1, 0, 5, 5, 0] = np.nan  # epoch 2 (of 3), its second step
    model = build_pretrainer(tiny_config(epochs=3, drop_path=0.0), steps_per_epoch=3)
    directory = str(tmp_path / "run")
    history = model.fit(
        ((b,) for b in batches), steps_per_epoch=3, epochs=3, verbose=0, shuffle=False,
        callbacks=[TrainingCheckpoint(directory), keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 3  # TerminateOnNaN did not stop it
    assert history.history["skipped_steps"] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(history.history["loss"]))
    assert finite(model) and int(to_numpy(model.skipped_steps)) == 1
    files = sorted(glob.glob(os.path.join(directory, "*.weights.h5")))
    assert files
    for path in files:
        fresh = build_pretrainer(tiny_config(epochs=3, drop_path=0.0), steps_per_epoch=3)
        fresh.optimizer.build(fresh.trainable_variables)
        fresh.load_weights(path)
        assert finite(fresh), path
    fresh = build_pretrainer(tiny_config(epochs=3, drop_path=0.0), steps_per_epoch=3)
    assert restore_training_state(fresh, directory) == 3
    assert int(to_numpy(fresh.skipped_steps)) == 1


def test_too_many_consecutive_skips_stop_fit_naming_the_epoch_and_step():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=2)
    model.max_consecutive_skips = 3
    good = tiny_batch(seed=0)
    bad = tiny_batch(seed=1)
    bad["global_crops"][:] = np.nan
    data = stacked(good, bad, bad, bad, bad)
    with pytest.raises(NonFiniteTrainingError, match=r"epoch 1, batch 4: the last 3 steps had a non-finite"):
        model.fit(data, batch_size=2, epochs=1, verbose=0, shuffle=False)
    assert finite(model)


def test_the_optimizer_skips_an_update_with_one_infinite_gradient():
    variables = [keras.Variable(np.ones((3, 2), "float32")), keras.Variable(np.ones((2,), "float32"))]
    optimizer = IBOTAdamW(learning_rate=0.1, weight_decay=0.1)
    optimizer.build(variables)
    finite_grads = [np.full((3, 2), 0.5, "float32"), np.full((2,), 0.5, "float32")]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in finite_grads], variables)
    after_one = [to_numpy(v) for v in variables]
    slots = [to_numpy(v) for v in optimizer.variables if v is not optimizer.iterations and v is not optimizer.update_skipped]
    # PyTorch AdamW's first step with lr 0.1, wd 0.1: p * (1 - 0.01) - 0.1 * sign(g) (bias terms undecayed).
    np.testing.assert_allclose(after_one[0], 0.99 - 0.1, rtol=1e-6)
    np.testing.assert_allclose(after_one[1], 1.0 - 0.1, rtol=1e-6)
    bad = [np.full((3, 2), 0.5, "float32"), np.array([0.5, np.inf], "float32")]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in bad], variables)
    for value, before in zip([to_numpy(v) for v in variables], after_one):
        np.testing.assert_array_equal(value, before)
    slots_after = [to_numpy(v) for v in optimizer.variables if v is not optimizer.iterations and v is not optimizer.update_skipped]
    for value, before in zip(slots_after, slots):
        np.testing.assert_array_equal(value, before)
    assert int(to_numpy(optimizer.update_skipped)) == 1 and int(to_numpy(optimizer.iterations)) == 2
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in finite_grads], variables)
    assert int(to_numpy(optimizer.update_skipped)) == 0
    assert not np.array_equal(to_numpy(variables[0]), after_one[0])
