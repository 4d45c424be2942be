"""Decoder-only LM in the LLaMA / Qwen2 family: RMSNorm, RoPE, GQA, SwiGLU, KV cache.

One module covers both families: Qwen2 differs only by q/k/v biases (and checkpoints usually
tie or untie the embeddings). Every backbone weight is a ``layers.BaseParam`` with logical axes;
the seven projections can carry LoRA adapters (``nnx.LoRAParam``) through ``layers.Dense``.

Attention masks are built from an explicit key-validity mask plus causality *by slot*, so the
same code serves training (right padding), prompts (left padding, positions = cumsum - 1) and
incremental decoding from a fixed-size cache (static shapes under jit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from feallm_jax import sharding
from feallm_jax.models import attention_kernels, layers
from feallm_jax.models import lora as lora_lib

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Hashable (key, value) pairs (nnx keeps module attributes in the static graph definition);
  # a dict is accepted and converted.
  rope_scaling: Any = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False       # bias on q, k, v (Qwen2: always)
  o_bias: bool = False               # bias on o (LLaMA with attention_bias=True)
  max_position_embeddings: int = 4096
  model_type: str = "llama"

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"llm.model_type {self.model_type!r} is not supported; "
                       f"choose from {SUPPORTED_MODEL_TYPES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"llm.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"llm.num_heads {self.num_heads} is not a multiple of "
                       f"llm.num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"llm.head_dim must be even for RoPE, got {self.head_dim}")
    scaling = self.rope_scaling
    if isinstance(scaling, Mapping):
      scaling = tuple(sorted((str(k), v) for k, v in scaling.items()))
      object.__setattr__(self, "rope_scaling", scaling)
    if scaling is not None:
      kind = self.rope_type
      if kind not in _ROPE_TYPES:
        raise ValueError(f"llm.rope_scaling: rope type {kind!r} is not supported; "
                         f"choose from {_ROPE_TYPES}")
      needed = {"linear": ("factor",), "llama3": (
          "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
      missing = [k for k in needed.get(kind, ()) if k not in dict(scaling)]
      if missing:
        raise ValueError(f"llm.rope_scaling ({kind}) lacks field(s) {missing}")

  @property
  def rope_type(self) -> str:
    if self.rope_scaling is None:
      return "default"
    d = dict(self.rope_scaling)
    return str(d.get("rope_type", d.get("type", "default")))

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "LLMConfig":
    """From a HF ``config.json`` dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"config.json: model_type {model_type!r} is not supported; "
                       f"choose from {SUPPORTED_MODEL_TYPES}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ValueError(f"config.json: lacks field(s) {missing}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias", False):
      raise ValueError("config.json: mlp_bias=True is not supported")
    if hf.get("use_sliding_window", False):
      raise ValueError("config.json: use_sliding_window=True is not supported")
    heads = int(hf["num_attention_heads"])
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params or None
    if scaling is not None:
      scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind == "default" and set(scaling) <= {"rope_type", "type"}:
        scaling = None
    bias = bool(hf.get("attention_bias", False))
    return cls(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bias,
        o_bias=bias if model_type == "llama" else False,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        model_type=model_type)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LLMConfig":
    """From a config section (``config.model.llm``); ignores keys such as ``hf_path``."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if kw.get("model_type") == "qwen2":
      kw.setdefault("attention_bias", True)
    if kw.get("rope_scaling") is not None and not isinstance(kw["rope_scaling"], (tuple, Mapping)):
      kw["rope_scaling"] = dict(kw["rope_scaling"])   # ConfigDict
    return cls(**kw)


def rope_inv_freq(cfg: LLMConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim/2]``, with HF's ``linear`` / ``llama3`` rescaling."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  kind, s = cfg.rope_type, dict(cfg.rope_scaling or ())
  if kind == "linear":
    inv = inv / float(s["factor"])
  elif kind == "llama3":
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF ``rotate_half`` convention; ``x [B,T,H,D]``, ``cos/sin [B,T,D/2]`` float32."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


@struct.dataclass
class KVCache:
  """Per-layer ``k, v [B, Hkv, S, Dh]`` and the next write slot ``index`` (int32 scalar).

  Heads-major (``[B, Hkv, S, Dh]``) so a decode step's attention reads each cache buffer in
  place: with ``[B, S, Hkv, Dh]`` XLA transposed every buffer before the dots, a full strided
  copy of the cache per layer per token (see ``layers.cached_attention``).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]


class Attention(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, lora: lora_lib.LoRAConfig | None, dtype, param_dtype,
               attention: str = "xla", rngs: nnx.Rngs):
    d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, dh
    self.impl = attention_kernels.check_impl(attention)
    kw = dict(param_type=layers.BaseParam, kernel_init=nnx.initializers.normal(0.02),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    t = (lambda name: lora.for_target(name)) if lora is not None else (lambda name: None)
    b = cfg.attention_bias
    self.q = layers.Dense(d, h * dh, axes=("embed", "heads"), use_bias=b, lora=t("q"), **kw)
    self.k = layers.Dense(d, hkv * dh, axes=("embed", "kv_heads"), use_bias=b, lora=t("k"), **kw)
    self.v = layers.Dense(d, hkv * dh, axes=("embed", "kv_heads"), use_bias=b, lora=t("v"), **kw)
    self.o = layers.Dense(h * dh, d, axes=("heads", "embed"), use_bias=cfg.o_bias, lora=t("o"),
                          **kw)

  def __call__(self, x, cos, sin, mask, kv, index, valid):
    b, t, _ = x.shape
    q = apply_rope(self.q(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if kv is not None:
      ck, cv = kv  # [B, Hkv, S, Dh]; only the T new slots are written (in place under jit)
      kh, vh = k.transpose(0, 2, 1, 3).astype(ck.dtype), v.transpose(0, 2, 1, 3).astype(cv.dtype)
      ck = jax.lax.dynamic_update_slice(ck, kh, (0, 0, index, 0))
      cv = jax.lax.dynamic_update_slice(cv, vh, (0, 0, index, 0))
      kv = (ck, cv)
      # A mask over T keys (not S slots) means the cache held nothing before these tokens
      # (``Decoder.__call__(empty_cache=True)``): their own keys are all there is to read.
      keys, values = (ck, cv) if mask.shape[-1] == ck.shape[2] else (kh, vh)
      out = layers.cached_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask)
    else:   # full causal sequence (training, scoring): a flash kernel may serve it
      out = attention_kernels.causal_attention(q, k, v, valid=valid, impl=self.impl)
    return self.o(out.reshape(b, t, self.num_heads * self.head_dim)), kv


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LLMConfig, *, lora: lora_lib.LoRAConfig | None, dtype, param_dtype,
               attention: str = "xla", rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    norm = dict(eps=cfg.rms_norm_eps, param_type=layers.BaseParam, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
    kw = dict(param_type=layers.BaseParam, kernel_init=nnx.initializers.normal(0.02),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    t = (lambda name: lora.for_target(name)) if lora is not None else (lambda name: None)
    self.attn_norm = layers.RMSNorm(d, **norm)
    self.attn = Attention(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                          attention=attention, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(d, **norm)
    self.gate = layers.Dense(d, m, axes=("embed", "mlp"), lora=t("gate"), **kw)
    self.up = layers.Dense(d, m, axes=("embed", "mlp"), lora=t("up"), **kw)
    self.down = layers.Dense(m, d, axes=("mlp", "embed"), lora=t("down"), **kw)

  def __call__(self, x, cos, sin, mask, kv, index, valid):
    h, kv = self.attn(self.attn_norm(x), cos, sin, mask, kv, index, valid)
    x = x + h
    y = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y)), kv


def _run_layer(layer, x, cos, sin, mask, kv, index, valid):
  return layer(x, cos, sin, mask, kv, index, valid)


def _remat_layer(layer, x, cos, sin, mask, kv, index, valid):
  """``_run_layer`` under ``jax.checkpoint``: only the layer's input is kept for the backward
  pass, everything inside is recomputed. The layer goes in as split state and only its RNG
  state (dropout counters) comes back out: ``nnx.remat`` writes every variable back, which
  fails for weights merged from an outer trace (the train step's frozen base)."""
  graphdef, state = nnx.split(layer)

  def pure(state, *args):
    module = nnx.merge(graphdef, state)
    return module(*args), nnx.state(module, nnx.RngState)

  out, rng = jax.checkpoint(pure)(state, x, cos, sin, mask, kv, index, valid)
  nnx.update(layer, rng)
  return out


def _scan_layers(layers_, x, cos, sin, valid, *, remat: bool):
  """The full-sequence layers as one ``jax.lax.scan`` over their stacked states.

  XLA then compiles one layer body instead of ``num_layers`` copies: the 7B train step's TPU
  compile otherwise grows by ~1 GB of host memory per layer (measured: 7.7 GB with 1 layer,
  past 22 GB with 32). Parameters stay one module per layer (checkpoints, HF import and LoRA
  are unchanged); the stack is built inside the step, one extra copy of the layer weights in
  device memory, which the AOT compile's memory report includes. Each layer's RNG state
  (dropout counters) comes back out of the scan and is written to its own layer.
  """
  graphdef = nnx.graphdef(layers_[0])
  states = [nnx.state(layer) for layer in layers_]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def body(h, state):
    module = nnx.merge(graphdef, state)
    h, _ = module(h, cos, sin, None, None, None, valid)
    return sharding.constrain_batch(h), nnx.state(module, nnx.RngState)

  x, rng = jax.lax.scan(jax.checkpoint(body) if remat else body, x, stacked)
  for i, layer in enumerate(layers_):
    nnx.update(layer, jax.tree.map(lambda a, i=i: a[i], rng))
  return x


class Decoder(nnx.Module):
  """LLaMA / Qwen2 decoder; see ``docs/interfaces.md`` for the call contract."""

  # Set on an evaluation view (``generate.eval_view``): every Dense kernel and the LM head are
  # stored [out, in] there (``layers.dot_out_in``); the head may multiply in a narrower dtype.
  kernels_out_in = False
  head_matmul_dtype = None

  def __init__(self, cfg: LLMConfig, *, lora: lora_lib.LoRAConfig | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
               attention: str = "xla", scan_layers: bool = False, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    self.cfg, self.dtype, self.remat = cfg, dtype, bool(remat)
    self.scan_layers = bool(scan_layers)
    self.attention = attention_kernels.check_impl(attention)
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = layers.param(layers.BaseParam, init, rngs.params(),
                                     (cfg.vocab_size, cfg.hidden_size), param_dtype,
                                     ("vocab", "embed"))
    self.layers = nnx.List([
        DecoderLayer(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype, attention=attention,
                     rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_type=layers.BaseParam,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    layers.param(layers.BaseParam, init, rngs.params(),
                                 (cfg.hidden_size, cfg.vocab_size), param_dtype, ("embed", "vocab")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"llm: input_ids must be an int [B,T] array, got {input_ids.dtype} "
                       f"{tuple(input_ids.shape)}")
    return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache; ``dtype`` defaults to the compute dtype."""
    cfg = self.cfg
    dtype = jnp.dtype(dtype or self.dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros(), v=zeros(), index=jnp.zeros((), jnp.int32))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden states -> float32 logits (accumulated in float32 for any dtype)."""
    dt = self.dtype if self.head_matmul_dtype is None else self.head_matmul_dtype
    if self.kernels_out_in:     # an evaluation view: the head is [vocab, hidden] (tied or not)
      w = self.embed_tokens[...] if self.lm_head is None else self.lm_head[...]
      return layers.dot_out_in(hidden.astype(dt), w.astype(dt),
                               preferred_element_type=jnp.float32)
    if self.lm_head is None:
      w = self.embed_tokens[...].astype(dt).T
    else:
      w = self.lm_head[...].astype(dt)
    return jnp.dot(hidden.astype(dt), w, preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               cache: KVCache | None = None, return_hidden: bool = False,
               empty_cache: bool = False):
    """Returns ``logits`` (no cache) or ``(logits, new_cache)``; with ``return_hidden`` the final
    normed hidden states ``[B,T,D]`` are appended as the last element of a tuple.

    ``empty_cache``: the cache holds nothing yet (a prefill from :meth:`init_cache`, index 0):
    the tokens attend over their own T keys instead of all S slots, the ones after them still
    empty (the same result; a prefill's attention then costs the same whatever room the cache
    keeps for new tokens). ``attention_mask`` still spans every cache slot."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("llm: pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
      x = self.embed(input_ids)
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
        raise ValueError(f"llm: inputs_embeds must be [B,T,{self.cfg.hidden_size}], got "
                         f"{tuple(inputs_embeds.shape)}")
      x = inputs_embeds.astype(self.dtype)
    # Full sequences (training, scoring) keep their batch split over data x fsdp; a decode step
    # does not: with one token per row, batch-split rows would all-gather every FSDP weight per
    # token (the AOT decode step's FLOPs rose 1.6x that way).
    batch_split = sharding.constrain_batch if cache is None else (lambda a: a)
    x = batch_split(x)
    b, t, _ = x.shape
    index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
    s = cache.max_len if cache is not None else t
    if cache is not None and (cache.k[0].shape[0] != b or len(cache.k) != self.cfg.num_layers):
      raise ValueError(f"llm: cache holds {len(cache.k)} layers of batch {cache.k[0].shape[0]}; "
                       f"expected {self.cfg.num_layers} layers of batch {b}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None] + index, (b, t))
    elif positions.shape != (b, t):
      raise ValueError(f"llm: positions must be [B,T]={(b, t)}, got {tuple(positions.shape)}")
    if attention_mask is not None and attention_mask.shape != (b, s):
      what = "S_max (every cache slot)" if cache is not None else "T"
      raise ValueError(f"llm: attention_mask must be [B, {what}]={(b, s)}, got "
                       f"{tuple(attention_mask.shape)}")

    # With a cache: causal by slot, keys restricted to valid slots; every query also sees its
    # own slot so rows of padding queries stay finite (their outputs are ignored). Without one,
    # the attention kernel builds the same mask from ``valid`` (or never materializes it).
    mask = valid = None
    if empty_cache and cache is None:
      raise ValueError("llm: empty_cache=True needs a cache")
    if cache is not None:
      keys = t if empty_cache else s
      q_slot = jnp.arange(t)[:, None] + (0 if empty_cache else index)
      k_slot = jnp.arange(keys)[None, :]
      mask = (k_slot <= q_slot)[None, None]
      if attention_mask is not None:
        mask = mask & attention_mask[:, :keys].astype(bool)[:, None, None, :]
      mask = mask | (k_slot == q_slot)[None, None]
    else:
      valid = attention_mask

    inv = jnp.asarray(rope_inv_freq(self.cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    # Remat only pays under a gradient; decoding from a cache never takes one, and there its
    # write-back of RNG state would cross the decode loop's trace (TraceContextError with
    # dropout layers present, i.e. the paper config's LoRA).
    run = _remat_layer if self.remat and cache is None else _run_layer
    new_k, new_v = [], []
    if self.scan_layers and cache is None:   # decoding keeps the loop: its cache is per layer
      x = _scan_layers(self.layers, x, cos, sin, valid, remat=self.remat)
    else:
      for i, layer in enumerate(self.layers):
        kv = (cache.k[i], cache.v[i]) if cache is not None else None
        x, kv = run(layer, x, cos, sin, mask, kv, index, valid)
        x = batch_split(x)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
    hidden = self.norm(x)
    logits = self.logits(hidden)
    logits = batch_split(logits)
    out: tuple = (logits,)
    if cache is not None:
      out += (KVCache(k=tuple(new_k), v=tuple(new_v), index=index + t),)
    if return_hidden:
      out += (hidden,)
    return out[0] if len(out) == 1 else out
