"""Adapter alignment (LLaVA's feature-alignment stage): train FEALLM's Local Clue Aggregator and
projector on captioned stage-0 faces, vision tower and LLM frozen, and write the adapter that
stage 1 starts from (``model.init_adapter``).

  python -m launch.align_adapter --config=configs/tiny_synthetic.py --out=runs/adapter_tiny

The adapter shipped in feallm_jax/assets/adapter_tiny was made by exactly this command; its
adapter.json records the settings, the base checkpoint's fingerprint, losses and timings.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "tiny_synthetic.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Stage-1 config (its model and `align`).",
                                lock_config=True)
flags.DEFINE_string("out", "", "Output adapter dir (empty or absent unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax import console
  console.setup()   # quiet libraries (Orbax, tfds); --verbosity=0 brings their INFO back
  if not FLAGS.out:
    raise app.UsageError("--out is required (the adapter directory to write)")
  out = os.path.abspath(FLAGS.out)
  if os.path.isdir(out) and os.listdir(out) and not FLAGS.overwrite:
    raise app.UsageError(f"--out={out} is not empty; pass --overwrite to replace it")
  c = FLAGS.config
  if not c.model.get("base_checkpoint", ""):
    raise app.UsageError("--config.model.base_checkpoint is empty: alignment needs the "
                         "pretrained towers")
  if "align" not in c:
    raise app.UsageError("the config has no `align` section (see configs/tiny_synthetic.py)")
  from feallm_jax.pretrain import align, faces
  a = c.align
  data = faces.render(tuple(int(s) for s in a.seeds), int(a.faces_per_seed),
                      int(a.render_size), pairs=bool(a.minimal_pairs))
  print(f"[align] rendered {len(data['emotion'])} captioned faces", flush=True)
  rec = align.align_adapter(c, data, out)
  print(json.dumps(dict(out=out, final=rec["history"][-1])))


if __name__ == "__main__":
  app.run(main)
