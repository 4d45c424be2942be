"""Tiny FEALLM on the synthetic FEA set: the CPU default (`make quickstart`).

Stage 1 of the paper's recipe on pretrained tiny backbones: the base checkpoint shipped in
``feallm_jax/assets/base_tiny`` (stage 0, made by ``launch/pretrain_backbones.py
--config=configs/pretrain_tiny.py``: a CLIP-style ViT and a text-pretrained LLaMA-style LLM) is
loaded like an imported CLIP + Vicuna pair, and the LCA + projector start from the shipped aligned
adapter (stage 0.5, ``launch/align_adapter.py``). The vision tower is frozen; LoRA adapts the LLM;
the Local Clue Aggregator and the Multi-perspective Projector train. Override anything from the
command line, e.g. ``--config.model.local_clues=False --config.model.projector=mlp
--config.model.init_adapter=DIR`` (the ablation, with an adapter aligned for it).
"""

import ml_collections

from feallm_jax.pretrain import SHIPPED_ADAPTER, SHIPPED_BASE


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "tiny_synthetic"
  c.seed = 0

  # Mesh: sizes may be -1 (= the remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-process launches (TPU pods, multi-host GPU) set this to call jax.distributed.initialize().
  c.distributed = False

  m = c.model = ml_collections.ConfigDict()
  # Backbone dims are the shipped base checkpoint's (its meta.json decides; these must agree).
  m.vision = ml_collections.ConfigDict(dict(
      hf_path="", image_size=128, patch_size=32, hidden_size=128, intermediate_size=256,
      num_layers=3, num_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu"))
  # Decoder LM (LLaMA / Qwen2 architecture). vocab_size=0 = take it from the tokenizer.
  m.llm = ml_collections.ConfigDict(dict(
      hf_path="", model_type="llama", vocab_size=0, hidden_size=192, intermediate_size=512,
      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=48, rope_theta=10000.0,
      rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=1024))
  # Orbax checkpoint in launch/import_hf.py's format ('' = none; backbones start random).
  m.base_checkpoint = SHIPPED_BASE
  # LCA + projector (+ label head) from adapter alignment ('' = fresh): the shipped one, made by
  # `python -m launch.align_adapter --out=DIR` on the shipped base with this config.
  m.init_adapter = SHIPPED_ADAPTER
  # FEALLM heads.
  m.feature_layer = -2                 # F_L: hidden state index (HF hidden_states order)
  m.multi_layers = (1, 2)              # F_s: hidden states concatenated along tokens
  m.local_clues = True                 # Local Clue Aggregator on/off
  m.projector = "multi_perspective"    # or "mlp" (LLaVA-1.5 two-layer MLP on F_L)
  m.projector_heads = 4
  # Auxiliary emotion/AU label loss on the visual tokens (models/label_head.py): not in the paper
  # (0 = its next-token loss alone); > 0 builds the head and adds weight x label loss.
  m.label_loss_weight = 1.0
  m.lca = ml_collections.ConfigDict(dict(
      num_regions=16, crop_size=24, depth=3, width=48, norm="group", shared=True, num_heads=4))
  # Freeze policy (the paper's): frozen ViT, LoRA on the LLM, LCA + projector trained.
  m.train_llm = "lora"
  m.train_vision = False
  m.lora = ml_collections.ConfigDict(dict(
      rank=32, alpha=64.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
  # Precision: trainable weights in param_dtype; frozen backbone weights in frozen_dtype.
  m.param_dtype = "float32"
  m.frozen_dtype = "float32"
  m.compute_dtype = "float32"
  m.remat = False
  # LLM layers as one lax.scan in training and scoring: XLA compiles one layer body, so the
  # 7B TPU compile fits in host RAM (decoding keeps the per-layer loop).
  m.scan_layers = False
  # LLM causal attention: 'xla' (reference), 'splash' (Pallas TPU flash kernel), 'cudnn' (GPU),
  # or 'auto' (splash on TPU, cuDNN on GPU where it accepts the shapes, else XLA).
  m.attention = "xla"

  d = c.data = ml_collections.ConfigDict()
  d.dataset = "synthetic_fea"
  d.builder_config = "default"
  d.data_dir = "runs/data"
  d.manual_dir = ""
  d.tokenizer = ""          # '' = the tiny tokenizer shipped in feallm_jax/assets
  d.max_len = 80            # longest synthetic conversation is 80 tiny-tokenizer tokens
  d.batch_size = 32         # global batch
  d.eval_batch_size = 64
  d.tasks = ("fer", "aur", "joint", "reasoning")
  d.augment = True
  d.num_workers = 0         # >0 uses Grain mp_prefetch
  d.regions = "canonical"   # 'canonical' boxes on aligned faces, or 'landmarks'
  # Resolution the LCA crops its regions from when it differs from the ViT's input (e.g. a 336 px
  # CLIP on larger photos); 0 = crop from the ViT's input, here the stored 128 px face.
  d.lca_image_size = 0
  # Examples that cannot be fitted (image past max_len, no answer left, undecodable image, ...)
  # are dropped and counted; the run stops when more than this fraction of the examples drawn
  # (counted once drop_check_after were drawn) were dropped, and refuses to start when all of
  # the first fit_check_examples would be.
  d.rare_au_repeat = 3      # records showing an AU rarer than rare_au_frequency: 3 x per epoch
  d.rare_au_frequency = 0.08
  d.max_dropped_fraction = 0.01
  d.drop_check_after = 1000
  d.fit_check_examples = 256

  # Adapter alignment (LLaVA's first stage: `python -m launch.align_adapter`): LCA + projector
  # on captioned stage-0 faces (train pools of seeds 1..10, minimal pairs), towers frozen.
  c.align = ml_collections.ConfigDict(dict(
      seeds=tuple(range(1, 11)), faces_per_seed=1200, render_size=128, minimal_pairs=True,
      steps=2000, batch_size=32, lr=1e-3, weight_decay=0.0, warmup=50, pair_fraction=0.5,
      max_len=96))

  o = c.optim = ml_collections.ConfigDict()
  # Tiny towers take larger steps than the 7B LoRA fine-tuning defaults (1e-4 / 2e-5).
  o.lr_lora = 1e-3          # LoRA adapters
  o.lr_proj = 1e-3          # projector and Local Clue Aggregator
  o.lr_base = 1e-3          # fully trained backbone weights (none in this recipe)
  o.warmup_frac = 0.03
  o.schedule = "cosine"
  o.weight_decay = 0.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.grad_clip = 1.0
  o.accum_steps = 1

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 800         # sized so `make quickstart` fits 15 minutes on 2 CPU cores
  t.log_every = 10
  t.save_every = 200
  t.keep = 2
  t.eval_every = 0          # 0 = only at the end
  t.final_eval = True       # evaluate eval.suites once training ends
  t.progress = True         # tqdm progress bar
  t.max_bad_steps = 5       # consecutive non-finite steps before the run stops

  e = c.eval = ml_collections.ConfigDict()
  e.suites = ("synthetic_fea",)
  e.mode = "generate"       # or "score"
  e.max_new_tokens = 64     # longest synthetic answer is 58 tokens
  e.batch_size = 64
  e.num_samples = 200       # per task; 0 = the whole split
  # The decoder's matmuls in evaluation (generate / score / predict): "bfloat16" halves the
  # bytes a decode step streams (bf16 kernels, float32 accumulation); not bit-identical.
  e.matmul_dtype = "float32"
  return c
