"""`make quickstart`: build synthetic_fea, train tiny FEALLM, evaluate FEABench, print the table.

  python -m launch.quickstart --workdir=runs/quickstart
  python -m launch.quickstart --workdir=runs/ablation \
      --config.model.local_clues=False --config.model.projector=mlp

Rerunning resumes training from the workdir's latest checkpoint (a finished run is re-evaluated).
The same three calls (`builders.build`, `train_and_evaluate`, `report.markdown`) are what the
Colab notebook runs.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "tiny_synthetic.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/quickstart", "Checkpoints, metrics and results go here.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  t0 = time.time()
  from feallm_jax.data import builders
  summary = builders.build(config.data.dataset, config.data.data_dir,
                           config=config.data.builder_config)
  print(f"[quickstart] data: {summary['name']}/{summary['config']} "
        f"{summary['splits']} ({'reused' if summary['reused'] else 'built'}, "
        f"{summary['seconds']} s)", flush=True)

  from feallm_jax.train import train_and_evaluate
  from feallm_jax.eval import report
  with config.unlocked():
    config.train.final_eval = True
  result = train_and_evaluate(config, FLAGS.workdir)
  if result.get("preempted"):
    print("[quickstart] stopped by SIGTERM; rerun the same command to resume.")
    return 1
  results = result.get("eval")
  if not results:
    raise SystemExit("quickstart: training finished but produced no evaluation results")
  print(report.markdown(results))
  print(f"[quickstart] done in {time.time() - t0:.0f} s; outputs under "
        f"{os.path.abspath(FLAGS.workdir)}", flush=True)
  logging.info("metrics: %s", result.get("metrics"))
  return 0


if __name__ == "__main__":
  app.run(main)
