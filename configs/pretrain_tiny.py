"""Stage 0 for the CPU quickstart: the tiny backbones shipped in feallm_jax/assets/base_tiny.

  python -m launch.pretrain_backbones --config=configs/pretrain_tiny.py --out=runs/base_tiny

Vision: the tiny CLIP ViT, pretrained CLIP-style on captioned synthetic faces of 6000 train-pool
identities (seeds 1-10; the instruction set is seed 0 and its test pool is never rendered here).
LLM: a LLaMA-architecture decoder pretrained on text (captions, caption-grounded instructions,
FACS glossary). Architectures match the ones tiny_synthetic.py used to train from scratch.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = ""            # '' = the tiny tokenizer in feallm_jax/assets
  c.seeds = tuple(range(1, 11))
  c.faces_per_seed = 4800
  c.render_size = 128         # what the synthetic_fea builder stores
  c.workers = 0               # render processes (0 = every core)
  c.probe_faces = 600         # identity-disjoint test faces for the linear probe (measure only)
  c.vision = ml_collections.ConfigDict(dict(
      image_size=128, patch_size=32, hidden_size=128, intermediate_size=256, num_layers=3,
      num_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu"))
  c.clip = ml_collections.ConfigDict(dict(
      steps=3000, batch_size=128, lr=1e-3, weight_decay=0.05, warmup=100, embed_dim=128,
      text_width=128, text_layers=2, text_heads=4, max_len=96))
  c.llm = ml_collections.ConfigDict(dict(
      model_type="llama", hidden_size=192, intermediate_size=512, num_layers=3, num_heads=4,
      num_kv_heads=2, head_dim=48, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=False, max_position_embeddings=1024))
  c.lm = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=32, max_len=176, lr=2e-3, weight_decay=0.01, warmup=100))
  return c
