"""Region boxes land on the facial features; flips; 68/5-point schemes; Haar detection."""
import numpy as np
import pytest

from feallm_jax.data import regions, synthetic

R = {n: i for i, n in enumerate(regions.REGION_NAMES)}


def _inside(box, pts):
  pts = np.atleast_2d(pts)
  y0, x0, y1, x1 = box
  return np.all((pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1))


def test_names_and_permutation():
  assert len(regions.REGION_NAMES) == 16 and len(set(regions.REGION_NAMES)) == 16
  p = regions.FLIP_PERMUTATION
  assert sorted(p) == list(range(16))
  assert all(p[p[i]] == i for i in range(16))
  assert regions.REGION_NAMES[p[R["right_eye"]]] == "left_eye"
  assert regions.REGION_NAMES[p[R["chin"]]] == "chin"
  assert sorted(regions.FLIP_68) == list(range(68))


def test_canonical_boxes_cover_landmarks():
  b = regions.canonical_boxes()
  assert b.shape == (16, 4) and b.dtype == np.float32
  assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
  lm = regions.CANONICAL_LANDMARKS68
  assert _inside(b[R["right_eye"]], lm[36:42]) and _inside(b[R["left_eye"]], lm[42:48])
  assert _inside(b[R["right_brow"]], lm[17:22]) and _inside(b[R["left_brow"]], lm[22:27])
  assert _inside(b[R["right_mouth_corner"]], lm[48]) and _inside(b[R["left_mouth_corner"]], lm[54])
  assert _inside(b[R["chin"]], lm[8])
  # Subject's right eye is on the image left.
  assert b[R["right_eye"], 3] < b[R["left_eye"], 1]
  b[0, 0] = 0.9  # returns a copy
  assert regions.canonical_boxes()[0, 0] != 0.9


def _pixels_near(image, color, tol=6):
  diff = np.abs(image.astype(int) - np.array(color)[None, None]).max(-1)
  ys, xs = np.nonzero(diff <= tol)
  S = image.shape[0]
  return np.stack([(xs + 0.5) / S, (ys + 0.5) / S], 1)


@pytest.mark.parametrize("subject", [0, 7, 23])
def test_boxes_land_on_rendered_features(subject):
  ident = synthetic.make_identity("train", subject)
  rng = np.random.default_rng(subject)
  pose = synthetic._pose(rng)
  img, lm = synthetic.render(ident, {12: 4.0, 25: 3.0}, pose=pose, image_size=128, lighting=False)
  b = regions.boxes_from_landmarks(lm)
  sclera = _pixels_near(img, (245, 245, 240))
  assert len(sclera) > 20
  eye_box = lambda p: _inside(b[R["right_eye"]], p) or _inside(b[R["left_eye"]], p)  # noqa
  assert np.mean([eye_box(p) for p in sclera]) > 0.97
  # Both eye boxes actually hold sclera, the image-left one the subject's right eye.
  assert any(_inside(b[R["right_eye"]], p) for p in sclera)
  assert any(_inside(b[R["left_eye"]], p) for p in sclera)
  lips = _pixels_near(img, ident.lip)
  assert len(lips) > 20
  mouth = [R[n] for n in ("upper_lip", "lower_lip", "right_mouth_corner", "left_mouth_corner")]
  assert np.mean([any(_inside(b[i], p) for i in mouth) for p in lips]) > 0.97
  # The leftmost / rightmost lip pixels (the drawn corners) sit in the corner boxes.
  assert _inside(b[R["right_mouth_corner"]], lips[lips[:, 0].argmin()])
  assert _inside(b[R["left_mouth_corner"]], lips[lips[:, 0].argmax()])
  brow_color = tuple(int(round(c * 0.7)) for c in ident.hair)
  brows = _pixels_near(img, brow_color, tol=3)
  brows = brows[brows[:, 1] < lm[27, 1]]  # exclude hair far above? keep brow band only
  in_brow = [(_inside(b[R["right_brow"]], p) or _inside(b[R["left_brow"]], p)) for p in brows]
  assert sum(in_brow) > 10


def test_five_point_scheme():
  lm68 = regions.CANONICAL_LANDMARKS68
  lm5 = regions.landmarks5_from_68(lm68)
  np.testing.assert_allclose(regions.landmarks68_from_5(lm5), lm68, atol=1e-5)
  np.testing.assert_allclose(regions.boxes_from_landmarks(lm5), regions.canonical_boxes(),
                             atol=1e-5)
  # A rotated, shifted face: 5-point boxes follow it and stay close to the 68-point ones.
  rec = synthetic.generate(3, split="test")
  b68 = regions.boxes_from_landmarks(rec["landmarks"])
  b5 = regions.boxes_from_landmarks(regions.landmarks5_from_68(rec["landmarks"]))
  assert np.abs(b68 - b5).mean() < 0.03
  assert _inside(b5[R["right_eye"]], rec["landmarks"][36:42].mean(0))


def test_flip():
  rec = synthetic.generate(5, split="val")
  lm = rec["landmarks"]
  b = regions.boxes_from_landmarks(lm)
  fb = regions.flip_boxes(b)
  np.testing.assert_allclose(regions.flip_boxes(fb), b, atol=1e-6)
  # Mirroring the landmarks and recomputing gives the flipped boxes.
  np.testing.assert_allclose(regions.boxes_from_landmarks(regions.flip_landmarks(lm)), fb,
                             atol=1e-5)
  # Flipped 'right_eye' is the mirror of the original 'left_eye'.
  le = b[R["left_eye"]]
  np.testing.assert_allclose(fb[R["right_eye"]], [le[0], 1 - le[3], le[2], 1 - le[1]], atol=1e-6)
  # Pixel check on the mirrored image: the flipped right-eye box holds sclera.
  ident = synthetic.make_identity("val", 1)
  img, lm2 = synthetic.render(ident, {}, image_size=128, lighting=False, pose=(0.1, 1.0, 0.03, 0))
  mirrored = img[:, ::-1]
  fb2 = regions.flip_boxes(regions.boxes_from_landmarks(lm2))
  sclera = _pixels_near(mirrored, (245, 245, 240))
  assert any(_inside(fb2[R["right_eye"]], p) for p in sclera)
  assert not any(_inside(fb2[R["right_eye"]], p) for p in sclera if p[0] > 0.55)
  # Batched boxes work too.
  assert regions.flip_boxes(np.stack([b, b])).shape == (2, 16, 4)
  # The canonical face is symmetric.
  c = regions.canonical_boxes()
  np.testing.assert_allclose(regions.flip_boxes(c), c, atol=2e-3)


def test_bad_landmarks():
  with pytest.raises(ValueError, match="foo.jpg"):
    regions.boxes_from_landmarks(np.zeros((10, 2)), "foo.jpg")
  with pytest.raises(ValueError, match="NaN"):
    regions.boxes_from_landmarks(np.full((68, 2), np.nan))
  with pytest.raises(ValueError, match="shape"):
    regions.flip_boxes(np.zeros((15, 4)))


def test_region_boxes_fallback():
  np.testing.assert_array_equal(regions.region_boxes(np.zeros((68, 2)), False),
                                regions.canonical_boxes())


# A real photo: scikit-image's ``astronaut`` (Eileen Collins, NASA portrait, public domain),
# 512 x 512. Hand-annotated from the image, (x, y) pixels: pupils and mouth corners.
ASTRONAUT_EYES = ((204, 101), (245, 104))
ASTRONAUT_MOUTH = ((204, 141), (245, 141))


def test_haar_finds_the_face_in_a_real_photo():
  data = pytest.importorskip("skimage.data")
  img = data.astronaut()
  box = np.asarray(regions.detect_face(img, "astronaut.png")) * 512   # y0, x0, y1, x1
  for x, y in ASTRONAUT_EYES + ASTRONAUT_MOUTH:
    assert box[1] + 5 < x < box[3] - 5 and box[0] + 5 < y < box[2] - 5, (box, (x, y))
  iod = ASTRONAUT_EYES[1][0] - ASTRONAUT_EYES[0][0]
  side = max(box[2] - box[0], box[3] - box[1])
  assert 1.5 * iod < side < 4 * iod, (side, iod)        # a face, not the whole portrait
  crop = regions.crop_face(img, box / 512, margin=0.2)
  assert crop.shape[0] == crop.shape[1] >= round(side) and crop.shape[2] == 3


@pytest.mark.parametrize("i", [0, 1, 5])
def test_haar_detects_pasted_face_and_crops(i):
  """Synthetic faces pasted into a grey canvas: these three are found (the drawn faces are not
  photographs; OpenCV is pinned, so which ones is fixed), and the box covers the eyes."""
  rec = synthetic.generate(i, split="test")
  big = np.full((320, 320, 3), 90, np.uint8)
  big[100:228, 150:278] = rec["image"]
  box = regions.detect_face(big, f"face{i}.png")
  lm = rec["landmarks"] * 128 + [150, 100]
  cy, cx = (box[0] + box[2]) / 2 * 320, (box[1] + box[3]) / 2 * 320
  assert 150 < cx < 278 and 100 < cy < 228
  assert box[1] * 320 < lm[36:48, 0].min() + 10 and box[3] * 320 > lm[36:48, 0].max() - 10
  assert box[0] * 320 < lm[36:48, 1].min() and box[2] * 320 > lm[36:48, 1].max()
  crop = regions.crop_face(big, box, margin=0.2)
  assert crop.shape[0] == crop.shape[1] and crop.shape[2] == 3
  assert crop.shape[0] >= round(max(box[2] - box[0], box[3] - box[1]) * 320)


def test_no_face_error_and_crop_padding():
  blank = np.full((200, 200, 3), 128, np.uint8)
  with pytest.raises(regions.NoFaceError, match="blank.jpg"):
    regions.detect_face(blank, "blank.jpg")
  with pytest.raises(ValueError, match="weird.png"):
    regions.detect_face(np.zeros((10, 10, 5), np.uint8), "weird.png")
  img = np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3)
  crop = regions.crop_face(img, [0.0, 0.0, 0.5, 0.5], margin=0.25)  # extends past the corner
  assert crop.shape == (75, 75, 3)
  np.testing.assert_array_equal(crop[0, 0], img[0, 0])  # edge replicated
  with pytest.raises(ValueError, match="empty box"):
    regions.crop_face(img, [0.5, 0.5, 0.4, 0.6])
