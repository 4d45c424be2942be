"""Compare evaluated runs side by side (a scaling experiment's table and plots).

  python -m launch.compare_runs --workdirs=runs/a,runs/b,gs://bucket/runs/c \
      [--metric=fer/accuracy,aur/au_mean_f1] [--out=compare.md]

Reads each workdir's eval/index.jsonl (every evaluation appends a line to it), prints one table of
the chosen metrics across runs, steps and modes, and writes it to --out with <out>_steps.png
(metric against training step, one line per run), <out>_scaling.png (metric against trainable
parameters and training FLOPs, one point per run) and <out>.json (the same numbers). A metric is
<task>/<metric> (every suite that has it) or <suite>/<task>/<metric>; see
feallm_jax/eval/compare.py.
"""

import sys

from absl import app, flags

flags.DEFINE_list("workdirs", None, "Comma-separated run workdirs (local or gs://).")
flags.DEFINE_list("metric", ["fer/accuracy", "aur/au_mean_f1"],
                  "Comma-separated <task>/<metric> or <suite>/<task>/<metric>.")
flags.DEFINE_string("out", "compare.md", "The table (markdown); the PNGs and JSON go next to it.")
flags.mark_flags_as_required(["workdirs"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from feallm_jax.eval import compare
  try:
    result = compare.compare(FLAGS.workdirs, FLAGS.metric, FLAGS.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(result["table"])
  for req, names in result["missing"].items():
    print(f"note: {req} is missing in: {', '.join(names)}")
  for kind, path in result["files"].items():
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
