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


def test_global_norm_clipping_and_decay_mask(net):
  var_state = nnx.state(net, nnx.Param)
  params = nnx.as_pure(var_state)
  clip = optimizer.make(_config(grad_clip=1.0, warmup_frac=0.0, schedule="constant",
                                b1=0.0, b2=0.0, eps=1e-30), var_state)[0]
  big = jax.tree.map(lambda p: jnp.full(p.shape, 100.0, p.dtype), params)
  # With clipping the transformation sees grads of global norm 1; Adam with b1=b2=0 then moves
  # by lr * g/|g| = lr * sign(g) regardless, so check the clip stage directly.
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.clip_by_global_norm(1.0).init(
      params))
  np.testing.assert_allclose(float(optax.global_norm(clipped)), 1.0, rtol=1e-5)
  assert clip.update(big, clip.init(params), params)[0] is not None
  # Weight decay touches 2-D kernels only (norm scales and biases are not decayed).
  decay = optimizer.make(_config(weight_decay=0.5, warmup_frac=0.0, schedule="constant"),
                         var_state)[0]
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = decay.update(zeros, decay.init(params), params)
  flat_u, flat_p = dict(nnx.to_flat_state(upd)), dict(nnx.to_flat_state(params))
  np.testing.assert_allclose(flat_u[("proj", "kernel")], -1e-3 * 0.5 * flat_p[("proj", "kernel")],
                             rtol=1e-5)
  np.testing.assert_array_equal(flat_u[("proj", "bias")], 0.0)


def test_learning_rates_reported_for_present_groups():
  scheds = optimizer.schedules(_config(warmup_frac=0.0, schedule="constant"))
  lrs = optimizer.learning_rates(scheds, jnp.asarray(3), {"lora": 5, "base": 0, "proj": 2})
  assert set(lrs) == {"lr_lora", "lr_proj"}
  np.testing.assert_allclose(float(lrs["lr_lora"]), 1e-2)
  with pytest.raises(ValueError, match="lr_proj"):
    optimizer.schedules(_config(lr_proj=-1.0))
