"""Conversations never contradict labels, phrasings vary, reasoning is EMFACS-consistent."""
import json

import numpy as np
import pytest

from feallm_jax.data import facs, instructions, synthetic

N = len(facs.ALL_AUS)


def _record(emotion, aus=(), annotated=True, rid="r"):
  p = np.zeros(N, np.int32) if annotated else np.full(N, -1, np.int32)
  for a in aus:
    p[facs.au_index(a)] = 1
  return dict(id=rid, emotion=emotion, au_present=p)


def test_available_tasks():
  assert instructions.available_tasks(_record(3, (6, 12))) == instructions.TASKS
  assert instructions.available_tasks(_record(-1, (6, 12))) == ("aur",)
  assert instructions.available_tasks(_record(3, annotated=False)) == ("fer",)
  # Happiness with no prototype AU active: no consistent reasoning.
  assert "reasoning" not in instructions.available_tasks(_record(3, (4,)))
  assert "reasoning" not in instructions.available_tasks(_record(6, (12,)))  # neutral + AU12
  assert "reasoning" in instructions.available_tasks(_record(6, ()))
  with pytest.raises(ValueError, match="r1.*reasoning"):
    instructions.make_conversation(_record(3, (4,), rid="r1"), "reasoning", 0)
  with pytest.raises(ValueError, match="au_present"):
    instructions.available_tasks(dict(id="x", emotion=1, au_present=np.zeros(3)))
  with pytest.raises(ValueError, match="emotion"):
    instructions.available_tasks(dict(id="x", emotion=12, au_present=np.zeros(N)))


def test_canonical_formats():
  assert instructions.answer_emotion(3) == "Happiness."
  assert instructions.answer_aus([12, 6]) == "AU6 (cheek raiser), AU12 (lip corner puller)."
  assert instructions.answer_aus([]) == "No action units are active."
  assert instructions.answer_joint("happy", [6, 12]) == (
      "Happiness. Active action units: AU6 (cheek raiser), AU12 (lip corner puller).")
  r = instructions.answer_reasoning("happiness", [6, 12, 25])
  assert r.startswith("Happiness. ") and "AU25" not in r and "AU6" in r and "AU12" in r


def test_conversation_format():
  conv = instructions.make_conversation(_record(3, (6, 12)), "joint", 0)
  assert [t["from"] for t in conv] == ["human", "gpt"]
  assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
  assert json.loads(instructions.to_json(conv)) == conv
  assert conv == instructions.make_conversation(_record(3, (6, 12)), "joint", 0)  # deterministic


def test_phrasings_vary():
  rec = _record(4, (1, 4, 15))
  for task in instructions.TASKS:
    prompts = {instructions.make_conversation(rec, task, s)[0]["value"] for s in range(40)}
    assert len(prompts) >= 4, task
  answers = {instructions.make_conversation(rec, "reasoning", s)[1]["value"] for s in range(40)}
  assert len(answers) == 3


def test_answers_round_trip_on_synthetic_records():
  """Parse emotion/AUs back out of every task's answer and compare with the labels."""
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(120):
    emotion = facs.EMOTIONS[i % 8]
    aus = synthetic.sample_expression(rng, emotion)
    rec = _record(facs.emotion_index(emotion), aus)
    active = sorted(aus)
    for task in instructions.available_tasks(rec):
      conv = instructions.make_conversation(rec, task, i)
      text = conv[1]["value"]
      words = len(text.split())
      assert words <= 50, (task, text)
      seen.add(task)
      if task in ("fer", "joint", "reasoning"):
        assert text.startswith(emotion.capitalize() + "."), text
        assert instructions.parse_emotion(text) == rec["emotion"], text
      if task == "aur":
        assert instructions.parse_aus(text) == active, text
        assert instructions.parse_emotion(text) == -1 or not active, text
      if task == "joint":
        assert instructions.parse_aus(text) == active, text
      if task == "reasoning":
        named = instructions.parse_aus(text)
        assert set(named) <= set(active), text
        assert facs.emfacs_consistent(emotion, named), text
        if emotion != "neutral":
          assert named, text
  assert seen == set(instructions.TASKS)


def test_parsers():
  assert instructions.parse_emotion("Joyful. The person smiles.") == facs.emotion_index("happiness")
  assert instructions.parse_emotion("I think the person looks angry.") == facs.emotion_index("anger")
  assert instructions.parse_emotion("Unclear.") == -1
  assert instructions.parse_aus("AU 6 and au12, plus AU99") == [6, 12]
  assert instructions.parse_aus(instructions.NO_AUS) == []


def test_sample_conversation():
  task, conv = instructions.sample_conversation(_record(-1, (1,)), 3)
  assert task == "aur" and "AU1 (inner brow raiser)" in conv[1]["value"]
  tasks = {instructions.sample_conversation(_record(0, (1, 2)), s)[0] for s in range(30)}
  assert tasks == set(instructions.TASKS)
  with pytest.raises(ValueError, match="no task"):
    instructions.sample_conversation(_record(-1, annotated=False, rid="z"), 0)
