"""Projectors: shapes, residual structure, region attention, MLP (LLaVA-1.5) ablation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import projector as pj


def _inputs(b=2, n=6, m=12, r=16, d=16, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(b, n, d), f(b, m, d), f(b, r, d)


def test_multi_perspective_shapes_and_region_weights():
  with sharding.mesh_rules(sharding.single_device_mesh()):
    p = pj.MultiPerspectiveProjector(16, 24, num_heads=4, local_clues=True, rngs=nnx.Rngs(0))
  f_l, f_s, f_loc = _inputs()
  tokens, w = nnx.jit(lambda m, a, b, c: m(a, b, c, return_attention=True))(p, f_l, f_s, f_loc)
  assert tokens.shape == (2, 6, 24) and w.shape == (2, 4, 6, 16)
  np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, atol=1e-5)
  # F'_local matters: changing one region changes the tokens.
  f_loc2 = f_loc.at[:, 3].add(5.0)
  assert not np.allclose(np.asarray(p(f_l, f_s, f_loc)), np.asarray(p(f_l, f_s, f_loc2)))
  # F_s matters too (the global perspective).
  assert not np.allclose(np.asarray(p(f_l, f_s, f_loc)), np.asarray(p(f_l, f_s * 2, f_loc)))


def test_residual_structure_with_zeroed_attention_outputs():
  """With the three attention output projections zeroed, x == F_L and tokens == MLP(LN(F_L))."""
  with sharding.mesh_rules(sharding.single_device_mesh()):
    p = pj.MultiPerspectiveProjector(16, 24, num_heads=4, local_clues=True, rngs=nnx.Rngs(1))
  for a in (p.global_attn, p.local_attn, p.self_attn):
    a.o.kernel[...] = jnp.zeros_like(a.o.kernel[...])
  f_l, f_s, f_loc = _inputs(seed=1)
  np.testing.assert_allclose(np.asarray(p(f_l, f_s, f_loc)),
                             np.asarray(p.mlp(p.mlp_norm(f_l))), atol=1e-5)


def test_without_local_clues_and_errors():
  with sharding.mesh_rules(sharding.single_device_mesh()):
    p = pj.MultiPerspectiveProjector(16, 24, num_heads=2, local_clues=False, rngs=nnx.Rngs(0))
    q = pj.MultiPerspectiveProjector(16, 24, num_heads=2, local_clues=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="projector_heads"):
      pj.MultiPerspectiveProjector(16, 24, num_heads=3, local_clues=False, rngs=nnx.Rngs(0))
  f_l, f_s, _ = _inputs()
  assert p.local_attn is None
  tokens, w = p(f_l, f_s, return_attention=True)
  assert tokens.shape == (2, 6, 24) and w is None
  with pytest.raises(ValueError, match="local_clues"):
    q(f_l, f_s)


def test_mlp_projector_is_llava_two_layer_gelu():
  with sharding.mesh_rules(sharding.single_device_mesh()):
    p = pj.MLPProjector(16, 24, rngs=nnx.Rngs(0))
  x, _, _ = _inputs()
  h = jax.nn.gelu(x @ p.fc1.kernel[...] + p.fc1.bias[...], approximate=False)
  ref = h @ p.fc2.kernel[...] + p.fc2.bias[...]
  np.testing.assert_allclose(np.asarray(p(x)), np.asarray(ref), atol=1e-5)
  assert all(isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)
             for _, v in nnx.to_flat_state(nnx.state(p, nnx.Param)))
