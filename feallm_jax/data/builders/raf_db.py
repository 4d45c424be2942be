"""RAF-DB basic set (Li, Deng & Du, CVPR 2017): 7 basic emotions, official train/test split.

Config ``original`` reads the full photos; many are group photos, so the face is cropped with
the release's own box, ``Annotation/boundingbox/<name>_boundingbox.txt`` ("x0 y0 x1 y1" in
pixels), when it is there, and only found by the Haar detector (the largest face) when not:
the largest face of a group photo need not be the labelled one.
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from feallm_jax.data import facs
from feallm_jax.data.builders import common


@dataclasses.dataclass
class RafDbConfig(tfds.core.BuilderConfig):
  aligned: bool = True   # Image/aligned (100x100 aligned faces) or Image/original + face detection


class RafDb(common.FeaBuilder):
  """RAF-DB basic: labels 1-7 (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral)."""

  name = "raf_db"
  BUILDER_CONFIGS = [
      RafDbConfig(name="aligned", description="official aligned 100x100 faces"),
      RafDbConfig(name="original", aligned=False,
                  description="original photos, face detected and cropped at build time"),
  ]
  DESCRIPTION = "RAF-DB basic emotion set (7 classes)."
  HOMEPAGE = "http://www.whdeng.cn/RAF/model1.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request RAF-DB from http://www.whdeng.cn/RAF/model1.html and place the basic set in manual_dir:
  manual_dir/EmoLabel/list_patition_label.txt   lines 'train_00001.jpg 5' (labels 1-7)
  manual_dir/Image/aligned/train_00001_aligned.jpg ...   (config 'aligned', default)
  manual_dir/Image/original/train_00001.jpg ...          (config 'original')
  manual_dir/Annotation/boundingbox/train_00001_boundingbox.txt   ('original': the face box
                                                 'x0 y0 x1 y1'; without it the face is detected)
"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    label_file = self._require(os.path.join(root, "EmoLabel", "list_patition_label.txt"),
                               "the label list")
    sub = "aligned" if self.builder_config.aligned else "original"
    img_dir = self._require(os.path.join(root, "Image", sub), f"the {sub} image folder")
    rows = parse_labels(label_file)
    box_dir = os.path.join(root, "Annotation", "boundingbox")
    return {
        split: self._examples(split, [r for r in rows if r[0].startswith(split + "_")], img_dir,
                              box_dir)
        for split in ("train", "test")
    }

  def _examples(self, split, rows, img_dir, box_dir):
    aligned = self.builder_config.aligned

    def make(row):
      name, label = row
      stem = os.path.splitext(name)[0]
      path = common.find_image(img_dir, stem + "_aligned" if aligned else stem)
      if path is None:
        raise common.SkipImage(f"{stem}: image file missing in {img_dir}")
      box = None
      if not aligned:
        box_path = os.path.join(box_dir, f"{stem}_boundingbox.txt")
        box = read_box(box_path) if os.path.isfile(box_path) else None
        self.noted.add(split, "official_box" if box else "detected_face",
                       f"{stem}: {box_path if box else 'no ' + box_path + ', face detected'}")
      image, _ = common.load_face(path, stem, detect=not aligned, box_px=box)
      emo = facs.dataset_label_to_index("raf_db", label, one_based=True)
      return common.make_record(stem, image, emotion=emo)

    return self._guarded(split, ((os.path.splitext(r[0])[0], r) for r in rows), make)


def read_box(path: str) -> tuple[float, float, float, float]:
  """(x0, y0, x1, y1) pixels from a RAF-DB *_boundingbox.txt; malformed -> LabelFileError."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    vals = [float(v) for v in text.replace(",", " ").split()]
  except ValueError:
    vals = []
  if len(vals) != 4 or not (vals[2] > vals[0] and vals[3] > vals[1]):
    raise common.LabelFileError(path, 1, f"expected 'x0 y0 x1 y1' with x1 > x0, y1 > y0, got "
                                f"{text.strip()!r}")
  return tuple(vals)


def parse_labels(path: str) -> list[tuple[str, int]]:
  """[(image name, 1-based label)]; any malformed line stops the build naming file and line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for ln, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.split()
      if len(parts) != 2:
        raise common.LabelFileError(path, ln, f"expected '<image> <label>', got {line!r}")
      name, lab = parts
      if not (name.startswith("train_") or name.startswith("test_")):
        raise common.LabelFileError(path, ln, f"image name {name!r} is not train_*/test_*")
      try:
        label = int(lab)
      except ValueError:
        raise common.LabelFileError(path, ln, f"label {lab!r} is not an integer") from None
      if not 1 <= label <= len(facs.RAF_DB):
        raise common.LabelFileError(path, ln, f"label {label} outside 1..{len(facs.RAF_DB)}")
      rows.append((name, label))
  if not rows:
    raise common.LabelFileError(path, None, "no labels")
  return rows
