"""Runs side by side: the comparison a scaling experiment needs (``launch/compare_runs.py``).

Reads every workdir's ``eval/index.jsonl`` (local or ``gs://``; ``eval/store.py``), keeps the
newest line per evaluation folder, and builds

* one table of the chosen metrics across runs, steps and modes (markdown),
* the metrics against training step, one line per run (and mode, and settings key when a run
  was evaluated several ways in one mode),
* the metrics against trainable parameters and against training FLOPs, one point per run (its
  last evaluated step), points of the same mode and settings joined into a scaling curve,
* the same numbers as JSON, so nothing has to be read back off a picture.

A metric is named ``<task>/<metric>`` (every suite that has it, e.g. ``fer/accuracy``) or
``<suite>/<task>/<metric>`` (e.g. ``raf_db/fer/accuracy``), as in the index's ``metrics``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from feallm_jax import paths
from feallm_jax.eval import report, store

DEFAULT_METRICS = ("fer/accuracy", "aur/au_mean_f1")
_MODE_STYLE = {"generate": "-", "score": "--"}


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  entries: list[dict[str, Any]]


def load_runs(workdirs: Sequence[str]) -> list[Run]:
  """One ``Run`` per workdir; raises ``store.NoIndexError`` naming every workdir without an index."""
  if not workdirs:
    raise ValueError("no workdirs to compare (--workdirs=runs/a,runs/b,...)")
  runs, missing = [], []
  for w in workdirs:
    try:
      entries = store.latest_per_folder(store.read_index(w))
    except store.NoIndexError as e:
      missing.append(str(e))
      continue
    runs.append(Run(os.path.basename(str(w).rstrip("/")) or str(w), str(w), entries))
  if missing:
    raise store.NoIndexError("\n".join(missing))
  names = [r.name for r in runs]
  for r in runs:                                     # two runs/x from different parents
    if names.count(r.name) > 1:
      r.name = r.workdir
  return runs


def _matches(request: str, key: str) -> bool:
  return key == request or (request.count("/") == 1 and key.split("/", 1)[-1] == request)


def resolve_metrics(runs: Sequence[Run], requested: Sequence[str]
                    ) -> tuple[list[str], dict[str, list[str]]]:
  """(table columns: concrete ``suite/task/metric`` keys, {request: runs that lack it})."""
  have = {r.name: {k for e in r.entries for k in (e.get("metrics") or {})} for r in runs}
  columns: list[str] = []
  missing: dict[str, list[str]] = {}
  for req in requested:
    req = req.strip().strip("/")
    if req.count("/") not in (1, 2):
      raise ValueError(f"--metric={req}: expected <task>/<metric> (e.g. fer/accuracy) or "
                       "<suite>/<task>/<metric> (e.g. raf_db/fer/accuracy)")
    found = sorted({k for keys in have.values() for k in keys if _matches(req, k)})
    if not found:
      available = sorted({k for keys in have.values() for k in keys})
      raise ValueError(f"--metric={req}: no run has it. Metrics in these indexes: "
                       f"{', '.join(available) or 'none'}")
    columns += [k for k in found if k not in columns]
    lacking = [name for name, keys in have.items() if not any(_matches(req, k) for k in keys)]
    if lacking:
      missing[req] = lacking
  return columns, missing


def table_rows(runs: Sequence[Run], columns: Sequence[str]) -> list[dict[str, Any]]:
  """One row per evaluation that has any of ``columns``, by run, then step, mode, key."""
  rows = []
  for r in runs:
    for e in sorted(r.entries, key=lambda e: (e.get("step") or 0, str(e.get("mode")),
                                              str(e.get("key")))):
      metrics = e.get("metrics") or {}
      values = {c: metrics.get(c) for c in columns}
      if all(v is None for v in values.values()):
        continue
      rows.append(dict(run=r.name, workdir=r.workdir, step=e.get("step"), mode=e.get("mode"),
                       key=e.get("key"), path=e.get("path"), settings=e.get("settings"),
                       values=values,
                       trainable_params=e.get("trainable_params"),
                       train_flops=e.get("train_flops")))
  return rows


def _cell(v: Any) -> str:
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.4f}"
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  lines = ["| run | step | mode | settings | " + " | ".join(columns) + " |",
           "|---|---|---|---|" + "---|" * len(columns)]
  for row in rows:
    lines.append(f"| {row['run']} | {row['step']} | {row['mode']} | {row['key']} | "
                 + " | ".join(_cell(row["values"][c]) for c in columns) + " |")
  return "\n".join(lines)


def _series(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
  out: dict[tuple, list] = collections.defaultdict(list)
  for row in rows:
    out[(row["run"], row["mode"], row["key"])].append(row)
  return dict(out)


def _labels(series: Mapping[tuple, Any]) -> dict[tuple, str]:
  keys_per = collections.Counter((run, mode) for run, mode, _ in series)
  return {s: (f"{s[0]} · {s[1]}" if keys_per[s[:2]] == 1 else f"{s[0]} · {s[1]} · {s[2]}")
          for s in series}


def step_curves(rows, columns) -> dict[str, dict[str, list[list[float]]]]:
  """``{metric: {series label: [[step, value], ...]}}``: what the step plot draws."""
  series = _series(rows)
  labels = _labels(series)
  out: dict[str, dict[str, list]] = {}
  for c in columns:
    out[c] = {}
    for s, rs in series.items():
      pts = sorted([r["step"], r["values"][c]] for r in rs
                   if r["values"][c] is not None and r["step"] is not None)
      if pts:
        out[c][labels[s]] = pts
  return out


def scaling_points(rows, columns) -> dict[str, list[dict[str, Any]]]:
  """``{metric: [{run, mode, key, step, trainable_params, train_flops, value}]}``: per series,
  the last evaluated step that has the metric (one point per run and way of evaluating)."""
  out: dict[str, list] = {}
  for c in columns:
    out[c] = []
    for (run, mode, key), rs in _series(rows).items():
      have = [r for r in rs if r["values"][c] is not None and r["step"] is not None]
      if not have:
        continue
      last = max(have, key=lambda r: r["step"])
      out[c].append(dict(run=run, mode=mode, key=key, step=last["step"],
                         trainable_params=last["trainable_params"],
                         train_flops=last["train_flops"], value=last["values"][c]))
  return out


def _figure(nrows: int, ncols: int):
  from matplotlib.figure import Figure   # no pyplot: never switch a notebook's backend
  fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), dpi=100)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def label_modes(rows) -> dict[str, str]:
  """``{series label: mode}`` (line style: solid generate, dashed score)."""
  return {label: s[1] for s, label in _labels(_series(rows)).items()}


def plot_steps(curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
               modes: Mapping[str, str] | None = None):
  """One panel per metric: value against training step, one line per series."""
  fig, axes = _figure(len(curves), 1)
  for ax, (metric, lines) in zip(axes[:, 0], curves.items()):
    for label, pts in lines.items():
      mode = (modes or {}).get(label, "")
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
              linestyle=_MODE_STYLE.get(mode, "-"), label=label)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric.rsplit("/", 1)[-1])
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


SCALING_AXES = (("trainable_params", "trainable parameters"),
                ("train_flops", "training FLOPs (analytic model FLOPs)"))


def plot_scaling(points: Mapping[str, Sequence[Mapping[str, Any]]]):
  """Per metric, two panels: value against trainable parameters and against training FLOPs;
  one point per run (labelled), joined per mode and settings key."""
  fig, axes = _figure(len(points), len(SCALING_AXES))
  for row, (metric, pts) in zip(axes, points.items()):
    for ax, (field, xlabel) in zip(row, SCALING_AXES):
      groups: dict[tuple, list] = collections.defaultdict(list)
      for p in pts:
        if p.get(field):
          groups[(p["mode"], p["key"])].append(p)
      for (mode, key), g in groups.items():
        g = sorted(g, key=lambda p: p[field])
        ax.plot([p[field] for p in g], [p["value"] for p in g], marker="o",
                linestyle=_MODE_STYLE.get(mode, "-"), label=f"{mode} · {key}")
        for p in g:
          ax.annotate(p["run"], (p[field], p["value"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))
      if groups:
        from matplotlib.ticker import EngFormatter, LogLocator
        ax.set_xscale("log")                            # ticks at 1, 2, 5 x 10^k: "20 k", "2 G"
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.xaxis.set_minor_formatter(EngFormatter())
        ax.legend(fontsize=7)
      ax.set_title(metric, fontsize=10)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(metric.rsplit("/", 1)[-1])
      ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def outputs(out: str) -> dict[str, str]:
  stem = os.path.splitext(out)[0]
  return dict(markdown=out, steps_png=f"{stem}_steps.png", scaling_png=f"{stem}_scaling.png",
              json=f"{stem}.json")


def compare(workdirs: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS,
            out: str = "compare.md") -> dict[str, Any]:
  """Builds everything above and writes it next to ``out``; returns the numbers and paths."""
  runs = load_runs(workdirs)
  columns, missing = resolve_metrics(runs, metrics)
  rows = table_rows(runs, columns)
  curves, points = step_curves(rows, columns), scaling_points(rows, columns)
  out = paths.resolve(out)                       # local or gs://
  files = outputs(out)
  paths.path(out).parent.mkdir(parents=True, exist_ok=True)
  table = markdown_table(rows, columns)
  notes = [f"- {req}: not in {', '.join(names)}" for req, names in missing.items()]
  no_size = sorted({r["run"] for r in rows if not r.get("trainable_params")})
  if no_size:
    notes.append(f"- no parameter count / FLOPs recorded (not on the scaling plot): "
                 f"{', '.join(no_size)}")
  md = ["# Run comparison", "", "Runs: " + ", ".join(f"{r.name} (`{r.workdir}`)" for r in runs),
        "", table, ""]
  if notes:
    md += ["Missing:", *notes, ""]
  keys = {r["key"]: r.get("settings") for r in rows}
  md += ["Settings keys (the evaluation settings each key hashes):", ""]
  md += [f"- `{k}`: `{json.dumps(v, sort_keys=True, separators=(',', ':'))}`"
         for k, v in keys.items()]
  md += ["",
         f"![metrics against training step]({os.path.basename(files['steps_png'])})", "",
         f"![metrics against trainable parameters and training FLOPs]"
         f"({os.path.basename(files['scaling_png'])})", ""]
  paths.path(files["markdown"]).write_text("\n".join(md))
  report.save_figure(plot_steps(curves, label_modes(rows)), files["steps_png"])
  report.save_figure(plot_scaling(points), files["scaling_png"])
  result = dict(runs={r.name: r.workdir for r in runs}, metrics=columns, missing=missing,
                rows=rows, step_curves=curves, scaling_points=points, files=files, table=table)
  report.write_json(files["json"], result)
  return result
