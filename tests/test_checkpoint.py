"""Orbax checkpoints: restore onto another mesh, size ~ trainable, corrupt fallback, refusal."""

import logging
import os

import jax
import numpy as np
import pytest

from feallm_jax import sharding
from feallm_jax.data import pipeline
from feallm_jax.models import feallm
from feallm_jax.train import checkpoint as ckpt_lib
from feallm_jax.train import step as step_lib
from feallm_jax.train import train_and_evaluate
from tests.test_train_step import small_config


def _trainer(config, mesh):
  model = feallm.build_model(config, mesh)
  return step_lib.Trainer(config, model, mesh, loss_fn=feallm.loss_fn,
                          trainable=feallm.trainable_filter(config))


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Two steps on a data=4 mesh, saved at step 2 (with the Grain iterator state)."""
  config = small_config(str(tmp_path_factory.mktemp("data")))
  workdir = str(tmp_path_factory.mktemp("work"))
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
  tr = _trainer(config, mesh)
  it = pipeline.train_iterator(config)
  state = tr.initial_state()
  for _ in range(2):
    state, _ = tr.step(state, tr.put_batch(next(it)))
  ck = ckpt_lib.Checkpointer(workdir, config, base_fingerprint="fp-A")
  ck.save(2, state, it)
  ck.close()
  nxt = next(it)
  state, m = tr.step(state, tr.put_batch(nxt))
  return dict(config=config, workdir=workdir, tr=tr, loss3=float(m["loss"]), batch3=nxt,
              state3=state)


def test_restore_on_another_mesh_gives_the_same_next_loss(run):
  config = run["config"]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[4:8])
  tr = _trainer(config, mesh)
  it = pipeline.train_iterator(config)
  ck = ckpt_lib.Checkpointer(run["workdir"], config, base_fingerprint="fp-A")
  state, step = ck.restore(tr.abstract_state(), it)
  ck.close()
  assert step == 2 and int(state.step) == 2
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.mesh.shape == mesh.shape            # laid out on the new mesh
  batch = next(it)                                         # the Grain state came back too
  for k in batch:
    np.testing.assert_array_equal(batch[k], run["batch3"][k])
  state, m = tr.step(state, tr.put_batch(batch))
  np.testing.assert_allclose(float(m["loss"]), run["loss3"], rtol=1e-5)


def test_checkpoint_size_scales_with_trainable_weights(run):
  tr = run["tr"]
  trainable = sum(x.nbytes for x in jax.tree.leaves(run["state3"].params))
  frozen = sum(x.nbytes for x in jax.tree.leaves(tr.frozen))
  size = _dir_bytes(os.path.join(run["workdir"], "checkpoints", "2"))
  assert frozen > 3 * trainable
  # What the checkpoint holds: params + Adam mu/nu + a few counters, never the frozen base.
  # (Counted from the restored tree: Orbax's on-disk overhead varies from run to run.)
  ck = ckpt_lib.Checkpointer(run["workdir"], run["config"], base_fingerprint="fp-A")
  restored, _ = ck.restore(tr.abstract_state(), pipeline.train_iterator(run["config"]))
  ck.close()
  payload = sum(x.nbytes for x in jax.tree.leaves(restored))
  assert 3 * trainable <= payload < 3 * trainable + 4096, (payload, trainable)
  assert size < frozen, (size, frozen)


def test_corrupt_latest_falls_back_to_previous(run, tmp_path, caplog):
  config, tr = run["config"], run["tr"]
  workdir = str(tmp_path)
  ck = ckpt_lib.Checkpointer(workdir, config, base_fingerprint="fp-A")
  state = run["state3"]
  ck.save(3, state)
  ck.save(4, state)
  ck.close()
  # Corrupt every array file of step 4 (a torn write on a preempted VM).
  d4 = os.path.join(workdir, "checkpoints", "4", "state")
  n = 0
  for dirpath, _, files in os.walk(d4):
    for f in files:
      if f != "_METADATA" and not f.startswith("_CHECKPOINT"):
        with open(os.path.join(dirpath, f), "wb") as fh:
          fh.write(b"garbage")
        n += 1
  assert n
  ck = ckpt_lib.Checkpointer(workdir, config, base_fingerprint="fp-A")
  with caplog.at_level(logging.WARNING):
    state2, step = ck.restore(tr.abstract_state())
  ck.close()
  assert step == 3
  assert any("falling back" in r.message or "previous" in r.message for r in caplog.records)
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "4"))   # kept, not deleted
  for a, b in zip(jax.tree.leaves(state2.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_config_or_base_is_refused_before_writing(run):
  config, workdir = run["config"], run["workdir"]
  before = sorted(os.listdir(workdir))
  ckpt_dir_before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  other = config.copy_and_resolve_references()
  other.model.llm.num_layers = 3
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="num_layers"):
    train_and_evaluate(other, workdir)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="fingerprint"):
    ckpt_lib.check_workdir(config, workdir, base_fingerprint="fp-B")
  assert ckpt_lib.check_workdir(config, workdir, base_fingerprint="fp-A") == 2
  # The cheap first check (architecture only, before the base is known) passes a resume.
  assert ckpt_lib.check_workdir(config, workdir) == 2
  assert sorted(os.listdir(workdir)) == before                 # no metrics/tb files created
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ckpt_dir_before
  # Runtime-only keys (remat, compute dtype) may change on resume.
  ok = config.copy_and_resolve_references()
  ok.model.remat = True
  assert ckpt_lib.check_workdir(ok, workdir, base_fingerprint="fp-A") == 2


def test_relative_workdir_round_trips(run, tmp_path, monkeypatch):
  """`--workdir=runs/x` (relative, as the README shows) saves and restores."""
  monkeypatch.chdir(tmp_path)
  ck = ckpt_lib.Checkpointer("runs/rel", run["config"], base_fingerprint="fp-A")
  ck.save(3, run["state3"], pipeline.train_iterator(run["config"]))
  ck.close()
  ck = ckpt_lib.Checkpointer("runs/rel", run["config"], base_fingerprint="fp-A")
  state, step = ck.restore(run["tr"].abstract_state(), pipeline.train_iterator(run["config"]))
  ck.close()
  assert step == 3 and str(ck.directory).startswith(str(tmp_path))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(run["state3"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
