"""Ahead-of-time compilation of FEALLM for a TPU topology, on any host (no TPU needed).

With ``libtpu`` installed (``pip install -e '.[tpu]'``), ``jax.experimental.topologies`` makes
compile-only devices of a TPU slice; a mesh over them, ``ShapeDtypeStruct`` inputs with
``NamedSharding`` s and ``jit(...).lower(...).compile()`` run the real TPU compiler. Nothing is
allocated: the model is built with ``nnx.eval_shape`` and the train state is the abstract one
of :class:`feallm_jax.train.step.Trainer`. The compiled programs are the exact ones training
and evaluation run: ``Trainer.jitted`` (same shardings and donation) and
``eval.generate``'s jitted generation, prefill and decode step.

From each compiled program this reads, per device: ``memory_analysis()`` (argument, output,
aliased and temporary bytes) and ``cost_analysis()`` (FLOPs, bytes accessed). Two facts of
XLA's accounting matter:

* a ``while`` loop body is counted once, so XLA's counts cover one gradient-accumulation
  micro-batch and, with ``model.scan_layers``, one of the scanned layers; the train step's
  FLOPs and bytes are therefore read from the optimized HLO by :func:`loop_aware_cost`, which
  weighs every loop body by its trip count (matmul FLOPs only; XLA's raw count is kept in the
  report as ``compiled_counted``);
* Pallas kernels (splash attention) are custom calls XLA does not cost, so with
  ``model.attention='splash'`` the attention FLOPs are missing from ``compiled`` and the
  analytic kernel FLOPs are added back (``flops.train_step``'s attention term, noted in the
  report).

``LIBTPU_INIT_ARGS=--xla_tpu_no_crash_on_oom=true`` (set by :func:`init_libtpu` before jax
starts) makes a program that does not fit still compile, so its memory can be reported and its
largest buffers named instead of one line of RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from feallm_jax import chips

NO_CRASH_ON_OOM = "--xla_tpu_no_crash_on_oom=true"
PROGRAMS = ("train", "prefill", "decode", "generate")
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(what: str):
  """Logs wall and CPU seconds of one phase: a 7B compile takes minutes, and on a busy host
  the CPU seconds say how much work it was."""
  wall, cpu = time.perf_counter(), time.process_time()
  log.info("%s ...", what)
  yield
  log.info("%s: %.0f s (%.0f CPU-s)", what, time.perf_counter() - wall, time.process_time() - cpu)


def init_libtpu() -> None:
  """Call before jax initializes: CPU as the runtime backend (no TPU is attached), and a
  compiler that reports an oversized program instead of refusing it."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Compile-only use attaches no TPU: several compiles (CI, parallel recipes) may share a host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  args = os.environ.get("LIBTPU_INIT_ARGS", "")
  if NO_CRASH_ON_OOM not in args:
    os.environ["LIBTPU_INIT_ARGS"] = (args + " " + NO_CRASH_ON_OOM).strip()


def libtpu_available() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


def topology_devices(slice_: chips.Slice) -> list:
  """Compile-only devices of a TPU slice (needs libtpu, not a TPU)."""
  if not libtpu_available():
    raise RuntimeError("ahead-of-time TPU compilation needs libtpu: pip install -e '.[tpu]' "
                       "(a separate venv is fine; see README 'Compile for TPU without a TPU')")
  from jax.experimental import topologies
  kw = {}
  if slice_.chips_per_host_bounds is not None:
    kw["chips_per_host_bounds"] = slice_.chips_per_host_bounds
  topo = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology,
                                      chip_config_name=slice_.chip_config, **kw)
  devices = list(topo.devices)
  kind = devices[0].device_kind
  if kind != slice_.spec.device_kind:
    raise RuntimeError(f"topology {slice_.topology!r} gave {kind!r} devices, expected "
                       f"{slice_.spec.device_kind!r} for {slice_.name}")
  return devices


# -- bytes ------------------------------------------------------------------------------------

def shard_bytes(x: Any) -> int:
  """Bytes of the largest shard of one (abstract) array on one device."""
  shape = tuple(x.shape)
  s = getattr(x, "sharding", None)
  if s is not None:
    shape = tuple(s.shard_shape(shape))
  return int(math.prod(shape)) * int(np.dtype(x.dtype).itemsize if not hasattr(
      x.dtype, "itemsize") else x.dtype.itemsize)


def tree_bytes(tree: Any) -> int:
  import jax
  return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def largest_leaves(tree: Any, prefix: str, n: int) -> list[tuple[str, int]]:
  import jax
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  rows = [(prefix + jax.tree_util.keystr(p), shard_bytes(x)) for p, x in flat]
  return sorted(rows, key=lambda r: -r[1])[:n]


_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(")
_CALLS = re.compile(r"fusion\(.*calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]+)"')


def largest_hlo_values(hlo_text: str, n: int) -> list[dict[str, Any]]:
  """The largest per-device arrays the optimized HLO materializes (fusion internals excluded),
  each with the JAX operation that produced it: where the temporary memory goes."""
  fused = set(_CALLS.findall(hlo_text))
  rows, comp = [], None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      m = _COMP.match(line)
      if m:             # else the tail of a multi-line instruction (a kernel's config)
        comp = m.group(1)
      continue
    if comp is None or comp in fused:
      continue
    m = _INSTR.match(line)
    if not m or m.group(4) in ("parameter", "get-tuple-element", "bitcast", "constant", "tuple"):
      continue
    dt, dims = m.group(2), m.group(3)
    if dt not in _DTYPE_BYTES:
      continue
    size = math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt]
    op = _OPNAME.search(line)
    rows.append(dict(bytes=int(size), shape=f"{dt}[{dims}]", hlo=m.group(1), kind=m.group(4),
                     op=op.group(1) if op else ""))
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:n]


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^([a-z0-9]+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier"}


def _dims(type_text: str) -> tuple[str, list[int]] | None:
  m = _ARRAY.match(type_text)
  if not m:
    return None
  return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _array_bytes(t: tuple[str, list[int]] | None) -> int:
  if t is None or t[0] not in _DTYPE_BYTES:
    return 0
  return math.prod(t[1]) * _DTYPE_BYTES[t[0]]


def loop_aware_cost(hlo_text: str) -> dict[str, float]:
  """Per-device matmul FLOPs and HBM bytes of an optimized HLO module, with every ``while``
  body counted ``known_trip_count`` times.

  Why: XLA's ``cost_analysis`` counts a loop body once, so with ``model.scan_layers`` (the layer
  stack as one ``lax.scan``) it reports one layer of 32, and the gradient-accumulation loop one
  micro-batch. Here each computation's own cost is summed and callees are weighted by how often
  they run (fusions and calls once, while bodies ``n`` times). FLOPs: ``dot`` and ``convolution``
  (a TPU program writes its matmuls as convolutions): 2 x output elements x contracted size;
  elementwise work and custom calls (Pallas kernels) are not in it. Bytes: output plus operands
  of every unfused instruction (a slice of a stacked array counted as the slice, an in-place
  update as the update): an upper estimate, since buffers a loop revisits (collective-matmul
  partial sums) count on every trip. ``unknown_trip_loops`` counts loops run once for lack of a
  count.
  """
  shapes: dict[str, tuple[str, list[int]] | None] = {}
  consts: dict[str, int] = {}
  roots: dict[str, str] = {}
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  entry, comp = None, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      m = _COMP.match(line)
      if m:             # else the tail of a multi-line instruction (a Pallas kernel's config)
        comp = m.group(1)
        comps[comp] = []
        if line.startswith("ENTRY"):
          entry = comp
      continue
    m = _DEF.match(line)
    if comp is None or not m:
      continue
    name, type_text, op, rest = m.groups()
    if line.lstrip().startswith("ROOT"):
      roots[comp] = name
    shapes[name] = _dims(type_text)
    if op == "constant":
      v = re.match(r"\s*(-?\d+)\)", rest)
      if v:
        consts[name] = int(v.group(1))
    comps[comp].append((name, op, rest, type_text))
  fused = set(_CALLS.findall(hlo_text))
  memo: dict[str, tuple[float, float, int]] = {}

  def trip_count(rest: str) -> int | None:
    """``known_trip_count`` (XLA:CPU/GPU), else the loop condition ``i < N`` with N constant
    (TPU; JAX's loops count up from 0 in steps of 1)."""
    known = _TRIP.search(rest)
    if known:
      return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    for name, op, args, _ in comps.get(cond.group(1), []) if cond else []:
      if op != "compare" or name != roots.get(cond.group(1)):
        continue
      a, b = (_OPERAND.findall(args.split(")", 1)[0]) + [None, None])[:2]
      direction = re.search(r"direction=(\w+)", args)
      d = direction.group(1) if direction else ""
      if d == "LT" and b in consts:
        return consts[b]
      if d == "GT" and a in consts:
        return consts[a]
    return None

  def conv_flops(name: str, rest: str) -> float:
    """2 x (kernel taps that meet a real input element, summed over output positions) x input
    features x output batch and features: XLA's own count. TPU programs write matmuls, batched
    ones included, as convolutions whose batch axes are dilated or strided windows, so counting
    whole windows would count the holes."""
    operands = _OPERAND.findall(rest.split(")", 1)[0])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if labels is None or len(operands) < 2:
      return 0.0
    lhs, rhs, out = shapes.get(operands[0]), shapes.get(operands[1]), shapes.get(name)
    ll, rl, ol = labels.groups()
    if lhs is None or rhs is None or out is None or (len(ll), len(rl), len(ol)) != (
        len(lhs[1]), len(rhs[1]), len(out[1])):
      return 0.0
    spatial = sorted(ch for ch in rl if ch.isdigit())
    win = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}
    per_dim = lambda key, default: ([default] * len(spatial) if key not in fields else
                                    fields[key].split("x"))
    sizes, strides = per_dim("size", "1"), per_dim("stride", "1")
    pads, ldil, rdil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for j, d in enumerate(spatial):
      n_in, n_out, k = lhs[1][ll.index(d)], out[1][ol.index(d)], int(sizes[j])
      lo = int(pads[j].split("_")[0])
      pos = (np.arange(n_out)[:, None] * int(strides[j]) + np.arange(k)[None] * int(rdil[j])
             - lo)
      dl = int(ldil[j])
      taps *= int(np.count_nonzero((pos >= 0) & (pos <= (n_in - 1) * dl) & (pos % dl == 0)))
    return 2.0 * out[1][ol.index("b")] * out[1][ol.index("f")] * rhs[1][rl.index("i")] * taps

  parsed: dict[str, tuple[dict[int, str], dict[str, list], dict[str, list[str]]]] = {}

  def fusion_of(c: str):
    """One fused computation's parameters by index, the users of each value and each bitcast's
    operands: parsed once per computation (a fusion is asked about every parameter)."""
    if c not in parsed:
      params, users, via = {}, {}, {}
      for name, op, args, _ in comps.get(c, []):
        ops = _OPERAND.findall(args.split(")", 1)[0])
        if op == "parameter":
          idx = re.match(r"\s*(\d+)\)", args)
          if idx:
            params[int(idx.group(1))] = name
        if op == "bitcast":
          via[name] = ops
        for o in dict.fromkeys(ops):
          users.setdefault(o, []).append((name, op, ops))
      parsed[c] = (params, users, via)
    return parsed[c]

  def traffic(name: str, op: str, args: str, rest: str) -> float:
    """HBM bytes of one unfused instruction: what it writes plus what it reads. A slice taken
    from a stacked array inside the instruction reads the slice only, and an in-place update
    writes the update only (what XLA's cost analysis counts): a scan over stacked layer
    weights reads one layer per trip, not all of them."""
    operands = _OPERAND.findall(args.split(")", 1)[0])
    out = _array_bytes(shapes.get(name))
    if op == "dynamic-slice":
      return 2.0 * out
    if op == "dynamic-update-slice":
      return 2.0 * _array_bytes(shapes.get(operands[1])) if len(operands) > 1 else out
    reads = [float(_array_bytes(shapes.get(o))) for o in operands]
    callee = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
    if callee is not None:
      fc = callee.group(1)
      params, users_by, via = fusion_of(fc)
      root = roots.get(fc)
      for j, pname in params.items():
        if j >= len(reads):
          continue
        users = users_by.get(pname, [])
        if users and all(u_op == "dynamic-slice" and u_ops and u_ops[0] == pname
                         for _, u_op, u_ops in users):
          reads[j] = float(sum(_array_bytes(shapes.get(u)) for u, _, _ in users))
        elif users and all(u_op == "dynamic-update-slice" and u_ops and u_ops[0] == pname
                           for _, u_op, u_ops in users):
          reads[j] = 0.0                        # the buffer updated in place
          # The fusion's result is that update (possibly through a bitcast of it).
          top = via.get(root, [root])[0] if root in via else root
          upd = [u_ops[1] for u, _, u_ops in users if u == top and len(u_ops) > 1]
          out = _array_bytes(shapes.get(upd[0])) if upd else out
    return out + sum(reads)

  def cost(c: str, depth: int = 0) -> tuple[float, float, int]:
    if c in memo:
      return memo[c]
    if depth > 64 or c not in comps:
      return 0.0, 0.0, 0
    flops = bytes_ = 0.0
    unknown = 0
    for name, op, rest, _ in comps[c]:
      args = rest.split(")", 1)[0]
      if op == "convolution":
        flops += conv_flops(name, rest)
      if op == "dot":
        operands = _OPERAND.findall(args)
        lhs = shapes.get(operands[0]) if operands else None
        cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        out = shapes.get(name)
        if lhs is not None and out is not None and cd is not None:
          k = math.prod(lhs[1][int(i)] for i in cd.group(1).split(",") if i)
          flops += 2.0 * math.prod(out[1]) * k
      if c not in fused and op not in _NO_TRAFFIC:
        bytes_ += traffic(name, op, args, rest)
      times = 1
      callees = re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", rest)
      if op == "while":
        trip = trip_count(rest)
        times = trip if trip is not None else 1
        unknown += trip is None
        callees = re.findall(r"body=%?([\w.\-]+)", rest)
      elif op == "conditional":
        callees = re.findall(r"%([\w.\-]+)", rest.split("branch_computations=", 1)[-1]
                             .split("}", 1)[0]) if "branch_computations" in rest else []
      elif op not in ("fusion", "call"):
        callees = []            # reduce / sort / all-reduce appliers: scalar code
      for callee in callees:
        f, b, u = cost(callee, depth + 1)
        flops += times * f
        bytes_ += times * b
        unknown += u
    memo[c] = (flops, bytes_, unknown)
    return memo[c]

  flops, bytes_, unknown = cost(entry) if entry else (0.0, 0.0, 0)
  return dict(dot_flops=flops, bytes_accessed=bytes_, unknown_trip_loops=unknown)


# -- compiled programs ------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
  """One compiled program's per-device memory and cost."""
  name: str
  memory: dict[str, int]
  cost: dict[str, float]
  executable: Any

  @property
  def hlo_text(self) -> str:
    """The optimized HLO (hundreds of MB for the 7B step: only printed when needed)."""
    return self.executable.as_text()


def analyze(name: str, compiled) -> Compiled:
  mem = compiled.memory_analysis()
  memory = dict(argument=int(mem.argument_size_in_bytes), output=int(mem.output_size_in_bytes),
                alias=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
                code=int(mem.generated_code_size_in_bytes))
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  optimal = float(cost.get("optimal_seconds", -1.0))   # the TPU cost model's estimate
  return Compiled(name, memory, dict(flops=float(cost.get("flops", 0.0)),
                                     bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                                     optimal_seconds=optimal if optimal >= 0 else None),
                  compiled)


def _concrete(tree: Any, mesh) -> Any:
  """Abstract-mesh shardings (from ``nnx.eval_shape``) -> the same specs on ``mesh``."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  def fix(x):
    s = getattr(x, "sharding", None)
    spec = s.spec if isinstance(s, NamedSharding) else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree.map(fix, tree)


def _abstract_batch(signature: Mapping[str, tuple], mesh) -> dict:
  import jax
  from feallm_jax import sharding
  return {k: jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in signature.items()}


def compile_train(config, model, mesh):
  """(Compiled, Trainer, abstract batch) of the exact train step."""
  from feallm_jax.data import pipeline
  from feallm_jax.models import feallm
  from feallm_jax.train import step as step_lib
  trainer = step_lib.Trainer(config, model, mesh, loss_fn=feallm.loss_fn,
                             trainable=feallm.trainable_filter(config))
  sig = pipeline.batch_signature(config, int(config.data.batch_size), train=True)
  batch = _abstract_batch(sig, mesh)
  with _timed("train step: trace and lower"):
    lowered = trainer.lower(batch)
  with _timed("train step: XLA compile"):
    compiled = lowered.compile()
  return analyze("train", compiled), trainer, batch


def eval_settings(config, mesh) -> dict[str, int]:
  from feallm_jax import sharding
  e = config.eval
  b = int(e.get("batch_size", 0) or config.data.eval_batch_size)
  shards = sharding.batch_shards(mesh)
  b_dev = -(-b // shards) * shards           # generate() pads the batch to the shards
  return dict(batch_size=b, padded_batch=b_dev, max_new_tokens=int(e.get("max_new_tokens", 48)),
              prompt_len=int(config.data.max_len))


def compile_eval(config, model, mesh, programs: Sequence[str]) -> dict[str, Compiled]:
  """Generation (prefill + decode loop), prefill and one decode step, as evaluation runs them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from feallm_jax.data import pipeline
  from feallm_jax.eval import generate as gen
  from feallm_jax.models import llm as llm_lib
  from jax.sharding import NamedSharding, PartitionSpec as P

  st = eval_settings(config, mesh)
  b, n = st["padded_batch"], st["max_new_tokens"]
  sig = pipeline.batch_signature(config, b, train=False)
  keys = gen.PROMPT_KEYS_VISION + tuple(k for k in gen.OPTIONAL_KEYS_VISION if k in sig)
  inputs = _abstract_batch({k: sig[k] for k in keys}, mesh)
  from feallm_jax.models import layers
  model = layers.with_dropout(model, False)     # as generate() runs it
  graphdef, state = nnx.split(model)
  state = _concrete(state, mesh)
  rep = NamedSharding(mesh, P())
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
  out: dict[str, Compiled] = {}
  with jax.set_mesh(mesh):
    if "generate" in programs:
      key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                 sharding=rep)
      eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep)
      lowered = gen._generate_jit.lower(
          graphdef, state, inputs, key, eos, scalar(jnp.int32), scalar(jnp.float32),
          scalar(jnp.float32), max_new_tokens=n, greedy=True, nucleus=False, mesh=mesh)
      with _timed("generate: XLA compile"):
        compiled = lowered.compile()
      out["generate"] = analyze("generate", compiled)
    if "prefill" in programs:
      lowered = gen.prefill_jit.lower(graphdef, state, inputs, extra_len=n, mesh=mesh)
      with _timed("prefill: XLA compile"):
        compiled = lowered.compile()
      out["prefill"] = analyze("prefill", compiled)
    if "decode" in programs:
      dgraph, dstate = nnx.split(model.llm)
      dstate = _concrete(dstate, mesh)
      cfg = model.llm.cfg
      s = model.spec.expanded_length(st["prompt_len"]) + n
      batch_sh = lambda nd: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (nd - 1))))
      kv = jax.ShapeDtypeStruct((b, cfg.num_kv_heads, s, cfg.head_dim), model.llm.dtype,
                                sharding=batch_sh(4))
      cache = llm_lib.KVCache(k=(kv,) * cfg.num_layers, v=(kv,) * cfg.num_layers,
                              index=scalar(jnp.int32))
      lowered = gen.decode_step_jit.lower(
          dgraph, dstate, jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sh(2)), cache,
          jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=batch_sh(2)),
          jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh(1)), scalar(jnp.int32))
      with _timed("decode: XLA compile"):
        compiled = lowered.compile()
      out["decode"] = analyze("decode", compiled)
  return out


# -- the report -------------------------------------------------------------------------------

def roofline(flops: float, bytes_accessed: float, chip: chips.Chip) -> dict[str, float]:
  t_compute, t_memory = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bandwidth
  return dict(compute_s=t_compute, memory_s=t_memory, step_s=max(t_compute, t_memory),
              bound="compute" if t_compute >= t_memory else "memory")


def _fits(memory: dict[str, int], chip: chips.Chip) -> dict[str, Any]:
  return dict(hbm_usable=chip.hbm_usable, fits=memory["total"] <= chip.hbm_usable,
              headroom=chip.hbm_usable - memory["total"])


def _write_hlo(hlo_dir: str, name: str, comp: Compiled) -> None:
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(comp.hlo_text)


def run(config, topology: str, *, programs: Sequence[str] = PROGRAMS, top: int = 8,
        hlo_dir: str = "") -> dict[str, Any]:
  """Compiles ``programs`` of ``config`` for ``topology`` and returns the report (a dict).
  ``hlo_dir``: also write each program's optimized HLO there (``<program>.hlo.txt``), so its
  costs can be read again without recompiling."""
  import jax
  from feallm_jax import flops as flops_lib, sharding
  from feallm_jax.models import feallm

  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"--programs: unknown {sorted(unknown)}; choose from {PROGRAMS}")
  slice_ = chips.resolve(topology)
  chip = slice_.spec
  devices = topology_devices(slice_)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  n_dev = len(devices)
  spec = feallm.spec_from_config(config)
  model = feallm.abstract_model(spec, mesh)      # validates the sharding rules; allocates nothing
  counts = feallm.parameter_counts(model, spec)["total"]
  report: dict[str, Any] = dict(
      config=str(config.get("name", "")), topology=slice_.name, topology_name=slice_.topology,
      devices=n_dev, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
      chip=dataclasses.asdict(chip), jax=jax.__version__, libtpu=_libtpu_version(),
      attention=spec.attention, remat=spec.remat,
      params=dict(trainable=int(counts["trainable"]), frozen=int(counts["frozen"]),
                  **flops_lib.summary(spec)),
      programs={})

  if "train" in programs:
    comp, trainer, batch = compile_train(config, model, mesh)
    _write_hlo(hlo_dir, "train", comp)
    k = trainer.accum_steps
    b = int(config.data.batch_size)
    state = trainer.abstract_state()
    breakdown = dict(params=tree_bytes(state.params), opt_state=tree_bytes(state.opt_state),
                     rng_and_counters=tree_bytes((state.rest, state.step, state.updates,
                                                  state.skipped, state.bad_streak)),
                     frozen=tree_bytes(trainer.frozen), batch=tree_bytes(batch))
    analytic = flops_lib.train_step(spec, int(config.data.max_len))
    model_flops_dev = analytic["total"] * b / n_dev
    compiled_counted = comp.cost["flops"]
    kernel_flops = 0.0
    if _uses_splash(spec):      # XLA does not cost Pallas kernels: add the attention back
      kernel_flops = analytic["attention"] * (b / k) / n_dev
    # Loop bodies (micro-batches, the scanned layers) weighted by their trip counts.
    walked = loop_aware_cost(comp.hlo_text)
    step_flops = walked["dot_flops"] + k * kernel_flops
    step_bytes = walked["bytes_accessed"]
    rl = roofline(step_flops, step_bytes, chip)
    entry = dict(
        global_batch=b, accum_steps=k, micro_batch=b // k,
        llm_tokens=flops_lib.llm_tokens(spec, int(config.data.max_len)),
        memory=dict(comp.memory, **breakdown),
        argument_check=dict(expected=sum(breakdown.values()), compiled=comp.memory["argument"]),
        flops=dict(compiled_counted=compiled_counted, pallas_kernel_flops_added=kernel_flops,
                   xla_counted_times_accum=k * compiled_counted,
                   hlo_walk=walked["dot_flops"],
                   unknown_trip_loops=walked["unknown_trip_loops"],
                   compiled_per_step=step_flops, analytic_per_step=model_flops_dev,
                   analytic_parts_per_example=analytic,
                   ratio=step_flops / model_flops_dev if model_flops_dev else 0.0),
        bytes_accessed_per_step=step_bytes,
        xla_bytes_accessed_times_accum=k * comp.cost["bytes_accessed"],
        xla_optimal_seconds_per_step=(k * comp.cost["optimal_seconds"]
                                      if comp.cost["optimal_seconds"] is not None else None),
        roofline=dict(rl, mfu_bound=model_flops_dev / (rl["step_s"] * chip.peak_bf16_flops),
                      tokens_per_s=b * flops_lib.llm_tokens(spec, int(config.data.max_len))
                      / rl["step_s"]),
        **_fits(comp.memory, chip))
    if not entry["fits"]:
      entry["largest"] = dict(
          arguments=largest_leaves(state.params, "params", top)
          + largest_leaves(state.opt_state, "opt_state", top)
          + largest_leaves(trainer.frozen, "frozen", top),
          temporaries=largest_hlo_values(comp.hlo_text, top))
      entry["largest"]["arguments"] = sorted(entry["largest"]["arguments"],
                                             key=lambda r: -r[1])[:top]
    report["programs"]["train"] = entry

  eval_programs = [p for p in programs if p != "train"]
  if eval_programs:
    st = eval_settings(config, mesh)
    comps = compile_eval(config, model, mesh, eval_programs)
    b = st["padded_batch"]
    s_cache = spec.expanded_length(st["prompt_len"]) + st["max_new_tokens"]
    for name, comp in comps.items():
      _write_hlo(hlo_dir, name, comp)
      entry = dict(batch=b, prompt_len=st["prompt_len"], max_new_tokens=st["max_new_tokens"],
                   memory=comp.memory, **_fits(comp.memory, chip))
      if name == "prefill":
        analytic = flops_lib.prefill(spec, st["prompt_len"])["total"] * b / n_dev
      elif name == "decode":
        analytic = flops_lib.decode_token(spec, s_cache)["total"] * b / n_dev
      else:
        analytic = None
      if analytic is not None:
        fl = comp.cost["flops"]        # generation attends through the cache: plain XLA
        rl = roofline(fl, comp.cost["bytes_accessed"], chip)
        entry.update(flops=dict(compiled=fl, analytic=analytic, ratio=fl / analytic),
                     bytes_accessed=comp.cost["bytes_accessed"],
                     xla_optimal_seconds=comp.cost["optimal_seconds"],
                     roofline=dict(rl, mfu_bound=analytic / (rl["step_s"] * chip.peak_bf16_flops)))
        if name == "decode":
          entry["roofline"]["tokens_per_s"] = b / rl["step_s"]
      if not entry["fits"]:
        entry["largest"] = dict(temporaries=largest_hlo_values(comp.hlo_text, top))
      report["programs"][name] = entry
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


def _uses_splash(spec) -> bool:
  """The LLM's training attention compiles to the Pallas kernel for a TPU target."""
  from feallm_jax.models import attention_kernels
  return spec.attention == "splash" or (
      spec.attention == "auto" and attention_kernels.splash_supported(spec.llm.head_dim))


def _libtpu_version() -> str:
  try:
    from importlib import metadata
    return metadata.version("libtpu")
  except Exception:  # noqa: BLE001
    return ""


def _gib(x: float) -> str:
  return f"{x / chips.GIB:.2f}"


def format_report(r: Mapping[str, Any]) -> str:
  """A readable table of :func:`run`'s report."""
  chip = r["chip"]
  lines = [f"{r['config']} on {r['topology']} ({r['devices']} x {r['device_kind']}, mesh "
           f"{r['mesh']}), attention={r['attention']}, remat={r['remat']}",
           f"chip: {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
           f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s, HBM usable {_gib(chip['hbm_usable'])} GiB "
           f"({chip['source']})",
           f"params: {r['params']['trainable']:,} trainable, {r['params']['frozen']:,} frozen", ""]
  for name, p in r["programs"].items():
    m = p["memory"]
    head = f"[{name}] {'fits' if p['fits'] else 'DOES NOT FIT'}: total {_gib(m['total'])} of " \
           f"{_gib(p['hbm_usable'])} GiB per device (headroom {_gib(p['headroom'])} GiB)"
    lines.append(head)
    if name == "train":
      lines.append(f"  batch {p['global_batch']} = {p['accum_steps']} x {p['micro_batch']}, "
                   f"{p['llm_tokens']} LLM tokens per example")
      lines.append("  per device GiB: params {} | opt_state {} | frozen {} | batch {} | temp {} "
                   "| output-alias {}".format(
                       _gib(m["params"]), _gib(m["opt_state"]), _gib(m["frozen"]),
                       _gib(m["batch"]), _gib(m["temp"]), _gib(m["output"] - m["alias"])))
      f = p["flops"]
      lines.append(f"  FLOPs/step/device: compiled {f['compiled_per_step'] / 1e12:.1f} T, model "
                   f"{f['analytic_per_step'] / 1e12:.1f} T, ratio {f['ratio']:.3f}"
                   + (" (Pallas attention added analytically)" if f["pallas_kernel_flops_added"]
                      else ""))
    else:
      lines.append(f"  batch {p['batch']}, prompt {p['prompt_len']} text tokens, "
                   f"{p['max_new_tokens']} new; per device GiB: arguments {_gib(m['argument'])} "
                   f"| temp {_gib(m['temp'])} | output-alias {_gib(m['output'] - m['alias'])}")
      if "flops" in p:
        f = p["flops"]
        lines.append(f"  FLOPs/device: compiled {f['compiled'] / 1e9:.1f} G, model "
                     f"{f['analytic'] / 1e9:.1f} G, ratio {f['ratio']:.3f}")
    if "roofline" in p:
      rl = p["roofline"]
      extra = f", {rl['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in rl else ""
      lines.append(f"  roofline: {rl['step_s'] * 1e3:.1f} ms ({rl['bound']}-bound: compute "
                   f"{rl['compute_s'] * 1e3:.1f} ms, HBM {rl['memory_s'] * 1e3:.1f} ms), MFU "
                   f"bound {rl['mfu_bound'] * 100:.1f}%{extra}")
    if "largest" in p:
      lines.append("  largest buffers per device:")
      for path, nbytes in p["largest"].get("arguments", []):
        lines.append(f"    argument {_gib(nbytes)} GiB  {path}")
      for t in p["largest"]["temporaries"]:
        lines.append(f"    temp     {_gib(t['bytes'])} GiB  {t['shape']} {t['kind']}  {t['op']}")
    lines.append("")
  return "\n".join(lines)
