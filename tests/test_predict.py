"""predict CLI: bad inputs exit non-zero with a clear message (before any model is loaded)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predict(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # -m from the root: this checkout's package, whatever feallm_jax is installed (no sys.path edits).
  return subprocess.run([sys.executable, "-m", "launch.predict", *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


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


from tests.test_feabench import run  # noqa: E402,F401,F811  (a tiny model saved as a training run)


def test_predict_on_a_real_photo_explains_from_the_projectors_attention(run, tmp_path):  # noqa: F811
  """A real photo (skimage's astronaut portrait): the face is found, an answer printed, and
  --explain's ranking equals the projector's cross-attention over the 16 regions (visual
  tokens' weights averaged over heads and queries), recomputed here from the restored model,
  not the Local Clue Aggregator's self-attention."""
  data = pytest.importorskip("skimage.data")
  import jax.numpy as jnp
  from feallm_jax.data import pipeline, regions
  from feallm_jax.eval import feabench
  rgb = data.astronaut()
  photo = tmp_path / "astronaut.png"
  Image.fromarray(rgb).save(photo)
  overlay = tmp_path / "overlay.png"
  r = _predict(f"--workdir={run['workdir']}", f"--image={photo}", "--explain",
               f"--explain_out={overlay}", "--max_new_tokens=4", timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  start = lines.index("regions by attention:")
  ranked = [ln.split() for ln in lines[start + 1:start + 17]]
  names = [p[1] for p in ranked]
  scores = np.array([float(p[2]) for p in ranked])
  assert sorted(names) == sorted(regions.REGION_NAMES)
  with open(overlay, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  model, _ = feabench.load_model(run["config"], run["workdir"])
  face = regions.crop_face(rgb, regions.find_face(rgb, str(photo))[0])   # as predict does
  assert face.shape[0] == face.shape[1]          # so predict's centre-square crop is a no-op
  views = pipeline.eval_views(run["config"], face, str(photo))
  _, attn = model.visual_tokens(jnp.asarray(views["image"][None]),
                                jnp.asarray(views["regions"][None]), return_attention=True)
  proj = np.asarray(attn["regions"], np.float64)[0].mean(axis=(0, 1))
  proj /= proj.sum()
  by_name = dict(zip(regions.REGION_NAMES, proj))
  got = np.array([by_name[n] for n in names])
  np.testing.assert_allclose(scores, got, atol=6e-4)          # printed with 3 decimals
  assert np.all(np.diff(got) <= 1e-9), (names, got)            # ranked by that attention
  lca = np.asarray(attn["lca"], np.float64)[0].mean(axis=(0, 1))
  assert [regions.REGION_NAMES[k] for k in np.argsort(-lca)] != names
