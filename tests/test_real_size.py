"""Real-size backbones built abstractly under a mesh: parameter counts match HF, nothing allocated."""

import dataclasses
import math

import jax
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import layers, llm, lora, vision

CLIP_L14_336 = dict(model_type="clip_vision_model", image_size=336, patch_size=14,
                    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False)
# HF counts (sum of parameter numel): CLIPVisionModel(ViT-L/14-336) and LlamaForCausalLM(7B).
HF_CLIP_L14_336 = 303_507_456
HF_LLAMA2_7B = 6_738_415_616


def _count(abstract):
  leaves = jax.tree.leaves(nnx.state(abstract, layers.BaseParam))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "something was allocated"
  return sum(math.prod(x.shape) for x in leaves)


@pytest.fixture(scope="module")
def mesh(devices):
  return sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, devices)


def test_clip_vit_l14_336(mesh):
  cfg = vision.VisionConfig.from_hf(CLIP_L14_336)
  with sharding.mesh_rules(mesh):
    enc = nnx.eval_shape(lambda: vision.VisionEncoder(cfg, param_dtype="bfloat16",
                                                      rngs=nnx.Rngs(0)))
  sharding.validate_rules(enc, mesh)
  # Our module leaves out post_layernorm (scale + bias, 2 x 1024): only the pooled head uses it.
  assert _count(enc) == HF_CLIP_L14_336 - 2 * 1024
  assert enc.pos_embed.shape == (577, 1024) and enc.patch_embed.kernel.shape == (588, 1024)


def test_llama2_7b(mesh):
  cfg = llm.LLMConfig.from_hf(LLAMA2_7B)
  with sharding.mesh_rules(mesh):
    dec = nnx.eval_shape(lambda: llm.Decoder(cfg, param_dtype="bfloat16", rngs=nnx.Rngs(0)))
  sharding.validate_rules(dec, mesh)
  assert _count(dec) == HF_LLAMA2_7B
  spec = dec.layers[0].attn.q.kernel.get_value().sharding.spec
  assert tuple(spec) == ("fsdp", "tensor")


def test_llama2_7b_with_lora_counts(mesh):
  # Two 7B-wide layers keep the trace short; adapter counts are per layer.
  cfg = dataclasses.replace(llm.LLMConfig.from_hf(LLAMA2_7B), num_layers=2)
  lcfg = lora.LoRAConfig(rank=128, alpha=256.0)
  with sharding.mesh_rules(mesh):
    dec = nnx.eval_shape(lambda: llm.Decoder(cfg, lora=lcfg, rngs=nnx.Rngs(0)))
  n_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(dec, nnx.LoRAParam)))
  d, m = 4096, 11008
  per_layer = 4 * 128 * (d + d) + 2 * 128 * (d + m) + 128 * (m + d)
  assert n_lora == 2 * per_layer
  assert _count(dec) == HF_LLAMA2_7B - 30 * (4 * d * d + 3 * d * m + 2 * d)


def test_hf_reference_counts_on_meta_device():
  """The HF constants above, recounted from transformers on torch's meta device (no memory)."""
  torch = pytest.importorskip("torch")
  import transformers
  with torch.device("meta"):
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **{k: v for k, v in CLIP_L14_336.items() if k != "model_type"}))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in LLAMA2_7B.items() if k != "model_type"}))
  assert sum(p.numel() for p in clip.parameters()) == HF_CLIP_L14_336
  assert sum(p.numel() for p in llama.parameters()) == HF_LLAMA2_7B
