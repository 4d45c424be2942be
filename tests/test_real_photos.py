"""Face detection on real photographs shipped by scikit-image (``skimage/data``, test extra).

Ground-truth face boxes were marked by hand on the 512 x 512 originals (pixels, x0 y0 x1 y1,
forehead/hair line to chin): the astronaut (Eileen Collins, frontal) and the cameraman (face
turned to the image's right, which the frontal Haar cascade misses). ``coffee.png`` and
``rocket.jpg`` hold no face at all and must still be refused with the clear message.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage
from PIL import Image

from feallm_jax.data import regions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
FACES = {"astronaut.png": (180, 55, 275, 170), "camera.png": (175, 95, 255, 195)}


def _photo(name: str, scale: float = 1.0) -> np.ndarray:
  im = Image.open(os.path.join(DATA, name)).convert("RGB")
  if scale != 1.0:
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BOX)
  return np.asarray(im)


def _check_box(box, truth, size):
  """Detected box centre inside the hand-marked face, IoU >= 0.3."""
  y0, x0, y1, x1 = np.asarray(box) * size
  tx0, ty0, tx1, ty1 = truth
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  assert tx0 < cx < tx1 and ty0 < cy < ty1, (box * size, truth)
  inter = max(0, min(x1, tx1) - max(x0, tx0)) * max(0, min(y1, ty1) - max(y0, ty0))
  union = (x1 - x0) * (y1 - y0) + (tx1 - tx0) * (ty1 - ty0) - inter
  assert inter / union >= 0.3, (box * size, truth, inter / union)


def test_frontal_face_found_by_first_pass():
  box, how = regions.find_face(_photo("astronaut.png"), "astronaut.png")
  assert how == "frontal cascade"
  _check_box(box, FACES["astronaut.png"], 512)


def test_turned_face_found_by_profile_pass():
  img = _photo("camera.png")
  box, how = regions.find_face(img, "camera.png")
  assert how == "profile cascade"
  _check_box(box, FACES["camera.png"], 512)
  np.testing.assert_array_equal(regions.detect_face(img, "camera.png"), box)


def test_small_face_found_on_upscaled_image():
  # 512 -> 102 px: the face is ~19 px, under the cascades' 24 px window.
  box, how = regions.find_face(_photo("astronaut.png", 0.2), "astronaut_small.png")
  assert how == "frontal cascade, 2x upscale"
  _check_box(box, [v * 0.2 for v in FACES["astronaut.png"]], 102)


@pytest.mark.parametrize("name,scale", [("coffee.png", 1.0), ("rocket.jpg", 0.2)])
def test_photo_without_face_is_refused(name, scale):
  with pytest.raises(regions.NoFaceError, match=f"{name}: no face found"):
    regions.find_face(_photo(name, scale), name)


def _predict(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "predict.py"), *args],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_predict_cli_on_real_photos(tmp_path):
  # No face: refused with the clear message before any model is touched (exit 3).
  r = _predict(f"--workdir={tmp_path}", f"--image={os.path.join(DATA, 'coffee.png')}")
  assert r.returncode == 3, r.stderr[-2000:]
  assert "coffee.png: no face found" in r.stderr and "--aligned" in r.stderr
  assert "Traceback" not in r.stderr
  # The turned face is found, so predict gets as far as looking for a model (exit 4).
  r = _predict(f"--workdir={tmp_path / 'empty'}", f"--image={os.path.join(DATA, 'camera.png')}")
  assert r.returncode == 4, r.stderr[-2000:]
  assert "no checkpoints" in r.stderr
