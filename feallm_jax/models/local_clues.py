"""Local Clue Aggregator (LCA): 16 facial-region crops -> region vectors -> F'_local, F_local.

The crop happens inside the model (batched, on device) so training, evaluation and predict share
one path, and the data pipeline only ships boxes. Each box is resampled to ``crop_size`` x
``crop_size`` by a separable triangle (bilinear) filter written as two small matrix products
(``crop = W_y @ image @ W_x^T``): matmuls are what TPUs/GPUs do best, and there is no gather.

Pixel convention (the one PIL uses in ``Image.resize(size, BILINEAR, box=...)``): a normalized
coordinate ``u`` in [0, 1] maps to the continuous pixel coordinate ``u * size``; pixel ``j``
covers ``[j, j+1)`` with its centre at ``j + 0.5``; output pixel ``i`` samples the continuous
point ``lo + (i + 0.5) * (hi - lo) / crop_size``. Out-of-image taps are dropped and the remaining
weights renormalized (equivalent to edge clamping for bilinear). With ``antialias=True`` (the
default) the triangle widens by the downscale factor, exactly as PIL does when shrinking, so a
large region is averaged rather than aliased; with ``antialias=False`` it is plain bilinear.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from feallm_jax.models import layers

Dtype = Any
NORMS = ("group", "layer", "none")


@dataclasses.dataclass(frozen=True)
class LCAConfig:
  """Architecture of the Local Clue Aggregator (``config.model.lca``)."""
  num_regions: int = 16
  crop_size: int = 32
  depth: int = 3            # conv3x3 stride-2 blocks
  width: int = 64           # channels of every conv block = region vector size d
  norm: str = "group"       # 'group' | 'layer' | 'none'
  groups: int = 8           # GroupNorm groups
  shared: bool = True       # one conv stack + learned region embedding; False = per-region weights
  num_heads: int = 4        # self-attention over the region vectors
  antialias: bool = True    # widen the bilinear filter when a box is shrunk (as PIL)

  def __post_init__(self):
    if self.num_regions <= 0:
      raise ValueError(f"model.lca.num_regions must be positive, got {self.num_regions}")
    if self.crop_size <= 0 or self.depth < 0 or self.width <= 0:
      raise ValueError(f"model.lca: crop_size/depth/width must be positive, got "
                       f"{self.crop_size}/{self.depth}/{self.width}")
    if self.norm not in NORMS:
      raise ValueError(f"model.lca.norm must be one of {NORMS}, got {self.norm!r}")
    if self.norm == "group" and self.width % self.groups:
      raise ValueError(f"model.lca.width={self.width} is not divisible by "
                       f"model.lca.groups={self.groups} (GroupNorm)")
    if self.width % self.num_heads:
      raise ValueError(f"model.lca.width={self.width} is not divisible by "
                       f"model.lca.num_heads={self.num_heads}")

  @classmethod
  def from_dict(cls, d) -> "LCAConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"model.lca: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


# ---------------------------------------------------------------------------------------------
# Cropping.

def resample_matrix(lo: jax.Array, hi: jax.Array, in_size: int, out_size: int,
                    antialias: bool = True) -> jax.Array:
  """Rows of triangle-filter weights ``[..., out_size, in_size]`` for the span [lo, hi] (normalized).

  See the module docstring for the pixel convention (PIL's). A span entirely outside the image
  gives all-zero rows (a black crop) rather than NaNs.
  """
  lo = jnp.asarray(lo, jnp.float32)[..., None, None] * in_size
  hi = jnp.asarray(hi, jnp.float32)[..., None, None] * in_size
  step = (hi - lo) / out_size                                           # input px per output px
  centre = lo + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * step
  support = jnp.maximum(jnp.abs(step), 1.0) if antialias else jnp.ones_like(step)
  pix = jnp.arange(in_size, dtype=jnp.float32)[None, :] + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pix - centre) / support)
  total = w.sum(-1, keepdims=True)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def crop_regions(image: jax.Array, boxes: jax.Array, crop_size: int,
                 antialias: bool = True) -> jax.Array:
  """Bilinear crops ``[B, R, S, S, C]`` of normalized ``[y0, x0, y1, x1]`` boxes ``[B, R, 4]``."""
  if image.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"crop_regions: want image [B,H,W,C] and boxes [B,R,4], got "
                     f"{image.shape} and {boxes.shape}")
  _, h, w, _ = image.shape
  wy = resample_matrix(boxes[..., 0], boxes[..., 2], h, crop_size, antialias)   # [B,R,S,H]
  wx = resample_matrix(boxes[..., 1], boxes[..., 3], w, crop_size, antialias)   # [B,R,S,W]
  img = image.astype(jnp.float32)
  rows = jnp.einsum("brih,bhwc->briwc", wy, img)
  return jnp.einsum("briwc,brjw->brijc", rows, wx)


# ---------------------------------------------------------------------------------------------
# Conv block.

def _norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, kind: str,
          groups: int) -> jax.Array:
  """GroupNorm / LayerNorm over (H, W, C) of a NHWC tensor, in float32."""
  if kind == "none":
    return x
  x32 = x.astype(jnp.float32)
  n, hh, ww, c = x32.shape
  g = groups if kind == "group" else 1
  xg = x32.reshape(n, hh, ww, g, c // g)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(n, hh, ww, c)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def _conv_stack(x: jax.Array, kernels, biases, scales, shifts, kind: str, groups: int,
                dtype: Dtype) -> jax.Array:
  """depth x (conv3x3 stride 2 + norm + GELU), then global average pool -> ``[N, width]``."""
  x = x.astype(dtype)
  for k, b, s, t in zip(kernels, biases, scales, shifts):
    x = jax.lax.conv_general_dilated(x, k.astype(dtype), window_strides=(2, 2), padding="SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = x + b.astype(dtype)
    x = jax.nn.gelu(_norm(x, s, t, kind, groups), approximate=False)
  return x.astype(jnp.float32).mean(axis=(1, 2)).astype(dtype)


class LocalClueAggregator(nnx.Module):
  """Crops -> Conv Block -> R_local -> self-attention -> F_attn -> (F'_local, F_local)."""

  def __init__(self, cfg: LCAConfig, *, vision_width: int | None, llm_width: int, in_channels: int = 3,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    r, d = cfg.num_regions, cfg.width
    # Per-region weights carry a leading ``regions`` axis; shared ones do not.
    lead = () if cfg.shared else (r,)
    lead_ax = () if cfg.shared else ("regions",)
    he = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal",
                                           in_axis=-2, out_axis=-1,
                                           batch_axis=() if cfg.shared else (0,))
    kernels, biases, scales, shifts = [], [], [], []
    cin = in_channels
    for _ in range(cfg.depth):
      kernels.append(nnx.Param(he(rngs.params(), (*lead, 3, 3, cin, d), param_dtype),
                               out_sharding=(*lead_ax, None, None, None, "lca_conv")))
      biases.append(nnx.Param(jnp.zeros((*lead, d), param_dtype),
                              out_sharding=(*lead_ax, "lca_conv")))
      if cfg.norm != "none":
        scales.append(nnx.Param(jnp.ones((*lead, d), param_dtype),
                                out_sharding=(*lead_ax, "lca_conv")))
        shifts.append(nnx.Param(jnp.zeros((*lead, d), param_dtype),
                                out_sharding=(*lead_ax, "lca_conv")))
      cin = d
    self.conv_kernels = nnx.List(kernels)
    self.conv_biases = nnx.List(biases)
    self.norm_scales = nnx.List(scales)
    self.norm_shifts = nnx.List(shifts)
    # With depth == 0 the "conv block" is the pooled pixels; project them to width d.
    self.stem = (layers.Dense(in_channels, d, axes=(None, "lca_embed"), use_bias=True,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                 if cfg.depth == 0 else None)
    # Region identity, so shared conv weights still know which region they look at.
    self.region_embed = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (r, d), param_dtype),
                                   out_sharding=("regions", "lca_embed")) if cfg.shared else None)
    # Self-attention over the R region vectors (pre-norm, residual, final norm).
    dense = lambda i, o, ax: layers.Dense(i, o, axes=ax, use_bias=True, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.LayerNorm(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = dense(d, d, ("lca_embed", "lca_heads"))
    self.k = dense(d, d, ("lca_embed", "lca_heads"))
    self.v = dense(d, d, ("lca_embed", "lca_heads"))
    self.o = dense(d, d, ("lca_heads", "lca_embed"))
    self.out_norm = layers.LayerNorm(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # F'_local (per region, vision width) and F_local (all regions flattened -> one LLM token).
    # vision_width=None: no projector reads F'_local (the MLP projector ablation).
    self.to_vision = (dense(d, vision_width, ("lca_embed", "proj_embed"))
                      if vision_width else None)
    self.to_llm = dense(r * d, llm_width, ("lca_flat", "proj_embed"))

  def region_features(self, image: jax.Array, boxes: jax.Array) -> jax.Array:
    """R_local ``[B, R, d]``: one pooled conv feature per region."""
    cfg = self.cfg
    if boxes.shape[1] != cfg.num_regions:
      raise ValueError(f"LCA: got {boxes.shape[1]} boxes per image, model.lca.num_regions="
                       f"{cfg.num_regions}")
    crops = crop_regions(image, boxes, cfg.crop_size, cfg.antialias)      # [B,R,S,S,C]
    b, r = crops.shape[:2]
    if cfg.depth == 0:
      feats = self.stem(crops.mean(axis=(2, 3)))
      return feats + self.region_embed[...].astype(feats.dtype) if cfg.shared else feats
    ks = [k[...] for k in self.conv_kernels]
    bs = [x[...] for x in self.conv_biases]
    ss = [x[...] for x in self.norm_scales] or [None] * cfg.depth
    ts = [x[...] for x in self.norm_shifts] or [None] * cfg.depth
    stack = lambda x, k, bb, s, t: _conv_stack(x, k, bb, s, t, cfg.norm, cfg.groups, self.dtype)
    if cfg.shared:
      feats = stack(crops.reshape(b * r, *crops.shape[2:]), ks, bs, ss, ts).reshape(b, r, -1)
      return feats + self.region_embed[...].astype(feats.dtype)
    # Per-region weights: vmap over the region axis (XLA lowers it to one grouped conv).
    return jax.vmap(stack, in_axes=(1, 0, 0, 0, 0), out_axes=1)(crops, ks, bs, ss, ts)

  def __call__(self, image: jax.Array, boxes: jax.Array, *, return_attention: bool = False):
    """Returns ``(F'_local [B,R,d_v] or None, F_local [B,1,D_llm])`` (+ ``[B,heads,R,R]``)."""
    cfg = self.cfg
    x = self.region_features(image, boxes)                                   # R_local
    b, r, d = x.shape
    h = cfg.num_heads
    y = self.attn_norm(x)
    q = self.q(y).reshape(b, r, h, d // h)
    k = self.k(y).reshape(b, r, h, d // h)
    v = self.v(y).reshape(b, r, h, d // h)
    out, weights = layers.attention(q, k, v, return_weights=True)
    f_attn = self.out_norm(x + self.o(out.reshape(b, r, d)))                 # F_attn
    f_local_v = self.to_vision(f_attn) if self.to_vision is not None else None  # F'_local
    f_local = self.to_llm(f_attn.reshape(b, 1, r * d))                       # F_local
    if return_attention:
      return f_local_v, f_local, weights
    return f_local_v, f_local
