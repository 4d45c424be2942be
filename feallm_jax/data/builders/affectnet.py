"""AffectNet (Mollahosseini et al., 2017), manually annotated subset, in either release layout.

* The original release (the one most users hold): ``Manually_Annotated_file_lists/
  {training,validation}.csv`` with columns ``subDirectory_filePath, face_x, face_y,
  face_width, face_height, facial_landmarks, expression, valence, arousal`` (landmarks:
  ``x1;y1;x2;y2;...`` 68 points) and the photos under ``Manually_Annotated_Images/`` (often
  unpacked inside ``Manually_Annotated/``). The photos are full images: the face is cropped with
  the CSV's own box, and the landmarks follow the crop. ``validation.csv`` is read with or
  without its header row (loaders disagree on whether it has one).
* The later npy release: ``{train,val}_set/images/<n>.jpg`` + ``annotations/<n>_exp.npy``
  (and ``_lnd.npy``), faces already cropped.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from feallm_jax.data import facs
from feallm_jax.data.builders import common


@dataclasses.dataclass
class AffectnetConfig(tfds.core.BuilderConfig):
  num_classes: int = 8


class Affectnet(common.FeaBuilder):
  """AffectNet expression: 7 classes (no contempt) or 8. 'test' is the official val_set, which
  the literature reports on (the real test set is not public)."""

  name = "affectnet"
  BUILDER_CONFIGS = [
      AffectnetConfig(name="8class", num_classes=8, description="8 expressions incl. contempt"),
      AffectnetConfig(name="7class", num_classes=7, description="7 expressions, contempt dropped"),
  ]
  DESCRIPTION = "AffectNet manually annotated expression labels with 68 landmarks."
  HOMEPAGE = "http://mohammadmahoor.com/affectnet/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request AffectNet from http://mohammadmahoor.com/affectnet/ and place in manual_dir either
the original release (CSV lists + full photos, face box and landmarks in the CSV):
  manual_dir/Manually_Annotated_file_lists/training.csv     (-> split 'train')
  manual_dir/Manually_Annotated_file_lists/validation.csv   (-> split 'test')
  manual_dir/Manually_Annotated_Images/<dir>/<sha>.jpg      (or Manually_Annotated/Manually_Annotated_Images/)
or the npy release (cropped faces):
  manual_dir/train_set/images/<n>.jpg
  manual_dir/train_set/annotations/<n>_exp.npy   expression 0-7 (8-10 = none/uncertain/non-face)
  manual_dir/train_set/annotations/<n>_lnd.npy   optional: 68 landmarks, 136 pixel values x,y
  manual_dir/val_set/images/...  and  manual_dir/val_set/annotations/...   (-> split 'test')
"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    lists = os.path.join(root, CSV_LISTS)
    if os.path.isdir(lists) and not os.path.isdir(os.path.join(root, "train_set")):
      return self._csv_splits(root, lists)
    out = {}
    for split, folder in (("train", "train_set"), ("test", "val_set")):
      base = self._require(os.path.join(root, folder), f"the {folder} folder")
      self._require(os.path.join(base, "images"), f"{folder}/images")
      self._require(os.path.join(base, "annotations"), f"{folder}/annotations")
      out[split] = self._examples(split, base)
    return out

  def _examples(self, split, base):
    ann = os.path.join(base, "annotations")
    img_dir = os.path.join(base, "images")
    stems = sorted((f[: -len("_exp.npy")] for f in os.listdir(ann) if f.endswith("_exp.npy")),
                   key=lambda s: (len(s), s))
    names = facs.AFFECTNET_8[: self.builder_config.num_classes]
    items = []
    for stem in stems:
      label = read_label(os.path.join(ann, stem + "_exp.npy"))
      if label >= len(names):   # none / uncertain / non-face, or contempt in the 7-class config
        self.skips.skip(split, "excluded_label", f"{stem}: expression {label} not in {names}")
        continue
      items.append((stem, (stem, label)))

    def make(item):
      stem, label = item
      path = common.find_image(img_dir, stem)
      if path is None:
        raise common.SkipImage(f"{stem}: image file missing in {img_dir}")
      lnd_path = os.path.join(ann, stem + "_lnd.npy")
      lm = read_landmarks(lnd_path) if os.path.exists(lnd_path) else None
      image, lm = common.load_face(path, stem, landmarks_px=lm)
      return common.make_record(f"{split}_{stem}", image, landmarks=lm,
                                emotion=facs.dataset_label_to_index(names, label))

    return self._guarded(split, items, make)


  def _csv_splits(self, root, lists):
    img_root = next((p for p in (os.path.join(root, d) for d in CSV_IMAGE_DIRS)
                     if os.path.isdir(p)), None)
    if img_root is None:
      raise FileNotFoundError(
          f"affectnet: {lists} found but no image folder "
          f"({' or '.join(os.path.join(root, d) for d in CSV_IMAGE_DIRS)}).\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    out = {}
    for split, name in (("train", "training.csv"), ("test", "validation.csv")):
      path = self._require(os.path.join(lists, name), f"{CSV_LISTS}/{name}")
      out[split] = self._csv_examples(split, read_csv(path), img_root)
    return out

  def _csv_examples(self, split, rows, img_root):
    names = facs.AFFECTNET_8[: self.builder_config.num_classes]
    items = []
    for row in rows:
      if row.expression >= len(names):
        self.skips.skip(split, "excluded_label", f"{row.where}: {row.rel}: expression "
                        f"{row.expression} not in {names}")
        continue
      rid = f"{split}_{os.path.splitext(row.rel.replace('/', '_'))[0]}"
      items.append((rid, (rid, row)))

    def make(item):
      rid, row = item
      path = os.path.join(img_root, row.rel)
      if not os.path.isfile(path):
        raise common.SkipImage(f"{rid}: image file missing ({path}; {row.where})")
      image, lm = common.load_face(path, rid, landmarks_px=row.landmarks, box_px=row.box)
      return common.make_record(rid, image, landmarks=lm,
                                emotion=facs.dataset_label_to_index(names, row.expression))

    return self._guarded(split, items, make)


CSV_LISTS = "Manually_Annotated_file_lists"
CSV_IMAGE_DIRS = ("Manually_Annotated_Images",
                  os.path.join("Manually_Annotated", "Manually_Annotated_Images"),
                  os.path.join("Manually_Annotated_compressed", "Manually_Annotated_Images"))
CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
               "facial_landmarks", "expression", "valence", "arousal")


@dataclasses.dataclass
class CsvRow:
  where: str                       # "<file>:<line>"
  rel: str                         # subDirectory_filePath
  box: tuple                       # (x0, y0, x1, y1) pixels
  landmarks: np.ndarray | None     # [68, 2] pixels
  expression: int


def read_csv(path: str) -> list[CsvRow]:
  """Rows of an AffectNet file list; a malformed row stops the build naming file and line.

  The columns are found by name when the first row is the header, else taken in the release's
  order (CSV_COLUMNS).
  """
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    col = {c: i for i, c in enumerate(CSV_COLUMNS)}
    for ln, row in enumerate(reader, 1):
      if not row or all(not c.strip() for c in row):
        continue
      if ln == 1 and row[0].strip().lower() == CSV_COLUMNS[0].lower():
        head = {c.strip().lower(): i for i, c in enumerate(row)}
        missing = [c for c in CSV_COLUMNS[:7] if c.lower() not in head]
        if missing:
          raise common.LabelFileError(path, 1, f"header lacks columns {missing}")
        col = {c: head[c.lower()] for c in CSV_COLUMNS if c.lower() in head}
        continue
      try:
        if len(row) <= max(col[c] for c in CSV_COLUMNS[:7]):
          raise ValueError(f"{len(row)} fields, expected {len(CSV_COLUMNS)}")
        x, y, w, h = (float(row[col[c]]) for c in CSV_COLUMNS[1:5])
        expr = float(row[col["expression"]])
        if expr != int(expr) or not 0 <= expr <= 10:
          raise ValueError(f"expression {row[col['expression']]!r} is not an integer 0-10")
        lm_text = row[col["facial_landmarks"]].strip()
        lm = None
        if lm_text:
          vals = [float(v) for v in lm_text.split(";") if v.strip()]
          if len(vals) != 2 * common.NUM_LANDMARKS:
            raise ValueError(f"{len(vals)} landmark values, expected "
                             f"{2 * common.NUM_LANDMARKS} ('x1;y1;x2;y2;...')")
          lm = np.asarray(vals, np.float64).reshape(common.NUM_LANDMARKS, 2)
      except ValueError as e:
        raise common.LabelFileError(path, ln, f"bad row ({e})") from None
      rel = row[col["subDirectory_filePath"]].strip().replace("\\", "/")
      rows.append(CsvRow(f"{os.path.basename(path)}:{ln}", rel, (x, y, x + w, y + h), lm,
                         int(expr)))
  if not rows:
    raise common.LabelFileError(path, None, "no rows")
  return rows


def _load_npy(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - any unreadable label is fatal, named
    raise common.LabelFileError(path, None, f"unreadable .npy ({type(e).__name__}: {e})") from e


def read_label(path: str) -> int:
  arr = _load_npy(path)
  try:
    val = float(arr.item()) if arr.size == 1 else None   # stored as '3' (str) or 3
    label = int(val) if val is not None and val == int(val) else None
  except (TypeError, ValueError):
    label = None
  if label is None or not 0 <= label <= 10:
    raise common.LabelFileError(path, None, f"expression must be one integer 0-10, got {arr!r}")
  return label


def read_landmarks(path: str) -> np.ndarray:
  arr = _load_npy(path)
  try:
    arr = np.asarray(arr, np.float64).reshape(common.NUM_LANDMARKS, 2)
  except (TypeError, ValueError):
    raise common.LabelFileError(path, None, f"expected 136 landmark values, got {arr.shape}") \
        from None
  return arr
