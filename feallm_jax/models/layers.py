"""Building blocks shared by every tower: typed parameters, Dense with an optional LoRA
adapter, norms, and one attention function.

Freezing is by variable *type* (docs/conventions.md, "Freeze by variable type"): weights that
come from a pretrained checkpoint are ``BaseParam``; adapters are ``nnx.LoRAParam``; new FEALLM
weights (Local Clue Aggregator, projector) are plain ``nnx.Param``. Filters over these types
decide what trains, so gradients and optimizer state exist only for trainable weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from feallm_jax.models import lora as lora_lib

Dtype = Any
Axes = tuple[str | None, ...]


class BaseParam(nnx.Param):
  """A pretrained backbone weight (vision encoder, LLM). Frozen unless its tower is unfrozen."""


def with_dropout(model: nnx.Module, enabled: bool) -> nnx.Module:
  """A view of ``model`` (the same arrays) with every dropout layer on (training) or off
  (evaluation, scoring, generation, export).

  Why a view: one built model serves both modes without being rebuilt or mutated, and the flag
  is static (it lives in the graphdef), so each mode compiles once. The train step takes the
  "on" view of whatever model it is given; every evaluation entry point takes the "off" view.
  """
  return nnx.view(model, only=nnx.Dropout, deterministic=not enabled, raise_if_not_found=False)


def param(param_type: type[nnx.Variable], init: Callable, key: jax.Array, shape: Sequence[int],
          dtype: Dtype, axes: Axes) -> nnx.Variable:
  """Creates a variable with logical-axis sharding metadata (sharded at creation under a mesh)."""
  return param_type(init(key, tuple(shape), dtype), out_sharding=tuple(axes))


def dot_out_in(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """``x @ w.T`` for a weight stored ``[out, in]`` (``x [..., in]`` -> ``[..., out]``).

  Why: a decode step multiplies a few rows by every weight, a stream over the weights. With
  the weight stored ``[out, in]`` (contracted along its contiguous axis) XLA:CPU's GEMM ran the
  8-row, 8-layer chain of ``configs/bench_small.py`` 2-9 % faster than ``x @ W[in, out]``
  (interleaved in one process, rotated order, duplicate jits to calibrate). Putting the weight
  first (``w @ x.T``) compiles to the same HLO. The same products per output; the summation
  order inside the GEMM kernel may differ (~1e-6 relative)."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=preferred_element_type)


class Dense(nnx.Module):
  """``y = x @ W (+ b) (+ LoRA(x))`` with a 2-D ``[in, out]`` kernel and logical axes.

  An evaluation view (``generate.eval_view``) may hold the kernel transposed, ``[out, in]``,
  with ``kernel_out_in`` set (see :func:`dot_out_in`), and may multiply in ``matmul_dtype``
  (inputs and kernel in that dtype, the product accumulated in ``dtype``); training modules never
  do."""

  kernel_out_in = False
  matmul_dtype = None

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = False, param_type: type[nnx.Variable] = nnx.Param,
               lora: lora_lib.LoRAConfig | None = None,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(param_type, kernel_init, rngs.params(), (in_features, out_features),
                        param_dtype, axes)
    self.bias = (param(param_type, nnx.initializers.zeros_init(), rngs.params(), (out_features,),
                       param_dtype, (axes[1],)) if use_bias else None)
    self.lora = (lora_lib.LoRA(in_features, out_features, lora, axes=axes, rngs=rngs)
                 if lora is not None else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.matmul_dtype is not None:
      xm, w = x.astype(self.matmul_dtype), self.kernel[...].astype(self.matmul_dtype)
      y = (dot_out_in(xm, w, preferred_element_type=self.dtype) if self.kernel_out_in else
           jnp.dot(xm, w, preferred_element_type=self.dtype))
    else:
      w = self.kernel[...].astype(self.dtype)
      y = dot_out_in(x, w) if self.kernel_out_in else jnp.dot(x, w)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x).astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (CLIP's pre-LN blocks)."""

  def __init__(self, features: int, *, eps: float = 1e-5, param_type: type[nnx.Variable] = nnx.Param,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = param_type(jnp.ones((features,), param_dtype), out_sharding=("norm",))
    self.bias = param_type(jnp.zeros((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, then cast (LLaMA / Qwen2)."""

  def __init__(self, features: int, *, eps: float = 1e-6, param_type: type[nnx.Variable] = nnx.Param,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = param_type(jnp.ones((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              return_weights: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention with grouped-query support.

  Args:
    q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` with ``H % Hkv == 0``.
    mask: boolean, broadcastable to ``[B, H, T, S]``; True = may attend.
    return_weights: also return the ``[B, H, T, S]`` softmax weights (interpretability).
  Softmax runs in float32. Without weights this is ``jax.nn.dot_product_attention`` (cuDNN
  flash attention on GPU when shapes allow).
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"attention: {h} query heads are not a multiple of {hkv} kv heads")
  if not return_weights:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  groups = h // hkv
  qg = q.reshape(b, t, hkv, groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  if mask is not None:
    m = jnp.broadcast_to(mask, (b, h, t, k.shape[1])).reshape(b, hkv, groups, t, k.shape[1])
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v).reshape(b, t, h, d)
  return out, weights.reshape(b, h, t, k.shape[1])


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     mask: jax.Array | None = None) -> jax.Array:
  """``attention`` for a KV cache stored heads-major: ``k, v [B, Hkv, S, D]``; ``q [B,T,H,D]``.

  Why a second form: a decode step reads the whole cache once per layer. With the cache laid
  out ``[B, S, Hkv, D]`` XLA (CPU) transposes every cache buffer to ``[B, Hkv, D, S]`` before
  each dot — a full strided copy of the cache per layer per token. Heads-major keeps both dots
  (``q·k`` contracting D, ``p·v`` contracting S) transpose-free with ``(B, Hkv)`` as batch
  dims. Numerics follow ``jax.nn.dot_product_attention``'s XLA path: logits accumulated in
  float32, scaled, masked with the same large negative, softmax in float32, probabilities cast
  to ``v.dtype``. ``mask``: boolean, broadcastable to ``[B, H, T, S]``; True = may attend.
  """
  b, t, h, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"attention: {h} query heads are not a multiple of {hkv} kv heads")
  groups = h // hkv
  precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None)
  # [B,T,Hkv,G,D] -> [B,Hkv,G*T,D] (a free reshape when T == 1).
  qg = q.reshape(b, t, hkv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * t, d)
  logits = jnp.einsum("bkqd,bksd->bkqs", qg, k, precision=precision,
                      preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(d ** -0.5)
  if mask is not None:
    m = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, hkv, groups * t, s)
    logits = jnp.where(m, logits, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max)))
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)  # [B,Hkv,G*T,D]
  return out.reshape(b, hkv, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def causal_mask(q_len: int, kv_len: int, offset: int | jax.Array = 0) -> jax.Array:
  """``[1, 1, q_len, kv_len]``: query i (at absolute position offset+i) sees keys <= it."""
  q_pos = jnp.arange(q_len)[:, None] + offset
  k_pos = jnp.arange(kv_len)[None, :]
  return (k_pos <= q_pos)[None, None]
