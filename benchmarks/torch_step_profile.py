"""Where the PyTorch (eager) training step's time goes, from ``torch.profiler``.

    KERAS_BACKEND=torch python benchmarks/torch_step_profile.py [--config baseline-cpu] [--policy mixed_bfloat16]
    KERAS_BACKEND=torch python benchmarks/torch_step_profile.py --phases --steps 6   # phase wall times, no profiler

Runs ``train_on_batch`` on ``train_step.py``'s data (warm-up first), profiles ``--steps`` steps
and sums each ATen op's own time (without the ops it calls) per step, in four groups: matrix
products (``mm``, ``addmm``, ``bmm``; with their GFLOP from the input shapes), attention
(the fused ``scaled_dot_product_attention`` kernels, forward and backward), copies and casts
(``copy_``, ``_to_copy``: an ``addmm`` also copies its bias into the output first) and the
rest (elementwise work, reductions, normalisations, the optimizer's ``_foreach`` ops). The
wall time of the steps beside it shows the time outside ATen ops (Python, Keras, autograd).
Eager torch runs one op at a time, each on every core, so the groups add up to the op time.
"""

import collections
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_step import profile_parser, run_steps, warmed_up  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")
COPIES = ("aten::copy_", "aten::_to_copy")


def group(name):
    """The group of an ATen op name: ``products``, ``attention``, ``copies`` or ``other``."""
    if name in PRODUCTS:
        return "products"
    if "scaled_dot_product" in name:
        return "attention"
    if name in COPIES:
        return "copies"
    return "other"


def product_gflop(name, shapes):
    """GFLOP of one call of a matrix product from its input shapes (``[[M, K], [K, N]]``; ``addmm``
    has the bias first; ``bmm`` a batch axis); 0 for any other op or unknown shapes."""
    shapes = [s for s in shapes if s]
    if name == "aten::addmm":
        shapes = shapes[1:]
    if name not in PRODUCTS or len(shapes) < 2 or len(shapes[0]) < 2 or len(shapes[1]) < 2:
        return 0.0
    a, b = shapes[0], shapes[1]
    batch = math.prod(a[:-2]) if len(a) > 2 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1] / 1e9


def summarise(rows, steps, top=12):
    """``rows``: ``(op name, input shapes, calls, own time in us)`` over ``steps`` steps. Returns
    per-step ms by group, product GFLOP, and the longest ``(op, shapes)`` with GFLOP/s."""
    groups, gflop, by_shape = collections.Counter(), 0.0, []
    for name, shapes, calls, self_us in rows:
        ms = self_us / 1e3 / steps
        groups[group(name)] += ms
        flop = product_gflop(name, shapes) * calls / steps
        gflop += flop
        by_shape.append(dict(op=name, shapes=shapes, ms=round(ms, 2), calls=calls // steps,
                             gflop_per_s=round(flop / (ms / 1e3), 2) if flop and ms else None))
    by_shape.sort(key=lambda r: -r["ms"])
    return dict(groups_ms={k: round(v, 2) for k, v in groups.most_common()}, product_gflop=round(gflop, 2),
                top=by_shape[:top])


def phase_times(model, batch, steps):
    """Wall ms per step of the step's phases, without the profiler (eager torch runs each op
    when called, so timing the Python calls times the work): ``forward`` (``model.call``),
    ``loss``, ``backward`` (autograd), ``optimizer`` (``apply``), ``after_step`` (EMA, skip
    bookkeeping) and ``rest`` (Keras' train step around them)."""
    import time

    import torch

    totals = collections.Counter()

    def timed(function, label):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return wrapper

    patches = [(model, "call", "forward"), (model, "compute_loss", "loss"), (model.optimizer, "apply", "optimizer"),
               (model, "after_optimizer_step", "after_step")]
    for owner, name, label in patches:
        setattr(owner, name, timed(getattr(owner, name), label))
    backward = torch.Tensor.backward
    torch.Tensor.backward = timed(backward, "backward")
    try:
        wall_ms = run_steps(model, batch, steps)
    finally:
        torch.Tensor.backward = backward
        for owner, name, _ in patches:
            delattr(owner, name)
    phases = {label: round(seconds * 1e3 / steps, 1) for label, seconds in totals.items()}
    phases["rest"] = round(wall_ms - sum(phases.values()), 1)
    return dict(step_ms=round(wall_ms, 1), phases_ms=phases)


def main():
    parser = profile_parser(__doc__)
    parser.add_argument("--phases", action="store_true",
                        help="time the step's phases without the profiler instead (phase_times)")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "torch":
        raise SystemExit("torch_step_profile.py profiles the torch step: run it with KERAS_BACKEND=torch.")
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, batch = warmed_up(args.config, args.policy, args.warmup)
    if args.phases:
        result = phase_times(model, batch, args.steps)
        result.update(config=args.config, policy=keras.config.dtype_policy().name, torch=torch.__version__)
        print(json.dumps(result) if args.json else
              f"step {result['step_ms']:.0f} ms: " + ", ".join(f"{k} {v:.0f} ms" for k, v in result["phases_ms"].items()))
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        wall_ms = run_steps(model, batch, args.steps)
    rows = [(e.key, [list(s) for s in e.input_shapes], e.count, e.self_cpu_time_total)
            for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    summary = summarise(rows, args.steps, args.top)
    summary.update(config=args.config, policy=keras.config.dtype_policy().name, torch=torch.__version__,
                   threads=torch.get_num_threads(), wall_ms_profiled=round(wall_ms, 1))
    if args.json:
        print(json.dumps(summary))
        return
    ops_ms = sum(summary["groups_ms"].values())
    print(f"step {wall_ms:.0f} ms under the profiler (torch {torch.__version__}, {summary['threads']} threads, "
          f"{summary['policy']}); ATen ops {ops_ms:.0f} ms, outside them {wall_ms - ops_ms:.0f} ms")
    for name, ms in summary["groups_ms"].items():
        extra = f"  ({summary['product_gflop']:.1f} GFLOP, {summary['product_gflop'] / ms * 1e3:.0f} GFLOP/s)" \
            if name == "products" and ms else ""
        print(f"  {name:<10} {ms:7.1f} ms{extra}")
    print("longest ops (per step):")
    for r in summary["top"]:
        rate = f"{r['gflop_per_s']:6.0f} GFLOP/s" if r["gflop_per_s"] else " " * 13
        print(f"  {r['ms']:6.1f} ms {r['calls']:4d} x {r['op']:<44} {rate}  {str(r['shapes'])[:70]}")


if __name__ == "__main__":
    main()
