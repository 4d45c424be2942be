"""Multi-host, proven on one machine: 2 ``jax.distributed`` processes x 4 CPU devices (gloo on
127.0.0.1, started by ``launch/local_multiprocess.py``) train, stop on SIGTERM, resume, change
the process count and evaluate exactly like one process with 8 devices on the same mesh.

Every process a test starts is stopped in a ``finally`` (the launcher's SIGTERM, then SIGKILL of
each process group it reported); each run is bounded by the launcher's ``--timeout_s``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from feallm_jax import distributed
from feallm_jax.train import metrics_log
from tests.cli_helpers import tiny_train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
STEPS = 4
RUN_TIMEOUT = 1200         # seconds a launched job may take (the launcher enforces it; a loaded
                           # 2-core machine has needed 9 min for one run)


# -- helpers ------------------------------------------------------------------------------------

def _env(cache: str, devices: int | None = None) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, PYTHONPATH=ROOT,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for k in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID):
    env.pop(k, None)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _train_cmd(workdir: str, data: str, *extra: str) -> list[str]:
  return [PY, os.path.join(ROOT, "launch", "train.py"), f"--workdir={workdir}",
          *tiny_train_flags(data), f"--config.train.num_steps={STEPS}",
          "--config.train.log_every=1", "--config.train.save_every=2",
          "--config.train.progress=False", "--config.eval.suites=()",
          "--config.optim.lr_base=1e-3", "--config.optim.lr_proj=1e-3", *extra]


class Job:
  """``launch/local_multiprocess.py`` running ``command`` (output in a file, read as it grows)."""

  def __init__(self, command: list[str], env: dict, log_path: str, *, processes: int = 2,
               devices: int = 4, extra: tuple = ()):
    self.log_path = log_path
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(
        [PY, os.path.join(ROOT, "launch", "local_multiprocess.py"),
         f"--num_processes={processes}", f"--devices_per_process={devices}",
         f"--timeout_s={RUN_TIMEOUT}", "--grace_s=10", *extra, "--", *command],
        env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

  def output(self) -> str:
    with open(self.log_path, "rb") as f:
      return f.read().decode("utf-8", "replace")

  def pids(self) -> dict[int, int]:
    return {int(i): int(p) for i, p in re.findall(r"\[launch\] p(\d+) pid (\d+)", self.output())}

  def wait(self, timeout: float = RUN_TIMEOUT + 60) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      self.stop()

  def stop(self) -> None:
    """The launcher stops its processes on SIGTERM; whatever is left is killed by group."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
    for pid in self.pids().values():
      try:
        os.killpg(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()
    self._log.close()


def _run_job(command, env, log_path, **kw) -> str:
  job = Job(command, env, log_path, **kw)
  code = job.wait()
  out = job.output()
  assert code == 0, out[-4000:]
  return out


def _run_single(command, env) -> str:
  out = subprocess.run(command, env=env, capture_output=True, timeout=RUN_TIMEOUT)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  return out.stderr.decode()


def _losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics_log.read(workdir)}


def _params(workdir: str, step: int) -> dict[str, np.ndarray]:
  """The trainable weights of a checkpoint, on one device of this process (whatever mesh and
  process count wrote them)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ck.restore(path, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=dev),
                                                    meta))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def _assert_same_losses(ref: dict, got: dict, steps) -> None:
  for s in steps:
    assert abs(ref[s] - got[s]) <= 1e-5, (s, ref[s], got[s])


def _assert_same_params(a: dict, b: dict) -> None:
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


def _resume_from(src: str, dst: str, step: int) -> None:
  """A copy of run ``src`` that holds only its checkpoints up to ``step``."""
  shutil.copytree(src, dst)
  for s in os.listdir(os.path.join(dst, "checkpoints")):
    if s.isdigit() and int(s) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", s))


# -- no jax: the settings and the launcher ----------------------------------------------------

def test_settings_flags_env_and_errors(monkeypatch):
  for k in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID,
            distributed.ENV_HEARTBEAT):
    monkeypatch.delenv(k, raising=False)
  assert distributed.settings() is None                      # a plain single process
  assert distributed.settings(auto=True) == {}               # jax detects the cluster
  assert distributed.settings(num_processes=1) is None
  assert distributed.settings("10.0.0.1:1234", 4, 3) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  monkeypatch.setenv(distributed.ENV_ADDRESS, "127.0.0.1:99")
  monkeypatch.setenv(distributed.ENV_COUNT, "2")
  monkeypatch.setenv(distributed.ENV_ID, "1")
  monkeypatch.setenv(distributed.ENV_HEARTBEAT, "7")
  assert distributed.settings() == dict(coordinator_address="127.0.0.1:99", num_processes=2,
                                        process_id=1, heartbeat_timeout_seconds=7)
  assert distributed.settings(process_id=0)["process_id"] == 0   # a flag wins over the env
  with pytest.raises(ValueError, match="--process_id=2 must be in"):
    distributed.settings(process_id=2)
  monkeypatch.delenv(distributed.ENV_ID)
  with pytest.raises(ValueError, match="missing --process_id"):
    distributed.settings()
  with pytest.raises(ValueError, match="HOST:PORT"):
    distributed.settings("nohost", 2, 0)
  monkeypatch.setenv(distributed.ENV_COUNT, "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.settings()


def test_launcher_prefixes_output_and_stops_everyone_on_the_first_failure(tmp_path):
  # p1 fails after printing its environment; p0 would sleep for a minute (and so would the
  # child it started): both are gone when the launcher returns p1's exit code.
  script = ("import os, subprocess, sys, time\n"
            "i = int(os.environ['JAX_PROCESS_ID'])\n"
            "print('hello', i, os.environ['JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS'],"
            " os.environ['JAX_COORDINATOR_ADDRESS'], flush=True)\n"
            "if i == 1:\n  time.sleep(1); sys.exit(3)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child', child.pid, flush=True)\n"
            "time.sleep(60)\n")
  env = _env(str(tmp_path / "cache"))
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_dump_to=/nowhere"
  t0 = time.monotonic()
  job = Job([PY, "-c", script], env, str(tmp_path / "log"), processes=2, devices=3)
  code = job.wait(timeout=60)
  out = job.output()
  assert code == 3, out
  assert time.monotonic() - t0 < 40, out
  port = re.search(r"\[p0\] hello 0 2 --xla_dump_to=/nowhere "
                   r"--xla_force_host_platform_device_count=3 127\.0\.0\.1:(\d+)", out)
  assert port and re.search(rf"\[p1\] hello 1 2 .*count=3 127\.0\.0\.1:{port.group(1)}", out), out
  assert "[launch] p1 exited with 3; stopping the others" in out
  child = int(re.search(r"\[p0\] child (\d+)", out).group(1))
  for pid in [*job.pids().values(), child]:
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_launcher_timeout_and_usage(tmp_path):
  env = _env(str(tmp_path / "cache"))
  job = Job([PY, "-c", "import time; time.sleep(60)"], env, str(tmp_path / "log"),
            extra=("--timeout_s=2",))
  assert job.wait(timeout=60) == 124
  assert "timeout after 2s" in job.output()
  out = subprocess.run([PY, os.path.join(ROOT, "launch", "local_multiprocess.py")], env=env,
                       capture_output=True, timeout=60)
  assert out.returncode != 0 and b"give the command after '--'" in out.stderr


# -- training -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 1 x 8 reference run (4 steps, checkpoints at 2 and 4) and the same run as 2 x 4."""
  root = tmp_path_factory.mktemp("mp")
  data, cache = str(root / "data"), str(root / "cache")
  ref, multi = str(root / "ref"), str(root / "multi")
  _run_single(_train_cmd(ref, data), _env(cache, devices=8))
  _run_job(_train_cmd(multi, data), _env(cache), str(root / "multi.log"))
  return dict(root=root, data=data, cache=cache, ref=ref, multi=multi)


def test_two_processes_train_like_one(runs):
  ref, multi = runs["ref"], runs["multi"]
  a, b = _losses(ref), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  _assert_same_losses(a, b, range(1, STEPS + 1))
  _assert_same_params(_params(ref, STEPS), _params(multi, STEPS))
  # Every process saved its own iterator state; only process 0 wrote the logs.
  assert sorted(os.listdir(os.path.join(multi, "checkpoints", str(STEPS), "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  states = [json.load(open(os.path.join(multi, "checkpoints", str(STEPS), "data",
                                        f"process_{i}-of-2.json"))) for i in range(2)]
  assert [s["next_index"] for s in states] == [STEPS, STEPS]
  assert [s["feallm_drops"]["examples"] for s in states] == [16, 16]    # 4 rows x 4 steps each
  assert len(metrics_log.read(multi)) == STEPS                          # one writer, not two
  assert len(os.listdir(os.path.join(multi, "tb"))) == 1


def test_checkpoint_of_two_processes_continues_in_one_and_back(runs):
  root, ref, data, cache = runs["root"], runs["ref"], runs["data"], runs["cache"]
  want = _losses(ref)
  # 2 -> 1: the 2-process run's step-2 checkpoint, continued by one process with 8 devices.
  two_one = str(root / "two_one")
  _resume_from(runs["multi"], two_one, 2)
  err = _run_single(_train_cmd(two_one, data), _env(cache, devices=8))
  assert "written by 2 process(es), restored into 1" in err, err[-3000:]
  assert "resumed from" in err and "at step 2" in err
  _assert_same_losses(want, _losses(two_one), (3, 4))
  _assert_same_params(_params(ref, STEPS), _params(two_one, STEPS))
  drops = json.load(open(os.path.join(two_one, "checkpoints", "4", "data", "process_0-of-1.json")))
  assert drops["feallm_drops"]["examples"] == 32          # 2 x 8 before, 2 x 8 after
  # 1 -> 2: the reference's step-2 checkpoint, continued by two processes.
  one_two = str(root / "one_two")
  _resume_from(ref, one_two, 2)
  out = _run_job(_train_cmd(one_two, data), _env(cache), str(root / "one_two.log"))
  assert "written by 1 process(es), restored into 2" in out, out[-3000:]
  _assert_same_losses(want, _losses(one_two), (3, 4))
  _assert_same_params(_params(ref, STEPS), _params(one_two, STEPS))


def test_sigterm_to_one_process_saves_everywhere_and_resumes(runs):
  root, data, cache = runs["root"], runs["data"], runs["cache"]
  work = str(root / "sigterm")
  job = Job(_train_cmd(work, data), _env(cache), str(root / "sigterm.log"))
  try:
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and job.proc.poll() is None and not _losses(work):
      time.sleep(0.05)
    assert job.proc.poll() is None, job.output()[-4000:]
    os.kill(job.pids()[1], signal.SIGTERM)               # one host of the job is preempted
    code = job.wait()
  finally:
    job.stop()
  out = job.output()
  assert code == 0, out[-4000:]
  stopped = [int(s) for s in re.findall(r"\[p\d\] .*stopped by SIGTERM at step (\d+)", out)]
  assert len(stopped) == 2 and stopped[0] == stopped[1] < STEPS, out[-4000:]
  step = stopped[0]
  data_dir = os.path.join(work, "checkpoints", str(step), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  # Relaunching the same job resumes exactly: the losses of the uninterrupted run.
  out = _run_job(_train_cmd(work, data), _env(cache), str(root / "sigterm2.log"))
  assert f"at step {step}" in out
  want, got = _losses(runs["ref"]), _losses(work)
  assert sorted(got) == list(range(1, STEPS + 1))
  _assert_same_losses(want, got, range(1, STEPS + 1))
  _assert_same_params(_params(runs["ref"], STEPS), _params(work, STEPS))


# -- evaluation -----------------------------------------------------------------------------------

def _eval_cmd(workdir: str, data: str, mode: str, out_dir: str) -> list[str]:
  # 5 records x 4 tasks = 20 rows: two global batches of 16, the second one padded.
  return [PY, os.path.join(ROOT, "launch", "eval_feabench.py"), f"--workdir={workdir}",
          *tiny_train_flags(data), "--suites=synthetic_fea", f"--mode={mode}", "--num_samples=5",
          "--config.eval.max_new_tokens=4", "--config.eval.batch_size=16", "--progress=False",
          f"--out_dir={out_dir}"]


def _suite_numbers(out_dir: str) -> str:
  results = json.load(open(os.path.join(out_dir, "results.json")))
  return json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
                     for k, v in results["suites"].items()}, sort_keys=True)


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_two_process_evaluation_equals_one(runs, mode):
  root, ref, data, cache = runs["root"], runs["ref"], runs["data"], runs["cache"]
  one, two = str(root / f"eval1_{mode}"), str(root / f"eval2_{mode}")
  _run_single(_eval_cmd(ref, data, mode, one), _env(cache, devices=8))
  out = _run_job(_eval_cmd(ref, data, mode, two), _env(cache), str(root / f"eval_{mode}.log"))
  assert "[p1] process 1: evaluated its share" in out, out[-3000:]
  preds = "predictions_synthetic_fea.jsonl"
  a = open(os.path.join(one, preds)).read()
  b = open(os.path.join(two, preds)).read()
  assert len(a.splitlines()) == 20 and a == b           # same rows, order, texts and probabilities
  if mode == "score":
    assert "emotion_probs" in a
  assert _suite_numbers(one) == _suite_numbers(two)     # every metric, bit for bit
  meta = json.load(open(os.path.join(two, "results.json")))["meta"]
  assert meta["mode"] == mode and meta["step"] == STEPS


def test_sigkill_of_one_process_fails_the_other_and_the_relaunch_resumes(runs):
  # No launcher help here (--nostop_all_on_failure): process 0 must notice by itself that
  # process 1 is gone (a failed collective or the missing heartbeat) and exit non-zero.
  root, data, cache = runs["root"], runs["data"], runs["cache"]
  work, steps = str(root / "sigkill"), 12
  cmd = _train_cmd(work, data, f"--config.train.num_steps={steps}")
  job = Job(cmd, _env(cache), str(root / "sigkill.log"),
            extra=("--nostop_all_on_failure", "--heartbeat_timeout_s=10"))
  try:
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and job.proc.poll() is None and max(_losses(work), default=0) < 3:
      time.sleep(0.05)
    assert job.proc.poll() is None, job.output()[-4000:]
    os.kill(job.pids()[1], signal.SIGKILL)
    killed = time.monotonic()
    code = job.wait(timeout=300)
    waited = time.monotonic() - killed
  finally:
    job.stop()
  out = job.output()
  assert code == 128 + signal.SIGKILL, out[-4000:]
  p0 = re.search(r"\[launch\] p0 exited with (-?\d+)", out)
  assert p0 and int(p0.group(1)) != 0, out[-4000:]      # failed by itself, never hung
  assert waited < 200, waited
  assert "timeout after" not in out
  saved = sorted(int(s) for s in os.listdir(os.path.join(work, "checkpoints")) if s.isdigit())
  assert saved and saved[-1] >= 2, saved
  out = _run_job(cmd, _env(cache), str(root / "sigkill2.log"))
  resumed = re.search(r"resumed from \S+ at step (\d+)", out)
  assert resumed and int(resumed.group(1)) >= 2, out[-3000:]
  assert sorted(_losses(work)) == list(range(1, steps + 1))
