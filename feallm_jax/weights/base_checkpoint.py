"""The base checkpoint training starts from: both pretrained backbones as one Orbax checkpoint.

Layout of ``out_dir``::

  state/vision, state/llm   Orbax (StandardCheckpointer) items {name: array}, BaseParams only;
                            names are NNX paths joined with '.'
  tokenizer/    the LLM's tokenizer files + its config.json (offline ``AutoTokenizer`` wants it)
  meta.json     both HF configs, every parameter's shape/dtype, and a content fingerprint

Restoring uses abstract targets that carry each module's *current* shardings and dtypes, so a
base written on one mesh restores onto any other, straight into its shards. The fingerprint
(SHA-256 over ``state/`` and ``tokenizer/``) lets a resumed run prove its base is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from feallm_jax import paths
from feallm_jax.models import layers, llm as llm_lib, vision as vision_lib
from feallm_jax.weights import hf

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "config.json")


class BaseCheckpointError(ValueError):
  """A base checkpoint that is missing, altered or does not fit the modules."""


def _base_vars(module: nnx.Module) -> dict[str, nnx.Variable]:
  return {".".join(str(p) for p in path): var
          for path, var in nnx.to_flat_state(nnx.state(module, layers.BaseParam))}


def _hash_tree(root, h: "hashlib._Hash", top=None) -> None:
  """Relative names and contents of every file under ``root`` (an ``epath.Path``, local or
  gs://), in ``os.walk`` order with sorted names (a directory's files, then its subdirectories),
  so fingerprints recorded before stay valid and a copy in a bucket hashes the same."""
  top = root if top is None else top
  entries = sorted(root.iterdir(), key=lambda p: p.name)
  dirs = [e for e in entries if e.is_dir()]
  for full in (e for e in entries if e not in dirs):
    h.update(str(full.relative_to(top)).encode() + b"\0")
    with full.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
  for d in dirs:
    _hash_tree(d, h, top)


def fingerprint(ckpt_dir: str) -> str:
  """SHA-256 of the saved arrays and tokenizer files (recomputed from disk, not read from meta)."""
  h = hashlib.sha256()
  for sub in ("state", "tokenizer"):
    h.update(sub.encode() + b"\0")
    path = paths.path(ckpt_dir) / sub
    if path.is_dir():
      _hash_tree(path, h)
  return h.hexdigest()


def read_meta(ckpt_dir: str) -> dict[str, Any]:
  path = paths.path(ckpt_dir) / "meta.json"
  if not path.exists():
    raise FileNotFoundError(f"{ckpt_dir}: not a base checkpoint (no meta.json)")
  return json.loads(path.read_text(encoding="utf-8"))


def save(out_dir: str, vision: vision_lib.VisionEncoder | None, llm: llm_lib.Decoder | None, *,
         vision_hf_config: dict | None, llm_hf_config: dict | None,
         tokenizer_dir: str | None, overwrite: bool = False) -> str:
  """Writes the base checkpoint (local or gs://); returns its fingerprint. Refuses a non-empty
  ``out_dir``."""
  out_dir = paths.resolve(out_dir)
  out = paths.path(out_dir)
  if out.is_dir() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    out.rmtree()
  if vision is None and llm is None:
    raise ValueError("base_checkpoint.save: nothing to save (vision and llm are both None)")
  if (vision is None) != (vision_hf_config is None) or (llm is None) != (llm_hf_config is None):
    raise ValueError("base_checkpoint.save: pass an HF config for each module saved")
  copied = []
  if tokenizer_dir:
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
      raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json, "
                              "tokenizer.model or vocab.json)")
  out.mkdir(parents=True, exist_ok=True)
  parts = {k: m for k, m in (("vision", vision), ("llm", llm)) if m is not None}
  tree = {k: {n: v.get_value() for n, v in _base_vars(m).items()} for k, m in parts.items()}
  ckptr = ocp.StandardCheckpointer()
  try:
    for key, t in tree.items():   # one item per tower: either restores without the other
      ckptr.save(out / "state" / key, t)
      ckptr.wait_until_finished()
  finally:
    ckptr.close()
  if tokenizer_dir:
    if jax.process_index() == 0:
      dst = out / "tokenizer"
      dst.mkdir(parents=True, exist_ok=True)
      for name in copied:
        (dst / name).write_bytes(paths.path(os.path.join(tokenizer_dir, name)).read_bytes())
      if "config.json" not in copied and llm_hf_config is not None:
        (dst / "config.json").write_text(json.dumps(llm_hf_config, indent=1))
  meta = dict(
      format_version=FORMAT_VERSION,
      vision_hf_config=vision_hf_config, llm_hf_config=llm_hf_config,
      params={k: {n: dict(shape=list(a.shape), dtype=str(a.dtype)) for n, a in t.items()}
              for k, t in tree.items()},
      tokenizer=bool(tokenizer_dir),
      fingerprint=fingerprint(out_dir))
  if jax.process_index() == 0:
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  return meta["fingerprint"]


def verify(ckpt_dir: str) -> str:
  """Raises unless the files on disk still match the fingerprint recorded at save time."""
  want = read_meta(ckpt_dir)["fingerprint"]
  got = fingerprint(ckpt_dir)
  if got != want:
    raise BaseCheckpointError(f"{ckpt_dir}: content fingerprint {got[:16]}… differs from the "
                              f"recorded {want[:16]}…; the base checkpoint was modified")
  return got


def restore_into(ckpt_dir: str, vision: vision_lib.VisionEncoder | None,
                 llm: llm_lib.Decoder | None, *, verify_fingerprint: bool = True) -> str:
  """Fills the modules' BaseParams (LoRA and new weights untouched), on their own shardings and
  dtypes. Validates configs, names and shapes first; returns the fingerprint."""
  ckpt_dir = paths.resolve(ckpt_dir)
  meta = read_meta(ckpt_dir)
  fp = verify(ckpt_dir) if verify_fingerprint else meta["fingerprint"]
  parts = {k: m for k, m in (("vision", vision), ("llm", llm)) if m is not None}
  problems = []
  for key, module in parts.items():
    hf_cfg = meta.get(f"{key}_hf_config")
    if hf_cfg is None:
      raise BaseCheckpointError(f"{ckpt_dir}: holds no {key!r} weights")
    want = (vision_lib.VisionConfig.from_hf(hf_cfg) if key == "vision"
            else llm_lib.LLMConfig.from_hf(hf_cfg))
    hf._check_config(module.cfg, want, f"{ckpt_dir}/meta.json:{key}_hf_config",
                     skip=("max_position_embeddings",))
    stored = meta["params"][key]
    ours = _base_vars(module)
    for n in sorted(set(stored) - set(ours)):
      problems.append(f"{key}: checkpoint tensor {n!r} has no module parameter")
    for n in sorted(set(ours) - set(stored)):
      problems.append(f"{key}: module parameter {n!r} is missing from the checkpoint")
    for n in sorted(set(ours) & set(stored)):
      if tuple(stored[n]["shape"]) != tuple(ours[n].get_value().shape):
        problems.append(f"{key}: shape mismatch for {n!r}: checkpoint {tuple(stored[n]['shape'])}"
                        f", module {tuple(ours[n].get_value().shape)}")
  if problems:
    raise BaseCheckpointError(f"{ckpt_dir}: base checkpoint does not fit:\n  "
                              + "\n  ".join(problems[:20]))
  variables = {k: _base_vars(m) for k, m in parts.items()}
  target = {}
  for key, vs in variables.items():
    target[key] = {}
    for n, var in vs.items():
      shape, dtype, shard = hf._target(var)
      target[key][n] = jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = {k: ckptr.restore(paths.path(ckpt_dir) / "state" / k, t)
                for k, t in target.items()}
  finally:
    ckptr.close()
  for key, vs in variables.items():
    for n, var in vs.items():
      var.set_value(restored[key][n])
  return fp
