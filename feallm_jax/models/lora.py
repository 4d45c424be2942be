"""LoRA adapters (Hu et al. 2021) with the ``alpha / r`` scale that ``nnx.LoRA`` lacks.

``delta(x) = dropout(x) @ A @ B * alpha / r``; ``A`` is Kaiming-uniform like PEFT, ``B`` starts
at zero so a fresh adapter leaves the base model unchanged. Both are ``nnx.LoRAParam``, a type
distinct from the frozen base weights, so the optimizer can select them by type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 128
  alpha: float = 256.0
  dropout: float = 0.05
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"lora.rank must be positive, got {self.rank}")
    unknown = set(self.targets) - set(DEFAULT_TARGETS)
    if unknown:
      raise ValueError(f"lora.targets: unknown projection(s) {sorted(unknown)}; "
                       f"choose from {DEFAULT_TARGETS}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def for_target(self, name: str) -> "LoRAConfig | None":
    """This config when ``name`` (q, k, v, o, gate, up, down) carries an adapter, else None."""
    return self if name in self.targets else None

  @classmethod
  def from_dict(cls, d) -> "LoRAConfig":
    d = dict(d)
    d.pop("enabled", None)
    if "targets" in d:
      d["targets"] = tuple(d["targets"])
    return cls(**d)


class LoRA(nnx.Module):
  """The low-rank update of one ``[in, out]`` kernel."""

  def __init__(self, in_features: int, out_features: int, config: LoRAConfig, *,
               axes: tuple[str | None, str | None] = (None, None), rngs: nnx.Rngs):
    self.scale = config.scale
    self.merged = False
    bound = math.sqrt(6.0 / ((1 + 5.0) * in_features))  # kaiming_uniform(a=sqrt(5)), as PEFT
    self.lora_a = nnx.LoRAParam(
        jax.random.uniform(rngs.params(), (in_features, config.rank), jnp.float32, -bound, bound),
        out_sharding=(axes[0], "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, out_features), jnp.float32),
                                out_sharding=("lora_rank", axes[1]))
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

  def delta_kernel(self) -> jax.Array:
    return (self.lora_a[...] @ self.lora_b[...]) * self.scale

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.merged:
      return jnp.zeros((*x.shape[:-1], self.lora_b.shape[-1]), x.dtype)
    if self.dropout is not None:
      x = self.dropout(x)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    return (x @ a @ b) * jnp.asarray(self.scale, x.dtype)


def _adapted_layers(model: nnx.Module):
  for _, module in model.iter_modules():
    lora = getattr(module, "lora", None)
    if isinstance(lora, LoRA) and hasattr(module, "kernel"):
      yield module, lora


def merge(model: nnx.Module, dtype=None) -> int:
  """Folds every adapter (with ``dtype``: every adapter whose kernel has that dtype) into its
  base kernel (export, evaluation); returns how many were merged."""
  n = 0
  for layer, lora in _adapted_layers(model):
    if dtype is not None and layer.kernel[...].dtype != jnp.dtype(dtype):
      continue
    if getattr(layer, "kernel_out_in", False):
      raise ValueError("lora.merge: this layer's kernel is stored [out, in] (an evaluation "
                       "view, generate.eval_view); merge into the model the view came from")
    if not lora.merged:
      kernel = layer.kernel[...]
      layer.kernel[...] = (kernel.astype(jnp.float32) + lora.delta_kernel()).astype(kernel.dtype)
      lora.merged = True
      n += 1
  return n


def unmerge(model: nnx.Module) -> int:
  """Undoes :func:`merge` (up to rounding in the kernel's dtype)."""
  n = 0
  for layer, lora in _adapted_layers(model):
    if lora.merged:
      kernel = layer.kernel[...]
      layer.kernel[...] = (kernel.astype(jnp.float32) - lora.delta_kernel()).astype(kernel.dtype)
      lora.merged = False
      n += 1
  return n


def count(model: nnx.Module, targets: Sequence[str] | None = None) -> int:
  """Number of adapted layers (optionally only those whose path ends in one of ``targets``)."""
  n = 0
  for path, module in model.iter_modules():
    if isinstance(getattr(module, "lora", None), LoRA):
      if targets is None or (path and str(path[-1]) in targets):
        n += 1
  return n
