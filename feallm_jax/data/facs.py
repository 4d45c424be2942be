"""Facial Action Coding System tables: action units, emotion label sets, EMFACS prototypes.

Every dataset, the synthetic renderer, the instruction templates and the evaluator's answer
parser share these tables, so a label means the same thing everywhere.

Sources:
  * AU names and muscles: Ekman & Friesen, *Facial Action Coding System* (FACS), Consulting
    Psychologists Press, 1978 (names as in the 2002 manual by Ekman, Friesen & Hager).
  * Emotion prototypes: EMFACS-7 (Friesen & Ekman, *EMFACS-7: Emotional Facial Action Coding
    System*, 1983), the commonly cited core combinations:
      happiness 6+12, sadness 1+4+15, surprise 1+2+5+26, fear 1+2+4+5+7+20+26,
      anger 4+5+7+23, disgust 9+15+16, contempt unilateral (R/L) 12+14.
  * RAF-DB label order: Li, Deng & Du, CVPR 2017 (1 Surprise, 2 Fear, 3 Disgust, 4 Happiness,
    5 Sadness, 6 Anger, 7 Neutral). AffectNet order: Mollahosseini et al., 2017
    (0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt).
"""
from __future__ import annotations

import numbers
import re
from typing import Iterable, Mapping

# AU id -> (name, muscular basis), FACS 1978/2002.
AU_TABLE: Mapping[int, tuple[str, str]] = {
    1: ("inner brow raiser", "frontalis, pars medialis"),
    2: ("outer brow raiser", "frontalis, pars lateralis"),
    4: ("brow lowerer", "corrugator supercilii, depressor supercilii, procerus"),
    5: ("upper lid raiser", "levator palpebrae superioris"),
    6: ("cheek raiser", "orbicularis oculi, pars orbitalis"),
    7: ("lid tightener", "orbicularis oculi, pars palpebralis"),
    9: ("nose wrinkler", "levator labii superioris alaeque nasi"),
    10: ("upper lip raiser", "levator labii superioris"),
    11: ("nasolabial deepener", "zygomaticus minor"),
    12: ("lip corner puller", "zygomaticus major"),
    13: ("sharp lip puller", "levator anguli oris (caninus)"),
    14: ("dimpler", "buccinator"),
    15: ("lip corner depressor", "depressor anguli oris (triangularis)"),
    16: ("lower lip depressor", "depressor labii inferioris"),
    17: ("chin raiser", "mentalis"),
    18: ("lip pucker", "incisivii labii superioris and inferioris"),
    20: ("lip stretcher", "risorius with platysma"),
    22: ("lip funneler", "orbicularis oris"),
    23: ("lip tightener", "orbicularis oris"),
    24: ("lip pressor", "orbicularis oris"),
    25: ("lips part", "depressor labii inferioris, relaxed mentalis or orbicularis oris"),
    26: ("jaw drop", "masseter relaxed; temporalis and internal pterygoid relaxed"),
    27: ("mouth stretch", "pterygoids, digastric"),
    28: ("lip suck", "orbicularis oris"),
    43: ("eyes closed", "relaxed levator palpebrae superioris; orbicularis oculi, pars palpebralis"),
    45: ("blink", "relaxed levator palpebrae superioris; orbicularis oculi, pars palpebralis"),
}

ALL_AUS: tuple[int, ...] = tuple(sorted(AU_TABLE))
_AU_INDEX = {au: i for i, au in enumerate(ALL_AUS)}

# Canonical emotion names; records store indices into this tuple. The first seven follow
# RAF-DB's official label order (label k -> index k-1); contempt (AffectNet only) is index 7.
EMOTIONS: tuple[str, ...] = (
    "surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral", "contempt")
_EMOTION_INDEX = {e: i for i, e in enumerate(EMOTIONS)}

# Dataset label sets: the dataset's own class order, as canonical names.
RAF_DB: tuple[str, ...] = EMOTIONS[:7]
AFFECTNET_8: tuple[str, ...] = (
    "neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
AFFECTNET_7: tuple[str, ...] = AFFECTNET_8[:7]
BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 6, 9, 12, 25, 26)
LABEL_SETS: Mapping[str, tuple] = {
    "raf_db": RAF_DB, "affectnet_7": AFFECTNET_7, "affectnet_8": AFFECTNET_8,
    "bp4d": BP4D_AUS, "disfa": DISFA_AUS,
}

# EMFACS-7 core prototypes. Contempt is unilateral in EMFACS (R12A+R14A); the AU set is the same.
EMFACS_PROTOTYPES: Mapping[str, frozenset[int]] = {
    "happiness": frozenset({6, 12}),
    "sadness": frozenset({1, 4, 15}),
    "surprise": frozenset({1, 2, 5, 26}),
    "fear": frozenset({1, 2, 4, 5, 7, 20, 26}),
    "anger": frozenset({4, 5, 7, 23}),
    "disgust": frozenset({9, 15, 16}),
    "contempt": frozenset({12, 14}),
    "neutral": frozenset(),
}
UNILATERAL_EMOTIONS = frozenset({"contempt"})


def _exclusive(emotion: str) -> frozenset[int]:
  others = set().union(*(p for e, p in EMFACS_PROTOTYPES.items() if e != emotion))
  return frozenset(EMFACS_PROTOTYPES[emotion] - others)


# AUs that appear in exactly one emotion's prototype ("markers"): happiness {6}, fear {20},
# anger {23}, disgust {9, 16}, contempt {14}. Sadness and surprise have none (their AUs are
# all shared with fear / anger / disgust).
EXCLUSIVE_AUS: Mapping[str, frozenset[int]] = {e: _exclusive(e) for e in EMFACS_PROTOTYPES}
PROTOTYPE_AUS: frozenset[int] = frozenset().union(*EMFACS_PROTOTYPES.values())


def au_name(au: int) -> str:
  """FACS name of an AU, e.g. 12 -> 'lip corner puller'."""
  try:
    return AU_TABLE[int(au)][0]
  except KeyError:
    raise ValueError(f"unknown action unit AU{au}; known: {ALL_AUS}") from None


def au_muscle(au: int) -> str:
  try:
    return AU_TABLE[int(au)][1]
  except KeyError:
    raise ValueError(f"unknown action unit AU{au}; known: {ALL_AUS}") from None


def au_index(au: int) -> int:
  """Position of an AU in ALL_AUS (the axis of au_present / au_intensity arrays)."""
  try:
    return _AU_INDEX[int(au)]
  except KeyError:
    raise ValueError(f"unknown action unit AU{au}; known: {ALL_AUS}") from None


def emotion_index(emotion: str | int) -> int:
  """Index into EMOTIONS of a canonical name, a synonym ('happy') or an index."""
  if isinstance(emotion, numbers.Integral) and not isinstance(emotion, bool):
    if not 0 <= emotion < len(EMOTIONS):
      raise ValueError(f"emotion index {emotion} out of range [0, {len(EMOTIONS)})")
    return int(emotion)
  name = normalize_emotion(str(emotion))
  if name is None:
    raise ValueError(f"unknown emotion {emotion!r}; known: {EMOTIONS}")
  return _EMOTION_INDEX[name]


def emotion_name(emotion: str | int) -> str:
  return EMOTIONS[emotion_index(emotion)]


def dataset_label_to_index(label_set: str | tuple, label: int, *, one_based: bool = False) -> int:
  """Map a dataset's class id to an EMOTIONS index (RAF-DB files use 1-based labels)."""
  names = LABEL_SETS[label_set] if isinstance(label_set, str) else label_set
  k = int(label) - (1 if one_based else 0)
  if not 0 <= k < len(names) or not isinstance(names[0], str):
    raise ValueError(f"label {label} outside emotion label set {names}")
  return _EMOTION_INDEX[names[k]]


# --- synonyms used by the answer parser -------------------------------------------------------

EMOTION_SYNONYMS: Mapping[str, str] = {
    **{e: e for e in EMOTIONS},
    "happy": "happiness", "joy": "happiness", "joyful": "happiness", "glad": "happiness",
    "pleased": "happiness", "cheerful": "happiness", "delighted": "happiness",
    "happily": "happiness",
    "sad": "sadness", "unhappy": "sadness", "sorrow": "sadness", "sorrowful": "sadness",
    "grief": "sadness", "depressed": "sadness", "sadly": "sadness",
    "surprised": "surprise", "astonished": "surprise", "astonishment": "surprise",
    "amazed": "surprise", "amazement": "surprise", "shocked": "surprise",
    "fearful": "fear", "afraid": "fear", "scared": "fear", "frightened": "fear",
    "terrified": "fear", "terror": "fear", "anxious": "fear",
    "disgusted": "disgust", "revulsion": "disgust", "repulsed": "disgust",
    "angry": "anger", "mad": "anger", "furious": "anger", "rage": "anger", "annoyed": "anger",
    "irritated": "anger", "angrily": "anger",
    "calm": "neutral", "expressionless": "neutral", "neutrality": "neutral",
    "contemptuous": "contempt", "disdain": "contempt", "scorn": "contempt",
    "scornful": "contempt", "disdainful": "contempt",
}


def normalize_emotion(text: str) -> str | None:
  """Canonical emotion for a word or short phrase ('Joyful.' -> 'happiness'), else None."""
  word = re.sub(r"[^a-z ]", "", text.strip().lower()).strip()
  return EMOTION_SYNONYMS.get(word)


def _au_aliases() -> dict[str, int]:
  table = {name: au for au, (name, _) in AU_TABLE.items()}
  extra = {
      "inner brow raise": 1, "inner brow raising": 1, "raised inner brows": 1,
      "outer brow raise": 2, "outer brow raising": 2, "raised outer brows": 2,
      "brow lower": 4, "brow lowering": 4, "brow furrow": 4, "brow furrower": 4,
      "lowered brows": 4, "furrowed brows": 4,
      "upper lid raise": 5, "upper eyelid raiser": 5, "lid raiser": 5, "raised upper lids": 5,
      "cheek raise": 6, "raised cheeks": 6, "lid tighten": 7, "eyelid tightener": 7,
      "lid tightening": 7, "tightened lids": 7, "nose wrinkle": 9, "nose wrinkling": 9,
      "wrinkled nose": 9, "upper lip raise": 10, "raised upper lip": 10,
      "lip corner pull": 12, "lip corner pulling": 12, "lip corners pulled up": 12,
      "cheek puffer": 13, "dimple": 14, "dimpling": 14,
      "lip corner depress": 15, "lip corner depression": 15, "lip corners pulled down": 15,
      "lower lip depress": 16, "lowered lower lip": 16, "chin raise": 17, "raised chin": 17,
      "lip stretch": 20, "lip stretching": 20, "stretched lips": 20,
      "lip funnel": 22, "lip tighten": 23, "lip tightening": 23, "tightened lips": 23,
      "lip press": 24, "lip pressing": 24, "pressed lips": 24, "lip presser": 24,
      "lips parted": 25, "lip part": 25, "parted lips": 25, "lips apart": 25,
      "jaw dropped": 26, "dropped jaw": 26, "mouth stretched": 27, "eye closure": 43,
      "closed eyes": 43, "eyes close": 43,
  }
  for alias, au in extra.items():
    assert au in AU_TABLE, alias
    table[alias] = au
  return table


AU_ALIASES: Mapping[str, int] = _au_aliases()


def au_from_name(text: str) -> int | None:
  """AU id for a FACS name or alias ('Lip corner puller' -> 12), else None."""
  key = " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())
  return AU_ALIASES.get(key)


# --- EMFACS consistency ------------------------------------------------------------------------

def emfacs_consistent(emotion: str | int, aus: Iterable[int]) -> bool:
  """Whether named AUs are consistent with a named emotion under EMFACS.

  The rule (used by the evaluator for reasoning answers and by the instruction generator):
    * neutral: no named AU belongs to any emotion prototype (AUs outside every prototype, e.g.
      25 lips part or 43 eyes closed, are allowed);
    * any other emotion: the named AUs include at least one AU of its prototype, AND none of
      them is a marker of a conflicting emotion, where a marker is an AU that belongs to
      exactly one prototype (EXCLUSIVE_AUS: 6 happiness, 20 fear, 23 anger, 9/16 disgust,
      14 contempt). AUs shared by several prototypes (1, 2, 4, 5, 7, 12, 15, 26) or in no
      prototype never make an answer inconsistent on their own.
  So "happiness: AU6, AU12" and "fear: AU1, AU4, AU20" are consistent; "happiness: AU4" (no
  prototype AU) and "sadness: AU1, AU15, AU23" (23 marks anger) are not.
  """
  name = emotion_name(emotion)
  named = {int(a) for a in aus}
  unknown = named - set(ALL_AUS)
  if unknown:
    raise ValueError(f"unknown action units {sorted(unknown)}; known: {ALL_AUS}")
  if name == "neutral":
    return not (named & PROTOTYPE_AUS)
  if not named & EMFACS_PROTOTYPES[name]:
    return False
  for other, markers in EXCLUSIVE_AUS.items():
    if other != name and named & markers:
      return False
  return True


def conflicting_aus(emotion: str | int) -> frozenset[int]:
  """AUs whose presence makes any AU set inconsistent with `emotion` (other emotions' markers)."""
  name = emotion_name(emotion)
  if name == "neutral":
    return PROTOTYPE_AUS
  return frozenset().union(*(m for e, m in EXCLUSIVE_AUS.items() if e != name))
