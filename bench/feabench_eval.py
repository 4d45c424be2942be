"""FEABench evaluation speed, end to end: one suite answered in generate (or score) mode.

  python bench/feabench_eval.py --config=configs/tiny_synthetic.py --workdir=RUN \
      [--suite=synthetic_fea --mode=generate --num_samples=200 --runs=3]

Restores RUN's newest checkpoint once, then answers the suite ``--runs + 1`` times with
``feabench.predict_suite`` (what ``launch/eval_feabench.py`` runs per suite): the first pass
includes compilation (``cold_seconds``; with the persistent compile cache off, so it is a real
cold start), the others are timed warm (median, all listed). Each pass is split into the time
inside ``generate.visual_tokens`` / ``generate`` / ``score_candidates`` (``model_seconds``: the
compiled programs plus their per-call Python) and the rest (data pipeline, tokenizer, parsing).
Also printed: prompts answered and ``answers_sha256``, a digest of every answer sorted by (id, task)
(independent of the order rows are batched in), so two code versions can be checked for
identical greedy answers. Load average before/after. Prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/*.py of the run.", lock_config=False)
flags.DEFINE_string("workdir", None, "A training run's workdir (newest checkpoint is used).")
flags.DEFINE_string("suite", "synthetic_fea", "FEABench suite.")
flags.DEFINE_enum("mode", "generate", ["generate", "score"], "Evaluation mode.")
flags.DEFINE_integer("num_samples", 200, "Records per task (the quickstart uses 200).")
flags.DEFINE_integer("runs", 3, "Warm passes after the cold one.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _Timed:
  """Wraps a module function, accumulating its wall time (results are materialized inside)."""

  def __init__(self, module, name: str):
    self.module, self.name, self.fn, self.seconds, self.calls = module, name, getattr(module,
                                                                                     name), 0.0, 0
    setattr(module, name, self)

  def __call__(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
      return self.fn(*args, **kwargs)
    finally:
      self.seconds += time.perf_counter() - t0
      self.calls += 1

  def reset(self) -> None:
    self.seconds, self.calls = 0.0, 0


def main(argv):
  del argv
  import jax
  jax.config.update("jax_enable_compilation_cache", False)   # a real cold start
  from feallm_jax import preflight
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.eval import feabench
  from feallm_jax.eval import generate as gen
  config = preflight.resolve_backbones(FLAGS.config)
  config.eval.num_samples = FLAGS.num_samples
  (suite,) = feabench.resolve_suites(FLAGS.suite, config)
  model, step = feabench.load_model(config, FLAGS.workdir)
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  e = config.eval
  sampling = feabench.sampling_config(config, tok)
  timers = [_Timed(gen, "visual_tokens"), _Timed(gen, "generate"), _Timed(gen, "score_candidates")]
  passes = []
  digest = None
  load = [os.getloadavg()[0]]
  for i in range(FLAGS.runs + 1):
    for t in timers:
      t.reset()
    t0 = time.perf_counter()
    records = feabench.predict_suite(model, config, suite, FLAGS.mode, tok, sampling,
                                     progress=False)
    wall = time.perf_counter() - t0
    answers = json.dumps(sorted((str(r["id"]), str(r["task"]), r.get("prediction"),
                                 r.get("emotion_pred")) for r in records))
    d = hashlib.sha256(answers.encode()).hexdigest()
    if digest is not None and d != digest:
      raise AssertionError("answers changed between passes: generation is not deterministic")
    digest = d
    passes.append(dict(seconds=wall, model_seconds=sum(t.seconds for t in timers),
                       model_calls=sum(t.calls for t in timers)))
  load.append(os.getloadavg()[0])
  warm = passes[1:]
  out = dict(
      suite=suite.name, mode=FLAGS.mode, step=step, num_samples_per_task=FLAGS.num_samples,
      prompts=len(records), batch_size=int(e.get("batch_size", 0) or config.data.eval_batch_size),
      max_new_tokens=int(e.max_new_tokens), jax=jax.__version__,
      devices=f"{jax.device_count()} x {jax.devices()[0].platform}",
      cold_seconds=passes[0]["seconds"], cold_model_seconds=passes[0]["model_seconds"],
      warm_seconds_median=statistics.median(p["seconds"] for p in warm) if warm else None,
      warm_model_seconds_median=(statistics.median(p["model_seconds"] for p in warm)
                                 if warm else None),
      passes=passes, answers_sha256=digest, loadavg_1min_before_after=load)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
