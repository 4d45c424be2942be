"""LoRA on the decoder: a fresh adapter is a no-op; merge folds it in exactly; unmerge restores."""

import hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import layers, llm, lora
from feallm_jax.weights import hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return fx.llama_dir(str(tmp_path_factory.mktemp("llama")))


def _adapted(path, cfg_lora):
  with sharding.mesh_rules(sharding.single_device_mesh()):
    model = llm.Decoder(hf.llm_config_from_dir(path), lora=cfg_lora, rngs=nnx.Rngs(1))
  hf.load_llm_weights(model, path)   # fills BaseParams only; adapters keep their init
  return model


def _randomize_b(model):
  key = jax.random.key(3)
  for _, module in model.iter_modules():
    if isinstance(module, lora.LoRA):
      key, sub = jax.random.split(key)
      module.lora_b[...] = 0.05 * jax.random.normal(sub, module.lora_b.shape)


def test_fresh_adapter_is_identity_and_typed(llama_dir):
  cfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
  model = _adapted(llama_dir, cfg)
  base = hf.load_llm(llama_dir)
  ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8))
  np.testing.assert_array_equal(model(ids), base(ids))
  assert lora.count(model) == 7 * model.cfg.num_layers
  assert lora.count(model, ("q", "v")) == 2 * model.cfg.num_layers
  lora_state = nnx.state(model, nnx.LoRAParam)
  base_state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  assert len(jax.tree.leaves(lora_state)) == 2 * 7 * model.cfg.num_layers
  assert all(isinstance(v, layers.BaseParam) for _, v in nnx.to_flat_state(base_state))
  only_qv = _adapted(llama_dir, lora.LoRAConfig(rank=2, alpha=2.0, dropout=0.0,
                                                targets=("q", "v")))
  assert lora.count(only_qv) == 2 * model.cfg.num_layers


def test_merge_equals_base_plus_adapter_and_unmerge_restores(llama_dir):
  cfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
  model = _adapted(llama_dir, cfg)
  _randomize_b(model)
  ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8) % 96)
  base_out = hf.load_llm(llama_dir)(ids)
  adapted = model(ids)
  assert fx.rel_err(adapted, base_out) > 1e-3   # the adapter really changes the output
  q = model.layers[0].attn.q
  w0 = np.asarray(q.kernel[...])
  expect = w0 + np.asarray(q.lora.lora_a[...] @ q.lora.lora_b[...]) * cfg.scale
  assert lora.merge(model) == 7 * model.cfg.num_layers
  np.testing.assert_allclose(q.kernel[...], expect, rtol=1e-6, atol=1e-7)
  assert fx.rel_err(model(ids), adapted) < 1e-5
  assert lora.merge(model) == 0   # idempotent
  assert lora.unmerge(model) == 7 * model.cfg.num_layers
  np.testing.assert_allclose(q.kernel[...], w0, atol=1e-6)
  assert fx.rel_err(model(ids), adapted) < 1e-5


def test_lora_config_validation():
  with pytest.raises(ValueError, match="rank"):
    lora.LoRAConfig(rank=0)
  with pytest.raises(ValueError, match="targets"):
    lora.LoRAConfig(targets=("q", "qkv"))
  c = lora.LoRAConfig.from_dict(dict(enabled=True, rank=8, alpha=16.0, dropout=0.0,
                                     targets=["q"]))
  assert c.scale == 2.0 and c.for_target("k") is None and c.for_target("q") is c
