"""Everything in ibot_keras that differs per Keras backend lives in this module.

1. ``cross_replica_mean``: the EMA centers are means over the *global* batch.
   - JAX: the compiled step sees global arrays (GSPMD), so a plain mean already is global.
   - TensorFlow: inside ``tf.distribute`` each replica sees its shard: all-reduce.
   - PyTorch: under ``torch.distributed`` (DDP) each process sees its shard: all-reduce.
2. ``PostOptimizerStep``: a ``train_step`` that runs ``model.after_optimizer_step()`` (the
   teacher EMA) right after the optimizer update, inside the same compiled step, as the
   official code does. JAX's ``train_step`` is functional (state in, state out) so the hook
   runs in a ``StatelessScope`` over the updated state; TensorFlow and PyTorch assign directly.
   The hook gets the pre-step values of ``model.step_snapshot_variables()`` (the optimizer's
   iteration count, the centers and the metrics), to tell and undo a step the optimizer
   skipped (non-finite loss or gradients): JAX reads them from the step's input state,
   TensorFlow and PyTorch copy them before the step. The hook returns the step's logs (read
   after it restored the metrics).
3. Data parallel training (the global batch split over replicas; every number as on one
   device with the whole batch):
   - ``replica_loss``: what ``compute_loss`` returns so that gradients are those of the
     global-batch mean loss. TensorFlow's optimizer *sums* replica gradients, so each replica
     returns its mean divided by the replica count (Keras multiplies it back for the ``loss``
     log). PyTorch (DDP ranks, ``torchrun``): the value is the global mean (for the log) and
     the gradient the local one; ``PostOptimizerStep`` averages gradients over the ranks.
   - ``metric_value``: TensorFlow aggregates metric variables over replicas itself; torch
     ranks do not, so torch trackers get the global mean (or sum).
   - PyTorch ``PostOptimizerStep``: under an initialised ``torch.distributed`` with more than
     one rank, Keras 3.15.1's ``fit`` does not wrap the model in DDP, so the first training
     step broadcasts rank 0's weights (and optimizer state) to every rank, and every step
     averages the gradients over the ranks (one coalesced all-reduce per dtype) before the
     optimizer sees them.
   - ``data_parallel``: sets up the backend's data parallelism (JAX ``DataParallel``,
     TensorFlow ``MirroredStrategy``, torch process group from the ``torchrun`` environment).
4. ``layer_norm``: the same LayerNorm, in the form each backend runs fastest. On JAX the
   explicit ``(x - mean) * rsqrt(mean((x - mean)^2) + eps)`` compiles to a much faster
   backward on XLA:CPU than Keras' ``ops.layer_normalization`` (whose ``jnp.var`` recomputes
   the mean): baseline-cpu step 1.82 -> 2.51 images/s. TensorFlow measured no gain (3.63 vs
   3.43 images/s, within noise) and torch has a fused kernel, so both keep Keras' op.
5. ``set_random_seed``: Keras' seeding without importing TensorFlow into a JAX or PyTorch
   process (Keras' own seeds an installed TensorFlow, which imports it).
6. ``dense``: ``x @ kernel + bias`` for ``ibot_keras.layers.Dense``; on JAX with a hand-written
   backward that XLA:CPU compiles without transposed activation copies (the JAX step 0.64x ->
   0.94x of the official one); the other backends use Keras' ops.
7. ``attention``: the scaled dot-product attention core; on JAX with a hand-written backward
   (half the autodiff backward's time on XLA:CPU); on torch the fused
   ``F.scaled_dot_product_attention`` (half-precision inputs on CPU through its float32 kernel);
   TensorFlow uses Keras' ops.
8. ``multi_tensor_adamw``: on torch, ``IBOTAdamW``'s update of every variable in one pass of
   ``torch._foreach_*`` ops (Keras drives an optimizer one variable at a time, ~25 small
   kernels each); JAX and TensorFlow compile the per-variable update into one program already.
9. ``gelu``: the exact GELU; on JAX in torch's erf form, which XLA:CPU evaluates faster than
   ``jax.nn.gelu``'s erfc form.
10. ``PostOptimizerStep`` on JAX also returns the memory that each XLA compilation freed to
   the system before the step runs (glibc keeps it otherwise).
11. ``keep_freed_host_memory``: on torch and TensorFlow, the first train function made switches
   glibc to serving large buffers from its heap and keeping them there once freed. By default
   glibc maps every block over 32 MB afresh and unmaps it when freed, so each of the step's
   large tensors (the patch loss's are 51 MB) costs its page faults again every step. Measured
   at the CPU baseline: torch +5-10%, TensorFlow +3% (benchmarks/RESULTS.md). JAX gained
   nothing and is left as it is. On TensorFlow the train function also trims glibc's heap
   once, after its first call (``_trimming_after_first_call``: what tracing freed).
12. ``multi_tensor_ema``: on torch, the teacher EMA of every variable pair in two
   ``torch._foreach_*`` ops (one ``where``, two products, a sum and an assignment per variable
   otherwise); JAX and TensorFlow compile the per-variable form into the step.
"""

import collections
import contextlib
import os
import sys

import keras

_BACKEND = keras.backend.backend()


def layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis in float32: ``(..., D) -> (..., D)`` float32."""
    x = keras.ops.cast(x, "float32")
    gamma, beta = keras.ops.cast(gamma, "float32"), keras.ops.cast(beta, "float32")
    if _BACKEND != "jax":
        return keras.ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon)
    centred = x - keras.ops.mean(x, axis=-1, keepdims=True)
    variance = keras.ops.mean(keras.ops.square(centred), axis=-1, keepdims=True)
    return centred * keras.ops.rsqrt(variance + epsilon) * gamma + beta


def gelu(x):
    """Exact GELU ``x * Phi(x)``, elementwise.

    On JAX in the erf form ``0.5 * x * (1 + erf(x / sqrt(2)))`` that torch's ``nn.GELU`` (the
    official activation) computes, instead of ``jax.nn.gelu``'s ``erfc`` form: XLA:CPU evaluates
    ``erf`` as one polynomial and ``erfc`` with branches, and the baseline-cpu step got faster
    (figures in benchmarks/RESULTS.md). Both forms are within float32 rounding of the exact
    value (max abs error 7e-7 on N(0, 1) inputs; torch's float32 kernel: 1.2e-6).
    """
    if _BACKEND == "jax":
        from ibot_keras import jax_kernels

        return jax_kernels.gelu(x)
    return keras.ops.gelu(x, approximate=False)


def dense(x, kernel, bias=None):
    """``x @ kernel (+ bias)`` over the last axis: ``(..., D_in) -> (..., D_out)``.

    On JAX with a hand-written backward (``dx = g @ kernel.T``, ``dkernel = x2.T @ g2`` on the
    flattened ``(tokens, D)`` arrays, ``dbias = sum(g2)``): the same values as autodiff, but XLA:CPU
    compiles it without the transposed copies of activations (and their recomputed producers) that
    it emits for the autodiff backward of a batched matmul. ViT-T/16 backbone on 16 x 224-px crops,
    forward + backward: 1.69 s -> 0.95 s (2-core Xeon, 2026-12-01). On torch ``F.linear`` (one
    ``addmm`` with the bias, instead of a product and a separate add); TensorFlow: Keras' ops.
    """
    if _BACKEND == "jax":
        import jax.numpy as jnp

        from ibot_keras import jax_kernels

        kernel = jnp.asarray(kernel)
        if bias is None:
            return jax_kernels.dense_no_bias(x, kernel)
        return jax_kernels.dense(x, kernel, jnp.asarray(bias))
    if _BACKEND == "torch":
        import torch

        x, kernel = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(kernel)
        bias = None if bias is None else keras.ops.convert_to_tensor(bias)
        return torch.nn.functional.linear(x, kernel.T, bias)
    out = keras.ops.matmul(x, kernel)
    return out if bias is None else out + bias


def attention(q, k, v, scale):
    """``softmax(q @ k^T * scale) @ v`` per head: ``(B, H, T, d) x 3 -> (B, H, T, d)``.

    On JAX with a hand-written backward (``dv = p^T g``, ``ds = p * (g v^T - rowsum(g v^T * p))``,
    ``dq = ds k * scale``, ``dk = ds^T q * scale``): the same values as autodiff, half its time on
    XLA:CPU (ViT-T/16 attention on 16 x 224-px crops, forward + backward 24 -> 11 ms per block,
    2-core Xeon, 2026-12-01). On torch ``F.scaled_dot_product_attention`` (its fused CPU kernel:
    no stored ``(B, H, T, T)`` probabilities; float32 values within rounding, ~1e-6). TensorFlow:
    Keras' ops.
    """
    if _BACKEND == "jax":
        from ibot_keras import jax_kernels

        return jax_kernels.attention(q, k, v, scale)
    if _BACKEND == "torch":
        import torch

        q, k, v = (keras.ops.convert_to_tensor(t) for t in (q, k, v))
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # The CPU kernel's half-precision backward is slower than its float32 one (ViT-T/16
            # bfloat16 step: 210 of 1180 ms); in float32 it is also the more exact.
            out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            return out.to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    scores = keras.ops.matmul(q, keras.ops.transpose(k, (0, 1, 3, 2))) * scale
    return keras.ops.matmul(keras.ops.softmax(scores, axis=-1), v)


def _torch_world_size():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


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

        world = _torch_world_size()
        if world > 1:
            total = keras.ops.convert_to_tensor(x).detach().clone()
            dist.all_reduce(total)
            return total / world
        return x
    return x


def cross_replica_sum(x):
    """Sum of ``x`` over data-parallel replicas (identity on a single device; on JAX the step
    sees global arrays, so a plain sum already is global)."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_reduce(tf.distribute.ReduceOp.SUM, x)
        return x
    if _BACKEND == "torch" and _torch_world_size() > 1:
        import torch.distributed as dist

        total = keras.ops.convert_to_tensor(x).detach().clone()
        dist.all_reduce(total)
        return total
    return x


def replica_loss(loss):
    """The value ``compute_loss`` returns for a global-batch mean ``loss`` computed on this
    replica's shard, such that the gradients are those of the global mean (see module doc)."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return loss / context.num_replicas_in_sync
        return loss
    if _BACKEND == "torch" and _torch_world_size() > 1:
        local = loss.detach()
        return loss + (cross_replica_mean(local) - local)
    return loss


def metric_value(x, reduction="mean"):
    """``x`` (this replica's value) as a metric tracker in the replica should record it:
    TensorFlow aggregates metric variables over replicas and JAX sees the global batch, so
    ``x`` itself; on torch ranks, the mean (``reduction="sum"``: the sum) over the ranks."""
    if _BACKEND == "torch":
        world = _torch_world_size()
        if world > 1:
            mean = cross_replica_mean(x)
            return mean * world if reduction == "sum" else mean
    return x


def _glibc_function(name):
    """glibc's function ``name`` through ``ctypes``, or None (no glibc, or no such function)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name) if os.confstr("CS_GNU_LIBC_VERSION") else None
    except (AttributeError, OSError, ValueError):
        return None


HOST_MEMORY_ENV = "IBOT_KERAS_KEEP_FREED_HOST_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1
_HOST_MEMORY_KEPT = None


def keep_freed_host_memory():
    """Make glibc serve every allocation from its heap and keep what is freed there for reuse,
    for the rest of the process (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD,
    2 GiB)``); returns whether that is in force.

    Done once per process, by the first train function made on torch or TensorFlow; a no-op
    without glibc, and while ``IBOT_KERAS_KEEP_FREED_HOST_MEMORY=0`` is in the environment. The
    process then keeps its high-water mark resident until it ends (only a thread's block too
    large for its arena is still mapped on its own); ``malloc_trim(0)`` returns the free part.
    Worker processes that are spawned start with glibc's defaults."""
    global _HOST_MEMORY_KEPT
    if os.environ.get(HOST_MEMORY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return bool(_HOST_MEMORY_KEPT)
    if _HOST_MEMORY_KEPT is None:
        mallopt = _glibc_function("mallopt")
        _HOST_MEMORY_KEPT = mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(
            mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    return _HOST_MEMORY_KEPT


_MALLOC_TRIM = None


def _malloc_trim():
    """glibc's ``malloc_trim(0)``: return the heap's free pages to the system (no-op elsewhere)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = _glibc_function("malloc_trim") or False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _trimming_after_first_call(function):
    """``function`` (a TensorFlow train function), which after its first call (the tracing and
    the first run of the step) collects garbage and hands glibc's free heap back to the system.

    What tracing freed stays in glibc's heap, in pieces too small for the step's large tensors,
    so without it the later steps grow the process further (baseline-cpu with ``remat``: peak
    RSS 2.55-2.71 GB, 2.35-2.40 GB with it; figures in benchmarks/RESULTS.md)."""
    import functools
    import gc

    calls = [0]

    @functools.wraps(function)
    def run(*args, **kwargs):
        result = function(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            gc.collect()
            _malloc_trim()
        return result

    return run


class _KeepsFreedHostMemory:
    """``make_train_function`` that first calls ``keep_freed_host_memory()`` (torch, TF); on
    TensorFlow the train function also trims the heap after its first call."""

    def make_train_function(self, force=False):
        keep_freed_host_memory()
        before = self.train_function
        super().make_train_function(force)
        if _BACKEND == "tensorflow" and self.train_function is not None and self.train_function is not before:
            self.train_function = _trimming_after_first_call(self.train_function)
        return self.train_function


def _pre_step_values(model):
    """Copies of ``model.step_snapshot_variables()`` taken before the step (TF and torch; the
    JAX step reads them from its input state)."""
    return [keras.ops.copy(v) for v in model.step_snapshot_variables()]


if _BACKEND == "jax":

    # JAX records this event as each XLA compilation ends (``jax._src.dispatch``); a JAX that
    # renamed it would only stop the trimming.
    _BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

    def _trim_after_compile(event, duration, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            _malloc_trim()

    def _returning_compile_memory(function):
        """``function`` (a Keras train function), which hands the memory that XLA's compiler
        freed back to the system as each compilation ends, before the step runs.

        glibc keeps the freed heap of a compilation resident (~0.5 GB for the baseline-cpu step);
        the step's buffers then come on top of it. Trimmed, the process peak stays lower (figures
        in benchmarks/RESULTS.md). The listener is installed only while ``function`` runs."""
        import functools

        import jax

        @functools.wraps(function)
        def run(*args, **kwargs):
            jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)
            try:
                return function(*args, **kwargs)
            finally:
                jax.monitoring.unregister_event_duration_listener(_trim_after_compile)

        return run

    class PostOptimizerStep:
        """Mixin for a ``keras.Model`` defining ``after_optimizer_step()``."""

        def make_train_function(self, force=False):
            before = self.train_function
            super().make_train_function(force)
            if self.train_function is not None and self.train_function is not before:
                self.train_function = _returning_compile_memory(self.train_function)

        def _state_mapping(self, state):
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            mapping = list(zip(self.trainable_variables, trainable))
            mapping += list(zip(self.non_trainable_variables, non_trainable))
            if self.optimizer is not None:
                mapping += list(zip(self.optimizer.variables, optimizer_vars))
            mapping += list(zip(self.metrics_variables, metrics_vars))
            return mapping

        def train_step(self, state, data):
            before = {id(v): value for v, value in self._state_mapping(state)}
            snapshot = [before[id(v)] for v in self.step_snapshot_variables()]
            logs, state = super().train_step(state, data)
            trainable = state[0]
            with keras.StatelessScope(state_mapping=self._state_mapping(state)) as scope:
                logs = self.after_optimizer_step(snapshot)
            non_trainable = [scope.get_current_value(v) for v in self.non_trainable_variables]
            optimizer_vars = state[2]
            if self.optimizer is not None:
                optimizer_vars = [scope.get_current_value(v) for v in self.optimizer.variables]
            metrics_vars = [scope.get_current_value(v) for v in self.metrics_variables]
            return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

elif _BACKEND == "torch":

    def _broadcast_from_rank0(variables):
        import torch.distributed as dist

        for variable in variables:
            dist.broadcast(variable.value.data, src=0)

    @contextlib.contextmanager
    def _gradients_averaged_over_ranks(optimizer, world):
        """Within the block, ``optimizer.apply`` first replaces the gradients by their mean over
        the ranks: one all-reduce of the flattened gradients per dtype. Before the optimizer
        (and a loss-scale optimizer's finiteness check), so every rank takes the same step."""
        import torch
        import torch.distributed as dist

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            by_dtype = {}
            for index, grad in enumerate(grads):
                if grad is not None:
                    by_dtype.setdefault(grad.dtype, []).append(index)
            for dtype in sorted(by_dtype, key=str):
                indices = by_dtype[dtype]
                flat = torch.cat([grads[i].reshape(-1) for i in indices])
                dist.all_reduce(flat)
                flat /= world
                for i, part in zip(indices, torch.split(flat, [grads[i].numel() for i in indices])):
                    grads[i] = part.view_as(grads[i])
            return type(optimizer).apply(optimizer, grads, trainable_variables)

        optimizer.apply = apply
        try:
            yield
        finally:
            del optimizer.apply

    class PostOptimizerStep(_KeepsFreedHostMemory):
        """Mixin for a ``keras.Model`` defining ``after_optimizer_step()``; data parallel over
        ``torch.distributed`` ranks when a process group is initialised (see module doc)."""

        def train_step(self, data):
            world = _torch_world_size()
            if world == 1:
                snapshot = _pre_step_values(self)
                super().train_step(data)
                return self.after_optimizer_step(snapshot)
            if not self.__dict__.get("_ranks_synchronised", False):
                _broadcast_from_rank0(self.weights)
                if self.optimizer is not None and self.optimizer.built:
                    _broadcast_from_rank0(self.optimizer.variables)
                self.__dict__["_ranks_synchronised"] = True
            snapshot = _pre_step_values(self)
            with _gradients_averaged_over_ranks(self.optimizer, world):
                super().train_step(data)
            return self.after_optimizer_step(snapshot)

else:

    class PostOptimizerStep(_KeepsFreedHostMemory):
        """Mixin for a ``keras.Model`` defining ``after_optimizer_step()``."""

        def train_step(self, data):
            snapshot = _pre_step_values(self)
            super().train_step(data)
            return self.after_optimizer_step(snapshot)


DataParallelSetup = collections.namedtuple(
    "DataParallelSetup", ["scope", "shard_index", "num_shards", "num_replicas"]
)


def data_parallel():
    """Set up data parallel training on this backend; returns a ``DataParallelSetup``
    ``(scope, shard_index, num_shards, num_replicas)``.

    Build the model and call ``fit`` inside ``scope``; this process's data source must yield
    part ``shard_index`` of ``num_shards`` equal parts of every global batch
    (``build_pipeline(config, source, num_shards=..., shard_index=...)``); ``num_replicas`` devices
    share each global batch.

    - JAX: ``keras.distribution.DataParallel`` over every device of every process; with
      ``KERAS_DISTRIBUTION_NUM_PROCESSES`` (and ``..._JOB_ADDRESSES``, ``..._PROCESS_ID``) set,
      first ``keras.distribution.initialize()`` (multi-host). One shard per process.
    - TensorFlow: ``tf.distribute.MirroredStrategy`` over the local GPUs (else the CPU); the
      strategy splits the global batch itself: one shard.
    - PyTorch: a ``torch.distributed`` process group from the ``torchrun`` environment
      (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL with
      GPU ``LOCAL_RANK``, else gloo. One shard per rank; ``IBOT``'s train step then broadcasts
      rank 0's weights and averages gradients over the ranks.
    """
    if _BACKEND == "jax":
        import jax

        if os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES") or os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return DataParallelSetup(
            contextlib.nullcontext(), jax.process_index(), jax.process_count(), jax.device_count()
        )
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        return DataParallelSetup(strategy.scope(), 0, 1, strategy.num_replicas_in_sync)
    if _BACKEND == "torch":
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if "RANK" not in os.environ:
                raise RuntimeError(
                    "PyTorch data parallel runs one process per device: launch with torchrun, "
                    "e.g. `torchrun --nproc_per_node=2 examples/pretrain.py --distribute`."
                )
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        world = dist.get_world_size()
        return DataParallelSetup(contextlib.nullcontext(), dist.get_rank(), world, world)
    raise NotImplementedError(f"Data parallel training is not implemented for the {_BACKEND} backend.")


MULTI_TENSOR_ADAMW = _BACKEND == "torch"


def multi_tensor_adamw(params, grads, momentums, velocities, counts, decayed, weight_decay, frozen, unfrozen,
                       learning_rate, beta_1, beta_2, epsilon, clip_grad, skip_nonfinite):
    """torch: ``IBOTAdamW.update_step`` for every variable at once, in place, no host read.

    ``params``, ``momentums``, ``velocities``: tensors; ``counts``: 0-d float32 step counts;
    ``decayed``, ``frozen``: per variable, whether ``weight_decay`` (0-d) applies and whether it
    updates only where ``unfrozen`` (0-d, 1 or 0); ``enabled`` below is 1 where a variable may
    update. With ``skip_nonfinite``, a
    non-finite gradient norm anywhere leaves every variable as it is; returns that flag (a 0-d
    bool tensor). Each variable gets ``a = enabled * (all finite)`` and
    ``p, m, v, k = p(1 - a lr wd), m + a(1 - b1)(g - m), v(1 - a(1 - b2)) + a(1 - b2) g^2,
    k + a``, then ``p -= (a lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps)``: for a = 1
    the per-variable formulas (``1 - (1 - b2)`` is ``b2`` exactly in float32), for a = 0 no bit
    changes."""
    import torch

    with torch.no_grad():
        return _multi_tensor_adamw(params, grads, momentums, velocities, counts, decayed, weight_decay, frozen,
                                   unfrozen, learning_rate, beta_1, beta_2, epsilon, clip_grad, skip_nonfinite)


def _multi_tensor_adamw(params, grads, momentums, velocities, counts, decayed, weight_decay, frozen, unfrozen,
                        learning_rate, beta_1, beta_2, epsilon, clip_grad, skip_nonfinite):
    import torch

    grads = [g.to(p.dtype) for g, p in zip(grads, params)]
    norms = torch.stack(torch._foreach_norm(grads)).float()
    enabled = torch.ones_like(norms)
    if any(frozen):
        mask = torch.tensor(frozen, device=norms.device)
        enabled = torch.where(mask, torch.as_tensor(unfrozen, dtype=torch.float32, device=norms.device), enabled)
    skipped = torch.logical_not(torch.isfinite(norms).all())
    active = enabled * torch.logical_not(skipped).float() if skip_nonfinite else enabled
    if clip_grad > 0:
        scale = torch.clamp(clip_grad / (norms + 1e-6), max=1.0)
        if skip_nonfinite:
            scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
        grads = torch._foreach_mul(grads, list(scale.unbind()))
    elif skip_nonfinite:
        grads = [g.clone() for g in grads]
    if skip_nonfinite:
        for g in grads:  # a skipped gradient must not reach the moments as NaN * 0
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    lr = torch.as_tensor(learning_rate, dtype=torch.float32)
    new_counts = torch.stack(list(counts)) + active
    for count, value in zip(counts, new_counts.unbind()):
        count.copy_(value)
    safe = torch.where(active > 0, new_counts, torch.ones_like(new_counts))
    bias_correction1 = 1.0 - torch.pow(torch.tensor(beta_1, dtype=torch.float32), safe)
    bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(torch.tensor(beta_2, dtype=torch.float32), safe))
    step = active * lr / bias_correction1
    m_weight = active * (1.0 - beta_1)
    v_weight = active * (1.0 - beta_2)
    torch._foreach_lerp_(momentums, grads, list(m_weight.unbind()))
    torch._foreach_mul_(velocities, list((1.0 - v_weight).unbind()))
    # v + ((1 - b2) g) g: the official addcmul_(grad, grad, value=1 - b2), in its order.
    torch._foreach_addcmul_(velocities, torch._foreach_mul(grads, list(v_weight.unbind())), grads)
    decayed = [i for i, flag in enumerate(decayed) if flag]
    if decayed:
        factors = 1.0 - active[decayed] * lr * torch.as_tensor(weight_decay, dtype=torch.float32)
        torch._foreach_mul_([params[i] for i in decayed], list(factors.unbind()))
    denominators = torch._foreach_sqrt(velocities)
    torch._foreach_div_(denominators, list(bias_correction2_sqrt.unbind()))
    torch._foreach_add_(denominators, epsilon)
    # p + (m / denominator)(-step): the official addcdiv_(m, denominator, value=-step), in its order.
    ratios = torch._foreach_div(momentums, denominators)
    torch._foreach_addcmul_(params, ratios, list((-step).unbind()))
    return skipped


MULTI_TENSOR_EMA = _BACKEND == "torch"


def multi_tensor_ema(pairs, one_minus_momentum, applied=None):
    """torch: ``ibot_keras.models.ema.ema_update`` of every ``(student, teacher)`` variable pair
    at once, in place: ``teacher * m + student * (1 - m)`` (the per-variable form's arithmetic).
    A skipped step (``applied`` False) takes ``m = 1`` and ``1 - m = 0``: the teacher keeps
    every bit, as the student variables are finite there (a skipped step left them as they were
    after the last applied one, whose EMA read them)."""
    import torch

    with torch.no_grad():
        teachers = [teacher.value for _, teacher in pairs]
        students = [student.value.to(teacher.dtype) for (student, _), teacher in zip(pairs, teachers)]
        device = teachers[0].device
        weight = torch.as_tensor(one_minus_momentum, dtype=torch.float32, device=device)
        momentum = 1.0 - weight
        if applied is not None:
            applied = torch.as_tensor(applied, device=device)
            momentum = torch.where(applied, momentum, torch.ones_like(momentum))
            weight = torch.where(applied, weight, torch.zeros_like(weight))
        torch._foreach_mul_(teachers, momentum)
        torch._foreach_add_(teachers, torch._foreach_mul(students, weight))


def set_random_seed(seed):
    """``keras.utils.set_random_seed`` (Python, NumPy, Keras and backend seeds) without
    importing TensorFlow into a JAX or PyTorch process.

    Keras' version also seeds TensorFlow whenever it is installed, which imports it: ~400 MB of
    resident memory and seconds of start-up for a user who never runs TensorFlow. When another
    backend is selected and TensorFlow is not imported yet, it is hidden from that one call
    (by Keras' lazy TensorFlow module, the one private Keras state this package touches).
    """
    if _BACKEND == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    try:
        from keras.src.utils import module_utils

        lazy_tensorflow = module_utils.tensorflow
        previous = lazy_tensorflow._available
    except (ImportError, AttributeError):  # another Keras layout: accept the import
        keras.utils.set_random_seed(seed)
        return
    lazy_tensorflow._available = False
    try:
        keras.utils.set_random_seed(seed)
    finally:
        lazy_tensorflow._available = previous
