"""Per-step host cost of the multi-host preemption check, and the stop step every process agrees on.

  python -m bench.preemption [--steps=200]      (from the repository root)

Starts two ``jax.distributed`` CPU processes on 127.0.0.1 (gloo collectives) for each way of
checking, and times the check the training loop makes before every step:

* ``allgather_every_step``: the former check, a ``process_allgather`` of the SIGTERM flag each
  step (the fallback below with an interval of 1);
* ``sync_point`` (``train/loop.py`` with JAX's preemption service, the default): a local
  ``reached_preemption_sync_point(step)``; the hosts agree on the stop step in the background;
* ``gather_every_N`` (the fallback when that service is disabled): the flag all-gathered every
  ``train.preemption_check_every`` steps.

Then process 1 sends itself SIGTERM mid-run and both report the step at which they stop: they must
be equal (every process saves the same step). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


MODES = ("allgather_every_step", "sync_point", "gather_every_n")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(process_id: int, port: int, mode: str, steps: int, check_every: int,
           step_seconds: float) -> dict:
  """One process: time ``steps`` checks, then run until the agreed preemption stop."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode != "sync_point":        # the former check = the fallback gathering every step
    jax.config.update("jax_enable_preemption_service", False)
  if mode == "allgather_every_step":
    check_every = 1
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  from jax.experimental import multihost_utils

  from feallm_jax.train.loop import _Preemption

  out = {"process": process_id, "mode": mode}
  with _Preemption(check_every) as pre:
    check = pre.should_stop
    out["check_mode"] = pre.mode
    for step in range(3):         # warm up (the first collective compiles)
      check(step)
    multihost_utils.sync_global_devices("timed")
    t0 = time.perf_counter()
    for step in range(3, 3 + steps):
      check(step)
    out["check_us_per_step"] = (time.perf_counter() - t0) / steps * 1e6
    multihost_utils.sync_global_devices("preempt")
    start = 3 + steps
    sigterm_at, stop = start + 7, None
    for step in range(start, start + 2000):
      if process_id == 1 and step == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      if check(step):
        stop = step
        break
      time.sleep(step_seconds)      # stands for the train step
    out.update(sigterm_step=sigterm_at, stop_step=stop)
  return out


def run_mode(mode: str, steps: int, check_every: int, step_seconds: float,
             timeout: float = 600) -> list[dict]:
  """Both processes of one mode; returns their JSON records (process 0 first)."""
  port = _free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  cmd = lambda i: [sys.executable, "-m", "bench.preemption", f"--process_id={i}", f"--port={port}",
                   f"--mode={mode}", f"--steps={steps}", f"--check_every={check_every}",
                   f"--step_seconds={step_seconds}"]
  procs = [subprocess.Popen(cmd(i), cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  records = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
      for q in procs:
        q.kill()
      raise RuntimeError(f"{mode}: a process failed ({p.returncode}):\n{err[-3000:]}")
    records.append(json.loads(out.strip().splitlines()[-1]))
  return records


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--check_every", type=int, default=10)
  ap.add_argument("--step_seconds", type=float, default=0.005)
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--process_id", type=int, default=None)   # internal: one worker
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--mode", default="")
  a = ap.parse_args(argv)
  if a.process_id is not None:
    rec = worker(a.process_id, a.port, a.mode, a.steps, a.check_every, a.step_seconds)
    print(json.dumps(rec), flush=True)
    return rec
  result = {"steps": a.steps, "check_every": a.check_every, "processes": 2, "modes": {}}
  for mode in a.modes.split(","):
    recs = run_mode(mode, a.steps, a.check_every, a.step_seconds)
    result["modes"][mode] = dict(
        check_mode=recs[0]["check_mode"],
        check_us_per_step=max(r["check_us_per_step"] for r in recs),
        sigterm_step=recs[1]["sigterm_step"], stop_steps=[r["stop_step"] for r in recs])
  print(json.dumps(result, indent=1), flush=True)
  return result


if __name__ == "__main__":
  main()
