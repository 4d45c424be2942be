"""Stage 0, language: the tiny LLM pretrained on text of the train split's kind.

The CPU analog of a pretrained chat LLM that already knows facial-expression vocabulary. Its
corpus is text only, drawn from fresh train-pool identities (never the test pool):
  * captions of faces (`captions.py`), the kind of text a web corpus holds about faces;
  * instruction conversations of the four FEALLM tasks in which the image is replaced by its
    caption (how LLaVA generated its instruction data from captions with a text-only LLM): the
    LLM learns the answer formats and how described movements relate to action units and
    emotions, as Vicuna knows FACS from its pretraining text;
  * FACS glossary sentences (AU numbers, names, muscles).
No image is ever seen: linking pixels to words is stage 1's job (projector, LCA, LoRA).
"""
from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp
import numpy as np

from feallm_jax.data import facs, instructions, synthetic, tokenizer as tok_lib
from feallm_jax.pretrain import captions


def _glossary(rng: np.random.Generator) -> str:
  au = int(facs.ALL_AUS[int(rng.integers(len(facs.ALL_AUS)))])
  name, muscle = facs.AU_TABLE[au]
  effect = instructions.AU_EFFECTS[au]
  return f"AU{au} ({name}) is produced by the {muscle}: {effect}."


def sample_text(rng: np.random.Generator, seeds: tuple[int, ...], tasks=instructions.TASKS,
                caption_frac: float = 0.25, glossary_frac: float = 0.05):
  """One training text: ('text', str) or ('conversation', LLaVA turns)."""
  u = rng.uniform()
  if u < glossary_frac:
    return "text", _glossary(rng)
  seed = int(seeds[int(rng.integers(len(seeds)))])
  ident = synthetic.make_identity("train", int(rng.integers(synthetic.NUM_IDENTITIES["train"])),
                                  seed)
  emotion = facs.RAF_DB[int(rng.integers(len(facs.RAF_DB)))]
  aus = sorted(synthetic.sample_expression(rng, emotion))
  cap = captions.caption(emotion, aus, ident, rng)
  if u < glossary_frac + caption_frac:
    return "text", cap
  present = np.zeros(len(facs.ALL_AUS), np.int32)
  for a in aus:
    present[facs.au_index(a)] = 1
  record = dict(id="lm", emotion=np.int32(facs.emotion_index(emotion)), au_present=present)
  avail = [t for t in tasks if t in instructions.available_tasks(record)]
  task = avail[int(rng.integers(len(avail)))]
  conv = instructions.make_conversation(record, task, rng)
  conv[0]["value"] = conv[0]["value"].replace(instructions.IMAGE_TOKEN, cap)
  return "conversation", conv


def encode(tok, kind: str, item) -> np.ndarray:
  """Token ids of one text (bos ... eos) or one chat-templated conversation."""
  if kind == "text":
    return np.asarray([tok.bos_token_id] + tok.encode(item, add_special_tokens=False)
                      + [tok.eos_token_id], np.int32)
  ids, _ = tok_lib.encode_conversation(tok, item)
  return ids


def batches(tok, batch_size: int, max_len: int, seeds: tuple[int, ...],
            seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(ids [B,T], mask [B,T]) forever; the loss covers every real token (text pretraining)."""
  rng = np.random.default_rng([seed, 7])
  while True:
    ids = np.full((batch_size, max_len), tok.pad_token_id, np.int32)
    mask = np.zeros((batch_size, max_len), np.int32)
    for b in range(batch_size):
      x = encode(tok, *sample_text(rng, seeds))[:max_len]
      ids[b, :len(x)] = x
      mask[b, :len(x)] = 1
    yield ids, mask


def lm_loss(model, ids, mask):
  """Next-token cross-entropy over real tokens; returns (loss, token accuracy)."""
  logits = model(ids, attention_mask=mask)[:, :-1]
  tgt, w = ids[:, 1:], mask[:, 1:].astype(jnp.float32)
  logz = jnp.log(jnp.sum(jnp.exp(logits - logits.max(-1, keepdims=True)), -1)) \
      + logits.max(-1)
  gold = jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((logits.argmax(-1) == tgt) * w).sum() / n
  return ((logz - gold) * w).sum() / n, acc
