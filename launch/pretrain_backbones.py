"""Stage 0: pretrain the tiny backbones and write a base checkpoint (the format import_hf writes).

  python -m launch.pretrain_backbones --config=configs/pretrain_tiny.py --out=runs/base_tiny

The checkpoint shipped in feallm_jax/assets/base_tiny was made by exactly this command; its
stage0.json records the config, losses, timings and linear-probe quality.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "pretrain_tiny.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Stage-0 config file.", lock_config=True)
flags.DEFINE_string("out", "", "Output base checkpoint dir (empty or absent unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
flags.DEFINE_string("reuse_llm_from", "", "A stage-0 output dir whose LLM settings equal this "
                    "config's: copy its text-pretrained LLM instead of training it again.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax import console
  console.setup()   # quiet libraries (Orbax, tfds); --verbosity=0 brings their INFO back
  if not FLAGS.out:
    raise app.UsageError("--out is required (the base checkpoint directory to write)")
  from feallm_jax.pretrain import stage0
  rec = stage0.pretrain_backbones(FLAGS.config, FLAGS.out, overwrite=FLAGS.overwrite,
                                  reuse_llm_from=FLAGS.reuse_llm_from)
  print(json.dumps(dict(out=os.path.abspath(FLAGS.out), fingerprint=rec["fingerprint"],
                        probe=rec["probe"], seconds=rec["seconds"])))


if __name__ == "__main__":
  app.run(main)
