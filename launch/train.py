"""Train FEALLM: ``python launch/train.py --config=configs/tiny_synthetic.py --workdir=runs/x``.

Any config value can be overridden, e.g. ``--config.optim.lr_proj=3e-4``. Rerunning the same
command resumes from the newest checkpoint in the workdir. Multi-process launches (TPU pods,
multi-host GPU) set ``--config.distributed=True`` so every process joins the same job.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  import jax
  if config.get("distributed", False):
    jax.distributed.initialize()   # before any other jax call touches the backends
  logging.info("JAX %s on %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  from feallm_jax.train import train_and_evaluate
  summary = train_and_evaluate(config, FLAGS.workdir)
  summary.pop("state", None)
  if summary.get("preempted"):
    logging.warning("stopped by SIGTERM at step %d; rerun to resume", summary["final_step"])
  else:
    logging.info("finished at step %d: %s", summary["final_step"], summary.get("metrics"))


if __name__ == "__main__":
  app.run(main)
