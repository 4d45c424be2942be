"""The Pallas TPU splash-attention path equals the plain XLA path (CPU, Pallas interpret mode).

The reference is ``jax.nn.dot_product_attention`` with the decoder's explicit boolean mask
(causal, keys restricted to valid slots): an independent implementation of the same maths.
Only rows of valid queries are compared (see ``attention_kernels``: padding queries attend
among themselves in the kernel, and nothing reads them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import attention_kernels as ak
from feallm_jax.models import llm, lora


def _valid(b, t):
  """Right padding, left padding and a hole in the middle (every pattern the model makes)."""
  v = np.ones((b, t), np.int32)
  v[1, t - 50:] = 0
  v[2, :30] = 0
  v[3, 60:80] = 0
  return jnp.asarray(v)


def _qkv(b, t, h, hkv, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((b, t, h, d), (b, t, hkv, d), (b, t, hkv, d)))


@pytest.fixture(scope="module")
def mesh(devices):
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)


def test_splash_equals_xla_forward_and_gradients_under_a_mesh(mesh):
  # T = 200 is not a multiple of the kernel's 128-token block (padding path); GQA 4 -> 2 heads.
  b, t, h, hkv, d = 4, 200, 4, 2, 128
  q, k, v = _qkv(b, t, h, hkv, d)
  valid = _valid(b, t)
  rows = np.asarray(valid, bool)

  def loss(impl):
    def f(q, k, v):
      o = ak.causal_attention(q, k, v, valid=valid, impl=impl)
      w = jnp.cos(jnp.arange(d, dtype=jnp.float32))        # a non-trivial cotangent
      return jnp.sum(jnp.where(valid[..., None, None] == 1, o, 0.0) * w), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, ref), g_ref = loss("xla")
  with jax.set_mesh(mesh):               # batch over data x fsdp, heads over tensor
    (_, out), g_out = loss("splash")
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=2e-5)
  for a, r in zip(g_out, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5, rtol=1e-5)

  # The comparison can fail: without the validity (segment ids) the kernel lets valid queries
  # see padding keys, and the rows after the hole differ from the reference.
  unmasked = jax.jit(lambda q, k, v: ak.causal_attention(q, k, v, valid=None,
                                                         impl="splash"))(q, k, v)
  assert np.abs(np.asarray(unmasked)[3, 80:] - np.asarray(ref)[3, 80:]).max() > 1e-2


def test_decoder_with_splash_equals_xla_logits_and_lora_gradients():
  cfg = llm.LLMConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=128)
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
  b, t = 4, 150
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (b, t)), jnp.int32)
  valid = _valid(b, t)

  def run(impl):
    with sharding.mesh_rules(sharding.single_device_mesh()):
      dec = llm.Decoder(cfg, lora=lcfg, remat=True, attention=impl, rngs=nnx.Rngs(0))
    # Non-zero LoRA B (it starts at zero) so the adapters take part; same values both times.
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(dec, nnx.LoRAParam))):
      var[...] = jax.random.normal(jax.random.key(i), var.shape) * 0.05
    graphdef, params, rest = nnx.split(dec, nnx.LoRAParam, ...)

    def loss(p, r):
      logits = nnx.merge(graphdef, p, r)(ids, attention_mask=valid)
      return jnp.sum(jnp.where(valid[..., None] == 1, logits, 0.0) ** 2) * 1e-3, logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
    return logits, grads

  ref, g_ref = run("xla")
  out, g_out = run("splash")
  rows = np.asarray(valid, bool)
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=1e-4, rtol=1e-4)
  for a, r in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=1e-3)


def test_choosing_an_implementation():
  assert ak.resolve("auto", 128) == "xla"            # CPU: the kernels are for TPU / GPU
  assert ak.resolve("splash", 128) == "splash"       # explicit: interpret mode on CPU
  with pytest.raises(ValueError, match="model.attention='splash' needs a head dimension"):
    ak.resolve("splash", 48)
  with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
    ak.resolve("cudnn", 128)
  with pytest.raises(ValueError, match="model.attention='flash' is not supported"):
    ak.check_impl("flash")
