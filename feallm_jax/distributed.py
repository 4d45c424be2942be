"""Joining a multi-process JAX job (TPU pod slice, multi-node GPU, or N processes on one CPU host).

Every launch script calls :func:`initialize` before any other jax call. Where the process's place
in the job comes from, first match wins:

1. the flags ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``;
2. the environment: ``JAX_COORDINATOR_ADDRESS`` (read by jax itself), ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID`` (what ``launch/local_multiprocess.py`` sets);
3. ``--config.distributed=True`` with neither: ``jax.distributed.initialize()`` detects the
   cluster itself (Cloud TPU pod metadata, SLURM ``srun``, Open MPI ``mpirun``).

Nothing set (and ``num_processes`` 1 or unset): a plain single process, no coordinator.

On CPU the cross-process collectives are gloo (``jax_cpu_collectives_implementation``); a process
that dies makes the others fail once ``--heartbeat_timeout_s`` passes without its heartbeat,
instead of waiting in a collective forever.
"""

from __future__ import annotations

import inspect
import logging
import os

log = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_HEARTBEAT = "FEALLM_HEARTBEAT_TIMEOUT_S"


def define_flags() -> None:
  """The distributed flags of a launch script (absl), shared by train and eval_feabench."""
  from absl import flags
  if "coordinator_address" in flags.FLAGS:     # a second launch script in the same process
    return
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator for a "
                      f"multi-process run (default ${ENV_ADDRESS}; unset with "
                      "--config.distributed=True: detected on TPU pods / SLURM / Open MPI).")
  flags.DEFINE_integer("num_processes", None, f"Processes in the job (default ${ENV_COUNT}).")
  flags.DEFINE_integer("process_id", None, f"This process's index, 0..num_processes-1 (default "
                       f"${ENV_ID}).")
  flags.DEFINE_integer("heartbeat_timeout_s", None, "Seconds without a heartbeat after which the "
                       f"other processes give up on a dead one (default ${ENV_HEARTBEAT}, else "
                       "jax's 100).")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer") from None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, heartbeat_timeout_s: int | None = None,
             *, auto: bool = False) -> dict | None:
  """The ``jax.distributed.initialize`` keyword arguments for this process, or None when it
  runs alone. Explicit values win over the environment; ``auto`` (``config.distributed``) with
  nothing given leaves every value to jax's cluster detection."""
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  count = num_processes if num_processes is not None else _env_int(ENV_COUNT)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  heartbeat = heartbeat_timeout_s if heartbeat_timeout_s is not None else _env_int(ENV_HEARTBEAT)
  if address is None and count is None and pid is None:
    return {} if auto else None
  if count is not None and count < 1:
    raise ValueError(f"--num_processes={count} must be >= 1")
  if count == 1 and not auto:
    return None
  if count is not None and pid is not None and not 0 <= pid < count:
    raise ValueError(f"--process_id={pid} must be in [0, {count}) for --num_processes={count}")
  if not auto and None in (address, count, pid):
    missing = [f"--{n} (or ${e})" for n, e, v in (("coordinator_address", ENV_ADDRESS, address),
                                                  ("num_processes", ENV_COUNT, count),
                                                  ("process_id", ENV_ID, pid)) if v is None]
    raise ValueError("a multi-process run needs all of --coordinator_address, --num_processes "
                     f"and --process_id; missing {', '.join(missing)} (or set "
                     "--config.distributed=True to detect them on a TPU pod / SLURM / MPI)")
  if address is not None and ":" not in address:
    raise ValueError(f"--coordinator_address={address!r} must be HOST:PORT")
  kw: dict = {}
  if address is not None:
    kw["coordinator_address"] = address
  if count is not None:
    kw["num_processes"] = count
  if pid is not None:
    kw["process_id"] = pid
  if heartbeat is not None:
    kw["heartbeat_timeout_seconds"] = int(heartbeat)
  return kw


def initialize(config=None, flags_values=None) -> bool:
  """Joins the job described by the flags / environment / ``config.distributed`` (see the module
  docstring); returns whether this process is part of a multi-process job. Call it before any
  other jax call touches the backends."""
  import jax
  get = (lambda name: getattr(flags_values, name, None)) if flags_values is not None else (
      lambda name: None)
  auto = bool(config.get("distributed", False)) if config is not None else False
  kw = settings(get("coordinator_address"), get("num_processes"), get("process_id"),
                get("heartbeat_timeout_s"), auto=auto)
  if kw is None:
    return False
  accepted = inspect.signature(jax.distributed.initialize).parameters
  dropped = [k for k in kw if k not in accepted]
  if dropped:                      # e.g. a heartbeat argument renamed in a newer jax
    log.warning("jax %s: jax.distributed.initialize takes no %s; ignored", jax.__version__,
                dropped)
  kw = {k: v for k, v in kw.items() if k in accepted}
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU processes talk over gloo (jax 0.10 defaults to it; older versions to none).
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  log.info("joined a %d-process job as process %d (%d local / %d global devices)",
           jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count())
  return True


def allgather_objects(obj) -> list:
  """``obj`` of every process, in process order (pickled, gathered as bytes over the devices);
  ``[obj]`` in a single process. Every process must call it at the same point."""
  import jax
  if jax.process_count() == 1:
    return [obj]
  import pickle

  import numpy as np
  from jax.experimental import multihost_utils
  data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64)))
  sizes = sizes.reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [pickle.loads(rows[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any (the same decision everywhere, e.g.
  whether a batch needs a collective computation at all)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


_barriers = {"count": 0}


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process reaches this point, through the coordination service (no device
  collective). On CPU, gloo gives a process 30 s to join a collective the others already
  entered, so processes that drift apart (one compiles while the other hit the cache, a loaded
  machine) meet here first, before the first collective of each phase. No-op in one process."""
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  _barriers["count"] += 1
  key = f"feallm_jax/{name}/{_barriers['count']}"
  if client is None:           # not started by jax.distributed (cannot happen with >1 process)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(key)
    return
  client.wait_at_barrier(key, int(timeout_s * 1000))
