"""Generation with a KV cache equals step-by-step argmax of full forward passes; scoring ranks."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.eval import generate as gen
from feallm_jax.models import layers, llm

VOCAB = 64


def _tiny_decoder(mesh, seed=0, model_type="llama"):
  cfg = llm.LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, model_type=model_type)
  with sharding.mesh_rules(mesh):
    return llm.Decoder(cfg, rngs=nnx.Rngs(seed))


def _left_pad(rows, pad_id=0):
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return dict(input_ids=ids, attention_mask=mask)


@nnx.jit
def _forward(model, ids):
  return model(ids)


def _reference_greedy(dec, prompts, n):
  """Greedy by full forward passes: every step re-runs the whole (right-padded) sequences.

  Right padding with a causal mask leaves each real token's logits untouched, so one jitted
  shape serves every step and row.
  """
  seqs = [list(p) for p in prompts]
  width = max(len(p) for p in prompts) + n
  for _ in range(n):
    ids = np.zeros((len(seqs), width), np.int32)
    for i, sq in enumerate(seqs):
      ids[i, :len(sq)] = sq
    logits = np.asarray(_forward(dec, jnp.asarray(ids)))
    for i, sq in enumerate(seqs):
      sq.append(int(logits[i, len(sq) - 1].argmax()))
  return [sq[len(p):] for sq, p in zip(seqs, prompts)]


PROMPTS = [[5, 9, 3, 17, 22, 8, 1], [11, 4], [30, 31, 32, 33], [7]]


@pytest.fixture(scope="module")
def mesh8(devices):
  return sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


@pytest.fixture(scope="module")
def decoder(mesh8):
  return _tiny_decoder(mesh8)


def test_greedy_equals_full_forward_argmax_mixed_lengths(decoder):
  n = 8
  tokens, lengths = gen.generate(decoder, _left_pad(PROMPTS), gen.SamplingConfig(max_new_tokens=n))
  assert tokens.shape == (len(PROMPTS), n)  # batch padded to 8 shards internally, cut back
  np.testing.assert_array_equal(lengths, n)
  assert tokens.tolist() == _reference_greedy(decoder, PROMPTS, n)


def test_trim_left_padding_drops_only_columns_padded_in_every_row():
  ids = np.arange(2 * 70).reshape(2, 70).astype(np.int32)
  mask = np.zeros((2, 70), np.int32)
  mask[0, 60:] = 1            # 10 real tokens
  mask[1, 45:] = 1            # 25 real tokens: the longest decides
  t_ids, t_mask = gen.trim_left_padding(ids, mask, multiple=16)
  assert t_ids.shape == t_mask.shape == (2, 32)        # 25 -> the next multiple of 16
  np.testing.assert_array_equal(t_ids, ids[:, 38:])
  assert t_mask.sum() == mask.sum()                     # no real token lost
  assert gen.trim_left_padding(ids, mask, multiple=16, at_least=40)[0].shape == (2, 48)
  assert gen.trim_left_padding(ids, mask, multiple=64)[0].shape == (2, 64)
  assert gen.trim_left_padding(ids, mask, multiple=128)[0].shape == (2, 70)   # never widens
  right = np.ones((2, 70), np.int32)
  right[:, 50:] = 0                                      # right padding: nothing to drop
  assert gen.trim_left_padding(ids, right, multiple=16)[0].shape == (2, 70)


def test_extra_left_padding_is_trimmed_and_changes_nothing(decoder, mesh8):
  batch = _left_pad(PROMPTS)
  wide = {k: np.concatenate([np.zeros((len(PROMPTS), 70), np.int32), v], axis=1)
          for k, v in batch.items()}                     # 77 columns, 70 padded in every row
  placed, _ = gen._prepare(decoder, wide, mesh8)
  assert placed["input_ids"].shape[1] == gen.PROMPT_BUCKET   # the prefill runs 32, not 77
  cfg = gen.SamplingConfig(max_new_tokens=6)
  tokens, _ = gen.generate(decoder, wide, cfg)
  assert tokens.tolist() == gen.generate(decoder, batch, cfg)[0].tolist() == _reference_greedy(
      decoder, PROMPTS, 6)
  cands = np.array([[3, 4, 5], [9, 0, 0]], np.int32)
  cmask = np.array([[1, 1, 1], [1, 0, 0]], np.int32)
  np.testing.assert_allclose(gen.score_candidates(decoder, wide, cands, cmask).log_likelihood,
                             gen.score_candidates(decoder, batch, cands, cmask).log_likelihood,
                             atol=1e-5)


def test_unsharded_single_device(devices):
  dec = _tiny_decoder(sharding.single_device_mesh(), seed=1, model_type="qwen2")
  tokens, _ = gen.generate(dec, _left_pad(PROMPTS[:2]), gen.SamplingConfig(max_new_tokens=5))
  assert tokens.tolist() == _reference_greedy(dec, PROMPTS[:2], 5)


def test_eos_stops_each_row(decoder):
  free, _ = gen.generate(decoder, _left_pad(PROMPTS), gen.SamplingConfig(max_new_tokens=8))
  eos = int(free[0, 2])  # row 0 emits it at step 2 (maybe earlier, maybe in other rows too)
  cfg = gen.SamplingConfig(max_new_tokens=8, eos_ids=(eos,), pad_id=63)
  tokens, lengths = gen.generate(decoder, _left_pad(PROMPTS), cfg)
  for row, free_row, n in zip(tokens, free, lengths):
    hits = np.flatnonzero(free_row == eos)
    expect = int(hits[0]) + 1 if hits.size else 8
    assert n == expect
    np.testing.assert_array_equal(row[:n], free_row[:n])
    assert np.all(row[n:] == 63)
  assert lengths[0] <= 3


def test_sampling_seeded_and_nucleus(decoder):
  batch = _left_pad(PROMPTS)
  greedy, _ = gen.generate(decoder, batch, gen.SamplingConfig(max_new_tokens=8))
  a, _ = gen.generate(decoder, batch, gen.SamplingConfig(max_new_tokens=8, temperature=1.5, seed=3))
  b, _ = gen.generate(decoder, batch, gen.SamplingConfig(max_new_tokens=8, temperature=1.5, seed=3))
  c, _ = gen.generate(decoder, batch, gen.SamplingConfig(max_new_tokens=8, temperature=1.5, seed=4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, greedy)  # a random 64-token model at T=1.5 is near uniform
  # A tiny nucleus keeps only the top token: sampling becomes greedy.
  nucleus, _ = gen.generate(decoder, batch, gen.SamplingConfig(max_new_tokens=8, temperature=1.5,
                                                              top_p=1e-6, seed=3))
  np.testing.assert_array_equal(nucleus, greedy)


def _nucleus_probs(logits, temperature, top_p):
  """The distribution sampling must follow, in float64 numpy: softmax(logits / T), then the
  smallest prefix of tokens (by probability) whose mass reaches top_p, renormalized."""
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros_like(p, bool)
  keep[order[before < top_p]] = True
  q = np.where(keep, p, 0.0)
  return q / q.sum()


def _tv(a, b):
  return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.7), (0.5, 0.7), (2.0, 1.0), (0.5, 0.95)])
def test_select_frequencies_follow_temperature_and_nucleus(temperature, top_p):
  """20,000 draws of ``_select`` against the hand-computed distribution. E.g. T=0.5, p=0.7 on
  probabilities (.5, .3, .15, .05): squared -> (.685, .247, .062, .007); tokens 0 and 1 make the
  nucleus; renormalized (.735, .265). Ignoring T would give (.625, .375)."""
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.jit(jax.vmap(lambda k: gen._select(
      logits, k, jnp.float32(temperature), jnp.float32(top_p), greedy=False,
      nucleus=top_p < 1)))(keys)[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=4) / n
  want = _nucleus_probs(np.log([0.5, 0.3, 0.15, 0.05]), temperature, top_p)
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))   # nothing outside the nucleus
  np.testing.assert_allclose(freq, want, atol=0.015)               # ~4 sigma at n=20000
  if (temperature, top_p) == (0.5, 0.7):
    np.testing.assert_allclose(want, [0.25 / 0.34, 0.09 / 0.34, 0, 0], atol=1e-12)


def test_sampled_first_tokens_follow_softmax_over_the_nucleus(mesh8):
  """Through ``generate`` (prefill + sampler, seeds traced): 2,048 first tokens of one prompt
  (128 identical rows x 16 seeds) against softmax(logits / T) of the full forward pass,
  renormalized over the nucleus. The lm_head is scaled up so the distribution is peaked and a
  wrong temperature moves it far (checked below)."""
  dec = _tiny_decoder(mesh8, seed=5)
  dec.lm_head[...] = dec.lm_head[...] * 40.0
  prompt = PROMPTS[0]
  rows, seeds = 128, 16
  batch = _left_pad([prompt] * rows)
  t, top_p = 1.5, 0.9
  logits = np.asarray(_forward(dec, jnp.asarray([prompt], jnp.int32)))[0, -1]
  want = _nucleus_probs(logits, t, top_p)
  draws = []
  for seed in range(seeds):
    tokens, _ = gen.generate(dec, batch, gen.SamplingConfig(max_new_tokens=1, temperature=t,
                                                            top_p=top_p, seed=seed))
    draws.append(tokens[:, 0])
  n = rows * seeds
  freq = np.bincount(np.concatenate(draws), minlength=VOCAB) / n
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
  # Expected total-variation noise of n multinomial draws: 1/2 sum sqrt(2 p (1 - p) / (pi n)).
  noise = 0.5 * np.sum(np.sqrt(2 * want * (1 - want) / (np.pi * n)))
  assert _tv(freq, want) < 3 * noise, (_tv(freq, want), noise, np.flatnonzero(want).size)
  # The check can tell: T ignored moves the distribution beyond the noise, and without the
  # nucleus ~n/10 draws would fall outside the support asserted above.
  assert _tv(_nucleus_probs(logits, 1.0, top_p), want) > 5 * noise
  assert _nucleus_probs(logits, t, 1.0)[want == 0].sum() * n > 50


def test_scores_equal_full_forward_log_likelihood(decoder):
  cands = np.array([[3, 4, 5], [9, 0, 0], [12, 13, 0]], np.int32)
  cmask = (np.arange(3)[None] < np.array([3, 1, 2])[:, None]).astype(np.int32)
  s = gen.score_candidates(decoder, _left_pad(PROMPTS), cands, cmask)
  pairs = [(p, cands[j, :cmask[j].sum()].tolist()) for p in PROMPTS for j in range(3)]
  ids = np.zeros((len(pairs), 10), np.int32)
  for r, (p, c) in enumerate(pairs):
    ids[r, :len(p) + len(c)] = p + c
  lp = np.asarray(jax.nn.log_softmax(_forward(decoder, jnp.asarray(ids)), axis=-1))
  for r, (p, c) in enumerate(pairs):
    ref = sum(float(lp[r, len(p) - 1 + k, t]) for k, t in enumerate(c))
    assert s.log_likelihood[r // 3, r % 3] == pytest.approx(ref, abs=1e-4)
  np.testing.assert_allclose(s.probs.sum(1), 1.0)
  np.testing.assert_array_equal(s.pred, s.log_likelihood.argmax(1))


def test_scoring_ranks_right_label_after_overfitting(mesh8):
  """Train a tiny decoder on 4 prompt -> label pairs; scoring must then rank the label first."""
  dec = _tiny_decoder(mesh8, seed=2)
  prompts = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29]]
  labels = [[40, 41], [42], [43, 44, 45], [46, 47]]  # different lengths on purpose
  seqs = [p + l for p, l in zip(prompts, labels)]
  t = max(len(s) for s in seqs)
  ids = np.zeros((4, t), np.int32)
  tgt_mask = np.zeros((4, t), np.float32)
  att = np.zeros((4, t), np.int32)
  for i, (p, l) in enumerate(zip(prompts, labels)):
    ids[i, :len(p) + len(l)] = p + l
    att[i, :len(p) + len(l)] = 1
    tgt_mask[i, len(p) - 1:len(p) + len(l) - 1] = 1  # logits that predict label tokens
  targets = np.roll(ids, -1, axis=1)

  def loss_fn(model):
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(att))
    lp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
    return jnp.sum(nll * tgt_mask) / tgt_mask.sum()

  import optax
  with sharding.mesh_rules(mesh8):
    opt = nnx.Optimizer(dec, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  with jax.set_mesh(mesh8):
    for _ in range(60):
      loss = step(dec, opt)
  assert float(loss) < 0.1
  cids = np.zeros((4, 3), np.int32)
  cmask = np.zeros((4, 3), np.int32)
  for j, l in enumerate(labels):
    cids[j, :len(l)] = l
    cmask[j, :len(l)] = 1
  for reduction in ("sum", "mean"):
    s = gen.score_candidates(dec, _left_pad(prompts), cids, cmask, reduction=reduction)
    np.testing.assert_array_equal(s.pred, [0, 1, 2, 3])
    assert np.all(s.probs[np.arange(4), np.arange(4)] > 0.5)


# --- FEALLM: image + prompt --------------------------------------------------------------------

IMG_ID = 5


def _tiny_feallm(mesh):
  """Built eagerly (tiny): skips build_model's jitted init, which costs a long CPU compile."""
  from feallm_jax.models import feallm, local_clues, lora, vision
  spec = feallm.FEALLMSpec(
      vision=vision.VisionConfig(image_size=16, patch_size=8, hidden_size=16,
                                 intermediate_size=32, num_layers=2, num_heads=2),
      llm=llm.LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=2, num_kv_heads=1, head_dim=16),
      image_token_id=IMG_ID,
      lca=local_clues.LCAConfig(crop_size=8, depth=1, width=8, groups=2, num_heads=2),
      projector_heads=2, feature_layer=-2, multi_layers=(1, 2), train_llm="lora",
      lora=lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
  with sharding.mesh_rules(mesh):
    return feallm.FEALLM(spec, rngs=nnx.Rngs(3))


@nnx.jit
def _feallm_forward(model, batch):
  out = model(batch)
  return out["logits"], out["mask"]


def test_feallm_greedy_equals_full_forward_argmax(devices):
  model = _tiny_feallm(sharding.single_device_mesh())
  texts = [[9, IMG_ID, 11, 12, 13, 14], [IMG_ID, 20], [30, 31, IMG_ID, 33]]
  rng = np.random.default_rng(0)
  b = len(texts)
  image = rng.normal(size=(b, 16, 16, 3)).astype(np.float32)
  y0, x0 = rng.uniform(0, 0.6, (2, b, 16))
  regions = np.stack([y0, x0, y0 + 0.3, x0 + 0.3], -1).astype(np.float32)
  n = 6
  batch = dict(image=image, regions=regions, **_left_pad(texts))
  tokens, _ = gen.generate(model, batch, gen.SamplingConfig(max_new_tokens=n))

  seqs = [list(t) for t in texts]
  width = max(len(t) for t in texts) + n
  for _ in range(n):
    ids = np.zeros((b, width), np.int32)
    att = np.zeros((b, width), np.int32)
    for i, sq in enumerate(seqs):
      ids[i, :len(sq)] = sq
      att[i, :len(sq)] = 1
    logits, mask = _feallm_forward(model, dict(image=jnp.asarray(image), regions=jnp.asarray(regions),
                                              input_ids=jnp.asarray(ids),
                                              attention_mask=jnp.asarray(att)))
    logits, mask = np.asarray(logits), np.asarray(mask)
    for i, sq in enumerate(seqs):
      sq.append(int(logits[i, mask[i].sum() - 1].argmax()))
  assert tokens.tolist() == [sq[len(t):] for sq, t in zip(seqs, texts)]
  # Scoring a candidate = the greedy continuation gives the top score among distractors.
  cands = np.array([tokens[0, :2], [1, 2], [3, 4]], np.int32)
  s = gen.score_candidates(model, {k: v[:1] for k, v in batch.items()}, cands,
                           np.ones_like(cands))
  assert s.pred[0] == 0
  # Faces encoded before (visual_tokens), rows in another order: the same tokens and scores,
  # with no image in the batch.
  visual = gen.visual_tokens(model, batch)
  assert visual.shape[:2] == (b, model.spec.num_visual_tokens)
  perm = [2, 0, 1]
  text = {k: batch[k][perm] for k in ("input_ids", "attention_mask")}
  again, _ = gen.generate(model, dict(visual=visual[perm], **text),
                          gen.SamplingConfig(max_new_tokens=n))
  np.testing.assert_array_equal(again, tokens[perm])
  s2 = gen.score_candidates(model, dict(visual=visual[:1], input_ids=batch["input_ids"][:1],
                                        attention_mask=batch["attention_mask"][:1]),
                            cands, np.ones_like(cands))
  np.testing.assert_allclose(s2.log_likelihood, s.log_likelihood, rtol=1e-5)
  with pytest.raises(KeyError, match="image"):
    gen.generate(model, text, gen.SamplingConfig(max_new_tokens=n))


def test_eval_view_folds_float32_lora_and_leaves_the_model_alone(devices):
  """Generation folds the adapters into float32 kernels (one matmul per projection): the same
  greedy tokens and scores as the unfolded adapters, and the caller's model keeps its
  unfolded kernels and adapters."""
  from feallm_jax.models import lora
  model = _tiny_feallm(sharding.single_device_mesh())
  for i, (_, m) in enumerate(model.iter_modules()):
    if isinstance(m, lora.LoRA):       # live adapters (B starts at zero)
      m.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
  kernels = {p: np.asarray(m.kernel[...]) for p, m in model.iter_modules()
             if isinstance(getattr(m, "lora", None), lora.LoRA)}
  view = gen.eval_view(model)
  assert view.merged_lora == len(kernels) == 2 * 7
  assert gen.eval_view(view) is view
  plain = gen.eval_view(model, merge_lora=False)
  assert plain.merged_lora == 0
  with pytest.raises(ValueError, match=r"stored \[out, in\]"):   # the view's kernels are
    lora.merge(nnx.merge(plain.graphdef, plain.state))          # transposed: refused
  for p, m in model.iter_modules():
    if p in kernels:
      assert not m.lora.merged
      np.testing.assert_array_equal(np.asarray(m.kernel[...]), kernels[p])
  rng = np.random.default_rng(1)
  texts = [[9, IMG_ID, 11, 12], [IMG_ID, 20, 21]]
  image = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  regions = np.tile(np.asarray([0.1, 0.1, 0.6, 0.6], np.float32), (2, 16, 1))
  batch = dict(image=image, regions=regions, **_left_pad(texts))
  cfg = gen.SamplingConfig(max_new_tokens=8)
  folded, _ = gen.generate(view, batch, cfg)
  unfolded, _ = gen.generate(plain, batch, cfg)
  np.testing.assert_array_equal(folded, unfolded)
  cands = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
  a = gen.score_candidates(view, batch, cands, np.ones_like(cands))
  b = gen.score_candidates(plain, batch, cands, np.ones_like(cands))
  np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-5, atol=1e-5)
  assert np.abs(a.log_likelihood - gen.score_candidates(
      model, batch, cands, np.ones_like(cands)).log_likelihood).max() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_eval_view_stores_decoder_kernels_out_in_on_a_tensor_parallel_mesh(devices, tied):
  """The view's decoder kernels and LM head are the model's, transposed (logical axes reversed,
  so a tensor-split kernel stays split on its heads / mlp axis): greedy tokens equal the
  [in, out] view's, scores agree to float32 rounding, the caller's model keeps [in, out]."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = llm.LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
  with sharding.mesh_rules(mesh):
    dec = llm.Decoder(cfg, rngs=nnx.Rngs(5))
  before = {p: np.asarray(m.kernel[...]) for p, m in dec.iter_modules()
            if isinstance(m, layers.Dense)}
  view = gen.eval_view(dec)
  plain = gen.eval_view(dec, kernels_out_in=False)
  moved = nnx.merge(view.graphdef, view.state)
  assert moved.kernels_out_in and not dec.kernels_out_in
  dense = [(p, m) for p, m in moved.iter_modules() if isinstance(m, layers.Dense)]
  assert len(dense) == len(before) == 2 * 7
  for p, m in dense:
    assert m.kernel_out_in
    np.testing.assert_array_equal(np.asarray(m.kernel[...]), before[p].T)
  q = moved.layers[0].attn.q.kernel
  assert q.get_metadata("out_sharding") == ("heads", "embed")
  assert q[...].sharding.spec == sharding.logical_to_spec(("heads", "embed"))
  if not tied:
    np.testing.assert_array_equal(np.asarray(moved.lm_head[...]), np.asarray(dec.lm_head[...]).T)
  for p, m in dec.iter_modules():
    if isinstance(m, layers.Dense):
      assert not m.kernel_out_in
      np.testing.assert_array_equal(np.asarray(m.kernel[...]), before[p])
  batch = _left_pad(PROMPTS)
  sc = gen.SamplingConfig(max_new_tokens=6)
  np.testing.assert_array_equal(gen.generate(view, batch, sc)[0], gen.generate(plain, batch, sc)[0])
  cands = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
  a = gen.score_candidates(view, batch, cands, np.ones_like(cands)).log_likelihood
  b = gen.score_candidates(plain, batch, cands, np.ones_like(cands)).log_likelihood
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_eval_view_bfloat16_matmuls_round_their_inputs_and_accumulate_in_float32(devices, tied):
  """``matmul_dtype="bfloat16"``: the view's decoder kernels and LM head are the float32 ones
  rounded to bfloat16 (a tied head gets its own copy; the embedding table stays float32), each
  projection equals a hand-computed float64 product of bfloat16-rounded inputs and kernel,
  every decoder dot compiles bf16 x bf16 -> f32, logits stay within bf16 rounding of float32's
  (and differ from them), and the caller's model is untouched."""
  import ml_dtypes
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = llm.LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
  with sharding.mesh_rules(mesh):
    dec = llm.Decoder(cfg, rngs=nnx.Rngs(7))
  with pytest.raises(ValueError, match=r"config\.eval\.matmul_dtype"):
    gen.eval_view(dec, matmul_dtype="float16")
  view = gen.eval_view(dec, matmul_dtype="bfloat16")
  f32 = gen.eval_view(dec)
  assert (view.matmul_dtype, f32.matmul_dtype) == ("bfloat16", "float32")
  assert gen.eval_view(view, matmul_dtype="bfloat16") is view and gen.eval_view(view) is view
  with pytest.raises(ValueError, match="a view with float32 matmuls cannot become bfloat16"):
    gen.eval_view(f32, matmul_dtype="bfloat16")      # silently float32 would be a wrong answer
  narrow = nnx.merge(view.graphdef, view.state)
  wide = nnx.merge(f32.graphdef, f32.state)
  bf16 = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)
  for (p, m), (_, w) in zip(
      ((p, m) for p, m in narrow.iter_modules() if isinstance(m, layers.Dense)),
      ((p, m) for p, m in wide.iter_modules() if isinstance(m, layers.Dense))):
    assert m.kernel[...].dtype == jnp.bfloat16 and m.matmul_dtype == jnp.bfloat16, p
    np.testing.assert_array_equal(np.asarray(m.kernel[...]), bf16(w.kernel[...]))
  assert narrow.lm_head[...].dtype == jnp.bfloat16
  head = wide.embed_tokens[...] if tied else wide.lm_head[...]
  np.testing.assert_array_equal(np.asarray(narrow.lm_head[...]), bf16(head))
  assert narrow.embed_tokens[...].dtype == jnp.float32
  for _, m in dec.iter_modules():
    if isinstance(m, layers.Dense):
      assert m.kernel[...].dtype == jnp.float32 and m.matmul_dtype is None
  assert dec.head_matmul_dtype is None and (dec.lm_head is None) == tied

  # One projection against float64 numpy on the rounded operands ([out, in] kernel).
  x = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
  q = narrow.layers[0].attn.q
  want = (bf16(x).astype(np.float64) @ np.asarray(q.kernel[...], np.float64).T)
  got = np.asarray(q(jnp.asarray(x)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.abs(got - x @ np.asarray(wide.layers[0].attn.q.kernel[...]).T).max() > 0

  batch = _left_pad(PROMPTS)
  placed, _ = gen._prepare(view, batch, mesh)
  with gen._on(mesh):
    text = gen._generate_jit.lower(
        view.graphdef, view.state, placed, jax.random.key(0), jnp.asarray((-1,), jnp.int32),
        jnp.int32(0), jnp.float32(1e-6), jnp.float32(1.0), max_new_tokens=4, greedy=True,
        nucleus=False, mesh=mesh).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                    r"(tensor<[^>]*>)", text)
  narrow_dots = [d for d in dots if d[0].endswith("xbf16>") and d[1].endswith("xbf16>")
                 and d[2].endswith("xf32>")]
  # 7 projections per layer and the head, in the prefill and in the decode step.
  assert len(narrow_dots) >= 2 * (2 * 7 + 1), dots
  assert not any(d[0].endswith("xf32>") and d[1].endswith("xbf16>") for d in dots)

  cands = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
  a = gen.score_candidates(view, batch, cands, np.ones_like(cands)).log_likelihood
  b = gen.score_candidates(f32, batch, cands, np.ones_like(cands)).log_likelihood
  assert 0 < np.abs(a - b).max() < 0.05 * max(1.0, np.abs(b).max())
  tokens, lengths = gen.generate(view, batch, gen.SamplingConfig(max_new_tokens=4))
  assert tokens.shape == (len(PROMPTS), 4) and (lengths == 4).all()


def test_decode_loop_updates_cache_in_place(devices):
  """The compiled decode loop must not copy or transpose whole cache buffers per token (the
  [B,S,Hkv,Dh] layout made XLA transpose every layer's cache before each attention dot)."""
  dec = _tiny_decoder(sharding.single_device_mesh(), seed=2)
  placed, _ = gen._prepare(dec, _left_pad(PROMPTS), None)
  graphdef, state = nnx.split(dec)
  n = 6
  text = gen._generate_jit.lower(
      graphdef, state, placed, jax.random.key(0), jnp.asarray((-1,), jnp.int32), jnp.int32(0),
      jnp.float32(1e-6), jnp.float32(1.0), max_new_tokens=n, greedy=True, nucleus=False,
      mesh=None).compile().as_text()
  cache = dec.init_cache(len(PROMPTS), max(len(p) for p in PROMPTS) + n)
  dims = sorted(cache.k[0].shape)
  bad = [line for line in _while_body_lines(text)
         if re.search(r"\b(copy|transpose)\(", line) and _result_dims(line) == dims]
  assert not bad, "\n".join(bad[:3])
  # The matcher sees what it must: the cache update itself is in the loop, cache-shaped.
  assert any("dynamic-update-slice(" in line and _result_dims(line) == dims
             for line in _while_body_lines(text))


def _while_body_lines(hlo: str) -> list[str]:
  """Instruction lines of every computation a ``while`` body reaches (fusions, calls, nested
  loops), found through the HLO call graph rather than op metadata (which some compiled copies
  lack)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = head.group(1)
      comps[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line)
  ref = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")
  todo = [m.group(1) for lines in comps.values() for line in lines
          if " while(" in line for m in [re.search(r"body=%?([\w.\-]+)", line)] if m]
  assert todo, "no while loop in the compiled generation"
  seen: set[str] = set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for line in comps[c]:
      todo += ref.findall(line)
      todo += re.findall(r"%([\w.\-]+)", "".join(re.findall(r"calls=\{([^}]*)\}", line)))
  return [line for c in seen for line in comps[c]]


def _result_dims(line: str) -> list[int] | None:
  """Sorted dims of an instruction's (array) result, e.g. ``%x = f32[8,2,14,8]{...} copy(...)``."""
  m = re.search(r"=\s*\w+\[([\d,]*)\]", line)
  return sorted(int(d) for d in m.group(1).split(",") if d) if m else None
