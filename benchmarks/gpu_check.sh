#!/usr/bin/env bash
# GPU readiness check (issue 18, item 4), under 8 minutes on one NVIDIA GPU with CUDA builds of JAX and torch:
#   a. trajectory A (backends_tests/test_trajectory.py) and the cross-backend parity scenario
#      (backends_tests/parity_run.py, compared with test_parity.py's own assertions) ON THE GPU, JAX and torch;
#   b. the vit-s16-gpu step (benchmarks/train_step.py: ViT-S/16, 2x224 + 10x96, batch 64, mixed_bfloat16),
#      images/s per backend (jax, torch; tensorflow only if installed);
#   c. the official iBOT step on the same GPU in fp16 AMP (benchmarks/official_gpu_step.py);
#   d. a table (backend, images/s, ratio to the official fp16 AMP step) in OUT/summary.txt.
# Writes gpu_check.log, results.jsonl (one JSON object per part) and summary.txt to $OUT if set, else
# ./gpu_check_out (3 files: the device tool returns at most 8).
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--parts "probe trajectory parity official bench"]
#   bash benchmarks/gpu_check.sh --cpu-smoke          # (or GPU_CHECK_DRY_RUN=1) every part, tiny, on CPU
#   bash benchmarks/gpu_check.sh --fetch-wheels DIR   # on a machine with a registry: keras + its missing needs
#
# Keras is not on the lent GPU image (Python 3.12, CUDA JAX 0.11, torch 2.11, no TensorFlow): when `import keras`
# fails, the wheels in --wheels DIR (or $GPU_CHECK_WHEELS) are installed with pip --no-index --no-deps --target
# into a scratch folder put first on PYTHONPATH (nothing of the image is changed). --fetch-wheels DIR fills such
# a folder with exactly keras 3.15.1, namex and optree for CPython 3.12 manylinux x86-64: the image has keras'
# other needs (absl-py, numpy, rich, h5py, ml-dtypes, packaging, typing-extensions). ibot_keras itself comes
# from this checkout (PYTHONPATH), and the official code from official_ref (see official_gpu_step.py: pass
# IBOT_OFFICIAL_REF=DIR when ../shared/official_ref does not travel).
#
# Unlike tox.ini (JAX_PLATFORMS=cpu, CUDA_VISIBLE_DEVICES=), nothing here pins the CPU outside --cpu-smoke: an
# inherited JAX_PLATFORMS without cuda/gpu in it, or an empty CUDA_VISIBLE_DEVICES, is removed. Each backend's
# device is printed (part probe, and a "[device]" line before every test run); a backend that is not on the GPU
# is skipped, not timed on the CPU.
#
# Precision: the tests compare float32 at 1e-5 (losses) to 1e-6 (teacher weights); TF32 matmuls/convs (10-bit
# mantissa, ~1e-3 relative) would not pass, and TF32 is the GPU default for JAX f32 dots and torch's cuDNN
# convs (the patch embedding). So the TEST runs get NVIDIA_TF32_OVERRIDE=0 (cuBLAS/cuDNN), jax
# jax_default_matmul_precision=highest, torch fp32_precision "ieee" (allow_tf32=False before torch 2.9) and
# TensorFlow's TF32 off. The BENCHMARKS keep every default, as a user would run them.
#
# Time: each part gets a cap (seconds) within an overall budget GPU_CHECK_BUDGET_S (default 470); a part that
# would start with under 20 s left is skipped and marked so. GPU_CHECK_PARTS (or --parts) reruns a subset.
set -u -o pipefail

INVOKED_FROM=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_DRY_RUN:-0}
WHEELS=${GPU_CHECK_WHEELS:-}
PARTS=${GPU_CHECK_PARTS:-probe trajectory parity official bench}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
OUTDIR=${OUT:-$INVOKED_FROM/gpu_check_out}
FETCH=
# the wheels --fetch-wheels takes (keras' needs that the lent GPU image lacks)
WHEEL_PINS="keras==3.15.1 namex==0.1.0 optree==0.20.0"

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke|--dry-run) SMOKE=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --parts) PARTS=$2; shift ;;
    --fetch-wheels) FETCH=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$FETCH" ]; then
  mkdir -p "$FETCH" || exit 1
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$FETCH" $WHEEL_PINS
fi

case "$OUTDIR" in /*) ;; *) OUTDIR=$INVOKED_FROM/$OUTDIR ;; esac
case "$WHEELS" in ""|/*) ;; *) WHEELS=$INVOKED_FROM/$WHEELS ;; esac
case "${IBOT_OFFICIAL_REF:-}" in ""|/*) ;; *) export IBOT_OFFICIAL_REF=$INVOKED_FROM/$IBOT_OFFICIAL_REF ;; esac
mkdir -p "$OUTDIR" || exit 1
cd "$REPO" || exit 1
LOG=$OUTDIR/gpu_check.log
RESULTS=$OUTDIR/results.jsonl
SUMMARY=$OUTDIR/summary.txt
: >"$LOG"; : >"$RESULTS"
exec > >(tee -a "$LOG") 2>&1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
START=$SECONDS

note() { printf '\n=== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
record() { printf '%s\n' "$1" >>"$RESULTS"; }
want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }

# run_part NAME CAP CMD...: runs CMD under `timeout` (cap, or what the budget has left), logs its output to
# $SCRATCH/NAME.out, records {"part": NAME, "rc", "seconds"}; rc 124 = cut off by the cap.
run_part() {
  local name=$1 cap=$2 left rc t0
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    note "$name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
    record "{\"part\": \"$name\", \"rc\": null, \"skipped\": \"no time left\"}"
    return 99
  fi
  note "$name (cap ${cap}s): $*"
  t0=$SECONDS
  timeout --kill-after=15 "$cap" "$@" 2>&1 | tee "$SCRATCH/$name.out"
  rc=${PIPESTATUS[0]}
  record "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}"
  [ "$rc" -eq 124 ] && echo "$name: cut off after ${cap}s"
  return "$rc"
}
# the last JSON line a part printed, to results.jsonl
keep_json() { grep '^{' "$SCRATCH/$1.out" 2>/dev/null | tail -n 1 >>"$RESULTS"; }

# ---------------------------------------------------------------------------------------------- environment
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
  MODE=cpu-smoke
else
  case "${JAX_PLATFORMS-unset}" in unset|*cuda*|*gpu*) ;; *) echo "unsetting JAX_PLATFORMS=$JAX_PLATFORMS"; unset JAX_PLATFORMS ;; esac
  if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ]; then echo "unsetting the empty CUDA_VISIBLE_DEVICES"; unset CUDA_VISIBLE_DEVICES; fi
  MODE=gpu
fi
note "gpu_check: mode $MODE, repo $REPO, out $OUTDIR, parts: $PARTS, budget ${BUDGET}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" --version

if ! "$PY" -c "import keras" 2>/dev/null || [ "${GPU_CHECK_FORCE_INSTALL:-0}" = 1 ]; then
  if [ -z "$WHEELS" ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "keras is not importable by $PY and no wheel folder was given (--wheels DIR; fill one with --fetch-wheels DIR)"
    exit 3
  fi
  SITE=$SCRATCH/site
  note "installing $(cd "$WHEELS" && echo *.whl) into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
"$PY" -c "import keras, ibot_keras; print('keras', keras.__version__, 'from', keras.__file__)" || exit 3

# Backends: jax and torch always; tensorflow only where it is installed.
BACKENDS="jax torch"
"$PY" -c "import tensorflow" 2>/dev/null && BACKENDS="$BACKENDS tensorflow"
HELPER=$SCRATCH/gpu_check_helper.py
cat >"$HELPER" <<'PYEOF'
"""gpu_check.sh's Python side: `python HELPER probe|pytest|parity_run|parity|bench|summary ...`."""
import json
import os
import runpy
import subprocess
import sys

REPO = os.environ["GC_REPO"]
SMOKE = os.environ.get("GC_SMOKE") == "1"
BACKEND = os.environ.get("KERAS_BACKEND", "jax")


def strict_fp32(backend):
    """TF32 off for the float32 tests (see gpu_check.sh's header)."""
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9; mixing in allow_tf32 would raise
            torch.backends.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


def device_info(backend):
    """Where this backend computes: its devices and the device of a Keras op's result."""
    import keras

    y = keras.ops.matmul(keras.ops.ones((2, 2)), keras.ops.ones((2, 2)))
    info = {"backend": backend, "keras": keras.__version__}
    if backend == "jax":
        import jax

        info.update(version=jax.__version__, default_backend=jax.default_backend(),
                    devices=[str(d) for d in jax.devices()], result_on=str(sorted(str(d) for d in y.devices())),
                    matmul_precision=str(jax.config.jax_default_matmul_precision))
        info["on_gpu"] = jax.default_backend() == "gpu"
    elif backend == "torch":
        import torch

        info.update(version=torch.__version__, cuda_available=torch.cuda.is_available(), result_on=str(y.device),
                    device_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        if hasattr(torch.backends, "fp32_precision"):
            info["fp32_precision"] = torch.backends.cuda.matmul.fp32_precision + "/" + torch.backends.cudnn.fp32_precision
        info["on_gpu"] = y.device.type == "cuda"
    elif backend == "tensorflow":
        import tensorflow as tf

        info.update(version=tf.__version__, gpus=[d.name for d in tf.config.list_physical_devices("GPU")],
                    result_on=y.device, tf32=tf.config.experimental.tensor_float_32_execution_enabled())
        info["on_gpu"] = "GPU" in y.device
    info["NVIDIA_TF32_OVERRIDE"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
    return info


def gpu_peak_mb(backend):
    """The process's peak device memory in MiB, where the backend reports it (None on CPU)."""
    try:
        if backend == "jax":
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
        elif backend == "torch":
            import torch

            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        else:
            import tensorflow as tf

            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] if tf.config.list_physical_devices("GPU") else None
    except Exception as err:  # a report, not a check
        print(f"gpu memory not read: {err!r}", file=sys.stderr)
        peak = None
    return None if peak is None else round(peak / 2**20, 1)


def announce(strict):
    if strict:
        strict_fp32(BACKEND)
    info = device_info(BACKEND)
    print("[device]", json.dumps(info), file=sys.stderr, flush=True)
    return info


def cmd_probe():
    print(json.dumps(dict(part="probe", **device_info(BACKEND))))


def cmd_pytest(args):
    announce(strict=True)
    import pytest

    sys.exit(pytest.main(args))


def cmd_parity_run(out):
    announce(strict=True)
    path = os.path.join(REPO, "backends_tests", "parity_run.py")
    sys.argv = [path, out]
    runpy.run_path(path, run_name="__main__")


def cmd_parity(folder, backends, timeout):
    """Runs the parity scenario on each backend (+ JAX on the CPU as a reference when on the GPU) and applies
    test_parity.py's own assertions to every run against the JAX-on-GPU run."""
    import numpy as np

    runs, status = {}, {}
    plan = [(b, b, {}) for b in backends]
    if not SMOKE:
        plan.append(("jax_cpu", "jax", {"JAX_PLATFORMS": "cpu"}))
    for name, backend, extra in plan:
        out = os.path.join(folder, f"{name}.npz")
        env = dict(os.environ, KERAS_BACKEND=backend, **extra)
        print(f"--- parity_run.py on {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "parity_run", out], env=env, timeout=timeout)
        if proc.returncode == 0:
            runs[name] = dict(np.load(out))
        else:
            status[name] = f"run failed (rc {proc.returncode})"
    os.environ["JAX_PLATFORMS"] = "cpu"  # the comparison below imports keras: keep it off the GPU
    sys.path.insert(0, os.path.join(REPO, "backends_tests"))
    import test_parity  # its assertions and tolerances, called directly (pytest would skip it without TF)

    if "jax" in runs:
        for other in runs:
            if other == "jax":
                continue
            try:
                test_parity.test_training_runs_agree_across_backends(runs, other)
                status[other] = "agrees with jax (GPU)" if not SMOKE else "agrees with jax"
            except AssertionError as err:
                status[other] = "DIFFERS: " + " ".join(str(err).split())[:300]
    print(json.dumps({"part": "parity", "runs": sorted(runs), "status": status}))
    sys.exit(0 if len(runs) == len(plan) and all(s.startswith("agrees") for s in status.values()) else 1)


def cmd_bench(steps, warmup):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_step

    override = json.loads(os.environ.get("GC_BENCH_OVERRIDE") or "{}")  # --cpu-smoke only
    train_step.CONFIGS["vit-s16-gpu"].update(override)
    result = train_step.run_one("vit-s16-gpu", steps, warmup, "auto")
    info = device_info(result["backend"])
    result.update(part="bench", override=override, on_gpu=info["on_gpu"], result_on=info["result_on"],
                  peak_gpu_mb=gpu_peak_mb(result["backend"]))
    print(json.dumps(result))


def mb(value):
    return "-" if value is None else f"{value:.0f}"


def cmd_summary(results, out):
    rows = [json.loads(line) for line in open(results) if line.strip().startswith("{")]
    official = next((r for r in rows if r.get("impl", "").startswith("official") and "images_per_s" in r), None)
    lines = [f"gpu_check ({'CPU smoke: tiny settings, figures mean nothing' if SMOKE else 'GPU'})", ""]
    for r in rows:
        if r.get("part") == "probe":
            lines.append(f"device  {r['backend']:<10} on_gpu={r['on_gpu']} result_on={r['result_on']}")
    lines.append("")
    lines.append("tests (TF32 off):")
    for r in rows:
        if r.get("part", "").startswith(("trajectory", "parity")) and "rc" in r:
            verdict = {0: "passed", None: "skipped", 124: "TIMED OUT"}.get(r["rc"], f"FAILED (rc {r['rc']})")
            took = f"{r['seconds']}s" if "seconds" in r else r.get("skipped", "")
            lines.append(f"  {r['part']:<22} {verdict:<14} {took}")
        if r.get("part") == "parity" and "status" in r:
            for name, s in sorted(r["status"].items()):
                lines.append(f"    parity {name:<10} {s}")
    lines.append("")
    lines.append("vit-s16-gpu step (ViT-S/16, 2x224 + 10x96, batch 64; official: fp16 AMP, ours: mixed_bfloat16)")
    lines.append(f"{'backend':<26} {'images/s':>9} {'s/step':>8} {'vs official':>11} {'peak GPU MB':>12}  device")
    if official:
        lines.append(f"{'official torch fp16 AMP':<26} {official['images_per_s']:>9.1f} {official['s_per_step']:>8.3f} "
                     f"{'1.00x':>11} {mb(official['peak_gpu_allocated_mb']):>12}  {official['device_name']}"
                     f" (skipped steps {official['skipped_steps']})")
    else:
        lines.append(f"{'official torch fp16 AMP':<26} {'absent':>9}  (see gpu_check.log)")
    for r in rows:
        if r.get("part") == "bench":
            ratio = f"{r['images_per_s'] / official['images_per_s']:.2f}x" if official else "-"
            lines.append(f"{r['backend'] + ' ' + r['dtype_policy']:<26} {r['images_per_s']:>9.1f} {r['s_per_step']:>8.3f} "
                         f"{ratio:>11} {mb(r.get('peak_gpu_mb')):>12}  {r['result_on']}"
                         f" (first step {r['first_step_s']} s)")
    missing = [r["part"] for r in rows if "rc" in r and r["part"].startswith(("bench_", "official")) and r["rc"] != 0]
    if missing:
        lines.append(f"not measured: {', '.join(missing)} (see gpu_check.log)")
    text = "\n".join(lines) + "\n"
    open(out, "w").write(text)
    print(text)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "probe":
        cmd_probe()
    elif command == "pytest":
        cmd_pytest(rest)
    elif command == "parity_run":
        cmd_parity_run(rest[0])
    elif command == "parity":
        cmd_parity(rest[0], rest[1].split(","), int(rest[2]))
    elif command == "bench":
        cmd_bench(int(rest[0]), int(rest[1]))
    elif command == "summary":
        cmd_summary(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown helper command {command}")
PYEOF
export GC_REPO=$REPO GC_SMOKE=$SMOKE

# Sizes: the real ones on the GPU; tiny ones for --cpu-smoke (the same code paths).
if [ "$SMOKE" = 1 ]; then
  TRAJ_SELECT=(-k "step0_loss_inputs")   # one test: builds the fixture model and checks the step-0 outputs
  BENCH_STEPS=1; BENCH_WARMUP=1
  export GC_BENCH_OVERRIDE='{"arch": "vit_tiny", "batch_size": 2, "local_crops_number": 2, "global_crop_size": 64, "local_crop_size": 32}'
  BENCH_BACKENDS="jax torch"           # tensorflow's bench takes the same train_step.run_one path
  OFFICIAL_ARGS=(--device cpu --arch vit_tiny --batch 2 --local_crops 2 --steps 1 --warmup 1 --threads 2)
else
  TRAJ_SELECT=()
  BENCH_STEPS=10; BENCH_WARMUP=3        # train_step.py's defaults
  export GC_BENCH_OVERRIDE=
  OFFICIAL_ARGS=(--device cuda --steps 10 --warmup 3)
  BENCH_BACKENDS=$BACKENDS
fi
declare -A ON_GPU=()

# ---------------------------------------------------------------------------------------------- probe
for b in $BACKENDS; do
  ON_GPU[$b]=unknown
  if want probe; then
    run_part "probe_$b" 90 env KERAS_BACKEND="$b" "$PY" "$HELPER" probe
    keep_json "probe_$b"
    grep -q '"on_gpu": true' "$SCRATCH/probe_$b.out" 2>/dev/null && ON_GPU[$b]=yes || ON_GPU[$b]=no
  fi
done
# on_gpu_or_skip PART BACKEND: in GPU mode, a backend whose probe did not find the GPU is not run
on_gpu_or_skip() {
  if [ "$SMOKE" != 1 ] && [ "${ON_GPU[$2]:-unknown}" = no ]; then
    note "$1: SKIPPED ($2 is not on the GPU: see probe_$2)"
    record "{\"part\": \"$1\", \"rc\": null, \"skipped\": \"$2 not on the GPU\"}"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------- a. tests
TEST_ENV=(env NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest)
if want trajectory; then
  for b in jax torch; do
    on_gpu_or_skip "trajectory_$b" "$b" || continue
    run_part "trajectory_$b" 150 "${TEST_ENV[@]}" KERAS_BACKEND="$b" "$PY" "$HELPER" pytest \
      backends_tests/test_trajectory.py -q -p no:cacheprovider "${TRAJ_SELECT[@]}"
  done
fi
if want parity; then
  PARITY_BACKENDS=jax,torch
  [ "$SMOKE" != 1 ] && [[ " $BACKENDS " == *" tensorflow "* ]] && PARITY_BACKENDS=jax,torch,tensorflow
  if on_gpu_or_skip parity jax && on_gpu_or_skip parity torch; then
    run_part parity 200 "${TEST_ENV[@]}" "$PY" "$HELPER" parity "$SCRATCH" "$PARITY_BACKENDS" 150
    keep_json parity
  fi
fi

# ---------------------------------------------------------------------------------------------- c. official step
if want official; then
  if [ "$SMOKE" = 1 ] || on_gpu_or_skip official torch; then
    run_part official 150 "$PY" benchmarks/official_gpu_step.py "${OFFICIAL_ARGS[@]}"
    keep_json official
  fi
fi

# ---------------------------------------------------------------------------------------------- b. our step
if want bench; then
  for b in $BENCH_BACKENDS; do
    on_gpu_or_skip "bench_$b" "$b" || continue
    run_part "bench_$b" 180 env KERAS_BACKEND="$b" "$PY" "$HELPER" bench "$BENCH_STEPS" "$BENCH_WARMUP"
    keep_json "bench_$b"
  done
fi

# ---------------------------------------------------------------------------------------------- d. table
note "summary ($((SECONDS - START))s in all)"
"$PY" "$HELPER" summary "$RESULTS" "$SUMMARY"
echo "written: $LOG, $RESULTS, $SUMMARY"
