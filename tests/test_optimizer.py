"""Optimizer: groups by variable type, per-group learning rates, warmup+cosine, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import layers, lora as lora_lib
from feallm_jax.train import optimizer


def _config(**optim):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(dict(
      lr_lora=1e-2, lr_proj=1e-3, lr_base=1e-4, warmup_frac=0.2, schedule="cosine",
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0, accum_steps=1))
  c.optim.update(optim)
  c.train = ml_collections.ConfigDict(dict(num_steps=10))
  return c


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.base = layers.Dense(4, 4, axes=("embed", "mlp"), param_type=layers.BaseParam,
                             lora=lora_lib.LoRAConfig(rank=2, alpha=4.0, dropout=0.0), rngs=rngs)
    self.proj = layers.Dense(4, 3, axes=("embed", None), use_bias=True, rngs=rngs)


@pytest.fixture(scope="module")
def net():
  with sharding.mesh_rules(sharding.single_device_mesh()):
    return _Net(nnx.Rngs(0))


def test_groups_follow_variable_types(net):
  state = nnx.state(net, nnx.Param)
  labels = dict(nnx.to_flat_state(optimizer.labels(state)))
  assert labels[("base", "kernel")] == "base"
  assert labels[("base", "lora", "lora_a")] == "lora"
  assert labels[("base", "lora", "lora_b")] == "lora"
  assert labels[("proj", "kernel")] == "proj"
  assert labels[("proj", "bias")] == "proj"
  sizes = optimizer.group_sizes(state)
  assert sizes == {"base": 16, "lora": 16, "proj": 15}
  with pytest.raises(TypeError, match="not a parameter type"):
    optimizer.group_of(nnx.BatchStat(jnp.zeros(2)))


def test_warmup_then_cosine_to_zero():
  sched = optimizer.make_schedule(1.0, _config())
  vals = np.array([float(sched(i)) for i in range(11)])
  np.testing.assert_allclose(vals[:3], [0.0, 0.5, 1.0], atol=1e-6)  # 2 warmup steps
  assert np.all(np.diff(vals[2:]) <= 1e-7)                             # then decays
  np.testing.assert_allclose(vals[10], 0.0, atol=1e-6)
  np.testing.assert_allclose(vals[6], 0.5, atol=1e-6)                  # cosine midpoint
  with pytest.raises(ValueError, match="schedule"):
    optimizer.make_schedule(1.0, _config(schedule="exp"))
  with pytest.raises(ValueError, match="warmup_frac"):
    optimizer.make_schedule(1.0, _config(warmup_frac=1.5))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_equals_optax_with_a_traced_horizon(schedule):
  """``make_schedule`` against optax's own schedules (linear warmup joined to the decay),
  with the horizon as constants and as traced arguments of a jitted function: same values
  at every count, past the end too."""
  for num_steps, frac in ((10, 0.0), (10, 0.2), (37, 0.35)):
    c = _config(schedule=schedule, warmup_frac=frac)
    c.train.num_steps = num_steps
    w = int(round(frac * num_steps))
    decay = {"cosine": optax.cosine_decay_schedule(1e-2, max(num_steps - w, 1)),
             "linear": optax.linear_schedule(1e-2, 0.0, max(num_steps - w, 1)),
             "constant": optax.constant_schedule(1e-2)}[schedule]
    ref = decay if w == 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, 1e-2, w), decay], [w])
    h = optimizer.horizon(c)
    assert h == {"warmup": w, "decay": max(num_steps - w, 1)}
    sched = optimizer.make_schedule(1e-2, c)
    traced = jax.jit(lambda n, h: sched(n, h))
    h_arrays = {k: jnp.asarray(v, jnp.int32) for k, v in h.items()}
    for n in range(num_steps + 3):
      want = float(ref(n))
      np.testing.assert_allclose(float(sched(n)), want, rtol=1e-6, atol=1e-9)
      np.testing.assert_allclose(float(traced(jnp.int32(n), h_arrays)), want, rtol=1e-6,
                                 atol=1e-9)


def test_each_group_moves_at_its_own_rate(net):
  # Adam's first update is lr * sign(g) (up to eps): the step size reveals each group's lr.
  config = _config(warmup_frac=0.0, schedule="constant")
  var_state = nnx.state(net, nnx.Param)
  tx, _ = optimizer.make(config, var_state)
  params = nnx.as_pure(var_state)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = dict(nnx.to_flat_state(updates))
  np.testing.assert_allclose(flat[("base", "kernel")], -1e-4, rtol=1e-4)
  np.testing.assert_allclose(flat[("base", "lora", "lora_a")], -1e-2, rtol=1e-4)
  np.testing.assert_allclose(flat[("proj", "bias")], -1e-3, rtol=1e-4)


def _reference_adamw(params, grads_seq, *, lrs, num_steps, warmup, clip, wd, b1, b2, eps):
  """AdamW (Loshchilov & Hutter, decoupled decay, optax's bias correction) after global-norm
  clipping, transcribed in float64 numpy: the independent reference for ``optimizer.make``.
  ``lrs``: peak learning rate per parameter path; warmup is linear from 0, then cosine to 0;
  weight decay applies to >= 2-D weights only."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq):
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    if norm > clip:
      g = {k: x * (clip / norm) for k, x in g.items()}
    if t < warmup:
      frac = t / warmup
    else:
      frac = 0.5 * (1 + np.cos(np.pi * (t - warmup) / (num_steps - warmup)))
    for k in p:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = mu[k] / (1 - b1 ** (t + 1)), nu[k] / (1 - b2 ** (t + 1))
      u = m_hat / (np.sqrt(v_hat) + eps) + (wd * p[k] if p[k].ndim >= 2 else 0.0)
      p[k] = p[k] - lrs[k] * frac * u
  return p


def test_make_equals_a_numpy_adamw_with_clipping_decay_and_schedules(net):
  """Four updates of the project's transformation (clip, per-group AdamW, decay mask, warmup +
  cosine) against the numpy transcription. The gradient norms swing from far above the clip
  (100x) to below it: Adam's moments then weigh the steps differently with and without the
  clip, so dropping it, decaying biases or swapping a group's rate all show."""
  var_state = nnx.state(net, nnx.Param)
  config = _config(grad_clip=1.0, weight_decay=0.1, warmup_frac=0.2)   # 2 warmup steps of 10
  config.optim.eps = 1e-3     # comparable to the clipped gradients: the clip's scale matters
  tx, _ = optimizer.make(config, var_state)
  params = nnx.as_pure(var_state)
  rng = np.random.default_rng(0)
  paths = [p for p, _ in nnx.to_flat_state(params)]
  grads_seq = []
  for scale in (100.0, 0.01, 5.0, 0.3):
    grads_seq.append({p: scale * rng.normal(size=np.shape(v)).astype(np.float32)
                      for p, v in nnx.to_flat_state(params)})
  opt_state = tx.init(params)
  cur = params
  update = jax.jit(tx.update)
  for g in grads_seq:
    g_tree = nnx.from_flat_state([(p, jnp.asarray(g[p])) for p in paths])
    upd, opt_state = update(g_tree, opt_state, cur)
    cur = optax.apply_updates(cur, upd)
  lr = {"base": 1e-4, "lora": 1e-2, "proj": 1e-3}
  lrs = {("base", "kernel"): lr["base"], ("base", "lora", "lora_a"): lr["lora"],
         ("base", "lora", "lora_b"): lr["lora"], ("proj", "kernel"): lr["proj"],
         ("proj", "bias"): lr["proj"]}
  assert set(lrs) == set(paths)
  want = _reference_adamw({p: v for p, v in nnx.to_flat_state(params)}, grads_seq, lrs=lrs,
                          num_steps=10, warmup=2, clip=1.0, wd=0.1, b1=0.9, b2=0.999, eps=1e-3)
  got = dict(nnx.to_flat_state(cur))
  for p in paths:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=2e-5, atol=1e-7,
                               err_msg="/".join(map(str, p)))
  # The comparison can tell: without the clip the same run lands elsewhere.
  unclipped = _reference_adamw({p: v for p, v in nnx.to_flat_state(params)}, grads_seq,
                               lrs=lrs, num_steps=10, warmup=2, clip=np.inf, wd=0.1, b1=0.9,
                               b2=0.999, eps=1e-3)
  assert max(np.abs(unclipped[p] - want[p]).max() for p in paths) > 1e-5


def test_learning_rates_reported_for_present_groups():
  scheds = optimizer.schedules(_config(warmup_frac=0.0, schedule="constant"))
  lrs = optimizer.learning_rates(scheds, jnp.asarray(3), {"lora": 5, "base": 0, "proj": 2})
  assert set(lrs) == {"lr_lora", "lr_proj"}
  np.testing.assert_allclose(float(lrs["lr_lora"]), 1e-2)
  with pytest.raises(ValueError, match="lr_proj"):
    optimizer.schedules(_config(lr_proj=-1.0))
