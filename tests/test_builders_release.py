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
