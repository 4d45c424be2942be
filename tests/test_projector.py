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


def _np_projector(p, f_l, f_s, f_loc):
  """The module docstring's equations in float64 numpy, read off the weights:
     x = F_L + CrossAttn(LN(F_L), LN(F_s)); x = x + CrossAttn(LN(x), LN(F'_local));
     x = x + SelfAttn(LN(x)); tokens = fc2(GELU(fc1(LN(x))))  (exact GELU, LN eps 1e-5)."""
  from scipy.special import erf
  a = lambda v: np.asarray(v[...], np.float64)

  def ln(mod, z):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * a(mod.scale) + a(mod.bias)

  def dense(mod, z):
    return z @ a(mod.kernel) + a(mod.bias)

  def attn(mod, x, ctx):
    h = mod.num_heads
    xq = ln(mod.q_norm, x)
    kv = xq if ctx is None else ln(mod.kv_norm, ctx)
    b, t, d = x.shape
    s = kv.shape[1]
    q = dense(mod.q, xq).reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
    k = dense(mod.k, kv).reshape(b, s, h, d // h).transpose(0, 2, 1, 3)
    v = dense(mod.v, kv).reshape(b, s, h, d // h).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // h)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return dense(mod.o, out), w

  f_l, f_s, f_loc = (np.asarray(z, np.float64) for z in (f_l, f_s, f_loc))
  x = f_l + attn(p.global_attn, f_l, f_s)[0]
  out, w = attn(p.local_attn, x, f_loc)
  x = x + out
  x = x + attn(p.self_attn, x, None)[0]
  hdn = dense(p.mlp.fc1, ln(p.mlp_norm, x))
  hdn = 0.5 * hdn * (1 + erf(hdn / np.sqrt(2)))
  return dense(p.mlp.fc2, hdn), w


def test_multi_perspective_equals_a_numpy_transcription():
  """Order (global -> local -> self), which input is the query (the running x; F_s and the
  regions are keys/values), the pre-norms and the MLP, against ``_np_projector``. Every
  attention output projection is non-zero and the three attentions get distinct inputs, so
  a swapped order or a wrong query changes the tokens."""
  with sharding.mesh_rules(sharding.single_device_mesh()):
    p = pj.MultiPerspectiveProjector(16, 24, num_heads=4, local_clues=True, rngs=nnx.Rngs(2))
  for i, mod in enumerate((p.global_attn, p.local_attn, p.self_attn)):
    for d in (mod.q, mod.k, mod.v, mod.o):
      d.bias[...] = 0.1 * jax.random.normal(jax.random.key(10 + i), d.bias.shape)
  f_l, f_s, f_loc = _inputs(seed=2, n=5, m=7)
  tokens, w = nnx.jit(lambda m, a, b, c: m(a, b, c, return_attention=True))(p, f_l, f_s, f_loc)
  ref, ref_w = _np_projector(p, f_l, f_s, f_loc)
  np.testing.assert_allclose(np.asarray(tokens), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-4, atol=1e-6)
