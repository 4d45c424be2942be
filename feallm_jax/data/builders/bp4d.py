"""BP4D-Spontaneous (Zhang et al., 2014): FACS AU occurrence per frame, subject-exclusive folds.

The AU_OCC CSVs: a header row of integers ('0' = the frame number, then one column per AU
number, read by name as ME-GraphAU's tool/BP4D_image_label_process.py does with
``usecols=["0", "1", "2", "4", ...]``), one row per coded frame, 0/1 per AU and 9 = not coded.
Their last column is an occlusion flag in OpenFace's reading (model_training/AU_training/data
extraction/extract_BP4D_labels.m: ``occlusions = OCC(2:end,end); valid = occlusions ~= 1``).
Occluded frames are kept by default, as ME-GraphAU's lists keep every coded row (the partition
whose numbers we compare with), and counted; ``skip_occluded`` leaves them out as OpenFace
does. A row with a value other than 0/1/9 in a requested AU is skipped and counted with its
file and line (``skipped_first`` in the build summary), not fatal.
"""
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
  skip_occluded: bool = False   # leave out frames the last (occlusion) column marks 1


class Bp4d(common.FeaBuilder):
  """Splits fold1/fold2/fold3 = subject parts 1/2/3 of the JAA-Net / ME-GraphAU partition
  (common.BP4D_FOLDS). ME-GraphAU's *published* fold k tests on another part (its fold1 tests
  on part 3): the split names test_fold<k> / train_fold<k> give that naming
  (builders.PUBLISHED_FOLDS), e.g. train on 'train_fold1', evaluate on 'test_fold1'.
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
  manual_dir/AUCoding/AU_OCC/F001_T1.csv  header row '0,1,2,3,...' (frame, then AU numbers),
                                          then one row per frame: frame number, 0/1 per AU
                                          (9 = unknown); the last column is the occlusion flag
  and the frame images, numbered like the CSV frames, in one of:
  manual_dir/Sequences/F001/T1/2440.jpg
  manual_dir/img/F001/T1/2440.jpg         (ME-GraphAU's data/BP4D/img)
  <image_root>/F001/T1/2440.jpg           (e.g. PyTorch-JAANet's dataset/BP4D): --image_root
Subjects outside the three standard folds are skipped and counted.
"""
  FRAME_ROOTS = ("Sequences", "img", "images", "Images")

  def __init__(self, *args, image_root: str | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._image_root = image_root

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    occ = self._require(os.path.join(root, "AUCoding", "AU_OCC"), "AUCoding/AU_OCC")
    seq = common.frame_root(self, root, self._image_root, self.FRAME_ROOTS,
                            "the frame folders (<subject>/<task>/<frame>.jpg)")
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
        rows, bad = parse_occ(path, cfg.aus)
        for where, msg in bad:
          self.skips.skip(split, "bad_label_value", f"{path}:{where}: {msg}")
        for n, (frame, labels, occluded, ln) in enumerate(rows):
          if n % cfg.frame_stride:
            continue
          rid = f"{subj}_{task}_{frame:04d}"
          if occluded:
            msg = f"{rid}: {os.path.basename(path)}:{ln} marks the frame occluded"
            if cfg.skip_occluded:
              self.skips.skip(split, "occluded", msg)
              continue
            self.noted.add(split, "occluded_kept", msg)
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


def parse_occ(path: str, aus):
  """([(frame, {AU: 0/1/-1}, occluded, line)], [(line, why)]) for the requested AUs.

  A wrong field count or frame number stops the build naming the file and line; a value other
  than 0/1/9 in a requested AU skips that row (returned in the second list). ``occluded`` is
  read from the last column when it is not one of the requested AUs (None without one).
  """
  out, bad = [], []
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
    occ_col = len(header) - 1 if (len(header) - 1) not in cols.values() else None
    for ln, row in enumerate(reader, 2):
      if not row or all(not c.strip() for c in row):
        continue
      if len(row) != len(header):
        raise common.LabelFileError(path, ln, f"{len(row)} fields, header has {len(header)}")
      try:
        frame = int(row[0])
      except ValueError:
        raise common.LabelFileError(path, ln, f"frame {row[0]!r} is not an integer") from None
      labels, why = {}, None
      for au, j in cols.items():
        try:
          v = float(row[j])
        except ValueError:
          v = None
        if v not in (0, 1, 9):
          why = f"AU{au} value {row[j]!r} not 0, 1 or 9"
          break
        labels[au] = -1 if v == 9 else int(v)
      if why:
        bad.append((ln, why))
        continue
      occluded = None
      if occ_col is not None:
        try:
          occluded = float(row[occ_col]) == 1
        except ValueError:
          occluded = False
      out.append((frame, labels, occluded, ln))
  return out, bad
