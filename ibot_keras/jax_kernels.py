"""JAX-only kernels with hand-written backward passes, for ``backend_specific.dense`` and
``backend_specific.attention`` (imported only when the backend is JAX). The same values as
autodiff; XLA:CPU compiles them without the transposed activation copies of the autodiff
backward (figures in ``backend_specific``'s docstrings)."""

import functools

import jax


def dense_backward(x, kernel, g):
    """``(dx, dkernel, g2)`` of ``x @ kernel`` for the output gradient ``g`` ``(..., D_out)``, on
    the flattened ``(tokens, D)`` arrays (``g2``: ``g`` flattened, for the bias gradient)."""
    x2, g2 = x.reshape((-1, x.shape[-1])), g.reshape((-1, g.shape[-1]))
    return g @ kernel.T, x2.T @ g2, g2


@jax.custom_vjp
def dense(x, kernel, bias):
    """``x @ kernel + bias``: ``(..., D_in) -> (..., D_out)``."""
    return x @ kernel + bias


def _dense_forward(x, kernel, bias):
    return x @ kernel + bias, (x, kernel)


def _dense_grads(residuals, g):
    dx, dkernel, g2 = dense_backward(*residuals, g)
    return dx, dkernel, g2.sum(axis=0)


dense.defvjp(_dense_forward, _dense_grads)


@jax.custom_vjp
def dense_no_bias(x, kernel):
    """``x @ kernel``: ``(..., D_in) -> (..., D_out)``."""
    return x @ kernel


def _dense_no_bias_forward(x, kernel):
    return x @ kernel, (x, kernel)


def _dense_no_bias_grads(residuals, g):
    dx, dkernel, _ = dense_backward(*residuals, g)
    return dx, dkernel


dense_no_bias.defvjp(_dense_no_bias_forward, _dense_no_bias_grads)


def _attention_probs(q, k, scale):
    return jax.nn.softmax((q @ jax.numpy.swapaxes(k, -1, -2)) * scale, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q, k, v, scale):
    """``softmax(q @ k^T * scale) @ v``: ``(B, H, T, d) x 3 -> (B, H, T, d)``; the backward is
    ``dv = p^T g``, ``ds = p * (g v^T - rowsum(g v^T * p)) * scale``, ``dq = ds k``, ``dk = ds^T q``."""
    return _attention_probs(q, k, scale) @ v


def _attention_forward(q, k, v, scale):
    probs = _attention_probs(q, k, scale)
    return probs @ v, (q, k, v, probs)


def _attention_grads(scale, residuals, g):
    q, k, v, probs = residuals
    swap = functools.partial(jax.numpy.swapaxes, axis1=-1, axis2=-2)
    dprobs = g @ swap(v)
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale
    return dscores @ k, swap(dscores) @ q, swap(probs) @ g


attention.defvjp(_attention_forward, _attention_grads)


_HALF_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x):
    """Exact GELU ``0.5 x (1 + erf(x / sqrt(2)))``, elementwise; the backward keeps only ``x``
    and recomputes ``Phi(x) + x phi(x)`` (autodiff keeps two more arrays of ``x``'s size)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jax.numpy.asarray(_HALF_SQRT2, x.dtype)))


def _gelu_forward(x):
    return gelu(x), x


def _gelu_grads(x, g):
    # erf is odd (XLA's erf is an odd rational function, so erf(-z) == -erf(z) exactly): the
    # forward's erf(z) is recomputed here instead of being merged with it by XLA's CSE and
    # kept alive from the forward to the backward.
    cdf = 0.5 * (1.0 - jax.lax.erf(-x * jax.numpy.asarray(_HALF_SQRT2, x.dtype)))
    pdf = jax.numpy.exp(-0.5 * x * x) * jax.numpy.asarray(_INV_SQRT_2PI, x.dtype)
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_forward, _gelu_grads)
