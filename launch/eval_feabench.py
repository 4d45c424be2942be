"""Evaluate a trained FEALLM on FEABench suites.

  python launch/eval_feabench.py --config=configs/tiny_synthetic.py --workdir=runs/x \
      --suites=synthetic_fea,raf_db --mode=generate

Restores the newest checkpoint of --workdir (or --checkpoint: a step number, another run's
workdir, or a checkpoints/<step> directory) and writes results.json, results.md, per-sample
predictions_<suite>.jsonl and confusion_<suite>_<task>.png to its own folder,
<workdir>/eval/step_<N>_<mode>_<suites>_n<samples>_<key> (key: a hash of the settings that change
the numbers, recorded in results.json), or to --out_dir. Re-running the same evaluation replaces
its own folder (a log line says so); a folder holding any other evaluation is never touched.
Every evaluation is appended to <workdir>/eval/index.jsonl (see launch/compare_runs.py). Any
config value can be overridden, e.g. ``--config.eval.max_new_tokens=64``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from feallm_jax import distributed as _distributed

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=False)
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("checkpoint", "", "Step, run workdir or checkpoints/<step> dir ('' = latest).")
flags.DEFINE_string("suites", "", "Comma-separated suites ('' = config.eval.suites).")
flags.DEFINE_enum("mode", None, ["generate", "score"], "Default: config.eval.mode.")
flags.DEFINE_string("out_dir", "", "Where outputs go ('' = <workdir>/eval/step_<N>_<mode>_..._<key>).")
flags.DEFINE_integer("num_samples", None, "Records per suite (0 = all; default config.eval).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache dir; 'off' disables "
                    "it ('' = $FEALLM_COMPILE_CACHE, else ~/.cache/feallm_jax/jax).")
flags.mark_flags_as_required(["config", "workdir"])
_distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax import compile_cache, console
  console.setup()   # --verbosity=0 shows every library's INFO lines
  config = FLAGS.config
  try:   # before any other jax call touches the backends
    _distributed.initialize(config, FLAGS)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  compile_cache.enable(FLAGS.compile_cache, config)
  if FLAGS.num_samples is not None:
    config.eval.num_samples = FLAGS.num_samples
  from feallm_jax.eval import feabench
  try:
    suites = feabench.resolve_suites(FLAGS.suites or None, config)
    results = feabench.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint or None,
                                suites=[s.name for s in suites], mode=FLAGS.mode,
                                out_dir=FLAGS.out_dir or None, progress=FLAGS.progress)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  files = results.get("files")
  if files is None:        # a multi-process job: process 0 writes and prints the results
    import jax
    print(f"process {jax.process_index()}: evaluated its share; process 0 wrote the results")
    return
  from feallm_jax import paths
  print(paths.path(files["results_md"]).read_text())
  print(f"wrote {files['results_json']}")
  if "index" in files:
    print(f"indexed in {files['index']}")


if __name__ == "__main__":
  app.run(main)
