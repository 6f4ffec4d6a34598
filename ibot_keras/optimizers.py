"""AdamW exactly as the official iBOT training step applies it."""

import keras
from keras import ops

from ibot_keras import backend_specific
from ibot_keras.models.skipped_steps import computed_once


@keras.saving.register_keras_serializable(package="ibot_keras")
class IBOTAdamW(keras.optimizers.Optimizer):
    """PyTorch ``AdamW`` on the official parameter groups, with the official per-parameter
    gradient clipping and last-layer freeze folded in.

    Per variable and step (``it`` = ``optimizer.iterations``):

    1. clip: ``g *= clip_grad / (||g|| + 1e-6)`` when that factor is below 1 (per tensor, not
       a global norm; ``clip_grad=0`` disables it);
    2. frozen variables (``freeze_variables``) skip the whole update while
       ``it < freeze_steps``: no decay, no moment update and no step count, exactly as a
       ``None`` gradient in PyTorch;
    3. decoupled decay ``p *= 1 - lr * wd`` for tensors with ``ndim >= 2`` whose name is not
       ``bias`` (official group 0; biases and norm weights get none);
    4. Adam with a **per-variable** step count ``k`` and PyTorch's epsilon placement:
       ``p -= lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)``.

    ``learning_rate`` and ``weight_decay`` may be floats or schedules of the step (e.g.
    ``ibot_keras.schedules.CosineSchedule``).

    ``multi_tensor`` (default True; torch only): update every variable at once with
    ``torch._foreach_*`` ops (``backend_specific.multi_tensor_adamw``) instead of one
    ``update_step`` per variable; the same values up to float32 rounding of the clip norm.

    ``skip_nonfinite`` (default True): when any gradient holds a NaN or inf (on any
    data-parallel replica), the whole update is skipped: no weight, moment or step count
    changes, and ``update_skipped`` reads 1 until the next finite step. ``iterations`` still
    advances, so the lr / weight-decay / freeze schedules keep to the step (as a skipped float16
    step does). With finite gradients the update is unchanged. (The test is a float32 sum per
    gradient: a finite gradient whose sum overflows, |sum| > 3e38, also counts as non-finite; the
    torch multi-tensor update tests the per-tensor L2 norms instead, a norm above 3e38 likewise.)
    """

    def __init__(
        self,
        learning_rate=5e-4,
        weight_decay=0.04,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        clip_grad=3.0,
        freeze_steps=0,
        skip_nonfinite=True,
        multi_tensor=True,
        name="ibot_adamw",
        **kwargs,
    ):
        for unsupported in ("weight_decay_schedule", "gradient_accumulation_steps", "use_ema"):
            if kwargs.get(unsupported):
                raise ValueError(f"IBOTAdamW does not support {unsupported}.")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if isinstance(weight_decay, dict):
            weight_decay = keras.optimizers.schedules.deserialize(weight_decay)
        self.weight_decay_value = weight_decay
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.clip_grad = float(clip_grad or 0.0)
        self.freeze_steps = int(freeze_steps)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.multi_tensor = bool(multi_tensor)
        self._frozen_keys = set()

    @property
    def learning_rate_schedule(self):
        """The learning rate as given: a schedule of the step, or a float."""
        return self._learning_rate

    def freeze_variables(self, variables):
        """Variables that get no update while ``iterations < freeze_steps``."""
        self._frozen_keys = {self._var_key(v) for v in variables}

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._velocities = self.add_optimizer_variables(var_list, "velocity")
        self._step_counts = [
            self.add_variable(shape=(), dtype="float32", name=f"{v.path.replace('/', '_')}_step")
            for v in var_list
        ]
        self.update_skipped = self.add_variable(
            shape=(), dtype="int32", name="update_skipped", aggregation="only_first_replica"
        )

    def slots(self, variable):
        """``(momentum, velocity, step_count)``: the optimizer variables kept for the model
        variable ``variable`` (PyTorch AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``)."""
        index = self._get_variable_index(variable)
        return self._momentums[index], self._velocities[index], self._step_counts[index]

    def _updates_all_at_once(self):
        return self.multi_tensor and backend_specific.MULTI_TENSOR_ADAMW

    def apply(self, grads, trainable_variables=None):
        # The multi-tensor update tests the gradients itself (torch ranks average them first).
        if not self.skip_nonfinite or self._updates_all_at_once():
            return super().apply(grads, trainable_variables)
        grads = list(grads)
        present = [g for g in grads if g is not None]
        if not present:
            return super().apply(grads, trainable_variables)
        # A sum is non-finite iff an element is (or the float32 sum overflows, |sum| > 3e38): one
        # pass over each gradient instead of isfinite's several (torch composes it of 3 kernels).
        finite = ops.all(ops.stack([ops.isfinite(ops.sum(ops.cast(g, "float32"))) for g in present]))
        # Every replica must take the same decision (TensorFlow reduces the gradients later).
        any_bad = backend_specific.cross_replica_mean(ops.cast(ops.logical_not(finite), "float32")) > 0
        any_bad = computed_once(any_bad)
        # A skipped step reaches update_step as all-NaN gradients: that is the one signal that
        # survives into each variable's update on every backend (TensorFlow updates each
        # variable in its own cross-replica call).
        poison = ops.where(any_bad, float("nan"), 1.0)
        grads = [None if g is None else g * ops.cast(poison, g.dtype) for g in grads]
        result = super().apply(grads, trainable_variables)
        self.update_skipped.assign(ops.cast(any_bad, "int32"))
        return result

    @staticmethod
    def uses_weight_decay(variable):
        """Official parameter groups: decay every tensor with ndim >= 2 that is not a bias."""
        return len(variable.shape) >= 2 and not variable.name.endswith("bias")

    def current_weight_decay(self):
        wd = self.weight_decay_value
        if callable(wd):
            return ops.cast(wd(self.iterations), "float32")
        return ops.convert_to_tensor(float(wd or 0.0), "float32")

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._updates_all_at_once():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        slots = [self.slots(v) for v in trainable_variables]
        skipped = backend_specific.multi_tensor_adamw(
            params=[v.value for v in trainable_variables], grads=list(grads),
            momentums=[m.value for m, _, _ in slots], velocities=[v.value for _, v, _ in slots],
            counts=[c.value for _, _, c in slots],
            decayed=[self.uses_weight_decay(v) for v in trainable_variables],
            weight_decay=self.current_weight_decay(),
            frozen=[self.freeze_steps > 0 and self._var_key(v) in self._frozen_keys for v in trainable_variables],
            unfrozen=ops.cast(self.iterations >= self.freeze_steps, "float32"),
            learning_rate=ops.cast(learning_rate, "float32"),
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, clip_grad=self.clip_grad,
            skip_nonfinite=self.skip_nonfinite,
        )
        if self.skip_nonfinite:
            self.update_skipped.assign(ops.cast(skipped, "int32"))

    def update_step(self, gradient, variable, learning_rate):
        momentum_var, velocity_var, count_var = self.slots(variable)
        param = ops.convert_to_tensor(variable)
        momentum = ops.convert_to_tensor(momentum_var)
        velocity = ops.convert_to_tensor(velocity_var)
        count = ops.convert_to_tensor(count_var)
        dtype = variable.dtype
        grad = ops.cast(gradient, dtype)
        # A skipped step arrives as all-NaN gradients (``apply``): one reduction tells it.
        if self.clip_grad > 0:
            norm = ops.sqrt(ops.sum(ops.square(grad)))
            finite = ops.isfinite(norm) if self.skip_nonfinite else None
            coef = self.clip_grad / (norm + 1e-6)
            grad = ops.where(coef < 1.0, grad * coef, grad)
        else:
            finite = ops.isfinite(ops.sum(grad)) if self.skip_nonfinite else None
        lr = ops.cast(learning_rate, dtype)

        new_count = count + 1.0
        new_m = momentum + (1.0 - self.beta_1) * (grad - momentum)
        new_v = velocity * self.beta_2 + (1.0 - self.beta_2) * ops.square(grad)
        bias_correction1 = 1.0 - ops.power(ops.cast(self.beta_1, "float32"), new_count)
        bias_correction2_sqrt = ops.sqrt(
            1.0 - ops.power(ops.cast(self.beta_2, "float32"), new_count)
        )
        new_p = param
        if self.uses_weight_decay(variable):
            new_p = new_p * (1.0 - lr * ops.cast(self.current_weight_decay(), dtype))
        denom = ops.sqrt(new_v) / bias_correction2_sqrt + self.epsilon
        new_p = new_p - (lr / bias_correction1) * new_m / denom

        active = None
        if self._var_key(variable) in self._frozen_keys and self.freeze_steps > 0:
            active = self.iterations >= self.freeze_steps
        if finite is not None:
            active = finite if active is None else ops.logical_and(active, finite)
        if active is not None:
            new_p = ops.where(active, new_p, param)
            new_m = ops.where(active, new_m, momentum)
            new_v = ops.where(active, new_v, velocity)
            new_count = ops.where(active, new_count, count)
        self.assign(variable, new_p)
        self.assign(momentum_var, new_m)
        self.assign(velocity_var, new_v)
        self.assign(count_var, new_count)

    def get_config(self):
        config = super().get_config()
        wd = self.weight_decay_value
        if isinstance(wd, keras.optimizers.schedules.LearningRateSchedule):
            wd = keras.optimizers.schedules.serialize(wd)
        config.update(
            weight_decay=wd,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            clip_grad=self.clip_grad,
            freeze_steps=self.freeze_steps,
            skip_nonfinite=self.skip_nonfinite,
            multi_tensor=self.multi_tensor,
        )
        return config
