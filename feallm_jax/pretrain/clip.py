"""Stage 0, vision: CLIP-style image-caption contrastive pretraining of the tiny ViT.

The vision tower is the project's own `VisionEncoder` (what FEALLM later loads, frozen). Its head
is CLIP's: the final class token, a LayerNorm (CLIP's ``post_layernorm``) and a linear
projection. The text tower is a small causal transformer pooled at its last real token, as in
CLIP; it and both projections are discarded after pretraining. Captions (`captions.py`) are
redrawn every step (random wording), so the tower cannot match strings, only content.

The loss is CLIP's symmetric InfoNCE with one change for a small label space: pairs whose
captions describe the same expression (same emotion and movements, whatever the wording and the
appearance words) are all positives, with the target mass split evenly between them. Otherwise
same-content captions in a batch would be pushed apart, and, worse, appearance words (unique per
person) would let both towers match pairs without looking at the expression at all.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from feallm_jax.models import layers, llm as llm_lib, vision as vision_lib


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
  vocab_size: int
  hidden_size: int = 128
  intermediate_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 96

  def llm_config(self) -> llm_lib.LLMConfig:
    return llm_lib.LLMConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_heads,
        head_dim=self.hidden_size // self.num_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=self.max_len, model_type="llama")


class CLIP(nnx.Module):
  """VisionEncoder + CLIP head, text tower + projection, learned temperature."""

  def __init__(self, vcfg: vision_lib.VisionConfig, tcfg: TextTowerConfig, embed_dim: int,
               *, rngs: nnx.Rngs):
    self.vision = vision_lib.VisionEncoder(vcfg, rngs=rngs)
    self.post_ln = layers.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps, rngs=rngs)
    self.vis_proj = layers.Dense(vcfg.hidden_size, embed_dim, axes=(None, None), rngs=rngs)
    self.text = llm_lib.Decoder(tcfg.llm_config(), rngs=rngs)
    self.text_proj = layers.Dense(tcfg.hidden_size, embed_dim, axes=(None, None), rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

  def encode_image(self, pixels):
    cls = self.vision(pixels)[-1][:, 0]
    z = self.vis_proj(self.post_ln(cls))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def encode_text(self, ids, mask):
    _, hidden = self.text(ids, attention_mask=mask, return_hidden=True)
    last = jnp.maximum(mask.sum(-1) - 1, 0)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    z = self.text_proj(pooled)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def contrastive_loss(model: CLIP, pixels, ids, mask, group):
  """Symmetric InfoNCE with every same-content pair a positive (`group`: content id per row)."""
  zi, zt = model.encode_image(pixels), model.encode_text(ids, mask)
  scale = jnp.exp(jnp.clip(model.log_scale[...], 0.0, np.log(100.0)))
  logits = scale * zi @ zt.T
  pos = (group[:, None] == group[None, :]).astype(jnp.float32)
  target = pos / pos.sum(-1, keepdims=True)
  li = optax.softmax_cross_entropy(logits, target).mean()
  lt = optax.softmax_cross_entropy(logits.T, target).mean()
  acc = (jnp.take_along_axis(pos, jnp.argmax(logits, -1)[:, None], 1)[:, 0]).mean()
  return (li + lt) / 2, acc
