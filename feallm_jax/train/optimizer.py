"""optax AdamW with one learning rate per kind of trainable weight.

Weights are grouped by their *variable type* (docs/conventions.md, "Freeze by variable type"),
not by name patterns, so a new module gets the right learning rate without touching this file:

  ``nnx.LoRAParam``      -> ``optim.lr_lora``   (adapters)
  ``layers.BaseParam``   -> ``optim.lr_base``   (a backbone that trains fully)
  any other ``nnx.Param``-> ``optim.lr_proj``   (projector, Local Clue Aggregator)

One optimizer update happens per train step (gradient accumulation runs inside the step), so the
schedules count updates and span ``train.num_steps``. Their lengths (:func:`horizon`) enter the
compiled step as arguments, so a run resumed with a longer ``train.num_steps`` reuses the
compiled program instead of compiling a new one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from feallm_jax.models import layers

GROUPS = ("lora", "base", "proj")
_LR_KEYS = {"lora": "lr_lora", "base": "lr_base", "proj": "lr_proj"}


def group_of(var: nnx.Variable) -> str:
  """The learning-rate group of one trainable variable."""
  if isinstance(var, nnx.LoRAParam):
    return "lora"
  if isinstance(var, layers.BaseParam):
    return "base"
  if isinstance(var, nnx.Param):
    return "proj"
  raise TypeError(f"{type(var).__name__} is not a parameter type the optimizer knows; "
                  "only nnx.Param subclasses can be trainable")


def labels(var_state: nnx.State) -> nnx.State:
  """A State of group names with the structure of ``nnx.as_pure(var_state)``."""
  flat = [(path, group_of(var)) for path, var in nnx.to_flat_state(var_state)]
  return nnx.from_flat_state(flat)


def group_sizes(var_state: nnx.State) -> dict[str, int]:
  """Number of trainable scalars per group (for the start-up overview)."""
  out = {g: 0 for g in GROUPS}
  for _, var in nnx.to_flat_state(var_state):
    out[group_of(var)] += math.prod(var.get_value().shape)   # abstract values too
  return out


SCHEDULES = ("cosine", "linear", "constant")


def horizon(config) -> dict[str, int]:
  """``{"warmup": w, "decay": d}``: the schedules' lengths in updates, from ``train.num_steps``
  and ``optim.warmup_frac`` (linear warmup for ``w`` updates, then ``d`` of decay).

  The train step takes them as arguments, not as constants folded into the program: a resumed
  run that extends ``train.num_steps`` (or a rerun with another length) then runs the same
  compiled step, and JAX's persistent compilation cache serves it (``compile_cache``).
  """
  o, num_steps = config.optim, int(config.train.num_steps)
  if num_steps <= 0:
    raise ValueError(f"train.num_steps must be positive, got {num_steps}")
  if not 0.0 <= float(o.warmup_frac) < 1.0:
    raise ValueError(f"optim.warmup_frac must be in [0, 1), got {o.warmup_frac}")
  warmup = int(round(float(o.warmup_frac) * num_steps))
  return {"warmup": warmup, "decay": max(num_steps - warmup, 1)}


def schedule_kind(config) -> str:
  name = str(config.optim.get("schedule", "cosine"))
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule: unknown {name!r}; choose cosine, linear or constant")
  return name


def lr_at(count: jax.Array, peak: float, kind: str, h: Mapping[str, Any]) -> jax.Array:
  """The learning rate after ``count`` updates: linear warmup from 0 to ``peak`` over
  ``h["warmup"]`` updates, then ``kind`` decay over ``h["decay"]`` (optax's formulas:
  ``linear_schedule``, ``cosine_decay_schedule``, ``join_schedules``). ``h``'s values may be
  traced arrays."""
  count = jnp.asarray(count)
  warmup, decay = h["warmup"], h["decay"]
  c = count - warmup
  if kind == "cosine":
    done = jnp.minimum(c, decay)
    after = peak * (0.5 * (1 + jnp.cos(jnp.pi * done / decay)))
  elif kind == "linear":
    after = (peak - 0.0) * (1 - jnp.clip(c, 0, decay) / decay) + 0.0
  elif kind == "constant":
    after = jnp.full((), peak, jnp.float32)
  else:
    raise ValueError(f"optim.schedule: unknown {kind!r}; choose cosine, linear or constant")
  ramp = (0.0 - peak) * (1 - jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1)) + peak
  return jnp.where(count < warmup, ramp, after).astype(jnp.float32)


def make_schedule(peak: float, config) -> Callable[..., jax.Array]:
  """``lr(count, horizon=None)``: linear warmup to ``peak`` over ``optim.warmup_frac`` of the run,
  then the chosen decay; ``horizon`` (default: :func:`horizon` of ``config``) may be traced."""
  kind, default = schedule_kind(config), horizon(config)

  def schedule(count, h: Mapping[str, Any] | None = None) -> jax.Array:
    return lr_at(count, peak, kind, default if h is None else h)
  return schedule


def schedules(config) -> dict[str, Callable[..., jax.Array]]:
  """``group -> lr(step, horizon=None)`` for every group."""
  out = {}
  for group, key in _LR_KEYS.items():
    lr = float(config.optim[key])
    if lr < 0:
      raise ValueError(f"optim.{key} must be >= 0, got {lr}")
    out[group] = make_schedule(lr, config)
  return out


def scale_by_lr(schedule: Callable[..., jax.Array]) -> optax.GradientTransformationExtraArgs:
  """optax's ``scale_by_learning_rate(schedule)`` (same state, same arithmetic), with the
  schedule's horizon taken from the ``horizon=`` extra argument of ``update`` when given."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, horizon=None, **extra_args):
    del params, extra_args
    step_size = -1 * schedule(state.count, horizon)
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _decay_mask(params: Any) -> Any:
  # Norm scales and biases (1-D) are not decayed, as in LLaVA / HF Trainer.
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make(config, var_state: nnx.State) -> tuple[optax.GradientTransformation,
                                                 dict[str, Callable]]:
  """Returns ``(tx, schedules)`` for the trainable ``var_state`` (Variables, not pure arrays).

  The transformation works on ``nnx.as_pure(var_state)``: global-norm clipping over all
  groups, then AdamW with each group's schedule (``optax.adamw``'s chain and state; the
  schedules' horizon comes from ``tx.update(..., horizon=h)``, else from ``config``).
  """
  o = config.optim
  scheds = schedules(config)
  per_group = {}
  for group in GROUPS:
    per_group[group] = optax.chain(
        optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)),
        optax.add_decayed_weights(float(o.weight_decay), _decay_mask),
        scale_by_lr(scheds[group]))
  parts = []
  if o.grad_clip and float(o.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  parts.append(optax.multi_transform(per_group, labels(var_state)))
  return optax.chain(*parts), scheds


def learning_rates(scheds: Mapping[str, Callable], count: jax.Array,
                   present: Mapping[str, int], h: Mapping[str, Any] | None = None
                   ) -> dict[str, jax.Array]:
  """``lr_<group>`` at update ``count`` (schedules' horizon ``h``, default the config's) for
  the groups that hold weights."""
  return {f"lr_{g}": scheds[g](count, h) for g in GROUPS if present.get(g, 0)}
