"""The jitted step on the real FEALLM: accumulation equivalence, NaN skip, frozen weights."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import configs.tiny_synthetic as tiny
from feallm_jax import sharding
from feallm_jax.data import pipeline
from feallm_jax.models import feallm
from feallm_jax.train import step as step_lib


def small_config(data_dir: str):
  """tiny_synthetic, shrunk further so a 2-core CPU compiles it quickly (LoRA mode)."""
  c = tiny.get_config()
  c.model.base_checkpoint = ""       # random towers of the dims below
  c.data.update(builder_config="small", data_dir=data_dir, batch_size=8, augment=False,
                max_len=96)
  m = c.model
  m.vision.update(patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)
  m.llm.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=32)
  m.multi_layers = (1, 2)
  m.projector, m.local_clues = "mlp", False
  m.train_llm, m.train_vision = "lora", False
  m.lora.update(rank=4, alpha=8.0, dropout=0.0)
  c.optim.update(lr_lora=1e-2, lr_proj=1e-2, lr_base=1e-2, warmup_frac=0.0)
  c.train.num_steps = 10
  return c


def _copy(model):
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tmp_path_factory.getbasetemp(), "jax_cache"))
  config = small_config(str(tmp_path_factory.mktemp("data")))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  model = feallm.build_model(config, mesh)
  batches = [b for _, b in zip(range(2), pipeline.train_iterator(config))]
  return config, mesh, model, batches


def _params(state):
  return {"/".join(map(str, p)): np.asarray(jax.device_get(v))
          for p, v in nnx.to_flat_state(state.params)}


def test_accumulation_equals_large_batch_and_frozen_weights_untouched(setup):
  config, mesh, model, batches = setup
  trainable = feallm.trainable_filter(config)
  one = step_lib.Trainer(config, _copy(model), mesh, loss_fn=feallm.loss_fn, trainable=trainable)
  c2 = config.copy_and_resolve_references()
  c2.optim.accum_steps = 2
  two = step_lib.Trainer(c2, _copy(model), mesh, loss_fn=feallm.loss_fn, trainable=trainable)

  frozen_before = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), one.frozen)
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen_before))
  s1, s2 = one.initial_state(), two.initial_state()
  n_train = sum(x.size for x in jax.tree.leaves(s1.params))
  assert 0 < n_train < n_frozen          # LoRA mode: most weights are frozen
  for b in batches:
    s1, m1 = one.step(s1, one.put_batch(b))
    s2, m2 = two.step(s2, two.put_batch(b))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=2e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    assert float(m1["tokens"]) == float(m2["tokens"]) > 0
  p1, p2 = _params(s1), _params(s2)
  moved = 0
  for k in p1:
    # Adam normalizes near-zero gradients to ~lr*sign(g): allow 2% of one lr step.
    np.testing.assert_allclose(p1[k], p2[k], rtol=1e-3, atol=2e-4, err_msg=k)
  init = _params(step_lib.Trainer(config, _copy(model), mesh, loss_fn=feallm.loss_fn,
                                  trainable=trainable).initial_state())
  moved = sum(not np.array_equal(init[k], p1[k]) for k in p1)
  assert moved >= len(p1) // 2, "training did not update the trainable weights"
  # Frozen base weights: bit-identical after training, and stored in model.frozen_dtype.
  frozen_after = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), one.frozen)
  jax.tree.map(np.testing.assert_array_equal, frozen_before, frozen_after)
  # Optimizer state exists only for trainable weights.
  opt_leaves = sum(x.size for x in jax.tree.leaves(s1.opt_state) if x.ndim)
  assert opt_leaves <= 2 * n_train


def test_non_finite_batch_is_skipped_and_counted(setup):
  config, mesh, model, batches = setup
  tr = step_lib.Trainer(config, _copy(model), mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(config))
  state = tr.initial_state()
  state, m = tr.step(state, tr.put_batch(batches[0]))
  assert bool(m["finite"]) and int(m["skipped"]) == 0
  before = _params(state)
  updates_before = int(state.updates)
  bad = dict(batches[1])
  bad["image"] = np.full_like(bad["image"], np.nan)
  for i in range(2):
    state, m = tr.step(state, tr.put_batch(bad))
    assert not bool(m["finite"])
    assert int(m["skipped"]) == i + 1 and int(m["bad_streak"]) == i + 1
  after = _params(state)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  assert int(state.updates) == updates_before and int(state.step) == 3
  state, m = tr.step(state, tr.put_batch(batches[1]))       # recovers
  assert bool(m["finite"]) and int(m["bad_streak"]) == 0 and int(m["skipped"]) == 2
  assert np.isfinite(float(m["loss"]))


def test_batch_shape_errors_are_clear(setup):
  config, mesh, model, batches = setup
  tr = step_lib.Trainer(config, _copy(model), mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(config))
  odd = {k: v[:6] for k, v in batches[0].items()}
  with pytest.raises(ValueError, match="micro-batches"):
    tr.batch_shardings(odd)
  c = config.copy_and_resolve_references()
  c.model.train_llm, c.model.train_vision = "frozen", False
  with pytest.raises(ValueError, match="nothing would train"):
    step_lib.Trainer(c, _copy(model), mesh, loss_fn=feallm.loss_fn,
                     trainable=nnx.All(nnx.Param, nnx.PathContains("nonexistent")))
