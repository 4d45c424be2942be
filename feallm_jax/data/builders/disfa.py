"""DISFA (Mavadati et al., 2013): per-frame AU intensity 0-5; occurrence = intensity >= 2."""
from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from feallm_jax.data.builders import common

OCCURRENCE_THRESHOLD = 2   # the AU-detection convention (JAA-Net, ME-GraphAU)


@dataclasses.dataclass
class DisfaConfig(tfds.core.BuilderConfig):
  detect_faces: bool = True
  frame_stride: int = 1
  frame_offset: int = 0     # image number = label frame + offset (0-based extractions: -1)


class Disfa(common.FeaBuilder):
  """Splits fold1/fold2/fold3 = the JAA-Net / ME-GraphAU subject partition (common.DISFA_FOLDS)."""

  name = "disfa"
  BUILDER_CONFIGS = [
      DisfaConfig(name="frames", description="raw left-camera frames, face detected and cropped"),
      DisfaConfig(name="cropped", detect_faces=False, description="frames already face-cropped"),
  ]
  DESCRIPTION = "DISFA AU intensity (12 AUs), occurrence at intensity >= 2, 3 subject folds."
  HOMEPAGE = "http://mohammadmahoor.com/disfa/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request DISFA from http://mohammadmahoor.com/disfa/ and place in manual_dir:
  manual_dir/ActionUnit_Labels/SN001/SN001_au1.txt   lines '<frame>,<intensity 0-5>'
  manual_dir/Images/SN001/<frame>.png                left-camera frames extracted from
                                                     LeftVideoSN001_comp.avi, numbered like the
                                                     label frames (see config frame_offset)
"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    lab_root = self._require(os.path.join(root, "ActionUnit_Labels"), "ActionUnit_Labels")
    img_root = self._require(os.path.join(root, "Images"), "the Images frame folder")
    by_fold: list[list] = [[], [], []]
    for subj in sorted(os.listdir(lab_root)):
      if not os.path.isdir(os.path.join(lab_root, subj)):
        continue
      k = common.fold_of(subj.upper(), common.DISFA_FOLDS)
      if k is None:
        self.skips.skip("all", "subject_not_in_folds", f"{subj}: not in any fold")
        continue
      by_fold[k].append(subj)
    return {f"fold{k + 1}": self._examples(f"fold{k + 1}", by_fold[k], lab_root, img_root)
            for k in range(3)}

  def _examples(self, split, subjects, lab_root, img_root):
    cfg = self.builder_config

    def items():
      for subj in subjects:
        labels = parse_subject(os.path.join(lab_root, subj), subj)
        frames = common.index_frames(os.path.join(img_root, subj))
        for n, frame in enumerate(sorted(labels)):
          if n % cfg.frame_stride:
            continue
          rid = f"{subj.upper()}_{frame:05d}"
          yield rid, (rid, subj.upper(), frames.get(frame + cfg.frame_offset), labels[frame])

    def make(item):
      rid, subj, path, labels = item
      if path is None:
        raise common.SkipImage(f"{rid}: image file missing (no frame image)")
      image, _ = common.load_face(path, rid, detect=cfg.detect_faces)
      pres, inten = common.au_arrays(labels, present_threshold=OCCURRENCE_THRESHOLD)
      return common.make_record(rid, image, au_present=pres, au_intensity=inten, subject=subj)

    return self._guarded(split, items(), make)


def parse_subject(folder: str, subj: str) -> dict[int, dict[int, float]]:
  """{frame: {AU: intensity}} from every <subj>_au<N>.txt in folder."""
  out: dict[int, dict[int, float]] = {}
  files = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(".txt")]
  if not files:
    raise common.LabelFileError(folder, None, "no <subject>_au<N>.txt label files")
  for f in files:
    path = os.path.join(folder, f)
    m = re.fullmatch(rf"{re.escape(subj)}_au(\d+)\.txt", f, re.I)
    if not m:
      raise common.LabelFileError(path, None, f"name must be {subj}_au<N>.txt")
    au = int(m.group(1))
    with open(path, encoding="utf-8") as fh:
      for ln, line in enumerate(fh, 1):
        line = line.strip()
        if not line:
          continue
        parts = [p.strip() for p in line.split(",")]
        try:
          if len(parts) != 2:
            raise ValueError("expected '<frame>,<intensity>'")
          frame, val = int(parts[0]), float(parts[1])
          if not 0 <= val <= 5:
            raise ValueError(f"intensity {val} outside 0-5")
        except ValueError as e:
          raise common.LabelFileError(path, ln, f"{line!r}: {e}") from None
        out.setdefault(frame, {})[au] = val
  return out
