"""Training-pipeline throughput: one JSON line with samples/s after warm-up.

  python bench/data.py --config=configs/tiny_synthetic.py [--steps=40 --warmup=5]
"""
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from feallm_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/tiny_synthetic.py", "Config file.")
flags.DEFINE_integer("steps", 40, "Timed batches.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first (workers start, caches fill).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = FLAGS.config
  ds = pipeline.train_dataset(cfg)
  it = iter(ds)
  for _ in range(FLAGS.warmup):
    b = next(it)
  t0 = time.perf_counter()
  n = 0
  for _ in range(FLAGS.steps):
    b = next(it)
    n += len(b["input_ids"])
  dt = time.perf_counter() - t0
  print(json.dumps({
      "bench": "data", "config": cfg.name, "dataset": cfg.data.dataset,
      "samples_per_s": round(n / dt, 1), "batch_size": int(len(b["input_ids"])),
      "global_batch_size": int(cfg.data.batch_size), "num_workers": int(cfg.data.num_workers),
      "image_size": int(cfg.model.vision.image_size), "max_len": int(cfg.data.max_len),
      "steps": FLAGS.steps, "seconds": round(dt, 2), "cpus": os.cpu_count()}))


if __name__ == "__main__":
  app.run(main)
