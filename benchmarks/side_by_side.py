"""The official iBOT training step and ours on every backend, back to back on this machine.

    python benchmarks/side_by_side.py                      # fp32, then mixed_bfloat16 for ours
    python benchmarks/side_by_side.py --no-bf16 --steps 6 --out results.json
    python benchmarks/side_by_side.py --no-bf16 --rounds 2    # the sequence twice: the ratios' spread

A speed figure is a ratio of two things run on the same machine in the same run: this command
first times the unmodified official step (``../shared/official_ref/harness/bench_train_step.py``,
or ``--official PATH``; fp32, as many threads as this machine has cores), then
``benchmarks/train_step.py --config baseline-cpu`` per backend in float32 and (unless
``--no-bf16``) ``mixed_bfloat16``, each in its own process, and prints images/s, the ratio to
the official fp32 step, and peak RSS next to the official's (with ``--remat``, also each
backend in float32 with ``PretrainConfig(remat=True)``). If the official harness is not
there, it says so and prints ours alone. Unless ``--no-official-kept``, the official step runs
a second time with glibc keeping freed memory in its heap (``GLIBC_TUNABLES``), as ibot_keras
sets up on torch and TensorFlow (docs/training.md): a row for reference; the ratios stay
against the official step as shipped. On a shared machine the speed drifts within minutes:
``--rounds N`` repeats the whole sequence, takes each ratio against the official step of its own
round, and prints the median ratio with those of every round. Figures from other machines or
runs are not comparable: quote the CPU model and date printed at the top.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OFFICIAL = os.path.normpath(
    os.path.join(HERE, os.pardir, os.pardir, "shared", "official_ref", "harness", "bench_train_step.py")
)
BACKENDS = ("jax", "torch", "tensorflow")


def cpu_model():
    """``lscpu``'s model name (else ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def last_json(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


# glibc's tunables for what ``backend_specific.keep_freed_host_memory`` sets at run time.
KEPT_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def run_official(path, warmup, steps, threads, env=None):
    command = [sys.executable, path, "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads), "--quiet"]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    result = last_json(out.stdout)
    if out.returncode or result is None:
        raise RuntimeError(f"the official harness failed:\n{out.stderr[-3000:]}")
    return result


def run_ours(backend, policy, warmup, steps, remat=False):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, os.path.join(HERE, "train_step.py"), "--config", "baseline-cpu", "--backend", backend,
               "--policy", policy, "--warmup", str(warmup), "--steps", str(steps), "--json"] + (["--remat"] if remat else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    result = last_json(out.stdout)
    if out.returncode or result is None:
        print(f"{backend} {policy}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", default=DEFAULT_OFFICIAL, help="the official harness script")
    parser.add_argument("--backend", default="all", help="jax, torch, tensorflow or all")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the mixed_bfloat16 runs")
    parser.add_argument("--no-official-kept", dest="official_kept", action="store_false",
                        help="skip the reference run of the official step with glibc keeping freed memory")
    parser.add_argument("--remat", action="store_true",
                        help="also time each backend in float32 with PretrainConfig(remat=True)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sequence; each ratio is to its own round's official step, and the "
                             "table prints the medians and the ratio of every round")
    parser.add_argument("--out", help="also write every result as JSON to this file")
    args = parser.parse_args()
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    threads = os.cpu_count() or 1

    print(f"{datetime.date.today()} · {cpu_model()} · {threads} cores · baseline-cpu (ViT-T/16, out_dim 8192, "
          f"batch 8, 2 x 224 + 2 x 96): median of {args.steps} timed steps after {args.warmup} warm-up steps")
    have_official = os.path.isfile(args.official)
    if not have_official:
        print(f"The official harness is not at {args.official} (pass --official PATH): ours alone, no ratios.")
    runs = [("float32", False)] + ([("mixed_bfloat16", False)] if args.bf16 else []) + ([("float32", True)] if args.remat else [])
    rows = []
    for round_index in range(args.rounds):
        official = None
        if have_official:
            official = run_official(args.official, args.warmup, args.steps, threads)
            rows.append(timed_row("official (PyTorch)", "float32", official, official, round_index))
            if args.official_kept:
                kept = run_official(args.official, args.warmup, args.steps, threads,
                                    env=dict(os.environ, GLIBC_TUNABLES=KEPT_FREED_MEMORY))
                rows.append(timed_row("official, glibc kept", "float32", kept, official, round_index))
        for policy, remat in runs:
            for backend in backends:
                result = run_ours(backend, policy, args.warmup, args.steps, remat)
                if result is not None:
                    name = f"ibot_keras {backend}" + (", remat" if remat else "")
                    rows.append(timed_row(name, policy, result, official, round_index))

    summary = summarise(rows)
    spread = args.rounds > 1
    print(f"{'':<29} {'policy':<15} {'images/s':>9} {'vs official fp32':>17} {'peak RSS MB':>12} {'RSS vs official':>16}"
          + (f"  {'ratio per round':<20}" if spread else ""))
    for row in summary:
        speed = "" if row["vs_official"] is None else f"{row['vs_official']:.2f}x"
        rss = "" if row["rss_vs_official"] is None else f"{row['rss_vs_official']:.2f}x"
        line = (f"{row['name']:<29} {row['policy']:<15} {row['images_per_s']:>9.2f} {speed:>17} "
                f"{row['peak_rss_mb']:>12.0f} {rss:>16}")
        if spread and row["vs_official_per_round"]:
            line += "  " + " ".join(f"{r:.2f}x" for r in row["vs_official_per_round"])
        print(line)
    if spread:
        print(f"Medians over {args.rounds} rounds; each ratio is to the official step of its own round.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": str(datetime.date.today()), "cpu": cpu_model(), "cores": threads, "rounds": args.rounds,
                       "summary": summary, "rows": rows}, f, indent=2)


def timed_row(name, policy, result, official, round_index):
    """One timed run, with its ratios to the official step of the same round (None without it)."""
    return {"name": name, "policy": policy, "round": round_index, "images_per_s": result["images_per_s"],
            "peak_rss_mb": result["peak_rss_mb"],
            "vs_official": None if official is None else result["images_per_s"] / official["images_per_s"],
            "rss_vs_official": None if official is None else result["peak_rss_mb"] / official["peak_rss_mb"],
            "result": result}


def summarise(rows):
    """One row per (name, policy), in first-seen order: median images/s and speed ratio over the
    rounds, the ratios per round, the highest peak RSS and the median RSS ratio."""
    groups = {}
    for row in rows:
        groups.setdefault((row["name"], row["policy"]), []).append(row)
    summary = []
    for (name, policy), group in groups.items():
        ratios = [r["vs_official"] for r in group if r["vs_official"] is not None]
        rss_ratios = [r["rss_vs_official"] for r in group if r["rss_vs_official"] is not None]
        summary.append({
            "name": name, "policy": policy, "rounds": len(group),
            "images_per_s": statistics.median(r["images_per_s"] for r in group),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
            "vs_official": statistics.median(ratios) if ratios else None,
            "vs_official_per_round": ratios,
            "rss_vs_official": statistics.median(rss_ratios) if rss_ratios else None,
        })
    return summary


if __name__ == "__main__":
    main()
