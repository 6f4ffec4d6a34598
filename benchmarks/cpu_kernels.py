"""What this CPU gives the step's building blocks: matrix-product rates and memory bandwidth.

    python benchmarks/cpu_kernels.py            # JAX and torch, all threads
    taskset -c 0 python benchmarks/cpu_kernels.py   # one core

Times (median of 10 after a warm-up) the baseline-cpu step's matrix products in JAX (XLA:CPU)
and torch: the head's 3152 x 2048 x 2048 and ViT-T's 3152 x 192 x 768 products, the prototype
product 1568 x 256 x 8192, and the per-head attention products of 16 crops x 3 heads of 197
tokens of 64 (``q k^T``, ``p v``, ``p^T g``), in GFLOP/s; and an elementwise multiply over a
39-MB float32 array in GB/s (read + write), the bandwidth that bounds LayerNorm, GELU and
softmax work on arrays of that size. Quote the CPU model and the date with the figures.
"""

import statistics
import time

import numpy as np

PRODUCTS = {"head 3152x2048x2048": (3152, 2048, 2048), "ViT fc1 3152x192x768": (3152, 192, 768),
            "prototypes 1568x256x8192": (1568, 256, 8192)}
B, H, T, D = 16, 3, 197, 64
ARRAY = 3152 * 768 * 4  # floats: 39 MB


def _median_s(fn, sync):
    sync(fn())
    times = []
    for _ in range(10):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    out = {}
    matmul = jax.jit(lambda a, b: a @ b)
    for name, (m, k, n) in PRODUCTS.items():
        a, b = jnp.asarray(rng.standard_normal((m, k), "float32")), jnp.asarray(rng.standard_normal((k, n), "float32"))
        out[name] = 2 * m * k * n / _median_s(lambda: matmul(a, b), jax.block_until_ready) / 1e9
    q, k = (jnp.asarray(rng.standard_normal((B, H, T, D), "float32")) for _ in range(2))
    p = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2))
    flop = 2 * B * H * T * T * D
    for name, fn, args in (("attention q k^T", lambda q, k: q @ jnp.swapaxes(k, -1, -2), (q, k)),
                           ("attention p v", lambda p, v: p @ v, (p, k)),
                           ("attention p^T g", lambda p, g: jnp.swapaxes(p, -1, -2) @ g, (p, k))):
        jitted = jax.jit(fn)
        out[name] = flop / _median_s(lambda: jitted(*args), jax.block_until_ready) / 1e9
    x = jnp.ones((ARRAY,), jnp.float32)
    double = jax.jit(lambda x: x * 2)
    out["multiply 39 MB (GB/s)"] = 8 * ARRAY / _median_s(lambda: double(x), jax.block_until_ready) / 1e9
    return out


def _torch():
    import torch

    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        for name, (m, k, n) in PRODUCTS.items():
            a, b = torch.randn(m, k), torch.randn(k, n)
            out[name] = 2 * m * k * n / _median_s(lambda: a @ b, lambda r: r) / 1e9
        q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        flop = 2 * B * H * T * T * D
        out["attention q k^T"] = flop / _median_s(lambda: q @ k.transpose(-1, -2), lambda r: r) / 1e9
        out["attention p v"] = flop / _median_s(lambda: p @ k, lambda r: r) / 1e9
        out["attention p^T g"] = flop / _median_s(lambda: p.transpose(-1, -2) @ k, lambda r: r) / 1e9
        x = torch.ones(ARRAY)
        out["multiply 39 MB (GB/s)"] = 8 * ARRAY / _median_s(lambda: x * 2, lambda r: r) / 1e9
    return out


def main():
    import importlib.util

    results = {}
    for name, run in (("jax", _jax), ("torch", _torch)):
        if importlib.util.find_spec(name):
            results[name] = run()
    rows = list(next(iter(results.values())))
    print(f"{'GFLOP/s (last row GB/s)':<28}" + "".join(f"{b:>10}" for b in results))
    for row in rows:
        print(f"{row:<28}" + "".join(f"{results[b][row]:>10.0f}" for b in results))


if __name__ == "__main__":
    main()
