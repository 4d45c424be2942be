"""Orbax checkpoints of a training run (all Orbax code of the trainer lives here).

One ``ocp.CheckpointManager`` under ``workdir/checkpoints`` with composite items per step:

  ``state``   trainable weights, optimizer state, RNG streams, step counters (async, sharded)
  ``data``    the Grain iterator state (one JSON file per process, grain's own handler)
  ``config``  the run's config as JSON
  ``meta``    what the state needs to be valid: the model-architecture signature, the shapes of
              the trainable weights and the fingerprint of the frozen base weights

Frozen base weights are never written: a 7B LoRA run records *which* base it started from and
refuses to resume on a different one. Restores take abstract targets that carry the shardings of
the current mesh, so a run may resume on a different mesh shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

import grain.checkpoint as grain_ckpt
from grain._src.python.dataset import dataset as grain_dataset

from feallm_jax import paths

log = logging.getLogger(__name__)

# Model keys that do not change the meaning of saved weights (a resume may change them).
_RUNTIME_MODEL_KEYS = ("remat", "compute_dtype", "frozen_dtype", "hf_path", "base_checkpoint",
                       "attention", "scan_layers")


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint this config cannot continue."""


# -- config/meta helpers -------------------------------------------------------------------------

def config_json(config) -> dict:
  """The config as plain JSON (tuples become lists)."""
  return json.loads(config.to_json_best_effort() if hasattr(config, "to_json_best_effort")
                    else config.to_json())


def _strip(d: Any) -> Any:
  if isinstance(d, Mapping):
    return {k: _strip(v) for k, v in d.items() if k not in _RUNTIME_MODEL_KEYS}
  return d


def model_signature(config) -> dict:
  """The architecture part of the config: what must match for saved weights to fit."""
  cfg = config_json(config)
  sig = _strip(cfg.get("model", {}))
  sig["tokenizer"] = cfg.get("data", {}).get("tokenizer", "")
  return sig


def _diff(a: Any, b: Any, prefix: str = "model") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}.{k}")
    return out
  return [] if a == b else [f"{prefix}: checkpoint {a!r} vs config {b!r}"]


# -- pytree <-> nested dict -------------------------------------------------------------------

def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(_key_name(k) for k in path) for path, _ in flat], [x for _, x in flat], treedef


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_nested(tree: Any) -> dict:
  """Plain nested dict of arrays (PRNG keys as their raw uint32 data) for Orbax."""
  paths, leaves, _ = _paths(tree)
  out: dict = {}
  for path, x in zip(paths, leaves):
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    if path[-1] in node:
      raise ValueError(f"duplicate checkpoint path {'/'.join(path)}")
    node[path[-1]] = jax.random.key_data(x) if _is_key(x) else x
  return out


def _abstract_nested(abstract: Any) -> dict:
  def leaf(x):
    if _is_key(x):
      shape = tuple(x.shape) + tuple(getattr(x.dtype, "_impl").key_shape)
      s = x.sharding
      sh = NamedSharding(s.mesh, P(*s.spec)) if isinstance(s, NamedSharding) else s
      return jax.ShapeDtypeStruct(shape, np.uint32, sharding=sh)
    return x
  return to_nested(jax.tree.map(leaf, abstract, is_leaf=lambda x: isinstance(
      x, jax.ShapeDtypeStruct)))


def from_nested(nested: dict, like: Any) -> Any:
  """Inverse of :func:`to_nested` with the structure (and key types) of ``like``."""
  paths, leaves, treedef = _paths(like)
  out = []
  for path, ref in zip(paths, leaves):
    node = nested
    for part in path:
      if not isinstance(node, Mapping) or part not in node:
        raise CheckpointMismatchError(f"checkpoint has no entry {'/'.join(path)}")
      node = node[part]
    if _is_key(ref):
      impl = (jax.random.key_impl(ref) if isinstance(ref, jax.Array)
              else getattr(ref.dtype, "_impl", None))
      node = jax.random.wrap_key_data(node, impl=impl)
    out.append(node)
  return jax.tree_util.tree_unflatten(treedef, out)


def shapes_table(tree: Any) -> dict[str, list]:
  paths, leaves, _ = _paths(tree)
  return {"/".join(p): [list(x.shape), str(x.dtype)] for p, x in zip(paths, leaves)}


def _tree_restore(target: dict, partial: bool = False):
  return ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=partial)


# -- Grain iterator state ----------------------------------------------------------------------

class _IteratorSnapshot:
  """The iterator state taken *now*: grain's handler may run after the loop moved on.

  Accepts any iterator with ``get_state()`` (a Grain DatasetIterator's dict, a DataLoader's
  bytes, or a wrapper around either); grain's handler writes the bytes per process.
  """

  def __init__(self, iterator: Any):
    state = iterator.get_state()
    if isinstance(state, str):
      state = state.encode()
    elif not isinstance(state, bytes):
      state = json.dumps(state, indent=2).encode()
    self._bytes = state

  def get_state(self) -> bytes:
    return self._bytes


class _IteratorRestorer:
  """Feeds grain's handler bytes back into an iterator whose state may be a dict."""

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def set_state(self, state: bytes):
    wants_dict = not isinstance(self.iterator.get_state(), (bytes, str))
    self.iterator.set_state(json.loads(state) if wants_dict else state)

  def start_prefetch(self):
    if hasattr(self.iterator, "start_prefetch"):
      self.iterator.start_prefetch()


def _restore_resharded(iterator: Any, files: list, step: int) -> None:
  """Sets ``iterator`` from the states another process count saved (``reshard_states`` of the
  iterator's class: the pipeline knows which parts are global and which per process)."""
  texts = [f.read_text() for f in files]
  reshard = getattr(type(iterator), "reshard_states", None)
  if reshard is None:
    if any(t != texts[0] for t in texts[1:]):
      raise ValueError(f"checkpoint {step}: {len(texts)} processes saved different data "
                       f"iterator states and {type(iterator).__name__} cannot merge them for "
                       f"{jax.process_count()} process(es); resume with {len(texts)}")
    _IteratorRestorer(iterator).set_state(texts[0].encode())
  else:
    iterator.set_state(reshard([json.loads(t) for t in texts], jax.process_index()))
  if hasattr(iterator, "start_prefetch"):
    iterator.start_prefetch()


def _iterator_restore_args(iterator: Any):
  if isinstance(iterator, grain_dataset.DatasetIterator):
    return grain_ckpt.CheckpointRestore(iterator)
  return grain_ckpt.CheckpointRestore(_IteratorRestorer(iterator))


# -- the manager ----------------------------------------------------------------------------

class Checkpointer:
  """A run's checkpoints: save every ``train.save_every`` steps, keep ``train.keep``."""

  def __init__(self, workdir: str, config, *, base_fingerprint: str = "",
               async_save: bool = True, read_only: bool = False):
    # Orbax wants absolute local paths; gs:// etc. pass through (feallm_jax/paths.py).
    self.directory = paths.path(workdir) / "checkpoints"
    self.config = config
    self.base_fingerprint = base_fingerprint
    self.read_only = read_only
    self._async = async_save
    self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if self.read_only else max(int(self.config.train.keep), 1),
        create=not self.read_only, read_only=self.read_only,
        save_interval_steps=0 if self.read_only else 1,
        enable_async_checkpointing=self._async and not self.read_only)
    # A read-only open (evaluation, predict, the resume check) is what we asked for: Orbax's
    # "Given directory is read only" warning says nothing to a person (shown with --verbosity=0).
    from feallm_jax import console
    with console.silence_library_warnings(self.read_only):
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  # -- inspection -------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def read_config(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(out["config"])

  def check_compatible(self, meta: Mapping[str, Any], trainable_shapes: Mapping | None = None,
                       *, check_base: bool = True):
    """Raises :class:`CheckpointMismatchError` when ``meta`` cannot continue under this config
    (``check_base=False``: the architecture only, before the base fingerprint is known)."""
    diffs = _diff(meta.get("model_signature", {}), model_signature(self.config))
    if diffs:
      raise CheckpointMismatchError(
          f"{self.directory} holds checkpoints of a different model config; refusing to "
          "overwrite them. Use a new --workdir (or restore the original config). Differences:\n  "
          + "\n  ".join(diffs[:20]))
    if check_base and meta.get("base_fingerprint", "") != self.base_fingerprint:
      raise CheckpointMismatchError(
          f"{self.directory}: the run started from frozen base weights with fingerprint "
          f"{meta.get('base_fingerprint')!r}, but this config's base weights have fingerprint "
          f"{self.base_fingerprint!r} (model.base_checkpoint / hf_path changed?). Resuming would "
          "silently combine adapters with the wrong base; use the original base or a new workdir.")
    if trainable_shapes is not None and meta.get("trainable") is not None:
      saved = meta["trainable"]
      if saved != dict(trainable_shapes):
        bad = sorted(set(saved) ^ set(trainable_shapes)) or sorted(
            k for k in saved if saved[k] != trainable_shapes.get(k))
        raise CheckpointMismatchError(
            f"{self.directory}: saved trainable weights differ from this model's "
            f"(e.g. {bad[:5]}); refusing to resume.")

  def newest_readable_meta(self) -> tuple[int, dict] | None:
    """``(step, meta)`` of the newest checkpoint whose metadata reads back, else None."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_meta(step)
      except Exception as e:  # noqa: BLE001 - a corrupt step; older ones may be fine
        log.warning("checkpoint %d: metadata unreadable (%s); looking at older steps", step, e)
    return None

  # -- save / restore ---------------------------------------------------------------------

  def meta(self, state: Any, step: int) -> dict:
    from feallm_jax.train import step as step_lib  # noqa: F401 (type only)
    return {"step": int(step), "model_signature": model_signature(self.config),
            "base_fingerprint": self.base_fingerprint,
            "trainable": shapes_table(state.params)}

  def save(self, step: int, state: Any, data_iterator: Any = None) -> bool:
    """Starts an async save of ``state`` at ``step`` (no-op when that step exists)."""
    if self.read_only:
      raise RuntimeError("checkpointer opened read-only")
    if step in self.manager.all_steps():
      return False
    items = dict(state=ocp.args.PyTreeSave(to_nested(state)),
                 config=ocp.args.JsonSave(config_json(self.config)),
                 meta=ocp.args.JsonSave(self.meta(state, step)))
    if data_iterator is not None:
      items["data"] = grain_ckpt.CheckpointSave(_IteratorSnapshot(data_iterator))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: int | None = None) -> tuple[Any, int] | None:
    """Restores the newest good checkpoint into ``abstract_state``'s shardings.

    A checkpoint that fails to read is skipped with a warning and the previous one is tried;
    once one restores, the unreadable newer ones are moved to ``checkpoints_corrupt/`` (never
    deleted) so the resumed run can save those steps again. Returns ``(state, step)``, or None
    for an empty directory; raises when checkpoints exist but none restores.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      return None
    target = _abstract_nested(abstract_state)
    failures = []
    for s in steps:
      try:
        meta = self.read_meta(s)
        self.check_compatible(meta, shapes_table(abstract_state.params))
        items = dict(state=_tree_restore(target))
        other = self._other_process_count_data(s) if data_iterator is not None else None
        if data_iterator is not None and other is None:
          items["data"] = _iterator_restore_args(data_iterator)
        out = self.manager.restore(s, args=ocp.args.Composite(**items))
        restored = from_nested(out["state"], abstract_state)
        if other is not None:
          _restore_resharded(data_iterator, other, s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - fall back to an older checkpoint
        if step is not None:
          raise
        log.warning("checkpoint at step %d could not be restored (%s: %s); trying the previous "
                    "one", s, type(e).__name__, e)
        failures.append((s, f"{type(e).__name__}: {e}"))
        continue
      for bad, _ in failures:
        self._quarantine(bad)
      return restored, s
    raise RuntimeError(
        f"{self.directory}: no checkpoint could be restored; refusing to start over and "
        "overwrite them. Failures:\n  " + "\n  ".join(f"step {s}: {e}" for s, e in failures))

  def _other_process_count_data(self, step: int) -> list | None:
    """The iterator state files of ``step`` when another process count wrote them (e.g. 2
    processes saved, 1 restores), in process order; None when this count wrote them."""
    folder = self.directory / str(step) / "data"
    pi, pc = jax.process_index(), jax.process_count()
    if not folder.exists() or (folder / f"process_{pi}-of-{pc}.json").exists():
      return None
    found: dict[int, dict[int, Any]] = {}
    for f in folder.iterdir():
      m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
      if m:
        found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    complete = {n: files for n, files in found.items() if sorted(files) == list(range(n))}
    if len(complete) != 1:
      raise ValueError(f"{folder}: no complete set of data iterator states for {pc} process(es) "
                       f"or for any other count (found {sorted(f.name for f in folder.iterdir())})")
    (n, files), = complete.items()
    log.info("step %d: data iterator states written by %d process(es), restored into %d", step,
             n, pc)
    return [files[i] for i in range(n)]

  def _quarantine(self, step: int):
    """Moves a bad step out of the manager's way (kept for inspection, never deleted)."""
    src = self.directory / str(step)
    if jax.process_index() == 0 and src.exists():
      dst_root = self.directory.parent / "checkpoints_corrupt"
      dst_root.mkdir(parents=True, exist_ok=True)
      dst = dst_root / str(step)
      n = 1
      while dst.exists():
        dst, n = dst_root / f"{step}.{n}", n + 1
      src.rename(dst)                  # a directory: local rename or gcsfs recursive move
      log.warning("moved unreadable checkpoint %s to %s", src, dst)
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def check_workdir(config, workdir: str, base_fingerprint: str | None = None) -> int | None:
  """Refuses (before anything is written) a workdir whose checkpoints are of another config.

  ``base_fingerprint`` None checks the architecture only (the cheap check before the model is
  built; comparing against '' refused every resume of a run with frozen weights). Returns the
  newest readable checkpoint step, or None for a fresh workdir.
  """
  directory = paths.path(workdir) / "checkpoints"
  if not directory.exists():
    return None
  ckpt = Checkpointer(workdir, config, base_fingerprint=base_fingerprint or "", read_only=True)
  try:
    found = ckpt.newest_readable_meta()
    if found is None:
      return None
    step, meta = found
    ckpt.check_compatible(meta, check_base=base_fingerprint is not None)
    return step
  finally:
    ckpt.manager.close()


def restore_weights(model, config, workdir: str, *, trainable: Any, step: int | None = None,
                    base_fingerprint: str | None = None) -> int:
  """Loads a run's trainable weights (and RNG state) into ``model`` in place; returns the step.

  For evaluation and export: optimizer state is not read. ``model`` must be built from the
  same config (and the same base weights) on any mesh; its shardings are kept.
  """
  from flax import nnx  # local: keeps this module importable without building models

  _, params_v, _, rest_v = nnx.split(model, trainable, nnx.Param, ...)
  like = {"params": nnx.as_pure(params_v), "rest": nnx.as_pure(rest_v)}
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  ckpt = Checkpointer(workdir, config, base_fingerprint=base_fingerprint or "", read_only=True)
  try:
    steps = [step] if step is not None else list(reversed(ckpt.all_steps()))
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
    errors = []
    for s in steps:
      try:
        meta = ckpt.read_meta(s)
        if base_fingerprint is None:
          ckpt.base_fingerprint = meta.get("base_fingerprint", "")
        ckpt.check_compatible(meta, shapes_table(like["params"]))
        out = ckpt.manager.restore(s, args=ocp.args.Composite(
            state=_tree_restore(_abstract_nested(abstract), partial=True)))
        restored = from_nested(out["state"], abstract)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001
        if step is not None:
          raise
        log.warning("checkpoint %d unreadable (%s); trying the previous one", s, e)
        errors.append(f"step {s}: {e}")
        continue
      nnx.update(model, restored["params"], restored["rest"])
      return s
    raise RuntimeError(f"{ckpt.directory}: no checkpoint could be read:\n  " + "\n  ".join(errors))
  finally:
    ckpt.manager.close()
