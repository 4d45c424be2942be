"""Causal self-attention kernels for long sequences: XLA, Pallas TPU splash, cuDNN flash.

The decoder's training / full-sequence attention is causal over one sequence with some key
slots invalid (padding). The plain XLA path materializes the ``[B, H, T, T]`` float32 logits
(and keeps them for the backward pass); at FEALLM's 2048 text + 577 visual tokens that is the
largest activation of the step. The kernels here never materialize it:

* ``splash``: ``jax.experimental.pallas.ops.tpu.splash_attention`` (block-sparse flash
  attention for TPU). Validity is passed as segment ids (1 = valid key, 0 = invalid), which
  with a causal mask gives every *valid* query exactly the keys the XLA path lets it see;
  invalid (padding) queries attend among themselves instead, and their outputs are never read
  by a valid query, a loss term or a logit anyone uses. The sequence is padded to a multiple of
  128 (the kernel's block) with a third segment id. Under a mesh the kernel runs inside
  ``jax.shard_map`` (batch over ``data x fsdp``, heads over ``tensor``): a Pallas call is
  opaque to the SPMD partitioner. On CPU it runs in Pallas interpret mode (tests).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only).
* ``xla``: ``jax.nn.dot_product_attention`` with an explicit boolean mask (the reference).

``auto`` picks splash on TPU, cuDNN on GPU when it accepts the shapes, else XLA. The target
platform is read from the mesh being traced under (so an ahead-of-time TPU compile on a CPU
host picks the TPU kernel), else from the default backend.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "splash", "cudnn", "auto")
SPLASH_BLOCK = 128           # sequence padding unit (the kernel's smallest block)
SPLASH_MAX_BLOCK = 512
_PAD_SEGMENT = 2             # segment id of the padding added to reach a block multiple

log = logging.getLogger(__name__)


def target_platform() -> str:
  """'tpu' / 'gpu' / 'cpu' of the mesh in context (inside jit too), else the default backend."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if not mesh.empty and device is not None and getattr(device, "platform", None):
      return str(device.platform)
  except Exception:  # noqa: BLE001 (older/newer jax without an abstract mesh device)
    pass
  return jax.default_backend()


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"model.attention={impl!r} is not supported; choose one of {IMPLS}")
  return impl


def splash_supported(head_dim: int) -> bool:
  """The TPU kernel tiles the head dimension in lanes of 128."""
  return head_dim % 128 == 0


def resolve(impl: str, head_dim: int) -> str:
  """``auto`` -> the implementation for the traced platform; explicit choices are checked."""
  check_impl(impl)
  platform = target_platform()
  if impl == "auto":
    if platform == "tpu" and splash_supported(head_dim):
      return "splash"
    return "cudnn" if platform == "gpu" else "xla"
  if impl == "splash" and not splash_supported(head_dim):
    raise ValueError(f"model.attention='splash' needs a head dimension that is a multiple of "
                     f"128, got {head_dim}; use model.attention='xla' or 'auto'")
  if impl == "cudnn" and platform != "gpu":
    raise ValueError(f"model.attention='cudnn' needs a GPU (traced for {platform!r}); use "
                     "model.attention='auto' or 'xla'")
  return impl


def reference_mask(valid: jax.Array | None, t: int) -> jax.Array:
  """The XLA path's ``[B|1, 1, T, T]`` mask: causal, keys restricted to valid slots, and every
  query sees its own slot (so padding rows stay finite)."""
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  mask = (k <= q)[None, None]
  if valid is not None:
    mask = mask & valid.astype(bool)[:, None, None, :]
  return mask | (k == q)[None, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, valid: jax.Array | None,
                     impl: str = "xla") -> jax.Array:
  """Causal self-attention, ``q [B,T,H,D]``, ``k, v [B,T,Hkv,D]``, ``valid [B,T]`` (1 = real).

  Rows of valid queries are equal across implementations (up to float rounding); see the
  module docstring for invalid rows.
  """
  b, t, h, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"causal_attention: self-attention needs len(q) == len(k), got {t} and "
                     f"{k.shape[1]}")
  if h % k.shape[2]:
    raise ValueError(f"attention: {h} query heads are not a multiple of {k.shape[2]} kv heads")
  impl = resolve(impl, d)
  if impl == "splash":
    return _splash(q, k, v, valid)
  if impl == "cudnn":
    try:
      return _cudnn(q, k, v, valid)
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
      # "where available": an unsupported cuDNN / shape falls back, loudly.
      log.warning("cuDNN flash attention unavailable (%s); using the XLA path", e)
  return jax.nn.dot_product_attention(q, k, v, mask=reference_mask(valid, t))


# -- cuDNN ------------------------------------------------------------------------------------

def _cudnn(q, k, v, valid):
  if valid is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  mask = jnp.broadcast_to(reference_mask(valid, q.shape[1]), (q.shape[0], 1, q.shape[1],
                                                               q.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


# -- splash (Pallas TPU) ----------------------------------------------------------------------

def _block(n: int) -> int:
  """Largest power-of-two block in [128, 512] dividing ``n`` (a multiple of 128)."""
  blk = SPLASH_MAX_BLOCK
  while n % blk:
    blk //= 2
  return blk


def _kernel(heads: int, t: int, interpret: bool):
  """Built inside the trace that uses it (its block tables become constants of that trace;
  a kernel cached across traces would carry one trace's mesh context into another)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  blk = _block(t)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _splash_local(q, k, v, seg, *, interpret: bool):
  """One device's shard: ``q [b,T,h,D]``, ``k, v [b,T,hkv,D]``, ``seg [b,T]`` (padded T)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  if groups > 1:            # GQA: the MHA kernel wants one k/v head per query head
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
  kernel = _kernel(h, t, interpret)
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))       # [b, h, T, D]
  qh = qh * jnp.asarray(d ** -0.5, qh.dtype)                        # splash does not scale
  out = jax.vmap(lambda a, bb, c, s: kernel(a, bb, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(
      qh, kh, vh, seg)
  return out.transpose(0, 2, 1, 3)


def _splash(q, k, v, valid):
  b, t, h, d = q.shape
  tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
  seg = (jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32))
  if tp != t:
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=_PAD_SEGMENT)
  interpret = target_platform() != "tpu"
  fn = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    names = set(mesh.axis_names)
    batch = tuple(a for a in ("data", "fsdp") if a in names) or None
    heads = "tensor" if "tensor" in names else None
    if batch is not None and b % int(np.prod([mesh.shape[a] for a in batch])):
      batch = None
    if heads is not None and (h % mesh.shape[heads] or k.shape[2] % mesh.shape[heads]):
      heads = None
    qkv = P(batch, None, heads, None)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                       check_vma=False)
  out = fn(q, k, v, seg)
  return out[:, :t]
