"""Where the JAX training step spends its time: each phase compiled and timed on its own.

    KERAS_BACKEND=jax python benchmarks/step_phases.py [--config baseline-cpu] [--steps 5]

XLA fuses the whole step, so phases are timed as separately compiled functions of the same
model and batch (``train_step.py``'s data): the teacher forward, the student forward on the
masked global crops, the student on the local crops, the whole forward, forward + loss,
forward + loss + backward, and the full step (``train_on_batch``: also the optimizer, the EMA
and the metrics). Differences between rows give the backward and the optimizer + EMA.
``--hlo DIR`` also writes the optimised HLO of the full step and its cost analysis (FLOPs,
bytes accessed) there. Compare with the official harness's ``phase_median_s``.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def timed(fn, steps):
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="baseline-cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hlo", help="write the full step's optimised HLO and cost analysis to this folder")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("step_phases.py times the JAX step: run it with KERAS_BACKEND=jax.")
    import jax

    from train_step import build_model_and_batches

    model, config, (batch,) = build_model_and_batches(args.config, num_batches=1)
    grid = config.global_crop_size // config.patch_size
    model.train_on_batch(batch)  # builds the optimizer and compiles the step
    x = jax.tree_util.tree_map(jax.numpy.asarray, batch)
    globals_ = x["global_crops"].reshape((-1,) + x["global_crops"].shape[2:])
    locals_ = x["local_crops"].reshape((-1,) + x["local_crops"].shape[2:])
    masks = x["masks"].reshape((-1, grid, grid))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]
    optimizer_vars = [v.value for v in model.optimizer.variables]

    def weights(layer):
        return [v.value for v in layer.trainable_variables], [v.value for v in layer.non_trainable_variables]

    tb, th = weights(model.teacher_backbone), weights(model.teacher_head)
    sb, sh = weights(model.student_backbone), weights(model.student_head)

    @jax.jit
    def teacher(g):
        return model.teacher_head.stateless_call(*th, model.teacher_backbone.stateless_call(*tb, g)[0])[0]

    @jax.jit
    def student_globals(g, m):
        return model.student_backbone.stateless_call(*sb, g, masks=m, training=True)[0]

    @jax.jit
    def student_locals(l):
        tokens = model.student_backbone.stateless_call(*sb, l, training=True)[0]
        return model.student_head.stateless_call(*sh, tokens[:, 0])[0]

    @jax.jit
    def forward(t, n, batch):
        return model.stateless_call(t, n, batch, training=True)[0]

    def loss(t, n, m, batch):
        return model.compute_loss_and_updates(t, n, m, batch, None, None, training=True, optimizer_variables=optimizer_vars)

    loss_fn = jax.jit(loss)
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def full():
        return model.train_on_batch(batch, return_dict=True)["loss"]

    rows = [
        ("teacher forward (backbone + head, global crops)", lambda: teacher(globals_)),
        ("student backbone, masked global crops", lambda: student_globals(globals_, masks)),
        ("student backbone + head, local crops", lambda: student_locals(locals_)),
        ("whole forward (IBOT.call)", lambda: forward(trainable, non_trainable, x)),
        ("forward + loss", lambda: loss_fn(trainable, non_trainable, metrics, x)),
        ("forward + loss + backward", lambda: grad_fn(trainable, non_trainable, metrics, x)),
        ("full step (train_on_batch)", full),
    ]
    results = {}
    for name, fn in rows:
        results[name] = timed(fn, args.steps)
        print(f"{name:<50} {results[name]:7.3f} s")
    print(f"{'= backward':<50} {results[rows[5][0]] - results[rows[4][0]]:7.3f} s")
    print(f"{'= optimizer + EMA + metrics':<50} {results[rows[6][0]] - results[rows[5][0]]:7.3f} s")
    if args.hlo:
        os.makedirs(args.hlo, exist_ok=True)
        state = (trainable, non_trainable, optimizer_vars, metrics)
        compiled = jax.jit(model.train_step).lower(state, (x,)).compile()
        with open(os.path.join(args.hlo, "train_step.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        summary = {k: float(v) for k, v in cost.items() if k in ("flops", "bytes accessed", "transcendentals")}
        with open(os.path.join(args.hlo, "cost.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
