"""Evaluation results are permanent (issue 18): one folder per evaluation, an append-only index
that survives a write killed half-way, TensorBoard tags per mode, and a gs:// index readable."""
import glob
import json
import logging
import os
import signal
import struct
import subprocess
import sys

import pytest

from feallm_jax.eval import feabench, store
from tests.test_feabench import run  # noqa: F401  (the module-scoped tiny checkpoint, step 1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(folder):
  """{file name: bytes} of one evaluation folder."""
  out = {}
  for p in sorted(glob.glob(os.path.join(folder, "*"))):
    with open(p, "rb") as f:
      out[os.path.basename(p)] = f.read()
  return out


def _tb_tags(tb_dir):
  """Scalar tags in a TensorBoard log dir, read from the TFRecord event files directly."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      tags |= {v.tag for v in ev.summary.value}
  return tags


# --- naming ----------------------------------------------------------------------------------

def test_settings_key_changes_with_every_setting_that_changes_the_numbers(tmp_path):
  from tests.test_train_step import small_config
  config = small_config(str(tmp_path))
  config.eval.num_samples = 3
  mode, suites = feabench.plan(config, "synthetic_fea", "generate")
  base = feabench.eval_settings(config, suites, mode)
  key = store.settings_key(base)
  assert key == store.settings_key(json.loads(json.dumps(base)))   # stable through JSON
  assert store.folder_name(7, mode, base) == f"step_7_generate_synthetic_fea_n3_{key}"
  keys = {key}
  for path, value in [("eval.num_samples", 5), ("eval.max_new_tokens", 9),
                      ("eval.temperature", 0.7), ("eval.top_p", 0.9), ("seed", 1),
                      ("data.max_len", 40), ("data.builder_config", "default"),
                      ("eval.matmul_dtype", "bfloat16")]:
    c = config.copy_and_resolve_references()
    section, _, name = path.rpartition(".")
    (c[section] if section else c)[name] = value
    keys.add(store.settings_key(feabench.eval_settings(c, suites, mode)))
  assert len(keys) == 9                                               # each one moved the key
  # float32 matmuls (the default) are not written: evaluations keep the keys they had before.
  assert "matmul_dtype" not in base
  # Batch size changes no number; in score mode on FER alone nothing is generated, so the
  # generation settings are not part of that evaluation's key.
  c = config.copy_and_resolve_references()
  c.eval.batch_size = 3
  assert store.settings_key(feabench.eval_settings(c, suites, mode)) == key
  smode, fer = feabench.plan(config, "synthetic_fea", "score", tasks=("fer",))
  s1 = feabench.eval_settings(config, fer, smode, ("fer",))
  c.eval.max_new_tokens = 99
  assert store.settings_key(feabench.eval_settings(c, fer, smode, ("fer",))) == \
      store.settings_key(s1)
  assert store.folder_name(7, smode, s1).startswith("step_7_score_synthetic_fea-fer_n3_")
  assert s1["score_reduction"] == "sum" and "generation" not in s1


# --- the index -------------------------------------------------------------------------------

def _entry(i, pad=0):
  return dict(step=i, mode="generate", key=f"k{i}", path=f"step_{i}", metrics={"s/fer/accuracy":
              i / 10}, settings={"pad": "x" * pad})


def test_index_appends_and_reads_back(tmp_path):
  with pytest.raises(store.NoIndexError, match="launch.eval_feabench"):
    store.read_index(str(tmp_path))
  for i in range(3):
    store.append_index(str(tmp_path), _entry(i))
  rows = store.read_index(str(tmp_path))
  assert [r["step"] for r in rows] == [0, 1, 2]
  store.append_index(str(tmp_path), dict(_entry(1), step=11))       # a re-run of folder step_1
  latest = store.latest_per_folder(store.read_index(str(tmp_path)))
  assert [(r["path"], r["step"]) for r in latest] == [("step_0", 0), ("step_2", 2),
                                                       ("step_1", 11)]


_KILLED_WRITER = r'''
import json, resource, signal, sys
sys.path.insert(0, {root!r})
from feallm_jax.eval import store
workdir, limit = sys.argv[1], int(sys.argv[2])
entry = json.loads(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # python ignores it; the kernel kills us instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
store.append_index(workdir, entry)
print("finished")
'''


def test_killed_index_write_leaves_the_previous_index_valid(tmp_path):
  """The writer is killed by the kernel half-way through writing the new line (a file-size limit
  one half-line past the old index); the index must still be the old one, byte for byte."""
  workdir = str(tmp_path / "run")
  for i in range(2):
    store.append_index(workdir, _entry(i, pad=300))
  index = store.index_path(workdir)
  with open(index, "rb") as f:
    before = f.read()
  new = _entry(2, pad=4000)
  line = json.dumps(new) + "\n"
  limit = len(before) + len(line) // 2
  script = tmp_path / "writer.py"
  script.write_text(_KILLED_WRITER.format(root=ROOT))
  proc = subprocess.run([sys.executable, str(script), workdir, str(limit), json.dumps(new)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGXFSZ, (proc.returncode, proc.stdout, proc.stderr)
  with open(index, "rb") as f:
    after = f.read()
  assert after == before                                            # untouched by the dead write
  assert [r["step"] for r in store.read_index(workdir)] == [0, 1]  # and every line parses
  # The next evaluation appends normally and the dead writer's temporary file is gone.
  store.append_index(workdir, _entry(2))
  assert [r["step"] for r in store.read_index(workdir)] == [0, 1, 2]
  assert not glob.glob(os.path.join(os.path.dirname(index), ".index.jsonl.tmp-*"))


def test_index_on_gs_is_read_and_appended(tmp_path, monkeypatch):
  """gs:// goes through etils.epath -> fsspec; an in-memory filesystem stands in for GCS."""
  import fsspec
  from fsspec.implementations.memory import MemoryFileSystem
  from etils.epath import backend

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__(*args, **kwargs)

  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  monkeypatch.setattr("etils.epath.gpath._is_tf_installed", lambda: False)
  backend.fsspec_backend._get_filesystem.cache_clear()
  try:
    workdir = "gs://bucket/runs/a"
    with pytest.raises(store.NoIndexError):
      store.read_index(workdir)
    store.append_index(workdir, _entry(0))
    store.append_index(workdir, _entry(1))
    assert [r["step"] for r in store.read_index(workdir)] == [0, 1]
  finally:
    backend.fsspec_backend._get_filesystem.cache_clear()


# --- evaluations of one step -----------------------------------------------------------------

def test_two_modes_of_one_step_both_kept_and_indexed(run, caplog):  # noqa: F811
  config, workdir = run["config"], run["workdir"]
  gen = feabench.evaluate(config, workdir, suites="synthetic_fea", mode="generate",
                          progress=False)
  gen_dir = os.path.dirname(gen["files"]["results_json"])
  before = _snapshot(gen_dir)
  score = feabench.evaluate(config, workdir, suites="synthetic_fea", mode="score",
                            progress=False)
  score_dir = os.path.dirname(score["files"]["results_json"])
  assert gen_dir != score_dir
  assert os.path.basename(gen_dir).startswith("step_1_generate_synthetic_fea_n3_")
  assert os.path.basename(score_dir).startswith("step_1_score_synthetic_fea_n3_")
  assert _snapshot(gen_dir) == before                               # generate results intact
  for d, res, mode in ((gen_dir, gen, "generate"), (score_dir, score, "score")):
    with open(os.path.join(d, "results.json")) as f:
      saved = json.load(f)
    assert saved["meta"]["mode"] == mode and saved["meta"]["step"] == 1
    assert saved["settings"] == json.loads(json.dumps(res["settings"]))
    assert saved["meta"]["key"] == store.settings_key(saved["settings"])
    assert os.path.basename(d).endswith(saved["meta"]["key"])
    assert saved["suites"]["synthetic_fea"]["summary"] == json.loads(json.dumps(
        res["suites"]["synthetic_fea"]["summary"]))
    assert saved["meta"]["trainable_params"] > 0 and saved["meta"]["train_flops"] > 0
  rows = store.read_index(workdir)
  assert [(r["mode"], r["path"]) for r in rows[-2:]] == [
      ("generate", os.path.basename(gen_dir)), ("score", os.path.basename(score_dir))]
  assert rows[-1]["metrics"]["synthetic_fea/fer/accuracy"] == \
      score["suites"]["synthetic_fea"]["summary"]["fer"]["accuracy"]
  assert rows[-1]["settings"]["score_reduction"] == "sum"

  # Exactly the same evaluation again: replaces its own folder, says so, is indexed again.
  caplog.set_level(logging.WARNING, logger="feallm_jax.eval.store")
  again = feabench.evaluate(config, workdir, suites="synthetic_fea", mode="generate",
                            progress=False)
  assert os.path.dirname(again["files"]["results_json"]) == gen_dir and again["replaced"]
  assert any("same evaluation" in r.getMessage() and gen_dir in r.getMessage()
             for r in caplog.records)
  assert len(store.read_index(workdir)) == len(rows) + 1
  assert not glob.glob(os.path.join(workdir, "eval", ".step_*"))   # no temporary folders left

  # Another sample count is another evaluation: a new folder, the others untouched.
  c = config.copy_and_resolve_references()
  c.eval.num_samples = 2
  two = feabench.evaluate(c, workdir, suites="synthetic_fea", mode="generate", progress=False)
  assert os.path.basename(os.path.dirname(two["files"]["results_json"])).startswith(
      "step_1_generate_synthetic_fea_n2_")
  score_before = _snapshot(score_dir)
  # An explicit --out_dir that holds another evaluation is refused before anything runs.
  with pytest.raises(store.EvalConflictError, match="holds another evaluation"):
    feabench.evaluate(config, workdir, suites="synthetic_fea", mode="generate",
                      out_dir=score_dir, progress=False)
  assert _snapshot(score_dir) == score_before

  # TensorBoard and metrics.jsonl: one tag family per mode, so the curves never overwrite.
  tags = _tb_tags(os.path.join(workdir, "tb"))
  assert {"eval/generate/synthetic_fea/fer/accuracy",
          "eval/score/synthetic_fea/fer/accuracy"} <= tags
  from feallm_jax.train import metrics_log
  kinds = {r["kind"] for r in metrics_log.read(workdir, kind=None)}
  assert {"eval/generate", "eval/score"} <= kinds


def test_cli_conflicting_out_dir_exits_with_the_reason(run, tmp_path, capsys):  # noqa: F811
  from tests.cli_helpers import load_cli
  cli = load_cli("eval_feabench")
  out = tmp_path / "not_an_eval"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  cli.FLAGS(["eval_feabench", f"--config={run['cfg_path']}", f"--workdir={run['workdir']}",
             "--suites=synthetic_fea", f"--out_dir={out}", "--noprogress"])
  with pytest.raises(SystemExit) as e:
    cli.main(["eval_feabench"])
  assert e.value.code == 2
  assert "not an evaluation folder" in capsys.readouterr().err
  assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
