"""Where the JAX step's resident memory goes: runtime, model, compiled step, per-step buffers.

    KERAS_BACKEND=jax python benchmarks/jax_memory.py [--config baseline-cpu] [--depth N] [--json]

Builds ``train_step.py``'s model and batches, then prints the resident set size (RSS, after
``gc.collect()`` and glibc's ``malloc_trim(0)``, so that freed memory is not counted) at each
stage: after the imports, after building the model, after compiling the step (XLA's own
buffer assignment is printed beside it: arguments, outputs and temporaries of one step, and the
size of its optimised HLO: instructions, fusions, constant bytes), the
peak of the steps that follow (``VmHWM``, reset after compilation), and after
``jax.clear_caches()`` has dropped the compiled step. Linux only (``/proc``, glibc).
"""

import argparse
import collections
import ctypes
import gc
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return None


def _trimmed_rss_mb():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_mb("VmRSS")


def largest_computations(hlo, top=3):
    """The ``top`` computations (fused and called ones; not the entry) of an HLO module's text
    with the most instructions: ``[(name, instructions, [(op_name, count), ...])]``, their three
    most frequent metadata op names with digits folded to ``#``. A fusion of hundreds of
    instructions of one or two kinds is usually a small computation that XLA copied into it
    (the skip flag's chain, before commit 319c75f)."""
    rows = []
    for block in re.split(r"\n(?=\S)", hlo):
        header = block.split("\n", 1)[0]
        if not header.startswith("%") or not header.rstrip().endswith("{"):
            continue
        count = sum(1 for line in block.split("\n")[1:] if " = " in line)
        names = collections.Counter(re.sub(r"\d+", "#", name) for name in re.findall(r'op_name="([^"]+)"', block))
        rows.append((header.split(" ")[0], count, names.most_common(3)))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu")
    parser.add_argument("--steps", type=int, default=3, help="steps after compilation")
    parser.add_argument("--depth", type=int, default=None, help="the ViT's depth instead of the config's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("jax_memory.py measures the JAX step: run it with KERAS_BACKEND=jax.")
    import jax

    from train_step import build_model_and_batches, run_steps

    import train_step

    config_name = args.config
    if args.depth is not None:
        config_name = f"{args.config}-depth{args.depth}"
        train_step.CONFIGS[config_name] = dict(train_step.CONFIGS[args.config], depth=args.depth)
    rows = {"after imports (Python, JAX, Keras)": _trimmed_rss_mb()}
    model, config, batches = build_model_and_batches(config_name)
    rows["after building the model and batches"] = _trimmed_rss_mb()
    float(model.train_on_batch(batches[0], return_dict=True)["loss"])
    rows["after compiling and running one step"] = _trimmed_rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    run_steps(model, batches[1 % len(batches)], args.steps)
    rows["peak during the next steps"] = _status_mb("VmHWM")

    x = jax.tree_util.tree_map(jax.numpy.asarray, batches[0])
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables, model.optimizer.variables, model.metrics_variables))
    compiled = jax.jit(model.train_step).lower(state, (x,)).compile()
    stats = compiled.memory_analysis()
    hlo = compiled.as_text()
    constant_bytes = 0
    for match in re.finditer(r"= (\w+)\[([\d,]*)\]\S* constant\(", hlo):
        dims = [int(d) for d in match.group(2).split(",") if d]
        bits = int(re.sub(r"\D", "", match.group(1)) or 8)  # "pred" (bool) is one byte
        constant_bytes += math.prod(dims) * max(1, bits // 8)
    program = {"hlo_instructions": sum(1 for line in hlo.split("\n") if " = " in line),
               "fusions": hlo.count(" fusion("), "constants_mb": constant_bytes / 2**20,
               "largest_computations": largest_computations(hlo)}
    del compiled, hlo
    xla = {
        "arguments": stats.argument_size_in_bytes / 2**20,
        "outputs": stats.output_size_in_bytes / 2**20,
        "temporaries": stats.temp_size_in_bytes / 2**20,
    }
    jax.clear_caches()
    rows["after jax.clear_caches() (compiled steps dropped)"] = _trimmed_rss_mb()
    if args.json:
        print(json.dumps({"config": config_name, "rss_mb": rows, "xla_buffers_mb": xla, "program": program}))
        return
    for name, value in rows.items():
        print(f"{name:<52} {value:7.0f} MB")
    print("XLA buffer assignment of one step: " + ", ".join(f"{k} {v:.0f} MB" for k, v in xla.items()))
    print(f"optimised HLO of the step: {program['hlo_instructions']} instructions, {program['fusions']} fusions, "
          f"constants {program['constants_mb']:.2f} MB")
    for name, count, names in program["largest_computations"]:
        print(f"  {name}: {count} instructions, most of them " + ", ".join(f"{n} x{c}" for n, c in names))


if __name__ == "__main__":
    main()
