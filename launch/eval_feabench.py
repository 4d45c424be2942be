"""Evaluate a trained FEALLM on FEABench suites.

  python launch/eval_feabench.py --config=configs/tiny_synthetic.py --workdir=runs/x \
      --suites=synthetic_fea,raf_db --mode=generate

Restores the newest checkpoint of --workdir (or --checkpoint: a step number, another run's
workdir, or a checkpoints/<step> directory) and writes results.json, results.md, per-sample
predictions_<suite>.jsonl and confusion_<suite>_<task>.png to --out_dir (default
<workdir>/eval/step_<step>). Any config value can be overridden, e.g.
``--config.eval.max_new_tokens=64``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("checkpoint", "", "Step, run workdir or checkpoints/<step> dir ('' = latest).")
flags.DEFINE_string("suites", "", "Comma-separated suites ('' = config.eval.suites).")
flags.DEFINE_enum("mode", None, ["generate", "score"], "Default: config.eval.mode.")
flags.DEFINE_string("out_dir", "", "Where outputs go ('' = <workdir>/eval/step_<step>).")
flags.DEFINE_integer("num_samples", None, "Records per suite (0 = all; default config.eval).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  import jax
  if config.get("distributed", False):
    jax.distributed.initialize()
  if FLAGS.num_samples is not None:
    config.eval.num_samples = FLAGS.num_samples
  from feallm_jax.eval import feabench
  try:
    suites = feabench.resolve_suites(FLAGS.suites or None, config)
    results = feabench.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint or None,
                                suites=[s.name for s in suites], mode=FLAGS.mode,
                                out_dir=FLAGS.out_dir or None, progress=FLAGS.progress)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  files = results["files"]
  from feallm_jax import paths
  print(paths.path(files["results_md"]).read_text())
  print(f"wrote {files['results_json']}")


if __name__ == "__main__":
  app.run(main)
