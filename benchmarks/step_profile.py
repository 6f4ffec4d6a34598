"""Where the JAX training step's wall time goes, from a ``jax.profiler`` trace of whole steps.

    KERAS_BACKEND=jax python benchmarks/step_profile.py [--config baseline-cpu] [--steps 2] [--top 15]

Runs ``train_on_batch`` on ``train_step.py``'s data (warm-up first), traces ``--steps`` steps
and reads the trace (Perfetto JSON) with the compiled step's optimised HLO (dumped by XLA for
the op names and shapes). Every 0.1 ms of a step is shared among the XLA ops running in it,
so the rows add up to the step's wall time. Rows: teacher / student / loss / other (centers,
optimizer, EMA), forward or backward (``transpose(...)`` in the op name), and matrix products
(XLA:CPU's YNNPACK fusions and dots, with their GFLOP from the HLO) or elementwise / reduction
fusions; then idle time (no XLA op running, e.g. Python between steps) and the ops that took
longest. ``--trace DIR`` keeps the trace (TensorBoard / Perfetto) and the HLO there.
"""

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
_SLOT_US = 100


def _hlo_ops(text):
    """``{op name: (op_name metadata, output shape, GFLOP of its dots)}`` of an optimised HLO module."""
    computations, current, ops = {}, None, {}
    for line in text.split("\n"):
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = computations.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)

    def dot_gflop(lines, only=None):
        shapes, total = {}, 0.0
        for line in lines:
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])", line)
            if m:
                shapes[m.group(1)] = [int(d) for d in re.findall(r"\d+", m.group(2).split("[")[1])]
        for line in lines:
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+)", line)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            if not (m and contracting) or (only is not None and m.group(1) != only):
                continue
            flops = 2.0
            for d in m.group(2).split(","):
                flops *= int(d) if d else 1
            for i in filter(None, contracting.group(1).split(",")):
                flops *= shapes.get(m.group(3), [1] * 8)[int(i)]
            total += flops
        return total / 1e9

    for lines in computations.values():
        for line in lines:
            m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) (\w+)\(", line)
            if not m:
                continue
            meta = re.search(r'op_name="([^"]*)"', line)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            gflop = dot_gflop(computations.get(called.group(1), [])) if called else 0.0
            if m.group(3) == "dot":
                gflop = dot_gflop(lines, only=m.group(1))
            ops[m.group(1)] = (meta.group(1) if meta else "", m.group(2), gflop)
    return ops


def _row(name, op_name):
    part = next((p for p in ("teacher", "student", "ibot_loss") if p in op_name), "other")
    kind = "matmul" if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")) else "elementwise"
    return part.replace("ibot_", ""), "backward" if "transpose(" in op_name else "forward", kind


def attribute(trace_events, hlo_ops):
    """Per step: ``{"wall_ms", "idle_ms", "busy_threads_ms", "rows": {(part, pass, kind): ms}, "ops": {name: ms}}``."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace_events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in trace_events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if "train_on_batch" in e["name"]), key=lambda e: e["ts"])
    leaves = [e for e in spans if e["name"] in hlo_ops and "python" not in threads.get((e["pid"], e["tid"]), "")]
    results = []
    for step in steps:
        start, slots = step["ts"], max(1, math.ceil(step["dur"] / _SLOT_US))
        running = [[] for _ in range(slots)]
        for e in leaves:
            if start <= e["ts"] < start + step["dur"]:
                first = int((e["ts"] - start) / _SLOT_US)
                for i in range(first, min(slots, max(first + 1, int((e["ts"] + e["dur"] - start) / _SLOT_US)))):
                    running[i].append(e)
        rows, ops, busy = collections.Counter(), collections.Counter(), collections.Counter()
        for names in running:
            busy[len({(e["pid"], e["tid"]) for e in names})] += _SLOT_US / 1e3
            for e in names:
                share = _SLOT_US / 1e3 / len(names)
                rows[_row(e["name"], hlo_ops[e["name"]][0])] += share
                ops[e["name"]] += share
        results.append(dict(wall_ms=step["dur"] / 1e3, idle_ms=busy.pop(0, 0.0), busy_threads_ms=dict(busy),
                            rows=rows, ops=ops))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu")
    parser.add_argument("--steps", type=int, default=2, help="traced steps (the last one is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", help="keep the trace and the HLO in this folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = args.trace or tempfile.mkdtemp(prefix="ibot_profile_")
    hlo_dir = os.path.join(folder, "hlo")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={hlo_dir} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*train.* --xla_dump_hlo_pass_re=^$").strip()
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("step_profile.py profiles the JAX step: run it with KERAS_BACKEND=jax.")
    import jax

    from train_step import build_model_and_batches

    model, _, batches = build_model_and_batches(args.config, num_batches=1)
    batch = batches[0]
    for _ in range(args.warmup):
        float(model.train_on_batch(batch, return_dict=True)["loss"])
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(args.steps):
            float(model.train_on_batch(batch, return_dict=True)["loss"])
    hlo_files = sorted(glob.glob(os.path.join(hlo_dir, "*train*cpu_after_optimizations.txt")), key=os.path.getsize)
    if not hlo_files:
        raise SystemExit(f"XLA wrote no optimised HLO of the step under {hlo_dir}.")
    hlo_ops = _hlo_ops(open(hlo_files[-1]).read())
    trace_file = glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    step = attribute(events, hlo_ops)[-1]
    matmul_ms = sum(ms for (_, _, kind), ms in step["rows"].items() if kind == "matmul")
    gflop = sum(hlo_ops[name][2] for name in step["ops"])
    summary = dict(config=args.config, wall_ms=round(step["wall_ms"], 1), idle_ms=round(step["idle_ms"], 1),
                   busy_threads_ms={k: round(v, 1) for k, v in sorted(step["busy_threads_ms"].items())},
                   matmul_gflop=round(gflop, 1), matmul_ms=round(matmul_ms, 1),
                   rows={" / ".join(k): round(v, 1) for k, v in sorted(step["rows"].items(), key=lambda kv: -kv[1])},
                   top_ops=[dict(op=n, ms=round(ms, 1), shape=hlo_ops[n][1], gflop=round(hlo_ops[n][2], 2),
                                 op_name=hlo_ops[n][0]) for n, ms in step["ops"].most_common(args.top)])
    if args.json:
        print(json.dumps(summary))
        return
    print(f"step {summary['wall_ms']:.0f} ms (jax {jax.__version__}); no XLA op running {summary['idle_ms']:.0f} ms; "
          "ms with 1 / 2 / ... threads running ops: " + ", ".join(f"{v:.0f}" for v in summary["busy_threads_ms"].values()))
    print(f"matrix products: {gflop:.1f} GFLOP in {matmul_ms:.0f} ms of the step")
    for name, ms in summary["rows"].items():
        print(f"  {name:<36} {ms:7.1f} ms")
    print("longest ops:")
    for op in summary["top_ops"]:
        print(f"  {op['ms']:6.1f} ms {op['op']:<26} {op['shape']:<28} {op['gflop']:6.2f} GFLOP  {op['op_name'][-70:]}")
    if args.trace:
        print(f"trace and HLO kept in {folder}")


if __name__ == "__main__":
    main()
