"""`make quickstart`: build synthetic_fea, run stage 1 (FEALLM instruction tuning) on the shipped
pretrained tiny backbones (stage 0) from the shipped aligned adapter (stage 0.5), evaluate
FEABench, print the tables and the floors.

  python -m launch.quickstart --workdir=runs/quickstart
  python -m launch.align_adapter --out=runs/adapter_mlp \
      --config.model.local_clues=False --config.model.projector=mlp       # the ablation's stage 0.5
  python -m launch.quickstart --workdir=runs/ablation --config.model.init_adapter=runs/adapter_mlp \
      --config.model.local_clues=False --config.model.projector=mlp
  python -m launch.quickstart --workdir=runs/smoke --smoke      # the whole path in ~2 minutes

Rerunning resumes training from the workdir's latest checkpoint (a finished run is re-evaluated).
The same calls (`builders.build`, `train_and_evaluate`, `feabench.evaluate`, `report.markdown`)
are what the Colab notebook runs.
"""

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "tiny_synthetic.py")
config_flags.DEFINE_config_file("config", _CONFIG, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/quickstart", "Checkpoints, metrics and results go here.")
flags.DEFINE_bool("smoke", False, "A few steps on the 'small' synthetic set: proves the whole path "
                  "(CI runs it from the base install), not the model.")
FLAGS = flags.FLAGS

# The quickstart issue's floors on the identity-disjoint synthetic test split.
FLOORS = (
    ("FER accuracy (generate)", ("generate", "fer", "accuracy"), 0.90),
    ("FER accuracy (score, closed-set)", ("score", "fer", "accuracy"), None),
    ("AU mean F1 (aur)", ("generate", "aur", "au_mean_f1"), 0.85),
    ("joint: AU mean F1", ("generate", "joint", "au_mean_f1"), None),
    ("reasoning: emotion accuracy", ("generate", "reasoning", "accuracy"), 0.85),
    ("reasoning: EMFACS consistency", ("generate", "reasoning", "emfacs_consistency"), 0.90),
)


def smoke(config) -> None:
  """Shrinks a run to seconds of compute; the shapes and code paths stay those of the real one."""
  config.data.update(builder_config="small", batch_size=8, eval_batch_size=8)
  config.train.update(num_steps=4, log_every=2, save_every=4)
  config.eval.update(num_samples=4, max_new_tokens=8, batch_size=8)


def floors_table(results: dict) -> str:
  """The headline numbers next to their floors (met / missed)."""
  lines = ["| metric | value | floor |", "|---|---|---|"]
  for name, (mode, task, key), floor in FLOORS:
    value = results.get(mode, {}).get("suites", {}).get("synthetic_fea", {}).get(
        "summary", {}).get(task, {}).get(key)
    shown = f"{value:.3f}" if isinstance(value, float) else "–"
    verdict = "" if floor is None or value is None else (
        f"≥ {floor:.2f} {'met' if value >= floor else 'MISSED'}")
    lines.append(f"| {name} | {shown} | {verdict} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if FLAGS.smoke:
    with config.unlocked():
      smoke(config)
  t0 = time.time()
  from feallm_jax.data import builders
  summary = builders.build(config.data.dataset, config.data.data_dir,
                           config=config.data.builder_config)
  print(f"[quickstart] data: {summary['name']}/{summary['config']} "
        f"{summary['splits']} ({'reused' if summary['reused'] else 'built'}, "
        f"{summary['seconds']} s)", flush=True)

  base = config.model.get("base_checkpoint", "")
  if base:
    from feallm_jax.weights import base_checkpoint
    meta = base_checkpoint.read_meta(base)
    print(f"[quickstart] stage 0: pretrained backbones from {base} (fingerprint "
          f"{meta['fingerprint'][:12]}…; reproduce with launch/pretrain_backbones.py)", flush=True)
  adapter = config.model.get("init_adapter", "")
  if adapter:
    print(f"[quickstart] adapter alignment: LCA + projector start from {adapter} (reproduce with "
          f"launch/align_adapter.py)", flush=True)
  from feallm_jax.train import train_and_evaluate
  from feallm_jax.eval import feabench, report
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
  step = result["final_step"]
  score = feabench.evaluate(config, FLAGS.workdir, checkpoint=step, mode="score", tasks=("fer",))
  print(floors_table({"generate": results, "score": score}))
  print(f"[quickstart] done in {time.time() - t0:.0f} s; outputs under "
        f"{os.path.abspath(FLAGS.workdir)}", flush=True)
  logging.info("metrics: %s", result.get("metrics"))
  return 0


if __name__ == "__main__":
  app.run(main)
