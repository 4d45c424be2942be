"""Where evaluations live: one folder per evaluation, and an append-only index per workdir.

Why: scaling experiments evaluate many runs several ways and compare them afterwards, so an
evaluation must never overwrite another one's files, and the list of evaluations must survive a
crash mid-write.

* ``settings_key(settings)``: 8 hex digits of the SHA-256 of the canonical JSON of the settings
  that change the numbers (``feabench.eval_settings``: suites and tasks, sample count, prompt
  seed, generation settings, score reduction, ...).
* ``folder_name(step, mode, settings)``: ``step_<N>_<mode>_<suites>[-<tasks>]_n<samples>_<key>``,
  e.g. ``step_500_generate_synthetic_fea_n200_1c9e04d2``; readable, and unique by the key.
* ``write_results(out_dir, results, predictions)``: the outputs are written into a hidden sibling
  folder and then moved into place. An existing folder is replaced only when it holds the *same*
  evaluation (same step, mode, checkpoint and settings), with a log line that says so; any other
  existing folder is refused (``EvalConflictError``) and left untouched.
* ``append_index(workdir, entry)`` / ``read_index(workdir)``: ``<workdir>/eval/index.jsonl``, one
  JSON line per evaluation. Lines are only ever added: the old bytes plus the new line are written
  to a temporary file, fsynced and renamed over the index (a crash leaves the previous index),
  under a lock so concurrent evaluations lose no line. On an object store (``gs://``) the object
  is rewritten whole, which the store makes atomic (no lock there: one writer at a time).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from feallm_jax import paths
from feallm_jax.eval import report

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
_LOCK = ".index.lock"


class EvalConflictError(FileExistsError):
  """The output folder holds another evaluation's files (they are left untouched)."""


class NoIndexError(FileNotFoundError):
  """A workdir has no ``eval/index.jsonl``."""


def _canonical(x: Any) -> Any:
  """JSON round trip (tuples -> lists, numpy -> python) so settings compare by value."""
  return json.loads(json.dumps(report._jsonable(x), sort_keys=True))


# --- naming ----------------------------------------------------------------------------------

def settings_key(settings: Mapping[str, Any]) -> str:
  text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def folder_name(step: int | None, mode: str, settings: Mapping[str, Any]) -> str:
  names = list(settings.get("suites", {}))
  part = "+".join(names) if len(names) <= 2 else f"{len(names)}suites"
  if settings.get("tasks"):
    part += "-" + "+".join(settings["tasks"])
  n = int(settings.get("num_samples", 0) or 0) or "all"
  return f"step_{step}_{mode}_{part}_n{n}_{settings_key(settings)}"


def eval_dir(workdir: str) -> str:
  return os.path.join(str(workdir), "eval")


def index_path(workdir: str) -> str:
  return os.path.join(eval_dir(workdir), INDEX)


# --- one evaluation's folder -----------------------------------------------------------------

def identity(results: Mapping[str, Any]) -> dict[str, Any]:
  """What makes two evaluations "the same": step, mode, checkpoint and settings."""
  meta = results.get("meta", {}) or {}
  return _canonical(dict(step=meta.get("step"), mode=meta.get("mode"),
                         checkpoint=meta.get("checkpoint"), settings=results.get("settings")))


def _describe(ident: Mapping[str, Any]) -> str:
  settings = ident.get("settings")
  key = settings_key(settings) if settings is not None else "none (written before settings keys)"
  return f"step {ident.get('step')}, mode {ident.get('mode')}, settings key {key}"


def check_target(out_dir: str, ident: Mapping[str, Any]) -> bool:
  """True when ``out_dir`` holds this same evaluation (it will be replaced), False when it is
  absent or empty; raises ``EvalConflictError`` when it holds anything else."""
  p = paths.path(out_dir)
  if not p.exists():
    return False
  if not p.is_dir():
    raise EvalConflictError(f"{out_dir} is a file, not an evaluation folder; choose another "
                            "--out_dir")
  rj = p / "results.json"
  if not rj.exists():
    if any(True for _ in p.iterdir()):
      raise EvalConflictError(
          f"{out_dir} exists and is not an evaluation folder (no results.json): not touching it. "
          "Choose another --out_dir, or leave --out_dir empty (every evaluation gets its own "
          "folder under <workdir>/eval/)")
    return False
  try:
    old = identity(json.loads(rj.read_text()))
  except (ValueError, AttributeError) as e:
    raise EvalConflictError(f"{rj} is unreadable ({e}): not touching {out_dir}; choose another "
                            "--out_dir") from e
  new = _canonical(ident)
  if old != new:
    raise EvalConflictError(
        f"{out_dir} holds another evaluation ({_describe(old)}; this one is {_describe(new)}): "
        "not touching it. Choose another --out_dir, or leave --out_dir empty (every evaluation "
        "gets its own folder under <workdir>/eval/)")
  return True


def write_results(out_dir: str, results: Mapping[str, Any],
                  predictions: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[dict, bool]:
  """Writes every output of one evaluation to ``out_dir``; returns ``(files, replaced)``."""
  ident = identity(results)
  check_target(out_dir, ident)                       # refuse before writing anything
  if paths.is_remote(out_dir):
    return _write_remote(out_dir, results, predictions, ident)
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir.rstrip(os.sep))
  os.makedirs(parent, exist_ok=True)
  tag = f"{os.getpid()}-{secrets.token_hex(3)}"
  tmp = os.path.join(parent, f".{name}.partial-{tag}")
  try:
    files = report.write_all(tmp, results, predictions, final_dir=out_dir)
    replaced = check_target(out_dir, ident)          # again: another process may have written
    if replaced:
      log.warning("%s: the same evaluation (%s) was already here; replacing its files",
                  out_dir, _describe(ident))
      old = os.path.join(parent, f".{name}.replaced-{tag}")
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      if os.path.isdir(out_dir):                     # empty (checked above)
        os.rmdir(out_dir)
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return files, replaced


def _write_remote(out_dir, results, predictions, ident) -> tuple[dict, bool]:
  """Object stores have no atomic folder rename: write locally, then copy (results.json first,
  so an interrupted copy is still recognised as this evaluation and replaced on a re-run)."""
  dst = paths.path(out_dir)
  with tempfile.TemporaryDirectory() as tmp:
    files = report.write_all(tmp, results, predictions, final_dir=str(dst))
    replaced = check_target(out_dir, ident)
    if replaced:
      log.warning("%s: the same evaluation (%s) was already here; replacing its files",
                  out_dir, _describe(ident))
      dst.rmtree()
    dst.mkdir(parents=True, exist_ok=True)
    paths.upload_tree(tmp, dst, first=("results.json",))
  return files, replaced


# --- the index -------------------------------------------------------------------------------

def headline(results: Mapping[str, Any]) -> dict[str, float]:
  """``{"<suite>/<task>/<metric>": value}``: every finite number of every task's summary."""
  out: dict[str, float] = {}
  for suite, res in (results.get("suites") or {}).items():
    for task, summ in (res.get("summary") or {}).items():
      for k, v in summ.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          out[f"{suite}/{task}/{k}"] = v
  return out


def index_entry(results: Mapping[str, Any], out_dir: str, workdir: str, *,
                replaced: bool = False) -> dict[str, Any]:
  """One index line: what was evaluated, how, its headline metrics and where its files are."""
  meta = results.get("meta", {}) or {}
  if paths.is_remote(out_dir) or paths.is_remote(workdir):
    base, full = eval_dir(workdir).rstrip("/"), str(out_dir).rstrip("/")
    path = full[len(base) + 1:] if full.startswith(base + "/") else full
  else:                                    # relative to eval/ when inside it, else absolute
    base, full = os.path.abspath(eval_dir(workdir)), os.path.abspath(out_dir)
    rel = os.path.relpath(full, base)
    path = full if rel.startswith("..") else rel
  return dict(
      time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      step=meta.get("step"), mode=meta.get("mode"), key=meta.get("key"), path=path,
      settings=results.get("settings"), metrics=headline(results),
      trainable_params=meta.get("trainable_params"), frozen_params=meta.get("frozen_params"),
      train_flops=meta.get("train_flops"), config=meta.get("config"),
      checkpoint=meta.get("checkpoint"), replaced=bool(replaced))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  import fcntl
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def append_index(workdir: str, entry: Mapping[str, Any]) -> str:
  """Adds one line to ``<workdir>/eval/index.jsonl`` atomically; returns the index path."""
  line = (json.dumps(report._jsonable(entry), ensure_ascii=False) + "\n").encode()
  path = index_path(workdir)
  if paths.is_remote(path):
    p = paths.path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    old = p.read_bytes() if p.exists() else b""
    if old and not old.endswith(b"\n"):
      old += b"\n"
    p.write_bytes(old + line)
    return path
  d = os.path.dirname(path)
  os.makedirs(d, exist_ok=True)
  with _locked(os.path.join(d, _LOCK)):
    for stale in glob.glob(os.path.join(d, f".{INDEX}.tmp-*")):   # from a killed writer
      os.remove(stale)
    old = b""
    if os.path.exists(path):
      with open(path, "rb") as f:
        old = f.read()
    if old and not old.endswith(b"\n"):
      old += b"\n"
    tmp = os.path.join(d, f".{INDEX}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
      with open(tmp, "wb") as f:
        f.write(old)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    _fsync_dir(d)
  return path


def read_index(workdir: str) -> list[dict[str, Any]]:
  """Every line of ``<workdir>/eval/index.jsonl`` (local or gs://), oldest first."""
  p = paths.path(index_path(workdir))
  if not p.exists():
    raise NoIndexError(
        f"{workdir}: no eval/index.jsonl, so no indexed evaluation to compare. Evaluate the run "
        f"first: python -m launch.eval_feabench --config=<its config> --workdir={workdir} "
        "(training runs index their own evaluations; folders written before the index existed "
        "are not listed)")
  rows = []
  for i, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError as e:
      raise ValueError(f"{p}:{i}: not a JSON line ({e})") from e
  return rows


def latest_per_folder(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One entry per evaluation folder: the newest (a re-run replaced the folder's files)."""
  last: dict[str, dict[str, Any]] = {}
  for e in entries:
    last.pop(str(e.get("path")), None)
    last[str(e.get("path"))] = dict(e)
  return list(last.values())
