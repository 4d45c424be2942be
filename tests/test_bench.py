"""The benchmarks' own arithmetic: the STREAM-style bandwidth runs and reports what it timed, and
the decode roofline's byte counts equal the parameters the model really builds."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from bench import cpu_split, interleaved, membw
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


def test_generate_bench_pairs_each_round_and_rotates_the_sides():
  """A decode step is the median of each round's own t_new - t_1 (hand-computed here), not
  median(t_new) - median(t_1); the sides' order rotates round by round, each side's two calls
  back to back."""
  calls = []
  runners = {name: (lambda k, name=name: calls.append((name, k))) for name in ("a", "b", "c")}
  interleaved.timed(runners, 5, runs=3)
  timed_calls = calls[6:]                       # after one warm-up of each call
  assert timed_calls == [("a", 5), ("a", 1), ("b", 5), ("b", 1), ("c", 5), ("c", 1),
                         ("b", 5), ("b", 1), ("c", 5), ("c", 1), ("a", 5), ("a", 1),
                         ("c", 5), ("c", 1), ("a", 5), ("a", 1), ("b", 5), ("b", 1)]

  # new = 3 tokens -> 2 decode steps per call; batch 8.
  ours = interleaved.result("ours", 8, 3, [1.5, 2.0, 1.4], [1.0, 1.3, 1.1], [0.1, 0.2])
  assert ours["ms_per_decode_step_per_round"] == pytest.approx([250.0, 350.0, 150.0])
  assert ours["ms_per_decode_step"] == pytest.approx(250.0)          # median of the pairs
  assert ours["ms_per_decode_step_unpaired"] == pytest.approx(200.0)  # (1.5 - 1.1) / 2
  assert ours["decode_tokens_per_s"] == pytest.approx(8 / 0.25)
  assert ours["end_to_end_tokens_per_s"] == pytest.approx(8 * 3 / 1.5)
  hf = interleaved.result("hf", 8, 3, [2.0, 2.5, 2.1], [1.0, 1.5, 1.3], [0.1, 0.2])
  # HF per round: 500, 500, 400 ms -> ratios 2.0, 1.43, 2.67; median of the pairs 500 ms.
  out = interleaved.speedups({"ours": ours, "hf_torch": hf})
  assert out["decode_speedup"] == pytest.approx(500 / 250)
  assert out["decode_speedup_unpaired"] == pytest.approx(((2.1 - 1.3) / 2) / 0.2)
  assert out["decode_speedup_per_round"]["median"] == pytest.approx(2.0)
  assert out["decode_speedup_per_round"]["min"] == pytest.approx(500 / 350)
  assert out["decode_speedup_per_round"]["max"] == pytest.approx(400 / 150)
  assert out["decode_speedup_vs_best_torch"] == pytest.approx(2.0)


def test_generate_bench_tensor_split_follows_the_cores_and_the_model_dims():
  """``--tensor=0`` takes the most devices, up to the cores, that every split dim (heads, kv
  heads, MLP widths, vocab, vision heads) divides by; an explicit split that does not divide
  them is refused naming the flag."""
  c = config_files.get_config(os.path.join(ROOT, "configs", "bench_small.py"))
  # bench_small: 8 heads, 8 kv heads, MLP 1376, vocab 8000, vision 6 heads, MLP 1536.
  assert cpu_split.tensor_size(c, 0, 1) == 1
  assert cpu_split.tensor_size(c, 0, 2) == 2
  assert cpu_split.tensor_size(c, 0, 4) == 2      # 6 vision heads do not split 4 ways
  assert cpu_split.tensor_size(c, 0, 3) == 2
  assert cpu_split.tensor_size(c, 1, 2) == 1
  with pytest.raises(ValueError, match=r"--tensor=4 .*not: \[6\]"):
    cpu_split.tensor_size(c, 4, 8)
  with pytest.raises(ValueError, match="--tensor=-1"):
    cpu_split.tensor_size(c, -1, 2)
