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
import time
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


def data_source(config, dataset: str | None = None, split: str = "train", *,
                decode_images: bool = True):
  """The tfds ArrayRecord source ('name' or 'name/config'); the synthetic set builds itself.

  ``decode_images=False`` leaves ``image`` as its encoded bytes: the training and evaluation
  pipelines decode it themselves, so an undecodable image drops one example (counted, with its
  id) instead of raising from inside tfds.
  """
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
    b = _build_synthetic(builders, name, d.data_dir, cfg)
  split = builders.resolve_split(name, split)   # bp4d/disfa: test_fold1 -> fold3, ...
  if decode_images:
    return b.as_data_source(split=split)
  import tensorflow_datasets as tfds
  return b.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def _build_synthetic(builders, name: str, data_dir: str, cfg, wait_s: float = 900.0):
  """Builds the synthetic set on first use. In a multi-process job process 0 builds it and the
  others wait for it to appear (a shared data_dir), instead of all writing the same files."""
  pi, pc = _process()
  if pi == 0:
    log.info("building %s/%s under %s (first use)", name, cfg, data_dir)
    builders.build(name, data_dir, config=cfg)
    return builders.make_builder(name, data_dir, config=cfg)
  log.info("waiting for process 0 to build %s/%s under %s", name, cfg, data_dir)
  deadline = time.monotonic() + wait_s
  while time.monotonic() < deadline:
    time.sleep(1.0)
    b = builders.make_builder(name, data_dir, config=cfg)
    if b.is_prepared():
      return b
  raise FileNotFoundError(
      f"process {pi} of {pc}: {name}/{cfg} did not appear under {data_dir} within {wait_s:g}s "
      "(process 0 builds it; is data_dir shared by every host?). Build it once with python "
      f"launch/build_dataset.py --dataset={name} --data_dir={data_dir}")


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


# --- examples that cannot be fitted -------------------------------------------------------------

# Why an example is dropped, and what a user changes so it is not: the text of reports and errors.
DROP_REASONS: dict[str, str] = {
    "image_past_max_len": "the <image> token sits past max_len: raise --config.data.max_len",
    "empty_answer": "no answer token is left within max_len: raise --config.data.max_len "
                    "(or fix conversations that have no answer)",
    "image_token_count": "the conversation holds several <image> tokens (or a generated one "
                         "none): fix the data (one per conversation; a record's own "
                         "conversation without one is a text-only row)",
    "bad_image": "undecodable image bytes: rebuild the dataset with launch/build_dataset.py "
                 "--overwrite",
    "no_task": "none of config.data.tasks is allowed by the record's labels: set "
               "--config.data.tasks",
    "bad_conversation": "the conversation is not valid LLaVA JSON: fix the data",
}
REASON_CODES = {r: i + 1 for i, r in enumerate(DROP_REASONS)}   # 0 = nothing dropped
LENGTH_REASONS = ("image_past_max_len", "empty_answer")


class Unfit(ValueError):
  """An example that cannot become a fixed-shape row: dropped and counted, never fatal.

  ``needed`` is the smallest ``data.max_len`` that would keep it (0 when no length does).
  """

  def __init__(self, reason: str, message: str, *, needed: int = 0, rid: str = ""):
    if reason not in DROP_REASONS:
      raise KeyError(reason)
    super().__init__(message)
    self.reason, self.needed, self.rid = reason, int(needed), rid


def decode_image(image, rid: str = "") -> np.ndarray:
  """RGB uint8 [H,W,3] from a record's image: an array already decoded by tfds, or its encoded
  bytes (decoded with cv2 the way tfds does); undecodable bytes raise ``Unfit('bad_image')``."""
  if isinstance(image, bytes):
    arr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED) if image else None
    if arr is None or arr.size == 0:
      raise Unfit("bad_image", f"record {rid!r}: undecodable image ({len(image)} bytes)")
    if arr.ndim == 3 and arr.shape[-1] == 4:
      arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    elif arr.ndim == 3 and arr.shape[-1] == 3:
      arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    image = arr.astype(np.uint8, copy=False)
  img = np.asarray(image)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, -1)
  return img


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


def _clip_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
  """CLIPImageProcessor's resize and crop: the shortest side goes to ``size`` (the long side to
  ``int(size * long / short)``), then a centred ``size x size`` crop. -> (new_h, new_w, top,
  left)."""
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


def _clip_window(h: int, w: int, size: int) -> tuple[float, float, float, float]:
  """The source window (y0, x0, ch, cw), in source pixels, that CLIP's view of size ``size``
  shows: where the region boxes of an evaluation view are measured from."""
  new_h, new_w, top, left = _clip_geometry(h, w, size)
  sy, sx = h / new_h, w / new_w
  return top * sy, left * sx, size * sy, size * sx


def _clip_view(source, size: int) -> np.ndarray:
  """CLIPImageProcessor's pixels (PIL backend) before rescaling: bicubic resize of the whole
  image, then the centre crop. (PIL's ``resize(box=...)`` of the same window is not the same
  filter pass: it was measured 22 grey levels away, so evaluation resizes exactly as CLIP.)"""
  from PIL import Image
  w, h = source.size
  new_h, new_w, top, left = _clip_geometry(h, w, size)
  if (new_w, new_h) != (w, h):
    source = source.resize((new_w, new_h), Image.BICUBIC)
  return np.asarray(source.crop((left, top, left + size, top + size)))


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
  [s,s,3] each) and the 16 region boxes (float32 [16,4], normalized, shared by every view).

  Views are bicubic (PIL) resamples of one window of the source: a random mild crop when
  training; when not, CLIP's own shortest-side resize + centre crop, so an evaluation image is
  exactly what ``transformers.CLIPImageProcessor`` gives a pretrained CLIP (boxes are measured
  in the window of the ViT's view, ``sizes[0]``; on a non-square source another size's centre
  crop can sit up to one of its pixels away).
  """
  from PIL import Image
  from feallm_jax.data import regions
  img = decode_image(rec["image"], _text(rec.get("id", "")))
  if img.dtype != np.uint8:
    raise ValueError(f"record {_text(rec.get('id', ''))!r}: image must be uint8 [H,W,3], got "
                     f"{img.dtype} {img.shape}")
  h, w = img.shape[:2]
  if use_landmarks and rec["has_landmarks"]:
    boxes = regions.boxes_from_landmarks(np.asarray(rec["landmarks"]), _text(rec["id"]))
  else:
    boxes = regions.canonical_boxes()
  boxes = np.asarray(boxes, np.float32)
  if aug is None:
    y0, x0, ch, cw = _clip_window(h, w, int(sizes[0]))
  else:
    y0, x0, ch, cw = _crop_window(h, w, rng, aug)
  # Boxes follow the crop: normalized to the window, clipped to the image.
  off = np.array([y0 / h, x0 / w, y0 / h, x0 / w], np.float32)
  scl = np.array([ch / h, cw / w, ch / h, cw / w], np.float32)
  boxes = np.clip((boxes - off) / scl, 0.0, 1.0)
  flip = aug is not None and rng.uniform() < aug.flip
  if flip:
    boxes = regions.flip_boxes(boxes)
  ops = _jitter_ops(rng, aug) if aug is not None else []
  views = []
  source = Image.fromarray(np.ascontiguousarray(img[..., :3]))
  for size in sizes:
    if aug is None:
      out = _clip_view(source, size)
    else:
      out = np.asarray(source.resize((size, size), Image.BICUBIC,
                                     box=(x0, y0, x0 + cw, y0 + ch)))
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


def image_count_ok(n_img: int, rec: dict) -> bool:
  """One ``<image>``; or none in a record's *own* conversation: a text-only row (LLaVA mixes
  hold ~40k; llava_instruct keeps them with a placeholder image). The model masks the visual
  slots of a row without ``<image>`` (``feallm.expansion_index``)."""
  return n_img == 1 or (n_img == 0 and bool(rec.get("conversations")))


def text_limit(max_len: int, n_img: int) -> int:
  """Tokens a row may keep: a text-only row one fewer, since the model's expansion puts its
  (masked) visual slots at position max_len - 1 and drops the token there."""
  return max_len if n_img else max_len - 1


def fit_length(ids: np.ndarray, loss: np.ndarray, max_len: int, image_id: int,
               keep_tail: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
  """Cut a sequence to max_len without ever removing the image placeholder.

  Training (keep_tail=False) cuts the end: the answer is last. Prompts (keep_tail=True) keep
  everything up to the image and the last tokens (the question and the generation prompt).
  A sequence that cannot be cut so raises :class:`Unfit` (its caller drops the example).
  """
  n = len(ids)
  if n <= max_len:
    return ids, loss, False
  pos = np.flatnonzero(ids == image_id)
  if len(pos) == 0:     # a text-only row (image_count_ok): no placeholder to protect
    keep = slice(n - max_len, n) if keep_tail else slice(0, max_len)
    return ids[keep], loss[keep], True
  if len(pos) != 1:
    raise Unfit("image_token_count", f"{n} tokens need cutting to max_len={max_len}: expected "
                f"exactly one image token, found {len(pos)}")
  p = int(pos[0])
  if p + 1 >= max_len:
    first = np.flatnonzero(loss)
    need = max(p + 2, int(first[0]) + 1) if len(first) and not keep_tail else p + 2
    raise Unfit("image_past_max_len",
                f"max_len={max_len} leaves no room after the image token at {p}", needed=need)
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
  num_records: int          # records in the source; an order element is copy * num_records + record
  lca_image_size: int = 0   # >0: also emit `lca_image`, the same view at this resolution
  epoch_length: int = 0     # positions per epoch (0: num_records; more with rare-AU copies)

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
    try:
      conv = json.loads(rec["conversations"])
    except json.JSONDecodeError as e:
      raise Unfit("bad_conversation", f"record {rec['id']!r}: conversations are not JSON "
                  f"({e.msg})") from None
    return conv, FREE_FORM_TASK
  avail = set(instructions.available_tasks(rec))
  choices = [t for t in tasks if t in avail]
  if not choices:
    raise Unfit("no_task", f"record {rec['id']!r}: none of the tasks {tuple(tasks)} is "
                f"available (its labels allow {sorted(avail)}); set config.data.tasks")
  task = choices[int(rng.integers(len(choices)))]
  conv = instructions.make_conversation(rec, task, int(rng.integers(1 << 31)))
  return conv, instructions.TASKS.index(task)


def _encode(tok, encoder, conv, rid: str):
  try:
    return encoder(tok, conv)
  except (ValueError, TypeError, AttributeError, KeyError) as e:   # roles, non-dict turns
    raise Unfit("bad_conversation", f"record {rid!r}: {e}") from None


MAX_ATTEMPTS = 16   # positions tried for one row before it is left masked (example_mask 0)
ID_BYTES = 64       # dropped ids travel in the batch as fixed-width bytes
DROP_KEYS = ("dropped", "dropped_id", "dropped_len")


def _drop_fields(e: Unfit | None) -> dict[str, np.ndarray]:
  rid = (e.rid if e is not None else "").encode("utf-8")[:ID_BYTES]
  return dict(dropped=np.int32(REASON_CODES[e.reason] if e is not None else 0),
              dropped_id=np.array(rid, dtype=f"S{ID_BYTES}"),
              dropped_len=np.int32(e.needed if e is not None else 0))


def _blank_views(spec: ExampleSpec) -> dict[str, np.ndarray]:
  from feallm_jax.data import regions
  out = dict(image=np.zeros((spec.image_size, spec.image_size, 3), np.float32),
             regions=np.asarray(regions.canonical_boxes(), np.float32))
  if spec.lca_image_size:
    out["lca_image"] = np.zeros((spec.lca_image_size, spec.lca_image_size, 3), np.float32)
  return out


class TrainExample(grain.transforms.Map):
  """(global position, record) -> fixed-shape training example (right padded).

  An example that cannot be fitted (:class:`Unfit`: image token past ``max_len``, zero or
  several image tokens, no answer left after the cut, undecodable image, ...) is replaced by
  the example at the next position of the shuffled stream (then the one after, ...). Every
  row therefore still depends only on its position: batches stay full, restoring the iterator
  resumes to the identical next batch and each process computes its own rows the same way.
  The drop is reported once, at its own position, in the ``dropped*`` fields (reason code, id,
  the max_len that would keep it); a replacement that fails too is counted at its own position.
  """

  def __init__(self, spec: ExampleSpec, source, order: grain.MapDataset | None = None):
    self.spec, self.source, self.order = spec, source, order

  def map(self, element):
    gpos, index = element
    drop, out = None, None
    for attempt in range(MAX_ATTEMPTS if self.order is not None else 1):
      idx = index if attempt == 0 else int(self.order[gpos + attempt])
      try:
        out = self.example(gpos, idx, attempt)
        break
      except Unfit as e:
        if attempt == 0:
          drop = e
    if out is None:
      out = self.blank()
    out.update(_drop_fields(drop))
    return out

  def example(self, gpos: int, index: int, attempt: int = 0) -> dict[str, np.ndarray]:
    """The example of ``index`` drawn at ``gpos`` (``attempt`` > 0: as a replacement)."""
    s = self.spec
    copy, index = divmod(int(index), s.num_records)
    epoch = (gpos + attempt) // (s.epoch_length or s.num_records)
    rng = np.random.default_rng([s.seed, epoch, index] + ([gpos, attempt] if attempt else [])
                                + ([1000 + copy] if copy else []))
    rec = _clean_record(self.source[index])
    try:
      return self._make(rec, rng)
    except Unfit as e:
      e.rid = rec["id"]
      raise

  def _make(self, rec: dict, rng) -> dict[str, np.ndarray]:
    s = self.spec
    tok = _tokenizer(s.tokenizer)
    views = s.views(rec, rng, s.augment)
    conv, task = _conversation(rec, s.tasks, rng)
    ids, loss = _encode(tok, tokenizer_lib.encode_conversation, conv, rec["id"])
    img_id = tokenizer_lib.image_token_id(tok)
    n_img = int((ids == img_id).sum())
    if not image_count_ok(n_img, rec):
      raise Unfit("image_token_count", f"record {rec['id']!r}: conversation must hold exactly "
                  f"one {tokenizer_lib.IMAGE_TOKEN}, got {n_img}")
    first = np.flatnonzero(loss)
    ids, loss, cut = fit_length(ids, loss, text_limit(s.max_len, n_img), img_id)
    if not loss.any():
      raise Unfit("empty_answer", f"record {rec['id']!r}: no answer token within "
                  f"max_len={s.max_len}" if len(first) else
                  f"record {rec['id']!r}: the conversation has no answer",
                  needed=int(first[0]) + 1 if len(first) else 0)
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

  def blank(self) -> dict[str, np.ndarray]:
    """A masked row (example_mask 0, no loss): only when MAX_ATTEMPTS positions in a row fail."""
    s = self.spec
    tok = _tokenizer(s.tokenizer)
    input_ids = np.full(s.max_len, tok.pad_token_id, np.int32)
    input_ids[0] = tokenizer_lib.image_token_id(tok)
    attn = np.zeros(s.max_len, np.int32)
    attn[0] = 1
    return dict(**_blank_views(s), input_ids=input_ids, attention_mask=attn,
                loss_mask=np.zeros(s.max_len, np.int32), example_mask=np.int32(0),
                emotion=np.int32(-1), au_present=np.full(len(facs.ALL_AUS), -1, np.int32),
                task=np.int32(FREE_FORM_TASK), truncated=np.int32(0))


# --- drop accounting ---------------------------------------------------------------------------

class DroppedExamplesError(ValueError):
  """More training examples were dropped than ``data.max_dropped_fraction`` allows
  (``drops``: the DropLog counted, when known)."""

  def __init__(self, message: str, drops: DropLog | None = None):
    super().__init__(message)
    self.drops = drops


MAX_IDS = 5   # ids kept (and logged) per reason


@dataclasses.dataclass
class DropLog:
  """Examples dropped from the training stream, cumulative over the run.

  ``examples`` counts the positions drawn (the rows of every batch); ``counts`` the dropped ones
  by reason; ``ids`` the first few ids per reason (this process only); ``needed_len`` the
  smallest ``data.max_len`` that would keep every length drop; ``unfilled`` the rows left
  masked because MAX_ATTEMPTS positions in a row could not be fitted.
  """
  examples: int = 0
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  needed_len: int = 0
  unfilled: int = 0

  @property
  def dropped(self) -> int:
    return sum(self.counts.values())

  @property
  def fraction(self) -> float:
    return self.dropped / self.examples if self.examples else 0.0

  def add(self, reason: str, rid: str, needed: int = 0) -> bool:
    """Counts one drop; True when its id is newly listed (the first MAX_IDS distinct ids of
    each reason are kept and logged; a record drawn again in a later epoch counts again)."""
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if reason in LENGTH_REASONS:
      self.needed_len = max(self.needed_len, int(needed))
    listed = self.ids.setdefault(reason, [])
    if len(listed) < MAX_IDS and rid not in listed:
      listed.append(rid)
      return True
    return False

  def add_batch(self, batch: dict) -> list[tuple[str, str, int]]:
    """Pops the ``dropped*`` fields of a batch and counts them; returns the newly listed drops."""
    codes, ids, lens = (np.asarray(batch.pop(k)) for k in DROP_KEYS)
    self.examples += len(codes)
    self.unfilled += int((np.asarray(batch["example_mask"]) == 0).sum())
    names = list(DROP_REASONS)
    new = []
    for i in np.flatnonzero(codes):
      reason = names[int(codes[i]) - 1]
      rid = bytes(ids[i]).decode("utf-8", "replace")
      if self.add(reason, rid, int(lens[i])):
        new.append((reason, rid, int(lens[i])))
    return new

  # Multi-host: every process sums the same vector, so every process takes the same decision.
  def to_vector(self) -> np.ndarray:
    return np.asarray([self.examples, self.unfilled, self.needed_len] +
                      [self.counts.get(r, 0) for r in DROP_REASONS], np.int64)

  @classmethod
  def from_vectors(cls, vectors: np.ndarray, ids: dict | None = None) -> "DropLog":
    v = np.asarray(vectors, np.int64).reshape(-1, 3 + len(DROP_REASONS))
    counts = {r: int(n) for r, n in zip(DROP_REASONS, v[:, 3:].sum(0)) if n}
    return cls(examples=int(v[:, 0].sum()), counts=counts, ids=dict(ids or {}),
               needed_len=int(v[:, 2].max()), unfilled=int(v[:, 1].sum()))

  def state(self) -> dict:
    return dict(examples=self.examples, counts=dict(self.counts),
                ids={k: list(v) for k, v in self.ids.items()}, needed_len=self.needed_len,
                unfilled=self.unfilled)

  @classmethod
  def from_state(cls, state: dict | None) -> "DropLog":
    if not state:
      return cls()
    return cls(examples=int(state["examples"]), counts=dict(state["counts"]),
               ids={k: list(v) for k, v in state["ids"].items()},
               needed_len=int(state["needed_len"]), unfilled=int(state["unfilled"]))

  def metrics(self) -> dict[str, float | int]:
    """Scalars for metrics.jsonl / TensorBoard."""
    out: dict[str, float | int] = dict(examples=self.examples, dropped=self.dropped,
                                       dropped_fraction=self.fraction)
    for r in DROP_REASONS:
      if self.counts.get(r):
        out[f"dropped/{r}"] = self.counts[r]
    if self.unfilled:
      out["unfilled_rows"] = self.unfilled
    return out

  def describe(self, max_len: int | None = None) -> str:
    """'<n> <reason>: <what to change>; first ids: ...' per reason."""
    parts = []
    for r in DROP_REASONS:
      n = self.counts.get(r, 0)
      if not n:
        continue
      fix = DROP_REASONS[r]
      if r in LENGTH_REASONS and self.needed_len:
        fix += (f" (--config.data.max_len={self.needed_len} keeps every example dropped for "
                f"length{'' if max_len is None else f'; it is {max_len}'})")
      ids = self.ids.get(r, [])
      parts.append(f"{n} {r}: {fix}" + (f"; first ids: {', '.join(map(repr, ids))}"
                                        if ids else ""))
    return "; ".join(parts) if parts else "nothing dropped"

  def summary(self) -> str:
    return (f"{self.dropped} of {self.examples} examples dropped ({100 * self.fraction:.2f}%)"
            + (f", {self.unfilled} rows left masked" if self.unfilled else ""))

  def check(self, max_fraction: float, check_after: int, max_len: int | None = None) -> None:
    """Raises DroppedExamplesError once ``check_after`` examples were drawn and more than
    ``max_fraction`` of them were dropped."""
    if self.examples < max(int(check_after), 1) or self.dropped <= max_fraction * self.examples:
      return
    raise DroppedExamplesError(
        f"training data: {self.summary()}, more than data.max_dropped_fraction={max_fraction}. "
        f"{self.describe(max_len)}. To accept this many drops instead, raise "
        f"--config.data.max_dropped_fraction.")


class TrainIterator(grain.DatasetIterator):
  """This process's training batches (the keys of :func:`batch_signature`) and ``drops``.

  The last stage of the Grain pipeline: the ``dropped*`` fields of each batch go into
  ``drops`` (a :class:`DropLog`; the first ids per reason are logged), and ``get_state`` /
  ``set_state`` carry the counts with Grain's state, so a resumed run reports what an
  uninterrupted one would. A Grain ``DatasetIterator``: grain's checkpoint handler saves it.
  """

  STATE_KEY = "feallm_drops"

  def __init__(self, parent: grain.DatasetIterator, *, split: str = "train"):
    super().__init__(parent)
    self.split = split
    self.drops = DropLog()

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    for reason, rid, needed in self.drops.add_batch(batch):
      log.warning("%s: dropped example %r (%s%s); counted in metrics.jsonl as dropped/%s",
                  self.split, rid, reason, f", needs max_len >= {needed}" if needed else "",
                  reason)
    return batch

  def get_state(self) -> dict:
    return {**self._parent.get_state(), self.STATE_KEY: self.drops.state()}

  def set_state(self, state: dict) -> None:
    state = dict(state)
    drops = state.pop(self.STATE_KEY, None)   # absent in checkpoints written before it existed
    self._parent.set_state(state)
    self.drops = DropLog.from_state(drops)

  @classmethod
  def reshard_states(cls, states: Sequence[dict], process_index: int) -> dict:
    """The state of process ``process_index`` of a job with a different process count, from
    the states every process of the saving job wrote (in process order).

    Grain's part of the state counts *global* batches (``ProcessRows`` gives every process one
    block of each global batch), so it is the same in every process and valid for any count.
    The drop counts are per process: the new process 0 takes their sum and the others start
    from zero, so the run's total (what every process sums) is unchanged."""
    grain_parts = [{k: v for k, v in st.items() if k != cls.STATE_KEY} for st in states]
    if any(g != grain_parts[0] for g in grain_parts[1:]):
      raise ValueError("the data iterator states of the saving processes differ (" +
                       "; ".join(json.dumps(g, sort_keys=True)[:200] for g in grain_parts) +
                       "): cannot restore them into a different process count")
    merged = DropLog()
    for st in states:
      d = DropLog.from_state(st.get(cls.STATE_KEY))
      merged.examples += d.examples
      merged.unfilled += d.unfilled
      merged.needed_len = max(merged.needed_len, d.needed_len)
      for r, n in d.counts.items():
        merged.counts[r] = merged.counts.get(r, 0) + n
      for r, ids in d.ids.items():
        listed = merged.ids.setdefault(r, [])
        listed += [i for i in ids if i not in listed][:max(0, MAX_IDS - len(listed))]
    return {**grain_parts[0], cls.STATE_KEY: (merged if process_index == 0 else DropLog()).state()}

  def __str__(self) -> str:
    return f"TrainIterator(split={self.split})"


class CountDrops(grain.IterDataset):
  """Pipeline stage whose iterator is a :class:`TrainIterator` (drop accounting)."""

  def __init__(self, parent: grain.IterDataset, split: str = "train"):
    super().__init__(parent)
    self._split = split

  def __iter__(self) -> TrainIterator:
    return TrainIterator(self._parent.__iter__(), split=self._split)

  def __str__(self) -> str:
    return "CountDrops"


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


def _spec(config, num_records: int, *, train: bool, seed: int, tasks=None,
          repeats: np.ndarray | None = None) -> ExampleSpec:
  d = config.data
  return ExampleSpec(
      epoch_length=0 if repeats is None else int(repeats.sum()),
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


def _order(n: int, seed: int, repeats: np.ndarray | None = None) -> grain.MapDataset:
  """Record of every global position: shuffled per epoch, repeated forever. With `repeats`
  (copies per record per epoch), copy c of record i is the element ``c * n + i`` (its own
  augmentation and task draw)."""
  if repeats is None or (repeats == 1).all():
    return grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  elems = np.concatenate([c * n + np.flatnonzero(repeats > c) for c in range(int(repeats.max()))])
  return grain.MapDataset.source(elems.astype(np.int64)).shuffle(seed=seed).repeat()


def rare_au_repeats(config, source) -> np.ndarray | None:
  """Copies per record per epoch (``data.rare_au_repeat``): a record showing an AU whose share
  of the split's labelled records is below ``data.rare_au_frequency`` is drawn that many times
  per epoch. AU detectors are trained against this imbalance (weighted losses, oversampling);
  with a language model's greedy answer, a 6 %-frequency AU is otherwise never named. Reads
  the labels only (images stay encoded); None when off or when the split has no AU labels."""
  d = config.data
  k = int(d.get("rare_au_repeat", 1))
  if k < 1:
    raise ValueError(f"data.rare_au_repeat must be >= 1, got {k}")
  if k == 1:
    return None
  pres = np.stack([np.asarray(source[i]["au_present"], np.int32) for i in range(len(source))])
  labelled = (pres >= 0).all(1)
  if not labelled.any():
    return None
  freq = (pres[labelled] == 1).mean(0)
  rare = (freq > 0) & (freq < float(d.get("rare_au_frequency", 0.1)))
  hit = labelled & ((pres == 1) & rare).any(1)
  return np.where(hit, k, 1)


def train_dataset(config, *, split: str = "train", seed: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  source=None) -> grain.IterDataset:
  """The training IterDataset (infinite, shuffled per epoch, this process's batch slices).

  Its iterator is a :class:`TrainIterator`: the ``dropped*`` fields :class:`TrainExample` adds
  to every row are taken out of the batches into its drop counts.
  """
  d = config.data
  seed = int(config.seed if seed is None else seed)
  pi, pc = _process()
  pi = pi if process_index is None else process_index
  pc = pc if process_count is None else process_count
  src = data_source(config, split=split, decode_images=False) if source is None else source
  n = len(src)
  if n < d.batch_size:
    raise ValueError(f"{d.dataset}/{split} has {n} records, fewer than one batch "
                     f"({d.batch_size})")
  repeats = rare_au_repeats(config, src)
  spec = _spec(config, n, train=True, seed=seed, repeats=repeats)
  order = _order(n, seed, repeats)
  ds = ProcessRows(order, d.batch_size, pi, pc)
  ds = ds.map(TrainExample(spec, src, order))
  ds = ds.batch(d.batch_size // pc, drop_remainder=True)
  it = ds.to_iter_dataset()
  if d.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # notebooks/pytest: Grain reads its absl flags in workers
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=int(d.num_workers), per_worker_buffer_size=2))
  return CountDrops(it, split)


def train_iterator(config, *, split: str = "train", seed: int | None = None,
                   **kwargs) -> TrainIterator:
  """Iterator of this process's numpy training batches (:class:`TrainIterator`: its ``drops``
  count the examples that could not be fitted). Orbax saves/restores its state with
  grain.checkpoint.CheckpointSave / CheckpointRestore (get_state / set_state underneath)."""
  return iter(train_dataset(config, split=split, seed=seed, **kwargs))


def fit_check(config, *, split: str = "train", seed: int | None = None, source=None,
              num_examples: int | None = None) -> DropLog:
  """The drops among the first positions of the training stream: the very examples the first
  steps draw (identical on every process, so every process decides alike), made by the same
  code, without replacements. ``num_examples`` defaults to ``data.fit_check_examples`` (0: no
  check, an empty DropLog)."""
  d = config.data
  seed = int(config.seed if seed is None else seed)
  k = int(num_examples if num_examples is not None else d.get("fit_check_examples", 256))
  if k <= 0:
    return DropLog()
  src = data_source(config, split=split, decode_images=False) if source is None else source
  n = len(src)
  k = min(k, n)
  repeats = rare_au_repeats(config, src)
  example = TrainExample(_spec(config, n, train=True, seed=seed, repeats=repeats), src)
  order = _order(n, seed, repeats)
  drops = DropLog(examples=k)
  for g in range(k):
    try:
      example.example(g, int(order[g]))
    except Unfit as e:
      drops.add(e.reason, e.rid, e.needed)
  return drops


def check_fit(config, *, split: str = "train", seed: int | None = None, source=None) -> DropLog:
  """Refuses (DroppedExamplesError naming the flag) a run whose first examples would all be
  dropped; warns when more than ``data.max_dropped_fraction`` of them would be."""
  d = config.data
  drops = fit_check(config, split=split, seed=seed, source=source)
  name = f"{d.dataset}{'/' + d.builder_config if d.get('builder_config', '') else ''}/{split}"
  if drops.examples and drops.dropped == drops.examples:
    raise DroppedExamplesError(
        f"{name}: every one of the first {drops.examples} training examples would be dropped, "
        f"nothing to train on: {drops.describe(int(d.max_len))}", drops)
  limit = float(d.get("max_dropped_fraction", 0.01))
  if drops.fraction > limit:
    log.warning("%s: %s among the first examples, more than data.max_dropped_fraction=%s: the "
                "run stops once %d examples were drawn at this rate. %s", name, drops.summary(),
                limit, int(d.get("drop_check_after", 1000)), drops.describe(int(d.max_len)))
  else:
    log.info("%s fit check: %s", name, drops.summary())
  return drops


def _percentiles(x: Sequence[int]) -> dict[str, float]:
  a = np.asarray(x, np.float64)
  if not len(a):
    return {}
  return dict(mean=round(float(a.mean()), 1), p50=float(np.percentile(a, 50)),
              p90=float(np.percentile(a, 90)), p99=float(np.percentile(a, 99)),
              max=float(a.max()))


def length_report(config, source, *, num_examples: int = 0, seed: int | None = None
                  ) -> dict[str, Any]:
  """Token lengths of a split with ``config``'s tokenizer and visual-token count, and how many
  examples ``data.max_len`` would truncate or drop (by reason, with the first ids).

  Text only (images are not decoded: the builders already skip undecodable ones). Generated
  tasks are drawn once per record. ``num_examples`` > 0 reads that many evenly spaced records.
  """
  d = config.data
  seed = int(config.get("seed", 0) if seed is None else seed)
  n = len(source)
  idx = (np.arange(n) if not num_examples or num_examples >= n else
         np.unique(np.linspace(0, n - 1, int(num_examples)).astype(np.int64)))
  tok = _tokenizer(d.tokenizer)
  img_id = tokenizer_lib.image_token_id(tok)
  max_len, tasks = int(d.max_len), tuple(d.tasks)
  try:
    from feallm_jax.models import feallm
    visual = feallm.expanded_length(config, 1)
  except Exception as e:  # noqa: BLE001 - a report must not die on an unreadable model config
    log.warning("visual-token count unavailable (%s): LLM lengths not reported", e)
    visual = None
  lengths, drops, truncated = [], DropLog(examples=len(idx)), 0
  llm_lengths = []
  for i in idx:
    rec = _clean_record(source[int(i)])
    try:
      conv, _ = _conversation(rec, tasks, np.random.default_rng([seed, 0, int(i)]))
      ids, loss = _encode(tok, tokenizer_lib.encode_conversation, conv, rec["id"])
      lengths.append(len(ids))
      n_img = int((ids == img_id).sum())
      llm_lengths.append((len(ids), n_img))
      if not image_count_ok(n_img, rec):
        raise Unfit("image_token_count", f"{n_img} image tokens")
      first = np.flatnonzero(loss)
      _, kept, cut = fit_length(ids, loss, text_limit(max_len, n_img), img_id)
      if not kept.any():
        raise Unfit("empty_answer", "no answer", needed=int(first[0]) + 1 if len(first) else 0)
      truncated += int(cut)
    except Unfit as e:
      drops.add(e.reason, rec["id"], e.needed)
  out: dict[str, Any] = dict(
      examples=int(len(idx)), of=int(n), max_len=max_len, tokenizer=d.tokenizer or "tiny",
      text_tokens=_percentiles(lengths), truncated=truncated, dropped=drops.dropped,
      dropped_by_reason={r: drops.counts[r] for r in DROP_REASONS if r in drops.counts},
      first_ids={k: v for k, v in drops.ids.items()},
      needed_max_len=drops.needed_len, describe=drops.describe(max_len),
      fits_untruncated=int(max(lengths)) if lengths else 0)
  if visual is not None:
    out["visual_tokens"] = int(visual)   # tokens the single <image> placeholder becomes
    out["llm_tokens"] = _percentiles([x - 1 + visual if n else x for x, n in llm_lengths])
  return out


# --- evaluation --------------------------------------------------------------------------------

class EvalExample(grain.transforms.Map):
  """(global position, (record index, task) or None) -> (prompt example, meta), left padded.

  A prompt that cannot be fitted (:class:`Unfit`) keeps its row: it is masked
  (example_mask 0, a lone image token) and its meta says ``unfit=<reason>``, so the evaluation
  scores it as unanswerable and counts it instead of crashing.
  """

  # Records whose decoded face is kept: rows come task by task within a window of records
  # (eval_batches), so each face is read and resampled once for its (up to) four questions.
  KEEP = 1024

  def __init__(self, spec: ExampleSpec, source, dataset: str):
    self.spec, self.source, self.dataset = spec, source, dataset
    self._faces: dict[int, tuple] = {}

  def _record_and_views(self, index: int, rng):
    """(record, views or the Unfit it raised): evaluation views are deterministic (no
    augmentation draws from ``rng``), so a record's views serve all its rows."""
    if index not in self._faces:
      rec = _clean_record(self.source[index])
      try:
        views = self.spec.views(rec, rng, None)
      except Unfit as e:
        views = e
      self._faces[index] = (rec, views)
      while len(self._faces) > self.KEEP:
        self._faces.pop(next(iter(self._faces)))
    return self._faces[index]

  def map(self, element):
    gpos, row = element
    s = self.spec
    real = row is not None
    index, task = row if real else (0, None)
    rng = np.random.default_rng([s.seed, 0, index])
    rec, views = self._record_and_views(index, rng)
    tok = _tokenizer(s.tokenizer)
    img_id = tokenizer_lib.image_token_id(tok)
    task_id, ref, prompt, unfit = FREE_FORM_TASK, "", [], None
    try:
      if isinstance(views, Unfit):
        raise views
      if rec["conversations"]:
        conv, _ = _conversation(rec, s.tasks, rng)
      else:
        from feallm_jax.data import instructions
        t = task or s.tasks[0]
        avail = instructions.available_tasks(rec)
        if t not in avail:
          if not avail:
            raise Unfit("no_task", f"record {rec['id']!r}: its labels allow no task")
          t = avail[0]
        conv = instructions.make_conversation(rec, t, int(rng.integers(1 << 31)))
        task_id = instructions.TASKS.index(t)
      ids, ref, prompt = _encode(tok, tokenizer_lib.encode_prompt, conv, rec["id"])
      n_img = int((ids == img_id).sum())
      if n_img != 1:
        raise Unfit("image_token_count", f"record {rec['id']!r}: the prompt holds {n_img} "
                    f"{tokenizer_lib.IMAGE_TOKEN} tokens")
      ids, _, cut = fit_length(ids, np.zeros_like(ids), s.max_len, img_id, keep_tail=True)
    except Unfit as e:
      unfit, cut = e.reason, False
      views, ids = _blank_views(s), np.asarray([img_id], np.int32)
      if real:
        log.warning("eval %s: prompt %r cannot be fitted (%s: %s); scored as unanswerable",
                    self.dataset, rec["id"], e.reason, e)
    n = len(ids)
    input_ids = np.full(s.max_len, tok.pad_token_id, np.int32)
    input_ids[s.max_len - n:] = ids
    attn = np.zeros(s.max_len, np.int32)
    attn[s.max_len - n:] = 1
    batch = dict(**views, input_ids=input_ids, attention_mask=attn,
                 example_mask=np.int32(real and unfit is None), emotion=np.int32(rec["emotion"]),
                 au_present=_au_vector(rec), task=np.int32(task_id), truncated=np.int32(cut))
    if task_id == FREE_FORM_TASK and task is not None:
      from feallm_jax.data import instructions
      task_id = instructions.TASKS.index(task)   # an unfit generated prompt keeps its task
    meta = dict(id=rec["id"], task=(None if task_id == FREE_FORM_TASK else
                                    _task_name(task_id)), prompt=prompt[-1]["content"]
                if prompt else "", reference=ref, emotion=int(rec["emotion"]),
                au_present=_au_vector(rec).tolist(), label_set=label_set(self.dataset),
                dataset=self.dataset, real=real, position=int(gpos), unfit=unfit,
                record=int(index) if real else None)
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


DEFAULT_REUSE_WINDOW = 256   # records; 7B visual tokens: 577 x 4096 bf16 = 4.7 MB per face


def reuse_window(config) -> int:
  """``eval.reuse_window``: records whose faces an evaluation encodes once for all their tasks
  (0 = the whole split)."""
  e = config.get("eval", None)
  w = e.get("reuse_window", DEFAULT_REUSE_WINDOW) if e is not None else DEFAULT_REUSE_WINDOW
  return int(w if w is not None else DEFAULT_REUSE_WINDOW)


def eval_batches(config, *, dataset: str | None = None, split: str = "test",
                 tasks: Sequence[str] | None = None, batch_size: int | None = None,
                 num_samples: int = 0, process_index: int | None = None,
                 process_count: int | None = None, window: int | None = None,
                 source=None) -> Iterator[tuple[dict, list[dict]]]:
  """(batch, metas) of LEFT-padded prompts; the last global batch is padded, example_mask=0.

  Rows come in windows of ``window`` records (default ``eval.reuse_window``; 0 = the whole
  split), task by task within a window, so the evaluation can encode each face once and reuse
  it for every question on it while holding only one window's visual tokens.
  Every process yields the same number of batches (its block of each global batch).
  """
  d = config.data
  dataset = dataset or d.dataset
  tasks = tuple(tasks if tasks is not None else d.tasks)
  B = int(batch_size or d.eval_batch_size)
  pi, pc = _process()
  pi = pi if process_index is None else process_index
  pc = pc if process_count is None else process_count
  src = data_source(config, dataset, split, decode_images=False) if source is None else source
  # Grouped by task (stable: record order within a task): a batch's generation runs until its
  # longest answer ends, so a FER batch stops after a few tokens instead of decoding alongside
  # 60-token reasoning answers. Every process orders alike.
  order = {t: i for i, t in enumerate(tasks)}
  if window is None:
    window = reuse_window(config)
  if window < 0:
    raise ValueError(f"eval.reuse_window must be >= 0, got {window}")
  rows = sorted(eval_rows(src, tasks, num_samples),
                key=lambda r: (r[0] // window if window else 0, order.get(r[1], len(order))))
  spec = _spec(config, len(src), train=False, seed=int(config.seed), tasks=tasks)
  ds = ProcessRows(_Rows(rows, B), B, pi, pc)
  ds = ds.map(EvalExample(spec, src, dataset)).batch(B // pc, batch_fn=_collate_eval)
  for i in range(len(ds)):
    yield ds[i]
