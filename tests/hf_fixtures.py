"""Tiny random HF PyTorch models saved to local dirs: the numerical references for the tests.

Other tests may import these (``from tests.hf_fixtures import tiny_llama_dir``). Nothing is
downloaded: models are built from small configs with a fixed torch seed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

# Shapes divisible by a 2 (fsdp) x 4 (tensor) mesh.
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
             rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
QWEN2 = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Nonzero biases and norm scales, so the key table and hooks are really exercised."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "layrnorm" in name:
        p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


def _save(model, path: str, max_shard_size: str | None) -> str:
  model.eval()
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, safe_serialization=True, **kw)
  return path


def llama_dir(path: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides) -> str:
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
  _randomize(model, seed)
  return _save(model, path, max_shard_size)


def qwen2_dir(path: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides) -> str:
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**QWEN2, **overrides}))
  _randomize(model, seed)
  return _save(model, path, max_shard_size)


def clip_vision_dir(path: str, *, seed: int = 0, **overrides) -> str:
  torch.manual_seed(seed)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**CLIP_VISION, **overrides}))
  _randomize(model, seed)
  return _save(model, path, None)


def clip_full_dir(path: str, *, seed: int = 0) -> str:
  """A full CLIPModel (text + vision towers), the layout ``openai/clip-vit-large-patch14-336`` ships."""
  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16),
      vision_config=CLIP_VISION, projection_dim=16)
  model = transformers.CLIPModel(cfg)
  _randomize(model, seed)
  return _save(model, path, None)


def tokenizer_dir(path: str, vocab_size: int = 96) -> str:
  """A tiny word-level fast tokenizer saved with save_pretrained (no download)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for i in range(3, vocab_size):
    vocab[f"w{i}"] = i
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                              bos_token="<s>", eos_token="</s>")
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return path


# Text a small byte-level BPE is trained on: everyday English and the chat scaffolding, but
# neither the system prompt nor the instruction templates, so conversations come out several
# times longer than with the tiny tokenizer (as with a real LLM's general-purpose vocabulary).
BPE_CORPUS = (
    "USER: ASSISTANT: USER: ASSISTANT:",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "She smiled at the camera, and her eyes showed that she was happy to see her friends.",
    "He looked surprised when the door opened, raising his eyebrows and dropping his jaw.",
    "Describe what you see in the picture and explain the reasons for your answer.",
    "The person in the photo has a calm face with relaxed muscles around the mouth.",
)


def bpe_tokenizer_dir(path: str, vocab_size: int = 400) -> str:
  """A byte-level BPE tokenizer dir laid out like a LLaMA-3 / GPT-2 style HF release
  (tokenizer.json + tokenizer_config.json + config.json; no chat template, no ``<image>``, no pad
  token), trained offline on :data:`BPE_CORPUS`. ``tokenizer.load`` adds ``<image>`` and the
  Vicuna template with its system prompt, as it does for a real checkpoint."""
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(list(BPE_CORPUS) * 3, trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "vocab_size": len(fast), "bos_token_id": fast.bos_token_id,
               "eos_token_id": fast.eos_token_id}, f)
  return path


def torch_llm_logits(path: str, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                     position_ids: np.ndarray | None = None) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  kw = {}
  if attention_mask is not None:
    kw["attention_mask"] = torch.tensor(attention_mask)
  if position_ids is not None:
    kw["position_ids"] = torch.tensor(position_ids)
  with torch.no_grad():
    return model(torch.tensor(input_ids), **kw).logits.float().numpy()


def torch_vision_hidden(path: str, pixels_nhwc: np.ndarray, full_clip: bool = False):
  cls = transformers.CLIPModel if full_clip else transformers.CLIPVisionModel
  model = cls.from_pretrained(path, dtype=torch.float32).eval()
  x = torch.tensor(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    if full_clip:
      out = model.vision_model(pixel_values=x, output_hidden_states=True)
    else:
      out = model(pixel_values=x, output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def jit_apply(module, *args, **kwargs):
  """Runs ``module(*args, **kwargs)`` under one jit (split/merge): one compile instead of many
  small eager ones, which keeps the CPU tests fast."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k))(state, args, kwargs)
