"""Does pretraining help? k-NN top-1 of raw pixels, the randomly initialised network and the
pretrained teacher, per backend, after a fixed budget on the embedded digits.

    python benchmarks/learning.py --backend all                # examples/pretrain.py defaults
    python benchmarks/learning.py --backend jax --epochs 40    # any pretrain.py flag passes through

Each backend runs ``examples/pretrain.py`` in its own process with a fresh output folder (no
resume) and its ``summary.json`` is collected: ``knn_top1_pixels``, ``knn_top1_random_init``,
``knn_top1_teacher`` (k = 20, the official k-NN protocol on a fixed 70/30 split) and the
training wall time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "torch", "tensorflow")


def run_backend(backend, passthrough):
    with tempfile.TemporaryDirectory(prefix=f"ibot-learning-{backend}-") as output_dir:
        command = [sys.executable, os.path.join(ROOT, "examples", "pretrain.py"),
                   "--output_dir", output_dir, "--verbose", "2", *passthrough]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"backend": backend, "error": done.stderr[-2000:]}
        with open(os.path.join(output_dir, "summary.json")) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="all", choices=("all",) + BACKENDS)
    parser.add_argument("--json", action="store_true", help="one JSON object per backend")
    args, passthrough = parser.parse_known_args()
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    results = [run_backend(backend, passthrough) for backend in backends]
    if args.json:
        for result in results:
            print(json.dumps(result))
        return 0 if all("error" not in r for r in results) else 1
    print(f"{'backend':<11} {'pixels':>7} {'random init':>12} {'teacher':>8} {'train s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<11} failed:\n{r['error']}")
            continue
        print(f"{r['backend']:<11} {r['knn_top1_pixels']:>7.2f} {r['knn_top1_random_init']:>12.2f} "
              f"{r['knn_top1_teacher']:>8.2f} {r['train_seconds']:>8.0f}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
