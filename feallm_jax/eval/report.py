"""Writes evaluation outputs: results.json, results.md, per-sample JSONL, confusion-matrix PNGs.

Kept apart from the evaluator so a notebook can re-render a saved results.json, and so
matplotlib (Agg backend, no display needed) is imported only when files are written.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from feallm_jax import paths


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set, frozenset)):
    items = sorted(x) if isinstance(x, (set, frozenset)) else x
    return [_jsonable(v) for v in items]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str, obj: Any) -> None:
  with paths.path(path).open("w") as f:
    json.dump(_jsonable(obj), f, indent=1, sort_keys=False)
    f.write("\n")


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> int:
  n = 0
  with paths.path(path).open("w") as f:
    for row in rows:
      f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
      n += 1
  return n


def _fmt(x: Any, pct: bool = True) -> str:
  if x is None:
    return "–"
  if isinstance(x, float):
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"
  return str(x)


# Columns of the markdown table: (header, summary key, shown as percent).
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("n", "num_samples", False),
    ("unanswerable", "unanswerable", False),
    ("acc", "accuracy", True),
    ("macro-F1", "macro_f1", True),
    ("UAR", "uar", True),
    ("emo unparsed", "emotion_unparsed", False),
    ("AU F1", "au_mean_f1", True),
    ("AU unparsed", "aus_unparsed", False),
    ("EMFACS cons.", "emfacs_consistency", True),
    ("ROUGE-L", "rouge_l", True),
)


def markdown(results: Mapping[str, Any]) -> str:
  """One table row per (suite, task) with the headline metrics (percent where a rate)."""
  lines = ["# FEABench results", ""]
  meta = results.get("meta", {})
  if meta:
    lines += [", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))),
              ""]
  if results.get("settings"):
    lines += ["Settings (key " + str(meta.get("key", "")) + "): `"
              + json.dumps(_jsonable(results["settings"]), sort_keys=True) + "`", ""]
  lines.append("| suite | task | " + " | ".join(c[0] for c in COLUMNS) + " |")
  lines.append("|---|---|" + "---|" * len(COLUMNS))
  for suite, res in results.get("suites", {}).items():
    for task, summ in res.get("summary", {}).items():
      cells = [_fmt(summ.get(key), pct) for _, key, pct in COLUMNS]
      lines.append(f"| {suite} | {task} | " + " | ".join(cells) + " |")
  lines += ["", "Rates in percent; unparseable answers count as wrong (and are counted), and so "
            "do unanswerable prompts (too long for data.max_len or an undecodable image). "
            "'–' = the task has no such label."]
  for suite, res in results.get("suites", {}).items():
    for task, per in res.get("tasks", {}).items():
      aus = per.get("aus")
      if aus:
        lines += ["", f"## {suite} / {task}: per-AU F1", "",
                  "| " + " | ".join(aus["per_au_f1"]) + " |",
                  "|" + "---|" * len(aus["per_au_f1"]),
                  "| " + " | ".join(f"{100 * v:.1f}" for v in aus["per_au_f1"].values()) + " |"]
  return "\n".join(lines) + "\n"


def confusion_png(path: str, confusion: Sequence[Sequence[int]], labels: Sequence[str],
                  unparsed: Sequence[int] | None = None, title: str = "") -> None:
  """Row-normalized confusion matrix with counts; an extra 'unparsed' column when given."""
  from matplotlib.figure import Figure   # no pyplot: never switch a notebook's backend

  cm = np.asarray(confusion, np.float64)
  cols = list(labels)
  if unparsed is not None and np.sum(unparsed) > 0:
    cm = np.concatenate([cm, np.asarray(unparsed, np.float64)[:, None]], axis=1)
    cols.append("unparsed")
  rows = cm.sum(1, keepdims=True)
  norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  k = len(labels)
  fig = Figure(figsize=(1.0 + 0.75 * len(cols), 1.0 + 0.7 * k), dpi=110)
  ax = fig.subplots()
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
  ax.set_yticks(range(k), list(labels))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(k):
    for j in range(len(cols)):
      if cm[i, j]:
        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure to ``path``, local or gs:// (rendered in memory, written through
  epath; the format follows the extension, PNG without one)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.path.splitext(str(path))[1][1:].lower() or "png")
  paths.path(path).write_bytes(buf.getvalue())


def write_all(out_dir: str, results: Mapping[str, Any],
              predictions: Mapping[str, Sequence[Mapping[str, Any]]], *,
              final_dir: str | None = None) -> dict[str, Any]:
  """Writes every output under ``out_dir`` (local or gs://); returns ``{kind: path(s)}``.

  ``final_dir``: where the folder will live once moved into place (``eval/store.py`` writes
  into a hidden sibling first); the paths returned and recorded in results.json are under it.
  """
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  final = final_dir or out_dir

  def where(name: str) -> tuple[str, str]:
    return os.path.join(out_dir, name), os.path.join(final, name)

  files: dict[str, Any] = {"results_json": where("results.json")[1],
                           "results_md": where("results.md")[1],
                           "predictions": {}, "confusion": {}}
  for suite, rows in predictions.items():
    path, shown = where(f"predictions_{suite}.jsonl")
    write_jsonl(path, rows)
    files["predictions"][suite] = shown
  for suite, res in results.get("suites", {}).items():
    for task, per in res.get("tasks", {}).items():
      emo = per.get("emotion")
      if not emo or not emo.get("num_samples"):
        continue
      path, shown = where(f"confusion_{suite}_{task}.png")
      confusion_png(path, emo["confusion"], emo["labels"], emo.get("unparsed_per_class"),
                    title=f"{suite} / {task}: acc {100 * emo['accuracy']:.1f}%, "
                          f"UAR {100 * emo['uar']:.1f}%")
      files["confusion"][f"{suite}/{task}"] = shown
  with paths.path(where("results.md")[0]).open("w") as f:
    f.write(markdown(results))
  write_json(where("results.json")[0], {**results, "files": files})
  return files
