"""IBOTHead against the official iBOTHead (ibot_head_case.npz)."""

import keras
import numpy as np
import pytest
from conftest import load_fixture, official_state, to_numpy

from ibot_keras import IBOTHead
from ibot_keras.checkpoint import load_state

H = load_fixture("ibot_head_case")
RTOL, ATOL = 1e-5, 1e-6  # float32 port of a float32 reference (fixture README)
VARIANTS = {
    "a": dict(patch_out_dim=24, norm=None, act="gelu", nlayers=3, norm_last_layer=True, shared_head=False),
    "b": dict(patch_out_dim=24, norm=None, act="gelu", nlayers=3, norm_last_layer=False, shared_head=True),
    "c": dict(patch_out_dim=24, norm="ln", act="relu", nlayers=2, norm_last_layer=False, shared_head=False),
}


def make_head(variant):
    head = IBOTHead(32, hidden_dim=64, bottleneck_dim=8, in_dim=16, **VARIANTS[variant])
    load_state(head.official_weights(), official_state(H, f"{variant}_param__"))
    return head


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_head_outputs(variant):
    head = make_head(variant)
    cls, patch = head(H["x_tokens"])
    np.testing.assert_allclose(to_numpy(cls), H[f"{variant}_out_cls"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(patch), H[f"{variant}_out_patch"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        to_numpy(head(H["x_cls_only"])), H[f"{variant}_out_cls_only"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        to_numpy(head.bottleneck(H["x_tokens"])), H[f"{variant}_bottleneck_normed"], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        to_numpy(head.last_layer.effective_kernel()).T,
        H[f"{variant}_eff_last_layer_weight"],
        rtol=RTOL,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        to_numpy(head.last_layer2.effective_kernel()).T,
        H[f"{variant}_eff_last_layer2_weight"],
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_trainable_parameters_match_official(variant):
    head = make_head(variant)
    trainable = {name for name, var, _ in head.official_weights() if var.trainable}
    assert trainable == set(H[f"{variant}_trainable"].tolist())


def test_shared_head_has_one_prototype_layer():
    head = make_head("b")
    assert head.last_layer2 is head.last_layer
    assert head.patch_out_dim == 32
    names = [name for name, _, _ in head.official_weights(include_aliases=True)]
    assert "last_layer2.weight_v" in names  # state_dict() lists the alias


def test_initialisation_follows_official():
    keras.utils.set_random_seed(0)
    head = IBOTHead(4096, hidden_dim=256, bottleneck_dim=256, in_dim=64, norm_last_layer=True)
    g = to_numpy(head.last_layer.weight_g)
    v = to_numpy(head.last_layer.weight_v)
    np.testing.assert_array_equal(g, np.ones_like(g))
    assert not head.last_layer.weight_g.trainable
    # weight_v keeps PyTorch's default Linear init U(+-1/sqrt(256)): std = bound / sqrt(3).
    assert np.abs(v).max() <= 1 / 16
    assert v.std() == pytest.approx(1 / 16 / np.sqrt(3), rel=0.02)
    kernel = to_numpy(head.mlp_layers[0].kernel)
    assert kernel.std() == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(to_numpy(head.mlp_layers[0].bias), 0.0)


def test_parameter_count_matches_official():
    # The spec counts 7,614,720 parameters for iBOTHead(384, 8192, shared), weight_g included.
    head = IBOTHead(8192, in_dim=384, shared_head=True)
    assert sum(int(np.prod(v.shape)) for v in head.weights) == 7_614_720


def test_bad_options_raise():
    with pytest.raises(ValueError, match="norm='bn'"):
        IBOTHead(8, norm="bn")
    with pytest.raises(ValueError, match="act='tanh'"):
        IBOTHead(8, act="tanh")
    with pytest.raises(ValueError, match="IBOTHead expects"):
        IBOTHead(8, in_dim=4, hidden_dim=8, bottleneck_dim=4)(np.zeros((1, 2, 3, 4), np.float32))


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_serialization_round_trip(variant):
    head = make_head(variant)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    clone.set_weights(head.get_weights())
    for ours, theirs in zip(head(H["x_tokens"]), clone(H["x_tokens"])):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    assert clone.get_config() == head.get_config()
