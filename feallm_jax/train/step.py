"""The jitted train step: split model state, gradient accumulation, skip of non-finite updates.

The model is split once into ``graphdef`` (static), trainable weights, frozen weights and the rest
(RNG keys/counts). Only the trainable part gets gradients and optimizer state; the frozen part is
an input of the step that is never donated nor returned, so it cannot change. Python graph walks
(``nnx.merge``) happen at trace time only: the hot loop calls one compiled function.

The learning-rate schedules' lengths (``optimizer.horizon``: warmup and decay updates, from
``train.num_steps``) are an argument of the step too, never constants of the program: a run
resumed with a longer ``train.num_steps`` compiles the identical program, which JAX's
persistent compilation cache then serves instead of compiling again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from feallm_jax import sharding
from feallm_jax.models import layers
from feallm_jax.train import optimizer as optimizer_lib

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array          # batches consumed (int32)
  updates: jax.Array       # optimizer updates applied; the schedules' position (int32)
  params: Any              # pure nnx.State of the trainable weights
  opt_state: Any           # optax state over ``params``
  rest: Any                # pure nnx.State of non-parameter model state (RNG streams)
  skipped: jax.Array       # non-finite steps skipped so far (int32)
  bad_streak: jax.Array    # consecutive non-finite steps (int32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _cast_floats(tree: Any, dtype) -> Any:
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(cast, tree)


def _micro_batches(batch: Mapping[str, jax.Array], k: int, mesh: Mesh) -> dict[str, jax.Array]:
  """``[B, ...] -> [k, B/k, ...]`` taking every k-th row, so each micro-batch stays spread
  over all batch shards (a contiguous split would put a micro-batch on a few devices)."""
  out = {}
  for key, x in batch.items():
    b = x.shape[0]
    y = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, ("data", "fsdp"), *([None] * (x.ndim - 1)))
    out[key] = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return out


class Trainer:
  """Owns the split model, the optimizer and the compiled step for one mesh.

  The model handed in stays usable: the train state starts from a copy of its trainable
  weights and RNG state (the step donates its state), and shares only the frozen weights."""

  def __init__(self, config, model: nnx.Module, mesh: Mesh, *, loss_fn: LossFn,
               trainable: Any):
    self.config, self.mesh, self.loss_fn = config, mesh, loss_fn
    self.accum_steps = int(config.optim.get("accum_steps", 1))
    if self.accum_steps < 1:
      raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
    self.trainable = trainable
    # Dropout on, whatever mode the model arrives in: the step is training by definition.
    model = layers.with_dropout(model, True)
    graphdef, params_v, frozen_v, rest_v = nnx.split(model, trainable, nnx.Param, ...)
    if not nnx.to_flat_state(params_v).leaves:
      raise ValueError("trainable_filter selects no weights: nothing would train "
                       f"(model.train_llm={config.model.get('train_llm')!r})")
    self.graphdef = graphdef
    self.group_sizes = optimizer_lib.group_sizes(params_v)
    self.tx, self.schedules = optimizer_lib.make(config, params_v)
    self.horizon = optimizer_lib.horizon(config)   # python ints; the step gets them as arrays
    frozen = nnx.as_pure(frozen_v)
    frozen_dtype = config.model.get("frozen_dtype", "")
    if frozen_dtype:
      frozen = _cast_floats(frozen, dtype_of(frozen_dtype))
    params, rest = nnx.as_pure(params_v), nnx.as_pure(rest_v)
    # An abstract model (``feallm.abstract_model``: ShapeDtypeStructs) gives an abstract trainer:
    # shardings and the compiled step exist, no buffer does (ahead-of-time compilation).
    self.is_abstract = any(isinstance(x, jax.ShapeDtypeStruct)
                           for x in jax.tree.leaves((params, frozen, rest)))
    with jax.set_mesh(mesh):
      shapes = jax.eval_shape(self._fresh_state, params, rest)
    self.state_shardings = self._state_shardings(shapes, params, rest)
    self._abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
        self.state_shardings)
    self.frozen_shardings = jax.tree.map(self._own_or_replicated, frozen)
    if self.is_abstract:
      self._initial = None
      self.frozen = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen,
          self.frozen_shardings)
    else:
      with jax.set_mesh(mesh):
        state = self._fresh_state(params, rest)
      # A copy, never the model's own buffers: the step donates its state, and an aliased
      # initial state would delete the caller's trainable weights and dropout streams with the
      # first step (a model still used for evaluation then fails with "Array has been
      # deleted"). It costs one copy of the trainable weights (LoRA, projector, LCA), not of
      # the frozen base, which is never donated and stays shared.
      self._initial = jax.device_put(state, self.state_shardings, may_alias=False)
      self.frozen = jax.device_put(frozen, self.frozen_shardings)
    replicated = NamedSharding(mesh, P())
    self._horizon_abstract = {k: jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
                              for k in self.horizon}
    self._horizon = (self._horizon_abstract if self.is_abstract else
                     {k: jax.device_put(np.asarray(v, np.int32), replicated)
                      for k, v in self.horizon.items()})
    self._compiled: dict[Any, Any] = {}

  # -- state ---------------------------------------------------------------------------------

  def _fresh_state(self, params: Any, rest: Any) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: each one is donated
    return TrainState(step=zero(), updates=zero(), params=params, opt_state=self.tx.init(params),
                      rest=rest, skipped=zero(), bad_streak=zero())

  def _own_or_replicated(self, x: Any) -> NamedSharding:
    """The array's own sharding when it is laid out on this mesh, else replicated on it."""
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.shape_tuple == self.mesh.shape_tuple:
      if isinstance(s.mesh, jax.sharding.AbstractMesh):    # abstract build: spec only
        return NamedSharding(self.mesh, s.spec)
      if s.mesh.devices.tolist() == self.mesh.devices.tolist():
        return s
    return NamedSharding(self.mesh, P())

  def _zero1(self, shape: tuple[int, ...], s: NamedSharding) -> NamedSharding:
    """ZeRO-1 for weights the rules replicate (projector, LCA, norms): their Adam moments are
    split over ``fsdp`` along the first free divisible dimension, so optimizer memory per device
    falls with the fsdp size even where parameters stay replicated."""
    n = self.mesh.shape.get("fsdp", 1)
    if n <= 1 or not shape:
      return s
    spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
    axes = [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in spec]
    if any("fsdp" in a for a in axes):
      return s
    for d in range(len(shape)):
      # A dimension split only over size-1 mesh axes is as good as free.
      if all(self.mesh.shape[a] == 1 for a in axes[d]) and shape[d] % n == 0:
        spec[d] = "fsdp"
        return NamedSharding(self.mesh, P(*spec))
    return s

  def _state_shardings(self, shapes: TrainState, params: Any, rest: Any) -> TrainState:
    """Shardings of the whole train state, derived from shapes alone (nothing allocated).

    Parameters keep their own sharding; an optimizer-state leaf that mirrors a parameter (same
    tree path suffix and shape: Adam's moments) takes the parameter's sharding, then ZeRO-1;
    everything else (counts, RNG state) is replicated unless it already lives on this mesh.
    """
    by_path = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      by_path[tuple(jax.tree_util.keystr((k,)) for k in path)] = (
          tuple(x.shape), self._own_or_replicated(x))

    def opt_leaf(path, x):
      keys = tuple(jax.tree_util.keystr((k,)) for k in path)
      for i in range(len(keys)):
        hit = by_path.get(keys[i:])
        if hit is not None and hit[0] == tuple(x.shape):
          return self._zero1(tuple(x.shape), hit[1])
      return NamedSharding(self.mesh, P())

    own = lambda tree: jax.tree.map(self._own_or_replicated, tree)
    replicated = NamedSharding(self.mesh, P())
    return TrainState(
        step=replicated, updates=replicated, params=own(params),
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, shapes.opt_state),
        rest=own(rest),
        skipped=replicated, bad_streak=replicated)

  def initial_state(self) -> TrainState:
    """The freshly initialized state (hand it over once: the step donates its input)."""
    if self.is_abstract:
      raise RuntimeError("this Trainer was built from an abstract model: it has shapes and "
                         "shardings only (use lower() to compile its step ahead of time)")
    state, self._initial = self._initial, None
    if state is None:
      raise RuntimeError("initial_state() was already taken; it is donated to the first step")
    return state

  def abstract_state(self) -> TrainState:
    """Shape/dtype/sharding of the state on this mesh: the target for checkpoint restores."""
    return self._abstract

  def merge(self, state: TrainState) -> nnx.Module:
    """A model object holding ``state``'s weights (for evaluation or export): dropout off."""
    return layers.with_dropout(nnx.merge(self.graphdef, state.params, self.frozen, state.rest),
                               False)

  # -- the step ------------------------------------------------------------------------------

  def _loss_and_grad(self, params, frozen, rest, batch):
    def fn(p, r):
      model = nnx.merge(self.graphdef, p, frozen, r)
      loss, metrics = self.loss_fn(model, batch)
      new_rest = nnx.as_pure(nnx.split(model, self.trainable, nnx.Param, ...)[3])
      tokens = jax.lax.stop_gradient(jnp.asarray(metrics["tokens"], jnp.float32))
      return loss.astype(jnp.float32) * tokens, (metrics, new_rest, tokens)
    (loss_sum, (metrics, new_rest, tokens)), grads = jax.value_and_grad(fn, has_aux=True)(
        params, rest)
    # Token-weighted like the loss, so micro-batches average the same way (accuracy, and the
    # loss parts a loss_fn reports beside it, e.g. lm_loss / label_loss).
    sums = {k: jnp.asarray(v, jnp.float32) * tokens for k, v in metrics.items()
            if k not in ("loss", "tokens")}
    return grads, new_rest, loss_sum, sums, tokens

  def _train_step(self, state: TrainState, frozen, batch, horizon):
    k = self.accum_steps
    if k == 1:
      grads, rest, loss_sum, sums, tokens = self._loss_and_grad(state.params, frozen,
                                                                state.rest, batch)
    else:
      micro = _micro_batches(batch, k, self.mesh)

      def body(carry, mb):
        g_acc, r, l_acc, t_acc = carry
        g, r, l, s, t = self._loss_and_grad(state.params, frozen, r, mb)
        g_acc = jax.tree.map(lambda x, y: x + y.astype(x.dtype), g_acc, g)
        return (g_acc, r, l_acc + l, t_acc + t), s   # metric parts stacked, summed below

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      z = jnp.zeros((), jnp.float32)
      (grads, rest, loss_sum, tokens), parts = jax.lax.scan(
          body, (zeros, state.rest, z, z), micro)
      sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), parts)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params, horizon=horizon)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    lrs = optimizer_lib.learning_rates(self.schedules, state.updates, self.group_sizes, horizon)
    new_state = state.replace(
        step=state.step + 1,
        updates=state.updates + finite.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        rest=rest,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_streak=jnp.where(finite, 0, state.bad_streak + 1).astype(jnp.int32))
    parts = {k: v / denom for k, v in sums.items()}
    parts.setdefault("accuracy", jnp.zeros((), jnp.float32))
    metrics = dict(loss=loss, tokens=tokens, grad_norm=grad_norm,
                   finite=finite, skipped=new_state.skipped, bad_streak=new_state.bad_streak,
                   **parts, **lrs)
    return new_state, metrics

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    shards = sharding.batch_shards(self.mesh)
    out = {}
    for key, x in batch.items():
      b = x.shape[0]
      if b % (shards * self.accum_steps):
        raise ValueError(
            f"batch[{key!r}] has {b} rows: must divide into optim.accum_steps="
            f"{self.accum_steps} micro-batches over {shards} data x fsdp shards")
      out[key] = sharding.batch_sharding(self.mesh, x.ndim)
    return out

  def jitted(self, batch: Mapping[str, Any]):
    """The compiled-once step ``(state, frozen, batch, horizon) -> (state, metrics)`` for
    batches shaped like ``batch`` (explicit shardings; :meth:`step` supplies the rest)."""
    key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
    fn = self._compiled.get(key)
    if fn is None:
      replicated = NamedSharding(self.mesh, P())
      fn = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, self.frozen_shardings,
                                 self.batch_shardings(batch), replicated),
                   out_shardings=(self.state_shardings, replicated),
                   donate_argnums=(0,))
      self._compiled[key] = fn
    return fn

  def lower(self, batch: Mapping[str, Any]):
    """Lowers the exact step :meth:`step` runs (same jit, shardings and donation) for batches
    shaped like ``batch`` (arrays or ShapeDtypeStructs): nothing is allocated, and
    ``.compile()`` gives XLA's memory and cost analysis for the mesh's devices, which may be
    an ahead-of-time TPU topology (``feallm_jax.aot``)."""
    shardings = self.batch_shardings(batch)
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_batch = {k: spec(v, shardings[k]) for k, v in batch.items()}
    frozen = jax.tree.map(spec, self.frozen, self.frozen_shardings)
    with jax.set_mesh(self.mesh):
      return self.jitted(batch).lower(self._abstract, frozen, abstract_batch,
                                      self._horizon_abstract)

  def step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    """One update; ``state`` is donated (do not reuse it)."""
    self._initial = None  # its buffers may be donated below
    with jax.set_mesh(self.mesh):
      return self.jitted(batch)(state, self.frozen, batch, self._horizon)

  def put_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over data x fsdp."""
    return sharding.global_batch(local, self.mesh)
