"""The 16 facial regions the Local Clue Aggregator crops, and face detection for raw photos.

Regions are boxes around the places where action units show (brows for AU1/2/4, eyes for
AU5/6/7, nose bridge for AU9, nasolabial folds for AU10/11/12, mouth corners for AU12/14/15/20,
chin for AU17, ...). Boxes are normalized `[y0, x0, y1, x1]` in the image frame, float32
`[16, 4]`. They come from 68-point (iBUG/300-W) landmarks when a dataset has them, from 5-point
landmarks (eyes, nose tip, mouth corners) through a similarity fit of the canonical 68-point
shape, or from `canonical_boxes()` for faces that are already aligned.

"left"/"right" are the subject's own sides (as in FACS and the 68-point scheme): the subject's
right eye (points 36-41) appears on the image's left.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

REGION_NAMES: tuple[str, ...] = (
    "forehead", "right_brow", "left_brow", "glabella", "right_eye", "left_eye", "nose_bridge",
    "right_cheek", "left_cheek", "right_nasolabial", "left_nasolabial", "upper_lip",
    "right_mouth_corner", "left_mouth_corner", "lower_lip", "chin")
NUM_REGIONS = len(REGION_NAMES)


def _flip_perm(names):
  swap = lambda n: (n.replace("right_", "@").replace("left_", "right_")  # noqa: E731
                    .replace("@", "left_"))
  return tuple(names.index(swap(n)) for n in names)


# Region i of a mirrored image is region FLIP_PERMUTATION[i] of the original.
FLIP_PERMUTATION: tuple[int, ...] = _flip_perm(REGION_NAMES)

# 68-point mirror permutation (iBUG numbering).
FLIP_68: tuple[int, ...] = tuple(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])

# Mean neutral shape of an aligned face (x, y in [0, 1]): the synthetic renderer's neutral mean
# at zero pose. Eyes at y~0.40 and mouth at y~0.76 also match typical aligned crops (RAF-DB
# aligned 100x100, AffectNet/FFHQ-style alignment) closely enough for region boxes.
CANONICAL_LANDMARKS68 = np.array([
    [0.178, 0.418], [0.184, 0.513], [0.203, 0.604], [0.235, 0.688], [0.278, 0.761],
    [0.33, 0.822], [0.386, 0.867], [0.443, 0.894], [0.5, 0.904], [0.557, 0.894], [0.614, 0.867],
    [0.67, 0.822], [0.722, 0.761], [0.765, 0.688], [0.797, 0.604], [0.816, 0.513],
    [0.822, 0.418], [0.23, 0.313], [0.272, 0.299], [0.313, 0.295], [0.355, 0.299],
    [0.397, 0.313], [0.603, 0.313], [0.645, 0.299], [0.687, 0.295], [0.728, 0.299],
    [0.77, 0.313], [0.5, 0.403], [0.5, 0.465], [0.5, 0.528], [0.5, 0.59], [0.446, 0.608],
    [0.473, 0.616], [0.5, 0.62], [0.527, 0.616], [0.554, 0.608], [0.25, 0.408], [0.302, 0.381],
    [0.355, 0.381], [0.407, 0.408], [0.355, 0.43], [0.302, 0.43], [0.593, 0.408],
    [0.645, 0.381], [0.698, 0.381], [0.75, 0.408], [0.698, 0.43], [0.645, 0.43],
    [0.388, 0.755], [0.433, 0.738], [0.466, 0.735], [0.5, 0.74], [0.534, 0.735],
    [0.567, 0.738], [0.612, 0.755], [0.567, 0.776], [0.534, 0.78], [0.5, 0.782],
    [0.466, 0.78], [0.433, 0.776], [0.393, 0.755], [0.455, 0.755], [0.5, 0.755],
    [0.545, 0.755], [0.607, 0.755], [0.545, 0.755], [0.5, 0.755], [0.455, 0.755]],
    np.float32)


def landmarks5_from_68(lm68: np.ndarray) -> np.ndarray:
  """5-point layout in image order: image-left eye, image-right eye, nose tip, mouth corners
  (image-left, image-right) — the MTCNN / RetinaFace / insightface convention."""
  lm68 = np.asarray(lm68, np.float64)
  return np.stack([lm68[36:42].mean(0), lm68[42:48].mean(0), lm68[30], lm68[48], lm68[54]])


CANONICAL_LANDMARKS5 = landmarks5_from_68(CANONICAL_LANDMARKS68).astype(np.float32)


def _check(lm, source, n_allowed=(68, 5)) -> np.ndarray:
  lm = np.asarray(lm, np.float64)
  if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in n_allowed:
    raise ValueError(f"{source or 'landmarks'}: expected landmarks of shape "
                     f"{' or '.join(f'[{n},2]' for n in n_allowed)}, got {list(lm.shape)}")
  if not np.all(np.isfinite(lm)):
    raise ValueError(f"{source or 'landmarks'}: landmarks contain NaN/inf")
  return lm


def landmarks68_from_5(lm5: np.ndarray, source: str = "") -> np.ndarray:
  """Canonical 68-point shape mapped onto 5 points by a least-squares similarity (Umeyama)."""
  dst = _check(lm5, source, (5,))
  src = CANONICAL_LANDMARKS5.astype(np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  a, b = src - mu_s, dst - mu_d
  cov = b.T @ a / len(src)
  u, sig, vt = np.linalg.svd(cov)
  fix = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
  rot = u @ fix @ vt
  var = (a ** 2).sum() / len(src)
  if var <= 0:
    raise ValueError(f"{source or 'landmarks'}: degenerate canonical 5-point shape")
  scale = np.trace(np.diag(sig) @ fix) / var
  out = (CANONICAL_LANDMARKS68.astype(np.float64) - mu_s) @ (scale * rot).T + mu_d
  return out.astype(np.float32)


def boxes_from_landmarks(landmarks: np.ndarray, source: str = "") -> np.ndarray:
  """float32 [16, 4] normalized [y0, x0, y1, x1] from 68- or 5-point normalized (x, y) landmarks.

  Sizes are in units of the inter-ocular distance so boxes scale with the face; each box is
  axis-aligned, clipped to [0, 1], and at least 0.25 IOD on a side.
  """
  lm = _check(landmarks, source)
  if lm.shape[0] == 5:
    lm = landmarks68_from_5(lm, source).astype(np.float64)
  reye, leye = lm[36:42].mean(0), lm[42:48].mean(0)
  axis = leye - reye
  iod = float(np.hypot(*axis))
  if iod < 1e-4:
    raise ValueError(f"{source or 'landmarks'}: eyes coincide; cannot size regions")
  ex = axis / iod                  # toward the subject's left (image right)
  ey = np.array([-ex[1], ex[0]])   # down the face

  def off(p, dx, dy):
    return np.asarray(p) + iod * (dx * ex + dy * ey)

  def box(points, pad):
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    lo, hi = pts.min(0) - pad * iod, pts.max(0) + pad * iod
    return lo, hi

  def centered(c, hw, hh):
    c = np.asarray(c)
    return c - iod * np.array([hw, hh]), c + iod * np.array([hw, hh])

  brow_mid = (lm[21] + lm[22]) / 2
  out = {
      "forehead": box([off(lm[19], 0, -0.45), off(lm[24], 0, -0.45),
                       off(lm[19], 0, -0.08), off(lm[24], 0, -0.08)], 0.05),
      "right_brow": box(lm[17:22], 0.12),
      "left_brow": box(lm[22:27], 0.12),
      "glabella": box([lm[21], lm[22], lm[27], off(brow_mid, 0, -0.15)], 0.04),
      "right_eye": box(lm[36:42], 0.14),
      "left_eye": box(lm[42:48], 0.14),
      "nose_bridge": box([lm[27], lm[30], off(lm[28], -0.16, 0), off(lm[28], 0.16, 0)], 0.05),
      "right_cheek": centered(off(reye, -0.04, 0.36), 0.3, 0.22),
      "left_cheek": centered(off(leye, 0.04, 0.36), 0.3, 0.22),
      "right_nasolabial": box([off(lm[31], -0.08, -0.03), off(lm[48], -0.12, 0.04), lm[48]], 0.05),
      "left_nasolabial": box([off(lm[35], 0.08, -0.03), off(lm[54], 0.12, 0.04), lm[54]], 0.05),
      "upper_lip": box([lm[33], *lm[49:54], *lm[61:64]], 0.05),
      "right_mouth_corner": centered(lm[48], 0.2, 0.2),
      "left_mouth_corner": centered(lm[54], 0.2, 0.2),
      "lower_lip": box([*lm[55:60], *lm[65:68]], 0.06),
      "chin": box([off(lm[57], 0, 0.08), lm[7], lm[8], lm[9]], 0.05),
  }
  boxes = np.zeros((NUM_REGIONS, 4), np.float64)
  min_side = 0.25 * iod
  for i, name in enumerate(REGION_NAMES):
    lo, hi = out[name]
    c, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, min_side / 2)
    lo, hi = c - half, c + half
    boxes[i] = [lo[1], lo[0], hi[1], hi[0]]
  boxes = np.clip(boxes, 0.0, 1.0)
  if np.any(boxes[:, 2] - boxes[:, 0] <= 0) or np.any(boxes[:, 3] - boxes[:, 1] <= 0):
    raise ValueError(f"{source or 'landmarks'}: face lies outside the image; empty region box")
  return boxes.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _canonical():
  b = boxes_from_landmarks(CANONICAL_LANDMARKS68)
  b.setflags(write=False)
  return b


def canonical_boxes() -> np.ndarray:
  """Boxes for an already-aligned face (a fresh, writable copy)."""
  return _canonical().copy()


def region_boxes(landmarks: np.ndarray | None, has_landmarks: bool, source: str = "") -> np.ndarray:
  """Record -> boxes: from landmarks when the dataset has them, else canonical."""
  if has_landmarks and landmarks is not None:
    return boxes_from_landmarks(landmarks, source)
  return canonical_boxes()


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
  """Boxes of the horizontally mirrored image: x -> 1 - x and left/right regions swapped."""
  b = np.asarray(boxes, np.float32)
  if b.shape[-2:] != (NUM_REGIONS, 4):
    raise ValueError(f"boxes must have shape [..., {NUM_REGIONS}, 4], got {list(b.shape)}")
  mirrored = np.stack([b[..., 0], 1 - b[..., 3], b[..., 2], 1 - b[..., 1]], -1)
  return mirrored[..., FLIP_PERMUTATION, :]


def flip_landmarks(landmarks: np.ndarray) -> np.ndarray:
  """68-point (or 5-point) landmarks of the mirrored image, renumbered to stay anatomical."""
  lm = _check(landmarks, "")
  out = lm.copy()
  out[:, 0] = 1 - out[:, 0]
  perm = FLIP_68 if lm.shape[0] == 68 else (1, 0, 2, 4, 3)
  return out[list(perm)].astype(np.float32)


# --- raw photos ----------------------------------------------------------------------------------

class NoFaceError(ValueError):
  """No face found in an image that needs one (names the file)."""


# Haar cascades shipped by opencv-python-headless 4.x (cv2.data.haarcascades).
FRONTAL_CASCADE = "haarcascade_frontalface_default.xml"
PROFILE_CASCADE = "haarcascade_profileface.xml"   # trained on faces turned to the image's left
# Images whose shorter side is below this get a third pass on a 2x upscale: a face smaller than
# the cascades' 24 px window cannot be found otherwise. Larger images skip it (slow, and it turns
# 12 px texture into false faces: measured on scikit-image's brick/coffee/rocket photos).
UPSCALE_BELOW = 256
UPSCALE_MIN_NEIGHBORS = 8


@functools.lru_cache(maxsize=2)
def _cascade(name: str = FRONTAL_CASCADE):
  import cv2  # local: only raw-photo paths need OpenCV
  path = cv2.data.haarcascades + name
  clf = cv2.CascadeClassifier(path)
  if clf.empty():
    raise RuntimeError(f"could not load the Haar cascade {path} (opencv-python-headless 4.x "
                       "ships it; 5.x does not)")
  return clf


def _as_array(image) -> np.ndarray:
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = np.clip(arr, 0, 255).astype(np.uint8)
  return arr


def _largest(faces) -> tuple[int, int, int, int] | None:
  if len(faces) == 0:
    return None
  return tuple(int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))


def _passes(gray: np.ndarray, min_size: int, scale_factor: float, min_neighbors: int):
  """Detector passes in order, each ``(name, run)`` with ``run() -> (x, y, w, h) | None`` in
  ``gray``'s pixels: frontal, then profile (as is and mirrored: a face turned either way), then
  both on a 2x upscale of a small image."""
  import cv2
  W = gray.shape[1]

  def frontal(img, scale, neighbors):
    box = _largest(_cascade(FRONTAL_CASCADE).detectMultiScale(
        img, scaleFactor=scale_factor, minNeighbors=neighbors, minSize=(min_size, min_size)))
    return None if box is None else tuple(int(round(v / scale)) for v in box)

  def profile(img, scale, neighbors):
    clf = _cascade(PROFILE_CASCADE)
    kw = dict(scaleFactor=scale_factor, minNeighbors=neighbors, minSize=(min_size, min_size))
    left = _largest(clf.detectMultiScale(img, **kw))
    right = _largest(clf.detectMultiScale(np.ascontiguousarray(img[:, ::-1]), **kw))
    if right is not None:   # back to unmirrored coordinates
      x, y, w, h = right
      right = (img.shape[1] - x - w, y, w, h)
    found = [b for b in (left, right) if b is not None]
    if not found:
      return None
    return tuple(int(round(v / scale)) for v in max(found, key=lambda b: b[2] * b[3]))

  yield "frontal cascade", lambda: frontal(gray, 1, min_neighbors)
  yield "profile cascade", lambda: profile(gray, 1, min_neighbors)
  if min(gray.shape) < UPSCALE_BELOW:
    big = cv2.resize(gray, (2 * W, 2 * gray.shape[0]), interpolation=cv2.INTER_CUBIC)
    n = max(min_neighbors, UPSCALE_MIN_NEIGHBORS)
    yield "frontal cascade, 2x upscale", lambda: frontal(big, 2, n)
    yield "profile cascade, 2x upscale", lambda: profile(big, 2, n)


def find_face(image, path_for_errors: str = "<array>", *, min_size: int = 24,
              scale_factor: float = 1.1, min_neighbors: int = 4) -> tuple[np.ndarray, str]:
  """``(box, how)``: the largest face as a normalized [y0, x0, y1, x1] float32 box, and which
  pass found it. Passes: the frontal Haar cascade; the profile cascade on the image and its
  mirror (a face turned away, e.g. scikit-image's ``camera.png``); for images under
  ``UPSCALE_BELOW`` px, both again on a 2x upscale with stricter ``UPSCALE_MIN_NEIGHBORS``.
  Raises :class:`NoFaceError` naming the file when every pass comes back empty."""
  import cv2
  arr = _as_array(image)
  if arr.ndim == 3 and arr.shape[2] == 4:
    arr = arr[..., :3]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
    raise ValueError(f"{path_for_errors}: expected an HxW or HxWx3 image, got {list(arr.shape)}")
  gray = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
  gray = cv2.equalizeHist(np.ascontiguousarray(gray))
  H, W = gray.shape
  tried = []
  for name, run in _passes(gray, min_size, scale_factor, min_neighbors):
    tried.append(name)
    box = run()
    if box is not None:
      x, y, w, h = box
      return np.clip(np.array([y / H, x / W, (y + h) / H, (x + w) / W], np.float32), 0, 1), name
  raise NoFaceError(f"{path_for_errors}: no face found by the Haar cascades "
                    f"(image {W}x{H}; tried: {'; '.join(tried)})")


def detect_face(image, path_for_errors: str = "<array>", *, min_size: int = 24,
                scale_factor: float = 1.1, min_neighbors: int = 4) -> np.ndarray:
  """The largest face as a normalized [y0, x0, y1, x1] float32 box (see :func:`find_face`)."""
  return find_face(image, path_for_errors, min_size=min_size, scale_factor=scale_factor,
                   min_neighbors=min_neighbors)[0]


def crop_face(image, box: Sequence[float], margin: float = 0.25) -> np.ndarray:
  """Square crop around a normalized box, enlarged by `margin` per side; edges replicated."""
  arr = _as_array(image)
  H, W = arr.shape[:2]
  y0, x0, y1, x1 = (float(v) for v in box)
  if not (y1 > y0 and x1 > x0):
    raise ValueError(f"crop_face: empty box {list(box)}")
  cy, cx = (y0 + y1) / 2 * H, (x0 + x1) / 2 * W
  side = max((y1 - y0) * H, (x1 - x0) * W) * (1 + 2 * margin)
  top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
  n = max(int(round(side)), 1)
  pad = max(0, -top, -left, top + n - H, left + n - W)
  if pad:
    widths = ((pad, pad), (pad, pad)) + (((0, 0),) if arr.ndim == 3 else ())
    arr = np.pad(arr, widths, mode="edge")
    top, left = top + pad, left + pad
  return arr[top:top + n, left:left + n].copy()
