"""Shared helpers. The suite runs once per backend (tox sets KERAS_BACKEND)."""

import os
import pathlib

import keras
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BACKEND = keras.backend.backend()


def load_fixture(name):
    return np.load(FIXTURES / f"{name}.npz")


def official_state(npz, prefix):
    """``{official.dotted.name: array}`` from fixture keys ``<prefix><name with __>``."""
    return {k[len(prefix) :].replace("__", "."): npz[k] for k in npz.files if k.startswith(prefix)}


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def value_and_grad(fn, *args):
    """``fn(*args)`` (a scalar) and its gradients w.r.t. every arg, as NumPy, on this backend."""
    if BACKEND == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return to_numpy(value), [to_numpy(g) for g in grads]
    if BACKEND == "torch":
        import torch

        tensors = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
        value = fn(*tensors)
        value.backward()
        return value.detach().cpu().numpy(), [t.grad.cpu().numpy() for t in tensors]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(np.asarray(a)) for a in args]
        with tf.GradientTape() as tape:
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
        return value.numpy(), [g.numpy() for g in grads]
    raise NotImplementedError(BACKEND)


@pytest.fixture(autouse=True)
def _clear_session():
    keras.backend.clear_session()
    yield


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}, KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"


def assert_weights_close(name, ours, theirs, atol, key_bias_atol):
    """Compare two weight arrays; the key part of a fused ``qkv`` bias gets ``key_bias_atol``.

    The key bias has an exactly zero gradient (it adds ``q . b_k`` to a whole softmax row),
    so its computed gradient is float32 rounding noise, which Adam normalises into steps of
    up to ``lr``: two correct runs can differ there by ``lr`` per step.
    """
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if name.endswith("qkv.bias") or name.endswith("qkv/bias"):
        dim = ours.shape[0] // 3
        np.testing.assert_allclose(ours[dim : 2 * dim], theirs[dim : 2 * dim], atol=key_bias_atol, err_msg=name)
        ours = np.delete(ours, np.s_[dim : 2 * dim])
        theirs = np.delete(theirs, np.s_[dim : 2 * dim])
    np.testing.assert_allclose(ours, theirs, atol=atol, err_msg=name)
