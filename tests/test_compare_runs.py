"""launch/compare_runs.py on three tiny runs trained here (issue 18): the table and both plots
carry the numbers of the runs' own results.json; a workdir without an index is refused; a run
that lacks a requested metric is named."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from feallm_jax.eval import compare, feabench
import subprocess
import sys

from tests.test_train_step import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  """launch/compare_runs.py as a user runs it (its own process: its absl flags are its own)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "compare_runs.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


WIDTHS = {"w32": 32, "w48": 48, "w64": 64}      # LLM width: the scaling axis of the experiment


def _config(data_dir, width):
  c = small_config(data_dir)
  c.model.vision.update(image_size=32, hidden_size=32, intermediate_size=64)
  c.model.llm.update(hidden_size=width, intermediate_size=2 * width, head_dim=width // 2)
  c.train.update(num_steps=4, log_every=2, save_every=2, eval_every=2, progress=False)
  c.eval.update(suites=("synthetic_fea",), mode="generate", num_samples=2, max_new_tokens=4,
                batch_size=8)
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, devices):
  """w32 and w48 evaluated by training itself (generate, steps 2 and 4, 2 faces), w32 also in
  score mode at the end; w64 trained without evaluation, then evaluated in score mode. Score mode
  is FER alone on 24 faces: cheap (nothing generated) and enough for accuracies that are not all
  zero after 4 steps, so the number checks below cannot pass vacuously."""
  from feallm_jax.train import train_and_evaluate
  tmp = tmp_path_factory.mktemp("compare")
  data_dir = str(tmp / "data")
  out = {}
  for name, width in WIDTHS.items():
    c = _config(data_dir, width)
    if name == "w64":
      c.eval.suites = ()
    workdir = str(tmp / name)
    train_and_evaluate(c, workdir)
    if name != "w48":
      c.eval.update(suites=("synthetic_fea",), num_samples=24)
      feabench.evaluate(c, workdir, mode="score", tasks=("fer",), progress=False)
    out[name] = dict(workdir=workdir, config=c)
  return dict(tmp=tmp, runs=out)


def _own_results(workdir):
  """Every results.json under the run's eval/ folder, read directly (not through the index):
  {(step, mode): results}."""
  got = {}
  for path in glob.glob(os.path.join(workdir, "eval", "step_*", "results.json")):
    with open(path) as f:
      r = json.load(f)
    got[(r["meta"]["step"], r["meta"]["mode"])] = r
  return got


def _value(results, metric):
  suite, task, key = metric.split("/")
  return results["suites"][suite]["summary"].get(task, {}).get(key)


def test_compare_three_runs_table_and_plots_match_results_json(runs, capsys):
  tmp = runs["tmp"]
  workdirs = [runs["runs"][n]["workdir"] for n in WIDTHS]
  own = {n: _own_results(runs["runs"][n]["workdir"]) for n in WIDTHS}
  assert set(own["w32"]) == {(2, "generate"), (4, "generate"), (4, "score")}
  assert set(own["w48"]) == {(2, "generate"), (4, "generate")}
  assert set(own["w64"]) == {(4, "score")}

  # The CLI, as a user runs it.
  out = str(tmp / "cmp" / "compare.md")
  proc = _cli("--workdirs=" + ",".join(workdirs), "--metric=fer/accuracy,aur/au_mean_f1",
              f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = proc.stdout
  assert "note: aur/au_mean_f1 is missing in: w64" in printed

  metrics = ["synthetic_fea/fer/accuracy", "synthetic_fea/aur/au_mean_f1"]
  # The table: one row per (run, step, mode), every cell equal to that run's results.json.
  with open(out) as f:
    md = f.read()
  table = [line for line in md.splitlines() if line.startswith("| w")]
  assert len(table) == 6
  seen = set()
  for line in table:
    cells = [c.strip() for c in line.strip("|").split("|")]
    name, step, mode, key = cells[0], int(cells[1]), cells[2], cells[3]
    r = own[name][(step, mode)]
    assert key == r["meta"]["key"]
    for cell, metric in zip(cells[4:], metrics):
      v = _value(r, metric)
      if v is None:
        assert cell == "–", (line, metric)
      else:
        assert float(cell) == pytest.approx(v, abs=5e-5), (line, metric)
    seen.add((name, step, mode))
  assert seen == {(n, s, m) for n in own for (s, m) in own[n]}
  accuracies = {_value(r, metrics[0]) for n in own for r in own[n].values()}
  assert len(accuracies) >= 2, accuracies     # distinct numbers, so a mix-up would show
  assert "aur/au_mean_f1: not in w64" in md

  with open(str(tmp / "cmp" / "compare.json")) as f:
    saved = json.load(f)
  assert saved["metrics"] == metrics and saved["missing"] == {"aur/au_mean_f1": ["w64"]}

  # The step plot: drawn lines, read back off the matplotlib figure, against results.json.
  result = compare.compare(workdirs, ["fer/accuracy", "aur/au_mean_f1"], str(tmp / "again.md"))
  fig = compare.plot_steps(result["step_curves"], compare.label_modes(result["rows"]))
  ax_fer, ax_aur = fig.axes[:2]
  drawn = {ln.get_label(): ln.get_xydata().tolist() for ln in ax_fer.get_lines()}
  expected = {}
  for n in WIDTHS:
    for mode in ("generate", "score"):
      pts = sorted([s, _value(r, metrics[0])] for (s, m), r in own[n].items() if m == mode)
      if pts:
        expected[f"{n} · {mode}"] = pts
  assert drawn.keys() == expected.keys()
  for label, pts in expected.items():
    np.testing.assert_allclose(drawn[label], pts, rtol=1e-12, err_msg=label)
  drawn_aur = {ln.get_label() for ln in ax_aur.get_lines()}
  assert drawn_aur == {"w32 · generate", "w48 · generate"}
  assert {ln.get_linestyle() for ln in ax_fer.get_lines() if "score" in ln.get_label()} == {"--"}

  # The scaling plot: one point per run (its last step), x = trainable params / training FLOPs.
  from feallm_jax import flops
  from feallm_jax.models import feallm
  fig = compare.plot_scaling(result["scaling_points"])
  axes = np.asarray(fig.axes).reshape(len(metrics), 2)
  params, train_flops = {}, {}
  for n in WIDTHS:
    r = own[n][(4, "score")] if n != "w48" else own[n][(4, "generate")]
    params[n] = r["meta"]["trainable_params"]
    train_flops[n] = r["meta"]["train_flops"]
    c = runs["runs"][n]["config"]
    per_example = flops.train_step(feallm.spec_from_config(c), int(c.data.max_len))["total"]
    assert train_flops[n] == pytest.approx(per_example * c.data.batch_size * 4)
  assert params["w32"] < params["w48"] < params["w64"]
  for col, xs in ((0, params), (1, train_flops)):
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in axes[0, col].get_lines()}
    gen_key = own["w32"][(4, "generate")]["meta"]["key"]
    score_key = own["w32"][(4, "score")]["meta"]["key"]
    assert own["w64"][(4, "score")]["meta"]["key"] == score_key       # same settings, one curve
    np.testing.assert_allclose(lines[f"generate · {gen_key}"], [
        [xs[n], _value(own[n][(4, "generate")], metrics[0])] for n in ("w32", "w48")])
    np.testing.assert_allclose(lines[f"score · {score_key}"], [
        [xs[n], _value(own[n][(4, "score")], metrics[0])] for n in ("w32", "w64")])
    assert axes[0, col].get_xscale() == "log"

  # Both PNGs were written, at the figures' size.
  for kind, rows in (("steps", 2), ("scaling", 2)):
    path = str(tmp / "cmp" / f"compare_{kind}.png")
    with Image.open(path) as im:
      assert im.format == "PNG" and im.size[1] == 100 * 3.6 * rows


def test_compare_refuses_a_workdir_without_index(runs, tmp_path, capsys):
  empty = tmp_path / "never_evaluated"
  empty.mkdir()
  proc = _cli(f"--workdirs={runs['runs']['w32']['workdir']},{empty}", f"--out={tmp_path / 'c.md'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr
  assert f"{empty}: no eval/index.jsonl" in err and "launch.eval_feabench" in err
  assert not (tmp_path / "c.md").exists()
  with pytest.raises(ValueError, match="no run has it.*synthetic_fea/fer/accuracy"):
    compare.compare([runs["runs"]["w32"]["workdir"]], ["raf_db/fer/accuracy"],
                    str(tmp_path / "d.md"))
