"""Does pretraining help? For each dataset and backend: ``examples/pretrain.py`` on the training
folder, then k-NN and a linear probe on a fixed train/test split of raw pixels, of the same
network at initialisation and of the pretrained teacher, with the training time and the
collapse diagnostics of the last epoch.

    python benchmarks/learning.py --dataset digits,shapes,glyphs,silhouettes --backend all --out learning.json
    python benchmarks/learning.py --dataset shapes --backend jax --num_train 500 --epochs 1
    python benchmarks/learning.py --dataset digits,shapes,glyphs,silhouettes --pixels_only   # no training

Datasets are those of ``benchmarks/datasets.py`` (28-px grey PNG folders written once under
``--cache_dir``). Every flag this script does not know goes to ``examples/pretrain.py``
unchanged; unless given, ``--image_size 28 --global_crop_size 28 --local_crop_size 12`` are
added (the images' size; ``--no_size_flags`` adds nothing). Each run gets a fresh output folder
(no resume): a temporary one, or ``--runs_dir/<dataset>-<backend>`` (replaced) to keep the
teacher and ``pretrain.log``.

Evaluation runs in its own process per backend (``--evaluate``, under that run's
``KERAS_BACKEND``), on the test folder against the training folder, at the run's
``global_crop_size`` with ``ibot_keras.eval.eval_views``:

- k-NN: ``ibot_keras.eval.knn_classify``, k = 20, T = 0.07, the L2-normalised final-norm [CLS]
  of the training images as the bank and the test images as queries (the official feature);
  ``knn_patch_tokens``: the same with ``extract_features(..., features="patch_tokens")`` (every
  final-norm patch token L2-normalised, concatenated: a departure, see ``docs/evaluation.md``);
  raw pixels: the flattened, L2-normalised evaluation views.
- linear probe: ``ibot_keras.eval.linear_probe`` (concatenated [CLS] of the last
  ``min(4, depth)`` blocks; raw pixels: ``train_linear_heads`` on the flattened views), the
  official learning-rate grid all trained at once, ``--probe_epochs`` epochs at batch 256; the
  best test top-1 over the grid is reported, as the official ``eval_linear_multi.py`` reports
  the best head on its validation set.
- the network at initialisation: ``build_pretrainer`` of the run's saved ``config.json`` (same
  seed), the teacher it starts from; the teacher: the run's ``teacher_backbone.keras``.
- diagnostics: the last row of the run's ``log.csv`` (epoch means of the last epoch) and
  ``CollapseMonitor``'s warnings.
- ``pretrain_70_30``: pretrain.py's own k-NN numbers (a 70/30 split of the training folder),
  next to the same protocol recomputed here (a check that the init network is the same).
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("jax", "torch", "tensorflow")
SIZE_FLAGS = {"--image_size": "28", "--global_crop_size": "28", "--local_crop_size": "12"}
DIAGNOSTICS = (
    "loss", "cls", "patch", "koleo", "kl", "teacher_entropy", "teacher_batch_entropy", "prototype_usage",
    "teacher_temp", "center_norm", "patch_center_norm", "teacher_student_gap", "masked_dropped", "skipped_steps",
)

sys.path.insert(0, HERE)
import datasets  # noqa: E402


# -- evaluation (its own process: KERAS_BACKEND is set) -------------------------------------------
def _probe(train_x, train_y, test_x, test_y, epochs, backbone=None):
    """Best test top-1 (%) and its base lr of the linear probe; ``backbone=None``: raw pixels."""
    from ibot_keras.eval import linear_probe, official_lr_grid, train_linear_heads

    kwargs = dict(base_learning_rates=official_lr_grid(), epochs=epochs, batch_size=256, seed=0, verbose=0)
    if backbone is None:
        result = train_linear_heads(train_x.reshape(len(train_x), -1), train_y, test_x.reshape(len(test_x), -1), test_y, **kwargs)
    else:
        result = linear_probe(backbone, train_x, train_y, test_x, test_y, n_last_blocks=min(4, backbone.depth), **kwargs)
    return round(result.best_top1, 2), result.best_base_lr


def _knn(train_f, train_y, test_f, test_y):
    from ibot_keras.eval import knn_classify

    return round(knn_classify(train_f, train_y, test_f, test_y, int(max(train_y.max(), test_y.max())) + 1, k=20, temperature=0.07)[0], 2)


def _pixels(views):
    import numpy as np

    flat = views.reshape(len(views), -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def _pretrain_split_knn(features, labels):
    """examples/pretrain.py's ``knn_report`` protocol on training-folder features (70/30)."""
    import numpy as np

    order = np.random.default_rng(0).permutation(len(features))
    cut = int(0.7 * len(order))
    return _knn(features[order[:cut]], labels[order[:cut]], features[order[cut:]], labels[order[cut:]])


def evaluate(args):
    """The metrics of one run (or of raw pixels alone, without ``--run_dir``) as a dict."""
    import keras

    import ibot_keras
    from ibot_keras.data import ImageFolderSource
    from ibot_keras.eval import eval_views, extract_features

    start = time.time()
    config = None
    if args.run_dir:
        with open(os.path.join(args.run_dir, "config.json")) as f:
            config = ibot_keras.PretrainConfig.from_dict(json.load(f))
    size = config.global_crop_size if config else args.eval_size
    train, test = ImageFolderSource(args.train_path), ImageFolderSource(args.test_path)
    train_x, test_x = eval_views(train, size), eval_views(test, size)
    train_y, test_y = train.labels, test.labels
    out = {"backend": keras.backend.backend(), "eval_size": size, "num_train": len(train), "num_test": len(test)}
    out["knn"] = {"pixels": _knn(_pixels(train_x), train_y, _pixels(test_x), test_y)}
    out["linear"], out["linear_base_lr"] = {}, {}
    out["linear"]["pixels"], out["linear_base_lr"]["pixels"] = _probe(train_x, train_y, test_x, test_y, args.probe_epochs)
    if config:
        steps = max(1, len(train) // config.batch_size)
        init = ibot_keras.build_pretrainer(config, steps_per_epoch=steps).teacher_backbone
        teacher = keras.saving.load_model(os.path.join(args.run_dir, "teacher_backbone.keras"))
        checks = {}
        out["knn_patch_tokens"] = {}
        for name, backbone in (("init", init), ("teacher", teacher)):
            train_f, test_f = extract_features(backbone, train_x), extract_features(backbone, test_x)
            out["knn"][name] = _knn(train_f, train_y, test_f, test_y)
            out["knn_patch_tokens"][name] = _knn(extract_features(backbone, train_x, features="patch_tokens"), train_y,
                                                 extract_features(backbone, test_x, features="patch_tokens"), test_y)
            out["linear"][name], out["linear_base_lr"][name] = _probe(
                train_x, train_y, test_x, test_y, args.probe_epochs, backbone
            )
            checks[name] = _pretrain_split_knn(train_f, train_y)
        summary_path = os.path.join(args.run_dir, "summary.json")
        with open(summary_path) as f:
            summary = json.load(f)
        out["train_seconds"] = summary.get("train_seconds")
        out["pretrain_70_30"] = {
            "init": {"pretrain": summary.get("knn_top1_random_init"), "here": checks["init"]},
            "teacher": {"pretrain": summary.get("knn_top1_teacher"), "here": checks["teacher"]},
        }
        out["diagnostics"] = last_epoch_logs(os.path.join(args.run_dir, "log.csv"))
        out["diagnostics"]["log_out_dim"] = round(math.log(config.out_dim), 4)
    out["evaluate_seconds"] = round(time.time() - start, 1)
    return out


def last_epoch_logs(path):
    """The ``DIAGNOSTICS`` columns of the last row of a ``CSVLogger`` file (``{}`` if none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    row = rows[-1]
    return {k: round(float(row[k]), 4) for k in DIAGNOSTICS if row.get(k) not in (None, "")}


# -- orchestration ------------------------------------------------------------------------------
def _evaluate_in_process(backend, paths, run_dir, probe_epochs, eval_size=28):
    with tempfile.TemporaryDirectory(prefix="ibot-learning-eval-") as scratch:
        result = os.path.join(scratch, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--evaluate", "--train_path", paths["train"],
                   "--test_path", paths["test"], "--probe_epochs", str(probe_epochs), "--eval_size", str(eval_size),
                   "--result", result]
        if run_dir:
            command += ["--run_dir", run_dir]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": "evaluation failed:\n" + done.stderr[-3000:]}
        with open(result) as f:
            return json.load(f)


def run_one(dataset, backend, paths, passthrough, args):
    """Train with examples/pretrain.py in a fresh folder, then evaluate: one result row."""
    row = {"dataset": dataset, "backend": backend}
    keep = bool(args.runs_dir)
    run_dir = os.path.join(args.runs_dir, f"{dataset}-{backend}") if keep else tempfile.mkdtemp(prefix=f"ibot-learning-{dataset}-{backend}-")
    if keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
    try:
        command = [sys.executable, os.path.join(ROOT, "examples", "pretrain.py"), "--data_path", paths["train"],
                   "--output_dir", run_dir, "--verbose", "2", *passthrough]
        row["command"] = " ".join(["KERAS_BACKEND=" + backend, "python", "examples/pretrain.py", *command[2:]])
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        start = time.time()
        log_path = os.path.join(run_dir, "pretrain.log")
        with open(log_path, "w") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        row["pretrain_seconds"] = round(time.time() - start, 1)
        with open(log_path) as f:
            text = f.read()
        if done.returncode != 0:
            row["error"] = "examples/pretrain.py failed:\n" + text[-3000:]
            return row
        row["collapse_warnings"] = [line.strip() for line in text.splitlines() if "looks collapsed" in line or "looked collapsed" in line]
        row.update(_evaluate_in_process(backend, paths, run_dir, args.probe_epochs))
        if keep:
            row["run_dir"] = run_dir
        return row
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _fmt(value, width, digits=2):
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def print_table(rows, file=sys.stdout):
    """k-NN of [CLS] (pixels, init, teacher), of patch tokens (``tok``: init, teacher), the linear
    probe, training seconds and the last epoch's collapse diagnostics, one row per run."""
    head = (f"{'dataset':<8} {'backend':<10} | {'k-NN pix':>8} {'init':>6} {'teacher':>7} | {'tok init':>8} "
            f"{'teacher':>7} | {'lin pix':>7} {'init':>6} "
            f"{'teacher':>7} | {'train s':>7} | {'usage':>6} {'H(t)':>5} {'H(mean)':>7} {'lnK':>5}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        if "error" in r:
            print(f"{r['dataset']:<8} {r['backend']:<10} | {r['error'].strip().splitlines()[-1][:90]}", file=file)
            continue
        knn, lin, diag = r.get("knn", {}), r.get("linear", {}), r.get("diagnostics", {})
        patches = r.get("knn_patch_tokens", {})
        print(
            f"{r['dataset']:<8} {r['backend']:<10} | {_fmt(knn.get('pixels'), 8)} {_fmt(knn.get('init'), 6)} "
            f"{_fmt(knn.get('teacher'), 7)} | {_fmt(patches.get('init'), 8)} {_fmt(patches.get('teacher'), 7)} | "
            f"{_fmt(lin.get('pixels'), 7)} {_fmt(lin.get('init'), 6)} "
            f"{_fmt(lin.get('teacher'), 7)} | {_fmt(r.get('train_seconds'), 7, 0)} | "
            f"{_fmt(diag.get('prototype_usage'), 6, 3)} {_fmt(diag.get('teacher_entropy'), 5)} "
            f"{_fmt(diag.get('teacher_batch_entropy'), 7)} {_fmt(diag.get('log_out_dim'), 5)}",
            file=file,
        )


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", default="digits,shapes,glyphs,silhouettes", help="comma-separated: " + ", ".join(datasets.DATASETS))
    p.add_argument("--backend", default="all", choices=("all",) + BACKENDS)
    p.add_argument("--out", help="write every result row to this JSON file")
    p.add_argument("--cache_dir", default=datasets.default_root(), help="where the dataset folders are written once")
    p.add_argument("--num_train", type=int, default=10000, help="training images of the procedural datasets (digits: 1,257)")
    p.add_argument("--num_test", type=int, default=2000, help="test images of the procedural datasets (digits: 540)")
    p.add_argument("--data_seed", type=int, default=0, help="seed of the generated images and of the digits split")
    p.add_argument("--probe_epochs", type=int, default=20, help="linear-probe epochs (official: 100)")
    p.add_argument("--runs_dir", help="keep each run in <runs_dir>/<dataset>-<backend> (default: a removed temp folder)")
    p.add_argument("--no_size_flags", action="store_true", help="do not add " + " ".join(f"{k} {v}" for k, v in SIZE_FLAGS.items()))
    p.add_argument("--pixels_only", action="store_true", help="no training: raw-pixel k-NN and probe per dataset")
    # The evaluation process (run by this script; KERAS_BACKEND chooses the backend).
    p.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run_dir", help=argparse.SUPPRESS)
    p.add_argument("--train_path", help=argparse.SUPPRESS)
    p.add_argument("--test_path", help=argparse.SUPPRESS)
    p.add_argument("--eval_size", type=int, default=28, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args, passthrough = parser().parse_known_args(argv)
    if args.evaluate:
        if passthrough:
            raise SystemExit(f"--evaluate takes no other flags: {passthrough}")
        result = evaluate(args)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=2)
        return 0
    for flag in ("--output_dir", "--data_path"):
        if any(a == flag or a.startswith(flag + "=") for a in passthrough):
            raise SystemExit(f"{flag} is set by this script (see --runs_dir / --dataset).")
    if not args.no_size_flags:
        given = {a.split("=")[0] for a in passthrough}
        passthrough = [*passthrough] + [x for k, v in SIZE_FLAGS.items() if k not in given for x in (k, v)]
    names = [n.strip() for n in args.dataset.split(",") if n.strip()]
    for name in names:
        datasets.class_names(name)  # refuses an unknown name before any work
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    rows = []
    for name in names:
        paths = datasets.prepare(name, args.cache_dir, args.num_train, args.num_test, args.data_seed)
        if args.pixels_only:
            row = {"dataset": name, "backend": backends[0]}
            row.update(_evaluate_in_process(backends[0], paths, None, args.probe_epochs))
            rows.append(row)
            continue
        for backend in backends:
            row = run_one(name, backend, paths, passthrough, args)
            rows.append(row)
            for check, values in row.get("pretrain_70_30", {}).items():
                if values["pretrain"] is not None and abs(values["pretrain"] - values["here"]) > 0.05:
                    print(f"warning: {name}/{backend}: the {check} network's 70/30 k-NN is {values['here']} here but "
                          f"{values['pretrain']} in pretrain.py", file=sys.stderr)
            print(json.dumps({k: v for k, v in row.items() if k != "command"}), file=sys.stderr, flush=True)
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
