"""Compile FEALLM for a TPU slice ahead of time, on any machine (libtpu, no TPU needed).

  python launch/aot_compile.py --config=configs/llava7b_lora.py --topology=v5e-8 \
      [--config.mesh.fsdp=8 --config.data.batch_size=128 ...] [--programs=train,generate] \
      [--json_out=aot_v5e8.json]

Builds the model abstractly (nothing is allocated), compiles the exact train step training runs
(``Trainer.jitted``: same shardings and donation) and evaluation's generation, prefill and decode
step, and prints per device: parameter, optimizer-state, frozen, batch, temporary and total
bytes against the chip's usable HBM, compiled vs analytic model FLOPs and their ratio, and a
roofline step time / MFU bound from ``feallm_jax/chips.py``. Exits 1, naming the largest
buffers, when a program does not fit. ``--topology`` takes an accelerator type (v5e-8, v4-32,
v5p-8, v6e-8, ...) or a raw topology (v5e:2x4). Needs ``pip install -e '.[tpu]'``.
"""

import json
import sys

from feallm_jax import aot  # before anything imports jax: libtpu flags must be set first

aot.init_libtpu()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("topology", None, "Accelerator type (v5e-8, v4-32, v5p-8, v6e-8) or a raw "
                    "TPU topology such as v5e:2x4.")
flags.DEFINE_list("programs", list(aot.PROGRAMS), f"Which of {aot.PROGRAMS} to compile.")
flags.DEFINE_string("json_out", "", "Also write the report as JSON to this file.")
flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's optimized HLO here.")
flags.DEFINE_integer("top", 8, "How many of the largest buffers to name when it does not fit.")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax import console
  console.setup()
  report = aot.run(FLAGS.config, FLAGS.topology, programs=FLAGS.programs, top=FLAGS.top,
                   hlo_dir=FLAGS.hlo_dir)
  print(aot.format_report(report))
  text = json.dumps(report, indent=1, default=str)
  print(json.dumps(report, default=str))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      f.write(text + "\n")
  if not report["fits"]:
    bad = [n for n, p in report["programs"].items() if not p["fits"]]
    print(f"DOES NOT FIT on {report['topology']}: {', '.join(bad)} (largest buffers above); "
          "change the recipe: --config.mesh.fsdp, --config.optim.accum_steps, "
          "--config.model.remat, --config.model.attention, --config.eval.batch_size",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
