"""The jitted step on the real FEALLM: accumulation equivalence, NaN skip, frozen weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.tiny_synthetic as tiny
from feallm_jax import sharding
from feallm_jax.data import pipeline
from feallm_jax.models import feallm
from feallm_jax.train import optimizer as optimizer_lib, step as step_lib


def small_config(data_dir: str):
  """tiny_synthetic, shrunk further so a 2-core CPU compiles it quickly (LoRA mode)."""
  c = tiny.get_config()
  c.model.base_checkpoint = ""       # random towers of the dims below
  c.model.init_adapter = ""
  c.data.update(builder_config="small", data_dir=data_dir, batch_size=8, augment=False,
                max_len=96)
  m = c.model
  m.vision.update(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=2)
  m.llm.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=32)
  m.multi_layers = (1, 2)
  m.projector, m.local_clues = "mlp", False
  m.label_loss_weight = 0.3          # the step's loss has parts: accumulation must keep them exact
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
    for part in ("lm_loss", "label_loss", "emotion_loss", "au_loss", "accuracy"):
      np.testing.assert_allclose(float(m1[part]), float(m2[part]), rtol=2e-5, err_msg=part)
    np.testing.assert_allclose(float(m1["loss"]),
                               float(m1["lm_loss"]) + 0.3 * float(m1["label_loss"]), rtol=1e-5)
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


def test_step_program_does_not_depend_on_num_steps(setup):
  """A run resumed with a longer ``train.num_steps`` runs the very program the first run
  compiled (so JAX's persistent cache serves it): the schedules' horizon is an argument of the
  step. The lowered programs are identical text, yet each step still follows its own run's
  warmup: 5 warmup updates of 10 steps, 10 of 20 (the lr after one update: 0.2 and 0.1 x peak)."""
  config, mesh, model, batches = setup
  trainers = []
  for num_steps in (10, 20):
    c = config.copy_and_resolve_references()
    c.train.num_steps = num_steps
    c.optim.update(warmup_frac=0.5, schedule="cosine")
    trainers.append((c, step_lib.Trainer(c, _copy(model), mesh, loss_fn=feallm.loss_fn,
                                         trainable=feallm.trainable_filter(c))))
  texts = [tr.lower(batches[0]).as_text() for _, tr in trainers]
  assert texts[0] == texts[1]
  peak = float(config.optim.lr_lora)
  for (c, tr), want in zip(trainers, (0.2 * peak, 0.1 * peak)):
    state = tr.initial_state()
    for b in batches:
      state, m = tr.step(state, tr.put_batch(b))
    # lr_* is reported at the update count before this step's update: 1 after two steps.
    np.testing.assert_allclose(float(m["lr_lora"]), want, rtol=1e-6)
    assert int(state.updates) == 2
    sched = optimizer_lib.make_schedule(peak, c)
    np.testing.assert_allclose(float(m["lr_lora"]), float(sched(1)), rtol=1e-6)


def test_clipping_and_weight_decay_act_inside_the_jitted_step(setup):
  """One step of the compiled train step against AdamW's first update computed by hand from
  the gradient taken outside it: clip to ``grad_clip`` by global norm, then
  ``p - lr * (g_c / (|g_c| + eps) + wd * p)`` (decay on >= 2-D weights only). ``eps`` is set
  near the clipped gradients' size, so the update depends on the clip's scale, and the decay
  term is as large as the gradient term."""
  config, mesh, model, batches = setup
  c = config.copy_and_resolve_references()
  c.optim.update(grad_clip=1e-3, weight_decay=0.5, eps=1e-4, warmup_frac=0.0,
                 schedule="constant", lr_lora=1e-2, lr_proj=1e-2, lr_base=1e-2)
  tr = step_lib.Trainer(c, _copy(model), mesh, loss_fn=feallm.loss_fn,
                        trainable=feallm.trainable_filter(c))
  state = tr.initial_state()
  batch = tr.put_batch(batches[0])
  p0 = _params(state)

  def loss(params):
    return feallm.loss_fn(nnx.merge(tr.graphdef, params, tr.frozen, state.rest), batch)[0]

  with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(loss))(state.params)
  g = {"/".join(map(str, p)): np.asarray(jax.device_get(v), np.float64)
       for p, v in nnx.to_flat_state(grads)}
  norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
  assert norm > 10 * 1e-3                                      # the clip is active
  state, m = tr.step(state, batch)
  np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-4)
  got = _params(state)
  scale = 1e-3 / norm
  for k in p0:
    gc = g[k] * scale
    u = gc / (np.abs(gc) + 1e-4) + (0.5 * p0[k] if p0[k].ndim >= 2 else 0.0)
    np.testing.assert_allclose(got[k] - p0[k], -1e-2 * u, rtol=2e-3, atol=2e-7, err_msg=k)


def test_bf16_training_step_is_close_to_float32(setup, tmp_path):
  """The paper's precision (bf16 frozen base and compute, float32 trainable weights): the same
  weights and batch give float32's loss (0.1%) and gradients (cosine > 0.99 per weight),
  finite and non-zero, and float32 updates."""
  config, mesh, model, batches = setup
  c = config.copy_and_resolve_references()
  c.model.update(frozen_dtype="bfloat16", compute_dtype="bfloat16", param_dtype="float32")
  bf = feallm.build_model(c, mesh)
  # The float32 model's weights, cast (a bf16 init draws other random numbers).
  nnx.update(bf, jax.tree.map(lambda a, b: a.astype(b.dtype), nnx.state(model, nnx.Param),
                              nnx.state(bf, nnx.Param)))
  tf = feallm.trainable_filter(c)
  t32 = step_lib.Trainer(config, _copy(model), mesh, loss_fn=feallm.loss_fn, trainable=tf)
  t16 = step_lib.Trainer(c, bf, mesh, loss_fn=feallm.loss_fn, trainable=tf)
  assert {x.dtype for x in jax.tree.leaves(t16.frozen)} == {jnp.dtype(jnp.bfloat16)}
  s32, s16 = t32.initial_state(), t16.initial_state()
  before = _params(s16)
  # The gradients themselves (outside the step, same weights and batch): same direction and
  # size leaf by leaf, within bf16's ~3 significant digits.
  grads = []
  for tr, st in ((t32, s32), (t16, s16)):
    batch = tr.put_batch(batches[0])
    fn = lambda p, tr=tr, st=st, batch=batch: feallm.loss_fn(
        nnx.merge(tr.graphdef, p, tr.frozen, st.rest), batch)[0]
    with jax.set_mesh(mesh):
      g = jax.jit(jax.grad(fn))(st.params)
    grads.append({"/".join(map(str, p)): np.asarray(jax.device_get(v), np.float64)
                  for p, v in nnx.to_flat_state(g)})
  for k, g32 in grads[0].items():
    g16 = grads[1][k]
    assert np.all(np.isfinite(g16)), k
    if np.linalg.norm(g32) > 1e-6:
      cos = np.dot(g16.ravel(), g32.ravel()) / np.linalg.norm(g16) / np.linalg.norm(g32)
      assert cos > 0.99 and abs(np.linalg.norm(g16) / np.linalg.norm(g32) - 1) < 0.05, (k, cos)
  for i, b in enumerate(batches):
    s32, m32 = t32.step(s32, t32.put_batch(b))
    s16, m16 = t16.step(s16, t16.put_batch(b))
    assert bool(m16["finite"]) and float(m16["grad_norm"]) > 0
    if i == 0:   # same weights (after one Adam step of lr 1e-2 the two runs drift apart)
      np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=1e-3)
      np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=1e-2)
  after = _params(s16)
  assert all(v.dtype == np.float32 for v in after.values())
  assert sum(not np.array_equal(before[k], after[k]) for k in after) >= len(after) // 2
