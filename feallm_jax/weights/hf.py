"""Local HF checkpoints (safetensors) -> NNX backbones: one key table plus reshape hooks.

Tensors are read lazily: each safetensors file is memory-mapped and every device shard is sliced
out of it on the host (``jax.make_array_from_callback``), so a 7B model is never materialized on
one device or copied whole into host memory. (``safe_open(framework="np")`` cannot decode
bfloat16, and torch is not a runtime dependency, so the tiny safetensors header is parsed here.)

Loading is all-or-nothing: every name, shape and config field is validated from the headers
before any array is placed, and module variables are only replaced once every tensor is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct as _struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from feallm_jax import sharding
from feallm_jax.models import layers, llm as llm_lib, vision as vision_lib

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
  """A checkpoint that does not match the module (names the tensor or field at fault)."""


# --------------------------------------------------------------------------- safetensors reader


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: str
  dtype: str
  shape: tuple[int, ...]
  start: int   # absolute byte offset in the file
  end: int


def _read_header(file: str) -> dict[str, _TensorInfo]:
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{file}: not a safetensors file (truncated header)")
    (n,) = _struct.unpack("<Q", raw)
    if n > 100 * 2**20:
      raise CheckpointError(f"{file}: not a safetensors file (header of {n} bytes)")
    header = json.loads(f.read(n))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    out[name] = _TensorInfo(file, info["dtype"], tuple(int(d) for d in info["shape"]),
                            8 + n + int(begin), 8 + n + int(end))
  return out


def _load_np(info: _TensorInfo) -> np.ndarray:
  """A read-only memory map of one tensor (pages are read only when sliced)."""
  if info.dtype not in _ST_DTYPES:
    raise CheckpointError(f"{os.path.basename(info.file)}: unsupported safetensors dtype "
                          f"{info.dtype}")
  dtype = np.dtype(_ST_DTYPES[info.dtype])
  count = int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1
  if info.end - info.start != count * dtype.itemsize:
    raise CheckpointError(f"{info.file}: tensor byte range does not match shape {info.shape}")
  if count == 0:
    return np.zeros(info.shape, dtype)
  mm = np.memmap(info.file, dtype=dtype, mode="r", offset=info.start, shape=(count,))
  return mm.reshape(info.shape)


def read_index(path: str) -> dict[str, _TensorInfo]:
  """Every tensor header of a checkpoint dir (single file or sharded index.json)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    out: dict[str, _TensorInfo] = {}
    for file in files:
      full = os.path.join(path, file)
      if not os.path.exists(full):
        raise CheckpointError(f"{index}: shard {file!r} is missing")
      out.update(_read_header(full))
    listed = set(weight_map)
    if listed != set(out):
      bad = sorted(listed ^ set(out))[:5]
      raise CheckpointError(f"{index}: weight_map disagrees with the shard headers on {bad}")
    return out
  if os.path.exists(single):
    return _read_header(single)
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: no config.json")
  with open(file) as f:
    return json.load(f)


def llm_config_from_dir(path: str) -> llm_lib.LLMConfig:
  return llm_lib.LLMConfig.from_hf(read_config(path))


def vision_config_from_dir(path: str) -> vision_lib.VisionConfig:
  return vision_lib.VisionConfig.from_hf(read_config(path))


# --------------------------------------------------------------------------- key tables

Hook = Callable[[np.ndarray], np.ndarray]


def _linear(w: np.ndarray) -> np.ndarray:
  """torch Linear ``[out, in]`` -> ``[in, out]`` (a strided view; nothing is read)."""
  return w.T


def _patch(w: np.ndarray) -> np.ndarray:
  """Conv ``[D, C, p, p]`` -> ``[p*p*C, D]`` in the ``(row, col, channel)`` order of patchify."""
  d = w.shape[0]
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, d)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _hooked_shape(hook: Hook, shape: tuple[int, ...]) -> tuple[int, ...]:
  if hook is _linear:
    return tuple(reversed(shape))
  if hook is _patch:
    return (int(np.prod(shape[1:])), shape[0]) if len(shape) == 4 else ("bad-rank",) + shape
  return shape


Table = dict[str, tuple[str, Hook]]   # HF name -> (NNX path "a/b/0/c", hook)


def llm_key_table(cfg: llm_lib.LLMConfig) -> Table:
  t: Table = {"model.embed_tokens.weight": ("embed_tokens", _same),
              "model.norm.weight": ("norm/scale", _same)}
  if not cfg.tie_word_embeddings:
    t["lm_head.weight"] = ("lm_head", _linear)
  for i in range(cfg.num_layers):
    hf, me = f"model.layers.{i}", f"layers/{i}"
    t[f"{hf}.input_layernorm.weight"] = (f"{me}/attn_norm/scale", _same)
    t[f"{hf}.post_attention_layernorm.weight"] = (f"{me}/mlp_norm/scale", _same)
    for p in ("q", "k", "v", "o"):
      t[f"{hf}.self_attn.{p}_proj.weight"] = (f"{me}/attn/{p}/kernel", _linear)
      if (cfg.attention_bias and p != "o") or (cfg.o_bias and p == "o"):
        t[f"{hf}.self_attn.{p}_proj.bias"] = (f"{me}/attn/{p}/bias", _same)
    for p in ("gate", "up", "down"):
      t[f"{hf}.mlp.{p}_proj.weight"] = (f"{me}/{p}/kernel", _linear)
  return t


def _llm_ignored(cfg: llm_lib.LLMConfig, name: str) -> bool:
  if name.endswith("rotary_emb.inv_freq"):
    return True
  return cfg.tie_word_embeddings and name == "lm_head.weight"   # some exporters save the tie


def vision_key_table(cfg: vision_lib.VisionConfig, prefix: str = "vision_model.") -> Table:
  t: Table = {
      f"{prefix}embeddings.class_embedding": ("class_embed", _same),
      f"{prefix}embeddings.patch_embedding.weight": ("patch_embed/kernel", _patch),
      f"{prefix}embeddings.position_embedding.weight": ("pos_embed", _same),
      f"{prefix}pre_layrnorm.weight": ("pre_ln/scale", _same),
      f"{prefix}pre_layrnorm.bias": ("pre_ln/bias", _same),
  }
  for i in range(cfg.num_layers):
    hf, me = f"{prefix}encoder.layers.{i}", f"blocks/{i}"
    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
      t[f"{hf}.{theirs}.weight"] = (f"{me}/{ours}/scale", _same)
      t[f"{hf}.{theirs}.bias"] = (f"{me}/{ours}/bias", _same)
    for ours, theirs in (("attn/q", "self_attn.q_proj"), ("attn/k", "self_attn.k_proj"),
                         ("attn/v", "self_attn.v_proj"), ("attn/o", "self_attn.out_proj"),
                         ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      t[f"{hf}.{theirs}.weight"] = (f"{me}/{ours}/kernel", _linear)
      t[f"{hf}.{theirs}.bias"] = (f"{me}/{ours}/bias", _same)
  return t


def _vision_ignored(name: str) -> bool:
  # post_layernorm feeds only CLIP's pooled head; the rest is CLIPModel's text tower/projections.
  return (name.startswith(("vision_model.post_layernorm.", "post_layernorm.", "text_model.",
                           "visual_projection.", "text_projection.")) or name == "logit_scale"
          or name.endswith("position_ids"))


def _vision_prefix(names) -> str:
  """``vision_model.`` in CLIPModel (and transformers 4.x CLIPVisionModel) files; none in 5.x."""
  return "vision_model." if any(n.startswith("vision_model.") for n in names) else ""


# --------------------------------------------------------------------------- placement


def _active_mesh() -> Mesh | None:
  if jax.sharding.get_abstract_mesh().empty:
    return None
  mesh = jax.sharding.get_mesh()
  return mesh if isinstance(mesh, Mesh) and not mesh.empty else None


def _target(var: nnx.Variable) -> tuple[tuple[int, ...], np.dtype, jax.sharding.Sharding]:
  value = var.get_value()
  shard = getattr(value, "sharding", None)
  if shard is None or not isinstance(shard, jax.sharding.Sharding) or \
      (isinstance(shard, NamedSharding) and not isinstance(shard.mesh, Mesh)):
    mesh = _active_mesh()
    if mesh is None:
      mesh = sharding.single_device_mesh()
    shard = NamedSharding(mesh, sharding.logical_to_spec(var.get_metadata().get("out_sharding")))
  return tuple(value.shape), np.dtype(value.dtype), shard


def _place(src: np.ndarray, hook: Hook, shape, dtype, shard) -> jax.Array:
  view = hook(src)

  def fetch(index):
    return np.ascontiguousarray(view[index]).astype(dtype, copy=False)

  return jax.make_array_from_callback(shape, shard, fetch)


def _load(module: nnx.Module, path: str, table: Table, ignored: Callable[[str], bool],
          what: str) -> int:
  headers = read_index(path)
  flat = {"/".join(str(p) for p in k): v
          for k, v in nnx.to_flat_state(nnx.state(module, layers.BaseParam))}
  problems = []
  targets = {ours for ours, _ in table.values()}
  for ours in sorted(set(flat) - targets):
    problems.append(f"module parameter {ours!r} has no entry in the {what} key table")
  for name, (ours, hook) in table.items():
    if name not in headers:
      problems.append(f"missing tensor {name!r} (for {ours})")
      continue
    if ours not in flat:
      problems.append(f"tensor {name!r}: module has no parameter {ours!r}")
      continue
    got = _hooked_shape(hook, headers[name].shape)
    want = tuple(flat[ours].get_value().shape)
    if got != want:
      problems.append(f"shape mismatch for tensor {name!r}: checkpoint {headers[name].shape} "
                      f"-> {got}, module {ours} expects {want}")
    if headers[name].dtype not in _ST_DTYPES:
      problems.append(f"tensor {name!r}: unsupported dtype {headers[name].dtype}")
  for name in sorted(set(headers) - set(table)):
    if not ignored(name):
      problems.append(f"unexpected tensor {name!r} in checkpoint")
  if problems:
    raise CheckpointError(f"{path}: {what} checkpoint does not match the module:\n  "
                          + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  placed = {}
  for name, (ours, hook) in table.items():
    shape, dtype, shard = _target(flat[ours])
    placed[ours] = _place(_load_np(headers[name]), hook, shape, dtype, shard)
  for ours, arr in placed.items():
    flat[ours].set_value(arr)
  return len(placed)


def _check_config(have: Any, want: Any, path: str, skip: tuple[str, ...] = ()) -> None:
  for f in dataclasses.fields(have):
    if f.name in skip:
      continue
    a, b = getattr(have, f.name), getattr(want, f.name)
    if a != b:
      raise CheckpointError(f"{path}/config.json: field {f.name!r} is {b!r} but the module "
                            f"was built with {a!r}")


def load_llm_weights(decoder: llm_lib.Decoder, path: str) -> int:
  """Fills an existing Decoder's BaseParams (LoRA adapters untouched); returns tensors loaded."""
  cfg = llm_config_from_dir(path)
  _check_config(decoder.cfg, cfg, path, skip=("max_position_embeddings",))
  return _load(decoder, path, llm_key_table(cfg),
               lambda n: _llm_ignored(cfg, n), f"{cfg.model_type} LLM")


def load_vision_weights(encoder: vision_lib.VisionEncoder, path: str) -> int:
  """Fills an existing VisionEncoder from a CLIPVisionModel or full CLIPModel dir."""
  cfg = vision_config_from_dir(path)
  _check_config(encoder.cfg, cfg, path)
  table = vision_key_table(cfg, _vision_prefix(read_index(path)))
  return _load(encoder, path, table, _vision_ignored, "CLIP vision")


def _build_and_load(factory: Callable[[], nnx.Module], loader, path: str) -> nnx.Module:
  mesh = _active_mesh() or sharding.single_device_mesh()
  with sharding.mesh_rules(mesh):
    module = nnx.eval_shape(factory)     # abstract: nothing allocated until placement
    sharding.validate_rules(module, mesh)
    loader(module, path)
  for p, v in nnx.to_flat_state(nnx.state(module)):
    if isinstance(v.get_value(), jax.ShapeDtypeStruct):
      raise CheckpointError(f"{path}: variable {'/'.join(map(str, p))} was not loaded")
  return module


def load_llm(path: str, dtype: Any = "float32") -> llm_lib.Decoder:
  """A Decoder from a local HF LLaMA / Qwen2 dir; ``model(input_ids)`` gives float32 logits."""
  cfg = llm_config_from_dir(path)
  dt = jnp.dtype(dtype)
  return _build_and_load(
      lambda: llm_lib.Decoder(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)),
      load_llm_weights, path)


def load_vision(path: str, dtype: Any = "float32") -> vision_lib.VisionEncoder:
  """A VisionEncoder from a local CLIPVisionModel / CLIPModel dir; returns all hidden states."""
  cfg = vision_config_from_dir(path)
  dt = jnp.dtype(dtype)
  return _build_and_load(
      lambda: vision_lib.VisionEncoder(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)),
      load_vision_weights, path)

