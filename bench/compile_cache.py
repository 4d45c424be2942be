"""What JAX's persistent compilation cache saves: step-1 time of a rerun and of a resume.

  python -m bench.compile_cache [--config=configs/tiny_synthetic.py] [--steps=2] \
      [--override=--config.model.base_checkpoint=] [--override=...]

Runs ``python -m launch.train`` from the repository root as a user would, each in a fresh
process (nothing shared but the cache dir), with ``log_every=1`` so ``metrics.jsonl``'s first
record is the first step alone (its time includes compiling the train step):

1. ``cold``: a fresh workdir and an empty cache dir (everything compiles and is stored);
2. ``rerun``: the same command in another fresh workdir (the cache is warm);
3. ``resume``: the first workdir continued for ``--steps`` more steps (restores, then steps);
4. ``no_cache``: a fresh workdir with ``--compile_cache=off`` (the old behaviour, for spread);
5. ``resume_no_cache``: that workdir continued with the cache off (the resume baseline).

Prints one JSON line: per run the first step's time, the whole process's wall time and CPU
time (user + system of the process and its children: on a shared machine the wall times move
with the other load, the CPU seconds much less), and the cache's size. Shapes are small
(``--config.data.builder_config=small``, batch 8) so it runs in minutes on a CPU; timings move
with machine load, so compare runs of one invocation.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# The repository root, where configs/ and launch/ live (used as a file path only).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", os.path.join(ROOT, "configs", "tiny_synthetic.py"), "Config file.")
flags.DEFINE_integer("steps", 2, "Steps per run (the resume adds as many again).")
flags.DEFINE_string("data_dir", os.path.join(ROOT, "runs", "data"), "tfds data_dir.")
flags.DEFINE_string("workdir", "", "Scratch dir ('' = a temporary dir, removed afterwards).")
flags.DEFINE_multi_string("override", [], "Extra --config.* flags for every run.")
FLAGS = flags.FLAGS


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _train(workdir: str, cache: str, steps: int, new_steps: int | None = None) -> dict:
  """One launch/train.py run to ``steps``; times its first new step (``new_steps`` of them)."""
  cmd = [sys.executable, "-m", "launch.train", f"--config={FLAGS.config}",
         f"--workdir={workdir}", f"--compile_cache={cache}",
         f"--config.data.data_dir={FLAGS.data_dir}", "--config.data.builder_config=small",
         "--config.data.batch_size=8", f"--config.train.num_steps={steps}",
         "--config.train.log_every=1", f"--config.train.save_every={max(steps, 1)}",
         "--config.train.progress=False", "--config.eval.suites=()", *FLAGS.override]
  t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
  if r.returncode:
    raise SystemExit(f"train failed ({r.returncode}):\n{r.stderr[-4000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [x for x in rows if x.get("kind") == "train"]
  new = new_steps or steps
  first = rows[-new] if len(rows) >= new else rows[0]
  return dict(first_step=first["step"], first_step_s=round(first["step_time"], 2),
              later_step_s=round(rows[-1]["step_time"], 2), wall_s=round(wall, 1),
              cpu_s=round(cpu, 1))


def main(argv):
  del argv
  scratch = FLAGS.workdir or tempfile.mkdtemp(prefix="feallm_cc_")
  os.makedirs(scratch, exist_ok=True)
  cache = os.path.join(scratch, "jax_cache")
  n = FLAGS.steps
  try:
    out = {"bench": "compile_cache", "config": os.path.basename(FLAGS.config), "steps": n,
           "cpus": os.cpu_count(), "loadavg_before": [round(x, 1) for x in os.getloadavg()]}
    out["cold"] = _train(os.path.join(scratch, "a"), cache, n)
    out["cache_mb"] = round(_dir_bytes(cache) / 2**20, 1)
    out["rerun"] = _train(os.path.join(scratch, "b"), cache, n)
    out["resume"] = _train(os.path.join(scratch, "a"), cache, 2 * n, n)
    out["no_cache"] = _train(os.path.join(scratch, "c"), "off", n)
    out["resume_no_cache"] = _train(os.path.join(scratch, "c"), "off", 2 * n, n)
    out["loadavg_after"] = [round(x, 1) for x in os.getloadavg()]
    out["rerun_step1_speedup"] = round(out["no_cache"]["first_step_s"]
                                       / max(out["rerun"]["first_step_s"], 1e-9), 2)
    out["resume_step1_speedup"] = round(out["resume_no_cache"]["first_step_s"]
                                        / max(out["resume"]["first_step_s"], 1e-9), 2)
    print(json.dumps(out))
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
