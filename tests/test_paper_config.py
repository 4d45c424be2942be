"""configs/llava7b_lora.py as it ships: LoRA dropout 0.05, bf16 frozen base and compute, remat,
8-step gradient accumulation.

Every other test sets ``lora.dropout=0.0``, which is how a build that could not start with any
dropout (``KeyError: No RngStream named 'dropout'``) passed a green suite. Here the paper config
goes through the real code path twice: abstractly at its real widths (nothing allocated), and
for real at tiny widths through ``build_model``, the train step and generation. Dropout must be
on in the train step (its masks change the loss, its counters advance once per micro-batch) and
off in evaluation and generation (outputs equal a dropout-free model's, run after run).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.llava7b_lora as paper
from feallm_jax import sharding
from feallm_jax.data import tokenizer as tok_lib
from feallm_jax.eval import feabench, generate as gen
from feallm_jax.models import feallm, layers
from feallm_jax.models import lora as lora_lib
from feallm_jax.train import step as step_lib

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def test_paper_config_holds_the_documented_settings():
  """The settings the tests below rely on, read from the shipped config (README's table)."""
  c = paper.get_config()
  m = c.model
  assert dict(m.lora) == dict(rank=128, alpha=256.0, dropout=0.05, targets=TARGETS)
  assert (m.frozen_dtype, m.compute_dtype, m.param_dtype) == ("bfloat16", "bfloat16", "float32")
  assert m.remat is True and m.train_llm == "lora" and m.train_vision is False
  assert (c.data.batch_size, c.optim.accum_steps) == (128, 8)


def _dropouts(model):
  return [(p, m) for p, m in model.iter_modules() if isinstance(m, nnx.Dropout)]


def test_paper_config_builds_abstractly_with_its_real_settings(devices):
  """Real widths and every shipped setting; only the depth is cut (4 ViT, 2 LLM layers) to keep
  the trace short: each layer is built by the same code. The abstract build shares its
  constructor with ``build_model`` (``feallm._constructor``)."""
  c = paper.get_config()
  c.model.image_token_id = 32000          # what import_hf gives Vicuna's tokenizer + <image>
  c.model.vision.num_layers = 4
  c.model.multi_layers = (1, 2, 3, 4)
  c.model.llm.num_layers = 2
  spec = feallm.spec_from_config(c)
  assert spec.lora.dropout == 0.05 and spec.remat and spec.frozen_dtype == "bfloat16"
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  model = feallm.abstract_model(spec, mesh)
  drops = _dropouts(model)
  assert len(drops) == len(TARGETS) * 2                 # one per adapted projection
  assert all(d.rate == 0.05 and d.deterministic is False for _, d in drops)
  assert model.llm.remat is True
  dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(
      nnx.state(model.llm, layers.BaseParam))}
  assert dtypes == {"bfloat16"}
  # The train step's state carries the dropout streams (keys + counters), shardings and all.
  tr = step_lib.Trainer(c, model, mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(c))
  assert tr.is_abstract
  rest = tr.abstract_state().rest
  counts = [v for p, v in nnx.to_flat_state(rest) if "dropout" in map(str, p) and
            p[-1] == "count"]
  assert len(counts) == len(TARGETS) * 2


def test_paper_config_train_step_and_generation_trace_at_real_widths(devices):
  """The exact train step (8-step accumulation scan, remat with live dropout, bf16) and the
  compiled generation (prefill + decode while loop, dropout off) traced and lowered at the
  shipped widths and lengths, nothing compiled or allocated: a dropout stream advanced from the
  wrong trace level (``TraceContextError: Cannot mutate RngCount``) fails here, in CI."""
  from feallm_jax import aot
  from feallm_jax.data import pipeline
  c = paper.get_config()
  c.model.image_token_id = 32000
  c.model.vision.num_layers = 4
  c.model.multi_layers = (1, 2, 3, 4)
  c.model.llm.num_layers = 2
  c.mesh.update(data=1, fsdp=8, tensor=1)
  mesh = sharding.make_mesh(dict(c.mesh), devices)
  model = feallm.abstract_model(feallm.spec_from_config(c), mesh)
  assert len(_dropouts(model)) == len(TARGETS) * 2
  tr = step_lib.Trainer(c, model, mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(c))
  batch = aot._abstract_batch(pipeline.batch_signature(c, 128, train=True), mesh)
  text = tr.lower(batch).as_text()
  assert "2048" in text and "4096" in text             # the shipped length and LLM width
  # Generation as eval_feabench / predict run it (generate() takes the dropout-off view).
  off = layers.with_dropout(model, False)
  graphdef, state = nnx.split(off)
  state = aot._concrete(state, mesh)
  sig = pipeline.batch_signature(c, 8, train=False)
  inputs = aot._abstract_batch({k: sig[k] for k in gen.PROMPT_KEYS_VISION}, mesh)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
  with jax.set_mesh(mesh):
    gen._generate_jit.lower(
        graphdef, state, inputs, key, jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep),
        scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32), max_new_tokens=4,
        greedy=True, nucleus=False, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# For real, at tiny widths.

def tiny_paper_config():
  """llava7b_lora with tiny widths and depth; dropout, dtypes, remat and accumulation as shipped."""
  c = paper.get_config()
  m = c.model
  m.vision.update(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                  num_layers=4, num_heads=2)
  m.llm.update(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
               num_kv_heads=2, head_dim=16)
  m.multi_layers = (1, 2, 3, 4)
  m.projector_heads = 2
  m.lca.update(crop_size=8, depth=2, width=16, groups=4, num_heads=2)
  m.lora.rank = 4
  c.data.update(tokenizer="", max_len=24, batch_size=16)    # 8 micro-batches of 2
  c.mesh.update(data=1, fsdp=2, tensor=1)
  c.require_pretrained = False
  return c


def _batch(spec, b, t, seed, image_id, train=True):
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, 100, (b, t)).astype(np.int32)
  ids[:, 1] = image_id
  y0, x0 = rng.uniform(0, 0.6, (2, b, 16))
  out = dict(image=rng.normal(size=(b, 28, 28, 3)).astype(np.float32),
             regions=np.stack([y0, x0, y0 + 0.3, x0 + 0.3], -1).astype(np.float32),
             input_ids=ids, attention_mask=np.ones((b, t), np.int32))
  if train:
    lm = np.zeros((b, t), np.int32)
    lm[:, t // 2:] = 1
    out["loss_mask"] = lm
  return out


def _randomize_lora_b(model, seed=1):
  """B starts at zero (a fresh adapter is a no-op, so dropout before it changes nothing):
  give every adapter a non-zero B so dropout shows in the forward pass."""
  key = jax.random.key(seed)
  adapters = [m for _, m in model.iter_modules() if isinstance(m, lora_lib.LoRA)]
  assert adapters
  for i, a in enumerate(adapters):
    x = a.lora_b[...]
    a.lora_b[...] = jax.device_put(
        0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype), x.sharding)
  return model


@pytest.fixture(scope="module")
def built(devices):
  """The shipped path (``build_model``) with dropout, and the reference: the same weights in a
  model built with ``lora.dropout=0`` (no dropout layers at all)."""
  c = tiny_paper_config()
  c0 = c.copy_and_resolve_references()
  c0.model.lora.dropout = 0.0
  mesh = sharding.make_mesh(dict(c.mesh), devices[:2])
  with_drop = _randomize_lora_b(feallm.build_model(c, mesh))
  without = feallm.abstract_model(feallm.spec_from_config(c0), mesh)
  assert not _dropouts(without)
  nnx.update(without, nnx.state(with_drop, nnx.Param))
  leaves = jax.tree.leaves(nnx.state(without))
  assert leaves and not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  return c, mesh, with_drop, without


def _counts(rest):
  """Every dropout stream's counter (draws so far) in a pure state."""
  return [int(np.asarray(getattr(v, "get_value", lambda: v)()))
          for p, v in nnx.to_flat_state(rest) if "dropout" in map(str, p) and p[-1] == "count"]


def test_train_step_applies_dropout_and_advances_its_streams(built):
  c, mesh, with_drop, without = built
  spec = with_drop.spec
  batch = _batch(spec, 16, 24, 0, spec.image_token_id)
  with jax.set_mesh(mesh):   # the loss without dropout, over the same 16 rows
    ref_loss = float(nnx.jit(lambda m, b: feallm.loss_fn(m, b)[0])(
        without, {k: jnp.asarray(v) for k, v in batch.items()}))
  tr = step_lib.Trainer(c, layers.with_dropout(with_drop, False), mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(c))   # the step turns it back on
  state = tr.initial_state()
  assert _counts(state.rest) == [0] * (len(TARGETS) * 2)
  losses = []
  for k in (1, 2):
    state, m = tr.step(state, tr.put_batch(batch))
    assert bool(m["finite"])
    losses.append(float(m["loss"]))
    # One draw per adapter per micro-batch (remat's recomputation draws nothing extra).
    assert _counts(state.rest) == [8 * k] * (len(TARGETS) * 2)
  # Dropout masks the adapters' inputs: the same weights and batch give another loss, and the
  # second step (new masks; the warmup keeps the update near zero) another again. Measured:
  # without dropout the step's loss is within 6e-5 of ref_loss and repeats exactly; with it,
  # 0.016 and 0.005 away.
  assert abs(losses[0] - ref_loss) > 2e-3, (losses, ref_loss)
  assert abs(losses[1] - losses[0]) > 1e-3, losses
  # The model handed to evaluation has dropout off.
  assert all(d.deterministic for _, d in _dropouts(tr.merge(state)))
  # The model the Trainer was built from still owns its arrays (the step donated a copy), so
  # it can still be evaluated: the next test generates with it.
  deleted = [p for p, v in nnx.to_flat_state(nnx.state(with_drop))
             if v.get_value().is_deleted()]
  assert not deleted, deleted[:3]


def test_evaluation_and_generation_are_deterministic_with_dropout_on(built):
  c, mesh, with_drop, without = built
  spec = with_drop.spec
  tok = tok_lib.load("")
  assert all(d.deterministic is False for _, d in _dropouts(with_drop))   # built for training
  prompts = _batch(spec, 4, 12, 3, spec.image_token_id, train=False)
  sampling = gen.SamplingConfig(max_new_tokens=6, eos_ids=feabench.eos_ids(tok),
                                pad_id=int(tok.pad_token_id))
  ref_tokens, ref_len = gen.generate(without, prompts, sampling)
  for _ in range(2):
    tokens, lengths = gen.generate(with_drop, prompts, sampling)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(lengths, ref_len)
  cand = feabench.candidate_ids(tok, ["Happiness.", "Sadness.", "Anger."])
  ref = gen.score_candidates(without, prompts, *cand)
  for _ in range(2):
    got = gen.score_candidates(with_drop, prompts, *cand)
    np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-6, atol=1e-6)
  # The off view of the forward equals the dropout-free model; the on view does not, and
  # draws a new mask every call.
  batch = {k: jnp.asarray(v) for k, v in _batch(spec, 2, 12, 4, spec.image_token_id).items()}
  with jax.set_mesh(mesh):
    ref_logits = np.asarray(without(batch)["logits"], np.float32)
    off = layers.with_dropout(with_drop, False)
    np.testing.assert_array_equal(np.asarray(off(batch)["logits"], np.float32), ref_logits)
    on = layers.with_dropout(with_drop, True)
    l1 = np.asarray(on(batch)["logits"], np.float32)
    l2 = np.asarray(on(batch)["logits"], np.float32)
  assert np.abs(l1 - ref_logits).max() > 1e-3 and np.abs(l1 - l2).max() > 1e-3


def test_a_trained_checkpoint_loads_for_evaluation_with_dropout_off(built, tmp_path):
  """``feabench.load_model`` is what eval_feabench, predict (and --explain's forward), the train
  loop's periodic evaluation and the notebook use: a checkpoint written by the train step with
  dropout on comes back with every dropout layer off, its RNG streams restored, and its forward
  equal to a dropout-free model holding the same weights, call after call."""
  from feallm_jax.train import checkpoint as ckpt_lib
  c, mesh, with_drop, without = built
  spec = with_drop.spec
  tr = step_lib.Trainer(c, with_drop, mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(c))
  state = tr.initial_state()
  before = _counts(state.rest)        # earlier tests may have drawn from the streams
  state, _ = tr.step(state, tr.put_batch(_batch(spec, 16, 24, 5, spec.image_token_id)))
  saved = _counts(state.rest)
  assert saved == [n + 8 for n in before]
  workdir = str(tmp_path / "run")
  ckpt = ckpt_lib.Checkpointer(workdir, c)
  ckpt.save(1, state)
  ckpt.close()
  trained = tr.merge(state)

  model, step = feabench.load_model(c, workdir, mesh=mesh)
  assert step == 1
  drops = _dropouts(model)
  assert len(drops) == len(TARGETS) * 2 and all(d.deterministic for _, d in drops)
  assert _counts(nnx.state(model, nnx.RngState)) == saved      # the streams are restored
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
                            nnx.to_flat_state(nnx.state(trained, nnx.LoRAParam))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=p)
  ref = feallm.abstract_model(dataclasses.replace(spec, lora=without.spec.lora), mesh)
  assert not _dropouts(ref)
  nnx.update(ref, nnx.state(model, nnx.Param))
  batch = {k: jnp.asarray(v) for k, v in _batch(spec, 2, 12, 6, spec.image_token_id).items()}
  with jax.set_mesh(mesh):
    want = np.asarray(ref(batch)["logits"], np.float32)
    for _ in range(2):
      np.testing.assert_array_equal(np.asarray(model(batch)["logits"], np.float32), want)
