"""BP4D-Spontaneous (Zhang et al., 2014): FACS AU occurrence per frame, subject-exclusive folds."""
from __future__ import annotations

import csv
import dataclasses
import os
import re

import tensorflow_datasets as tfds

from feallm_jax.data import facs
from feallm_jax.data.builders import common


@dataclasses.dataclass
class Bp4dConfig(tfds.core.BuilderConfig):
  detect_faces: bool = True     # raw 1040x1392 video frames: find and crop the face
  frame_stride: int = 1         # keep every n-th annotated frame (1 = all, as in the literature)
  aus: tuple = facs.BP4D_AUS    # AUs read from the CSVs (the 12 of the benchmark)


class Bp4d(common.FeaBuilder):
  """Splits fold1/fold2/fold3 = the JAA-Net / ME-GraphAU subject partition (common.BP4D_FOLDS).

  Evaluate fold k by training on the other two, e.g. split 'fold2+fold3' / 'fold1'.
  """

  name = "bp4d"
  BUILDER_CONFIGS = [
      Bp4dConfig(name="frames", description="raw frames, face detected and cropped"),
      Bp4dConfig(name="cropped", detect_faces=False, description="frames already face-cropped"),
  ]
  DESCRIPTION = "BP4D-Spontaneous AU occurrence (12 AUs), 3 subject-exclusive folds."
  HOMEPAGE = "https://www.cs.binghamton.edu/~lijun/Research/3DFE/3DFE_Analysis.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request BP4D-Spontaneous from Binghamton University and place in manual_dir:
  manual_dir/AUCoding/AU_OCC/F001_T1.csv  header row '<frame>,1,2,4,...' (AU numbers), then one
                                          row per frame: frame number, 0/1 per AU (9 = unknown)
  manual_dir/Sequences/F001/T1/0001.jpg   frame images, numbered like the CSV frames
Subjects outside the three standard folds are skipped and counted.
"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    occ = self._require(os.path.join(root, "AUCoding", "AU_OCC"), "AUCoding/AU_OCC")
    seq = self._require(os.path.join(root, "Sequences"), "the Sequences frame folder")
    files = sorted(f for f in os.listdir(occ) if f.lower().endswith(".csv"))
    if not files:
      raise FileNotFoundError(f"bp4d: no AU_OCC csv files in {occ}")
    by_fold: list[list] = [[], [], []]
    for f in files:
      m = re.match(r"^([FM]\d{3})_(T\d+)\.csv$", f, re.I)
      if not m:
        raise common.LabelFileError(os.path.join(occ, f), None,
                                    "name must be <subject>_<task>.csv, e.g. F001_T1.csv")
      subj, task = m.group(1).upper(), m.group(2).upper()
      k = common.fold_of(subj, common.BP4D_FOLDS)
      if k is None:
        self.skips.skip("all", "subject_not_in_folds", f"{f}: subject {subj} not in any fold")
        continue
      by_fold[k].append((subj, task, os.path.join(occ, f)))
    return {f"fold{k + 1}": self._examples(f"fold{k + 1}", by_fold[k], seq) for k in range(3)}

  def _examples(self, split, seqs, seq_root):
    cfg = self.builder_config

    def items():
      for subj, task, path in seqs:
        frames = common.index_frames(os.path.join(seq_root, subj, task))
        for n, (frame, labels) in enumerate(parse_occ(path, cfg.aus)):
          if n % cfg.frame_stride:
            continue
          rid = f"{subj}_{task}_{frame:04d}"
          yield rid, (rid, subj, frames.get(frame), labels)

    def make(item):
      rid, subj, path, labels = item
      if path is None:
        raise common.SkipImage(f"{rid}: image file missing (no frame image)")
      image, _ = common.load_face(path, rid, detect=cfg.detect_faces)
      pres, inten = common.au_arrays(labels)
      return common.make_record(rid, image, au_present=pres, au_intensity=inten, subject=subj)

    return self._guarded(split, items(), make)


def _au_number(cell: str) -> int | None:
  m = re.fullmatch(r"\s*(?:AU)?0*(\d+)\s*", cell, re.I)
  return int(m.group(1)) if m else None


def parse_occ(path: str, aus) -> list[tuple[int, dict[int, int]]]:
  """[(frame, {AU: 0/1/-1})] for the requested AUs; malformed rows name the file and line."""
  out = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header or len(header) < 2:
      raise common.LabelFileError(path, 1, "missing header '<frame>,<AU>,<AU>,...'")
    cols = {}
    for j, cell in enumerate(header[1:], 1):
      au = _au_number(cell)
      if au is None:
        raise common.LabelFileError(path, 1, f"header cell {cell!r} is not an AU number")
      if au in aus:
        cols[au] = j
    missing = [a for a in aus if a not in cols]
    if len(missing) == len(aus):
      raise common.LabelFileError(path, 1, f"none of the AUs {tuple(aus)} in the header")
    for ln, row in enumerate(reader, 2):
      if not row or all(not c.strip() for c in row):
        continue
      if len(row) != len(header):
        raise common.LabelFileError(path, ln, f"{len(row)} fields, header has {len(header)}")
      try:
        frame = int(row[0])
        labels = {}
        for au, j in cols.items():
          v = int(float(row[j]))
          if v not in (0, 1, 9):
            raise ValueError(f"AU{au} value {row[j]!r} not 0, 1 or 9")
          labels[au] = -1 if v == 9 else v
      except ValueError as e:
        raise common.LabelFileError(path, ln, f"bad row {row!r} ({e})") from None
      out.append((frame, labels))
  return out
