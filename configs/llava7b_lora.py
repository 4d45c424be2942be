"""FEALLM at paper scale: CLIP ViT-L/14-336 + LLaMA-2-7B (Vicuna-7B-v1.5 layout), LoRA r=128.

Set the weights first (nothing is downloaded):
  python launch/import_hf.py --vision=/path/clip-vit-large-patch14-336 \
      --llm=/path/vicuna-7b-v1.5 --out=/path/base7b
  python launch/train.py --config=configs/llava7b_lora.py --workdir=gs://…/run \
      --config.model.base_checkpoint=/path/base7b --config.data.tokenizer=/path/vicuna-7b-v1.5
(or set model.vision.hf_path / model.llm.hf_path to local HF dirs instead of base_checkpoint).

Mesh shapes (``--config.mesh.data=… --config.mesh.fsdp=…``), global batch 128 = 8 micro-batches
of 16 (``data.batch_size`` is the global batch per update, ``optim.accum_steps`` splits it):
  TPU v5e-8  (8 x 16 GB):   data=1, fsdp=8, tensor=1   bf16 frozen base is sharded 8 ways
  TPU v6e-8  (8 x 32 GB):   data=1, fsdp=8, tensor=1
  TPU v5p-8  (4 chips):     data=1, fsdp=4, tensor=1
  TPU v4-32  (16 chips):    data=2, fsdp=8, tensor=1   (set --config.distributed=True)
  8-GPU host (8 x 80 GB):   data=8, fsdp=1, tensor=1   (or data=2, fsdp=4 on 40 GB cards)
Check a mesh before queueing for it: ``python launch/aot_compile.py --config=configs/llava7b_lora.py
--topology=v5e-8`` compiles the step for that slice on any machine (README).
"""

import ml_collections

from feallm_jax import config_files

tiny_synthetic = config_files.sibling(__file__, "tiny_synthetic")


def get_config() -> ml_collections.ConfigDict:
  c = tiny_synthetic.get_config()
  c.name = "llava7b_lora"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  m = c.model
  # CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336).
  m.vision = ml_collections.ConfigDict(dict(
      hf_path="", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
      num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu"))
  # LLaMA-2-7B architecture.
  m.llm = ml_collections.ConfigDict(dict(
      hf_path="", model_type="llama", vocab_size=32000, hidden_size=4096,
      intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
      max_position_embeddings=4096))
  m.base_checkpoint = ""      # REQUIRED: set this or both hf_path values (see docstring)
  m.init_adapter = ""         # or a dir from launch/align_adapter.py on this base checkpoint
  m.label_loss_weight = 0.0   # the paper's objective: the next-token loss alone
  m.feature_layer = -2
  m.multi_layers = (4, 8, 12, 16, 20, 24)
  m.projector_heads = 16
  m.lca.update(width=256, num_heads=8)
  m.train_llm = "lora"
  m.train_vision = False
  m.lora = ml_collections.ConfigDict(dict(
      rank=128, alpha=256.0, dropout=0.05, targets=("q", "k", "v", "o", "gate", "up", "down")))
  m.param_dtype = "float32"   # trainable: LoRA, projector, LCA
  m.frozen_dtype = "bfloat16"
  m.compute_dtype = "bfloat16"
  m.remat = True
  # Causal attention: 'auto' = Pallas splash attention on TPU (no [B, heads, T, T] logits; the
  # v5e-8 step at 2048 tokens does not fit in 15.75 GiB with the XLA path, 17.0 GiB measured),
  # cuDNN on GPU where it accepts the shapes, else XLA.
  m.attention = "auto"
  # LLM layers as one lax.scan in training and scoring: XLA compiles one layer body, so the
  # 7B TPU compile fits in host RAM (decoding keeps the per-layer loop).
  m.scan_layers = True

  d = c.data
  d.dataset = "llava_instruct"
  d.tokenizer = ""            # REQUIRED: the LLM's HF tokenizer dir
  d.max_len = 2048
  d.batch_size = 128          # global batch per optimizer update (split into accum_steps)
  d.num_workers = 8

  o = c.optim
  o.lr_lora = 1e-4
  o.lr_proj = 2e-5
  o.lr_base = 2e-5
  o.warmup_frac = 0.03
  o.schedule = "cosine"
  o.weight_decay = 0.0
  o.accum_steps = 8           # micro-batches of 16 (2 per chip on 8 chips)

  t = c.train
  t.num_steps = 5000
  t.log_every = 10
  t.save_every = 500
  t.keep = 3
  # Multi-host SIGTERM: JAX's preemption service agrees on the stop step (no per-step collective);
  # only when it is disabled is the flag all-gathered, every this many steps.
  t.preemption_check_every = 10
  # Checked before the first step (feallm_jax/preflight.py): known names, datasets built.
  c.eval.suites = ("raf_db", "affectnet_7", "affectnet_8", "bp4d", "disfa")
  c.eval.num_samples = 0      # whole splits
  # train_and_evaluate refuses to start (clear error) while the placeholders above are unset.
  c.require_pretrained = True
  return c
