"""Analytic model FLOPs of FEALLM (the "useful work" of a step, as in PaLM's MFU), per example.

A matmul of an ``[n, k]`` input with a ``[k, m]`` weight costs ``2nkm`` forward. Backward costs
``2nkm`` for the input gradient and ``2nkm`` for the weight gradient, and only what is needed
is counted (XLA prunes the rest too)::

  trainable weight, on the gradient path        6 x (matmul params) x tokens
  frozen weight, on the gradient path (LLM)      4 x (matmul params) x tokens   (fwd + dX)
  frozen weight, off it (vision tower)           2 x (matmul params) x tokens   (fwd only)
  causal self-attention, T tokens, per layer     fwd 2 T^2 H Dh  (QK^T + PV, lower triangle)
                                                 fwd+bwd 3 x fwd
  full attention, T queries over S keys          fwd 4 T S H Dh

For a LoRA step (``train_llm='lora'``), with L = text_len - 1 + 576 (+1 F_local) LLM tokens::

  train = 2 P_vit N_v + 4 n_v N_v^2 d_v                    (vision, forward only)
        + 3 F_heads + F_crop                               (LCA + projector: fwd + dX + dW;
                                                            an upper bound: inputs from the
                                                            frozen towers need no dX)
        + 4 P_llm L + 6 P_lora L + 4 d V L                 (LLM matmuls, LoRA, lm_head)
        + 3 x 2 n_l L^2 H Dh                               (causal attention)

``P_llm`` counts the decoder's matmul weights (q, k, v, o, gate, up, down; not embeddings or
norms), ``P_lora`` the adapters' ``r (in + out)`` per target. ``train_llm='full'`` makes the LLM
terms 6x; ``'frozen'`` drops LoRA. Elementwise work (norms, softmax, RoPE, the optimizer) is
not model FLOPs. Prefill is the forward alone (the logits of the last slot only); a decode
step is one token against an ``S``-slot cache.
"""

from __future__ import annotations

from typing import Any


def _llm_params(spec) -> tuple[int, int]:
  """(matmul weights per decoder, LoRA adapter weights per decoder)."""
  c = spec.llm
  d, m, dh = c.hidden_size, c.intermediate_size, c.head_dim
  shapes = dict(q=(d, c.num_heads * dh), k=(d, c.num_kv_heads * dh), v=(d, c.num_kv_heads * dh),
                o=(c.num_heads * dh, d), gate=(d, m), up=(d, m), down=(m, d))
  base = sum(i * o for i, o in shapes.values()) * c.num_layers
  lora = 0
  if spec.train_llm == "lora" and spec.lora is not None:
    lora = sum(spec.lora.rank * (i + o) for name, (i, o) in shapes.items()
               if name in spec.lora.targets) * c.num_layers
  return base, lora


def vision_forward(spec) -> float:
  v = spec.vision
  n = v.num_patches + 1
  d, m = v.hidden_size, v.intermediate_size
  patch = 2 * v.num_patches * (v.patch_size ** 2 * 3) * d
  per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
  return float(patch + v.num_layers * per_layer)


def heads_forward(spec) -> float:
  """Local Clue Aggregator + projector, forward, per example."""
  v, dl = spec.vision, spec.llm.hidden_size
  dv, n = v.hidden_size, v.num_patches
  total = 0.0
  if spec.lca is not None:
    c = spec.lca
    r, s, w = c.num_regions, c.crop_size, c.width
    cin, size = 3, s
    for _ in range(c.depth):
      size = -(-size // 2)
      total += 2 * r * size * size * 9 * cin * w
      cin = w
    total += 2 * r * 4 * w * w + 4 * r * r * w                          # region self-attention
    total += 2 * r * w * dl                                             # F_local (flattened)
    if spec.projector == "multi_perspective":
      total += 2 * r * w * dv                                           # F'_local
  if spec.projector == "mlp":
    return total + 2 * n * (dv * dl + dl * dl)
  m = n * len(spec.multi_layers)
  total += 2 * n * dv * dv * 2 + 2 * m * dv * dv * 2 + 4 * n * m * dv  # global cross-attention
  if spec.lca is not None:
    r = spec.lca.num_regions
    total += 2 * n * dv * dv * 2 + 2 * r * dv * dv * 2 + 4 * n * r * dv  # local cross-attention
  total += 2 * n * 4 * dv * dv + 4 * n * n * dv                         # self-attention
  total += 2 * n * (dv * dl + dl * dl)                                  # MLP
  return float(total)


def crop_forward(spec) -> float:
  """The LCA's separable bilinear crops (no weights: forward only)."""
  if spec.lca is None:
    return 0.0
  c, img = spec.lca, spec.vision.image_size
  return float(2 * c.num_regions * c.crop_size * img * img * 3
               + 2 * c.num_regions * c.crop_size ** 2 * img * 3)


def llm_tokens(spec, text_len: int) -> int:
  return spec.expanded_length(text_len)


def train_step(spec, text_len: int) -> dict[str, float]:
  """Model FLOPs of one training example, by part (see the module docstring)."""
  c = spec.llm
  length = llm_tokens(spec, text_len)
  base, lora = _llm_params(spec)
  llm_mult = 6 if spec.train_llm == "full" else 4
  vis_mult = 6 if spec.train_vision else 2
  attn_fwd = 2.0 * c.num_layers * length * length * c.num_heads * c.head_dim
  parts = dict(
      vision=vis_mult / 2 * vision_forward(spec),
      heads=3 * heads_forward(spec) + crop_forward(spec),
      llm_matmuls=float(llm_mult * base * length),
      lora=float(6 * lora * length),
      lm_head=float(llm_mult * c.hidden_size * c.vocab_size * length),
      attention=3 * attn_fwd)
  parts["total"] = sum(parts.values())
  return parts


def prefill(spec, text_len: int) -> dict[str, float]:
  """Forward of one prompt: vision, heads, the decoder over L tokens, logits of the last slot."""
  c = spec.llm
  length = llm_tokens(spec, text_len)
  base, lora = _llm_params(spec)
  parts = dict(vision=vision_forward(spec), heads=heads_forward(spec) + crop_forward(spec),
               llm_matmuls=float(2 * (base + lora) * length),
               lm_head=float(2 * c.hidden_size * c.vocab_size),
               attention=2.0 * c.num_layers * length * length * c.num_heads * c.head_dim)
  parts["total"] = sum(parts.values())
  return parts


def decode_token(spec, cache_len: int) -> dict[str, float]:
  """One generated token against a ``cache_len``-slot cache (every slot is read)."""
  c = spec.llm
  base, lora = _llm_params(spec)
  parts = dict(llm_matmuls=float(2 * (base + lora)),
               lm_head=float(2 * c.hidden_size * c.vocab_size),
               attention=4.0 * c.num_layers * cache_len * c.num_heads * c.head_dim)
  parts["total"] = sum(parts.values())
  return parts


def summary(spec) -> dict[str, Any]:
  base, lora = _llm_params(spec)
  return dict(llm_matmul_params=base, lora_params=lora)
