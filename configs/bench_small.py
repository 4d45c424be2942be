"""Benchmark model for bench/train_step.py: ViT-S/16-sized vision tower, a 512-wide 8-layer LLM.

Random init (no checkpoints); the bench picks full or LoRA mode with ``--mode``.
"""

import ml_collections

from feallm_jax import config_files

tiny_synthetic = config_files.sibling(__file__, "tiny_synthetic")


def get_config() -> ml_collections.ConfigDict:
  c = tiny_synthetic.get_config()
  c.name = "bench_small"
  m = c.model
  m.vision.update(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                  num_layers=6, num_heads=6)
  m.llm.update(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=8,
               num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=2048)
  m.multi_layers = (2, 4, 6)
  m.init_adapter = ""            # the shipped adapter fits the tiny towers only
  m.label_loss_weight = 0.0      # the paper's model and objective
  m.projector_heads = 8
  m.train_llm, m.train_vision = "full", False
  m.lora.update(rank=8, alpha=16.0, dropout=0.0)
  c.data.max_len = 64            # text tokens per example
  c.data.batch_size = 8
  c.optim.update(lr_lora=1e-4, lr_proj=1e-4, lr_base=1e-4, warmup_frac=0.0)
  c.train.num_steps = 1000
  return c
