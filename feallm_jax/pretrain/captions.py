"""Captions of synthetic faces: what an alt-text or a caption dataset would say about them.

Stage 0 pretrains the vision tower on image-caption pairs, the way CLIP is trained, and the LLM on
text. The captions describe what is visible: the expression in plain words, the facial movements
(the visible effect of each active AU, never its FACS number: a web caption would not say
"AU12"), hair, skin and background. The labels of the instruction set are thus present only as
natural language, as in the real recipe where CLIP saw "a smiling woman" and never "AU12".
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from feallm_jax.data import facs, instructions, synthetic

EXPRESSION_WORDS: Mapping[str, tuple[str, ...]] = {
    "happiness": ("a happy face", "a smiling face", "a joyful face", "a cheerful person"),
    "sadness": ("a sad face", "an unhappy face", "a sorrowful person", "a downcast face"),
    "surprise": ("a surprised face", "an astonished face", "an amazed person"),
    "fear": ("a frightened face", "a scared face", "a fearful person", "an afraid face"),
    "anger": ("an angry face", "a furious face", "an annoyed person", "a cross face"),
    "disgust": ("a disgusted face", "a repulsed face", "a face showing revulsion"),
    "contempt": ("a contemptuous face", "a scornful face", "a disdainful person"),
    "neutral": ("a neutral face", "a calm face", "an expressionless face", "a relaxed face"),
}
HAIR_WORDS = ("black", "dark brown", "brown", "light brown", "blond", "grey", "auburn", "black")
HAIR_STYLES = ("short", "side-parted", "long")
SKIN_WORDS = ("very light", "light", "medium", "tan", "brown", "dark brown", "fair", "light")


def _colour_word(rgb) -> str:
  """A coarse colour name for an RGB triple (background descriptions)."""
  r, g, b = (float(v) for v in rgb)
  hi, lo = max(r, g, b), min(r, g, b)
  if hi - lo < 30:
    return "white" if hi > 200 else "grey" if hi > 90 else "dark grey"
  if r >= g and r >= b:
    return "orange" if g > 0.6 * r and b < 0.6 * r else "pink" if b > 0.7 * r else "red"
  if g >= r and g >= b:
    return "yellow" if r > 0.8 * g else "teal" if b > 0.8 * g else "green"
  return "purple" if r > 0.7 * b else "cyan" if g > 0.8 * b else "blue"


def _nearest(table: np.ndarray, rgb) -> int:
  return int(np.argmin(((table - np.asarray(rgb, np.float32)) ** 2).sum(-1)))


def caption(emotion: int | str, aus, identity: synthetic.Identity | None = None,
            rng: np.random.Generator | int = 0) -> str:
  """One caption: expression words, visible movements, then appearance (identity given)."""
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  name = facs.emotion_name(emotion)
  words = EXPRESSION_WORDS[name]
  parts = [words[int(rng.integers(len(words)))].capitalize()]
  effects = [instructions.AU_EFFECTS[int(a)] for a in sorted(int(a) for a in aus)]
  if effects:
    order = rng.permutation(len(effects))
    parts.append(instructions._join([effects[i] for i in order]))
  else:
    parts.append("the brows, eyes and mouth are at rest")
  text = ": ".join(parts) + "."
  if identity is not None:
    hair = HAIR_WORDS[_nearest(synthetic.HAIR_COLORS, identity.hair)]
    skin = SKIN_WORDS[_nearest(synthetic.SKIN_TONES, identity.skin)]
    style = HAIR_STYLES[identity.hair_style]
    bg = _colour_word(identity.bg0)
    bg1 = _colour_word(identity.bg1)
    bgs = bg if bg == bg1 else f"{bg} and {bg1}"
    text += f" {style.capitalize()} {hair} hair, {skin} skin, {bgs} background."
  return text


def record_caption(record: Mapping, seed: int, split: str = "train",
                   rng: np.random.Generator | int = 0) -> str:
  """Caption of a synthetic.generate() record (the identity is re-derived from its subject)."""
  subject = str(record["subject"])
  index = int(subject.rsplit("-", 1)[1])
  ident = synthetic.make_identity(split, index, seed)
  return caption(int(record["emotion"]), synthetic.active_aus(record), ident, rng)
