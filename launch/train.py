"""Train FEALLM: ``python launch/train.py --config=configs/tiny_synthetic.py --workdir=runs/x``.

Any config value can be overridden, e.g. ``--config.optim.lr_proj=3e-4``. Rerunning the same
command resumes from the newest checkpoint in the workdir. Multi-process launches (TPU pods,
multi-host GPU) set ``--config.distributed=True`` so every process joins the same job.

The terminal shows the progress bar, the run's own messages and warnings; ``--verbosity=0``
adds every library's INFO lines (Orbax, tfds, jax). ``--compile_cache=DIR|off`` sets JAX's
persistent compilation cache (default: ``~/.cache/feallm_jax/jax``). Everything that can be
checked before the first step is (``feallm_jax/preflight.py``): a problem exits with code 2
and names the flag to change.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from feallm_jax import distributed as _distributed

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache dir; 'off' disables "
                    "it ('' = $FEALLM_COMPILE_CACHE, else ~/.cache/feallm_jax/jax).")
flags.mark_flags_as_required(["config", "workdir"])
_distributed.define_flags()
FLAGS = flags.FLAGS
log = logging.getLogger("feallm_jax.launch.train")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax import compile_cache, console
  console.setup()
  config = FLAGS.config
  import jax
  try:   # before any other jax call touches the backends
    _distributed.initialize(config, FLAGS)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cache = compile_cache.enable(FLAGS.compile_cache)
  log.info("JAX %s on %d process(es), %d %s device(s); compilation cache: %s", jax.__version__,
           jax.process_count(), jax.device_count(), jax.devices()[0].device_kind, cache or "off")
  from feallm_jax.preflight import PreflightError
  from feallm_jax.train import train_and_evaluate
  try:
    summary = train_and_evaluate(config, FLAGS.workdir)
  except PreflightError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary.pop("state", None)
  if summary.get("preempted"):
    log.warning("stopped by SIGTERM at step %d; rerun to resume", summary["final_step"])
  else:
    m = summary.get("metrics") or {}
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "accuracy") if k in m)
    log.info("finished at step %d%s; outputs in %s", summary["final_step"],
             f" ({shown})" if shown else "", summary["workdir"])


if __name__ == "__main__":
  app.run(main)
