"""Grain input pipeline: ArrayRecord (tfds.data_source) -> numpy batches of docs/interfaces.md.

The pipeline runs on record *positions*: a shuffled, repeated stream of record indices is cut
into global batches, each process takes its contiguous block of every global batch, and one
transform turns (global position, record index) into a fixed-shape example. Because every
random choice (crop, flip, jitter, task, instruction wording) is seeded by (seed, epoch, record),
an example depends only on its position: restoring the Grain iterator state resumes to the
identical next batch, with or without worker processes. Transforms are top-level classes with
no jax inside, so `mp_prefetch` can spawn workers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import threading
from typing import Any, Iterator, Sequence

import cv2
import grain
import numpy as np

from feallm_jax.data import facs, tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

# CLIP preprocessing constants (openai/clip-vit-*): kept here so workers never import jax.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
FREE_FORM_TASK = -1     # `task` of records that bring their own conversation (llava_instruct)
NUM_REGIONS = 16


@dataclasses.dataclass(frozen=True)
class Augment:
  """Train-time augmentation; mild, because expressions live in small geometric details."""
  scale: tuple[float, float] = (0.80, 1.0)     # crop area / area of the centred square
  ratio: tuple[float, float] = (0.9, 1.1)      # crop aspect ratio
  flip: float = 0.5
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2


# --- sources -----------------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str | None]:
  return tuple(name.split("/", 1)) if "/" in name else (name, None)  # type: ignore[return-value]


def data_source(config, dataset: str | None = None, split: str = "train"):
  """The tfds ArrayRecord source ('name' or 'name/config'); the synthetic set builds itself."""
  from feallm_jax.data import builders
  d = config.data
  name, cfg = _split_name(dataset or d.dataset)
  if cfg is None and name == d.dataset:
    cfg = d.builder_config or None
  b = builders.make_builder(name, d.data_dir, config=cfg)
  if not b.is_prepared():
    if name != "synthetic_fea":
      raise FileNotFoundError(
          f"dataset {name}/{cfg} is not built under {d.data_dir}: run "
          f"python launch/build_dataset.py --dataset={name} --data_dir={d.data_dir} "
          f"--manual_dir=<downloads>{f' --config={cfg}' if cfg else ''}")
    log.info("building %s/%s under %s (first use)", name, cfg, d.data_dir)
    builders.build(name, d.data_dir, config=cfg)
    b = builders.make_builder(name, d.data_dir, config=cfg)
  return b.as_data_source(split=split)


def label_set(dataset: str) -> dict[str, Any]:
  """Label sets a dataset is scored on: emotions (canonical names) and AUs."""
  name, cfg = _split_name(dataset)
  if name == "raf_db":
    return dict(emotions=facs.RAF_DB, aus=None)
  if name == "affectnet":
    return dict(emotions=facs.AFFECTNET_7 if cfg == "7class" else facs.AFFECTNET_8, aus=None)
  if name == "bp4d":
    return dict(emotions=None, aus=facs.BP4D_AUS)
  if name == "disfa":
    return dict(emotions=None, aus=facs.DISFA_AUS)
  if name == "synthetic_fea":
    from feallm_jax.data import synthetic
    return dict(emotions=facs.RAF_DB, aus=synthetic.occurring_aus(facs.RAF_DB))
  return dict(emotions=None, aus=None)


# --- per-example processing --------------------------------------------------------------------

def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _clean_record(rec: dict) -> dict:
  """Data-source record with str fields and numpy arrays, as instructions.py expects."""
  out = dict(rec)
  for k in ("id", "subject", "conversations"):
    out[k] = _text(rec.get(k, ""))
  out["emotion"] = np.int32(rec["emotion"])
  out["has_landmarks"] = bool(rec["has_landmarks"])
  return out


def _crop_window(h: int, w: int, rng, aug: Augment | None):
  """(y0, x0, ch, cw) pixel window: a random mild crop when training, the centred square else."""
  side = min(h, w)
  if aug is None:
    return (h - side) // 2, (w - side) // 2, side, side
  area = side * side * rng.uniform(*aug.scale)
  ratio = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
  cw = int(round(min(w, math.sqrt(area * ratio))))
  ch = int(round(min(h, math.sqrt(area / ratio))))
  y0 = int(rng.integers(0, h - ch + 1))
  x0 = int(rng.integers(0, w - cw + 1))
  return y0, x0, ch, cw


def _jitter_ops(rng, aug: Augment) -> list[tuple[int, float]]:
  """Brightness, contrast and saturation factors in a random order (drawn once per example, so
  every view of the face gets the same jitter)."""
  ops = []
  for op in rng.permutation(3):
    amount = (aug.brightness, aug.contrast, aug.saturation)[op]
    if amount:
      ops.append((int(op), float(rng.uniform(1 - amount, 1 + amount))))
  return ops


def _jitter(img: np.ndarray, ops: Sequence[tuple[int, float]]) -> np.ndarray:
  """Applies `_jitter_ops` to a float [0, 1] image."""
  for op, f in ops:
    if op == 0:
      img = img * f
    elif op == 1:
      m = img.mean()
      img = (img - m) * f + m
    else:
      gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
      img = (img - gray[..., None]) * f + gray[..., None]
  return np.clip(img, 0.0, 1.0)


def image_views(rec: dict, sizes: Sequence[int], rng, aug: Augment | None,
                use_landmarks: bool) -> tuple[list[np.ndarray], np.ndarray]:
  """One crop/flip/jitter of the face resampled to each of `sizes` (CLIP-normalized float32
  [s,s,3] each) and the 16 region boxes (float32 [16,4], normalized, shared by every view)."""
  from feallm_jax.data import regions
  img = np.asarray(rec["image"])
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, -1)
  h, w = img.shape[:2]
  if use_landmarks and rec["has_landmarks"]:
    boxes = regions.boxes_from_landmarks(np.asarray(rec["landmarks"]), _text(rec["id"]))
  else:
    boxes = regions.canonical_boxes()
  boxes = np.asarray(boxes, np.float32)
  y0, x0, ch, cw = _crop_window(h, w, rng, aug)
  crop = img[y0:y0 + ch, x0:x0 + cw]
  # Boxes follow the crop: normalized to the window, clipped to the image.
  off = np.array([y0 / h, x0 / w, y0 / h, x0 / w], np.float32)
  scl = np.array([ch / h, cw / w, ch / h, cw / w], np.float32)
  boxes = np.clip((boxes - off) / scl, 0.0, 1.0)
  flip = aug is not None and rng.uniform() < aug.flip
  if flip:
    boxes = regions.flip_boxes(boxes)
  ops = _jitter_ops(rng, aug) if aug is not None else []
  views = []
  for size in sizes:
    interp = cv2.INTER_AREA if min(ch, cw) > size else cv2.INTER_LINEAR
    out = cv2.resize(crop, (size, size), interpolation=interp)
    if flip:
      out = out[:, ::-1]
    x = out.astype(np.float32) * (1.0 / 255.0)
    if ops:
      x = _jitter(x, ops)
    x = (x - CLIP_MEAN) / CLIP_STD
    views.append(np.ascontiguousarray(x, np.float32))
  return views, np.asarray(boxes, np.float32)


def image_and_regions(rec: dict, size: int, rng, aug: Augment | None, use_landmarks: bool):
  """(CLIP-normalized float32 [size,size,3], boxes float32 [16,4]) with crop/flip applied."""
  views, boxes = image_views(rec, (size,), rng, aug, use_landmarks)
  return views[0], boxes


def batch_signature(config, batch_size: int, *, train: bool = True
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``key -> (shape, dtype)`` of the global batches :func:`train_iterator` (``train``) or
  :func:`eval_batches` (prompts) yield: what an ahead-of-time compile feeds the step."""
  from feallm_jax.data import regions
  b, t, s = int(batch_size), int(config.data.max_len), int(config.model.vision.image_size)
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  sig = dict(image=((b, s, s, 3), f32))
  lca = int(config.data.get("lca_image_size", 0) or 0)
  if lca:
    sig["lca_image"] = ((b, lca, lca, 3), f32)
  sig.update(regions=((b, regions.NUM_REGIONS, 4), f32),
             input_ids=((b, t), i32), attention_mask=((b, t), i32))
  if train:
    sig["loss_mask"] = ((b, t), i32)
  sig.update(example_mask=((b,), i32), emotion=((b,), i32),
             au_present=((b, len(facs.ALL_AUS)), i32), task=((b,), i32), truncated=((b,), i32))
  return sig


def fit_length(ids: np.ndarray, loss: np.ndarray, max_len: int, image_id: int,
               keep_tail: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
  """Cut a sequence to max_len without ever removing the image placeholder.

  Training (keep_tail=False) cuts the end: the answer is last. Prompts (keep_tail=True) keep
  everything up to the image and the last tokens (the question and the generation prompt).
  """
  n = len(ids)
  if n <= max_len:
    return ids, loss, False
  pos = np.flatnonzero(ids == image_id)
  if len(pos) != 1:
    raise ValueError(f"expected exactly one image token, found {len(pos)}")
  p = int(pos[0])
  if p + 1 >= max_len:
    raise ValueError(f"max_len={max_len} leaves no room after the image token at {p}")
  if not keep_tail:
    return ids[:max_len], loss[:max_len], True
  tail = max_len - (p + 1)
  keep = np.r_[np.arange(p + 1), np.arange(n - tail, n)]
  return ids[keep], loss[keep], True


def _au_vector(rec) -> np.ndarray:
  return np.asarray(rec["au_present"], np.int32).reshape(len(facs.ALL_AUS))


_TOK_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str):
  return tokenizer_lib.load(path)


def _tokenizer(path: str):
  """One tokenizer per process (Grain maps run in threads; loading is not thread-safe)."""
  with _TOK_LOCK:
    return _load_tokenizer(path)


@dataclasses.dataclass
class ExampleSpec:
  """Everything a worker needs to make examples; picklable, no jax."""
  tokenizer: str
  image_size: int
  max_len: int
  tasks: tuple[str, ...]
  use_landmarks: bool
  augment: Augment | None
  seed: int
  num_records: int
  lca_image_size: int = 0   # >0: also emit `lca_image`, the same view at this resolution

  @property
  def sizes(self) -> tuple[int, ...]:
    return (self.image_size,) + ((self.lca_image_size,) if self.lca_image_size else ())

  def views(self, rec: dict, rng, aug: Augment | None) -> dict[str, np.ndarray]:
    """`image` (ViT input), optional `lca_image`, and `regions` of one example."""
    views, boxes = image_views(rec, self.sizes, rng, aug, self.use_landmarks)
    out = dict(image=views[0], regions=boxes)
    if self.lca_image_size:
      out["lca_image"] = views[1]
    return out


def _conversation(rec: dict, tasks: Sequence[str], rng) -> tuple[list, int]:
  """(LLaVA conversation, task index) for a record: its own, or one drawn from the tasks."""
  from feallm_jax.data import instructions
  if rec["conversations"]:
    return json.loads(rec["conversations"]), FREE_FORM_TASK
  avail = set(instructions.available_tasks(rec))
  choices = [t for t in tasks if t in avail]
  if not choices:
    raise ValueError(f"record {rec['id']!r}: none of the tasks {tuple(tasks)} is available "
                     f"(its labels allow {sorted(avail)}); set config.data.tasks")
  task = choices[int(rng.integers(len(choices)))]
  conv = instructions.make_conversation(rec, task, int(rng.integers(1 << 31)))
  return conv, instructions.TASKS.index(task)


class TrainExample(grain.transforms.Map):
  """(global position, record) -> fixed-shape training example (right padded)."""

  def __init__(self, spec: ExampleSpec, source):
    self.spec, self.source = spec, source

  def map(self, element):
    gpos, index = element
    s = self.spec
    epoch = gpos // s.num_records
    rng = np.random.default_rng([s.seed, epoch, index])
    rec = _clean_record(self.source[index])
    tok = _tokenizer(s.tokenizer)
    views = s.views(rec, rng, s.augment)
    conv, task = _conversation(rec, s.tasks, rng)
    ids, loss = tokenizer_lib.encode_conversation(tok, conv)
    img_id = tokenizer_lib.image_token_id(tok)
    if int((ids == img_id).sum()) != 1:
      raise ValueError(f"record {rec['id']!r}: conversation must hold exactly one "
                       f"{tokenizer_lib.IMAGE_TOKEN}, got {int((ids == img_id).sum())}")
    ids, loss, cut = fit_length(ids, loss, s.max_len, img_id)
    n = len(ids)
    input_ids = np.full(s.max_len, tok.pad_token_id, np.int32)
    input_ids[:n] = ids
    attn = np.zeros(s.max_len, np.int32)
    attn[:n] = 1
    loss_mask = np.zeros(s.max_len, np.int32)
    loss_mask[:n] = loss
    return dict(**views, input_ids=input_ids, attention_mask=attn,
                loss_mask=loss_mask, example_mask=np.int32(1), emotion=np.int32(rec["emotion"]),
                au_present=_au_vector(rec), task=np.int32(task), truncated=np.int32(cut))


class ProcessRows(grain.MapDataset):
  """This process's contiguous block of every global batch: local i -> global position.

  Elements are (global position, parent element), so downstream seeds can use the position.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    self._b = global_batch // process_count
    self._B, self._p = global_batch, process_index
    n = len(parent)
    self._len = n if n == sys.maxsize else (n // global_batch) * self._b

  def __len__(self) -> int:
    return self._len

  def _global(self, i: int) -> int:
    k, j = divmod(i, self._b)
    return k * self._B + self._p * self._b + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = self._global(index)
    return g, self._parent[g]

  def __str__(self) -> str:
    return f"ProcessRows(b={self._b}, B={self._B}, p={self._p})"


def _process() -> tuple[int, int]:
  """(index, count) from jax when it is initialized, else a single process."""
  if "jax" in sys.modules:
    import jax
    return jax.process_index(), jax.process_count()
  return 0, 1


def _spec(config, num_records: int, *, train: bool, seed: int, tasks=None) -> ExampleSpec:
  d = config.data
  return ExampleSpec(
      tokenizer=d.tokenizer, image_size=int(config.model.vision.image_size),
      max_len=int(d.max_len), tasks=tuple(tasks if tasks is not None else d.tasks),
      use_landmarks=d.regions == "landmarks",
      augment=Augment() if (train and d.augment) else None, seed=seed, num_records=num_records,
      lca_image_size=int(d.get("lca_image_size", 0) or 0))


def eval_views(config, image: np.ndarray, image_id: str = "") -> dict[str, np.ndarray]:
  """The evaluation-time views of one face image (`image`, `regions`, optional `lca_image`),
  without a batch axis: what FEABench feeds the model, for `predict` and notebooks."""
  rec = {"image": image, "has_landmarks": False, "id": image_id}
  return _spec(config, 1, train=False, seed=int(config.get("seed", 0))).views(rec, None, None)


def train_dataset(config, *, split: str = "train", seed: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  source=None) -> grain.IterDataset:
  """The training IterDataset (infinite, shuffled per epoch, this process's batch slices)."""
  d = config.data
  seed = int(config.seed if seed is None else seed)
  pi, pc = _process()
  pi = pi if process_index is None else process_index
  pc = pc if process_count is None else process_count
  src = data_source(config, split=split) if source is None else source
  n = len(src)
  if n < d.batch_size:
    raise ValueError(f"{d.dataset}/{split} has {n} records, fewer than one batch "
                     f"({d.batch_size})")
  spec = _spec(config, n, train=True, seed=seed)
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  ds = ProcessRows(ds, d.batch_size, pi, pc)
  ds = ds.map(TrainExample(spec, src))
  ds = ds.batch(d.batch_size // pc, drop_remainder=True)
  it = ds.to_iter_dataset()
  if d.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # notebooks/pytest: Grain reads its absl flags in workers
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=int(d.num_workers), per_worker_buffer_size=2))
  return it


def train_iterator(config, *, split: str = "train", seed: int | None = None, **kwargs):
  """Iterator of this process's numpy training batches; Orbax saves/restores its state with
  grain.checkpoint.CheckpointSave / CheckpointRestore (get_state / set_state underneath)."""
  return iter(train_dataset(config, split=split, seed=seed, **kwargs))


# --- evaluation --------------------------------------------------------------------------------

class EvalExample(grain.transforms.Map):
  """(global position, (record index, task) or None) -> (prompt example, meta), left padded."""

  def __init__(self, spec: ExampleSpec, source, dataset: str):
    self.spec, self.source, self.dataset = spec, source, dataset

  def map(self, element):
    gpos, row = element
    s = self.spec
    real = row is not None
    index, task = row if real else (0, None)
    rec = _clean_record(self.source[index])
    tok = _tokenizer(s.tokenizer)
    rng = np.random.default_rng([s.seed, 0, index])
    views = s.views(rec, rng, None)
    if rec["conversations"]:
      conv, task_id = json.loads(rec["conversations"]), FREE_FORM_TASK
    else:
      from feallm_jax.data import instructions
      t = task or s.tasks[0]
      if t not in instructions.available_tasks(rec):
        t = instructions.available_tasks(rec)[0]
      conv = instructions.make_conversation(rec, t, int(rng.integers(1 << 31)))
      task_id = instructions.TASKS.index(t)
    ids, ref, prompt = tokenizer_lib.encode_prompt(tok, conv)
    img_id = tokenizer_lib.image_token_id(tok)
    ids, _, cut = fit_length(ids, np.zeros_like(ids), s.max_len, img_id, keep_tail=True)
    n = len(ids)
    input_ids = np.full(s.max_len, tok.pad_token_id, np.int32)
    input_ids[s.max_len - n:] = ids
    attn = np.zeros(s.max_len, np.int32)
    attn[s.max_len - n:] = 1
    batch = dict(**views, input_ids=input_ids, attention_mask=attn,
                 example_mask=np.int32(real), emotion=np.int32(rec["emotion"]),
                 au_present=_au_vector(rec), task=np.int32(task_id), truncated=np.int32(cut))
    meta = dict(id=rec["id"], task=(None if task_id == FREE_FORM_TASK else
                                    _task_name(task_id)), prompt=prompt[-1]["content"]
                if prompt else "", reference=ref, emotion=int(rec["emotion"]),
                au_present=_au_vector(rec).tolist(), label_set=label_set(self.dataset),
                dataset=self.dataset, real=real, position=int(gpos))
    return batch, meta


def _task_name(i: int) -> str:
  from feallm_jax.data import instructions
  return instructions.TASKS[i]


def _collate_eval(items):
  batch = {k: np.stack([b[k] for b, _ in items]) for k in items[0][0]}
  return batch, [m for _, m in items]


def eval_rows(source, tasks: Sequence[str], num_samples: int = 0) -> list[tuple[int, str]]:
  """(record index, task) for every record and every requested task its labels allow."""
  from feallm_jax.data import instructions
  n = len(source) if not num_samples else min(num_samples, len(source))
  rows = []
  for i in range(n):
    rec = _clean_record(source[i])
    if rec["conversations"]:
      rows.append((i, None))
      continue
    avail = instructions.available_tasks(rec)
    rows += [(i, t) for t in tasks if t in avail]
  return rows


class _Rows(grain.MapDataset):
  """A fixed list of eval rows, padded with None up to a whole number of global batches."""

  def __init__(self, rows: list, global_batch: int):
    super().__init__()
    self._rows = rows
    self._len = max(1, math.ceil(len(rows) / global_batch)) * global_batch

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._rows[index] if index < len(self._rows) else None

  def __str__(self):
    return f"_Rows({len(self._rows)} -> {self._len})"


def eval_batches(config, *, dataset: str | None = None, split: str = "test",
                 tasks: Sequence[str] | None = None, batch_size: int | None = None,
                 num_samples: int = 0, process_index: int | None = None,
                 process_count: int | None = None,
                 source=None) -> Iterator[tuple[dict, list[dict]]]:
  """(batch, metas) of LEFT-padded prompts; the last global batch is padded, example_mask=0.

  Every process yields the same number of batches (its block of each global batch).
  """
  d = config.data
  dataset = dataset or d.dataset
  tasks = tuple(tasks if tasks is not None else d.tasks)
  B = int(batch_size or d.eval_batch_size)
  pi, pc = _process()
  pi = pi if process_index is None else process_index
  pc = pc if process_count is None else process_count
  src = data_source(config, dataset, split) if source is None else source
  rows = eval_rows(src, tasks, num_samples)
  spec = _spec(config, len(src), train=False, seed=int(config.seed), tasks=tasks)
  ds = ProcessRows(_Rows(rows, B), B, pi, pc)
  ds = ds.map(EvalExample(spec, src, dataset)).batch(B // pc, batch_fn=_collate_eval)
  for i in range(len(ds)):
    yield ds[i]
