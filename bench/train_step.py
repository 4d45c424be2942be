"""Train-step benchmark; prints one JSON line.

  python bench/train_step.py --config=configs/bench_small.py --mode=full|lora [--fsdp=8]
      [--projector=mlp --local_clues=False] [--steps=5]
  python bench/train_step.py --config=configs/bench_small.py --reference=torch

JAX: median step time, tokens/s (LLM sequence incl. visual tokens), compiled FLOPs (XLA cost
analysis), achieved GFLOP/s, per-device memory (memory_analysis and the bytes of params +
optimizer state actually placed on device 0), trainable/frozen parameter counts.
torch: HF ``LlavaForConditionalGeneration`` at the same dims, random init, AdamW, full training.
"""

import argparse
import json
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_small.py"))
  p.add_argument("--mode", choices=("full", "lora"), default="full")
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--projector", default="")
  p.add_argument("--local_clues", default="")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--reference", choices=("", "torch"), default="")
  return p.parse_args()


def _load_config(path):
  from feallm_jax import config_files
  return config_files.get_config(path)


def _apply(config, args):
  m = config.model
  if args.mode == "lora":
    m.train_llm, m.train_vision = "lora", False
  else:                       # everything trains, as in the torch reference
    m.train_llm, m.train_vision = "full", True
  if args.projector:
    m.projector = args.projector
  if args.local_clues:
    m.local_clues = args.local_clues.lower() in ("1", "true", "yes")
  config.mesh.update(data=1, fsdp=args.fsdp, tensor=1)
  return config


def _batch(config, image_token_id, vocab):
  import numpy as np
  rng = np.random.default_rng(0)
  b, t, s = config.data.batch_size, config.data.max_len, config.model.vision.image_size
  ids = rng.integers(10, min(vocab, 1000), (b, t)).astype(np.int32)
  ids[:, 1] = image_token_id
  boxes = np.tile(np.array([0.2, 0.2, 0.5, 0.5], np.float32), (b, 16, 1))
  return dict(image=rng.standard_normal((b, s, s, 3)).astype(np.float32), regions=boxes,
              input_ids=ids, attention_mask=np.ones((b, t), np.int32),
              loss_mask=np.concatenate([np.zeros((b, t // 2), np.int32),
                                        np.ones((b, t - t // 2), np.int32)], 1))


def bench_jax(args):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(args.fsdp, 1)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from feallm_jax import sharding
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.models import feallm
  from feallm_jax.train import step as step_lib

  config = _apply(_load_config(args.config), args)
  mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:args.fsdp])
  model = feallm.build_model(config, mesh)
  counts = feallm.parameter_counts(model, config)["total"]
  seq = feallm.expanded_length(config, config.data.max_len)
  tok = tok_lib.load(config.data.tokenizer)
  batch_np = _batch(config, tok_lib.image_token_id(tok), int(config.model.llm.vocab_size))
  tr = step_lib.Trainer(config, model, mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(config))
  del model
  state = tr.initial_state()
  batch = tr.put_batch(batch_np)
  dev0 = jax.devices()[0]

  def on_dev0(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == dev0)
  state_bytes = on_dev0(state.params) + on_dev0(state.opt_state)
  frozen_bytes = on_dev0(tr.frozen)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = tr.lower(batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  mem = compiled.memory_analysis()
  times = []
  for i in range(args.steps + 1):
    t0 = time.perf_counter()
    state, m = tr.step(state, batch)
    jax.block_until_ready(m)
    if i:                       # the first call includes dispatch warm-up
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  tokens = config.data.batch_size * seq
  return dict(
      impl="jax", mode=args.mode, fsdp=args.fsdp, projector=config.model.projector,
      local_clues=bool(config.model.local_clues), batch=config.data.batch_size, seq_len=seq,
      devices=len(mesh.devices.flat), median_step_s=med, steps_per_s=1 / med,
      tokens_per_s=tokens / med, compiled_flops=flops,
      achieved_gflops_per_s=flops * len(mesh.devices.flat) / med / 1e9,
      compile_s=compile_s, loss=float(m["loss"]),
      memory_per_device=dict(
          argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
          temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
          params_and_opt_state_bytes=int(state_bytes), frozen_bytes=int(frozen_bytes)),
      params=dict(trainable=int(counts["trainable"]), frozen=int(counts["frozen"])))


def bench_torch(args):
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  config = _load_config(args.config)
  v, l = config.model.vision, config.model.llm
  vcfg = CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size,
                          hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                          projection_dim=v.hidden_size)
  lcfg = LlamaConfig(vocab_size=l.vocab_size + 8, hidden_size=l.hidden_size,
                     intermediate_size=l.intermediate_size, num_hidden_layers=l.num_layers,
                     num_attention_heads=l.num_heads, num_key_value_heads=l.num_kv_heads,
                     max_position_embeddings=2048)
  image_token = l.vocab_size + 1
  cfg = LlavaConfig(vision_config=vcfg, text_config=lcfg, image_token_index=image_token,
                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                    projector_hidden_act="gelu")
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  b, t = config.data.batch_size, config.data.max_len
  n_img = (v.image_size // v.patch_size) ** 2
  g = torch.Generator().manual_seed(0)
  text = torch.randint(10, 1000, (b, t - 1), generator=g)
  ids = torch.cat([text[:, :1], torch.full((b, n_img), image_token), text[:, 1:]], 1)
  labels = ids.clone()
  labels[:, : 1 + n_img + t // 2] = -100
  pixels = torch.randn(b, 3, v.image_size, v.image_size, generator=g)
  times = []
  for i in range(args.steps + 1):
    t0 = time.perf_counter()
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  seq = ids.shape[1]
  return dict(impl="torch", model="LlavaForConditionalGeneration", mode="full", batch=b,
              seq_len=seq, threads=torch.get_num_threads(), median_step_s=med,
              steps_per_s=1 / med, tokens_per_s=b * seq / med, loss=float(out.loss),
              params=dict(trainable=sum(p.numel() for p in model.parameters()), frozen=0))


def main():
  args = _args()
  out = bench_torch(args) if args.reference == "torch" else bench_jax(args)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
