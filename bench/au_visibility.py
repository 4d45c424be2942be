"""How visible is each AU in the synthetic pixels? A supervised CNN's per-AU F1 on the test pool.

  python -m bench.au_visibility --seeds=5 --steps=1000

Not FEALLM and not a recipe: a small conv net (4 stride-2 3x3 convs, 32-128 channels, GroupNorm,
one hidden layer) trained directly on the emotion and AU labels of train-pool faces of seeds
1..N (stage 0's faces, never the instruction set's seed 0), scored on the identity-disjoint test
pool. It bounds from below what any model can read from the 128-px images, so a low F1 of the
product on one AU is a learning problem, not missing pixels. Prints one JSON line per
evaluation. Measured 2026-12-05 (24,000 faces, batch 64, loaded 2-core machine): step 500 FER
0.983, AU mean F1 0.902 (AU10 0.88, AU17 0.93, AU24 0.00); step 1000 FER 0.990, AU mean F1
0.959 (AU10 0.92, AU17 0.97, AU24 0.62).
"""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from feallm_jax.data import facs, synthetic
from feallm_jax.eval import metrics as metrics_lib
from feallm_jax.pretrain import faces, stage0

flags.DEFINE_integer("seeds", 5, "Train pools 1..N of 4,800 faces each.")
flags.DEFINE_integer("steps", 1000, "Training steps of 64 faces.")
flags.DEFINE_integer("eval_every", 500, "Score the test pool every this many steps.")
flags.DEFINE_integer("test_faces", 600, "Test-pool faces scored.")
flags.DEFINE_string("cache", "", "Optional .npz to memoize the rendered faces.")
FLAGS = flags.FLAGS


class CNN(nnx.Module):
  def __init__(self, n_out: int, rngs: nnx.Rngs):
    ch = (3, 32, 64, 96, 128)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=(2, 2), rngs=rngs)
                           for a, b in zip(ch, ch[1:])])
    self.norms = nnx.List([nnx.GroupNorm(b, num_groups=8, rngs=rngs) for b in ch[1:]])
    self.fc = nnx.Linear(8 * 8 * ch[-1], 256, rngs=rngs)
    self.out = nnx.Linear(256, n_out, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.gelu(norm(conv(x)))
    return self.out(jax.nn.gelu(self.fc(x.reshape(x.shape[0], -1))))


def main(_):
  seeds = tuple(range(1, FLAGS.seeds + 1))
  data = (faces.cached(FLAGS.cache, seeds, 4800, 128) if FLAGS.cache
          else faces.render(seeds, 4800, 128))
  test = stage0._test_faces(FLAGS.test_faces, 128)
  scored = synthetic.occurring_aus(facs.RAF_DB)
  cols = [facs.au_index(a) for a in scored]
  n_emo = len(facs.EMOTIONS)
  norm = lambda im: im.astype(np.float32) / 127.5 - 1.0  # noqa: E731
  model = CNN(n_emo + len(cols), nnx.Rngs(0))
  warmup = min(100, FLAGS.steps // 2)
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, max(warmup, 1), max(FLAGS.steps, warmup + 1))
  opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.01), wrt=nnx.Param)

  def loss_fn(m, x, e, a):
    z = m(x)
    return (optax.softmax_cross_entropy_with_integer_labels(z[:, :n_emo], e).mean()
            + optax.sigmoid_binary_cross_entropy(z[:, n_emo:], a).mean() * len(cols) / 4)

  @nnx.jit
  def step(m, o, x, e, a):
    loss, g = nnx.value_and_grad(loss_fn)(m, x, e, a)
    o.update(m, g)
    return loss

  predict = nnx.jit(lambda m, x: m(x))
  rng, n, t0 = np.random.default_rng(0), len(data["emotion"]), time.perf_counter()
  for i in range(1, FLAGS.steps + 1):
    idx = rng.integers(0, n, 64)
    x = norm(data["image"][idx])
    flip = rng.random(64) < 0.5
    x[flip] = x[flip, :, ::-1]
    loss = step(model, opt, jnp.asarray(x), jnp.asarray(data["emotion"][idx]),
                jnp.asarray(data["au_present"][idx][:, cols], jnp.float32))
    if i % FLAGS.eval_every == 0 or i == FLAGS.steps:
      z = np.concatenate([np.asarray(predict(model, jnp.asarray(norm(test["image"][j:j + 100]))))
                          for j in range(0, len(test["image"]), 100)])
      au = metrics_lib.au_f1(test["au_present"][:, cols], (z[:, n_emo:] > 0).astype(int), scored)
      print(json.dumps(dict(
          step=i, loss=round(float(loss), 4), seconds=round(time.perf_counter() - t0, 1),
          train_faces=n, fer_accuracy=round(float((z[:, :n_emo].argmax(1) == test["emotion"]).mean()), 4),
          au_mean_f1=round(au["mean_f1"], 4),
          au_f1={k: round(v, 3) for k, v in au["per_au_f1"].items()})), flush=True)


if __name__ == "__main__":
  app.run(main)
