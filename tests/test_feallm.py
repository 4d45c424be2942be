"""FEALLM assembly: real-size shapes, placeholder expansion, freeze policy, overfit, sharding."""

import dataclasses
import sys
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import feallm, layers, llm, local_clues, lora, vision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny_synthetic  # noqa: E402

IMG = 5   # image token id of the synthetic specs


def tiny_spec(**kw) -> feallm.FEALLMSpec:
  base = dict(
      vision=vision.VisionConfig(image_size=16, patch_size=8, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2),
      llm=llm.LLMConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=16),
      image_token_id=IMG,
      lca=local_clues.LCAConfig(crop_size=8, depth=1, width=8, groups=2, num_heads=2),
      projector_heads=2, feature_layer=-1, multi_layers=(0, 1), train_llm="lora",
      lora=lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
  base.update(kw)
  return feallm.FEALLMSpec(**base)


def make_batch(spec, b=4, t=10, seed=0, image_at=2, answer_from=6):
  rng = np.random.default_rng(seed)
  ids = rng.integers(6, spec.llm.vocab_size, (b, t)).astype(np.int32)
  ids[:, image_at] = spec.image_token_id
  y0 = rng.uniform(0, 0.6, (b, 16))
  x0 = rng.uniform(0, 0.6, (b, 16))
  regions = np.stack([y0, x0, y0 + 0.3, x0 + 0.3], -1).astype(np.float32)
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[:, answer_from:] = 1
  s = spec.vision.image_size
  return dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32), regions=regions,
              input_ids=ids, attention_mask=np.ones((b, t), np.int32), loss_mask=loss_mask)


@pytest.fixture(scope="module")
def one_mesh():
  return sharding.single_device_mesh()


@pytest.fixture(scope="module")
def lora_model(one_mesh):
  return feallm.build_from_spec(tiny_spec(), one_mesh, rngs=0)


# ----------------------------------------------------------------------------- shapes


def test_real_size_shapes_allocate_nothing(devices):
  """CLIP ViT-L/14-336 + LLaMA-2-7B + LoRA r=128 on a 2x2x2 mesh, abstractly."""
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  spec = feallm.FEALLMSpec(
      vision=vision.VisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                                 intermediate_size=4096, num_layers=24, num_heads=16),
      llm=llm.LLMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                        rms_norm_eps=1e-5),
      image_token_id=32000,
      lca=local_clues.LCAConfig(crop_size=64, depth=4, width=256, num_heads=8),
      projector_heads=16, feature_layer=-2, multi_layers=(4, 8, 12, 16, 20, 24),
      train_llm="lora", lora=lora.LoRAConfig(rank=128, alpha=256.0),
      param_dtype="float32", frozen_dtype="bfloat16", compute_dtype="bfloat16")
  model = feallm.abstract_model(spec, mesh)
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  counts = feallm.parameter_counts(model)
  print("\nreal-size parameter counts:", {k: v for k, v in counts.items()})
  print(feallm.parameter_overview(model))
  # LoRA r=128 on q,k,v,o,gate,up,down of LLaMA-2-7B: 32 * (4*2*4096*128 + 3*128*(4096+11008)).
  assert counts["lora"] == {"trainable": 32 * (4 * 2 * 4096 * 128 + 3 * 128 * (4096 + 11008)),
                            "frozen": 0} == {"trainable": 319_815_680, "frozen": 0}
  assert 6.7e9 < counts["llm base"]["frozen"] < 6.8e9 and counts["llm base"]["trainable"] == 0
  assert 3.0e8 < counts["vision"]["frozen"] < 3.1e8
  assert 2e7 < counts["projector"]["trainable"] < 6e7
  assert 1e7 < counts["lca"]["trainable"] < 4e7
  assert 3.5e8 < counts["total"]["trainable"] < 4.5e8
  assert model.llm.layers[0].attn.q.kernel.get_value().dtype == jnp.bfloat16
  assert model.projector.mlp.fc1.kernel.get_value().dtype == jnp.float32
  assert model.llm.embed_tokens.get_value().sharding.spec == jax.P("tensor", "fsdp")
  assert spec.expanded_length(100) == 100 - 1 + 576 + 1


def test_tiny_config_spec_from_tokenizer(devices):
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  spec = feallm.spec_from_config(c)
  from feallm_jax.data import tokenizer as tok_lib
  tok = tok_lib.load("")
  assert spec.llm.vocab_size % feallm.VOCAB_MULTIPLE == 0 and spec.llm.vocab_size >= len(tok)
  assert spec.image_token_id == tok_lib.image_token_id(tok)
  n_vis = (c.model.vision.image_size // c.model.vision.patch_size) ** 2   # patch tokens
  assert feallm.expanded_length(c, 128) == 128 - 1 + n_vis + 1 == spec.expanded_length(128)
  model = feallm.abstract_model(spec, sharding.make_mesh(dict(c.mesh)))
  counts = feallm.parameter_counts(model)
  print("\ntiny_synthetic parameter counts:", counts)
  # The paper's freeze policy: frozen ViT and LLM base; LoRA, LCA and projector train.
  assert counts["vision"]["trainable"] == 0 and counts["llm base"]["trainable"] == 0
  assert min(counts[k]["trainable"] for k in ("lora", "lca", "projector")) > 0
  c.model.lca.norm = "batch"
  with pytest.raises(ValueError, match="model.lca.norm"):
    feallm.spec_from_config(c)
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  c.model.train_llm = "partial"
  with pytest.raises(ValueError, match="model.train_llm"):
    feallm.spec_from_config(c)


def test_bad_mesh_fails_fast_with_the_parameter_named(devices):
  spec = tiny_spec(llm=dataclasses.replace(tiny_spec().llm, vocab_size=127))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match="embed_tokens.*127"):
    feallm.build_from_spec(spec, mesh)


# ----------------------------------------------------------------------------- expansion


def test_placeholder_expansion_left_padded(lora_model):
  model, spec = lora_model, lora_model.spec
  b = make_batch(spec, b=2, t=9, seed=3, image_at=4)
  ids, am = b["input_ids"].copy(), b["attention_mask"].copy()
  am[0, :2] = 0      # row 0 left-padded by 2 (placeholder at 4 is the 3rd real token)
  ids[0, :2] = 0
  emb, mask, pos = nnx.jit(lambda m, *a: m.embed_inputs(*a))(model, b["image"], b["regions"],
                                                             ids, am)
  vis = nnx.jit(lambda m, i, r: m.visual_tokens(i, r))(model, b["image"], b["regions"])
  text = model.llm.embed(jnp.where(ids == IMG, 0, ids))
  n = spec.num_visual_tokens
  assert n == 4 + 1 and emb.shape == (2, 9 - 1 + n, 32)
  p = 4
  np.testing.assert_allclose(emb[:, :p], text[:, :p], atol=1e-6)
  np.testing.assert_allclose(emb[:, p:p + n], vis, atol=1e-6)
  np.testing.assert_allclose(emb[:, p + n:], text[:, p + 1:], atol=1e-6)
  np.testing.assert_array_equal(mask[0], [0, 0] + [1] * (9 - 1 + n - 2))
  np.testing.assert_array_equal(pos[0, 2:], np.arange(9 - 1 + n - 2))
  np.testing.assert_array_equal(pos[1], np.arange(9 - 1 + n))


def test_loss_mask_and_targets_follow_the_expansion(lora_model):
  model, spec = lora_model, lora_model.spec
  b = make_batch(spec, b=2, t=10, seed=4, image_at=1, answer_from=6)
  out = nnx.jit(lambda m, x: m(x))(model, b)
  n = spec.num_visual_tokens
  tgt, lm = np.asarray(out["targets"]), np.asarray(out["loss_mask"])
  np.testing.assert_array_equal(tgt[:, 0], b["input_ids"][:, 0])
  np.testing.assert_array_equal(tgt[:, 1 + n:], b["input_ids"][:, 2:])
  assert np.all(tgt[:, 1:1 + n] == 0) and np.all(lm[:, :1 + n] == 0)
  np.testing.assert_array_equal(lm[:, 1 + n:], b["loss_mask"][:, 2:])
  # The first answer token (text index 6, slot 6 - 1 + n) is predicted from the slot before.
  loss, metrics = nnx.jit(feallm.loss_fn)(model, b)
  assert float(metrics["tokens"]) == 2 * 4
  logits = np.asarray(out["logits"], np.float64)
  lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ref = -np.mean([lp[r, j - 1 + n - 1, b["input_ids"][r, j]] for r in range(2) for j in range(6, 10)])
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


# ----------------------------------------------------------------------------- freezing


def _train_step(model, tx, filt):
  graphdef, params, rest = nnx.split(model, filt, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, rest, opt_state, batch):
    def lf(p):
      return feallm.loss_fn(nnx.merge(graphdef, p, rest), batch)
    (loss, _), grads = jax.value_and_grad(lf, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads, loss

  return params, rest, opt_state, step


def test_step_changes_trainable_only_and_grads_hold_no_frozen_entries(lora_model):
  model = nnx.clone(lora_model)
  filt = feallm.trainable_filter(model.spec)
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tx = optax.adamw(1e-2)
  params, rest, opt_state, step = _train_step(model, tx, filt)
  batch = make_batch(model.spec)
  # Two steps: LoRA B starts at zero, so A only gets a gradient once B has moved.
  params, opt_state, grads, _ = step(params, rest, opt_state, batch)
  grad_paths = {p for p, _ in nnx.to_flat_state(grads)}
  params, opt_state, grads, _ = step(params, rest, opt_state, batch)
  nnx.update(model, params)
  after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  pred = nnx.filterlib.to_predicate(filt)
  trainable = {p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if pred(p, v)}
  frozen = set(before) - trainable
  assert grad_paths == trainable
  assert all(isinstance(v, (nnx.LoRAParam,)) or not isinstance(v, layers.BaseParam)
             for _, v in nnx.to_flat_state(grads))
  assert {p[0] for p in trainable} == {"lca", "projector", "llm"}
  assert all(p[0] in ("vision", "llm") for p in frozen) and len(frozen) > 10
  unchanged = [p for p in trainable if np.array_equal(before[p], after[p])]
  assert not unchanged, f"trainable weights did not move: {unchanged[:5]}"
  changed = [p for p in frozen if not np.array_equal(before[p], after[p])]
  assert not changed, f"frozen weights moved: {changed[:5]}"
  # Optimizer state exists only for the trainable split.
  n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "size") and x.ndim)
  n_train = sum(before[p].size for p in trainable)
  assert n_opt == 2 * n_train


# ----------------------------------------------------------------------------- overfit


def test_tiny_model_overfits_four_examples(one_mesh):
  from feallm_jax.data import tokenizer as tok_lib
  tok = tok_lib.load("")
  answers = ["Happy. AU6 and AU12 are present.", "Sad: AU1, AU4, AU15.",
             "Surprise, with AU1 AU2 AU5 AU26.", "Angry; AU4, AU5, AU7 and AU23."]
  rows = [tok_lib.encode_conversation(tok, [
      {"from": "human", "value": "<image>\nWhat is the emotion and which AUs?"},
      {"from": "gpt", "value": a}]) for a in answers]
  t = max(len(r[0]) for r in rows)
  ids = np.full((4, t), tok.pad_token_id, np.int32)
  am = np.zeros((4, t), np.int32)
  lm = np.zeros((4, t), np.int32)
  for i, (r, m) in enumerate(rows):
    ids[i, :len(r)], am[i, :len(r)], lm[i, :len(m)] = r, 1, m
  vocab = -(-len(tok) // 128) * 128
  spec = tiny_spec(llm=dataclasses.replace(tiny_spec().llm, vocab_size=vocab, num_layers=2),
                   image_token_id=tok_lib.image_token_id(tok), train_llm="full",
                   train_vision=True)
  model = feallm.build_from_spec(spec, one_mesh, rngs=1)
  batch = make_batch(spec, b=4, t=t, seed=5)
  batch.update(input_ids=ids, attention_mask=am, loss_mask=lm)
  params, rest, opt_state, step = _train_step(model, optax.adam(1e-2),
                                              feallm.trainable_filter(spec))
  losses = []
  for i in range(400):
    params, opt_state, _, loss = step(params, rest, opt_state, batch)
    losses.append(float(loss))
    if losses[-1] < 0.05:
      break
  print(f"\noverfit: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.4f}")
  assert losses[-1] < 0.05, losses[::20]


# ----------------------------------------------------------------------------- sharding


def test_sharded_forward_equals_unsharded(lora_model, devices):
  spec = lora_model.spec
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  # The same weights placed by the logical rules on the 2x2x2 mesh (abstract build, no init).
  sharded = feallm.abstract_model(spec, mesh)
  src = dict(nnx.to_flat_state(nnx.state(lora_model)))
  for path, var in nnx.to_flat_state(nnx.state(sharded)):
    names = var.get_metadata().get("out_sharding")
    target = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names))
    var.set_value(jax.device_put(np.asarray(src[path].get_value()), target))
  specs = sharding.specs(sharded)
  assert specs["llm/embed_tokens"] == jax.P("tensor", "fsdp")
  batch = make_batch(spec, b=4, seed=6)
  ref = nnx.jit(lambda m, b: m(b, return_attention=True))(lora_model, batch)
  with sharding.mesh_rules(mesh):
    gb = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    out = nnx.jit(lambda m, b: m(b, return_attention=True))(sharded, gb)
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(ref["logits"]), atol=2e-5)
  for k in ("lca", "regions"):
    np.testing.assert_allclose(np.asarray(out["attention"][k]), np.asarray(ref["attention"][k]),
                               atol=2e-6)
  assert out["attention"]["lca"].shape == (4, 2, 16, 16)
  assert out["attention"]["regions"].shape == (4, 2, 4, 16)


# ----------------------------------------------------------------------------- switches


@pytest.mark.parametrize("kw", [
    dict(lca=None),
    dict(projector="mlp"),
    dict(train_llm="full", lora=None),
    dict(train_llm="frozen", train_vision=True),
], ids=["no_lca", "mlp", "full", "frozen_llm_train_vision"])
def test_config_switches_build_and_run(one_mesh, kw):
  spec = tiny_spec(**kw)
  model = feallm.build_from_spec(spec, one_mesh, rngs=2)
  batch = make_batch(spec, b=2, t=8, seed=8)


  @nnx.jit
  def run(model, batch):
    return feallm.loss_fn(model, batch)[0], model(batch, return_attention=True)
  loss, out = run(model, batch)
  n = spec.num_visual_tokens
  assert out["logits"].shape == (2, 8 - 1 + n, 128) and np.isfinite(float(loss))
  assert n == 4 + (spec.lca is not None)
  assert ("lca" in out["attention"]) == (spec.lca is not None)
  assert ("regions" in out["attention"]) == (spec.lca is not None and spec.projector != "mlp")
  trainable = nnx.to_flat_state(nnx.state(model, feallm.trainable_filter(spec)))
  towers = {p[0] for p, _ in trainable}
  assert ("vision" in towers) == spec.train_vision and ("lca" in towers) == (spec.lca is not None)
  if spec.train_llm == "frozen":
    assert "llm" not in towers
  if spec.train_llm == "full":
    assert any(p[0] == "llm" and p[-1] == "embed_tokens" for p, _ in trainable)
  if spec.lca is not None:   # F'_local exists only when a projector reads it
    assert (model.lca.to_vision is None) == (spec.projector == "mlp")
