"""Shared pieces of the tfds builders: the record features, image normalization, skip accounting.

Every builder yields the same record (docs/interfaces.md, "Records") so the pipeline never needs
to know which dataset it reads. Images are normalized once at build time (RGB, bounded size,
JPEG) so that reading is a cheap cv2 decode.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import io
import json
import logging
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageFile

from feallm_jax.data import facs

log = logging.getLogger(__name__)

NUM_AUS = len(facs.ALL_AUS)
NUM_LANDMARKS = 68
# Images smaller than this (shorter side) are upscaled: the Local Clue Aggregator crops 16
# regions and a 40-px face leaves nothing to crop. Larger than MAX_SIDE are downscaled: the
# vision tower never sees more than 336 px, and ArrayRecord shards stay small.
MIN_SIDE = 112
MAX_SIDE = 512
JPEG_QUALITY = 95

# The subject-exclusive 3-fold partitions used by the AU-detection literature (JAA-Net, Shao et
# al. ECCV 2018; ME-GraphAU, Luo et al. IJCAI 2022), so numbers are comparable to published ones.
BP4D_FOLDS: tuple[tuple[str, ...], ...] = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016",
     "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020",
     "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017",
     "M015", "F014"),
)
DISFA_FOLDS: tuple[tuple[str, ...], ...] = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class LabelFileError(ValueError):
  """A malformed annotation: stops the build, naming the file and (1-based) line."""

  def __init__(self, path: os.PathLike | str, line: int | None, msg: str):
    where = f"{os.fspath(path)}:{line}" if line else os.fspath(path)
    super().__init__(f"{where}: {msg}")
    self.path, self.line = os.fspath(path), line


class SkipImage(Exception):
  """An example that cannot be used (unreadable image, no face): skipped and counted.

  ``reason`` names the count it goes to; without one it is read from the message (no_face,
  missing, else unreadable).
  """

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason


def features() -> tfds.features.FeaturesDict:
  """The common record features of every builder."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "landmarks": tfds.features.Tensor(shape=(NUM_LANDMARKS, 2), dtype=np.float32),
      "has_landmarks": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "emotion": tfds.features.Tensor(shape=(), dtype=np.int32),
      "au_present": tfds.features.Tensor(shape=(NUM_AUS,), dtype=np.int32),
      "au_intensity": tfds.features.Tensor(shape=(NUM_AUS,), dtype=np.float32),
      "subject": tfds.features.Text(),
      "conversations": tfds.features.Text(),
  })


def make_record(rid: str, image: bytes, *, landmarks: np.ndarray | None = None,
                emotion: int = -1, au_present: np.ndarray | None = None,
                au_intensity: np.ndarray | None = None, subject: str = "",
                conversations: str = "") -> dict[str, Any]:
  """A record with the defaults of docs/interfaces.md for everything not annotated."""
  has_lm = landmarks is not None
  lm = np.zeros((NUM_LANDMARKS, 2), np.float32) if landmarks is None else np.asarray(
      landmarks, np.float32).reshape(NUM_LANDMARKS, 2)
  pres = np.full((NUM_AUS,), -1, np.int32) if au_present is None else np.asarray(
      au_present, np.int32)
  inten = np.full((NUM_AUS,), -1.0, np.float32) if au_intensity is None else np.asarray(
      au_intensity, np.float32)
  if pres.shape != (NUM_AUS,) or inten.shape != (NUM_AUS,):
    raise ValueError(f"{rid}: AU arrays must have shape ({NUM_AUS},)")
  return dict(id=rid, image=image, landmarks=lm, has_landmarks=has_lm, emotion=np.int32(emotion),
              au_present=pres, au_intensity=inten, subject=subject, conversations=conversations)


def au_arrays(labels: dict[int, float], *, present_threshold: float | None = None):
  """au_present/au_intensity from {AU: value}; AUs outside facs.ALL_AUS are ignored.

  With present_threshold the values are intensities (DISFA: occurrence = intensity >= 2);
  without, they are occurrences (1/0) and intensity stays -1 (not annotated).
  """
  pres = np.full((NUM_AUS,), -1, np.int32)
  inten = np.full((NUM_AUS,), -1.0, np.float32)
  for au, v in labels.items():
    if au not in facs.ALL_AUS or v is None or v < 0:
      continue
    i = facs.au_index(au)
    if present_threshold is None:
      pres[i] = int(v > 0)
    else:
      inten[i] = float(v)
      pres[i] = int(v >= present_threshold)
  return pres, inten


# --- images ------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
  """RGB from any PIL mode: alpha composited on white, CMYK/16-bit/palette converted."""
  if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    bg = Image.new("RGB", img.size, (255, 255, 255))
    bg.paste(img, mask=img.getchannel("A"))
    return bg
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, np.float64)
    hi = arr.max() or 1.0
    return Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8)).convert("RGB")
  if img.mode == "F":
    arr = np.asarray(img, np.float64)
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / ((hi - lo) or 1.0) * 255
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
  return img.convert("RGB") if img.mode != "RGB" else img


def open_image(source: os.PathLike | str | bytes, rid: str) -> Image.Image:
  """Fully decoded RGB image; SkipImage when the file is missing, corrupt or truncated."""
  ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come back grey
  try:
    if isinstance(source, bytes):
      img = Image.open(io.BytesIO(source))
    else:
      img = Image.open(os.fspath(source))
    img.load()
  except FileNotFoundError as e:
    raise SkipImage(f"{rid}: image file missing ({e.filename})") from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise SkipImage(f"{rid}: unreadable image ({type(e).__name__}: {e})") from e
  if img.width < 1 or img.height < 1:
    raise SkipImage(f"{rid}: empty image")
  return to_rgb(img)


def resize_bounds(img: Image.Image, min_side: int = MIN_SIDE,
                  max_side: int = MAX_SIDE) -> tuple[Image.Image, float]:
  """Upscale tiny images to min_side, downscale huge ones to max_side; returns (image, scale)."""
  w, h = img.size
  scale = 1.0
  if min(w, h) < min_side:
    scale = min_side / min(w, h)
  elif max(w, h) > max_side:
    scale = max_side / max(w, h)
  if scale != 1.0:
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
  return img, scale


def encode_jpeg(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


def load_face(source, rid: str, *, detect: bool = False,
              landmarks_px: np.ndarray | None = None, box_px=None):
  """Read, optionally face-crop, normalize and encode one image.

  Returns (jpeg bytes, landmarks normalized to the output image or None). `landmarks_px` are
  pixel coordinates in the source image. `box_px` = (x0, y0, x1, y1) pixels: the dataset's own
  face box (AffectNet's CSV, RAF-DB's *_boundingbox.txt), cropped like a detected face. With
  detect=True (and no box) the face is found with regions.detect_face and cropped (raw photos
  and video frames); no face -> SkipImage.
  """
  img = open_image(source, rid)
  lm = None if landmarks_px is None else np.asarray(landmarks_px, np.float64).reshape(-1, 2)
  box = None
  if box_px is not None:
    x0, y0, x1, y1 = (float(v) for v in box_px)
    W, H = img.size
    x0, x1 = max(x0, 0.0), min(x1, float(W))
    y0, y1 = max(y0, 0.0), min(y1, float(H))
    if not (x1 - x0 >= 2 and y1 - y0 >= 2):
      raise SkipImage(f"{rid}: face box {list(box_px)} is empty inside the {W}x{H} image",
                      reason="bad_face_box")
    box = np.array([y0 / H, x0 / W, y1 / H, x1 / W])
  elif detect:
    from feallm_jax.data import regions  # lazy: pulls in cv2 cascades
    try:
      box = regions.detect_face(np.asarray(img),
                                str(source) if not isinstance(source, bytes) else rid)
    except regions.NoFaceError as e:
      raise SkipImage(f"{rid}: no face found ({e})") from e
  if box is not None:
    from feallm_jax.data import regions
    arr = np.asarray(img)
    cropped = np.asarray(regions.crop_face(arr, box))
    if lm is not None:
      lm = lm - np.asarray(_crop_origin(box, *arr.shape[:2]))
    img = Image.fromarray(cropped)
  w, h = img.size
  img, _ = resize_bounds(img)
  out_lm = None
  if lm is not None:
    out_lm = (lm / np.array([w, h], np.float64)).clip(0.0, 1.0).astype(np.float32)
  return encode_jpeg(img), out_lm


def _crop_origin(box, H: int, W: int, margin: float = 0.25) -> tuple[float, float]:
  """Top-left (x, y) pixel of regions.crop_face's square crop (same geometry, so landmarks
  follow the crop)."""
  y0, x0, y1, x1 = (float(v) for v in box)
  cy, cx = (y0 + y1) / 2 * H, (x0 + x1) / 2 * W
  side = max((y1 - y0) * H, (x1 - x0) * W) * (1 + 2 * margin)
  return float(round(cx - side / 2)), float(round(cy - side / 2))


# --- skip accounting ---------------------------------------------------------------------------

@dataclasses.dataclass
class SkipLog:
  """Counts and lists every skipped example so nothing is lost silently.

  The same class counts what a build *kept but changed or noticed* (``FeaBuilder.noted``:
  text-only conversations, renamed duplicate ids, occluded frames, ...) with ``warn=False``:
  those are logged for the first few of each kind only, so a 40k-entry mix stays readable.
  """
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  first: dict = dataclasses.field(default_factory=dict)   # (split, reason) -> first message
  max_listed: int = 1000
  warn: bool = True
  logged_per_reason: int = 3

  def skip(self, split: str, reason: str, message: str) -> None:
    self.counts[(split, reason)] += 1
    self.first.setdefault((split, reason), message)
    if len(self.examples[split]) < self.max_listed:
      self.examples[split].append(message)
    if self.warn:
      log.warning("skipped [%s/%s] %s", split, reason, message)
    elif self.counts[(split, reason)] <= self.logged_per_reason:
      log.info("[%s/%s] %s", split, reason, message)

  add = skip   # the name read where nothing is skipped (FeaBuilder.noted)

  def total(self, split: str | None = None) -> int:
    return sum(n for (s, _), n in self.counts.items() if split is None or s == split)

  def by_reason(self) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (s, r), n in sorted(self.counts.items()):
      out[s][r] = n
    return dict(out)

  def first_by_reason(self) -> dict[str, dict[str, str]]:
    """{split: {reason: the first message}}: names the file and line of a skipped row."""
    out: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for (s, r), m in sorted(self.first.items()):
      out[s][r] = m
    return dict(out)

  def summary(self) -> str:
    if not self.counts:
      return "nothing skipped"
    parts = [f"{s}: " + ", ".join(f"{n} {r}" for r, n in d.items())
             for s, d in self.by_reason().items()]
    return "skipped " + "; ".join(parts)

  def to_json(self, noted: "SkipLog | None" = None) -> str:
    out = dict(counts=self.by_reason(), first=self.first_by_reason(),
               examples={k: v for k, v in self.examples.items()})
    if noted is not None:
      out["noted"] = noted.by_reason()
      out["noted_first"] = noted.first_by_reason()
    return json.dumps(out, indent=1)


class FeaBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: common features, ArrayRecord output, skip accounting with an end-of-split summary."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  # tfds derives code_path through importlib_resources, which is not a dependency here (and only
  # used to find checksums files, which manual / generated builders do not have).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(*args, **kwargs)
    self.skips = SkipLog()
    self.noted = SkipLog(warn=False)   # kept, but counted: see SkipLog

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=features(),
        homepage=self.HOMEPAGE or None, citation=self.CITATION or None)

  def _generate_examples(self, **kwargs):  # splits come as generators from _split_generators
    raise NotImplementedError

  def _guarded(self, split: str, items: Iterable[tuple[str, Any]], make):
    """Yield (key, record) from make(item), skipping and counting SkipImage failures."""
    n = 0
    for key, item in items:
      try:
        rec = make(item)
      except SkipImage as e:
        reason = e.reason or ("no_face" if "no face" in str(e) else (
            "missing" if "missing" in str(e) else "unreadable"))
        self.skips.skip(split, reason, str(e))
        continue
      n += 1
      yield key, rec
    if n == 0:   # tfds cannot write an empty split; say why instead of its bare assertion
      raise ValueError(f"{self.name}/{split}: no usable example; "
                       f"skipped {self.skips.by_reason().get(split, {})}: "
                       f"{self.skips.examples.get(split, [])[:3]}")
    log.info("%s/%s: %d examples, %d skipped", self.name, split, n, self.skips.total(split))
    if self.skips.total(split):
      log.warning("%s/%s: skipped %s", self.name, split, self.skips.by_reason()[split])

  def _require(self, path: os.PathLike | str, what: str):
    """The manual_dir file or folder, or a clear error quoting the instructions."""
    p = os.fspath(path)
    if not os.path.exists(p):
      raise FileNotFoundError(
          f"{self.name}: expected {what} at {p}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return p


def find_image(folder: str, stem: str) -> str | None:
  """The file in folder named stem + any image extension (case-insensitive)."""
  for ext in IMAGE_EXTS:
    for e in (ext, ext.upper()):
      p = os.path.join(folder, stem + e)
      if os.path.exists(p):
        return p
  return None


def index_frames(folder: str) -> dict[int, str]:
  """{frame number: path} for the numerically named images in folder ('0001.jpg', '12.png')."""
  out: dict[int, str] = {}
  if not os.path.isdir(folder):
    return out
  for name in os.listdir(folder):
    stem, ext = os.path.splitext(name)
    m = re.search(r"(\d+)$", stem)
    if ext.lower() in IMAGE_EXTS and m:
      out[int(m.group(1))] = os.path.join(folder, name)
  return out


def frame_root(builder: "FeaBuilder", manual_dir: str, image_root: str | None,
               candidates: Sequence[str], what: str) -> str:
  """The folder of per-subject frame folders: ``image_root`` when given, else the first of
  ``candidates`` under manual_dir (each tool names it differently: ME-GraphAU ``img``,
  LibreFace ``images``, the DISFA/BP4D instructions ``Images`` / ``Sequences``)."""
  if image_root:
    root = os.path.abspath(os.path.expanduser(image_root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"{builder.name}: image_root {root} (--image_root) is not a folder")
    return root
  for c in candidates:
    p = os.path.join(manual_dir, c)
    if os.path.isdir(p):
      return p
  raise FileNotFoundError(
      f"{builder.name}: expected {what} in one of {list(candidates)} under {manual_dir}, or "
      f"name the folder with --image_root.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def fold_of(subject: str, folds: Sequence[Sequence[str]]) -> int | None:
  for i, f in enumerate(folds):
    if subject in f:
      return i
  return None
