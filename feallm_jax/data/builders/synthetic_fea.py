"""The embedded synthetic FEA set: procedural AU-controlled faces from data/synthetic.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from feallm_jax.data.builders import common

# tfds split -> synthetic.generate split (its splits draw identities from disjoint pools).
GEN_SPLIT = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass
class SyntheticFeaConfig(tfds.core.BuilderConfig):
  # Rendering + encoding costs ~7 ms a face on one core: 5800 faces build in ~45 s.
  num_train: int = 4800
  num_validation: int = 400
  num_test: int = 600
  image_size: int = 128
  seed: int = 0


class SyntheticFea(common.FeaBuilder):
  """Deterministic given (config, seed): a rebuild yields byte-identical records."""

  name = "synthetic_fea"
  BUILDER_CONFIGS = [
      SyntheticFeaConfig(name="default", description="4800/400/600 faces at 128 px"),
      SyntheticFeaConfig(name="hires", image_size=256,
                         description="the default faces rendered at 256 px (a photo larger "
                                     "than the ViT's input: the LCA crops from it)"),
      SyntheticFeaConfig(name="small", num_train=96, num_validation=16, num_test=32,
                         description="tiny set for tests"),
  ]
  DESCRIPTION = "Procedurally rendered faces with known AUs, emotion and landmarks."

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
    return {s: self._examples(s, n) for s, n in sizes.items() if n > 0}

  def _examples(self, split, n):
    from feallm_jax.data import synthetic  # lazy: only this builder needs the renderer
    cfg = self.builder_config

    def make(i):
      rec = synthetic.generate(i, split=GEN_SPLIT[split], seed=cfg.seed,
                               image_size=cfg.image_size)
      return from_generated(rec, f"{split}_{i:06d}")

    return self._guarded(split, ((f"{i:06d}", i) for i in range(n)), make)


def from_generated(rec: dict, rid: str) -> dict:
  """A synthetic.generate() record (uint8 image) as a common record (JPEG image)."""
  img = rec["image"]
  if isinstance(img, np.ndarray):
    img = Image.fromarray(np.asarray(img, np.uint8))
  image = common.encode_jpeg(common.to_rgb(img))
  lm = rec.get("landmarks")
  has_lm = bool(rec.get("has_landmarks", lm is not None))
  return common.make_record(
      str(rec.get("id") or rid), image, landmarks=lm if has_lm else None,
      emotion=int(rec.get("emotion", -1)), au_present=rec.get("au_present"),
      au_intensity=rec.get("au_intensity"), subject=str(rec.get("subject", "")),
      conversations=str(rec.get("conversations", "")))
