"""How many XLA CPU devices our side of ``bench/generate.py`` splits the cores into.

Why a split at all: on XLA:CPU a decode step's attention (batched dots with one query row) runs
on one thread per device, while PyTorch's runs on all its threads. Tensor-parallel over one
device per core (heads, MLP and vocab split; ``sharding.LOGICAL_RULES``), each core runs the
attention of its own heads. The split must divide every dim the tensor axis splits.
"""


def _tensor_splits(c) -> tuple[int, ...]:
  """The sizes every tensor-split dim must divide: heads, kv heads, MLP widths, vocab."""
  l, v = c.model.llm, c.model.vision
  return tuple(int(x) for x in (l.num_heads, l.num_kv_heads, l.intermediate_size, l.vocab_size,
                                v.num_heads, v.intermediate_size))


def tensor_size(c, requested: int, cores: int) -> int:
  """``--tensor``: the requested split, checked, or (0) the most devices up to ``cores`` that the
  model's dims split into."""
  dims = _tensor_splits(c)
  if requested < 0:
    raise ValueError(f"--tensor={requested}: must be >= 0 (0 = the cores, {cores})")
  if requested == 0:   # the most devices up to the cores that every split dim divides by
    return next(k for k in range(max(cores, 1), 0, -1) if all(d % k == 0 for d in dims))
  bad = [d for d in dims if d % requested]
  if bad:
    raise ValueError(f"--tensor={requested} does not divide the model's heads / MLP / vocab "
                     f"sizes {dims} (not: {bad}); pick a divisor of all of them")
  return requested

