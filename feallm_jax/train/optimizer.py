"""optax AdamW with one learning rate per kind of trainable weight.

Weights are grouped by their *variable type* (docs/conventions.md, "Freeze by variable type"),
not by name patterns, so a new module gets the right learning rate without touching this file:

  ``nnx.LoRAParam``      -> ``optim.lr_lora``   (adapters)
  ``layers.BaseParam``   -> ``optim.lr_base``   (a backbone that trains fully)
  any other ``nnx.Param``-> ``optim.lr_proj``   (projector, Local Clue Aggregator)

One optimizer update happens per train step (gradient accumulation runs inside the step), so the
schedules count updates and span ``train.num_steps``.
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


def make_schedule(peak: float, config) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup to ``peak`` over ``optim.warmup_frac`` of the run, then the chosen decay."""
  o, num_steps = config.optim, int(config.train.num_steps)
  if num_steps <= 0:
    raise ValueError(f"train.num_steps must be positive, got {num_steps}")
  if not 0.0 <= float(o.warmup_frac) < 1.0:
    raise ValueError(f"optim.warmup_frac must be in [0, 1), got {o.warmup_frac}")
  warmup = int(round(float(o.warmup_frac) * num_steps))
  name = str(o.get("schedule", "cosine"))
  if name == "cosine":
    decay = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=0.0)
  elif name == "linear":
    decay = optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))
  elif name == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule: unknown {name!r}; choose cosine, linear or constant")
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def schedules(config) -> dict[str, Callable[[jax.Array], jax.Array]]:
  """``group -> lr(step)`` for every group."""
  out = {}
  for group, key in _LR_KEYS.items():
    lr = float(config.optim[key])
    if lr < 0:
      raise ValueError(f"optim.{key} must be >= 0, got {lr}")
    out[group] = make_schedule(lr, config)
  return out


def _decay_mask(params: Any) -> Any:
  # Norm scales and biases (1-D) are not decayed, as in LLaVA / HF Trainer.
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make(config, var_state: nnx.State) -> tuple[optax.GradientTransformation,
                                                 dict[str, Callable]]:
  """Returns ``(tx, schedules)`` for the trainable ``var_state`` (Variables, not pure arrays).

  The transformation works on ``nnx.as_pure(var_state)``: global-norm clipping over all
  groups, then AdamW with each group's schedule.
  """
  o = config.optim
  scheds = schedules(config)
  per_group = {}
  for group in GROUPS:
    per_group[group] = optax.adamw(
        learning_rate=scheds[group], b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
        weight_decay=float(o.weight_decay), mask=_decay_mask)
  parts = []
  if o.grad_clip and float(o.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  parts.append(optax.multi_transform(per_group, labels(var_state)))
  return optax.chain(*parts), scheds


def learning_rates(scheds: Mapping[str, Callable], count: jax.Array,
                   present: Mapping[str, int]) -> dict[str, jax.Array]:
  """``lr_<group>`` at update ``count`` for the groups that hold weights."""
  return {f"lr_{g}": scheds[g](count) for g in GROUPS if present.get(g, 0)}
