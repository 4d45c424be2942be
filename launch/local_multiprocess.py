"""Run one command as an N-process ``jax.distributed`` job on this machine (CPU devices).

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      python launch/train.py --config=configs/tiny_synthetic.py --workdir=runs/mp

What a TPU pod slice or a multi-node GPU job does with one process per host, on one machine: every
process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` (read by ``feallm_jax/distributed.py``) and
``--xla_force_host_platform_device_count=<devices_per_process>``; collectives go over gloo.

* Output: every line of every process, prefixed ``[p<i>]``; the launcher's own lines ``[launch]``
  (one ``[launch] p<i> pid <pid>`` line per process, so a test can signal one of them).
* Failure: the first process that exits non-zero stops the others (SIGTERM to its process group,
  SIGKILL after ``--grace_s``) and the launcher exits with that code
  (``--nostop_all_on_failure``: the others are left to notice it themselves, as on a cluster);
  ``--timeout_s`` bounds the whole run the same way (exit 124). Each process leads its own
  process group, so Grain workers and other children go with it, and dies with the launcher
  (Linux ``PR_SET_PDEATHSIG``, even when the launcher is SIGKILLed): nothing is left running.
* SIGTERM / SIGINT to the launcher is forwarded to every process (a preempted job: each one saves
  and exits 0), then the launcher waits for them like for a normal exit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("devices_per_process", 4, "Virtual CPU devices of each process.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0 = a free one).")
flags.DEFINE_float("timeout_s", 3600.0, "Stop every process (exit 124) after this many seconds.")
flags.DEFINE_float("grace_s", 20.0, "Seconds between SIGTERM and SIGKILL when stopping them.")
flags.DEFINE_integer("heartbeat_timeout_s", 30, "How soon the others notice a dead process "
                     "($FEALLM_HEARTBEAT_TIMEOUT_S of each process; jax's default is 100).")
flags.DEFINE_bool("stop_all_on_failure", True, "Stop the others as soon as one process fails "
                  "(False: let them notice it themselves, as on a real cluster, still bounded by "
                  "--timeout_s).")
FLAGS = flags.FLAGS


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, port: int, devices: int,
                heartbeat_s: int | None = None) -> dict:
  """The environment of process ``index`` (any device-count flag in XLA_FLAGS is replaced)."""
  env = dict(base)
  xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{xla.strip()} --xla_force_host_platform_device_count={devices}".strip()
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  if heartbeat_s:
    env["FEALLM_HEARTBEAT_TIMEOUT_S"] = str(int(heartbeat_s))
  return env


def _die_with_parent() -> None:
  """In the child before exec (Linux): SIGKILL when the launcher dies, even by SIGKILL, so a
  killed launcher leaves no process behind. Elsewhere a no-op."""
  if sys.platform.startswith("linux"):
    import ctypes
    try:
      ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
      pass


def _say(msg: str) -> None:
  print(f"[launch] {msg}", flush=True)


def _pump(stream, prefix: str) -> None:
  for raw in iter(stream.readline, b""):
    sys.stdout.write(prefix + raw.decode("utf-8", "replace"))
    sys.stdout.flush()
  stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def stop_all(procs: list[subprocess.Popen], grace_s: float, sig: int = signal.SIGTERM) -> None:
  """``sig`` to every process group still running, SIGKILL to any left after ``grace_s``; then
  the groups are killed outright (children a process left behind go too)."""
  for p in procs:
    if p.poll() is None:
      _signal_group(p, sig)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for p in procs:
    _signal_group(p, signal.SIGKILL)
    p.wait()


def run(command: list[str], num_processes: int, devices_per_process: int, *, port: int = 0,
        timeout_s: float = 3600.0, grace_s: float = 20.0, heartbeat_s: int | None = 30,
        stop_all_on_failure: bool = True) -> int:
  """Starts the job, streams its output, returns the exit code (0: every process exited 0)."""
  if num_processes < 1 or devices_per_process < 1:
    raise app.UsageError("--num_processes and --devices_per_process must be >= 1")
  if not command:
    raise app.UsageError("give the command after '--', e.g. -- python launch/train.py ...")
  port = port or free_port()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  forwarded = {"sig": None}

  def forward(signum, frame):
    del frame
    forwarded["sig"] = signum
    _say(f"signal {signum}: forwarding SIGTERM to every process")
    for p in procs:
      if p.poll() is None:
        _signal_group(p, signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  code = 0
  reported: set[int] = set()
  try:
    for i in range(num_processes):
      env = process_env(os.environ, i, num_processes, port, devices_per_process, heartbeat_s)
      p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, start_new_session=True,
                           preexec_fn=_die_with_parent)
      procs.append(p)
      _say(f"p{i} pid {p.pid}")
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] "), daemon=True)
      t.start()
      pumps.append(t)
    deadline = time.monotonic() + timeout_s
    while True:
      codes = [p.poll() for p in procs]
      for i, c in enumerate(codes):
        if c not in (None, 0) and i not in reported:
          reported.add(i)
          code = code or (c if c > 0 else 128 - c)   # killed by signal n: 128 + n, like a shell
          _say(f"p{i} exited with {c}" + ("; stopping the others" if stop_all_on_failure else ""))
      if reported and stop_all_on_failure:
        break
      if all(c is not None for c in codes):
        break
      if time.monotonic() > deadline:
        _say(f"timeout after {timeout_s:g}s; stopping every process")
        code = 124
        break
      time.sleep(0.1)
  finally:
    stop_all(procs, grace_s)
    for t in pumps:
      t.join(timeout=5)
    for s, h in previous.items():
      signal.signal(s, h)
  if code == 0:
    _say(f"all {num_processes} processes exited 0")
  return code


def main(argv):
  sys.exit(run(argv[1:], FLAGS.num_processes, FLAGS.devices_per_process, port=FLAGS.port,
               timeout_s=FLAGS.timeout_s, grace_s=FLAGS.grace_s,
               heartbeat_s=FLAGS.heartbeat_timeout_s,
               stop_all_on_failure=FLAGS.stop_all_on_failure))


if __name__ == "__main__":
  app.run(main)
