"""Decoder LM: logits match HF LLaMA / Qwen2; KV-cache decoding equals a full forward pass."""

import hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import llm
from feallm_jax.weights import hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return fx.llama_dir(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  return fx.qwen2_dir(str(tmp_path_factory.mktemp("qwen2")))


def _ids(b=2, t=12, seed=0):
  return np.random.default_rng(seed).integers(0, 96, (b, t)).astype(np.int32)


def _left_padded(ids, pads):
  mask = np.ones_like(ids)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return mask, positions


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_logits_match_hf(which, llama_dir, qwen_dir):
  path = llama_dir if which == "llama" else qwen_dir
  model = hf.load_llm(path)
  cfg = model.cfg
  if which == "llama":
    assert cfg.rope_type == "llama3" and cfg.num_kv_heads == 2 and model.lm_head is not None
  else:
    assert cfg.tie_word_embeddings and model.lm_head is None and cfg.attention_bias
  ids = _ids(t=40)   # beyond original_max_position_embeddings=16: llama3 scaling matters
  ours = fx.jit_apply(model, jnp.asarray(ids))
  assert ours.dtype == jnp.float32 and ours.shape == (2, 40, 96)
  err = fx.rel_err(ours, fx.torch_llm_logits(path, ids))
  print(f"{which} logits rel err {err:.2e}")
  assert err < 1e-4


def test_left_padding_matches_hf(llama_dir):
  model = hf.load_llm(llama_dir)
  ids = _ids(t=10, seed=1)
  mask, pos = _left_padded(ids, [3, 0])
  ours = np.asarray(fx.jit_apply(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                 positions=jnp.asarray(pos)))
  ref = fx.torch_llm_logits(llama_dir, ids, mask, pos)
  valid = mask.astype(bool)
  assert fx.rel_err(ours[valid], ref[valid]) < 1e-4
  assert np.all(np.isfinite(ours))


def test_sharded_index_checkpoint(tmp_path, llama_dir):
  path = fx.llama_dir(str(tmp_path / "sharded"), max_shard_size="20KB")
  import os
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  ids = _ids(t=8)
  a = fx.jit_apply(hf.load_llm(path), jnp.asarray(ids))
  assert fx.rel_err(a, fx.torch_llm_logits(path, ids)) < 1e-4


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_kv_cache_token_by_token(which, llama_dir, qwen_dir):
  model = hf.load_llm(llama_dir if which == "llama" else qwen_dir)
  b, t, s = 2, 9, 12
  ids = _ids(b, t, seed=2)
  mask, pos = _left_padded(ids, [4, 1])
  full = np.asarray(fx.jit_apply(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                 positions=jnp.asarray(pos)))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, slots, pos, cache):
    return nnx.merge(graphdef, state)(ids, attention_mask=slots, positions=pos, cache=cache)

  cache = model.init_cache(b, s)
  slot_mask = np.zeros((b, s), np.int32)
  # A 3-token prefill, then one token at a time.
  chunks = [(0, 3)] + [(i, i + 1) for i in range(3, t)]
  out = []
  for lo, hi in chunks:
    slot_mask[:, lo:hi] = mask[:, lo:hi]
    logits, cache = step(state, jnp.asarray(ids[:, lo:hi]), jnp.asarray(slot_mask),
                         jnp.asarray(pos[:, lo:hi]), cache)
    out.append(np.asarray(logits))
  assert int(cache.index) == t
  inc = np.concatenate(out, axis=1)
  valid = mask.astype(bool)
  err = fx.rel_err(inc[valid], full[valid])
  print(f"{which} kv-cache vs full rel err {err:.2e}")
  assert err < 1e-5


def test_prefill_into_an_empty_cache_attends_over_its_own_keys(llama_dir):
  """``empty_cache=True`` (generation's prefill): the same logits and the same cache as the
  prefill that reads every slot, decoding on from either cache gives the same logits, and the
  compiled attention reads T keys, not S slots (its cost then does not grow with the room kept
  for new tokens)."""
  model = hf.load_llm(llama_dir)
  b, t, s = 2, 9, 40
  ids = _ids(b, t + 3, seed=5)
  mask, pos = _left_padded(ids, [4, 0])
  graphdef, state = nnx.split(model)

  def step(state, ids, slots, pos, cache, empty):
    return nnx.merge(graphdef, state)(ids, attention_mask=slots, positions=pos, cache=cache,
                                      empty_cache=empty)
  step_jit = jax.jit(step, static_argnames="empty")
  slots = np.zeros((b, s), np.int32)
  slots[:, :t] = mask[:, :t]
  args = (jnp.asarray(ids[:, :t]), jnp.asarray(slots), jnp.asarray(pos[:, :t]))
  runs = {}
  for empty in (False, True):
    logits, cache = step_jit(state, *args, model.init_cache(b, s), empty=empty)
    out, sl = [np.asarray(logits)], slots.copy()
    for i in range(t, t + 3):       # decode on, one token at a time, from that cache
      sl[:, i] = 1
      lg, cache = step_jit(state, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(sl),
                           jnp.asarray(pos[:, i:i + 1]), cache, empty=False)
      out.append(np.asarray(lg))
    runs[empty] = (np.concatenate(out, axis=1), cache)
  valid = np.concatenate([mask[:, :t], np.ones((b, 3), mask.dtype)], axis=1).astype(bool)
  assert fx.rel_err(runs[True][0][valid], runs[False][0][valid]) < 1e-6
  assert np.all(np.isfinite(runs[True][0]))
  for a, c in zip(runs[True][1].k + runs[True][1].v, runs[False][1].k + runs[False][1].v):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-6)
  assert int(runs[True][1].index) == t + 3

  def attention_widths(empty):
    """Last dims of the [B, Hkv, G*T, keys] attention logits in the program."""
    hlo = step_jit.lower(state, *args, model.init_cache(b, s), empty=empty).as_text()
    g = model.cfg.num_heads // model.cfg.num_kv_heads
    head = f"tensor<{b}x{model.cfg.num_kv_heads}x{g * t}x"
    dims = (seg.split("x")[0] for seg in hlo.split(head)[1:])
    return {int(d) for d in dims if d.isdigit()} & {t, s}
  assert attention_widths(True) == {t}
  assert attention_widths(False) == {s}
  with pytest.raises(ValueError, match="empty_cache=True needs a cache"):
    model(jnp.asarray(ids[:, :t]), empty_cache=True)


def test_jit_split_merge_remat_and_bf16(llama_dir):
  """remat=True against remat=False on the same weights: the full logits and every gradient
  (the loss weighs each logit differently, so each position and vocab entry matters), with
  LoRA adapters whose dropout is on, so remat's recomputation must redraw the same masks."""
  from feallm_jax.models import lora
  cfg = hf.llm_config_from_dir(llama_dir)
  ids = jnp.asarray(_ids(t=8))
  ref = hf.load_llm(llama_dir)(ids)
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)

  def build(remat):
    with sharding.mesh_rules(sharding.single_device_mesh()):
      model = nnx.eval_shape(lambda: llm.Decoder(
          cfg, lora=lcfg, remat=remat, rngs=nnx.Rngs(params=0, dropout=1)))
      init = nnx.jit(lambda: nnx.state(llm.Decoder(cfg, lora=lcfg, remat=remat,
                                                   rngs=nnx.Rngs(params=0, dropout=1))))()
    nnx.update(model, init)
    hf.load_llm_weights(model, llama_dir)
    for i, (_, m) in enumerate(model.iter_modules()):
      if isinstance(m, lora.LoRA):      # non-zero B: the adapters (and their dropout) count
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
    return model

  out = {}
  for remat in (False, True):
    graphdef, params, rest = nnx.split(build(remat), nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)   # arrays in, as the train step

    def loss(params, rest):
      logits = nnx.merge(graphdef, params, rest)(ids)
      return jnp.sum(logits * weights), logits

    (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
    out[remat] = (np.asarray(logits), {"/".join(map(str, p)): np.asarray(g) for p, g in
                                       nnx.to_flat_state(grads)})
  (l0, g0), (l1, g1) = out[False], out[True]
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  assert np.abs(l0 - np.asarray(ref)).max() > 1e-3       # dropout and adapters are live
  assert g0.keys() == g1.keys() and any("lora_a" in k for k in g0)
  for k in g0:
    assert np.abs(g0[k]).max() > 0, k
    np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-6, err_msg=k)
  bf = hf.load_llm(llama_dir, dtype="bfloat16")
  assert bf.embed_tokens[...].dtype == jnp.bfloat16
  out = fx.jit_apply(bf, ids)
  assert out.dtype == jnp.float32
  assert fx.rel_err(out, ref) < 5e-2


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_equals_the_layer_loop(llama_dir, remat):
  """``scan_layers=True`` (one ``lax.scan`` over the stacked layer states) against the per-layer
  loop on the same weights: logits, every gradient, and the dropout streams each layer leaves
  behind (LoRA dropout on, so every layer must draw its own masks, as the loop does)."""
  from feallm_jax.models import lora
  cfg = hf.llm_config_from_dir(llama_dir)
  assert cfg.num_layers >= 2
  ids = jnp.asarray(_ids(t=8))
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, cfg.vocab_size)), jnp.float32)

  def build(scan):
    with sharding.mesh_rules(sharding.single_device_mesh()):
      model = nnx.eval_shape(lambda: llm.Decoder(cfg, lora=lcfg, remat=remat, scan_layers=scan,
                                                 rngs=nnx.Rngs(params=0, dropout=1)))
      init = nnx.jit(lambda: nnx.state(llm.Decoder(cfg, lora=lcfg, remat=remat, scan_layers=scan,
                                                   rngs=nnx.Rngs(params=0, dropout=1))))()
    nnx.update(model, init)
    hf.load_llm_weights(model, llama_dir)
    for i, (_, m) in enumerate(model.iter_modules()):
      if isinstance(m, lora.LoRA):
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
    return model

  out = {}
  for scan in (False, True):
    model = build(scan)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def loss(params, rest):
      m = nnx.merge(graphdef, params, rest)
      logits = m(ids)
      return jnp.sum(logits * weights), (logits, nnx.as_pure(nnx.state(m, nnx.RngCount)))

    (_, (logits, counts)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
    out[scan] = (np.asarray(logits), {"/".join(map(str, p)): np.asarray(g) for p, g in
                                      nnx.to_flat_state(grads)},
                 {"/".join(map(str, p)): int(c) for p, c in nnx.to_flat_state(counts)})
  (l0, g0, c0), (l1, g1, c1) = out[False], out[True]
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  assert c0 == c1 and len(c0) == 7 * cfg.num_layers and set(c0.values()) == {1}
  assert g0.keys() == g1.keys() and any("lora_a" in k for k in g0)
  for k in g0:
    assert np.abs(g0[k]).max() > 0, k
    np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_inputs_embeds_and_return_hidden(llama_dir):
  model = hf.load_llm(llama_dir)
  ids = jnp.asarray(_ids(t=6))
  a = model(ids)
  b, h = model(inputs_embeds=model.embed(ids), return_hidden=True)
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert h.shape == (2, 6, 32)
  with pytest.raises(ValueError, match="exactly one"):
    model(ids, inputs_embeds=model.embed(ids))
  with pytest.raises(ValueError, match="attention_mask"):
    model(ids, attention_mask=jnp.ones((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="positions"):
    model(ids, positions=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="input_ids"):
    model(jnp.zeros((2, 6), jnp.float32))


def test_config_from_hf_and_dict():
  base = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)
  cfg = llm.LLMConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0},
                               "rope_theta": 1e4})
  assert cfg.rope_type == "linear" and cfg.num_kv_heads == 4 and cfg.head_dim == 8
  np.testing.assert_allclose(llm.rope_inv_freq(cfg),
                             1 / (1e4 ** (np.arange(0, 8, 2) / 8)) / 2, rtol=1e-6)
  hash(cfg)  # static module attribute: must be hashable
  with pytest.raises(ValueError, match="model_type"):
    llm.LLMConfig.from_hf({**base, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    llm.LLMConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="num_kv_heads"):
    llm.LLMConfig.from_hf({**base, "num_key_value_heads": 3})
  q = llm.LLMConfig.from_dict(dict(hf_path="", model_type="qwen2", vocab_size=96, hidden_size=32,
                                   intermediate_size=64, num_layers=1, num_heads=4,
                                   num_kv_heads=2, head_dim=8))
  assert q.attention_bias
