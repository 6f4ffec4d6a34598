"""Small pieces of the training step used alone, against NumPy or the plain formula: the teacher
EMA, the collapse statistics and the backend-specific dense, attention and GELU (float32;
tolerances are float32 rounding)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from ibot_keras.models.diagnostics import collapse_statistics
from ibot_keras.models.ema import ema_update


def test_ema_update_moves_the_teacher_unless_the_step_was_skipped():
    # (torch runs every pair at once: backend_specific.multi_tensor_ema)
    rng = np.random.default_rng(0)
    student, teacher = rng.standard_normal((2, 3, 4)).astype("float32")
    student_bias, teacher_bias = rng.standard_normal((2, 5)).astype("float32")
    pairs = [(keras.Variable(student), keras.Variable(teacher)),
             (keras.Variable(student_bias), keras.Variable(teacher_bias))]
    ema_update(pairs, 0.25)
    np.testing.assert_allclose(to_numpy(pairs[0][1]), 0.75 * teacher + 0.25 * student, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(pairs[1][1]), 0.75 * teacher_bias + 0.25 * student_bias, rtol=1e-6)
    moved = [to_numpy(t) for _, t in pairs]
    ema_update(pairs, 0.5, applied=keras.ops.convert_to_tensor(False))
    for (_, t), before in zip(pairs, moved):
        np.testing.assert_array_equal(to_numpy(t), before)
    ema_update(pairs, keras.ops.convert_to_tensor(0.5), applied=keras.ops.convert_to_tensor(True))
    np.testing.assert_allclose(to_numpy(pairs[1][1]), 0.5 * moved[1] + 0.5 * student_bias, rtol=1e-6)


def test_collapse_statistics_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 5)).astype("float32")
    center = rng.standard_normal((1, 5)).astype("float32") * 0.1
    out = {k: float(to_numpy(v)) for k, v in collapse_statistics(logits, center, 0.5).items()}
    z = ((logits - center) / 0.5).reshape(-1, 5).astype("float64")
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mean_p = p.mean(0)
    assert out["teacher_entropy"] == pytest.approx(-(p * np.log(p)).sum(-1).mean(), rel=1e-5)
    assert out["teacher_batch_entropy"] == pytest.approx(-(mean_p * np.log(mean_p)).sum(), rel=1e-5)
    assert out["prototype_usage"] == pytest.approx(len(set(z.argmax(-1))) / 5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_gives_the_values_and_gradients_of_the_plain_product(with_bias):
    from conftest import value_and_grad

    from ibot_keras import backend_specific

    rng = np.random.default_rng(2)
    args = [rng.standard_normal(shape).astype("float32") for shape in ((2, 3, 4), (4, 5), (5,))]
    args = args if with_bias else args[:2]
    weights = rng.standard_normal((2, 3, 5)).astype("float32")

    def ours(*args):
        return keras.ops.sum(keras.ops.sin(backend_specific.dense(*args)) * keras.ops.convert_to_tensor(weights))

    def plain(x, kernel, bias=0.0):
        return keras.ops.sum(keras.ops.sin(keras.ops.matmul(x, kernel) + bias) * keras.ops.convert_to_tensor(weights))

    value, grads = value_and_grad(ours, *args)
    expected_value, expected_grads = value_and_grad(plain, *args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_gives_the_values_and_gradients_of_the_plain_formula():
    from conftest import value_and_grad

    from ibot_keras import backend_specific

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)).astype("float32") for _ in range(3))
    weights = rng.standard_normal((2, 3, 5, 4)).astype("float32")
    scale = 4**-0.5

    def ours(q, k, v):
        out = backend_specific.attention(q, k, v, scale)
        return keras.ops.sum(keras.ops.sin(out) * keras.ops.convert_to_tensor(weights))

    def plain(q, k, v):
        probs = keras.ops.softmax(keras.ops.matmul(q, keras.ops.transpose(k, (0, 1, 3, 2))) * scale, axis=-1)
        return keras.ops.sum(keras.ops.sin(keras.ops.matmul(probs, v)) * keras.ops.convert_to_tensor(weights))

    scores = q @ np.swapaxes(k, -1, -2) * scale
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(backend_specific.attention(q, k, v, scale)), probs @ v, rtol=1e-5, atol=1e-6)
    value, grads = value_and_grad(ours, q, k, v)
    expected_value, expected_grads = value_and_grad(plain, q, k, v)
    # The value sums 120 terms of mean size 0.32 to -0.22: the float32 rounding of two kernels (torch's
    # fused one on an AVX-512 CPU differed by 3.6e-7) is bounded in absolute terms, not relative.
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch CPU half-precision path")
def test_torch_half_precision_attention_is_float32_attention_rounded_once():
    """bfloat16 q, k, v on CPU: output and gradients are the float64 values rounded to bfloat16
    (within one bfloat16 unit, 2**-8 relative), in bfloat16."""
    import torch

    from ibot_keras import backend_specific

    gen = torch.Generator().manual_seed(4)
    q, k, v, g = (torch.randn(2, 3, 37, 16, generator=gen).bfloat16() for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = backend_specific.attention(*leaves, 0.25)
    out.backward(g)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.softmax(exact[0] @ exact[1].transpose(-1, -2) * 0.25, -1) @ exact[2]
    want.backward(g.double())
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in leaves)
    for got, ref in [(out, want)] + [(a.grad, b.grad) for a, b in zip(leaves, exact)]:
        err = (got.double() - ref.detach()).abs()
        assert bool((err <= 2.0**-8 * ref.detach().abs() + 1e-6).all()), float(err.max())


def test_gelu_gives_the_exact_values_and_derivative():
    import math

    from conftest import value_and_grad

    from ibot_keras import backend_specific

    x = np.linspace(-6.0, 6.0, 97).astype("float32")
    exact = np.array([0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))) for t in x.astype("float64")])
    derivative = np.array([0.5 * (1.0 + math.erf(t / math.sqrt(2.0))) + t * math.exp(-t * t / 2.0) / math.sqrt(2.0 * math.pi)
                           for t in x.astype("float64")])
    # float32 rounding of values up to 6 in size: ~1e-6 absolute.
    np.testing.assert_allclose(to_numpy(backend_specific.gelu(keras.ops.convert_to_tensor(x))), exact, rtol=1e-6, atol=2e-6)
    _, (grad,) = value_and_grad(lambda t: keras.ops.sum(backend_specific.gelu(t)), x)
    np.testing.assert_allclose(grad, derivative, rtol=1e-5, atol=2e-6)


def test_computed_once_keeps_the_flag():
    from ibot_keras.models.skipped_steps import computed_once

    for flag in (True, False):
        assert bool(to_numpy(computed_once(keras.ops.convert_to_tensor(flag)))) is flag


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the size of XLA's compiled optimizer step")
def test_skip_flag_is_not_copied_into_every_variable_update():
    # XLA used to copy the skip flag's chain (one isfinite per gradient) into each variable's
    # update fusion: n^2 isfinite ops for n variables (in the baseline-cpu step, 390k of its
    # 473k HLO instructions). Computed once, there is one per gradient plus one per update.
    import jax

    from ibot_keras.optimizers import IBOTAdamW

    n = 40
    variables = [keras.Variable(np.full((4, 3), i, "float32"), name=f"v{i}") for i in range(n)]
    optimizer = IBOTAdamW(learning_rate=1e-3, clip_grad=0.0)
    optimizer.build(variables)

    def update(optimizer_values, grads, values):
        return optimizer.stateless_apply(optimizer_values, grads, values)[0]

    grads = [np.ones((4, 3), "float32")] * n
    compiled = jax.jit(update).lower([v.value for v in optimizer.variables], grads, [v.value for v in variables]).compile()
    assert compiled.as_text().count(" is-finite(") <= 2 * n + 4
