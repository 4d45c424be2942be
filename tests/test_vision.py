"""CLIP vision tower: every hidden state matches HF CLIPVisionModel; preprocessing matches CLIP."""

import hf_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import vision
from feallm_jax.weights import hf


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return fx.clip_vision_dir(str(tmp_path_factory.mktemp("clip_vision")))


def _pixels(n=2, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def test_hidden_states_match_hf(clip_dir):
  enc = hf.load_vision(clip_dir)
  x = _pixels()
  ours = enc(jnp.asarray(x))
  ref = fx.torch_vision_hidden(clip_dir, x)
  assert len(ours) == len(ref) == fx.CLIP_VISION["num_hidden_layers"] + 1
  errs = [fx.rel_err(a, b) for a, b in zip(ours, ref)]
  print("vision rel errs", errs)
  assert max(errs) < 1e-4, errs
  assert ours[0].shape == (2, 1 + (32 // 8) ** 2, 32)


def test_full_clip_model_dir(tmp_path):
  path = fx.clip_full_dir(str(tmp_path / "clip"))
  enc = hf.load_vision(path)
  x = _pixels(seed=1)
  ref = fx.torch_vision_hidden(path, x, full_clip=True)
  errs = [fx.rel_err(a, b) for a, b in zip(enc(jnp.asarray(x)), ref)]
  assert max(errs) < 1e-4, errs


def test_patchify_matches_conv_order(clip_dir):
  """The flattened patch kernel gives the same result as a stride-p conv over NCHW."""
  enc = hf.load_vision(clip_dir)
  import torch
  import transformers
  model = transformers.CLIPVisionModel.from_pretrained(clip_dir).eval()
  x = _pixels(n=1)
  with torch.no_grad():
    emb = getattr(model, "vision_model", model).embeddings
    ref = emb.patch_embedding(torch.tensor(x.transpose(0, 3, 1, 2)))
  ref = ref.flatten(2).transpose(1, 2).numpy()
  ours = enc.patch_embed(enc.patchify(jnp.asarray(x)))
  assert fx.rel_err(ours, ref) < 1e-5


def test_jit_split_merge_and_bad_pixels(clip_dir):
  enc = hf.load_vision(clip_dir)
  graphdef, state = nnx.split(enc)

  @jax.jit
  def f(state, x):
    return nnx.merge(graphdef, state)(x)[-1]

  x = jnp.asarray(_pixels())
  np.testing.assert_allclose(f(state, x), enc(x)[-1], atol=1e-5)
  with pytest.raises(ValueError, match="pixels must be"):
    enc(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="pixels must be"):
    enc(jnp.zeros((1, 32, 32, 3), jnp.uint8))


def test_bf16_runs(clip_dir):
  enc = hf.load_vision(clip_dir, dtype="bfloat16")
  x = _pixels()
  out = enc(jnp.asarray(x))
  assert out[-1].dtype == jnp.bfloat16
  ref = fx.torch_vision_hidden(clip_dir, x)
  assert fx.rel_err(out[-1].astype(jnp.float32), ref[-1]) < 5e-2


def test_preprocess_matches_clip_image_processor():
  from PIL import Image
  from transformers import CLIPImageProcessor
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8))
  ours = vision.preprocess(img, 32)
  proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  ref = np.asarray(proc(img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
  assert ours.shape == (32, 32, 3) and ours.dtype == np.float32
  # Exact with the PIL backend (torchvision's bicubic would differ by rounding); measured 0.
  # (The train/eval/predict path is tested the same way in test_pipeline.py.)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  np.testing.assert_allclose(vision.preprocess(np.asarray(img), 32), ours)
  with pytest.raises(ValueError, match="image must be"):
    vision.preprocess(np.zeros((4, 4, 5), np.uint8), 32)


def test_config_validation():
  with pytest.raises(ValueError, match="patch_size"):
    vision.VisionConfig(image_size=30, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match="hidden_act"):
    vision.VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=1, num_heads=4, hidden_act="relu6")
  cfg = vision.VisionConfig.from_dict(dict(hf_path="", image_size=32, patch_size=8,
                                           hidden_size=32, intermediate_size=64, num_layers=1,
                                           num_heads=4))
  with sharding.mesh_rules(sharding.single_device_mesh()):
    enc = vision.VisionEncoder(cfg, rngs=nnx.Rngs(0))
  assert len(enc(jnp.zeros((1, 32, 32, 3)))) == 2
