"""Procedural cartoon faces whose geometry follows FACS action-unit intensities.

The embedded default dataset: it needs no download, every label is exact, and the expression is
really in the pixels, so a model that learns it has learned something about faces. A face is a
parametric model (identity + AU intensities -> eye, brow, mouth, jaw, nose shapes and wrinkle
marks), drawn with PIL at `SUPERSAMPLE`x the stored size and box-downsampled for anti-aliasing.
The 68 iBUG landmarks come from the same shape model and the same pose transform as the
drawing, so they sit on the drawn features.

Sampling rule for emotions (`sample_expression`), chosen so the label stays recoverable from
the face while no single pixel gives it away:
  * neutral: no active AU (identity-specific resting brow tilt and mouth curvature only);
  * otherwise the EMFACS prototype (facs.EMFACS_PROTOTYPES) with its REQUIRED AUs always
    on, at most one of its other AUs dropped (p=0.4), and 0-2 extra AUs drawn from a
    per-emotion list that contains no marker of a competing emotion (EXTRA_AUS), so
    `facs.emfacs_consistent(emotion, active_aus)` always holds;
  * every active AU has intensity in [1.5, 5] (0-5 FACS scale; 1.5 is clearly visible at 64 px);
  * AU26 (jaw drop) and AU16 (lower lip depressor) part the lips, so they also switch on
    AU25 (lips part) — the label says what the pixels show;
  * contempt (only when requested through `emotions`) is unilateral 12+14 on the subject's right.
Identities are drawn per split from disjoint seed streams (train/val/test never share one).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from feallm_jax.data import facs

RENDERED_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26)
SPLITS: Mapping[str, int] = {"train": 0, "val": 1, "test": 2}
NUM_IDENTITIES: Mapping[str, int] = {"train": 600, "val": 100, "test": 100}
SUPERSAMPLE = 2
MIN_INTENSITY = 1.5

# Always-on prototype AUs: without them the face would read as another emotion.
REQUIRED_AUS: Mapping[str, frozenset[int]] = {
    "happiness": frozenset({12}),
    "sadness": frozenset({15}),
    "surprise": frozenset({1, 2}),
    "fear": frozenset({1, 4, 20}),
    "anger": frozenset({4, 23}),
    "disgust": frozenset({9}),
    "contempt": frozenset({12, 14}),
    "neutral": frozenset(),
}
# Extra AUs that co-occur naturally and carry no marker of a competing emotion.
EXTRA_AUS: Mapping[str, tuple[int, ...]] = {
    "happiness": (7, 10, 25, 26),
    "sadness": (7, 17, 24, 25),
    "surprise": (25,),
    "fear": (25,),
    "anger": (10, 17, 24, 25),
    "disgust": (4, 7, 10, 17, 25),
    "contempt": (),
    "neutral": (),
}


def occurring_aus(emotions: Sequence[str] = facs.RAF_DB) -> tuple[int, ...]:
  """AUs that `sample_expression` can switch on for these emotions (prototypes, extras, and
  AU25 wherever AU26/AU16 part the lips). An AU outside this set never occurs in the data (e.g.
  AU14, the dimpler, exists only in contempt, which the 7-class set lacks), so it has no F1 and
  is not scored."""
  out: set[int] = set()
  for e in emotions:
    name = facs.emotion_name(e)
    aus = set(facs.EMFACS_PROTOTYPES[name]) | set(EXTRA_AUS[name])
    if aus & {16, 26}:
      aus.add(25)
    out |= aus
  return tuple(sorted(out))


def _check_tables():
  for e, proto in facs.EMFACS_PROTOTYPES.items():
    assert REQUIRED_AUS[e] <= proto, e
    assert proto <= set(RENDERED_AUS), e
    assert not set(EXTRA_AUS[e]) & facs.conflicting_aus(e), e
_check_tables()


# --- identity ------------------------------------------------------------------------------------

SKIN_TONES = np.array([
    (255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 140, 100), (161, 110, 75),
    (120, 80, 55), (250, 210, 175), (232, 185, 150)], np.float32)
HAIR_COLORS = np.array([
    (30, 22, 18), (60, 40, 25), (110, 70, 40), (165, 120, 60), (210, 180, 110), (120, 120, 120),
    (80, 30, 20), (15, 15, 20)], np.float32)
IRIS_COLORS = np.array([(60, 40, 25), (40, 90, 140), (70, 110, 60), (90, 70, 40), (30, 30, 30)],
                       np.float32)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Face-shape and appearance parameters of one synthetic person (canonical units: image=1)."""
  subject: str
  face_w: float      # jaw half-width
  chin_y: float
  eye_dx: float      # eye-centre distance from the midline
  eye_y: float
  eye_hw: float      # eye half-width
  eye_h: float       # open upper-lid height
  brow_gap: float    # brow height above the eye centre
  brow_arch: float
  brow_w: float      # stroke width
  brow_tilt: float   # resting inner-end offset (+ = lower)
  nose_y: float
  nose_w: float
  mouth_y: float
  mouth_hw: float
  lip_u: float
  lip_l: float
  rest_curve: float  # resting lip-corner offset (+ = down)
  hairline: float
  hair_style: int
  skin: tuple
  hair: tuple
  iris: tuple
  lip: tuple
  shirt: tuple
  bg0: tuple
  bg1: tuple


def _tone(rng, table, jitter):
  c = table[rng.integers(len(table))] + rng.normal(0, jitter, 3)
  return tuple(int(v) for v in np.clip(c, 0, 255))


def make_identity(split: str, subject_index: int, seed: int = 0) -> Identity:
  """Identity parameters, deterministic by (seed, split, subject_index); splits never overlap."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
  rng = np.random.default_rng([seed, SPLITS[split], 1, subject_index])
  u = rng.uniform
  skin = _tone(rng, SKIN_TONES, 8)
  lip = tuple(int(v) for v in np.clip(np.array(skin) * np.array([0.85, 0.55, 0.55])
                                        + np.array([25, 0, 5]) + rng.normal(0, 6, 3), 0, 255))
  return Identity(
      subject=f"synthetic-{split}-{subject_index:05d}",
      face_w=u(0.30, 0.345), chin_y=u(0.88, 0.93),
      eye_dx=u(0.158, 0.185), eye_y=u(0.395, 0.42), eye_hw=u(0.072, 0.086), eye_h=u(0.027, 0.034),
      brow_gap=u(0.085, 0.105), brow_arch=u(0.006, 0.02), brow_w=u(0.024, 0.034),
      brow_tilt=u(-0.008, 0.008),
      nose_y=u(0.575, 0.605), nose_w=u(0.045, 0.062),
      mouth_y=u(0.74, 0.77), mouth_hw=u(0.1, 0.125), lip_u=u(0.017, 0.025), lip_l=u(0.022, 0.032),
      rest_curve=u(-0.005, 0.006), hairline=u(0.14, 0.18), hair_style=int(rng.integers(3)),
      skin=skin, hair=_tone(rng, HAIR_COLORS, 10), iris=_tone(rng, IRIS_COLORS, 10), lip=lip,
      shirt=tuple(int(v) for v in rng.uniform(30, 230, 3)),
      bg0=tuple(int(v) for v in rng.uniform(40, 240, 3)),
      bg1=tuple(int(v) for v in rng.uniform(40, 240, 3)),
  )


# --- expression sampling -------------------------------------------------------------------------

def sample_expression(rng: np.random.Generator, emotion: str) -> dict[int, float]:
  """AU intensities (0-5) for an emotion under the documented sampling rule."""
  emotion = facs.emotion_name(emotion)
  if emotion == "neutral":
    return {}
  proto = sorted(facs.EMFACS_PROTOTYPES[emotion])
  active = set(proto)
  optional = [a for a in proto if a not in REQUIRED_AUS[emotion]]
  if optional and rng.random() < 0.4:
    active.discard(optional[rng.integers(len(optional))])
  extras = [a for a in EXTRA_AUS[emotion] if a not in active]
  n_extra = int(rng.choice(3, p=(0.5, 0.35, 0.15)))
  if extras and n_extra:
    active.update(int(a) for a in rng.choice(extras, min(n_extra, len(extras)), replace=False))
  aus = {a: float(np.round(rng.uniform(MIN_INTENSITY, 5.0), 2)) for a in sorted(active)}
  for parting in (26, 16):
    if parting in aus:
      aus[25] = max(aus.get(25, 0.0), aus[parting])
  return aus


def toggleable_aus(emotion: str, aus: Mapping[int, float]) -> tuple[int, ...]:
  """AUs that can be switched on or off in a face of `emotion` without changing what it shows:
  the prototype's optional AUs and the emotion's extras (never a required AU, never one of a
  competing emotion). AU25 stays while AU26/AU16 part the lips."""
  emotion = facs.emotion_name(emotion)
  if emotion == "neutral":
    return ()
  cands = (set(facs.EMFACS_PROTOTYPES[emotion]) - REQUIRED_AUS[emotion]) | set(EXTRA_AUS[emotion])
  if {16, 26} & set(aus):
    cands.discard(25)
  return tuple(sorted(cands))


def toggle(aus: Mapping[int, float], au: int, rng: np.random.Generator) -> dict[int, float]:
  """`aus` with `au` switched off (if on) or on at a fresh intensity (if off); switching on
  AU26/AU16 also switches on AU25, as `sample_expression` does."""
  out = dict(aus)
  if au in out:
    del out[au]
  else:
    out[au] = float(np.round(rng.uniform(MIN_INTENSITY, 5.0), 2))
    if au in (16, 26):
      out[25] = max(out.get(25, 0.0), out[au])
  return dict(sorted(out.items()))


# --- geometry ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Shape:
  """Canonical-frame geometry of one face: landmark array plus extra drawing curves."""
  lm: np.ndarray                      # [68, 2]
  eyes: list                          # per eye (image-left first): dict of curves
  mouth: dict
  marks: list                         # (polyline [N,2], darkness 0-1, width) wrinkles & folds
  blush: list                         # (center, radii, strength)


def _k(aus, au):
  return min(max(float(aus.get(au, 0.0)), 0.0), 5.0) / 5.0


def _side_k(aus, au, side, unilateral):
  """Intensity of a mouth AU on one side (-1 image-left = subject's right, +1 image-right)."""
  k = _k(aus, au)
  if unilateral and au in (12, 14) and side > 0:
    return 0.0
  return k


def _shape(ident: Identity, aus: Mapping[int, float], unilateral: bool) -> _Shape:
  k = lambda au: _k(aus, au)  # noqa: E731
  lm = np.zeros((68, 2), np.float64)
  marks, blush, eyes = [], [], []
  cx = 0.5

  # Jaw 0..16 (lower half-ellipse from ear level to chin); AU26 drops, AU17 lifts the chin.
  t = np.linspace(0, math.pi, 17)
  top = ident.eye_y + 0.01
  drop = 0.055 * k(26) * np.sin(t) ** 2 - 0.008 * k(17) * np.sin(t) ** 8
  w = ident.face_w * (1 - 0.1 * np.sin(t) ** 4)
  lm[0:17, 0] = cx - w * np.cos(t)
  lm[0:17, 1] = top + (ident.chin_y - top) * np.sin(t) + drop

  # Brows: 5 points outer -> inner; 68 order is 17..21 image-left outer->inner, 22..26 inner->outer.
  tb = np.linspace(0, 1, 5)
  for s in (-1, 1):
    ex = cx + s * ident.eye_dx
    x = ex + s * (ident.eye_hw + 0.02) - s * tb * (2 * ident.eye_hw + 0.01)
    y = (ident.eye_y - ident.brow_gap - ident.brow_arch * 4 * tb * (1 - tb) * 1.4
         + ident.brow_tilt * tb)
    w_in = np.array([0.0, 0.15, 0.4, 0.75, 1.0])
    w_out = np.array([1.0, 0.85, 0.55, 0.25, 0.05])
    y = y - 0.055 * k(1) * w_in - 0.05 * k(2) * w_out
    y = y + 0.04 * k(4) * (0.2 + 0.8 * w_in) + 0.012 * k(9) * w_in
    x = x - s * (0.03 * k(4) + 0.008 * k(9)) * w_in
    pts = np.stack([x, y], 1)
    if s < 0:
      lm[17:22] = pts
    else:
      lm[22:27] = pts[::-1]

  # Eyes: parabolic lids around the eye centre; AU5 opens, AU6/AU7 narrow from below.
  for s in (-1, 1):
    ex, ey = cx + s * ident.eye_dx, ident.eye_y
    h = ident.eye_h
    hu = h * (1 + 0.95 * k(5) - 0.22 * k(6) - 0.3 * k(7) - 0.1 * k(4))
    hl = h * (0.8 - 0.45 * k(6) - 0.55 * k(7))
    hu, hl = max(hu, 0.3 * h), max(hl, 0.12 * h)
    flat = 0.6 * k(7)  # tightened lower lid is straighter
    u = np.linspace(-1, 1, 15)
    xs = ex + u * ident.eye_hw
    up = ey - hu * (1 - u ** 2)
    low = ey + hl * (1 - np.abs(u) ** (2 + 4 * flat))
    eyes.append(dict(xs=xs, up=up, low=low, center=(ex, ey + 0.15 * h), r=h * 1.12,
                     lid_w=0.011 + 0.004 * k(7), low_dark=0.35 + 0.5 * k(7) + 0.3 * k(6)))
    uu = np.array([-1, -1 / 3, 1 / 3, 1])
    upp = np.stack([ex + uu * ident.eye_hw, ey - hu * (1 - uu ** 2)], 1)
    lowp = np.stack([ex + uu[1:3] * ident.eye_hw, ey + hl * (1 - np.abs(uu[1:3]) ** (2 + 4 * flat))],
                    1)
    idx = (36, 37, 38, 39, 40, 41) if s < 0 else (42, 43, 44, 45, 46, 47)
    lm[idx[0]], lm[idx[1]], lm[idx[2]], lm[idx[3]] = upp
    lm[idx[4]], lm[idx[5]] = lowp[1], lowp[0]
    # AU6: raised cheek -> infraorbital crease, crow's feet, cheek apple.
    if k(6) > 0:
      cu = np.linspace(-0.85, 0.85, 9)
      crease = np.stack([ex + cu * ident.eye_hw * 1.05,
                         ey + hl + 0.018 + 0.012 * (1 - cu ** 2) - 0.006 * k(6)], 1)
      marks.append((crease, 0.55 * k(6) + 0.15, 0.009))
      ox = ex + s * (ident.eye_hw + 0.008)
      for ang in (-0.45, 0.0, 0.45):
        ln = 0.02 + 0.025 * k(6)
        d = np.array([s * math.cos(ang), math.sin(ang)])
        marks.append((np.array([[ox, ey], [ox + d[0] * ln, ey + d[1] * ln]]),
                      0.5 * k(6) + 0.15, 0.007))
      cy = ey + 0.105 - 0.012 * k(6)
      blush.append(((ex + s * 0.008, cy), (0.07, 0.05), k(6)))
      cu = np.linspace(-1, 1, 9)
      bulge = np.stack([ex + s * 0.008 + cu * 0.07, cy + 0.05 * np.sqrt(1 - 0.8 * cu ** 2)], 1)
      marks.append((bulge, 0.5 * k(6) + 0.15, 0.008))

  # Forehead wrinkles: AU1 central, AU2 lateral.
  brow_top = min(lm[17:27, 1].min(), ident.eye_y - ident.brow_gap) - 0.03
  for j in range(3):
    y0 = brow_top - 0.028 * j
    if y0 < ident.hairline + 0.025:
      break
    if k(1) > 0:
      xx = np.linspace(cx - 0.1, cx + 0.1, 9)
      marks.append((np.stack([xx, y0 - 0.012 * np.cos((xx - cx) / 0.1 * 1.3)], 1),
                    0.55 * k(1) + 0.15, 0.007))
    if k(2) > 0:
      for s in (-1, 1):
        xx = cx + s * np.linspace(0.11, 0.26, 7)
        marks.append((np.stack([xx, y0 + 0.006 * ((xx - cx) * s - 0.18) / 0.08], 1),
                      0.55 * k(2) + 0.15, 0.007))
  # AU4: vertical glabella furrows; AU9: nose-bridge wrinkles.
  if k(4) > 0:
    gy = ident.eye_y - ident.brow_gap + 0.02
    for s in (-1, 1):
      marks.append((np.array([[cx + s * 0.018, gy - 0.028], [cx + s * 0.014, gy + 0.025]]),
                    0.6 * k(4) + 0.2, 0.008))
  nose_top = ident.eye_y - 0.005
  if k(9) > 0:
    for j in range(3):
      y0 = nose_top + 0.025 + 0.022 * j
      xx = np.linspace(cx - 0.04, cx + 0.04, 7)
      marks.append((np.stack([xx, y0 + 0.008 * ((xx - cx) / 0.04) ** 2], 1),
                    0.75 * k(9) + 0.25, 0.01))

  # Nose: bridge 27..30, nostril base 31..35 (AU9 lifts wings strongly, AU10 a little).
  lift = 0.014 * k(9) + 0.005 * k(10)
  lm[27:31, 0] = cx
  lm[27:31, 1] = np.linspace(nose_top, ident.nose_y, 4)
  nx = np.array([-1, -0.5, 0, 0.5, 1]) * ident.nose_w
  lm[31:36, 0] = cx + nx
  lm[31:36, 1] = ident.nose_y + np.array([0.018, 0.026, 0.03, 0.026, 0.018]) - lift * np.array(
      [1, 0.7, 0.5, 0.7, 1])

  # Mouth: lip line with per-side corner offsets, lip thickness, opening.
  tu, tl = ident.lip_u, ident.lip_l
  thin = 1 - 0.55 * k(23) - 0.65 * k(24) - 0.25 * k(20) - 0.2 * k(12)
  tu *= max(thin, 0.25)
  tl *= max(thin + 0.2 * k(17), 0.25)
  gap_up = 0.004 * k(25) + 0.012 * k(10) * (k(25) > 0)
  gap_low = (0.014 + 0.02 * k(25)) * (k(25) > 0) + 0.022 * k(16) + 0.06 * k(26)
  raise_u = 0.03 * k(10) + 0.006 * k(9)
  mx, my = cx, ident.mouth_y - 0.012 * k(17) * 0 - 0.004 * k(10)
  hw = ident.mouth_hw * (1 - 0.08 * k(26) - 0.1 * k(23) - 0.05 * k(24))
  corner = {}
  for s in (-1, 1):
    k12, k14 = _side_k(aus, 12, s, unilateral), _side_k(aus, 14, s, unilateral)
    dy = (ident.rest_curve - 0.045 * k12 - 0.008 * k14 + 0.05 * k(15) + 0.012 * k(20)
          + 0.014 * k(17) + 0.01 * k(26))
    dx = 0.028 * k12 - 0.018 * k14 + 0.05 * k(20) - 0.005 * k(15)
    corner[s] = (dx, dy, k12, k14)
  u = np.linspace(-1, 1, 21)
  cdx = np.where(u < 0, corner[-1][0], corner[1][0])
  cdy = np.where(u < 0, corner[-1][1], corner[1][1])
  xs = mx + u * (hw + cdx)
  line = my + cdy * np.abs(u) ** 1.7 - 0.01 * k(17) * (1 - u ** 2)
  bell = 1 - u ** 2
  in_up = line - gap_up * bell
  in_low = line + gap_low * bell ** 0.7
  bow = 1 - 0.3 * np.exp(-(u / 0.18) ** 2)
  out_up = in_up - tu * np.sqrt(bell) * bow - raise_u * bell ** 0.4
  out_low = in_low + tl * bell ** 0.6
  mouth = dict(xs=xs, in_up=in_up, in_low=in_low, out_up=out_up, out_low=out_low,
               open=gap_up + gap_low > 0.004, teeth_up=0.012 * k(10) + 0.006 * k(12) + 0.006,
               teeth_low=0.01 * k(16) > 0.0)

  def at(curve, uq):
    return np.stack([np.interp(uq, u, xs), np.interp(uq, u, curve)], 1)
  lm[48:55] = at(out_up, np.array([-1, -0.6, -0.3, 0, 0.3, 0.6, 1]))
  lm[55:60] = at(out_low, np.array([0.6, 0.3, 0, -0.3, -0.6]))
  lm[60:65] = at(in_up, np.array([-0.96, -0.4, 0, 0.4, 0.96]))
  lm[65:68] = at(in_low, np.array([0.4, 0, -0.4]))

  # Nasolabial folds (AU12/AU10/AU9/AU6 deepen them), dimples (AU14), stretch lines (AU20).
  for s in (-1, 1):
    dx, dy, k12, k14 = corner[s]
    cxs, cys = mx + s * (hw + dx), my + dy
    depth = 0.5 * k12 + 0.55 * k(10) + 0.35 * k(9) + 0.15 * k(20)
    wing = np.array([cx + s * (ident.nose_w + 0.012), ident.nose_y + 0.01 - lift])
    end = np.array([cxs + s * 0.02, cys + 0.012])
    ctrl = np.array([wing[0] + s * (0.035 + 0.02 * k12), (wing[1] + end[1]) / 2 - 0.005])
    tt = np.linspace(0, 1, 9)[:, None]
    fold = (1 - tt) ** 2 * wing + 2 * tt * (1 - tt) * ctrl + tt ** 2 * end
    if depth > 0.05:
      marks.append((fold, min(depth + 0.15, 0.95), 0.008))
    if k14 > 0:
      marks.append((np.array([[cxs + s * 0.014, cys - 0.024], [cxs + s * 0.022, cys - 0.004],
                              [cxs + s * 0.016, cys + 0.018]]), 0.7 * k14 + 0.3, 0.013))
    if k(20) > 0:
      marks.append((np.array([[cxs + s * 0.01, cys + 0.012],
                              [cxs + s * (0.02 + 0.02 * k(20)), cys + 0.03 + 0.03 * k(20)]]),
                    0.5 * k(20) + 0.2, 0.008))
  # AU17 chin boss and mentolabial crease; AU24 bulges above/below the pressed lips.
  chin_c = (lm[57] + lm[8]) / 2
  if k(17) > 0:
    xx = np.linspace(-0.05, 0.05, 7)
    marks.append((np.stack([cx + xx, lm[57, 1] + 0.02 + 0.01 * (xx / 0.05) ** 2], 1),
                  0.6 * k(17) + 0.3, 0.01))
    for ddx, ddy in ((-0.025, 0.01), (0.0, 0.02), (0.025, 0.01), (-0.012, 0.032), (0.014, 0.03)):
      p = chin_c + np.array([ddx, ddy - 0.005])
      marks.append((np.array([p - [0.007, 0], p + [0.007, 0]]), 0.6 * k(17) + 0.25, 0.009))
  if k(24) > 0:
    for y0 in (lm[51, 1] - 0.012, lm[57, 1] + 0.012):
      marks.append((np.array([[cx - 0.035, y0], [cx + 0.035, y0]]), 0.45 * k(24) + 0.2, 0.007))
  return _Shape(lm=lm, eyes=eyes, mouth=mouth, marks=marks, blush=blush)


# --- drawing -------------------------------------------------------------------------------------

def _lerp(a, b, t):
  return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _pose(rng) -> tuple[float, float, float, float]:
  """(rotation rad, scale, tx, ty): small in-plane jitter around an aligned crop."""
  return (float(rng.uniform(-0.12, 0.12)), float(rng.uniform(0.92, 1.06)),
          float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.035, 0.035)))


def _transform(pose):
  rot, sc, tx, ty = pose
  c, s = math.cos(rot) * sc, math.sin(rot) * sc
  m = np.array([[c, -s], [s, c]])
  off = np.array([0.5 + tx, 0.52 + ty]) - m @ np.array([0.5, 0.52])
  return lambda p: np.asarray(p, np.float64) @ m.T + off


def render(ident: Identity, aus: Mapping[int, float], *, pose=(0.0, 1.0, 0.0, 0.0),
           image_size: int = 128, unilateral: bool = False, rng: np.random.Generator | None = None,
           lighting: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Draw one face: returns (uint8 [S,S,3] image, float32 [68,2] landmarks in [0,1] x,y)."""
  for au in aus:
    if au not in RENDERED_AUS and aus[au] > 0:
      raise ValueError(f"AU{au} is not rendered by the synthetic generator; rendered: "
                       f"{RENDERED_AUS}")
  if image_size < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  rng = rng if rng is not None else np.random.default_rng(0)
  shape = _shape(ident, aus, unilateral)
  T = _transform(pose)
  S = image_size * SUPERSAMPLE
  sc = pose[1] * S
  P = lambda pts: [tuple(q) for q in (T(pts) * S).tolist()]  # noqa: E731
  W = lambda w: max(1, int(round(w * sc)))  # noqa: E731

  # Background: vertical two-colour gradient plus one blob.
  ramp = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
  bg = np.asarray(ident.bg0, np.float32) * (1 - ramp) + np.asarray(ident.bg1, np.float32) * ramp
  img = Image.fromarray(np.broadcast_to(bg, (S, S, 3)).astype(np.uint8))
  d = ImageDraw.Draw(img)
  bx, by = rng.uniform(0, S, 2)
  br = rng.uniform(0.1, 0.3) * S
  d.ellipse([bx - br, by - br, bx + br, by + br], fill=_lerp(ident.bg1, ident.bg0, 0.5))

  skin, hair = ident.skin, ident.hair
  dark_skin = _lerp(skin, (60, 30, 20), 0.25)
  lm = shape.lm
  head_top = ident.hairline - 0.09
  jaw = lm[0:17]
  tt = np.linspace(math.pi, 2 * math.pi, 13)
  cap = np.stack([0.5 + ident.face_w * 1.0 * np.cos(tt),
                  jaw[0, 1] + (jaw[0, 1] - head_top) * np.sin(tt)], 1)
  head = np.concatenate([jaw, cap[::-1][1:-1]], 0)  # jaw runs left->right, cap back over the top
  # Long hair behind the head.
  if ident.hair_style == 2:
    back = np.concatenate([(cap - [0.5, 0]) * [1.2, 1.05] + [0.5, -0.02],
                           [[0.5 + ident.face_w + 0.07, 0.8], [0.5 - ident.face_w - 0.07, 0.8]]])
    d.polygon(P(back), fill=_lerp(hair, (0, 0, 0), 0.15))
  # Neck and shoulders.
  d.polygon(P([[0.42, 0.75], [0.58, 0.75], [0.6, 1.05], [0.4, 1.05]]), fill=dark_skin)
  d.polygon(P([[0.05, 1.1], [0.15, 0.97], [0.4, 0.93], [0.6, 0.93], [0.85, 0.97], [0.95, 1.1]]),
            fill=_lerp(ident.shirt, ident.shirt, 0))
  # Ears.
  for s in (-1, 1):
    ec = np.array([0.5 + s * (ident.face_w + 0.012), ident.eye_y + 0.05])
    tt2 = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    d.polygon(P(ec + np.stack([0.03 * np.cos(tt2), 0.055 * np.sin(tt2)], 1)), fill=dark_skin)
  d.polygon(P(head), fill=skin)
  # Cheek apples, then wrinkles / folds.
  for (c, r, strength) in shape.blush:
    tt2 = np.linspace(0, 2 * math.pi, 14, endpoint=False)
    d.polygon(P(np.array(c) + np.stack([r[0] * np.cos(tt2), r[1] * np.sin(tt2)], 1)),
              fill=_lerp(skin, (230, 105, 110), 0.55 * strength + 0.1))
  line_dark = _lerp(skin, (50, 25, 15), 1.0)
  for pts, dark, w in shape.marks:
    d.line(P(pts), fill=_lerp(skin, line_dark, dark), width=W(w), joint="curve")

  # Eyes: sclera, iris + pupil, skin covers that clip the iris to the lids, lid lines.
  for e in shape.eyes:
    xs, up, low = e["xs"], e["up"], e["low"]
    outline = np.concatenate([np.stack([xs, up], 1), np.stack([xs, low], 1)[::-1][1:-1]], 0)
    d.polygon(P(outline), fill=(245, 245, 240))
    c = np.array(e["center"])
    tt2 = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    ring = np.stack([np.cos(tt2), np.sin(tt2)], 1)
    d.polygon(P(c + e["r"] * ring), fill=_lerp(ident.iris, ident.iris, 0))
    d.polygon(P(c + e["r"] * 0.5 * ring), fill=(10, 10, 10))
    span = e["r"] * 1.6
    d.polygon(P(np.concatenate([np.stack([xs, up], 1),
                                np.stack([xs, up - span], 1)[::-1]], 0)), fill=skin)
    d.polygon(P(np.concatenate([np.stack([xs, low], 1),
                                np.stack([xs, low + span], 1)[::-1]], 0)), fill=skin)
    # Side covers beyond the eye corners.
    for j in (0, -1):
      x0 = xs[j]
      sgn = -1 if j == 0 else 1
      d.polygon(P([[x0, up[j] - span], [x0 + sgn * span, up[j] - span],
                   [x0 + sgn * span, low[j] + span], [x0, low[j] + span]]), fill=skin)
    d.line(P(np.stack([xs, up], 1)), fill=(25, 18, 15), width=W(e["lid_w"]), joint="curve")
    d.line(P(np.stack([xs, low], 1)), fill=_lerp(skin, (60, 30, 25), e["low_dark"]),
           width=W(0.006), joint="curve")
  # Blush marks drawn under the eye can be covered by the eye skin covers; redraw creases.
  for pts, dark, w in shape.marks:
    if w == 0.009:
      d.line(P(pts), fill=_lerp(skin, line_dark, dark), width=W(w), joint="curve")

  # Brows.
  brow_c = _lerp(hair, (0, 0, 0), 0.3)
  for pts in (lm[17:22], lm[22:27]):
    d.line(P(pts), fill=brow_c, width=W(ident.brow_w), joint="curve")
  # Nose: side shade along the bridge, base curve, nostrils.
  d.line(P(np.stack([lm[27:31, 0] + 0.022, lm[27:31, 1]], 1)), fill=_lerp(skin, (80, 40, 30), 0.3),
         width=W(0.007), joint="curve")
  d.line(P(lm[31:36]), fill=_lerp(skin, (70, 35, 25), 0.55), width=W(0.008), joint="curve")
  for j in (32, 34):
    c = lm[j] - [0, 0.006]
    d.polygon(P(c + np.stack([0.011 * np.cos(tt2), 0.006 * np.sin(tt2)], 1)), fill=(60, 30, 25))

  # Mouth.
  m = shape.mouth
  mxs = m["xs"]
  outer = np.concatenate([np.stack([mxs, m["out_up"]], 1), np.stack([mxs, m["out_low"]], 1)[::-1]])
  d.polygon(P(outer), fill=_lerp(ident.lip, ident.lip, 0))
  if m["open"]:
    inner = np.concatenate([np.stack([mxs, m["in_up"]], 1), np.stack([mxs, m["in_low"]], 1)[::-1]])
    d.polygon(P(inner), fill=(70, 15, 20))
    gap = m["in_low"] - m["in_up"]
    teeth = np.stack([mxs, m["in_up"] + np.minimum(gap, m["teeth_up"])], 1)
    d.polygon(P(np.concatenate([np.stack([mxs, m["in_up"]], 1)[2:-2], teeth[2:-2][::-1]])),
              fill=(240, 238, 225))
    if m["teeth_low"]:
      lt = np.stack([mxs, m["in_low"] - np.minimum(gap * 0.4, 0.01)], 1)
      d.polygon(P(np.concatenate([np.stack([mxs, m["in_low"]], 1)[4:-4], lt[4:-4][::-1]])),
                fill=(225, 222, 210))
  else:
    d.line(P(np.stack([mxs, (m["in_up"] + m["in_low"]) / 2], 1)), fill=_lerp(ident.lip, (40, 10, 10), 0.7),
           width=W(0.008), joint="curve")

  # Hair on top (drawn last so it frames the forehead).
  if ident.hair_style >= 0:  # every style has a top; 2 adds long hair behind
    fringe_x = np.linspace(0.5 - ident.face_w - 0.02, 0.5 + ident.face_w + 0.02, 9)
    slant = (0.03 if ident.hair_style == 1 else 0.0) * (fringe_x - 0.5) / ident.face_w
    fringe_y = ident.hairline + slant + 0.012 * np.cos(np.linspace(0, 8 * math.pi, 9))
    fringe_y[0] = fringe_y[-1] = ident.eye_y - 0.04
    top = np.stack([0.5 + (ident.face_w + 0.025) * np.cos(tt), jaw[0, 1] - 0.04
                    + (jaw[0, 1] - 0.04 - head_top + 0.015) * np.sin(tt)], 1)
    d.polygon(P(np.concatenate([top, np.stack([fringe_x, fringe_y], 1)[::-1]])), fill=hair)
  img = img.reduce(SUPERSAMPLE)
  arr = np.asarray(img, np.float32)
  if lighting:
    ang = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.08, 0.28)
    g = np.linspace(-1, 1, image_size, dtype=np.float32)
    grad = 1 + amp * (math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None])
    arr = arr * grad[..., None] * rng.uniform(0.85, 1.1)
    arr += rng.normal(0, rng.uniform(1.5, 6), arr.shape).astype(np.float32)
  image = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
  return image, T(shape.lm).astype(np.float32)


# --- records -------------------------------------------------------------------------------------

def generate(index: int, *, split: str = "train", seed: int = 0, image_size: int = 128,
             emotions: Sequence[str] = facs.RAF_DB) -> dict:
  """One record (docs/interfaces.md fields), deterministic by (seed, split, index).

  Emotions cycle through a per-block shuffle so every block of len(emotions) records is
  balanced; identities come from the split's own pool of NUM_IDENTITIES[split] subjects.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  emotion, ident, aus, pose, rng = draw(index, split=split, seed=seed, emotions=emotions)
  image, landmarks = render(ident, aus, pose=pose, image_size=image_size,
                            unilateral=emotion in facs.UNILATERAL_EMOTIONS, rng=rng)
  return make_record(index, split, seed, emotion, ident, aus, image, landmarks)


def draw(index: int, *, split: str = "train", seed: int = 0,
         emotions: Sequence[str] = facs.RAF_DB):
  """What `generate` draws for a record before rendering: (emotion, identity, AU intensities,
  pose, the rng the renderer continues with). Exposed so variants of one face (stage 0's
  minimal pairs) can be rendered with the same person, pose and lighting."""
  names = [facs.emotion_name(e) for e in emotions]
  n = len(names)
  block = np.random.default_rng([seed, SPLITS[split], 2, index // n]).permutation(n)
  emotion = names[int(block[index % n])]
  rng = np.random.default_rng([seed, SPLITS[split], 0, index])
  subject_index = int(rng.integers(NUM_IDENTITIES[split]))
  ident = make_identity(split, subject_index, seed)
  aus = sample_expression(rng, emotion)
  return emotion, ident, aus, _pose(rng), rng


def make_record(index: int, split: str, seed: int, emotion: str, ident: Identity,
           aus: Mapping[int, float], image: np.ndarray, landmarks: np.ndarray) -> dict:
  """The record dict (docs/interfaces.md fields) of a rendered face."""
  intensity = np.zeros(len(facs.ALL_AUS), np.float32)
  for au, v in aus.items():
    intensity[facs.au_index(au)] = v
  return dict(
      id=f"synthetic-{split}-{seed}-{index:07d}", image=image, landmarks=landmarks,
      has_landmarks=True, emotion=np.int32(facs.emotion_index(emotion)),
      au_present=(intensity >= 1.0).astype(np.int32), au_intensity=intensity,
      subject=ident.subject, conversations="")


def active_aus(record: Mapping) -> list[int]:
  """AU ids marked present in a record."""
  return [au for au, p in zip(facs.ALL_AUS, np.asarray(record["au_present"])) if p == 1]
