"""HF loading rejects bad checkpoints by name and loads nothing; import_hf round trip."""

import json
import os
import sys

import hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from feallm_jax import sharding
from feallm_jax.models import llm, vision
from feallm_jax.weights import base_checkpoint, hf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import import_hf  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = fx.llama_dir(str(tmp_path_factory.mktemp("llama")))
  fx.tokenizer_dir(path)
  return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return fx.clip_vision_dir(str(tmp_path_factory.mktemp("clip")))


def _tamper(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  if edit_config:
    edit_config(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


def test_missing_extra_and_shape_errors_name_the_tensor(tmp_path, llama_dir, clip_dir):
  bad = _tamper(llama_dir, str(tmp_path / "missing"),
                lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
    hf.load_llm(bad)
  bad = _tamper(llama_dir, str(tmp_path / "extra"),
                lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra"):
    hf.load_llm(bad)
  bad = _tamper(llama_dir, str(tmp_path / "shape"),
                lambda t: t.__setitem__("model.norm.weight", torch.ones(33)))
  with pytest.raises(hf.CheckpointError, match=r"shape mismatch for tensor 'model\.norm\.weight'"):
    hf.load_llm(bad)
  bad = _tamper(clip_dir, str(tmp_path / "vmissing"),
                lambda t: t.pop("encoder.layers.2.mlp.fc2.bias"))
  with pytest.raises(hf.CheckpointError, match=r"missing tensor 'encoder\.layers\.2\.mlp\.fc2"):
    hf.load_vision(bad)


def test_unsupported_model_type_and_config_fields(tmp_path, llama_dir):
  bad = _tamper(llama_dir, str(tmp_path / "gpt2"), edit_config=lambda c: c.update(model_type="gpt2"))
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    hf.load_llm(bad)
  with pytest.raises(ValueError, match="model_type"):
    hf.load_vision(bad)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_llm(str(tmp_path))
  os.remove(os.path.join(bad, "model.safetensors"))
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(hf.read_config(llama_dir), f)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_llm(bad)


def test_failed_load_leaves_module_untouched(tmp_path, llama_dir):
  cfg = hf.llm_config_from_dir(llama_dir)
  with sharding.mesh_rules(sharding.single_device_mesh()):
    model = nnx.eval_shape(lambda: llm.Decoder(cfg, rngs=nnx.Rngs(0)))
  untouched = lambda: all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
                          for _, v in nnx.to_flat_state(nnx.state(model)))
  bad = _tamper(llama_dir, str(tmp_path / "half"),
                lambda t: t.__setitem__("lm_head.weight", torch.ones(96, 31)))
  with pytest.raises(hf.CheckpointError, match="lm_head"):
    hf.load_llm_weights(model, bad)
  assert untouched()
  bad = _tamper(llama_dir, str(tmp_path / "theta"), edit_config=lambda c: c.update(
      rope_parameters={**c["rope_parameters"], "rope_theta": 1234.0}))
  with pytest.raises(hf.CheckpointError, match="'rope_theta'"):
    hf.load_llm_weights(model, bad)
  assert untouched()


def test_bf16_frozen_weights_with_lora(llama_dir):
  from feallm_jax.models import lora
  cfg = hf.llm_config_from_dir(llama_dir)
  with sharding.mesh_rules(sharding.single_device_mesh()):
    model = nnx.jit(lambda: llm.Decoder(cfg, lora=lora.LoRAConfig(rank=2, alpha=4.0, dropout=0.0),
                                        dtype=jnp.float32, param_dtype=jnp.bfloat16,
                                        rngs=nnx.Rngs(0)))()
  a_before = np.asarray(model.layers[0].attn.q.lora.lora_a[...]).copy()
  assert hf.load_llm_weights(model, llama_dir) == len(hf.llm_key_table(cfg))
  assert model.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(model.layers[0].attn.q.lora.lora_a[...], a_before)
  ref = fx.torch_llm_logits(llama_dir, np.arange(8, dtype=np.int32)[None])
  assert fx.rel_err(fx.jit_apply(model, jnp.arange(8, dtype=jnp.int32)[None]), ref) < 5e-2


def test_import_hf_round_trip(tmp_path, llama_dir, clip_dir, devices):
  out = str(tmp_path / "base")
  fp = import_hf.import_hf(clip_dir, llama_dir, out)
  meta = base_checkpoint.read_meta(out)
  assert meta["fingerprint"] == fp == base_checkpoint.fingerprint(out)
  assert meta["llm_hf_config"]["model_type"] == "llama"
  assert meta["vision_hf_config"]["hidden_size"] == 32
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
  assert tok.convert_tokens_to_ids("w5") == 5
  with pytest.raises(FileExistsError, match="not empty"):
    import_hf.import_hf(clip_dir, llama_dir, out)

  # Restore on a different (2x4) mesh into abstract modules: placed straight into shards.
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4}, devices)
  vcfg, lcfg = hf.vision_config_from_dir(clip_dir), hf.llm_config_from_dir(llama_dir)
  with sharding.mesh_rules(mesh):
    enc = nnx.eval_shape(lambda: vision.VisionEncoder(vcfg, rngs=nnx.Rngs(5)))
    dec = nnx.eval_shape(lambda: llm.Decoder(lcfg, rngs=nnx.Rngs(5)))
    assert base_checkpoint.restore_into(out, enc, dec) == fp
    assert sharding.specs(dec)["layers/0/up/kernel"] == jax_p("fsdp", "tensor")
    ids = np.arange(16, dtype=np.int32).reshape(2, 8)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    got_l = np.asarray(fx.jit_apply(dec, jnp.asarray(ids)))
    got_v = np.asarray(fx.jit_apply(enc, jnp.asarray(x))[-1])
  assert fx.rel_err(got_l, fx.torch_llm_logits(llama_dir, ids)) < 1e-4
  assert fx.rel_err(got_v, fx.torch_vision_hidden(clip_dir, x)[-1]) < 1e-4

  # Tampering is caught by the fingerprint; a mismatched module by name.
  with open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "a") as f:
    f.write(" ")
  with pytest.raises(base_checkpoint.BaseCheckpointError, match="fingerprint"):
    base_checkpoint.restore_into(out, None, dec)
  other = llm.LLMConfig(**{**lcfg.__dict__, "num_layers": 1})
  with sharding.mesh_rules(sharding.single_device_mesh()):
    small = nnx.eval_shape(lambda: llm.Decoder(other, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="num_layers"):
    base_checkpoint.restore_into(out, None, small, verify_fingerprint=False)
  fp2 = import_hf.import_hf("", llama_dir, out, overwrite=True)
  assert fp2 != fp and base_checkpoint.read_meta(out)["vision_hf_config"] is None


def jax_p(*names):
  from jax.sharding import PartitionSpec
  return PartitionSpec(*names)
