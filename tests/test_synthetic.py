"""Synthetic faces: record contract, determinism, split disjointness, AU geometry in pixels."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from feallm_jax.data import facs, regions, synthetic

R = {n: i for i, n in enumerate(regions.REGION_NAMES)}


def test_record_contract():
  r = synthetic.generate(0)
  assert set(r) == {"id", "image", "landmarks", "has_landmarks", "emotion", "au_present",
                    "au_intensity", "subject", "conversations"}
  assert r["image"].shape == (128, 128, 3) and r["image"].dtype == np.uint8
  assert r["landmarks"].shape == (68, 2) and r["landmarks"].dtype == np.float32
  assert np.all((r["landmarks"] > 0) & (r["landmarks"] < 1))
  assert r["has_landmarks"] is True and r["conversations"] == ""
  assert r["au_present"].shape == (len(facs.ALL_AUS),) and r["au_present"].dtype == np.int32
  assert r["au_intensity"].dtype == np.float32
  assert 0 <= int(r["emotion"]) < 7
  assert synthetic.generate(0, image_size=64)["image"].shape == (64, 64, 3)
  with pytest.raises(ValueError, match="split"):
    synthetic.generate(0, split="dev")
  with pytest.raises(ValueError, match="AU43"):
    synthetic.render(synthetic.make_identity("train", 0), {43: 3.0})


def test_deterministic():
  a, b = synthetic.generate(17, split="val", seed=3), synthetic.generate(17, split="val", seed=3)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
  assert a["id"] == b["id"] and a["subject"] == b["subject"]
  c = synthetic.generate(17, split="val", seed=4)
  assert not np.array_equal(a["image"], c["image"])


def test_splits_have_disjoint_identities():
  subjects = {s: {synthetic.generate(i, split=s)["subject"] for i in range(40)}
              for s in synthetic.SPLITS}
  assert not subjects["train"] & subjects["val"]
  assert not subjects["train"] & subjects["test"]
  assert not subjects["val"] & subjects["test"]
  assert len(subjects["train"]) > 30  # many identities
  a, b = synthetic.make_identity("train", 5), synthetic.make_identity("test", 5)
  assert a.face_w != b.face_w and a.subject != b.subject
  assert synthetic.make_identity("train", 5) == a


def test_labels_follow_the_sampling_rule():
  counts = np.zeros(len(facs.EMOTIONS), int)
  for i in range(140):
    r = synthetic.generate(i, split="train")
    e = facs.EMOTIONS[int(r["emotion"])]
    counts[int(r["emotion"])] += 1
    aus = synthetic.active_aus(r)
    inten = r["au_intensity"]
    assert set(aus) <= set(synthetic.RENDERED_AUS)
    np.testing.assert_array_equal(r["au_present"], (inten >= 1).astype(np.int32))
    assert np.all(inten[inten > 0] >= synthetic.MIN_INTENSITY) and inten.max() <= 5
    assert facs.emfacs_consistent(e, aus), (e, aus)
    assert synthetic.REQUIRED_AUS[e] <= set(aus)
    proto = facs.EMFACS_PROTOTYPES[e]
    assert len(proto - set(aus)) <= 1
    if 26 in aus or 16 in aus:
      assert 25 in aus
    if e == "neutral":
      assert not aus
  assert np.all(counts[:7] == 20)  # balanced blocks of 7


def test_contempt_is_unilateral():
  rng = np.random.default_rng(0)
  aus = synthetic.sample_expression(rng, "contempt")
  assert set(aus) >= {12, 14}
  ident = synthetic.make_identity("train", 3)
  img, lm = synthetic.render(ident, aus, unilateral=True, lighting=False)
  _, lm0 = synthetic.render(ident, {}, lighting=False)
  # Subject's right corner (point 48, image left) rises; the left corner (54) does not.
  assert lm[48, 1] < lm0[48, 1] - 0.02
  assert abs(lm[54, 1] - lm0[54, 1]) < 0.01


def _box_density(diff, box):
  S = diff.shape[0]
  y0, x0, y1, x1 = (np.asarray(box) * S).round().astype(int)
  return float(diff[y0:y1, x0:x1].mean())


EXPECTED = {
    1: ("forehead", "glabella"), 2: ("forehead", "right_brow"), 4: ("glabella", "left_brow"),
    5: ("right_eye", "left_eye"), 6: ("right_cheek", "left_cheek"), 7: ("right_eye", "left_eye"),
    9: ("nose_bridge",), 10: ("upper_lip", "right_nasolabial"),
    12: ("right_mouth_corner", "left_mouth_corner", "right_nasolabial"),
    14: ("right_mouth_corner", "left_mouth_corner"), 15: ("right_mouth_corner",),
    16: ("lower_lip",), 17: ("chin", "lower_lip"), 20: ("right_mouth_corner", "left_mouth_corner"),
    23: ("upper_lip", "lower_lip"), 24: ("upper_lip", "lower_lip"), 25: ("lower_lip",),
    26: ("lower_lip", "chin"),
}
UPPER = ("forehead", "right_brow", "left_brow", "glabella", "right_eye", "left_eye")
LOWER = ("upper_lip", "lower_lip", "right_mouth_corner", "left_mouth_corner", "chin")


@pytest.mark.parametrize("subject", [2, 11])
def test_each_au_changes_its_own_region(subject):
  """At 64 px (what the model sees), each AU changes its region, and not the far half of the face."""
  ident = synthetic.make_identity("train", subject)
  def img64(aus):
    im, _ = synthetic.render(ident, aus, image_size=128, lighting=False)
    return np.asarray(Image.fromarray(im).resize((64, 64), Image.BILINEAR), np.float32)
  base = img64({})
  boxes = regions.boxes_from_landmarks(synthetic.render(ident, {}, lighting=False)[1])
  assert set(EXPECTED) == set(synthetic.RENDERED_AUS)
  for au, names in EXPECTED.items():
    strong = np.abs(img64({au: 5.0}) - base).mean(-1)
    weak = np.abs(img64({au: 2.0}) - base).mean(-1)
    own = max(_box_density(strong, boxes[R[n]]) for n in names)
    far_names = LOWER if au in (1, 2, 4, 5, 6, 7) else ("chin",) if au == 9 else UPPER
    far = max(_box_density(strong, boxes[R[n]]) for n in far_names)
    assert own > 3.0, (au, own)                      # clearly visible at 64 px
    assert own > 4 * far + 0.5, (au, own, far)       # local to its region
    assert own > max(_box_density(weak, boxes[R[n]]) for n in names), au  # intensity matters
  # AU12 specifically: mouth corners change far more than the brows.
  d12 = np.abs(img64({12: 4.0}) - base).mean(-1)
  corner = _box_density(d12, boxes[R["right_mouth_corner"]])
  brow = _box_density(d12, boxes[R["right_brow"]])
  assert corner > 10 * brow + 1


def test_neutral_landmarks_match_canonical_layout():
  lms = [synthetic.render(synthetic.make_identity("train", i), {}, lighting=False)[1]
         for i in range(20)]
  err = np.abs(np.mean(lms, 0) - regions.CANONICAL_LANDMARKS68).max()
  assert err < 0.03


def test_throughput():
  n = 60
  t0 = time.perf_counter()
  for i in range(n):
    synthetic.generate(i, split="test")
  rate = n / (time.perf_counter() - t0)
  print(f"synthetic faces/s: {rate:.0f}")
  assert rate > 40  # ~150-200/s on one idle core; loose for a shared CI box


def test_contact_sheet_shows_each_emotion_it_names(tmp_path):
  """``launch/contact_sheet.py`` (a review script; writes nothing here): tile k shows, at
  256 px, a face whose label is the emotion written under it, with that face's own AUs."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "contact_sheet", os.path.join(os.path.dirname(__file__), "..", "launch", "contact_sheet.py"))
  cs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cs)
  sheet, picked = cs.contact_sheet()
  assert [e for e, _, _ in picked] == list(facs.EMOTIONS)
  px = np.asarray(sheet)
  for k, (e, i, aus) in enumerate(picked):
    r = synthetic.generate(i, emotions=facs.EMOTIONS)
    assert facs.EMOTIONS[int(r["emotion"])] == e and aus == list(synthetic.active_aus(r))
    y, x = (k // 4) * cs.TILE_H, (k % 4) * cs.TILE_W
    want = np.asarray(Image.fromarray(r["image"]).resize((cs.BIG, cs.BIG), Image.LANCZOS))
    np.testing.assert_array_equal(px[y:y + cs.BIG, x:x + cs.BIG], want)


def test_occurring_aus_are_exactly_what_the_sampler_switches_on():
  """The synthetic suite scores AU F1 over these: every one occurs, no other AU ever does."""
  rng = np.random.default_rng(0)
  seen = set()
  for i in range(3000):
    emotion = facs.RAF_DB[i % len(facs.RAF_DB)]
    seen |= {a for a, v in synthetic.sample_expression(rng, emotion).items() if v > 0}
  assert seen == set(synthetic.occurring_aus(facs.RAF_DB))
  assert 14 not in seen                      # the dimpler belongs to contempt only
  assert 14 in synthetic.occurring_aus(facs.AFFECTNET_8)
