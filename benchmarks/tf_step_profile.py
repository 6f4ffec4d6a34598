"""Where the TensorFlow training step's time goes, from TensorFlow's profiler.

    KERAS_BACKEND=tensorflow python benchmarks/tf_step_profile.py [--config baseline-cpu] [--policy mixed_bfloat16]

Runs ``train_on_batch`` on ``train_step.py``'s data (warm-up first), profiles ``--steps`` steps
with ``tf.profiler.experimental`` and reads the profile's per-op table (the "framework op
stats" of TensorBoard's profile plugin, converted by TensorFlow's own profiler library). Prints
each op type's own time per step in groups: matrix products (``MatMul``, ``BatchMatMul``,
oneDNN's ``_Mkl`` forms), the rest (elementwise work, reductions, layout ops), and ``IDLE``.
TensorFlow's graph runs independent ops at the same time on its inter-op threads, so the own
times can add up to more than the wall time printed beside them.
"""

import collections
import glob
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_step import profile_parser, run_steps, warmed_up  # noqa: E402


def group(op_type):
    """``products``, ``idle`` or ``other`` for a TensorFlow op type."""
    if "MatMul" in op_type:
        return "products"
    return "idle" if op_type == "IDLE" else "other"


def op_table(tools_data):
    """The framework-op-stats table (JSON bytes of the profile plugin) as a list of row dicts."""
    table = json.loads(tools_data)
    table = table[0] if isinstance(table, list) else table
    columns = [c["id"] for c in table["cols"]]
    return [dict(zip(columns, [cell.get("v") if cell else None for cell in row["c"]])) for row in table["rows"]]


def summarise(rows, steps, top=12):
    """Per-step ms by group and by op type (from ``total_self_time`` in us), the longest first."""
    groups, types = collections.Counter(), collections.Counter()
    for row in rows:
        ms = float(row["total_self_time"]) / 1e3 / steps
        groups[group(row["type"])] += ms
        types[row["type"]] += ms
    return dict(groups_ms={k: round(v, 2) for k, v in groups.most_common()},
                top_types_ms={k: round(v, 2) for k, v in types.most_common(top)})


def main():
    args = profile_parser(__doc__).parse_args()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("tf_step_profile.py profiles the TensorFlow step: run it with KERAS_BACKEND=tensorflow.")
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    model, batch = warmed_up(args.config, args.policy, args.warmup)
    folder = tempfile.mkdtemp(prefix="ibot_tf_profile_")
    tf.profiler.experimental.start(folder)
    wall_ms = run_steps(model, batch, args.steps)
    tf.profiler.experimental.stop()
    xplanes = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(xplanes, "framework_op_stats", {})
    if not ok:
        raise SystemExit(f"TensorFlow could not read its profile in {folder}.")
    summary = summarise(op_table(data), args.steps, args.top)
    summary.update(config=args.config, policy=keras.config.dtype_policy().name, tensorflow=tf.__version__,
                   wall_ms_profiled=round(wall_ms, 1))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"step {wall_ms:.0f} ms under the profiler (TensorFlow {tf.__version__}, {summary['policy']}); "
          f"own time of the ops, per step:")
    for name, ms in summary["groups_ms"].items():
        print(f"  {name:<10} {ms:7.1f} ms")
    print("op types with the most own time (per step):")
    for name, ms in summary["top_types_ms"].items():
        print(f"  {ms:7.1f} ms {name}")


if __name__ == "__main__":
    main()
