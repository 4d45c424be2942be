"""Device mesh, logical-axis rules and the helpers that put arrays on them.

Every parameter names its axes logically (``embed``, ``mlp``, ``heads`` …) in its
``out_sharding`` metadata; one rules table maps those names onto the mesh axes
``data``, ``fsdp`` and ``tensor``. Swapping the table (or the mesh shape) re-shards
the whole model without touching module code, as in MaxText and big_vision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. ``None`` means replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    # Decoder LM.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),      # flattened num_heads * head_dim
    ("kv_heads", "tensor"),   # flattened num_kv_heads * head_dim
    ("mlp", "tensor"),
    # Vision tower.
    ("vis_embed", "fsdp"),
    ("vis_heads", "tensor"),
    ("vis_mlp", "tensor"),
    ("vis_patch", None),      # flattened patch pixels (p * p * 3)
    ("vis_pos", None),        # position-embedding rows
    # FEALLM heads (small; replicated except their widest axis).
    ("proj_embed", None),
    ("proj_mlp", "tensor"),
    ("proj_heads", "tensor"),  # flattened projector attention heads
    ("lca_conv", None),
    ("lca_embed", None),
    ("lca_heads", None),       # flattened LCA attention heads
    ("lca_flat", None),        # regions * width, flattened into the F_local linear
    ("regions", None),
    # Adapters and norms.
    ("lora_rank", None),
    ("norm", None),
)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``data x fsdp x tensor`` mesh; one size may be -1 (the rest of the devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not divide into {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  need = math.prod(sizes)
  if need != len(devices):
    hint = ""
    if devices and all(d.platform == "cpu" for d in devices):
      hint = (f"; on CPU, split the host into {need} devices before JAX starts: "
              f"JAX_NUM_CPU_DEVICES={need} (or jax.config.update('jax_num_cpu_devices', {need}))")
    raise ValueError(
        f"mesh: {dict(zip(MESH_AXES, sizes))} needs {need} devices, "
        f"but {len(devices)} are available (set --config.mesh.*){hint}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def single_device_mesh() -> Mesh:
  """A 1x1x1 mesh on the first device: lets sharded code run unsharded."""
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Iterator[Mesh]:
  """Activates ``mesh`` and the logical rules: models built inside are sharded at creation."""
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(tuple(rules)):
    yield mesh


def logical_to_spec(names: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """Maps logical axis names to a PartitionSpec through ``rules``."""
  if not names:
    return P()
  table = dict(rules)
  out = []
  for name in names:
    if name is None:
      out.append(None)
    elif name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; add it to the rules table")
    else:
      out.append(table[name])
  return P(*out)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def validate_rules(model_or_state: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> None:
  """Checks the rules against the mesh and every annotated parameter, before anything is built.

  Raises ``ValueError`` naming the parameter path and axis when a logical name has no rule,
  a rule points at a mesh axis that does not exist, or a dimension does not divide evenly.
  """
  table = dict(rules)
  for logical, mesh_entry in table.items():
    for axis in _mesh_axes_of(mesh_entry):
      if axis not in mesh.shape:
        raise ValueError(f"sharding rule {logical!r} -> {mesh_entry!r}: mesh has no axis {axis!r} "
                         f"(mesh axes: {tuple(mesh.shape)})")
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state)
  problems = []
  for path, var in nnx.to_flat_state(state):
    if not isinstance(var, nnx.Variable):
      continue
    names = var.get_metadata().get("out_sharding")
    if not names:
      continue
    name = "/".join(str(p) for p in path)
    shape = var.shape if hasattr(var, "shape") else np.shape(var[...])
    if len(names) != len(shape):
      problems.append(f"{name}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
      continue
    for dim, logical in zip(shape, names):
      if logical is None:
        continue
      if logical not in table:
        problems.append(f"{name}: logical axis {logical!r} has no sharding rule")
        continue
      size = math.prod(mesh.shape[a] for a in _mesh_axes_of(table[logical]))
      if dim % size:
        problems.append(f"{name}: dimension {dim} (axis {logical!r} -> {table[logical]!r}) "
                        f"is not divisible by mesh size {size}")
  if problems:
    raise ValueError("sharding rules do not fit this model and mesh "
                     f"{dict(mesh.shape)}:\n  " + "\n  ".join(problems[:20]))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def constrain_batch(x: jax.Array) -> jax.Array:
  """Inside a jit traced under ``jax.set_mesh``: keeps an activation's batch axis split over
  data x fsdp. Without it GSPMD may follow the FSDP-sharded weights instead and keep whole
  batches per device: the 7B step's AOT compile for v5e-8 held the micro-batch's full
  ``f32[16, 2624, 32000]`` logits (5 GiB) and ``[16, 4, 2624, 2624]`` attention logits on every
  chip. No-op outside a mesh, on one shard, or when the batch does not split evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
    return x
  n = batch_shards(mesh)
  if n == 1 or x.ndim == 0 or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, P(("data", "fsdp"), *([None] * (x.ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's slice of it (multi-host safe)."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return out


def local_batch_rows(mesh: Mesh, global_rows: int) -> slice:
  """The rows of a batch-sharded global array that hold this process's data (where
  :func:`global_batch` / ``jax.make_array_from_process_local_data`` put them)."""
  if jax.process_count() == 1:
    return slice(0, global_rows)
  idx = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
  starts = sorted({(i[0].start or 0) for i in idx.values()})
  stops = sorted({(global_rows if i[0].stop is None else i[0].stop) for i in idx.values()})
  rows = slice(starts[0], stops[-1])
  if (rows.stop - rows.start) * jax.process_count() != global_rows:
    raise ValueError(f"mesh {dict(mesh.shape)}: this process's devices do not hold one "
                     f"contiguous block of the batch axis ({starts} .. {stops})")
  return rows


def process_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a batch-major result (the inverse of :func:`global_batch`): the whole
  value is gathered to every host, then the process's block is cut out."""
  if x.is_fully_addressable:
    full = np.asarray(x)
  else:
    from jax.experimental import multihost_utils
    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return full[local_batch_rows(mesh, full.shape[0])]


def specs(model_or_state: Any) -> dict[str, P]:
  """Flat ``path -> PartitionSpec`` of the arrays actually placed on devices."""
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = var[...] if isinstance(var, nnx.Variable) else var
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, NamedSharding):
      out["/".join(str(p) for p in path)] = sharding.spec
  return out
