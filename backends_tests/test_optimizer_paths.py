"""IBOTAdamW's multi-tensor update (torch: ``torch._foreach_*``) equals its per-variable
``update_step`` (the path the official goldens check) step for step, with clipping, weight decay
groups, a frozen variable, a non-finite step and a zero gradient. On JAX and TensorFlow the flag
changes nothing (both sides take the per-variable path)."""

import keras
import numpy as np

from ibot_keras import backend_specific
from ibot_keras.optimizers import IBOTAdamW

SHAPES = {"kernel": (6, 5), "bias": (5,), "last_layer": (5, 4), "scale": (4,)}


def _run(multi_tensor, grads_per_step):
    variables = [keras.Variable(np.random.default_rng(i).normal(size=s).astype("float32"), name=n)
                 for i, (n, s) in enumerate(SHAPES.items())]
    optimizer = IBOTAdamW(
        learning_rate=keras.optimizers.schedules.PolynomialDecay(0.05, 10, 0.01), weight_decay=0.1,
        clip_grad=1.0, freeze_steps=2, multi_tensor=multi_tensor,
    )
    optimizer.build(variables)
    optimizer.freeze_variables([variables[2]])
    history = []
    for grads in grads_per_step:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        slots = [optimizer.slots(v) for v in variables]
        history.append([keras.ops.convert_to_numpy(x) for v, s in zip(variables, slots) for x in (v, *s)]
                       + [keras.ops.convert_to_numpy(optimizer.update_skipped)])
    return history


def test_multi_tensor_update_equals_the_per_variable_one():
    rng = np.random.default_rng(7)
    steps = []
    for step in range(5):
        # large gradients (clipped to norm 1) for the kernel, small ones elsewhere
        grads = [rng.normal(size=s).astype("float32") * (10.0 if n == "kernel" else 0.1) for n, s in SHAPES.items()]
        if step == 2:
            grads[1][0] = np.nan  # skipped: nothing changes anywhere
        if step == 3:
            grads[3][:] = 0.0
        steps.append(grads)
    per_variable, multi = _run(False, steps), _run(True, steps)
    for step, (a, b) in enumerate(zip(per_variable, multi)):
        for i, (x, y) in enumerate(zip(a, b)):
            # float32: the clip norm is summed in another order (a few ulp)
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=f"step {step}, array {i}")
    # the frozen last layer did not move during the freeze, the skipped step moved nothing
    initial = np.random.default_rng(2).normal(size=SHAPES["last_layer"]).astype("float32")
    np.testing.assert_array_equal(multi[0][8], initial)
    np.testing.assert_array_equal(multi[1][8], initial)
    for i in range(16):
        np.testing.assert_array_equal(multi[2][i], multi[1][i])
    assert float(multi[-1][3]) == 4.0  # kernel: 5 steps, one skipped
    assert float(multi[-1][11]) == 2.0  # last layer: steps 3 and 4 only (0-1 frozen, 2 skipped)
    assert [int(h[16]) for h in multi] == [int(h[16]) for h in per_variable] == [0, 0, 1, 0, 0]
    assert backend_specific.MULTI_TENSOR_ADAMW == (keras.backend.backend() == "torch")
