"""The builders on folders written the way the real releases and their usual tools write them.

Each fixture (tests/data_fixtures.py) cites the repository file that shows its layout. The
DISFA tests read back, from every built record, which *video frame* its image shows (each frame
image has its own background colour) and check it against the frame its labels belong to: a
0-based and a 1-based extraction must give the same labels per video frame.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from feallm_jax.data import builders, facs
from feallm_jax.data.builders import common, disfa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(summary, split):
  b = builders.make_builder(summary["name"], summary["data_dir"], config=summary["config"])
  src = b.as_data_source(split=split)
  return {r["id"].decode(): r for r in (src[i] for i in range(len(src)))}


def _video_frame(img: np.ndarray) -> int:
  """The video frame (1-based) an image shows: the nearest FRAME_COLORS entry to its corner."""
  corner = np.asarray(img)[:6, :6].reshape(-1, 3).mean(0)
  d = [np.abs(corner - np.asarray(c)).sum() for c in fx.FRAME_COLORS]
  assert min(d) < 40, f"corner colour {corner} is none of the frame colours"
  return int(np.argmin(d)) + 1


def _labels_per_video_frame(summary):
  """{(subject, video frame shown by the image): au_intensity} over every fold."""
  out = {}
  for k in (1, 2, 3):
    for rid, r in _read(summary, f"fold{k}").items():
      subj, frame = rid.split("_")
      shown = _video_frame(r["image"])
      assert shown == int(frame), f"{rid}: labels of frame {frame} on video frame {shown}"
      out[(subj, shown)] = np.asarray(r["au_intensity"])
  return out


def _build_disfa(tmp_path, raw, tag, **kw):
  return builders.build("disfa", str(tmp_path / f"data_{tag}"), manual_dir=str(raw),
                        config="cropped", **kw)


def test_disfa_0_and_1_based_extractions_give_the_same_labels_per_video_frame(tmp_path):
  results = {}
  for layout in ("me_graphau", "libreface", "jaanet"):
    raw = tmp_path / layout
    truth = fx.make_disfa_extraction(str(raw), layout)
    kw = dict(image_root=str(raw / "DISFA")) if layout == "jaanet" else {}
    s = _build_disfa(tmp_path, raw, layout, **kw)
    got = _labels_per_video_frame(s)
    base = 1 if layout == "libreface" else 0
    assert s["noted"]["all"] == {f"frame_base_{base}": 3}, s["noted"]
    want = {k: v for k, v in truth["labels"].items() if k not in truth["missing"]}
    assert set(got) == set(want)
    for key, inten in want.items():
      np.testing.assert_array_equal(got[key], inten, err_msg=f"{layout} {key}")
    assert s["skipped"] == ({f: {"missing": 1} for f in ("fold1", "fold2", "fold3")}
                            if layout == "jaanet" else {}), s["skipped"]
    results[layout] = got
  # The three extractions agree frame by frame (JAA-Net's dropped frame aside).
  shared = set(results["jaanet"])
  for layout in ("me_graphau", "libreface"):
    for key in shared:
      np.testing.assert_array_equal(results[layout][key], results["jaanet"][key])
  # occurrence = intensity >= 2 on one record, the AU detection convention
  s = _build_disfa(tmp_path, tmp_path / "me_graphau", "me_graphau")
  r = _read(s, "fold1")["SN001_00002"]
  inten = np.asarray(r["au_intensity"])
  np.testing.assert_array_equal(r["au_present"], np.where(inten < 0, -1, inten >= 2))


def test_disfa_old_pairing_puts_each_label_on_the_next_video_frame(tmp_path):
  """What the builder did before: label frame f <- file f (frame_offset=0), on ME-GraphAU's
  0-based frames. Every label lands on the next video frame; only the last is 'missing'."""
  truth = fx.make_disfa_extraction(str(tmp_path), "me_graphau")
  folder = tmp_path / "img" / "SN001"
  labels = disfa.parse_subject(str(tmp_path / "ActionUnit_Labels" / "SN001"), "SN001")
  frames = common.index_frames(str(folder))
  old = list(disfa.pair_frames("SN001", labels, frames, base=1))
  shown = {rid: _video_frame(np.asarray(Image.open(p).convert("RGB"))) if p else None
           for rid, p, _ in old}
  assert shown == {"SN001_00001": 2, "SN001_00002": 3, "SN001_00003": 4, "SN001_00004": 5,
                   "SN001_00005": None}
  new = list(disfa.pair_frames("SN001", labels, frames, base=disfa.detect_base(frames, labels)[0]))
  assert all(_video_frame(np.asarray(Image.open(p).convert("RGB"))) == int(rid[-5:])
             for rid, p, _ in new)
  assert len(truth["labels"]) == 15


def test_disfa_ambiguous_numbering_stops_the_build_naming_the_flag(tmp_path):
  fx.make_disfa_extraction(str(tmp_path / "raw"), "subsampled")
  with pytest.raises(disfa.FrameBaseError, match=r"cannot tell .*SN00\d.*--frame_base=0.*"
                     r"--frame_base=1"):
    _build_disfa(tmp_path, tmp_path / "raw", "auto")
  # told, it builds: the files are 2.png and 4.png, numbered like the labels
  s = builders.build("disfa", str(tmp_path / "data_1"), manual_dir=str(tmp_path / "raw"),
                     config="cropped", overrides=dict(frame_base="1"))
  assert s["splits"] == {"fold1": 2, "fold2": 2, "fold3": 2}
  assert s["skipped"]["fold1"] == {"missing": 3}
  _labels_per_video_frame(s)


def test_disfa_explicit_numbering_is_checked_against_the_files(tmp_path):
  fx.make_disfa_extraction(str(tmp_path / "zero"), "me_graphau")
  with pytest.raises(disfa.FrameBaseError, match=r"--frame_base=1 but .*img/SN00\d holds a file "
                     r"numbered 0"):
    builders.build("disfa", str(tmp_path / "d0"), manual_dir=str(tmp_path / "zero"),
                   config="cropped", overrides=dict(frame_base="1"))
  with pytest.raises(disfa.FrameBaseError, match="--frame_base=1 but"):   # the old spelling
    builders.build("disfa", str(tmp_path / "d0b"), manual_dir=str(tmp_path / "zero"),
                   config="cropped", overrides=dict(frame_offset=0))
  fx.make_disfa_extraction(str(tmp_path / "one"), "libreface")
  with pytest.raises(disfa.FrameBaseError, match=r"--frame_base=0 but .* 1-based extraction"):
    builders.build("disfa", str(tmp_path / "d1"), manual_dir=str(tmp_path / "one"),
                   config="cropped", overrides=dict(frame_base="0"))
  # given and consistent: the same records as detected
  s = builders.build("disfa", str(tmp_path / "d2"), manual_dir=str(tmp_path / "zero"),
                     config="cropped", overrides=dict(frame_offset=-1))
  assert s["noted"]["all"] == {"frame_base_0": 3}
  _labels_per_video_frame(s)


def test_build_dataset_cli_disfa_flags(tmp_path):
  raw = tmp_path / "raw"
  fx.make_disfa_extraction(str(raw), "jaanet")
  cmd = [sys.executable, os.path.join(ROOT, "launch", "build_dataset.py"), "--dataset=disfa",
         f"--data_dir={tmp_path / 'data'}", f"--manual_dir={raw}", "--config=cropped",
         f"--image_root={raw / 'DISFA'}", "--frame_base=0"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["config"] == "cropped_frame_base0"
  assert summary["splits"] == {"fold1": 4, "fold2": 4, "fold3": 4}
  assert "before splitting: counted {'frame_base_0': 3}" in out.stdout
  assert "first skipped [fold1/missing]: SN001_00003: image file missing" in out.stdout
  _labels_per_video_frame(summary)
  # --image_root where a dataset takes none is refused by name
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "build_dataset.py"),
                        "--dataset=raf_db", f"--data_dir={tmp_path / 'd2'}",
                        f"--manual_dir={raw}", f"--image_root={raw}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode != 0 and "--image_root applies to bp4d, disfa, llava_instruct" in out.stderr


# --- LLaVA-format sets -------------------------------------------------------------------------

def _conv(r):
  return json.loads(r["conversations"].decode())


def test_llava_mix665k_layout(tmp_path):
  data = tmp_path / "playground" / "data"
  truth = fx.make_llava_mix(str(data))
  s = builders.build("llava_instruct", str(tmp_path / "tfds"), manual_dir=str(data))
  assert s["splits"] == {"train": 8}          # no split word in the name: default train
  assert s["skipped"] == {}
  assert s["noted"]["train"] == {"text_only": 2, "leading_gpt_turn_dropped": 1,
                                 "renamed_duplicate_id": 1}
  assert "llava_v1_5_mix665k.json" in s["noted_first"]["train"]["renamed_duplicate_id"]
  recs = _read(s, "train")
  assert set(recs) == set(truth["train"])
  for rid, kind in truth["train"].items():
    conv = _conv(recs[rid])
    n_img = sum(t["value"].count("<image>") for t in conv)
    assert n_img == (1 if kind == "image" else 0), rid
    assert conv[0]["from"] == "human"
  assert [t["value"] for t in _conv(recs["wa12Kx3_4"])] == [
      "Continue the story in two sentences.", "The ship sailed on. Nobody looked back."]
  # the duplicate keeps its own conversation under the new id
  assert "shirt" in _conv(recs["2354786#2"])[0]["value"]
  # a text-only record carries the blank placeholder image
  assert np.abs(recs["i6IyJda_0"]["image"].astype(int) - 128).max() <= 2


def test_llava_default_split_and_split_words(tmp_path):
  data = tmp_path / "raw"
  fx.make_llava_mix(str(data))
  s = builders.build("llava_instruct", str(tmp_path / "tfds"), manual_dir=str(data),
                     default_split="test")
  assert s["splits"] == {"test": 8}
  from feallm_jax.data.builders import llava_instruct as li
  assert li.split_of("llava_instruct_150k.json") is None     # 'instruct' is not 'train'
  assert li.split_of("interval_scores.json") is None          # nor is 'interval' 'val'
  assert li.split_of("eval/eval_au_anno.json") == "test"
  assert li.split_of("train/train_au_anno.json") == "train"
  assert li.split_of("faba_val.jsonl") == "test"
  with pytest.raises(ValueError, match="default_split"):
    builders.make_builder("llava_instruct", str(tmp_path / "x"), default_split="a b")


def test_faba_instruct_as_shipped(tmp_path):
  data = tmp_path / "data"
  truth = fx.make_faba_release(str(data))
  # manual_dir = the shipped FABAInstruct folder: JSONs in train/ and eval/, image paths
  # relative to data/ above it
  s = builders.build("llava_instruct", str(tmp_path / "a"), manual_dir=str(data / "FABAInstruct"))
  assert s["splits"] == {"train": 4, "test": 4} and s["skipped"] == {}
  assert s["noted"]["test"] == {"faba_eval_entry": 4}
  for split in ("train", "test"):
    recs = _read(s, split)
    assert set(recs) == set(truth[split])
    for rid, t in truth[split].items():
      r, conv = recs[rid], _conv(recs[rid])
      assert sum(x["value"].count("<image>") for x in conv) == 1
      if t["kind"] == "emotion":
        assert conv[0]["value"] == "<image>\nWhat emotions are conveyed by this face?"
        assert facs.EMOTIONS[int(r["emotion"])] == t["labels"]
      elif t["kind"] == "au":
        assert conv[0]["value"] == "<image>\nWhat AUs are conveyed by this face?"
        named = {int(x) for x in t["labels"].split(", ")}
        for au in fx_faba_aus():
          assert r["au_present"][facs.au_index(au)] == int(au in named), (rid, au)
        assert r["au_present"][facs.au_index(11)] == -1      # not in FABA's AU set
      else:
        assert int(r["emotion"]) == -1 and (r["au_present"] == -1).all()
  # manual_dir = data/: the JSONs are found two folders down
  s2 = builders.build("llava_instruct", str(tmp_path / "b"), manual_dir=str(data))
  assert s2["splits"] == {"train": 4, "test": 4} and s2["skipped"] == {}
  # the JSONs copied elsewhere: every image is missing, unless --image_root names data/
  flat = tmp_path / "flat"
  flat.mkdir()
  for sub in ("train", "eval"):
    for f in (data / "FABAInstruct" / sub).glob("*.json"):
      (flat / f.name).write_text(f.read_text())
  with pytest.raises(ValueError, match="no usable example.*missing"):
    builders.build("llava_instruct", str(tmp_path / "c"), manual_dir=str(flat))
  s3 = builders.build("llava_instruct", str(tmp_path / "d"), manual_dir=str(flat),
                      image_root=str(data))
  assert s3["splits"] == {"train": 4, "test": 4} and s3["skipped"] == {}


def fx_faba_aus():
  from feallm_jax.data.builders import llava_instruct as li
  return li.FABA_AUS


def test_text_only_rows_train(tmp_path):
  """Text-only records reach the batch: no <image>, answer tokens supervised, nothing dropped."""
  from configs import tiny_synthetic
  from feallm_jax.data import pipeline, tokenizer as T
  data = tmp_path / "raw"
  fx.make_llava_mix(str(data))
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.dataset, c.data.builder_config = "llava_instruct", ""
  c.data.batch_size = 8
  builders.build("llava_instruct", c.data.data_dir, manual_dir=str(data))
  it = pipeline.train_iterator(c)
  b = next(it)
  tok = T.load()
  n_img = (b["input_ids"] == T.image_token_id(tok)).sum(1)
  assert (b["example_mask"] == 1).all()
  assert sorted(n_img.tolist()) == [0, 0, 1, 1, 1, 1, 1, 1]   # 2 text-only of 8 records
  assert (b["loss_mask"].sum(1) > 0).all()
  assert it.drops.dropped == 0
  # a text-only row never fills the last slot (the model's expansion drops that token)
  text_rows = b["attention_mask"][n_img == 0]
  assert (text_rows[:, -1] == 0).all()
  rep = pipeline.length_report(c, pipeline.data_source(c, split="train", decode_images=False))
  assert rep["dropped"] == 0


# --- AffectNet original release ----------------------------------------------------------------

@pytest.mark.parametrize("validation_header", [False, True])
def test_affectnet_original_csv_release(tmp_path, validation_header):
  truth = fx.make_affectnet_csv(str(tmp_path / "raw"), validation_header=validation_header)
  s8 = builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                      config="8class")
  assert s8["splits"] == {"train": 4, "test": 2}
  assert s8["skipped"] == {"train": {"excluded_label": 1, "missing": 1},
                           "test": {"excluded_label": 1}}
  assert "training.csv:4" in s8["skipped_first"]["train"]["excluded_label"]  # the '9' row
  for split in ("train", "test"):
    recs = _read(s8, split)
    assert {k: int(r["emotion"]) for k, r in recs.items()} == truth[split]
    for r in recs.values():
      img = np.asarray(r["image"]).astype(int)
      # cropped with the CSV's box: square, the face inside, the green decoy outside
      assert abs(img.shape[0] - img.shape[1]) <= 1
      green = (img[..., 1] > 200) & (img[..., 0] < 60) & (img[..., 2] < 60)
      assert green.mean() < 0.001
      assert r["has_landmarks"]
      np.testing.assert_allclose(r["landmarks"][30], [0.5, 0.5], atol=0.01)  # box centre
  s7 = builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                      config="7class")
  assert s7["splits"]["train"] == 3            # contempt (7) excluded too
  assert s7["skipped"]["train"]["excluded_label"] == 2


def test_affectnet_csv_bad_row_names_file_and_line(tmp_path):
  fx.make_affectnet_csv(str(tmp_path / "raw"))
  path = tmp_path / "raw" / "Manually_Annotated_file_lists" / "validation.csv"
  lines = path.read_text().splitlines()
  lines[1] = lines[1].replace(";", ";;x;", 1)
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(common.LabelFileError, match=r"validation\.csv:2: bad row"):
    builders.build("affectnet", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"))


# --- BP4D ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["me_graphau", "jaanet"])
def test_bp4d_release_occlusion_and_bad_values(tmp_path, layout):
  raw = tmp_path / "raw"
  truth = fx.make_bp4d_release(str(raw), layout)
  kw = dict(image_root=str(raw / "BP4D")) if layout == "jaanet" else {}
  s = builders.build("bp4d", str(tmp_path / "keep"), manual_dir=str(raw), config="cropped", **kw)
  # a bad value skips its row only, counted with file and line; occluded frames kept, counted
  assert s["splits"] == {"fold1": 4, "fold2": 4, "fold3": 4}
  assert s["skipped"] == {f"fold{k}": {"bad_label_value": 1} for k in (1, 2, 3)}
  name, line = truth["bad"][0]
  assert s["skipped_first"]["fold1"]["bad_label_value"].endswith(
      f"{name}:{line}: AU4 value '2' not 0, 1 or 9")
  assert s["noted"] == {f"fold{k}": {"occluded_kept": 1} for k in (1, 2, 3)}
  for k in (1, 2, 3):
    for rid, r in _read(s, f"fold{k}").items():
      assert truth["folds"][rid] == f"fold{k}"
      np.testing.assert_array_equal(r["au_present"], truth["labels"][rid])
  # OpenFace's reading: occluded frames left out, and counted
  s2 = builders.build("bp4d", str(tmp_path / "skip"), manual_dir=str(raw), config="cropped",
                      overrides=dict(skip_occluded=True), **kw)
  assert s2["splits"] == {"fold1": 3, "fold2": 3, "fold3": 3}
  assert s2["skipped"]["fold2"] == {"bad_label_value": 1, "occluded": 1}
  assert not set(_read(s2, "fold1")) & set(truth["occluded"])


# --- RAF-DB original photos --------------------------------------------------------------------

def test_raf_db_original_uses_the_official_face_box(tmp_path):
  truth = fx.make_raf_db_original(str(tmp_path / "raw"))
  s = builders.build("raf_db", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                     config="original")
  assert s["splits"] == {"train": 3, "test": 2} and s["skipped"] == {}
  assert s["noted"] == {"train": {"detected_face": 1, "official_box": 2},
                        "test": {"official_box": 2}}
  for split in ("train", "test"):
    recs = _read(s, split)
    assert {k: int(r["emotion"]) for k, r in recs.items()} == truth[split]
    for rid, r in recs.items():
      img = np.asarray(r["image"]).astype(int)
      near = lambda c: (np.abs(img - np.asarray(c)).sum(-1) < 60).mean()  # noqa: E731
      if rid in truth["no_box"]:
        # what the builder did for every photo before: the face the cascade finds, the
        # astronaut, not the labelled person
        assert near(fx.RAF_LABELLED_BG) < 0.001
      else:
        assert near(fx.RAF_LABELLED_BG) > 0.1     # the labelled person's face and background


def test_raf_db_bad_box_names_file(tmp_path):
  fx.make_raf_db_original(str(tmp_path / "raw"))
  (tmp_path / "raw" / "Annotation" / "boundingbox" / "test_00002_boundingbox.txt").write_text(
      "10 20 5\n")
  with pytest.raises(common.LabelFileError, match=r"test_00002_boundingbox\.txt:1: expected "):
    builders.build("raf_db", str(tmp_path / "data"), manual_dir=str(tmp_path / "raw"),
                   config="original")


# --- fold naming and the 3-fold mean ----------------------------------------------------------

def test_fold_aliases_follow_me_graphau():
  """ME-GraphAU tool/BP4D_image_label_process.py: '# fold1: train : part1+part2 test: part3',
  fold2 tests on part2, fold3 on part1; our fold<k> is part k."""
  r = builders.resolve_split
  assert r("bp4d", "test_fold1") == "fold3" and r("bp4d", "train_fold1") == "fold1+fold2"
  assert r("disfa", "test_fold2") == "fold2" and r("disfa", "train_fold2") == "fold1+fold3"
  assert r("disfa", "test_fold3") == "fold1" and r("bp4d", "train_fold3") == "fold2+fold3"
  assert r("bp4d", "part2") == "fold2" and r("bp4d", "fold1+fold2+fold3") == "fold1+fold2+fold3"
  assert r("bp4d", "test_fold1[:10]") == "fold3[:10]"
  assert r("raf_db", "test_fold1") == "test_fold1"      # other datasets untouched
  # the parts are ME-GraphAU's lists, in its order
  assert common.BP4D_FOLDS[2][:3] == ("F007", "F015", "F006")
  assert common.DISFA_FOLDS[0][:3] == ("SN002", "SN010", "SN001")


def test_bp4d_reads_back_under_published_split_names(tmp_path):
  from configs import tiny_synthetic
  from feallm_jax.data import pipeline
  raw = tmp_path / "raw"
  fx.make_bp4d_release(str(raw))
  c = tiny_synthetic.get_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.dataset, c.data.builder_config = "bp4d", "cropped"
  builders.build("bp4d", c.data.data_dir, manual_dir=str(raw), config="cropped")
  test1 = pipeline.data_source(c, split="test_fold1")        # = part 3: F007
  assert {src["subject"].decode() for src in (test1[i] for i in range(len(test1)))} == {"F007"}
  assert len(pipeline.data_source(c, split="train_fold1")) == 8   # parts 1+2


def test_au_metrics_report_the_three_fold_mean():
  """au_mean_f1 of a BP4D suite = mean over test folds of each fold's mean F1 (checked against
  sklearn's f1_score per fold and AU); the pooled F1 is kept beside it."""
  from sklearn.metrics import f1_score
  from feallm_jax.eval import feabench
  rng = np.random.default_rng(0)
  au_set = facs.BP4D_AUS
  subjects = {"fold1": ["F001", "M007"], "fold2": ["M011"], "fold3": ["F007", "F015"]}
  sizes = {"fold1": 30, "fold2": 8, "fold3": 50}      # unequal: mean of folds != pooled
  records, want = [], {}
  for fold, subs in subjects.items():
    t = rng.integers(0, 2, (sizes[fold], len(au_set)))
    p = np.where(rng.random(t.shape) < (0.9 if fold == "fold2" else 0.6), t, 1 - t)
    per = [f1_score(t[:, j], p[:, j], zero_division=0) for j in range(len(au_set))]
    want[fold] = float(np.mean(per))
    for i in range(len(t)):
      records.append(dict(id=f"{subs[i % len(subs)]}_T1_{i:04d}", task="aur", prompt="",
                          reference="", prediction="",
                          aus_true=[a for a, v in zip(au_set, t[i]) if v],
                          au_annotation=t[i].tolist(),
                          aus_pred=[a for a, v in zip(au_set, p[i]) if v]))
  res = feabench.suite_metrics(records, feabench.SUITES["bp4d"], "generate")
  am = res["tasks"]["aur"]["aus"]
  for fold in subjects:
    assert am["folds"][fold]["mean_f1"] == pytest.approx(want[fold], abs=1e-12)
  assert am["mean_f1"] == pytest.approx(np.mean(list(want.values())), abs=1e-12)
  assert res["summary"]["aur"]["au_mean_f1"] == am["mean_f1"]
  t_all = np.asarray([r["au_annotation"] for r in records])
  p_all = np.stack([metrics_vec(r["aus_pred"], au_set) for r in records])
  pooled = np.mean([f1_score(t_all[:, j], p_all[:, j], zero_division=0)
                    for j in range(len(au_set))])
  assert res["summary"]["aur"]["au_mean_f1_pooled"] == pytest.approx(pooled, abs=1e-12)
  assert abs(pooled - am["mean_f1"]) > 1e-3


def metrics_vec(aus, au_set):
  return np.array([1 if a in set(aus) else 0 for a in au_set])
