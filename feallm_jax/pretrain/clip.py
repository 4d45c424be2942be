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

Optionally (``clip.caption_weight`` > 0) a captioning head is trained beside it, as in CoCa and
CapPa: a small decoder reads the ViT's patch tokens of the layer FEALLM's projector reads (F_L)
as a prefix and predicts the caption. A contrastive batch rarely holds two faces that differ only
in a faint movement (the chin boss of AU17, the pressed lips of AU24), so InfoNCE barely rewards
seeing one; the captioning loss pays for every movement word on every face. With
``parallel_fraction`` of the rows the caption's input tokens are all masked (CapPa's parallel
prediction), so the words must come from the image rather than from the caption so far.
"""
from __future__ import annotations

import dataclasses

import jax
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


class Captioner(nnx.Module):
  """Patch tokens of one ViT layer -> linear -> prefix of a small causal decoder -> caption."""

  def __init__(self, vision_width: int, num_patches: int, tcfg: TextTowerConfig,
               feature_layer: int, *, rngs: nnx.Rngs):
    self.feature_layer = feature_layer
    self.proj = layers.Dense(vision_width, tcfg.hidden_size, axes=(None, None), use_bias=True,
                             rngs=rngs)
    cfg = dataclasses.replace(tcfg, max_len=tcfg.max_len + num_patches)
    self.decoder = llm_lib.Decoder(cfg.llm_config(), rngs=rngs)

  def loss(self, hidden: tuple, ids, mask, inputs) -> jax.Array:
    """Mean next-token cross-entropy over the caption's real tokens. `inputs`: the caption ids
    the decoder reads (``ids`` itself, or a masked copy for parallel prediction)."""
    prefix = self.proj(hidden[self.feature_layer][:, 1:])                  # [B, N, W]
    n = prefix.shape[1]
    x = jnp.concatenate([prefix, self.decoder.embed(inputs).astype(prefix.dtype)], 1)
    valid = jnp.concatenate([jnp.ones(prefix.shape[:2], mask.dtype), mask], 1)
    logits = self.decoder(inputs_embeds=x, attention_mask=valid)
    pred = logits[:, n - 1:-1]                            # position n-1+j predicts caption token j
    ce = optax.softmax_cross_entropy_with_integer_labels(pred, ids)
    m = mask.astype(jnp.float32)
    return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


class CLIP(nnx.Module):
  """VisionEncoder + CLIP head, text tower + projection, learned temperature; optionally a
  captioning head (CoCa)."""

  def __init__(self, vcfg: vision_lib.VisionConfig, tcfg: TextTowerConfig, embed_dim: int,
               *, caption_feature_layer: int | None = None, rngs: nnx.Rngs):
    self.vision = vision_lib.VisionEncoder(vcfg, rngs=rngs)
    self.post_ln = layers.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps, rngs=rngs)
    self.vis_proj = layers.Dense(vcfg.hidden_size, embed_dim, axes=(None, None), rngs=rngs)
    self.text = llm_lib.Decoder(tcfg.llm_config(), rngs=rngs)
    self.text_proj = layers.Dense(tcfg.hidden_size, embed_dim, axes=(None, None), rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))
    self.captioner = (None if caption_feature_layer is None else Captioner(
        vcfg.hidden_size, vcfg.num_patches, tcfg, caption_feature_layer, rngs=rngs))

  def embed_image(self, hidden: tuple):
    z = self.vis_proj(self.post_ln(hidden[-1][:, 0]))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def encode_image(self, pixels):
    return self.embed_image(self.vision(pixels))

  def encode_text(self, ids, mask):
    _, hidden = self.text(ids, attention_mask=mask, return_hidden=True)
    last = jnp.maximum(mask.sum(-1) - 1, 0)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    z = self.text_proj(pooled)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def contrastive_loss(model: CLIP, pixels, ids, mask, group):
  """Symmetric InfoNCE with every same-content pair a positive (`group`: content id per row)."""
  return _infonce(model, model.encode_image(pixels), ids, mask, group)


def coca_loss(model: CLIP, pixels, ids, mask, group, inputs, *, caption_weight: float,
              contrastive_weight: float = 1.0):
  """`contrastive_weight` x InfoNCE + `caption_weight` x captioning loss, one ViT forward.
  With `contrastive_weight` 0 it is pure captioning (the contrastive towers are not run and the
  reported accuracy is 0)."""
  hidden = model.vision(pixels)
  cap = caption_weight * model.captioner.loss(hidden, ids, mask, inputs)
  if not contrastive_weight:
    return cap, jnp.zeros((), jnp.float32)
  con, acc = _infonce(model, model.embed_image(hidden), ids, mask, group)
  return contrastive_weight * con + cap, acc


def _infonce(model: CLIP, zi, ids, mask, group):
  zt = model.encode_text(ids, mask)
  scale = jnp.exp(jnp.clip(model.log_scale[...], 0.0, np.log(100.0)))
  logits = scale * zi @ zt.T
  pos = (group[:, None] == group[None, :]).astype(jnp.float32)
  target = pos / pos.sum(-1, keepdims=True)
  li = optax.softmax_cross_entropy(logits, target).mean()
  lt = optax.softmax_cross_entropy(logits.T, target).mean()
  acc = (jnp.take_along_axis(pos, jnp.argmax(logits, -1)[:, None], 1)[:, 0]).mean()
  return (li + lt) / 2, acc
