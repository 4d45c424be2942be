"""What a person sees from the launch scripts, and what a rerun reuses.

One tiny run trained through ``launch/train.py`` (as a user types it) is shared by the tests:
the default output is the run's own lines and warnings (no Orbax INFO, the parameter table
once); ``--verbosity=0`` brings library INFO back; JAX's persistent compilation cache is filled
by the first run, a second run in a fresh workdir compiles nothing new, and resuming the first
run for more steps restores and runs the train step it compiled; ``predict.py
--explain`` writes its overlay under the workdir (or ``--out``), never into the current
directory, and prints the path.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from feallm_jax import compile_cache
from feallm_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORBAX_INFO = ("checkpoint_manager.py", "atomicity.py", "async_checkpointer.py")

pytestmark = pytest.mark.slow


def _env(cache_min_secs="0"):
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=cache_min_secs)


def _train(workdir, data_dir, cache, *extra):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
         "--config=" + os.path.join(ROOT, "configs", "tiny_synthetic.py"),
         f"--workdir={workdir}", f"--compile_cache={cache}",
         f"--config.data.data_dir={data_dir}", "--config.data.builder_config=small",
         "--config.data.batch_size=8", "--config.data.augment=False",
         "--config.model.base_checkpoint=", "--config.model.init_adapter=",
         "--config.model.vision.hidden_size=64", "--config.model.vision.intermediate_size=128",
         "--config.model.vision.num_layers=2", "--config.model.vision.num_heads=2",
         "--config.model.llm.hidden_size=64", "--config.model.llm.intermediate_size=128",
         "--config.model.llm.num_layers=2", "--config.model.llm.num_heads=2",
         "--config.model.llm.num_kv_heads=1", "--config.model.llm.head_dim=32",
         "--config.model.multi_layers=(1,2)", "--config.model.projector_heads=2",
         "--config.model.lca.width=16", "--config.model.lca.depth=2",
         "--config.model.lca.num_heads=2", "--config.model.lora.rank=4",
         "--config.train.num_steps=2", "--config.train.log_every=1",
         "--config.train.save_every=2", "--config.eval.suites=()", *extra]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def _entries(cache):
  return {n for n in os.listdir(cache) if n.endswith("-cache")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  base = tmp_path_factory.mktemp("cli")
  data, cache = str(base / "data"), str(base / "jax_cache")
  first = _train(str(base / "a"), data, cache)
  entries = _entries(cache)
  return dict(base=base, data=data, cache=cache, workdir=str(base / "a"), first=first,
              entries=entries)


def test_default_output_is_quiet_and_readable(run):
  err = run["first"].stderr
  assert not [m for m in ORBAX_INFO if m in err], err[-3000:]
  assert "Unable to initialize backend" not in err         # jax's INFO line
  assert err.count("FEALLM parameters") == 1                # the table, once
  assert "pre-flight passed" in err and "finished at step 2" in err
  assert "train: 100%" in err                               # the progress bar
  assert '"config"' not in err                              # the config JSON goes to TensorBoard


def test_compile_cache_filled_then_reused_by_a_rerun(run):
  assert any("train_step" in e for e in run["entries"]), sorted(run["entries"])[:20]
  entries = _entries(run["cache"])
  # A rerun of the same command in a fresh workdir, with library logs on: every program
  # comes from the cache (with min compile time 0, a compile would add an entry).
  second = _train(str(run["base"] / "b"), run["data"], run["cache"], "--verbosity=0")
  assert _entries(run["cache"]) == entries
  assert any(m in second.stderr for m in ORBAX_INFO)       # --verbosity=0: library INFO back


def test_resumed_run_reuses_the_compiled_train_step(run):
  """The first run's workdir continued from step 2 to 4 (``train.num_steps`` 2 -> 4, the
  schedules' horizon changes): it restores the checkpoint and its first step loads the train
  step the first run compiled; with min compile time 0 a compile would add an entry."""
  before = _entries(run["cache"])
  r = _train(run["workdir"], run["data"], run["cache"], "--config.train.num_steps=4")
  assert "resumed from" in r.stderr and "at step 2" in r.stderr, r.stderr[-3000:]
  assert "finished at step 4" in r.stderr
  new = _entries(run["cache"]) - before
  assert not [e for e in new if "train_step" in e], sorted(new)
  assert "Compiling module jit__train_step" not in r.stderr   # XLA's slow-compile alarm


def test_compile_cache_location_and_off_switch(tmp_path, monkeypatch):
  import jax
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable() == str(tmp_path / "xdg" / "feallm_jax" / "jax")
    assert os.path.isdir(tmp_path / "xdg" / "feallm_jax" / "jax")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.enable() == str(tmp_path / "env")
    assert compile_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() == "" and not jax.config.jax_compilation_cache_dir
    monkeypatch.delenv(compile_cache.ENV)
    import ml_collections
    cfg = ml_collections.ConfigDict({"compile_cache": str(tmp_path / "cfg")})
    assert compile_cache.enable(None, cfg) == str(tmp_path / "cfg")
    assert compile_cache.enable("off", cfg) == ""
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def _face_png(path):
  img = synthetic.generate(0, split="test")["image"]
  Image.fromarray(np.asarray(img)).save(path)
  return str(path)


def test_predict_explain_writes_under_the_workdir_and_prints_the_path(run, tmp_path):
  face = _face_png(tmp_path / "face.png")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  cmd = [sys.executable, os.path.join(ROOT, "launch", "predict.py"),
         f"--workdir={run['workdir']}", f"--image={face}", "--aligned", "--explain",
         "--max_new_tokens=2", f"--compile_cache={run['cache']}"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=_env(), cwd=cwd)
  assert r.returncode == 0, r.stderr[-4000:]
  want = os.path.join(run["workdir"], "predictions", "face_regions.png")
  assert f"overlay saved to {want}" in r.stdout and os.path.isfile(want)
  assert os.listdir(cwd) == []                             # nothing in the current directory
  assert not [m for m in ORBAX_INFO if m in r.stderr], r.stderr[-2000:]


def test_overlay_path_rules(tmp_path, monkeypatch):
  from feallm_jax.eval import explain
  monkeypatch.chdir(tmp_path)
  run_dir = tmp_path / "runs" / "x"
  assert explain.overlay_path(str(run_dir), "/photos/me.jpg") == str(
      run_dir / "predictions" / "me_regions.png")
  assert (run_dir / "predictions").is_dir()
  # --workdir given as a checkpoints/<step> dir still writes beside the run's checkpoints.
  assert explain.overlay_path(str(run_dir / "checkpoints" / "500"), "a.png") == str(
      run_dir / "predictions" / "a_regions.png")
  assert explain.overlay_path(str(run_dir), "a.png", "out/o.png") == str(tmp_path / "out" / "o.png")
  assert (tmp_path / "out").is_dir()
