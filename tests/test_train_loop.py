"""train_and_evaluate end to end: exact resume after SIGTERM, falling loss, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from feallm_jax.train import NonFiniteError, metrics_log, train_and_evaluate
from tests.cli_helpers import tiny_train_flags
from tests.test_train_step import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, data_dir, steps):
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--workdir={workdir}",
          *tiny_train_flags(data_dir),
          f"--config.train.num_steps={steps}", "--config.train.log_every=1",
          "--config.train.save_every=100", "--config.train.progress=False",
          "--config.eval.suites=()", "--config.optim.lr_base=1e-3", "--config.optim.lr_proj=1e-3"]


def _env(cache):
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=ROOT)
  return env


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_log.read(workdir)}


def _final_params(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.PyTreeCheckpointer().restore(path)
  out = {}

  def walk(prefix, x):
    if isinstance(x, dict):
      for k, v in x.items():
        walk(f"{prefix}/{k}", v)
    else:
      out[prefix] = np.asarray(x)
  walk("", tree["params"])
  return out


def test_sigterm_then_restart_resumes_exactly(tmp_path):
  steps = 6
  data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
  env = _env(cache)
  ref = str(tmp_path / "ref")
  subprocess.run(_cli(ref, data, steps), env=env, check=True, capture_output=True, timeout=600)

  work = str(tmp_path / "work")
  proc = subprocess.Popen(_cli(work, data, steps), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None and not _losses(work):
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-3000:]
  saved = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
  assert saved and 1 <= saved[-1] < steps, f"run was not interrupted mid-way: {saved}"

  # Restarting the same command resumes from the preemption checkpoint.
  out = subprocess.run(_cli(work, data, steps), env=env, capture_output=True, timeout=600)
  assert out.returncode == 0, out.stderr.decode()[-3000:]
  a, b = _losses(ref), _losses(work)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  assert [a[s] for s in a] == [b[s] for s in a]           # identical per-step losses
  pa, pb = _final_params(ref, steps), _final_params(work, steps)
  assert pa.keys() == pb.keys() and pa
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)   # bitwise


def test_tiny_synthetic_loss_falls_then_nan_stops_the_run(tmp_path, monkeypatch):
  from feallm_jax.data import pipeline
  config = small_config(str(tmp_path / "data"))
  config.model.train_llm, config.model.train_vision = "full", True   # as tiny_synthetic
  config.optim.update(lr_lora=1e-2, lr_proj=1e-2, lr_base=1e-2, warmup_frac=0.1)
  config.train.update(num_steps=40, log_every=1, save_every=5, max_bad_steps=2, progress=False)
  config.eval.suites = ()
  good_steps = 15
  real = pipeline.train_iterator

  class Poisoned:
    """The real Grain iterator; batches after ``good_steps`` get NaN images."""
    def __init__(self, it):
      self.it, self.n = it, 0
    def __iter__(self):
      return self
    def __next__(self):
      b = next(self.it)
      self.n += 1
      if self.n > good_steps:
        b = dict(b, image=np.full_like(b["image"], np.nan))
      return b
    def get_state(self):
      return self.it.get_state()
    def set_state(self, s):
      self.it.set_state(s)

  monkeypatch.setattr(pipeline, "train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
  workdir = str(tmp_path / "work")
  with pytest.raises(NonFiniteError, match="max_bad_steps=2"):
    train_and_evaluate(config, workdir)
  rows = metrics_log.read(workdir)
  losses = [r["loss"] for r in rows if r["step"] <= good_steps]
  assert len(losses) == good_steps
  first, last = losses[0], float(np.mean(losses[-3:]))
  assert last < 0.6 * first, losses                          # training loss falls
  bad = [r for r in rows if r["step"] > good_steps]
  assert bad and all(r["skipped"] >= 1 for r in bad) and bad[-1]["skipped"] >= 3
  # Every logged row (one step each) reports the step's real gradient norm: finite while the
  # batches are good, non-finite for the poisoned ones (skipped, not hidden).
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  norms = {r["step"]: r["grad_norm"] for r in logged if "grad_norm" in r}
  assert sorted(norms) == [r["step"] for r in rows]
  assert all(np.isfinite(norms[s]) and norms[s] > 0 for s in norms if s <= good_steps), norms
  assert all(not np.isfinite(norms[s]) for s in norms if s > good_steps), norms
  # The last good checkpoint survives; nothing was saved after the NaN steps began.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == good_steps
