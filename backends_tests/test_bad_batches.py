"""Batches that do not match the model are refused (or warned about) with the fix, on every
backend, before they can train silently wrong."""

import warnings

import numpy as np
import pytest
from conftest import BACKEND
from test_model import stacked, tiny_batch, tiny_config

from ibot_keras import build_pretrainer


@pytest.fixture(scope="module")
def model():
    return build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=2)


def fit(model, data, **kwargs):
    return model.fit(data, batch_size=2, epochs=1, verbose=0, shuffle=False, **kwargs)


def test_integer_crops_are_refused(model):
    batch = tiny_batch()
    batch["global_crops"] = np.clip(batch["global_crops"] * 60 + 120, 0, 255).astype("uint8")
    with pytest.raises(TypeError, match=r"'global_crops' has dtype uint8; crops must be floating point"):
        model(batch, training=False)


def test_float_masks_are_refused(model):
    batch = tiny_batch()
    batch["masks"] = batch["masks"].astype("float32") * 0.5
    with pytest.raises(TypeError, match=r"'masks' has dtype float32; masks must be bool"):
        model(batch, training=True)


def test_an_empty_batch_is_refused(model):
    batch = {k: v[:0] for k, v in tiny_batch().items()}
    with pytest.raises(ValueError, match=r"empty batch \(B=0\)"):
        model(batch, training=False)


def test_crops_of_another_size_than_configured_are_refused_in_training():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=1)
    batch = tiny_batch(size=32, grid=8)
    del batch["masks"]
    model(batch, training=False)  # inference on another size is fine (the position table resizes)
    with pytest.raises(ValueError, match=r"global crops are 32x32 but the model was configured with global_crop_size=16"):
        fit(model, batch)


def test_masks_beyond_max_masked_patches_are_refused(model):
    batch = tiny_batch()
    batch["masks"][:] = True  # 16 of 16 patches; pred_ratio 0.3 allows 4
    with pytest.raises(ValueError, match=r"can mask 16 patches .* max_masked_patches=4"):
        fit(model, batch)
    batch["masks"] = batch["masks"].astype("int32") * 2
    with pytest.raises(ValueError, match=r"values other than 0 and 1"):
        fit(model, batch)


def test_an_epoch_of_another_length_warns_once_with_the_fix():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=2)
    data = stacked(tiny_batch(seed=0), tiny_batch(seed=1), tiny_batch(seed=2))  # 3 batches of 2
    with pytest.warns(UserWarning, match=r"epoch of this data is 3 batches .* steps_per_epoch=2.*steps_per_epoch=3"):
        fit(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(model, {k: v[:4] for k, v in data.items()})  # the right length: no warning


def test_pixels_in_0_255_warn():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=1)
    batch = tiny_batch()
    batch["global_crops"] = (batch["global_crops"] * 60 + 120).astype("float32")
    with pytest.warns(UserWarning, match=r"crops should be normalised"):
        model.check_data(batch, batch_size=2)


def test_local_crops_changing_size_work_or_are_refused_clearly():
    model = build_pretrainer(tiny_config(drop_path=0.0), steps_per_epoch=2)
    batches = [tiny_batch(seed=0), tiny_batch(seed=1, local=12)]

    def data():
        for b in batches:
            yield (b,)

    if BACKEND == "tensorflow":  # Keras retraces with unknown sizes; refuse with the reason
        with pytest.raises(ValueError, match=r"must be known when the step is traced.*keep the crop sizes fixed"):
            model.fit(data(), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    else:
        history = model.fit(data(), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"][0])
