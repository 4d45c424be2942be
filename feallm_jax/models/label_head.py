"""Auxiliary label head: the dataset's own emotion and AU labels, read off the visual tokens.

Why: the next-token loss reaches the Local Clue Aggregator only through a few decisive answer
tokens (an AU number among its name and punctuation, one emotion word after a long reasoning
answer), so in a short run the faint AUs never get learned and the answer falls back to the base
rate (measured on the synthetic set: the LLM named AU17 0 times in 200 test faces with 12 true).
This head gives the trainable adapters (LCA, projector) the same labels directly, as multi-task
supervision: one learned query per label attends over the ``[B, N, D]`` tokens the LLM reads, and
a per-label weight scores the pooled vector. It works for every projector (the MLP ablation
gets the same head), costs ``2 * labels * D`` weights, and never touches the LLM or the answers.

It is not in the FEALLM paper (whose objective is the next-token loss alone): it is off with
``model.label_loss_weight=0`` (no head is built), and its effect is in the README's table.
Missing labels are masked (``emotion == -1``, ``au_present == -1``), so AU-only (DISFA, BP4D)
and emotion-only (RAF-DB) sets train it on what they have.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from feallm_jax.data import facs
from feallm_jax.models import layers

Dtype = Any
NUM_EMOTIONS = len(facs.EMOTIONS)
NUM_AUS = len(facs.ALL_AUS)
NUM_LABELS = NUM_EMOTIONS + NUM_AUS   # logits: emotions (softmax), then AUs (independent sigmoids)


class LabelHead(nnx.Module):
  """``[B, N, D]`` visual tokens -> ``[B, NUM_LABELS]`` logits by per-label attention pooling."""

  def __init__(self, width: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.queries = nnx.Param(init(rngs.params(), (NUM_LABELS, width), param_dtype),
                             out_sharding=(None, "proj_embed"))
    self.weights = nnx.Param(init(rngs.params(), (NUM_LABELS, width), param_dtype),
                             out_sharding=(None, "proj_embed"))
    self.bias = nnx.Param(jnp.zeros((NUM_LABELS,), param_dtype), out_sharding=(None,))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.norm(tokens).astype(jnp.float32)
    q = self.queries[...].astype(jnp.float32)
    scores = jnp.einsum("bnd,ld->bln", x, q) / jnp.sqrt(jnp.float32(x.shape[-1]))
    pooled = jnp.einsum("bln,bnd->bld", jax.nn.softmax(scores, axis=-1), x)
    return (jnp.einsum("bld,ld->bl", pooled, self.weights[...].astype(jnp.float32))
            + self.bias[...].astype(jnp.float32))


def label_loss(logits: jax.Array, emotion: jax.Array, au_present: jax.Array,
               example_weight: jax.Array) -> dict[str, jax.Array]:
  """Emotion cross-entropy plus the AU binary cross-entropy summed over an example's annotated
  AUs, averaged over the examples with ``example_weight`` (the trainer passes each example's
  answer-token count, so the label loss is a per-answer-token mean like the LM loss and gradient
  accumulation over micro-batches stays exact). Unlabeled entries (-1) count for nothing."""
  logits = logits.astype(jnp.float32)
  w = example_weight.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  emo_logits = logits[:, :NUM_EMOTIONS]
  gold = jnp.take_along_axis(emo_logits, jnp.maximum(emotion, 0)[:, None], axis=-1)[:, 0]
  ce = (jax.nn.logsumexp(emo_logits, axis=-1) - gold) * (emotion >= 0)
  z, y = logits[:, NUM_EMOTIONS:], (au_present > 0).astype(jnp.float32)
  bce = (jnp.maximum(z, 0.0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))) * (au_present >= 0)
  emotion_loss = (ce * w).sum() / denom
  au_loss = (bce.sum(-1) * w).sum() / denom
  return dict(label_loss=emotion_loss + au_loss, emotion_loss=emotion_loss, au_loss=au_loss)
