"""predict CLI: bad inputs exit non-zero with a clear message (before any model is loaded)."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predict(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # -m from the root: this checkout's package, whatever feallm_jax is installed (no sys.path edits).
  return subprocess.run([sys.executable, "-m", "launch.predict", *args],
                        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_non_image_file_exits_with_message(tmp_path):
  bogus = tmp_path / "notes.jpg"
  bogus.write_text("this is not a picture")
  r = _predict(f"--workdir={tmp_path}", f"--image={bogus}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "not a readable image" in r.stderr and "notes.jpg" in r.stderr
  assert "Traceback" not in r.stderr


def test_missing_file_exits_with_message(tmp_path):
  r = _predict(f"--workdir={tmp_path}", f"--image={tmp_path / 'nope.png'}")
  assert r.returncode == 2 and "no such file" in r.stderr


def test_blank_image_has_no_face(tmp_path):
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(blank)
  r = _predict(f"--workdir={tmp_path}", f"--image={blank}")
  assert r.returncode == 3, r.stderr[-2000:]
  assert "no face found" in r.stderr and "--aligned" in r.stderr
  assert "Traceback" not in r.stderr


def test_aligned_face_without_a_trained_run_exits_cleanly(tmp_path):
  face = tmp_path / "face.png"
  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(face)
  r = _predict(f"--workdir={tmp_path / 'empty'}", f"--image={face}", "--aligned")
  assert r.returncode == 4, r.stderr[-2000:]
  assert "no checkpoints" in r.stderr
