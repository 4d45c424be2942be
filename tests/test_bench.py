"""The benchmarks' own arithmetic: the STREAM-style bandwidth runs and reports what it timed, and
the decode roofline's byte counts equal the parameters the model really builds."""

import os

import jax
import numpy as np
from flax import nnx

from bench import membw
from feallm_jax import config_files, sharding
from feallm_jax.models import llm as llm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_membw_reports_every_kernel_from_its_own_timings():
  r = membw.measure(mib=4, runs=2)
  for engine, kernels in (("numpy_one_thread", ("copy", "scale", "add", "triad_two_pass")),
                          ("xla_cpu", ("copy", "scale", "add", "triad"))):
    for k in kernels:
      row = r[engine][k]
      assert len(row["seconds"]) == 2 and row["bytes"] % (4 * 1024 * 1024) == 0
      assert np.isclose(row["gbps_best"], row["bytes"] / min(row["seconds"]) / 1e9)
  assert r["best_gbps"] == max(row["gbps_best"] for e in ("numpy_one_thread", "xla_cpu")
                               for row in r[e].values() if isinstance(row, dict))


def test_decode_bytes_equal_the_built_decoder():
  c = config_files.get_config(os.path.join(ROOT, "configs", "bench_small.py"))
  cfg = llm_lib.LLMConfig.from_dict(c.model.llm)
  with sharding.mesh_rules(sharding.single_device_mesh()):
    abstract = nnx.eval_shape(lambda: llm_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  sizes = {jax.tree_util.keystr(p): int(np.prod(v.shape))
           for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(abstract))}
  read = sum(n for p, n in sizes.items() if "embed_tokens" not in p)
  assert membw.llm_weight_bytes(c.model.llm) == 4 * read
  # k and v, per layer: batch x kv heads x slots x head_dim float32 values each.
  l = c.model.llm
  assert membw.kv_cache_bytes(l, 8, 244) == 2 * l.num_layers * 8 * l.num_kv_heads * 244 * l.head_dim * 4
