"""Instruction conversations for the four FEALLM tasks, built from a record's labels.

Answers open with the label, as in the paper ("Happiness. ..."), and follow one regular format
that `parse_emotion` / `parse_aus` read back, so the evaluator scores generated text with the
same grammar the model was trained on:
  fer        "Happiness."
  aur        "AU6 (cheek raiser), AU12 (lip corner puller)."  |  "No action units are active."
  joint      "Happiness. Active action units: AU6 (cheek raiser), AU12 (lip corner puller)."
  reasoning  "Happiness. AU6 (cheek raiser) and AU12 (lip corner puller) are active: the cheeks
              lift and the lip corners pull up. EMFACS links them to happiness."
Reasoning names only the active AUs of the emotion's EMFACS prototype (so it always satisfies
`facs.emfacs_consistent`), and the answers stay under ~50 words for short context windows.
Prompt phrasings are drawn with the given seed; the answer content depends only on the labels.
"""
from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

import numpy as np

from feallm_jax.data import facs

IMAGE_TOKEN = "<image>"
TASKS: tuple[str, ...] = ("fer", "aur", "joint", "reasoning")
NO_AUS = "No action units are active."

PROMPTS: Mapping[str, tuple[str, ...]] = {
    "fer": (
        "What facial expression does this person show?",
        "Which emotion is expressed by the face in the image?",
        "Classify the facial expression of this person.",
        "Identify the emotion on this face.",
        "What is the emotional expression in this picture?",
        "Recognize the facial expression shown here.",
    ),
    "aur": (
        "Which facial action units are active in this face?",
        "List the active action units (AUs) of this face.",
        "Detect the facial action units present in the image.",
        "Which FACS action units can you see on this face?",
        "Identify the action units that are activated in this facial image.",
    ),
    "joint": (
        "Describe the facial expression and the active action units of this face.",
        "What emotion does this face show, and which action units are active?",
        "Give the facial expression and the action units present in the image.",
        "Analyze this face: name its expression and list its active action units.",
        "Report the emotion and the facial action units you observe.",
    ),
    "reasoning": (
        "What emotion does this person feel? Explain which action units indicate it.",
        "Recognize the facial expression and explain your reasoning from facial action units.",
        "Which emotion is shown, and which muscle movements (action units) support it?",
        "Infer the emotion from this face and justify it with the active action units.",
        "Explain, based on facial action units, which emotion this face expresses.",
    ),
}

# Visible effect of each AU, used in reasoning answers.
AU_EFFECTS: Mapping[int, str] = {
    1: "the inner brows rise", 2: "the outer brows rise",
    4: "the brows lower and draw together", 5: "the upper lids rise",
    6: "the cheeks lift", 7: "the lids tighten", 9: "the nose wrinkles",
    10: "the upper lip rises", 11: "the nasolabial folds deepen",
    12: "the lip corners pull up", 13: "the lip corners pull up sharply",
    14: "the lip corners dimple", 15: "the lip corners pull down",
    16: "the lower lip is pulled down", 17: "the chin pushes up",
    18: "the lips pucker", 20: "the lips stretch sideways", 22: "the lips funnel",
    23: "the lips tighten", 24: "the lips press together", 25: "the lips part",
    26: "the jaw drops", 27: "the mouth stretches open", 28: "the lips are sucked in",
    43: "the eyes close", 45: "the eyes blink",
}
assert set(AU_EFFECTS) == set(facs.ALL_AUS)


def _emotion_of(record: Mapping) -> int:
  e = int(np.asarray(record.get("emotion", -1)))
  if e != -1 and not 0 <= e < len(facs.EMOTIONS):
    raise ValueError(f"record {record.get('id', '?')}: field 'emotion' = {e} is not an index into "
                     f"facs.EMOTIONS (or -1)")
  return e


def _au_present(record: Mapping) -> np.ndarray:
  p = record.get("au_present")
  if p is None:
    return np.full(len(facs.ALL_AUS), -1, np.int32)
  p = np.asarray(p).astype(np.int32)
  if p.shape != (len(facs.ALL_AUS),):
    raise ValueError(f"record {record.get('id', '?')}: field 'au_present' has shape "
                     f"{list(p.shape)}, expected [{len(facs.ALL_AUS)}] (facs.ALL_AUS)")
  if not np.all((p >= -1) & (p <= 1)):       # -1/0/1 (np.isin: 10x slower per record)
    raise ValueError(f"record {record.get('id', '?')}: field 'au_present' must hold -1/0/1")
  return p


def active_aus(record: Mapping) -> list[int]:
  return [au for au, v in zip(facs.ALL_AUS, _au_present(record)) if v == 1]


def evidence_aus(emotion: int | str, aus: Sequence[int]) -> list[int]:
  """The active AUs that belong to the emotion's EMFACS prototype (what reasoning cites)."""
  proto = facs.EMFACS_PROTOTYPES[facs.emotion_name(emotion)]
  return [a for a in sorted(aus) if a in proto]


def available_tasks(record: Mapping) -> tuple[str, ...]:
  """Tasks the record's labels support.

  fer needs an emotion; aur needs at least one annotated AU; joint needs both; reasoning needs
  both and an EMFACS-consistent story (a non-neutral emotion with at least one active prototype
  AU, or neutral with no active prototype AU).
  """
  e = _emotion_of(record)
  annotated = bool(np.any(_au_present(record) >= 0))
  out = []
  if e >= 0:
    out.append("fer")
  if annotated:
    out.append("aur")
  if e >= 0 and annotated:
    out.append("joint")
    aus = active_aus(record)
    name = facs.EMOTIONS[e]
    if (name == "neutral" and not set(aus) & facs.PROTOTYPE_AUS) or evidence_aus(e, aus):
      out.append("reasoning")
  return tuple(out)


# --- canonical answer formatting ----------------------------------------------------------------

def format_au(au: int) -> str:
  return f"AU{int(au)} ({facs.au_name(au)})"


def _join(items: Sequence[str]) -> str:
  items = list(items)
  if len(items) <= 1:
    return "".join(items)
  return ", ".join(items[:-1]) + " and " + items[-1]


def answer_emotion(emotion: int | str) -> str:
  """'Happiness.'"""
  return facs.emotion_name(emotion).capitalize() + "."


def answer_aus(aus: Sequence[int]) -> str:
  """'AU6 (cheek raiser), AU12 (lip corner puller).' or 'No action units are active.'"""
  aus = sorted({int(a) for a in aus})
  if not aus:
    return NO_AUS
  return ", ".join(format_au(a) for a in aus) + "."


def answer_joint(emotion: int | str, aus: Sequence[int]) -> str:
  aus = sorted({int(a) for a in aus})
  tail = NO_AUS if not aus else "Active action units: " + answer_aus(aus)
  return f"{answer_emotion(emotion)} {tail}"


def answer_reasoning(emotion: int | str, aus: Sequence[int], variant: int = 0) -> str:
  """Label, the prototype AUs that are active, their visible effects, the EMFACS link."""
  name = facs.emotion_name(emotion)
  head = answer_emotion(name)
  aus = sorted({int(a) for a in aus})
  if name == "neutral":
    if set(aus) & facs.PROTOTYPE_AUS:
      raise ValueError(f"neutral with prototype AUs {sorted(set(aus) & facs.PROTOTYPE_AUS)} "
                       "has no EMFACS-consistent explanation")
    if aus:
      return (f"{head} Only {_join([format_au(a) for a in aus])} "
              f"{'is' if len(aus) == 1 else 'are'} active, which signals no particular emotion; "
              "the face is otherwise relaxed.")
    return f"{head} No action units are active: the brows, eyes and mouth are relaxed."
  ev = evidence_aus(name, aus)
  if not ev:
    raise ValueError(f"{name} with AUs {aus}: none belongs to its EMFACS prototype "
                     f"{sorted(facs.EMFACS_PROTOTYPES[name])}")
  # Markers first: they discriminate the emotion most.
  key = sorted(ev, key=lambda a: (a not in facs.EXCLUSIVE_AUS[name], a))
  listed = _join([format_au(a) for a in ev]) if len(ev) <= 3 else _join([f"AU{a}" for a in ev])
  effects = _join([AU_EFFECTS[a] for a in key[:3]])
  be = "is" if len(ev) == 1 else "are"
  them = "it" if len(ev) == 1 else "them"
  variant %= 3
  if variant == 0:
    body = f"{listed} {be} active: {effects}. EMFACS links {them} to {name}."
  elif variant == 1:
    body = f"The evidence is {listed}: {effects}, an EMFACS pattern of {name}."
  else:
    body = f"{effects[0].upper() + effects[1:]}, shown by {listed}; EMFACS links {them} to {name}."
  return f"{head} {body}"


def answer(record: Mapping, task: str, variant: int = 0) -> str:
  """The reference answer of a task for a record (the text the model learns to produce)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")
  if task not in available_tasks(record):
    raise ValueError(f"record {record.get('id', '?')}: task {task!r} needs labels it lacks "
                     f"(available: {available_tasks(record)})")
  e, aus = _emotion_of(record), active_aus(record)
  if task == "fer":
    return answer_emotion(e)
  if task == "aur":
    return answer_aus(aus)
  if task == "joint":
    return answer_joint(e, aus)
  return answer_reasoning(e, aus, variant)


def _rng(rng_or_seed) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng(rng_or_seed)


def make_conversation(record: Mapping, task: str, rng_or_seed=0) -> list[dict]:
  """LLaVA-format [human, gpt] turns for one task, prompt phrasing drawn from rng_or_seed."""
  rng = _rng(rng_or_seed)
  reply = answer(record, task, variant=int(rng.integers(3)))
  prompts = PROMPTS[task]
  prompt = prompts[int(rng.integers(len(prompts)))]
  return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": reply}]


def sample_conversation(record: Mapping, rng_or_seed=0,
                        tasks: Sequence[str] = TASKS) -> tuple[str, list[dict]]:
  """A random task among those available (and allowed), with its conversation."""
  rng = _rng(rng_or_seed)
  choices = [t for t in available_tasks(record) if t in tasks]
  if not choices:
    raise ValueError(f"record {record.get('id', '?')}: no task among {tuple(tasks)} is "
                     f"supported by its labels")
  task = choices[int(rng.integers(len(choices)))]
  return task, make_conversation(record, task, rng)


def to_json(conversation: list[dict]) -> str:
  return json.dumps(conversation, ensure_ascii=False)


# --- reading answers back ------------------------------------------------------------------------

_AU_RE = re.compile(r"\bAU\s?(\d{1,2})\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z]+")


def parse_emotion(text: str) -> int:
  """Emotion index named by an answer (its leading label, else the first emotion word), or -1."""
  text = text.strip()
  first = text.split(".", 1)[0].split(",", 1)[0]
  name = facs.normalize_emotion(first)
  if name is None:
    for word in _WORD_RE.findall(text):
      name = facs.normalize_emotion(word)
      if name is not None:
        break
  return facs.emotion_index(name) if name is not None else -1


def parse_aus(text: str) -> list[int]:
  """AU ids named in an answer ('AU12', 'AU 6'), sorted and unique; unknown numbers dropped."""
  found = {int(m) for m in _AU_RE.findall(text)}
  return sorted(a for a in found if a in facs.AU_TABLE)
