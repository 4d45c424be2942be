"""Sharded backbones: a 2x4 (fsdp x tensor) mesh gives the unsharded outputs, with real shards."""

import hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from feallm_jax import sharding
from feallm_jax.models import llm, vision
from feallm_jax.weights import hf


@pytest.fixture(scope="module")
def mesh(devices):
  return sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, devices)


def test_llm_sharded_equals_unsharded(tmp_path, mesh):
  path = fx.llama_dir(str(tmp_path / "llama"))
  ids = np.random.default_rng(0).integers(0, 96, (4, 8)).astype(np.int32)
  ref = hf.load_llm(path)(jnp.asarray(ids))
  with sharding.mesh_rules(mesh):
    model = hf.load_llm(path)
    specs = sharding.specs(model)
    assert specs["embed_tokens"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert specs["layers/0/attn/q/kernel"] == P("fsdp", "tensor")
    assert specs["layers/1/attn/k/kernel"] == P("fsdp", "tensor")
    assert specs["layers/0/attn/o/kernel"] == P("tensor", "fsdp")
    assert specs["layers/0/down/kernel"] == P("tensor", "fsdp")
    assert specs["norm/scale"] == P(None)
    q = model.layers[0].attn.q.kernel[...]
    assert q.addressable_shards[0].data.shape == (16, 8)   # [32/2, 32/4]
    graphdef, state = nnx.split(model)
    x = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_vision_sharded_equals_unsharded(tmp_path, mesh):
  path = fx.clip_vision_dir(str(tmp_path / "clip"))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ref = hf.load_vision(path)(jnp.asarray(x))
  with sharding.mesh_rules(mesh):
    enc = hf.load_vision(path)
    specs = sharding.specs(enc)
    assert specs["blocks/0/fc1/kernel"] == P("fsdp", "tensor")
    assert specs["blocks/0/attn/o/kernel"] == P("tensor", "fsdp")
    assert specs["patch_embed/kernel"] == P(None, "fsdp")
    assert specs["pos_embed"] == P(None, "fsdp")
    out = enc(jnp.asarray(x))
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_validate_rules_rejects_non_divisible(mesh):
  cfg = llm.LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=66, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8)
  with sharding.mesh_rules(mesh):
    abstract = nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"layers/0/gate/kernel: dimension 66 .*'mlp'.* 4"):
    sharding.validate_rules(abstract, mesh)
  vcfg = vision.VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                             num_layers=1, num_heads=4)
  with sharding.mesh_rules(mesh):
    sharding.validate_rules(nnx.eval_shape(lambda: vision.VisionEncoder(vcfg, rngs=nnx.Rngs(0))),
                            mesh)


def test_load_refuses_non_divisible_mesh(tmp_path, mesh):
  path = fx.llama_dir(str(tmp_path / "odd"), intermediate_size=66)
  with sharding.mesh_rules(mesh):
    with pytest.raises(ValueError, match="not divisible"):
      hf.load_llm(path)


def test_constrain_batch_keeps_activations_split_over_data_and_fsdp(devices):
  """An activation computed from an FSDP-sharded weight: under ``constrain_batch`` its batch
  axis stays split over data x fsdp (GSPMD may otherwise replicate it); a no-op outside a mesh
  and for batches that do not split."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices)
  x = jax.device_put(jnp.ones((8, 16)), sharding.batch_sharding(mesh, 2))
  # Output features split over fsdp: unconstrained, GSPMD splits the result's batch over data
  # only, P('data', 'fsdp').
  w = jax.device_put(jnp.ones((16, 32)), jax.sharding.NamedSharding(mesh, P(None, "fsdp")))
  with jax.set_mesh(mesh):
    assert jax.jit(lambda x, w: jnp.tanh(x @ w))(x, w).sharding.spec != P(("data", "fsdp"), None)
    y = jax.jit(lambda x, w: sharding.constrain_batch(jnp.tanh(x @ w)))(x, w)
  assert y.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_allclose(y, np.tanh(16.0 * np.ones((8, 32))), rtol=1e-6)
  with jax.set_mesh(mesh):
    odd = jax.jit(sharding.constrain_batch)(jnp.ones((6, 4)))   # 6 rows over 8 shards
  assert odd.shape == (6, 4)
  assert sharding.constrain_batch(jnp.ones((3, 2))).shape == (3, 2)     # no mesh: unchanged


def test_loop_aware_cost_counts_every_trip_of_a_loop():
  """Hand-counted matmul FLOPs of three [4,8] x [8,8] layers (2*4*8*8 = 512 each): the same
  1536 whether the layers are unrolled or scanned (XLA's cost_analysis counts a loop body
  once), x3 with the gradient (forward, input and weight gradients), x2 more inside a
  two-trip outer loop."""
  from feallm_jax import aot

  def scanned(x, ws):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return h.sum()

  def unrolled(x, ws):
    for i in range(3):
      x = jnp.tanh(x @ ws[i])
    return x.sum()

  def outer(x, ws):
    return jax.lax.fori_loop(0, 2, lambda i, acc: acc + scanned(x + i, ws), 0.0)

  x, ws = jnp.ones((4, 8)), jnp.ones((3, 8, 8))
  cost = lambda f: aot.loop_aware_cost(jax.jit(f).lower(x, ws).compile().as_text())
  assert cost(unrolled)["dot_flops"] == 1536
  compiled = jax.jit(scanned).lower(x, ws).compile()
  assert aot.loop_aware_cost(compiled.as_text())["dot_flops"] == 1536
  assert compiled.cost_analysis()["flops"] < 1536          # one body: the reason for the walk
  assert cost(jax.grad(scanned, argnums=1))["dot_flops"] == 3 * 1536
  walked = cost(outer)
  assert walked["dot_flops"] == 2 * 1536 and walked["unknown_trip_loops"] == 0
  assert cost(unrolled)["bytes_accessed"] > 3 * 8 * 8 * 4      # reads every weight
