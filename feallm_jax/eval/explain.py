"""Which facial regions drove an answer: attention over the 16 regions, ranked and drawn.

Shared by ``launch/predict.py --explain`` and the Colab notebook.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from feallm_jax import paths


def region_scores(attention: Mapping[str, Any], row: int = 0) -> np.ndarray | None:
  """Mean attention each of the 16 regions receives (heads and queries averaged), summing to 1.

  Uses the projector's cross-attention of the visual tokens over the regions when present, else
  the Local Clue Aggregator's region self-attention; None when the model has neither.
  """
  if "regions" in attention:
    a = np.asarray(attention["regions"], np.float64)[row]   # [heads, N_vis, 16]
  elif "lca" in attention:
    a = np.asarray(attention["lca"], np.float64)[row]       # [heads, 16, 16]
  else:
    return None
  s = a.mean(axis=(0, 1))
  return s / max(s.sum(), 1e-12)


def draw_overlay(ax, face: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 names: Sequence[str], title: str = "", top_k: int = 3) -> None:
  """Draws the face with each region shaded by its score and the top ``top_k`` labelled."""
  from matplotlib import cm
  from matplotlib.patches import Rectangle
  h, w = face.shape[:2]
  ax.imshow(face)
  top = scores.max() if scores.max() > 0 else 1.0
  for k in scores.argsort():  # strongest drawn last (on top)
    y0, x0, y1, x1 = boxes[k]
    ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h, fill=True,
                               alpha=0.15 + 0.45 * scores[k] / top,
                               color=cm.inferno(0.25 + 0.75 * scores[k] / top), lw=1.5))
  for rank, k in enumerate(scores.argsort()[::-1][:top_k]):
    y0, x0, _, _ = boxes[k]
    ax.text(x0 * w + 1, y0 * h + 6, f"{rank + 1}. {names[k]}", color="white", fontsize=7,
            bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
  ax.set_axis_off()
  if title:
    ax.set_title(title[:70] + ("…" if len(title) > 70 else ""), fontsize=8)


def save_overlay(path: str, face: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 names: Sequence[str], title: str = "") -> None:
  from matplotlib.figure import Figure   # no pyplot: never switch a notebook's backend
  fig = Figure(figsize=(5, 5.6), dpi=120)
  ax = fig.subplots()
  draw_overlay(ax, face, boxes, scores, names, title)
  fig.tight_layout()
  from feallm_jax.eval import report
  report.save_figure(fig, path)        # local or gs://


def overlay_path(workdir: str, image: str, out: str = "") -> str:
  """Where ``predict --explain`` saves its overlay: ``out``, else
  ``<workdir>/predictions/<image stem>_regions.png`` (never the current directory); the
  folder is created (local or gs://)."""
  if out:
    path = paths.resolve(out)
  else:
    stem = os.path.splitext(os.path.basename(image))[0]
    run_dir = paths.resolve(workdir)
    if os.path.basename(os.path.dirname(run_dir)) == "checkpoints":   # a checkpoints/<step> dir
      run_dir = os.path.dirname(os.path.dirname(run_dir))
    path = os.path.join(run_dir, "predictions", f"{stem}_regions.png")
  paths.path(path).parent.mkdir(parents=True, exist_ok=True)
  return path
