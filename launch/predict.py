"""Ask a trained FEALLM about one photo.

  python launch/predict.py --workdir=runs/x --image=photo.jpg [--prompt="..."] [--explain]

Finds the face (OpenCV Haar cascades: frontal, then profile either way, then a 2x upscale of a
small image; pass --aligned when the image already is a tight face crop), builds the 16 facial
regions on the face crop, and prints the generated answer. --explain also ranks the regions by
the attention the projector's visual tokens pay to them (falling back to the Local Clue
Aggregator's region self-attention) and saves an overlay PNG to --out (default
<workdir>/predictions/<image stem>_regions.png), printing its path.
The config is read from the checkpoint unless --config is given. A file that is not an image,
or a photo with no face, exits non-zero with a message before any model is loaded.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Optional configs/*.py (default: the run's).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("checkpoint", "", "Step, run workdir or checkpoints/<step> ('' = latest).")
flags.DEFINE_string("image", None, "Photo to analyse.")
flags.DEFINE_string("prompt", "What emotion does this person feel? Explain which action units "
                    "indicate it.", "The question to ask.")
flags.DEFINE_bool("aligned", False, "The image is already a tight, aligned face crop.")
flags.DEFINE_bool("explain", False, "Rank facial regions by attention and save an overlay PNG.")
flags.DEFINE_string("out", "", "Overlay PNG path for --explain ('' = "
                    "<workdir>/predictions/<image stem>_regions.png).")
flags.DEFINE_alias("explain_out", "out")
flags.DEFINE_integer("max_new_tokens", 0, "0 = config.eval.max_new_tokens.")
flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache dir; 'off' disables "
                    "it ('' = $FEALLM_COMPILE_CACHE, else ~/.cache/feallm_jax/jax).")
flags.mark_flags_as_required(["workdir", "image"])
FLAGS = flags.FLAGS

EXIT_NOT_IMAGE, EXIT_NO_FACE, EXIT_NO_MODEL = 2, 3, 4


def fail(code: int, message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def load_image(path: str):
  """RGB uint8 array, or a clean exit naming the problem."""
  import numpy as np
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    fail(EXIT_NOT_IMAGE, f"{path}: no such file")
  try:
    with Image.open(path) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    fail(EXIT_NOT_IMAGE, f"{path}: not a readable image ({e})")


def face_crop(rgb, path: str, aligned: bool):
  """The face crop the model sees (the whole image when --aligned)."""
  from feallm_jax.data import regions
  if aligned:
    return rgb
  try:
    box, how = regions.find_face(rgb, path)
  except regions.NoFaceError as e:
    fail(EXIT_NO_FACE, f"{e}. If the image is already a cropped face, pass --aligned.")
  if how != "frontal cascade":
    print(f"(face found by the {how})", file=sys.stderr)
  return regions.crop_face(rgb, box)


def run_config(workdir: str, checkpoint: str):
  """The config stored with the run's checkpoint."""
  import ml_collections
  from feallm_jax.eval import feabench
  from feallm_jax.train import checkpoint as ckpt_lib
  from feallm_jax import paths
  run_dir, step = feabench.resolve_checkpoint(workdir, checkpoint or None)
  if not (paths.path(run_dir) / "checkpoints").exists():
    fail(EXIT_NO_MODEL, f"{run_dir}: no checkpoints/ (train first, or pass --workdir of a run)")
  ckpt = ckpt_lib.Checkpointer(run_dir, ml_collections.ConfigDict({"train": {"keep": 1}}),
                               read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      fail(EXIT_NO_MODEL, f"{run_dir}: no checkpoint steps saved")
    return ml_collections.ConfigDict(ckpt.read_config(step if step is not None else steps[-1]))
  finally:
    ckpt.manager.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Input checks first: a bad file fails in a second, before jax or a model is touched.
  rgb = load_image(FLAGS.image)
  face = face_crop(rgb, FLAGS.image, FLAGS.aligned)

  from feallm_jax import compile_cache, console
  console.setup()
  import numpy as np
  import cv2
  config = FLAGS.config if FLAGS.config is not None else run_config(FLAGS.workdir,
                                                                    FLAGS.checkpoint)
  compile_cache.enable(FLAGS.compile_cache, config)
  from feallm_jax import preflight
  try:
    config = preflight.resolve_backbones(config)   # the towers' own image size and patch grid
    problems = preflight.check_eval_settings(config)
    if problems:
      raise preflight.PreflightError(problems)
  except preflight.PreflightError as e:
    fail(EXIT_NO_MODEL, str(e))
  from feallm_jax.data import pipeline, regions, tokenizer as tok_lib
  from feallm_jax.eval import explain, feabench, generate as gen
  h, w = face.shape[:2]
  side = min(h, w)
  face = face[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
  # The evaluation-time image path (no augmentation), so predict sees what FEABench sees.
  views = pipeline.eval_views(config, face, FLAGS.image)
  boxes = views["regions"]
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  conv = [{"from": "human", "value": f"{tok_lib.IMAGE_TOKEN}\n{FLAGS.prompt}"}]
  ids, _, _ = tok_lib.encode_prompt(tok, conv)
  batch = {k: v[None] for k, v in views.items()}
  batch.update(input_ids=ids[None].astype(np.int32),
               attention_mask=np.ones((1, len(ids)), np.int32))
  try:
    model, step = feabench.load_model(config, FLAGS.workdir, FLAGS.checkpoint or None)
  except FileNotFoundError as e:
    fail(EXIT_NO_MODEL, str(e))
  sampling = gen.SamplingConfig(
      max_new_tokens=FLAGS.max_new_tokens or int(config.eval.get("max_new_tokens", 48)),
      eos_ids=feabench.eos_ids(tok), pad_id=int(tok.pad_token_id))
  view = gen.eval_view(model, matmul_dtype=gen.config_matmul_dtype(config))
  tokens, lengths = gen.generate(view, batch, sampling)
  answer = gen.decode_tokens(tok, tokens, lengths, sampling.eos_ids)[0]
  print(answer)
  if FLAGS.explain:
    import jax
    out = model({k: jax.numpy.asarray(v) for k, v in batch.items()}, return_attention=True)
    scores = explain.region_scores(out.get("attention", {}))
    if scores is None:
      print("(this model has no region attention: local clues are off)")
      return
    print("\nregions by attention:")
    for rank, k in enumerate(scores.argsort()[::-1]):
      print(f"  {rank + 1:2d}. {regions.REGION_NAMES[k]:<20s} {scores[k]:.3f}")
    path = explain.overlay_path(FLAGS.workdir, FLAGS.image, FLAGS.out)
    explain.save_overlay(path, cv2.resize(face, (256, 256)), boxes, scores, regions.REGION_NAMES,
                         answer)
    print(f"overlay saved to {path}")


if __name__ == "__main__":
  app.run(main)
