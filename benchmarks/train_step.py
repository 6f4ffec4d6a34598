"""Training-step throughput per backend: images/s, s/step, compile time, peak RSS.

    python benchmarks/train_step.py --config baseline-cpu --backend all
    python benchmarks/train_step.py --config baseline-cpu --backend jax --json

Each backend runs in its own process (``--backend all`` spawns one per backend and prints a
table). Timing: ``--warmup`` untimed steps (compilation included in the first), then the
median over ``--steps`` timed steps. Every timed step ends with a host read of the loss, as
the official loop's ``loss.item()`` does. Data is made in memory before timing (random
pixels; masks from BlockMasking with the README ratios), like a DataLoader worker would.
CPU time of the timed steps, per step: ``user_s_per_step``, ``system_s_per_step`` and
``page_faults_per_step`` (minor faults: pages the kernel had to map and zero, e.g. for
buffers that are mapped afresh every step). Memory: ``peak_rss_mb`` is the whole process's
high-water mark (what the official figure measures); on Linux also ``peak_rss_warmup_mb``
(through the warm-up, i.e. with compilation) and ``peak_rss_timed_steps_mb`` (the high-water
mark reset after warm-up: training alone).

Configs:
- ``baseline-cpu``: the official CPU baseline (``../shared/spec/official_cpu_baseline.md``):
  ViT-Tiny/16, out_dim 8192 shared head, batch 8, 2 x 224 + 2 x 96 crops, fp32,
  drop_path 0.1, norm_last_layer False, epoch 1 (last layer not frozen). Official: 4.45 s/step,
  1.80 images/s, peak RSS 2.47 GB.
- ``vit-s16-gpu``: ViT-S/16, out_dim 8192, 2 x 224 + 10 x 96, batch 64, mixed_bfloat16.
- ``overhead-probe``: ``baseline-cpu`` at batch 1 with 32-px global and 16-px local crops and
  out_dim 64: the same layers, ops and (all but the last layer's) parameters with almost no
  activations, so its step time is the step's fixed cost.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BASELINE_CPU = dict(
    arch="vit_tiny", patch_size=16, out_dim=8192, patch_out_dim=8192, shared_head=True,
    norm_last_layer=False, batch_size=8, global_crops_number=2, local_crops_number=2,
    global_crop_size=224, local_crop_size=96, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
    epochs=800, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), drop_path=0.1,
    policy="float32", steps_per_epoch=100, start_epoch=1,
)
CONFIGS = {
    "baseline-cpu": BASELINE_CPU,
    "vit-s16-gpu": dict(
        BASELINE_CPU, arch="vit_small", batch_size=64, local_crops_number=10, policy="mixed_bfloat16"
    ),
    # baseline-cpu's ops and parameters with almost no activations: its step time is the fixed
    # cost per step (Python, Keras, dispatch, optimizer and EMA passes over the parameters).
    "overhead-probe": dict(
        BASELINE_CPU, batch_size=1, global_crop_size=32, local_crop_size=16, out_dim=64, patch_out_dim=64
    ),
}


def _vm_hwm_mb():
    """Peak resident memory since the last reset (Linux ``VmHWM``), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss():
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def build_model_and_batches(config_name, jit_compile="auto", policy=None, num_batches=4, remat=False):
    """``(model, config, batches)``: the pretrainer of ``config_name`` at its start epoch (dtype
    policy set; ``remat``: ``PretrainConfig.remat``) and ``num_batches`` in-memory batches
    (random pixels, ``BlockMasking`` masks)."""
    import keras
    import numpy as np

    settings = dict(CONFIGS[config_name])
    policy = settings.pop("policy") if policy is None else policy
    settings.pop("policy", None)
    steps_per_epoch = settings.pop("steps_per_epoch")
    start_epoch = settings.pop("start_epoch")
    keras.config.set_dtype_policy(policy)

    import ibot_keras
    from ibot_keras import BlockMasking, PretrainConfig

    config = PretrainConfig(**settings, remat=remat)
    if jit_compile != "auto":
        jit_compile = jit_compile == "true"
    model = ibot_keras.build_pretrainer(config, steps_per_epoch=steps_per_epoch, jit_compile=jit_compile)
    model.step.assign(start_epoch * steps_per_epoch)
    model.optimizer.iterations.assign(start_epoch * steps_per_epoch)

    rng = np.random.default_rng(0)
    masking = BlockMasking(config.pred_ratio, config.pred_ratio_var, seed=0)
    grid = config.global_crop_size // config.patch_size
    batches = []
    for _ in range(num_batches):
        batch = {
            "global_crops": rng.standard_normal(
                (config.batch_size, config.global_crops_number, config.global_crop_size, config.global_crop_size, 3)
            ).astype("float32"),
            "masks": masking.batch(config.batch_size, config.global_crops_number, grid, grid),
        }
        if config.local_crops_number:
            batch["local_crops"] = rng.standard_normal(
                (config.batch_size, config.local_crops_number, config.local_crop_size, config.local_crop_size, 3)
            ).astype("float32")
        batches.append(batch)
    return model, config, batches


def profile_parser(doc):
    """The arguments the per-backend step profilers share (``--config --policy --steps --warmup
    --top --json``)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu")
    parser.add_argument("--policy", default=None, help="a Keras dtype policy instead of the config's")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    return parser


def warmed_up(config_name, policy=None, warmup=3):
    """``(model, batch)``: the pretrainer of ``config_name`` after ``warmup`` steps on ``batch``."""
    model, _, (batch,) = build_model_and_batches(config_name, policy=policy, num_batches=1)
    run_steps(model, batch, warmup)
    return model, batch


def run_steps(model, batch, steps):
    """Runs ``steps`` training steps on ``batch``; returns the mean wall time per step in ms."""
    start = time.perf_counter()
    for _ in range(steps):
        float(model.train_on_batch(batch, return_dict=True)["loss"])
    return (time.perf_counter() - start) * 1e3 / max(steps, 1)


def run_one(config_name, steps, warmup, jit_compile, policy=None, remat=False):
    import keras

    model, config, batches = build_model_and_batches(config_name, jit_compile, policy, remat=remat)
    backend = keras.backend.backend()
    times = []
    compile_time = None
    compile_peak_mb = None
    # Drive the compiled step through Keras' own fit loop machinery, one batch per call.
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if i == warmup:
            usage_before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        logs = model.train_on_batch(batch, return_dict=True)
        float(logs["loss"])
        elapsed = time.perf_counter() - start
        if i == 0:
            compile_time = elapsed
        if i >= warmup:
            times.append(elapsed)
        if i == warmup - 1:
            compile_peak_mb = _vm_hwm_mb()
            _reset_peak_rss()  # the steady-state peak below excludes compilation
    usage = resource.getrusage(resource.RUSAGE_SELF)
    per_step = lambda field: (getattr(usage, field) - getattr(usage_before, field)) / max(len(times), 1)  # noqa: E731
    median = statistics.median(times)
    steady_peak_mb = _vm_hwm_mb()
    # Linux's ru_maxrss follows VmHWM, which the reset above cleared: the whole run's peak is
    # the larger of the warm-up's and the timed steps' high-water marks.
    peak_rss_mb = max(filter(None, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                                    compile_peak_mb, steady_peak_mb)))
    return {
        "backend": backend,
        "config": config_name,
        "images_per_s": round(config.batch_size / median, 3),
        "s_per_step": round(median, 3),
        "s_per_step_min": round(min(times), 3),
        "s_per_step_max": round(max(times), 3),
        "timed_steps": len(times),
        "first_step_s": round(compile_time, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_rss_warmup_mb": None if warmup == 0 or compile_peak_mb is None else round(compile_peak_mb, 1),
        "peak_rss_timed_steps_mb": None if steady_peak_mb is None or warmup == 0 else round(steady_peak_mb, 1),
        "user_s_per_step": round(per_step("ru_utime"), 3),
        "system_s_per_step": round(per_step("ru_stime"), 3),
        "page_faults_per_step": round(per_step("ru_minflt")),
        "jit_compile": str(model.jit_compile),
        "dtype_policy": keras.config.dtype_policy().name,
        "remat": bool(remat),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu", choices=sorted(CONFIGS))
    parser.add_argument("--backend", default="all", help="jax, torch, tensorflow or all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit_compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--policy", default=None, help="a Keras dtype policy instead of the config's")
    parser.add_argument("--remat", action="store_true", help="PretrainConfig(remat=True): the student's blocks recompute")
    parser.add_argument("--json", action="store_true", help="one JSON object per backend")
    args = parser.parse_args()

    if args.backend != "all" and os.environ.get("KERAS_BACKEND") == args.backend:
        result = run_one(args.config, args.steps, args.warmup, args.jit_compile, args.policy, args.remat)
        print(json.dumps(result))
        return
    backends = ["jax", "torch", "tensorflow"] if args.backend == "all" else [args.backend]
    results = []
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, __file__, "--config", args.config, "--backend", backend,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--jit_compile", args.jit_compile]
        if args.policy:
            command += ["--policy", args.policy]
        if args.remat:
            command.append("--remat")
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if out.returncode or not lines:
            print(f"{backend}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1]))
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    header = (f"{'backend':<11} {'images/s':>9} {'s/step':>7} {'min':>6} {'max':>6} {'1st step s':>10} "
              f"{'peak RSS MB':>12} {'warm-up':>8} {'timed':>6}  jit")
    print(f"config {args.config}: median of {args.steps} timed steps after {args.warmup} warm-up steps")
    print(header)
    for r in results:
        print(f"{r['backend']:<11} {r['images_per_s']:>9.2f} {r['s_per_step']:>7.2f} {r['s_per_step_min']:>6.2f} "
              f"{r['s_per_step_max']:>6.2f} {r['first_step_s']:>10.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_warmup_mb'] or float('nan'):>8.0f} {r['peak_rss_timed_steps_mb'] or float('nan'):>6.0f}  {r['jit_compile']}")


if __name__ == "__main__":
    main()
