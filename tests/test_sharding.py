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
