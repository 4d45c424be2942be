"""Training metrics to a tqdm bar, ``workdir/metrics.jsonl`` and TensorBoard event files.

Only process 0 writes; other processes keep a silent logger so the loop's code is the same on
every host. The JSONL file is appended to, so a resumed run continues the same curve. ``workdir``
may be a ``gs://`` URL (``feallm_jax/paths.py``): object stores cannot append, so there the file
is rewritten whole at each record (its earlier lines are read once, at start).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from feallm_jax import paths

log = logging.getLogger(__name__)


def _scalar(x: Any) -> float | int | bool:
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return bool(x)
  if np.issubdtype(x.dtype, np.integer):
    return int(x)
  return float(x)


class MetricsLogger:
  """Writes one record per ``log`` call; ``close()`` flushes everything."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               progress: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    root = paths.path(workdir)
    self.path = root / "metrics.jsonl"
    self._file = self._writer = self._bar = None
    self._lines: list[str] | None = None        # remote: the whole file, rewritten per record
    if not self.enabled:
      return
    root.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(workdir):
      self._lines = (self.path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if self.path.exists() else [])
    else:
      self._file = self.path.open("a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=str(root / "tb"))
    except ImportError:  # pragma: no cover - tensorboardX is a pinned dependency
      log.warning("tensorboardX is not installed: no TensorBoard events")
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                       dynamic_ncols=True)

  def log(self, step: int, metrics: Mapping[str, Any], *, kind: str = "train") -> dict:
    """Writes ``metrics`` (host scalars) for ``step``; returns the record."""
    record = {"step": int(step), "kind": kind}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    line = json.dumps(record, allow_nan=True) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      self.path.write_text("".join(self._lines), encoding="utf-8")
    else:
      self._file.write(line)
      self._file.flush()
    if self._writer is not None:
      for k, v in record.items():
        if k in ("step", "kind") or isinstance(v, bool):
          continue
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._writer.add_scalar(f"{kind}/{k}", v, int(step))
      self._writer.flush()
    if self._bar is not None and kind == "train":
      self._bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "accuracy")
                             if k in record}, refresh=False)
    return record

  def advance(self, n: int = 1):
    if self._bar is not None:
      self._bar.update(n)

  def text(self, tag: str, text: str, step: int = 0):
    """TensorBoard text (the config, the parameter table); the console shows it at DEBUG only."""
    log.debug("%s: %s", tag, text)
    if self._writer is not None:
      self._writer.add_text(tag, text, step)
      self._writer.flush()

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()
    if self._file is not None:
      self._file.close()
    self._file = self._writer = self._bar = None


def read(workdir: str, kind: str | None = "train") -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (optionally of one kind)."""
  path = paths.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  return [r for r in rows if kind is None or r.get("kind") == kind]
