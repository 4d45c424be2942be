"""FACS tables: label orders, prototypes, the EMFACS consistency rule and the parser tables."""
import numpy as np
import pytest

from feallm_jax.data import facs


def test_au_tables():
  for au in (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27, 43):
    assert au in facs.ALL_AUS
  assert list(facs.ALL_AUS) == sorted(facs.ALL_AUS)
  assert facs.au_name(12) == "lip corner puller"
  assert facs.au_name(6) == "cheek raiser"
  assert "zygomaticus major" in facs.au_muscle(12)
  assert facs.ALL_AUS[facs.au_index(17)] == 17
  assert facs.au_index(np.int64(1)) == 0
  with pytest.raises(ValueError, match="AU3"):
    facs.au_index(3)
  assert set(facs.BP4D_AUS) <= set(facs.ALL_AUS) and set(facs.DISFA_AUS) <= set(facs.ALL_AUS)
  for proto in facs.EMFACS_PROTOTYPES.values():
    assert proto <= set(facs.ALL_AUS)


def test_emotion_orders():
  assert facs.EMOTIONS[:7] == ("surprise", "fear", "disgust", "happiness", "sadness", "anger",
                               "neutral")
  assert facs.EMOTIONS[7] == "contempt"
  # RAF-DB labels are 1-based in the official files.
  assert facs.dataset_label_to_index("raf_db", 4, one_based=True) == facs.emotion_index("happy")
  assert facs.EMOTIONS[facs.dataset_label_to_index("affectnet_8", 7)] == "contempt"
  assert facs.EMOTIONS[facs.dataset_label_to_index("affectnet_7", 0)] == "neutral"
  with pytest.raises(ValueError):
    facs.dataset_label_to_index("affectnet_7", 7)
  assert len(facs.AFFECTNET_7) == 7 and len(facs.AFFECTNET_8) == 8
  assert facs.emotion_index(np.int32(3)) == 3
  with pytest.raises(ValueError, match="bored"):
    facs.emotion_index("bored")


def test_synonyms():
  assert facs.normalize_emotion("Joyful.") == "happiness"
  assert facs.normalize_emotion("mad") == "anger"
  assert facs.normalize_emotion("afraid") == "fear"
  assert facs.normalize_emotion("scared") == "fear"
  assert facs.normalize_emotion("table") is None
  assert facs.au_from_name("Lip corner puller") == 12
  assert facs.au_from_name("lip-corner  puller") == 12
  assert facs.au_from_name("brow furrow") == 4
  assert facs.au_from_name("jaw drop") == 26
  for au in facs.ALL_AUS:
    assert facs.au_from_name(facs.au_name(au)) == au


def test_exclusive_markers():
  assert facs.EXCLUSIVE_AUS["happiness"] == {6}
  assert facs.EXCLUSIVE_AUS["fear"] == {20}
  assert facs.EXCLUSIVE_AUS["anger"] == {23}
  assert facs.EXCLUSIVE_AUS["disgust"] == {9, 16}
  assert facs.EXCLUSIVE_AUS["contempt"] == {14}
  assert not facs.EXCLUSIVE_AUS["sadness"] and not facs.EXCLUSIVE_AUS["surprise"]


# EMFACS-7 prototypes (Friesen & Ekman 1983, EMFACS-7; as tabulated in the "Facial Action
# Coding System" article's emotion table, Wikipedia, after Matsumoto & Ekman): happiness 6+12,
# sadness 1+4+15, surprise 1+2+5B+26, fear 1+2+4+5+7+20+26, anger 4+5+7+23, disgust 9+15+16,
# contempt R12A+R14A (unilateral). Intensity and side letters dropped.
EMFACS_7 = {"happiness": {6, 12}, "sadness": {1, 4, 15}, "surprise": {1, 2, 5, 26},
            "fear": {1, 2, 4, 5, 7, 20, 26}, "anger": {4, 5, 7, 23}, "disgust": {9, 15, 16},
            "contempt": {12, 14}, "neutral": set()}


def test_emfacs_prototypes_are_the_published_table():
  assert {e: set(p) for e, p in facs.EMFACS_PROTOTYPES.items()} == EMFACS_7
  assert facs.UNILATERAL_EMOTIONS == {"contempt"}


def test_emfacs_consistent():
  for emotion, proto in EMFACS_7.items():
    assert facs.emfacs_consistent(emotion, proto), emotion
  assert facs.emfacs_consistent("happiness", [12])
  assert facs.emfacs_consistent("fear", [1, 4, 20])
  assert facs.emfacs_consistent("surprise", [1, 2, 25])  # 25 is in no prototype
  assert not facs.emfacs_consistent("happiness", [4])  # no prototype AU
  assert not facs.emfacs_consistent("happiness", [])
  assert not facs.emfacs_consistent("sadness", [1, 15, 23])  # 23 marks anger
  assert not facs.emfacs_consistent("anger", [4, 23, 6])  # 6 marks happiness
  assert not facs.emfacs_consistent("neutral", [12])
  assert facs.emfacs_consistent("neutral", [])
  assert facs.emfacs_consistent("neutral", [43])
  assert facs.emfacs_consistent(3, [6, 12])  # by index
  with pytest.raises(ValueError, match="3"):
    facs.emfacs_consistent("happiness", [3])
  for emotion in facs.EMOTIONS:
    proto = EMFACS_7[emotion]
    for au in facs.conflicting_aus(emotion):
      assert not facs.emfacs_consistent(emotion, set(proto) | {au})
