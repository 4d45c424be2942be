"""CLIP ViT vision tower (HF ``CLIPVisionModel`` architecture) returning every hidden state.

FEALLM reads several layers (F_L and the multi-layer F_s), so the encoder returns the full
``hidden_states`` tuple in HF order: index 0 is the embeddings after ``pre_layrnorm``, index i
the output of layer i. ``post_layernorm`` (only used by CLIP's pooled/contrastive head) is not
part of this module; the loader skips it.

The patch conv is a Dense on flattened NHWC patches (same maths as the stride-p conv, and it
shards like every other kernel): patch pixels are flattened in ``(row, col, channel)`` order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import layers

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  num_channels: int = 3

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"vision.image_size {self.image_size} is not a multiple of "
                       f"vision.patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision.hidden_size {self.hidden_size} is not a multiple of "
                       f"vision.num_heads {self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"vision.hidden_act {self.hidden_act!r} is not supported; "
                       f"choose from {sorted(_ACTIVATIONS)}")
    if self.num_channels != 3:
      raise ValueError(f"vision.num_channels must be 3 (RGB), got {self.num_channels}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "VisionConfig":
    """From a ``CLIPVisionConfig`` dict, or a full ``CLIPConfig`` dict (its ``vision_config``)."""
    hf = dict(hf)
    if "vision_config" in hf:
      hf = dict(hf["vision_config"])
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
      raise ValueError(f"config.json: model_type {model_type!r} is not a CLIP vision model")
    missing = [k for k in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
      raise ValueError(f"config.json: vision config lacks field(s) {missing}")
    return cls(image_size=int(hf["image_size"]), patch_size=int(hf["patch_size"]),
               hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
               num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
               layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
               hidden_act=str(hf.get("hidden_act", "quick_gelu")),
               num_channels=int(hf.get("num_channels", 3)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
    """From a config section (``config.model.vision``); ignores keys such as ``hf_path``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in names})


class Attention(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(use_bias=True, param_type=layers.BaseParam, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.q = layers.Dense(d, d, axes=("vis_embed", "vis_heads"), **kw)
    self.k = layers.Dense(d, d, axes=("vis_embed", "vis_heads"), **kw)
    self.v = layers.Dense(d, d, axes=("vis_embed", "vis_heads"), **kw)
    self.o = layers.Dense(d, d, axes=("vis_heads", "vis_embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
    out = layers.attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
    return self.o(out.reshape(b, n, self.num_heads * self.head_dim))


class Block(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    norm = dict(eps=cfg.layer_norm_eps, param_type=layers.BaseParam, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
    kw = dict(use_bias=True, param_type=layers.BaseParam, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.ln1 = layers.LayerNorm(d, **norm)
    self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln2 = layers.LayerNorm(d, **norm)
    self.fc1 = layers.Dense(d, cfg.intermediate_size, axes=("vis_embed", "vis_mlp"), **kw)
    self.fc2 = layers.Dense(cfg.intermediate_size, d, axes=("vis_mlp", "vis_embed"), **kw)
    self.act = _ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class VisionEncoder(nnx.Module):
  """CLIP ViT; ``__call__`` returns ``num_layers + 1`` hidden states ``[B, 1+N, D]``."""

  def __init__(self, cfg: VisionConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.cfg, self.dtype = cfg, dtype
    d, p = cfg.hidden_size, cfg.patch_size
    init = nnx.initializers.normal(0.02)
    self.patch_embed = layers.Dense(p * p * cfg.num_channels, d, axes=("vis_patch", "vis_embed"),
                                    param_type=layers.BaseParam, kernel_init=init, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
    self.class_embed = layers.param(layers.BaseParam, init, rngs.params(), (d,), param_dtype,
                                    ("vis_embed",))
    self.pos_embed = layers.param(layers.BaseParam, init, rngs.params(), (cfg.num_patches + 1, d),
                                  param_dtype, ("vis_pos", "vis_embed"))
    self.pre_ln = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_type=layers.BaseParam,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_layers)])

  def patchify(self, pixels: jax.Array) -> jax.Array:
    """``[B,H,W,C]`` -> ``[B, N, p*p*C]`` in row-major patch order (HF conv flatten order)."""
    b, h, w, c = pixels.shape
    p = self.cfg.patch_size
    x = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, ...]:
    cfg = self.cfg
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"vision: pixels must be [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}] (NHWC), got shape {tuple(pixels.shape)}")
    if not jnp.issubdtype(pixels.dtype, jnp.floating):
      raise ValueError(f"vision: pixels must be CLIP-normalized floats, got dtype {pixels.dtype}")
    x = self.patch_embed(self.patchify(pixels))
    cls = jnp.broadcast_to(self.class_embed[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)[None]
    x = self.pre_ln(x)
    x = sharding.constrain_batch(x)
    hidden = [x]
    for block in self.blocks:
      x = sharding.constrain_batch(block(x))
      hidden.append(x)
    return tuple(hidden)


def preprocess(image: Any, image_size: int) -> np.ndarray:
  """CLIP preprocessing on the host: shortest side -> ``image_size`` (bicubic), center crop,
  scale to [0,1], normalize with CLIP mean/std. Accepts a PIL image or an ``[H,W,3]`` array
  (uint8, or float in [0,1]). Returns float32 ``[image_size, image_size, 3]``.
  """
  from PIL import Image

  if isinstance(image, np.ndarray):
    arr = image
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
      raise ValueError(f"preprocess: image must be [H,W,3] (or gray/RGBA), got {arr.shape}")
    if arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating):
      arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr.astype(np.uint8))
  if not isinstance(image, Image.Image):
    raise TypeError(f"preprocess: expected a PIL image or numpy array, got {type(image).__name__}")
  image = image.convert("RGB")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = image_size, int(image_size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  image = image.crop((left, top, left + image_size, top + image_size))
  x = np.asarray(image, np.float32) / 255.0
  return ((x - CLIP_MEAN) / CLIP_STD).astype(np.float32)
