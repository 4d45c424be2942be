"""Turns free-text answers into labels: the emotion a reply names and the action units it lists.

A model's answer is open text ("Happiness. The cheeks are raised (AU6) ..."), so every metric
depends on reading it the same way. Rules, in order of precedence:

* Emotion: the first emotion word (or synonym, from ``facs.EMOTION_SYNONYMS``) that is not
  negated. A mention is negated when a negator ("not", "no", "without", "rather than", "unlike",
  "instead of", "n't" …) occurs earlier in the same clause (clauses end at . , ; : ! ? and at
  "but" / "although" / "while"). "No emotion" / "no expression" means neutral.
* AUs: numbers ("AU12", "AU 12", "au-12", "AUs 1, 2 and 4", "AU1+2", "action unit 12",
  "action units 6 and 12") and FACS names or aliases ("lip corner puller", from
  ``facs.AU_ALIASES``), again dropping negated mentions ("no AU4", "AU4 is absent"). "No action
  units" (and the like) is a valid, empty answer.
* An answer with nothing readable is *unparseable*: the parser returns ``None`` for that field
  and the caller counts it (as a wrong answer); it never raises on model output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from feallm_jax.data import facs

# Words that negate a later mention in the same clause.
_NEGATORS = (
    r"not|no|never|without|neither|nor|none|lacks?|lacking|absence|absent|"
    r"isn't|isnt|aren't|arent|doesn't|doesnt|don't|dont|wasn't|wasnt|cannot|can't|"
    r"rather\s+than|instead\s+of|unlike|other\s+than|free\s+of|devoid\s+of|ruled?\s+out|"
    r"excluding|except")
_NEGATOR_RE = re.compile(rf"\b(?:{_NEGATORS})\b|n't\b")
# Words right after a mention that negate it ("AU4 (brow lowerer) is absent", "anger is not
# present"); only a parenthetical may sit between the mention and the negation.
_POST_NEGATION_RE = re.compile(
    r"^\s*\)?\s*(?:\([^)]*\)\s*)?(?:is|are|was|were|seems?|appears?|remains?)?\s*"
    r"(?:absent|not\s+(?:present|active|visible|shown|activated|observed|detected|engaged|"
    r"evident|seen)|inactive|missing)\b")
# How many words before a mention a negator may sit ("does not appear to be angry").
_NEGATION_WINDOW = 5
# Clause boundaries: a negation does not reach across them.
_CLAUSE_RE = re.compile(r"[.;:!?,\n]|\b(?:but|although|though|however|while|whereas|yet)\b")
_NEUTRAL_PHRASE_RE = re.compile(
    r"\b(?:no|without|lacks?|lacking|absence\s+of)\s+(?:(?:particular|clear|obvious|visible|"
    r"discernible|apparent|strong|specific|any)\s+)*(?:emotion|emotions|expression|"
    r"emotional\s+expression|feelings?)\b")
_NO_AUS_RE = re.compile(
    r"\b(?:no|none\s+of\s+the|without\s+any|without|zero|not\s+any)\s+"
    r"(?:(?:active|activated|visible|apparent|facial|detectable|detected|clear|other|annotated)\s+)*"
    r"(?:action\s+units?|aus?)\b|\b(?:action\s+units?|aus?)\s*:\s*none\b|"
    r"\bno\s+(?:au|action\s+unit)\s+(?:is|are)\s+(?:active|present|activated)\b")
# "AU12", "AU 12", "au-12", "AUs 1, 2 and 4", "AU1+2", "action unit 12", "action units 6, 12".
_AU_NUM_RE = re.compile(
    r"\b(?:aus?|action\s+units?)\s*[-#:]?\s*"
    r"(\d{1,2}[a-e]?(?:\s*(?:,|\+|/|&|and|or|,\s*and)\s*(?:au\s*-?\s*)?\d{1,2}[a-e]?)*)\b")
_NUM_RE = re.compile(r"\d{1,2}")


@dataclasses.dataclass(frozen=True)
class Mention:
  """One label mention in an answer: its value, where it starts, whether it is negated."""
  value: str | int
  start: int
  end: int
  negated: bool


def _normalize(text: str) -> str:
  text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
  return text


def _clause_start(text: str, pos: int) -> int:
  """Start of the clause that contains ``pos``."""
  start = 0
  for m in _CLAUSE_RE.finditer(text, 0, pos):
    start = m.end()
  return start


def _is_negated(text: str, start: int, end: int) -> bool:
  """A negator among the few words before the mention (same clause), or one right after it."""
  words = text[_clause_start(text, start):start].split()
  if _NEGATOR_RE.search(" ".join(words[-_NEGATION_WINDOW:])):
    return True
  return bool(_POST_NEGATION_RE.match(text[end:end + 60]))


# Emotion words sorted longest first so a phrase beats its substrings.
_EMOTION_WORD_RE = re.compile(
    r"\b(" + "|".join(sorted((re.escape(w) for w in facs.EMOTION_SYNONYMS), key=len, reverse=True))
    + r")\b")


def emotion_mentions(text: str) -> list[Mention]:
  """Every emotion mention (canonical name), with its negation flag, in reading order."""
  text = _normalize(text)
  out = []
  for m in _NEUTRAL_PHRASE_RE.finditer(text):
    out.append(Mention("neutral", m.start(), m.end(), False))
  for m in _EMOTION_WORD_RE.finditer(text):
    if any(o.start <= m.start() < o.end for o in out):
      continue
    out.append(Mention(facs.EMOTION_SYNONYMS[m.group(1)], m.start(), m.end(),
                       _is_negated(text, m.start(), m.end())))
  return sorted(out, key=lambda o: o.start)


def parse_emotion(text: str, labels: Sequence[str] = facs.EMOTIONS) -> str | None:
  """The first non-negated emotion in ``labels`` that the answer names, else ``None``.

  A mention outside ``labels`` (e.g. "contempt" in a 7-way RAF-DB evaluation) is skipped, so an
  answer naming only out-of-set emotions is unparseable for that label set.
  """
  allowed = set(labels)
  for mention in emotion_mentions(text or ""):
    if not mention.negated and mention.value in allowed:
      return str(mention.value)
  return None


def _phrase_pattern(phrase: str) -> str:
  """A phrase whose words may be separated by any whitespace or a hyphen."""
  return r"[\s\-]+".join(re.escape(w) for w in phrase.split())


_AU_ALIAS_KEYS = sorted(facs.AU_ALIASES, key=len, reverse=True)
_AU_NAME_RE = re.compile(r"\b(" + "|".join(_phrase_pattern(a) for a in _AU_ALIAS_KEYS) + r")\b")


def au_mentions(text: str) -> list[Mention]:
  """Every AU mention (number or FACS name), with its negation flag, in reading order."""
  text = _normalize(text)
  out: list[Mention] = []
  for m in _AU_NUM_RE.finditer(text):
    negated = _is_negated(text, m.start(), m.end())
    for n in _NUM_RE.finditer(m.group(1)):
      au = int(n.group(0))
      if au in facs.AU_TABLE:
        out.append(Mention(au, m.start(), m.end(), negated))
  for m in _AU_NAME_RE.finditer(text):
    au = facs.au_from_name(m.group(1))
    if au is not None:
      out.append(Mention(au, m.start(), m.end(), _is_negated(text, m.start(), m.end())))
  return sorted(out, key=lambda o: o.start)


def says_no_aus(text: str) -> bool:
  """Whether the answer states that no action unit is active."""
  return bool(_NO_AUS_RE.search(_normalize(text or "")))


def parse_aus(text: str, au_set: Iterable[int] | None = None) -> frozenset[int] | None:
  """The set of AUs the answer names as present (restricted to ``au_set``), or ``None``.

  ``None`` means unparseable: no AU mention at all and no "no action units" statement. An
  answer whose only AUs are negated ("no AU4") parses to the empty set.
  """
  mentions = au_mentions(text or "")
  present = {int(m.value) for m in mentions if not m.negated}
  if not mentions and not says_no_aus(text or ""):
    return None
  if au_set is not None:
    present &= {int(a) for a in au_set}
  return frozenset(present)


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
  emotion: str | None
  aus: frozenset[int] | None


def parse_answer(text: str, labels: Sequence[str] = facs.EMOTIONS,
                 au_set: Iterable[int] | None = None) -> ParsedAnswer:
  """Emotion and AUs of one free-text answer (reasoning task); either may be ``None``."""
  return ParsedAnswer(parse_emotion(text, labels), parse_aus(text, au_set))
