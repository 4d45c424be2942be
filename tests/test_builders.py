"""Every builder from tiny fixture folders in the official layouts: labels, conversions, skips."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_fixtures as fx
from feallm_jax.data import builders, facs
from feallm_jax.data.builders import common


def _read(summary, split):
  b = builders.make_builder(summary["name"], summary["data_dir"], config=summary["config"])
  src = b.as_data_source(split=split)
  return {r["id"].decode(): r for r in (src[i] for i in range(len(src)))}


def _check_images(recs):
  for r in recs.values():
    img = r["image"]
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    assert min(img.shape[:2]) >= common.MIN_SIDE


def test_raf_db(tmp_path):
  truth = fx.make_raf_db(str(tmp_path / "raw"))
  s = builders.build("raf_db", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))
  assert s["splits"] == {"train": 6, "test": 3}
  assert s["skipped"] == {"train": {"unreadable": 2}}   # corrupt JPEG + truncated PNG
  for split in ("train", "test"):
    recs = _read(s, split)
    assert {k: int(r["emotion"]) for k, r in recs.items()} == truth[split]
    _check_images(recs)
    r = next(iter(recs.values()))
    assert (r["au_present"] == -1).all() and not r["has_landmarks"]
  report = json.load(open(os.path.join(s["path"], "skipped.json")))
  assert report["counts"] == {"train": {"unreadable": 2}}
  assert any("train_00007" in m for m in report["examples"]["train"])


def test_raf_db_malformed_line_names_file_and_line(tmp_path):
  fx.make_raf_db(str(tmp_path / "raw"), malformed_line=3)
  with pytest.raises(common.LabelFileError, match=r"list_patition_label\.txt:3: label 'happy'"):
    builders.build("raf_db", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))


def test_raf_db_original_without_faces_is_skipped_and_counted(tmp_path):
  raw = tmp_path / "raw"
  (raw / "EmoLabel").mkdir(parents=True)
  (raw / "Image" / "original").mkdir(parents=True)
  (raw / "EmoLabel" / "list_patition_label.txt").write_text(
      "train_00001.jpg 1\ntrain_00002.jpg 2\ntest_00001.jpg 3\n")
  for n in ("train_00001", "train_00002", "test_00001"):
    Image.new("RGB", (200, 160), (90, 120, 200)).save(raw / "Image" / "original" / f"{n}.jpg")
  with pytest.raises(ValueError, match=r"raf_db/(train|test): no usable example; skipped "
                     r"\{'no_face': \d\}.*no face found by the Haar cascade"):
    builders.build("raf_db", str(tmp_path / "data"), manual_dir=str(raw), config="original")


# The official AffectNet expression codes (AffectNet README; Mollahosseini, Hasani & Mahoor,
# "AffectNet", IEEE T-AFFC 2017): 0 Neutral, 1 Happiness, 2 Sadness, 3 Surprise, 4 Fear,
# 5 Disgust, 6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face.
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
                   5: "disgust", 6: "anger", 7: "contempt"}


def test_affectnet_7_and_8_class(tmp_path):
  truth = fx.make_affectnet(str(tmp_path / "raw"))
  s8 = builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                      config="8class")
  # 8-class keeps contempt; 'uncertain' (9) is excluded and counted in both configs.
  assert s8["skipped"]["train"] == {"excluded_label": 1, "unreadable": 2}
  recs = _read(s8, "train")
  assert set(recs) == set(truth["train"])
  ann = tmp_path / "raw" / "train_set" / "annotations"
  codes = {k: int(str(np.load(ann / f"{k.split('_')[1]}_exp.npy"))) for k in recs}
  assert set(codes.values()) == {0, 2, 3, 4, 5, 6, 7}      # the fixture's codes
  for k, r in recs.items():      # each record's label is its file's code, read by the table
    assert facs.EMOTIONS[int(r["emotion"])] == AFFECTNET_CODES[codes[k]], (k, codes[k])
  _check_images(recs)
  lm = recs["train_3"]["landmarks"]
  assert recs["train_3"]["has_landmarks"] and 0.0 <= lm.min() and lm.max() <= 1.0
  np.testing.assert_allclose(lm[0], [0.2, 0.3], atol=0.02)   # normalized to the image
  s7 = builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                      config="7class")
  assert s7["skipped"]["train"] == {"excluded_label": 2, "unreadable": 2}
  assert s7["splits"]["train"] == s8["splits"]["train"] - 1
  assert all(int(r["emotion"]) != facs.emotion_index("contempt")
             for r in _read(s7, "train").values())


def test_affectnet_bad_npy_names_file(tmp_path):
  fx.make_affectnet(str(tmp_path / "raw"))
  np.save(tmp_path / "raw" / "val_set" / "annotations" / "2_exp.npy", np.array("x"))
  with pytest.raises(common.LabelFileError, match=r"val_set/annotations/2_exp\.npy"):
    builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))


def test_bp4d_folds_and_occurrence(tmp_path):
  truth = fx.make_bp4d(str(tmp_path / "raw"))
  s = builders.build("bp4d", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                     config="cropped")
  assert s["splits"] == {"fold1": 3, "fold2": 3, "fold3": 3}
  assert s["skipped"] == {"fold1": {"unreadable": 2}}
  for k in (1, 2, 3):
    recs = _read(s, f"fold{k}")
    _check_images(recs)
    for rid, r in recs.items():
      fold, pres = truth[rid]
      assert fold == f"fold{k}"
      np.testing.assert_array_equal(r["au_present"], pres)
      assert r["au_present"][facs.au_index(2)] == -1          # 9 = unknown
      assert r["subject"].decode() == rid[:4]
  # the fold lists are subject-exclusive and cover the 41 BP4D subjects
  subjects = [s for f in common.BP4D_FOLDS for s in f]
  assert len(subjects) == len(set(subjects)) == 41


def test_bp4d_malformed_row(tmp_path):
  fx.make_bp4d(str(tmp_path / "raw"), malformed=True)
  with pytest.raises(common.LabelFileError, match=r"M011_T1\.csv:3: 3 fields"):
    builders.build("bp4d", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                   config="cropped")


def test_disfa_intensity_and_threshold(tmp_path):
  truth = fx.make_disfa(str(tmp_path / "raw"))
  s = builders.build("disfa", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                     config="cropped")
  assert s["splits"] == {"fold1": 3, "fold2": 3, "fold3": 3}
  assert s["skipped"] == {"fold1": {"unreadable": 2}}
  for k in (1, 2, 3):
    for rid, r in _read(s, f"fold{k}").items():
      fold, inten = truth[rid]
      assert fold == f"fold{k}"
      np.testing.assert_array_equal(r["au_intensity"], inten)
      want = np.where(inten < 0, -1, (inten >= 2).astype(np.int32))
      np.testing.assert_array_equal(r["au_present"], want)
  subjects = [s for f in common.DISFA_FOLDS for s in f]
  assert len(subjects) == len(set(subjects)) == 27


def test_disfa_malformed_line(tmp_path):
  fx.make_disfa(str(tmp_path / "raw"), malformed=True)
  with pytest.raises(common.LabelFileError, match=r"SN003_au4\.txt:2: '2;3'"):
    builders.build("disfa", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                   config="cropped")


def test_llava_instruct(tmp_path):
  truth = fx.make_llava(str(tmp_path / "raw"))
  s = builders.build("llava_instruct", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))
  assert s["splits"] == {"train": 5, "test": 2}
  assert s["skipped"] == {"train": {"unreadable": 2}}
  for split in ("train", "test"):
    recs = _read(s, split)
    _check_images(recs)
    assert set(recs) == set(truth[split])
    for rid, r in recs.items():
      conv = json.loads(r["conversations"].decode())
      assert sum(t["value"].count("<image>") for t in conv) == 1
      assert [t["value"] for t in conv[1:]] == [t["value"] for t in truth[split][rid][1:]]
      assert int(r["emotion"]) == -1


def test_llava_malformed_entry_names_line(tmp_path):
  fx.make_llava(str(tmp_path / "raw"), malformed=True)   # entry 2's turn 1 is from "human"
  path = tmp_path / "raw" / "faba_train.json"
  # The fixture writes json.dump(indent=1): every top-level entry opens on a line " {", and
  # holds 5 good entries then one per bad image kind (7: the old ``== 5`` here was the fault).
  text = path.read_text().splitlines()
  starts = [i + 1 for i, ln in enumerate(text) if ln == " {"]
  assert len(starts) == 5 + len(fx.BAD_KINDS)
  line = starts[2]
  assert text[line] == '  "id": "train-2",'      # the broken entry opens on that line
  with pytest.raises(common.LabelFileError,
                     match=rf"faba_train\.json:{line}: entry 2: turn 1 is from") as err:
    builders.build("llava_instruct", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))
  assert err.value.line == line


def test_image_conversions():
  rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
  assert common.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)   # transparent -> white
  assert common.to_rgb(Image.new("CMYK", (4, 4))).mode == "RGB"
  assert common.to_rgb(Image.new("I;16", (4, 4))).mode == "RGB"
  img, scale = common.resize_bounds(Image.new("RGB", (20, 40)))
  assert img.size == (common.MIN_SIDE, 2 * common.MIN_SIDE) and scale > 1
  img, _ = common.resize_bounds(Image.new("RGB", (2000, 1000)))
  assert max(img.size) == common.MAX_SIDE


def test_synthetic_small_is_deterministic(tmp_path):
  a = builders.build("synthetic_fea", str(tmp_path / "a"), config="small",
                     overrides=dict(num_train=12, num_validation=4, num_test=4))
  b = builders.build("synthetic_fea", str(tmp_path / "b"), config="small",
                     overrides=dict(num_train=12, num_validation=4, num_test=4))
  assert a["splits"] == {"train": 12, "validation": 4, "test": 4}
  assert a["config"] == "small_num_test4_num_train12_num_validation4"
  ra, rb = _read(a, "train"), _read(b, "train")
  assert ra.keys() == rb.keys()
  k = sorted(ra)[3]
  np.testing.assert_array_equal(ra[k]["image"], rb[k]["image"])
  assert ra[k]["has_landmarks"] and ra[k]["emotion"] >= 0
  assert (ra[k]["au_present"] >= 0).all()
  with pytest.raises(ValueError, match="no config fields"):
    builders.build("synthetic_fea", str(tmp_path / "c"), overrides=dict(bogus=1))


def test_build_dataset_cli(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "build_dataset.py"),
       "--dataset=synthetic_fea", f"--data_dir={tmp_path}", "--config=small"],
      capture_output=True, text=True, timeout=120, cwd=root)
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["splits"] == {"train": 96, "validation": 16, "test": 32}
  assert "train: 96 examples" in out.stdout
  builders.register_all()   # tfds finds builders by name once their modules are imported
  src = tfds.data_source("synthetic_fea/small", data_dir=str(tmp_path), split="test",
                         download=False)
  assert len(src) == 32
  # a config built with overrides reads back under its derived name
  out = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "build_dataset.py"),
       "--dataset=synthetic_fea", f"--data_dir={tmp_path}", "--config=small", "--num_train=4",
       "--num_validation=0", "--num_test=2"], capture_output=True, text=True, timeout=120,
      cwd=root)
  assert out.returncode == 0, out.stderr[-2000:]
  name = json.loads(out.stdout.strip().splitlines()[-1])["config"]
  b = builders.make_builder("synthetic_fea", str(tmp_path), config=name)
  assert len(b.as_data_source(split="train")) == 4
