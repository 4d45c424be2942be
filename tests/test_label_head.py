"""The auxiliary label head: its loss against PyTorch's, its place in the model's loss, and that it
trains the adapters (LCA, projector) without touching the answers' path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from feallm_jax.data import facs
from feallm_jax.models import feallm, label_head

from test_feallm import make_batch, one_mesh, tiny_spec  # noqa: F401  (fixture)


def _labels(b, seed=0):
  rng = np.random.default_rng(seed)
  emotion = rng.integers(0, label_head.NUM_EMOTIONS, b).astype(np.int32)
  aus = (rng.random((b, label_head.NUM_AUS)) < 0.3).astype(np.int32)
  return emotion, aus


def test_label_loss_matches_torch_with_missing_labels_masked():
  b = 6
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(b, label_head.NUM_LABELS)).astype(np.float32) * 3
  emotion, aus = _labels(b)
  emotion[1] = -1                       # an AU-only example (DISFA-like)
  aus[2] = -1                           # an emotion-only example (RAF-DB-like)
  aus[3, :5] = -1                       # a partially annotated one
  w = np.array([3, 10, 1, 7, 0, 5], np.float32)   # answer tokens; example 4 is padding
  got = label_head.label_loss(jnp.asarray(logits), jnp.asarray(emotion), jnp.asarray(aus),
                              jnp.asarray(w))
  t = torch.from_numpy(logits.astype(np.float64))
  ce = torch.nn.functional.cross_entropy(t[:, :label_head.NUM_EMOTIONS],
                                         torch.from_numpy(np.maximum(emotion, 0)).long(),
                                         reduction="none") * torch.from_numpy(emotion >= 0)
  bce = torch.nn.functional.binary_cross_entropy_with_logits(
      t[:, label_head.NUM_EMOTIONS:], torch.from_numpy((aus > 0).astype(np.float64)),
      weight=torch.from_numpy((aus >= 0).astype(np.float64)), reduction="none").sum(-1)
  tw = torch.from_numpy(w.astype(np.float64))
  np.testing.assert_allclose(float(got["emotion_loss"]), float((ce * tw).sum() / tw.sum()),
                             rtol=1e-5)
  np.testing.assert_allclose(float(got["au_loss"]), float((bce * tw).sum() / tw.sum()), rtol=1e-5)
  np.testing.assert_allclose(float(got["label_loss"]),
                             float(got["emotion_loss"]) + float(got["au_loss"]), rtol=1e-6)


def test_head_layout_matches_the_label_vocabularies():
  assert label_head.NUM_EMOTIONS == len(facs.EMOTIONS)
  assert label_head.NUM_AUS == len(facs.ALL_AUS)


def test_weight_zero_builds_no_head_and_the_loss_is_the_lm_loss(one_mesh):  # noqa: F811
  spec = tiny_spec()
  model = feallm.build_from_spec(spec, one_mesh, rngs=0)
  assert model.label_head is None
  batch = {k: jnp.asarray(v) for k, v in make_batch(spec).items()}
  emotion, aus = _labels(4)
  batch.update(emotion=jnp.asarray(emotion), au_present=jnp.asarray(aus))
  loss, metrics = feallm.loss_fn(model, batch)
  assert "label_loss" not in metrics and float(loss) == float(metrics["loss"])


def test_label_loss_joins_the_lm_loss_and_trains_the_adapters_only(one_mesh):  # noqa: F811
  spec = tiny_spec(label_loss_weight=0.5)
  with pytest.raises(ValueError, match="label_loss_weight"):
    tiny_spec(label_loss_weight=-1.0)
  model = feallm.build_from_spec(spec, one_mesh, rngs=0)
  batch = {k: jnp.asarray(v) for k, v in make_batch(spec).items()}
  emotion, aus = _labels(4)
  batch.update(emotion=jnp.asarray(emotion), au_present=jnp.asarray(aus))
  loss, m = feallm.loss_fn(model, batch)
  np.testing.assert_allclose(float(loss), float(m["lm_loss"]) + 0.5 * float(m["label_loss"]),
                             rtol=1e-6)
  # A batch without the labels is refused, never trained on with the LM loss alone.
  for key in ("emotion", "au_present"):
    unlabelled = {k: v for k, v in batch.items() if k != key}
    with pytest.raises(ValueError, match=rf"lacks \['{key}'\].*label_loss_weight=0"):
      feallm.loss_fn(model, unlabelled)
  # The head reads the tokens the LLM reads: its gradient reaches the LCA and the projector,
  # and the label head itself trains; the frozen towers get none.
  filt = feallm.trainable_filter(spec)
  graphdef, params, rest = nnx.split(model, filt, ...)

  def label_only(p):
    return feallm.loss_fn(nnx.merge(graphdef, p, rest), batch)[1]["label_loss"]

  grads = jax.grad(label_only)(params)
  norms = {}
  for path, g in nnx.to_flat_state(grads):
    norms[path[0]] = norms.get(path[0], 0.0) + float(jnp.sum(jnp.square(g.get_value())))
  assert norms["label_head"] > 0 and norms["lca"] > 0 and norms["projector"] > 0
  assert norms.get("llm", 0.0) == 0.0      # LoRA sits after the visual tokens: untouched
  assert "vision" not in norms
  # Unlabeled examples contribute nothing: all labels missing -> label loss 0.
  batch.update(emotion=jnp.full((4,), -1, jnp.int32),
               au_present=jnp.full_like(batch["au_present"], -1))
  assert float(feallm.loss_fn(model, batch)[1]["label_loss"]) == 0.0
