"""Converts local HF checkpoints (CLIP vision + LLaMA/Qwen2 LLM) into the base checkpoint that
training starts from (``config.model.base_checkpoint``).

  python launch/import_hf.py --vision=/ckpt/clip-vit-large-patch14-336 \\
      --llm=/ckpt/vicuna-7b-v1.5 --out=/ckpt/feallm_base

Weights are placed straight into their shards on an fsdp mesh over every device (no device ever
holds a whole tower), then written with Orbax; see ``feallm_jax/weights/base_checkpoint.py``.
"""

from __future__ import annotations

from absl import app, flags, logging

flags.DEFINE_string("vision", "", "Local HF CLIPVisionModel or CLIPModel dir ('' = no vision).")
flags.DEFINE_string("llm", "", "Local HF LLaMA / Qwen2 dir with tokenizer files ('' = no LLM).")
flags.DEFINE_string("out", "", "Output dir (must be empty or absent unless --overwrite).")
flags.DEFINE_string("dtype", "float32", "Storage dtype of the saved weights.")
flags.DEFINE_integer("fsdp", -1, "fsdp mesh size for loading (-1 = all devices).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
FLAGS = flags.FLAGS


def import_hf(vision_dir: str, llm_dir: str, out: str, *, dtype: str = "float32",
              fsdp: int = -1, overwrite: bool = False) -> str:
  """Importable core of the launcher; returns the checkpoint fingerprint."""
  from feallm_jax import sharding
  from feallm_jax.weights import base_checkpoint, hf

  if not out:
    raise ValueError("--out is required")
  if not vision_dir and not llm_dir:
    raise ValueError("pass --vision and/or --llm")
  from feallm_jax import paths
  if paths.path(out).is_dir() and any(paths.path(out).iterdir()) and not overwrite:
    raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
  mesh = sharding.make_mesh({"data": 1, "fsdp": fsdp, "tensor": 1})
  with sharding.mesh_rules(mesh):
    vision = hf.load_vision(vision_dir, dtype=dtype) if vision_dir else None
    llm = hf.load_llm(llm_dir, dtype=dtype) if llm_dir else None
    fp = base_checkpoint.save(
        out, vision, llm,
        vision_hf_config=hf.read_config(vision_dir) if vision_dir else None,
        llm_hf_config=hf.read_config(llm_dir) if llm_dir else None,
        tokenizer_dir=llm_dir or None, overwrite=overwrite)
  logging.info("base checkpoint written to %s (fingerprint %s)", out, fp)
  return fp


def main(argv):
  del argv
  from feallm_jax import console
  console.setup()
  fp = import_hf(FLAGS.vision, FLAGS.llm, FLAGS.out, dtype=FLAGS.dtype, fsdp=FLAGS.fsdp,
                 overwrite=FLAGS.overwrite)
  print(f"wrote {FLAGS.out} fingerprint={fp}")


if __name__ == "__main__":
  app.run(main)
