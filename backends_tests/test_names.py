"""One name per concept: a component argument has its config field's name, and the earlier
component names (``IBOTHead(num_layers)``, ``MultiCropAugmentation(jitter_p)``) still work."""

import json

import keras
import numpy as np
import pytest

from ibot_keras import IBOTHead, PretrainConfig, build_pretrainer
from ibot_keras.data.augment import MultiCropAugmentation

HEAD = dict(out_dim=8, patch_out_dim=6, hidden_dim=8, bottleneck_dim=4, shared_head=False, in_dim=5)


@pytest.fixture(autouse=True)
def _clear_session():
    """Overrides conftest's per-test ``clear_session`` (slow on torch): tiny layers only."""
    yield


def test_head_takes_nlayers_and_its_earlier_name():
    new, old = IBOTHead(nlayers=2, name="head", **HEAD), IBOTHead(num_layers=2, name="head", **HEAD)
    assert old.get_config() == new.get_config()
    assert new.get_config()["nlayers"] == 2 and "num_layers" not in new.get_config()
    assert old.num_layers == old.nlayers == 2
    # nlayers=2: Linear, GELU, Linear -> mlp.0 and mlp.2, then the two prototype layers.
    names = [name for name, _, _ in old.official_weights()]
    assert names[:4] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    with pytest.raises(ValueError, match="nlayers=4 and its alias num_layers=2 disagree"):
        IBOTHead(nlayers=4, num_layers=2, **HEAD)


def test_head_config_saved_under_the_earlier_name_loads():
    head = IBOTHead(nlayers=1, name="head", **HEAD)
    saved = keras.saving.serialize_keras_object(head)
    assert keras.saving.deserialize_keras_object(json.loads(json.dumps(saved))).get_config() == head.get_config()
    saved["config"]["num_layers"] = saved["config"].pop("nlayers")  # a .keras file written before the rename
    loaded = keras.saving.deserialize_keras_object(json.loads(json.dumps(saved)))
    assert loaded.get_config() == head.get_config() and loaded.nlayers == 1


def test_augmentation_takes_color_jitter_p_and_its_earlier_name():
    sizes = dict(global_crop_size=16, local_crop_size=8)
    new = MultiCropAugmentation(2, 1, color_jitter_p=0.3, **sizes)
    old = MultiCropAugmentation(2, 1, jitter_p=0.3, **sizes)
    assert old.color_jitter_p == new.color_jitter_p == new.jitter_p == 0.3
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    logs_new, logs_old = [], []
    crops_new = new(image, np.random.default_rng(1), logs_new)
    crops_old = old(image, np.random.default_rng(1), logs_old)
    assert logs_old == logs_new and any("jitter" in log for log in logs_new)
    for a, b in zip(crops_new[0] + crops_new[1], crops_old[0] + crops_old[1]):
        np.testing.assert_array_equal(a, b)
    old.jitter_p = 0.0  # the earlier attribute name writes the new one
    assert old.color_jitter_p == 0.0
    with pytest.raises(ValueError, match="color_jitter_p=0.5 and its alias jitter_p=0.3 disagree"):
        MultiCropAugmentation(color_jitter_p=0.5, jitter_p=0.3)
    with pytest.raises(ValueError, match="color_jitter_p must be a probability"):
        MultiCropAugmentation(jitter_p=1.5)


def test_config_fields_reach_the_components_under_their_names():
    config = PretrainConfig(patch_size=4, embed_dim=8, depth=1, num_heads=2, image_size=8, global_crop_size=8,
                            local_crop_size=8, out_dim=8, patch_out_dim=8, head_hidden_dim=8,
                            head_bottleneck_dim=4, head_nlayers=2, drop_path=0.2, pred_ratio=0.5,
                            epochs=1, warmup_teacher_temp_epochs=0, warmup_epochs=0)
    model = build_pretrainer(config, steps_per_epoch=1, seed=False)
    assert model.student_head.nlayers == model.teacher_head.nlayers == 2
    assert model.student_backbone.drop_path_rate == 0.2 and model.teacher_backbone.drop_path_rate == 0.0
    assert model.max_masked_patches == config.max_masked_patches == 2  # floor(0.5 * 4 patches)
