"""Ahead-of-time TPU compilation (launch/aot_compile.py) of a small FEALLM for v5e:2x4.

Needs libtpu, which the test install leaves out (it is ~700 MB): ``make test`` skips this file,
and CI runs it in its own venv (.ci/run). The per-device memory XLA reports for the compiled
train step is checked against a count made here from the parameter shapes, the declared
logical axes and the mesh: parameter bytes / shards, Adam's two moments / fsdp (ZeRO-1), the
batch / batch shards. The frozen parameter count is checked against the CLIP + LLaMA formulas
(HF's architecture) for the configured dims. The config is the shipped 7B one shrunk in size
only, and the compiled programs are read for what it ships: LoRA dropout masks and remat in the
train step, neither in generation.
"""

import dataclasses
import math

import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs pip install '.[tpu]'")

from feallm_jax import aot  # noqa: E402

aot.init_libtpu()   # before anything initializes libtpu in this process

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import configs.llava7b_lora as paper  # noqa: E402
from feallm_jax import chips, sharding  # noqa: E402
from feallm_jax.data import pipeline  # noqa: E402
from feallm_jax.models import feallm  # noqa: E402

D, M, V, LAYERS, HEADS, HEAD_DIM, RANK = 1024, 1024, 1024, 2, 8, 128, 128
VIS_D, VIS_M, IMG, PATCH = 1024, 1024, 64, 16


def small_config():
  """``configs/llava7b_lora.py`` as it ships (LoRA r=128 with dropout 0.05, remat, bf16 frozen
  base and compute, f32 trainable weights, gradient accumulation), shrunk in width, depth and
  length only. Every sharded dim is a multiple of 8 x 128 (no TPU tile padding blurs the count)."""
  c = paper.get_config()
  c.mesh.update(data=1, fsdp=8, tensor=1)
  m = c.model
  m.vision.update(image_size=IMG, patch_size=PATCH, hidden_size=VIS_D, intermediate_size=VIS_M,
                  num_layers=1, num_heads=8)
  m.llm.update(vocab_size=V, hidden_size=D, intermediate_size=M, num_layers=LAYERS,
               num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM)
  m.image_token_id = V - 1                  # no tokenizer needed
  m.feature_layer, m.multi_layers = -1, (1,)   # every vision weight is used (jit prunes unused)
  m.projector, m.local_clues = "mlp", False
  c.data.update(max_len=64, batch_size=16, lca_image_size=0)
  c.optim.accum_steps = 2
  c.eval.update(batch_size=8, max_new_tokens=4)
  return c


def hf_frozen_count() -> int:
  """CLIPVisionModel (less post_layernorm, which FEALLM does not use) + LlamaForCausalLM."""
  n_patch = (IMG // PATCH) ** 2
  clip = (PATCH * PATCH * 3 * VIS_D + VIS_D + (n_patch + 1) * VIS_D + 2 * VIS_D
          + (4 * (VIS_D * VIS_D + VIS_D) + 2 * 2 * VIS_D + 2 * VIS_D * VIS_M + VIS_M + VIS_D))
  llama = 2 * V * D + D + LAYERS * (4 * D * HEADS * HEAD_DIM + 3 * D * M + 2 * D)
  return clip + llama


def expected_argument_bytes(config, mesh) -> int:
  """Per-device bytes of the train step's arguments, from shapes, logical axes and the mesh."""
  spec = feallm.spec_from_config(config)
  model = feallm.abstract_model(spec, mesh)
  pred = nnx.filterlib.to_predicate(feallm.trainable_filter(config))
  fsdp = mesh.shape["fsdp"]
  total = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    spec = sharding.logical_to_spec(var.get_metadata().get("out_sharding") or ())
    shards = math.prod(mesh.shape[a] for entry in spec if entry is not None
                       for a in ((entry,) if isinstance(entry, str) else entry))
    n = math.prod(var.shape)
    if pred(path, var):
      total += n * 4 // shards + 2 * n * 4 // fsdp      # f32 weight + Adam mu, nu (ZeRO-1)
    else:
      total += n * 2 // shards                          # frozen bf16
  shards = sharding.batch_shards(mesh)
  for shape, dtype in pipeline.batch_signature(config, config.data.batch_size).values():
    total += math.prod(shape) * dtype.itemsize // shards
  return total


@pytest.fixture(scope="module")
def report(monkeypatch_module):
  config = small_config()
  # An HBM budget below what the step needs, to see the "does not fit" report as well.
  small = dataclasses.replace(chips.CHIPS["v5e"], hbm_usable=4 << 20)
  monkeypatch_module.setitem(chips.CHIPS, "v5e", small)
  # The optimized HLO of each compiled program, read where aot.run analyzes it.
  hlo, analyze = {}, aot.analyze

  def keep_hlo(name, compiled):
    hlo[name] = compiled.as_text()
    return analyze(name, compiled)
  monkeypatch_module.setattr(aot, "analyze", keep_hlo)
  return config, aot.run(config, "v5e:2x4", programs=("train", "decode")), hlo


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def test_train_step_memory_matches_an_independent_count(report):
  config, r, _ = report
  assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 8
  assert r["params"]["frozen"] == hf_frozen_count()
  train = r["programs"]["train"]
  devices = chips.resolve("v5e:2x4")
  mesh = sharding.make_mesh(dict(config.mesh), aot.topology_devices(devices))
  expected = expected_argument_bytes(config, mesh)
  compiled = train["memory"]["argument"]
  # XLA's own count of the step's inputs on one v5e chip (tile padding of the few 1-D
  # parameters and scalars aside).
  assert abs(compiled - expected) / expected < 0.02, (compiled, expected)
  # Donation: the new train state is written over the old one.
  state_bytes = train["memory"]["params"] + train["memory"]["opt_state"]
  assert train["memory"]["alias"] >= state_bytes
  f = train["flops"]
  assert 0.9 < f["ratio"] < 2.0 and train["accum_steps"] == 2


def test_scanned_layers_compile_to_the_same_flops_as_the_layer_loop(report):
  """The shipped config scans its LLM layers (``model.scan_layers``); the same step with the
  layer loop unrolled: XLA's own count (a loop body once) sees one layer of the scan, the
  trip-count-weighted walk of the HLO (``aot.loop_aware_cost``) sees the same FLOPs for both,
  and equals XLA's count of the unrolled step (elementwise work aside)."""
  config, r, _ = report
  assert config.model.scan_layers is True
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  u = aot.run(unrolled, "v5e:2x4", programs=("train",))["programs"]["train"]["flops"]
  s = r["programs"]["train"]["flops"]
  assert s["compiled_per_step"] == pytest.approx(u["compiled_per_step"], rel=0.01)
  assert s["xla_counted_times_accum"] < 0.9 * u["xla_counted_times_accum"]
  assert 0.9 < u["hlo_walk"] / u["xla_counted_times_accum"] <= 1.0
  assert s["unknown_trip_loops"] == 0 and u["unknown_trip_loops"] == 0


def test_does_not_fit_names_the_largest_buffers(report):
  _, r, _ = report
  train = r["programs"]["train"]
  assert not r["fits"] and not train["fits"] and train["headroom"] < 0
  largest = train["largest"]["arguments"]
  assert [b for _, b in largest] == sorted((b for _, b in largest), reverse=True)
  # The projector's MLP kernels are the largest shards: f32 and replicated by the rules.
  assert "projector" in largest[0][0] and largest[0][1] == D * D * 4, largest[:3]
  assert train["largest"]["temporaries"], "no HLO buffers named"
  text = aot.format_report(r)
  assert "DOES NOT FIT" in text and "largest buffers per device" in text


def test_decode_step_reads_the_cache_it_donates(report):
  config, r, _ = report
  dec = r["programs"]["decode"]
  # One token: compiled FLOPs are the model's (matmuls, lm_head, attention over the cache)
  # plus elementwise work XLA counts too (the f32 -> bf16 casts of the LoRA weights, norms).
  assert 0.9 < dec["flops"]["ratio"] < 1.6
  assert dec["memory"]["alias"] > 0 and dec["roofline"]["bound"] == "memory"
  jax.clear_caches()


def _op_names(hlo_text: str) -> str:
  return " ".join(aot._OPNAME.findall(hlo_text))


def test_compiles_the_shipped_7b_settings(report):
  """Dropout, remat and dtypes as configs/llava7b_lora.py ships them, seen in what XLA built."""
  config, r, hlo = report
  m = config.model
  assert (m.lora.rank, m.lora.dropout, m.remat) == (RANK, 0.05, True)
  assert (m.param_dtype, m.frozen_dtype, m.compute_dtype) == ("float32", "bfloat16", "bfloat16")
  assert r["remat"] is True
  train = r["programs"]["train"]
  # The dropout streams (a key and a counter per adapted projection) are train state.
  assert train["memory"]["rng_and_counters"] > 0
  ops = _op_names(hlo["train"])
  assert "bernoulli" in ops, "no dropout mask in the compiled train step"
  assert "checkpoint" in ops, "no remat in the compiled train step"
  # Generation runs with dropout off: no mask is drawn when decoding.
  assert "bernoulli" not in _op_names(hlo["decode"])


def test_splash_attention_lowers_for_tpu_and_cuts_temp_memory_at_2048_tokens():
  """The Pallas splash kernel compiles for v5e (a Mosaic custom call in the HLO; CPU tests only
  run it in interpret mode), ``auto`` picks it for a TPU mesh, and the causal-attention gradient
  at 2048 tokens needs no [B, H, T, T] float32 logits buffer, which the XLA path holds."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from feallm_jax.models import attention_kernels as ak

  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1),
                            aot.topology_devices(chips.resolve("v5e:2x4")))
  b, t, h, d = 8, 2048, 8, 128
  qkv = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=NamedSharding(
      mesh, P(("data", "fsdp"), None, "tensor"))) for _ in range(3)]
  valid = jax.ShapeDtypeStruct((b, t), jnp.int32,
                               sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  out = {}
  for impl in ("xla", "splash", "auto"):
    def f(q, k, v, valid, impl=impl):
      return jnp.sum(ak.causal_attention(q, k, v, valid=valid, impl=impl).astype(jnp.float32) ** 2)
    with jax.set_mesh(mesh):
      c = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*qkv, valid).compile()
    out[impl] = (c.memory_analysis().temp_size_in_bytes, c.as_text().count("tpu_custom_call"))
  logits = (b // 8) * h * t * t * 4          # one device's float32 attention logits
  assert out["xla"][1] == 0 and out["xla"][0] >= logits, out
  assert out["splash"][1] > 0 and out["splash"][0] < logits / 10, out
  assert out["auto"] == out["splash"], out
