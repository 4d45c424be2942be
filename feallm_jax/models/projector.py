"""Projectors from vision features to LLM tokens.

``MultiPerspectiveProjector`` (FEALLM): queries are the patch tokens of F_L; they look at the
multi-level features F_s (global perspective), then at the 16 region vectors F'_local (local
perspective), then at each other, and a two-layer MLP maps them to the LLM width::

    x = F_L + CrossAttn(LN(F_L), LN(F_s))
    x = x + CrossAttn(LN(x), LN(F'_local))      # weights over the 16 regions on request
    x = x + SelfAttn(LN(x))
    visual_tokens = MLP(LN(x))                   # Linear -> GELU -> Linear, LLM width

Every attention and the MLP read pre-normalized inputs (LayerNorm, as in pre-LN transformers):
the paper does not say, and pre-norm keeps the residual stream equal to F_L at initialization
scale, which trains stably on top of a frozen encoder. ``MLPProjector`` is LLaVA-1.5's
two-layer GELU MLP on F_L (``config.model.projector = "mlp"``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from feallm_jax.models import layers

Dtype = Any
PROJECTORS = ("multi_perspective", "mlp")


class MLPProjector(nnx.Module):
  """LLaVA-1.5: ``Linear(d_v, D) -> GELU -> Linear(D, D)``."""

  def __init__(self, vision_width: int, llm_width: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.fc1 = layers.Dense(vision_width, llm_width, axes=("proj_embed", "proj_mlp"),
                            use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = layers.Dense(llm_width, llm_width, axes=("proj_mlp", "proj_embed"),
                            use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class CrossAttention(nnx.Module):
  """Multi-head attention of ``x`` over ``context`` (self-attention when context is x)."""

  def __init__(self, width: int, num_heads: int, *, self_attention: bool = False, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"model.projector_heads={num_heads} does not divide the vision width "
                       f"{width}")
    self.num_heads = num_heads
    dense = lambda ax: layers.Dense(width, width, axes=ax, use_bias=True, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.q_norm = layers.LayerNorm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Self-attention reads the same normalized x for queries and keys: no second norm.
    self.kv_norm = (None if self_attention else
                    layers.LayerNorm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
    self.q = dense(("proj_embed", "proj_heads"))
    self.k = dense(("proj_embed", "proj_heads"))
    self.v = dense(("proj_embed", "proj_heads"))
    self.o = dense(("proj_heads", "proj_embed"))

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               return_weights: bool = False):
    b, t, d = x.shape
    h = self.num_heads
    xq = self.q_norm(x)
    if (context is None) != (self.kv_norm is None):
      raise ValueError("CrossAttention: pass a context exactly when built as cross-attention")
    kv = xq if context is None else self.kv_norm(context)
    s = kv.shape[1]
    q = self.q(xq).reshape(b, t, h, d // h)
    k = self.k(kv).reshape(b, s, h, d // h)
    v = self.v(kv).reshape(b, s, h, d // h)
    res = layers.attention(q, k, v, return_weights=return_weights)
    out, weights = res if return_weights else (res, None)
    out = self.o(out.reshape(b, t, d))
    return (out, weights) if return_weights else out


class MultiPerspectiveProjector(nnx.Module):
  """F_L (+ F_s, F'_local) -> visual tokens ``[B, N, D_llm]``; see the module docstring."""

  def __init__(self, vision_width: int, llm_width: int, *, num_heads: int, local_clues: bool,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.local_clues = local_clues
    self.global_attn = CrossAttention(vision_width, num_heads, **kw)
    self.local_attn = CrossAttention(vision_width, num_heads, **kw) if local_clues else None
    self.self_attn = CrossAttention(vision_width, num_heads, self_attention=True, **kw)
    self.mlp_norm = layers.LayerNorm(vision_width, **kw)
    self.mlp = MLPProjector(vision_width, llm_width, **kw)

  def __call__(self, f_l: jax.Array, f_s: jax.Array, f_local_v: jax.Array | None = None, *,
               return_attention: bool = False):
    """f_l ``[B,N,d_v]``, f_s ``[B,M,d_v]``, f_local_v ``[B,R,d_v]`` -> ``[B,N,D]``.

    With ``return_attention`` also returns the ``[B, heads, N, R]`` weights over the regions
    (None without local clues).
    """
    if self.local_clues and f_local_v is None:
      raise ValueError("projector built with model.local_clues=True needs F'_local")
    x = f_l + self.global_attn(f_l, f_s)
    weights = None
    if self.local_clues:
      out, weights = self.local_attn(x, f_local_v, return_weights=True)
      x = x + out
    x = x + self.self_attn(x)
    tokens = self.mlp(self.mlp_norm(x))
    return (tokens, weights) if return_attention else tokens
