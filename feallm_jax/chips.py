"""Accelerator chips and TPU slice types, in one place, with where each number comes from.

Peak bf16 FLOP/s, HBM capacity and HBM bandwidth per chip are Google Cloud's published specs
(the URL in ``source``). ``hbm_usable`` is what libtpu's compiler (libtpu 0.0.42.1, the one
``jax[tpu]==0.10.2`` resolves) reports as available to a program ("exceeds available HBM
(15.75G)" on v5e): the spec less what the runtime reserves. It is the budget a compiled step
must fit, and what ``launch/aot_compile.py`` checks against.

A *slice* is a Cloud TPU accelerator type (``v5e-8``): its topology name and chip config are
what ``jax.experimental.topologies.get_topology_desc`` needs to make compile-only devices
(MaxText's ``accelerator_to_spec_map`` uses the same names). v4 and v5p count TensorCores in
the type name (``v4-32`` = 16 chips); with the ``megacore`` chip config each chip is one JAX
device, as on a real slice.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str          # jax Device.device_kind of the compile-only devices
  peak_bf16_flops: float    # per chip, FLOP/s
  hbm_bytes: int            # per chip, published capacity
  hbm_usable: int           # per chip, what libtpu's compiler allows a program
  hbm_bandwidth: float      # per chip, bytes/s
  source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "TPU v4", 275e12, 32 * GIB, int(30.75 * GIB), 1200e9,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16; HBM2 32 GiB, 1200 GBps)"),
    "v5e": Chip("TPU v5e", "TPU v5 lite", 197e12, 16 * GIB, int(15.75 * GIB), 819e9,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16; HBM2 16 GB, 819 GBps)"),
    "v5p": Chip("TPU v5p", "TPU v5", 459e12, 95 * GIB, int(95.74 * GIB), 2765e9,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16; HBM2e 95 GB, 2765 GBps)"),
    "v6e": Chip("TPU v6e", "TPU v6 lite", 918e12, 32 * GIB, int(31.25 * GIB), 1638e9,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16; HBM 32 GB, 1638 GBps)"),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                                   # accelerator type, e.g. "v5e-8"
  chip: str                                   # key of CHIPS
  topology: str                               # get_topology_desc topology_name
  chip_config: str = "default"                # "megacore" for v4 / v5p
  chips_per_host_bounds: tuple[int, int, int] | None = None

  @property
  def spec(self) -> Chip:
    return CHIPS[self.chip]


SLICES: dict[str, Slice] = {s.name: s for s in (
    Slice("v5e-8", "v5e", "v5e:2x4", "default", (2, 4, 1)),
    Slice("v5e-16", "v5e", "v5e:4x4", "default", (2, 4, 1)),
    Slice("v5e-32", "v5e", "v5e:4x8", "default", (2, 4, 1)),
    Slice("v6e-8", "v6e", "v6e:2x4", "default", (2, 4, 1)),
    Slice("v6e-16", "v6e", "v6e:4x4", "default", (2, 4, 1)),
    Slice("v4-8", "v4", "v4:2x2x1", "megacore", (2, 2, 1)),
    Slice("v4-16", "v4", "v4:2x2x2", "megacore", (2, 2, 1)),
    Slice("v4-32", "v4", "v4:2x2x4", "megacore", (2, 2, 1)),
    Slice("v5p-8", "v5p", "v5:2x2x1", "megacore", (2, 2, 1)),
    Slice("v5p-16", "v5p", "v5:2x2x2", "megacore", (2, 2, 1)),
    Slice("v5p-32", "v5p", "v5:2x2x4", "megacore", (2, 2, 1)),
)}

# Topology-name prefix -> chip, for raw names such as "v5e:2x4" or "v5p:2x2x1".
_PREFIX = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v5": "v5p", "v6e": "v6e"}


def resolve(name: str) -> Slice:
  """An accelerator type (``v5e-8``, ``v4-32``) or a raw topology (``v5e:2x4``) -> Slice."""
  if name in SLICES:
    return SLICES[name]
  m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", name)
  if not m or m.group(1) not in _PREFIX:
    raise ValueError(f"--topology={name!r}: expected an accelerator type ({sorted(SLICES)}) or "
                     f"a topology such as v5e:2x4, v4:2x2x4, v5p:2x2x1, v6e:2x4")
  chip = _PREFIX[m.group(1)]
  prefix = "v5" if chip == "v5p" else chip      # libtpu spells the v5p topology "v5:AxBxC"
  return Slice(name, chip, f"{prefix}:{m.group(2)}",
               "megacore" if chip in ("v4", "v5p") else "default")
