"""Everything in ibot_keras that differs per Keras backend lives in this module.

1. ``cross_replica_mean``: the EMA centers are means over the *global* batch.
   - JAX: the compiled step sees global arrays (GSPMD), so a plain mean already is global.
   - TensorFlow: inside ``tf.distribute`` each replica sees its shard: all-reduce.
   - PyTorch: under ``torch.distributed`` (DDP) each process sees its shard: all-reduce.
2. ``PostOptimizerStep``: a ``train_step`` that runs ``model.after_optimizer_step()`` (the
   teacher EMA) right after the optimizer update, inside the same compiled step, as the
   official code does. JAX's ``train_step`` is functional (state in, state out) so the hook
   runs in a ``StatelessScope`` over the updated state; TensorFlow and PyTorch assign directly.
"""

import keras

_BACKEND = keras.backend.backend()


def cross_replica_mean(x):
    """Mean of ``x`` over data-parallel replicas (identity on a single device)."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, x)
            return total / context.num_replicas_in_sync
        return x
    if _BACKEND == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = x.detach().clone()
            dist.all_reduce(total)
            return total / dist.get_world_size()
        return x
    return x


if _BACKEND == "jax":

    class PostOptimizerStep:
        """Mixin for a ``keras.Model`` defining ``after_optimizer_step()``."""

        def train_step(self, state, data):
            logs, state = super().train_step(state, data)
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            mapping = list(zip(self.trainable_variables, trainable))
            mapping += list(zip(self.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self.after_optimizer_step()
            non_trainable = [scope.get_current_value(v) for v in self.non_trainable_variables]
            return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

else:

    class PostOptimizerStep:
        """Mixin for a ``keras.Model`` defining ``after_optimizer_step()``."""

        def train_step(self, data):
            logs = super().train_step(data)
            self.after_optimizer_step()
            return logs
