"""Stage 0 lever (measured, not the shipped recipe): caption fine-tuning of the shipped CLIP ViT.

  python -m launch.pretrain_backbones --config=configs/pretrain_tiny_caption.py \
      --out=runs/base_caption --reuse_llm_from=feallm_jax/assets/base_tiny

The ViT of ``feallm_jax/assets/base_tiny`` continues with CapPa-style captioning (a small decoder
reads its F_L patch tokens and predicts the caption; half the rows blind, see
``feallm_jax/pretrain/clip.py``) on the same 48,000 train-pool faces. Measured on 2026-12-05 (the
linear probe of ``stage0.json``, 600 test-pool faces; shipped ViT: FER 0.878, AU mean F1 0.777,
AU10/17/24 0.57/0.26/0.00): step 500 FER 0.855, AU 0.766 (0.48/0.14/0.00); step 1000 FER 0.895,
AU 0.777 (0.28/0.27/0.00). Emotion improves; the faint AUs do not.
"""

import ml_collections

from feallm_jax import config_files
from feallm_jax.pretrain import SHIPPED_BASE

pretrain_tiny = config_files.sibling(__file__, "pretrain_tiny")


def get_config() -> ml_collections.ConfigDict:
  c = pretrain_tiny.get_config()
  c.probe_every = 500
  c.clip.update(dict(steps=1500, lr=5e-4, warmup=100, caption_weight=1.0, contrastive_weight=0.0,
                     parallel_fraction=0.5, caption_feature_layer=-2, init_vision=SHIPPED_BASE))
  return c
