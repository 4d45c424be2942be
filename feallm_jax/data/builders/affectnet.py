"""AffectNet (Mollahosseini et al., 2017), manually annotated subset in the common npy layout."""
from __future__ import annotations

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
Request AffectNet from http://mohammadmahoor.com/affectnet/ and place in manual_dir:
  manual_dir/train_set/images/<n>.jpg
  manual_dir/train_set/annotations/<n>_exp.npy   expression 0-7 (8-10 = none/uncertain/non-face)
  manual_dir/train_set/annotations/<n>_lnd.npy   optional: 68 landmarks, 136 pixel values x,y
  manual_dir/val_set/images/...  and  manual_dir/val_set/annotations/...   (-> split 'test')
"""

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
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
