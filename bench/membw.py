"""This machine's memory bandwidth, STREAM style: the roofline a memory-bound decode step meets.

  python bench/membw.py [--mib=1024 --runs=7]

STREAM's four kernels (McCalpin, https://www.cs.virginia.edu/stream/ref.html) over float32
arrays of ``--mib`` MiB each (STREAM asks for arrays >= 4x the last-level cache; this machine's
lscpu reports its L3): copy ``a = b``, scale ``a = s*b``, add ``a = b + c``, triad
``a = b + s*c``, counted as STREAM counts them (copy/scale move 2 arrays, add/triad 3). Two
engines: numpy (one thread: ``np.copyto`` and ``out=`` ufuncs, so no temporaries; triad is two
passes, so it is reported with the 4 arrays it really moves) and XLA:CPU (``jax.jit``, one
fused loop per kernel, on the threads XLA uses). Best of ``--runs`` (STREAM's rule), medians
too. Prints one JSON object; ``best_gbps`` is the bandwidth figure other benches divide by.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

MIB = 1 << 20


def _time(fn, runs: int) -> list[float]:
  fn()  # warm-up (page faults, compile)
  out = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def _row(nbytes: int, times: list[float]) -> dict:
  return dict(gbps_best=nbytes / min(times) / 1e9, gbps_median=nbytes / statistics.median(times)
              / 1e9, bytes=nbytes, seconds=times)


def numpy_kernels(n: int, runs: int) -> dict:
  a, b, c = (np.full(n, v, np.float32) for v in (1.0, 2.0, 0.5))
  s = np.float32(3.0)
  size = 4 * n

  def triad():
    np.multiply(c, s, out=a)
    np.add(a, b, out=a)
  return dict(
      copy=_row(2 * size, _time(lambda: np.copyto(a, b), runs)),
      scale=_row(2 * size, _time(lambda: np.multiply(b, s, out=a), runs)),
      add=_row(3 * size, _time(lambda: np.add(b, c, out=a), runs)),
      triad_two_pass=_row(4 * size, _time(triad, runs)))   # reads c, writes a, reads a and b, writes a


def xla_kernels(n: int, runs: int) -> dict:
  import jax
  import jax.numpy as jnp
  b = jnp.full((n,), 2.0, jnp.float32)
  c = jnp.full((n,), 0.5, jnp.float32)
  s = jnp.float32(3.0)
  size = 4 * n
  kernels = dict(copy=(jax.jit(lambda b: b + 0.0), (b,), 2),   # a fresh output: read b, write a
                 scale=(jax.jit(lambda b, s: s * b), (b, s), 2),
                 add=(jax.jit(lambda b, c: b + c), (b, c), 3),
                 triad=(jax.jit(lambda b, c, s: b + s * c), (b, c, s), 3))
  out = {}
  for name, (fn, args, arrays) in kernels.items():
    out[name] = _row(arrays * size, _time(lambda: fn(*args).block_until_ready(), runs))
  return out


def measure(mib: int = 1024, runs: int = 7, xla: bool = True) -> dict:
  """The STREAM kernels at ``mib`` MiB per array; ``best_gbps`` = the fastest kernel's best."""
  n = mib * MIB // 4
  load = [os.getloadavg()[0]]
  result = dict(array_mib=mib, runs=runs, numpy_one_thread=numpy_kernels(n, runs))
  if xla:
    import jax
    result["xla_cpu"] = xla_kernels(n, runs)
    result["xla_cpu"]["jax"] = jax.__version__
  load.append(os.getloadavg()[0])
  rows = [r for eng in ("numpy_one_thread", "xla_cpu") for k, r in result.get(eng, {}).items()
          if isinstance(r, dict)]
  result["best_gbps"] = max(r["gbps_best"] for r in rows)
  result["loadavg_1min_before_after"] = load
  result["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return result


def llm_weight_bytes(llm, bytes_per_param: int = 4) -> int:
  """Bytes of the LLM weights one decode step reads: every layer, the final norm and the LM head
  (the embedding table is only gathered, a row per sequence). ``llm``: ``config.model.llm``."""
  d, m, v = int(llm.hidden_size), int(llm.intermediate_size), int(llm.vocab_size)
  h, hkv, dh = int(llm.num_heads), int(llm.num_kv_heads), int(llm.head_dim)
  per_layer = 2 * d * h * dh + 2 * d * hkv * dh + 3 * d * m + 2 * d   # q,o; k,v; MLP; 2 norms
  return bytes_per_param * (int(llm.num_layers) * per_layer + d + d * v)


def kv_cache_bytes(llm, batch: int, slots: float, bytes_per_value: int = 4) -> float:
  """Bytes of keys and values a decode step reads when attending over ``slots`` cache slots."""
  return (bytes_per_value * 2 * int(llm.num_layers) * batch * int(llm.num_kv_heads)
          * int(llm.head_dim) * slots)


def main() -> None:
  from absl import app, flags
  flags.DEFINE_integer("mib", 1024, "MiB per array (STREAM: >= 4x the last-level cache).")
  flags.DEFINE_integer("runs", 7, "Timed repetitions per kernel (best and median reported).")
  flags.DEFINE_bool("xla", True, "Also run the kernels compiled by XLA:CPU.")

  def run(argv):
    del argv
    f = flags.FLAGS
    print(json.dumps(measure(f.mib, f.runs, f.xla), indent=1))
  app.run(run)


if __name__ == "__main__":
  main()
