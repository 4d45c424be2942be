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


def _ocdbt(state_dir, **spec):
  import tensorstore as ts
  return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/", **spec}).result()


def _stored_bytes(state_dir) -> dict[str, int]:
  """{key: bytes} of every value the saved checkpoint holds, read through TensorStore's OCDBT
  driver (what a restore reads: array chunks and their zarr metadata).

  Not the folder's size on disk: Orbax's async writes reach OCDBT in as many commits as they
  happen to be batched into (6 to 15 measured for this checkpoint on an idle machine, more under
  load), and every commit writes a new copy of the B-tree index that later commits supersede
  but never delete. The folder measured 0.44 to 0.69 MB idle and 1.65 MB once in the parallel
  suite for the same 0.21 MB of values, so its size says how busy the machine was."""
  kv = _ocdbt(state_dir)
  return {k.decode(): len(kv.read(k).result().value) for k in kv.list().result()}


def _commits(state_dir) -> list[int]:
  """Generation numbers of every OCDBT commit of process 0's store (superseded ones too)."""
  import tensorstore as ts
  base = ts.KvStore.open(f"file://{os.path.join(state_dir, 'ocdbt.process_0')}/").result()
  return [v["generation_number"] for v in ts.ocdbt.dump(base).result()["versions"]]


def _array_path(key: str) -> tuple[str, ...]:
  """'params.llm.layers.0.q.lora_a/0' -> ('params', 'llm', 'layers', '0', 'q', 'lora_a')."""
  return tuple(key.rsplit("/", 1)[0].split("."))


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


def _stored_leaves(state_dir):
  """(path, shape, dtype) of every array the checkpoint holds, read from Orbax's own metadata
  (nothing restored, no target supplied)."""
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  out = []

  def walk(prefix, x):
    if isinstance(x, dict):
      for k, v in x.items():
        walk(prefix + (str(k),), v)
    elif isinstance(x, (list, tuple)):
      for i, v in enumerate(x):
        walk(prefix + (str(i),), v)
    else:
      out.append((prefix, tuple(x.shape), np.dtype(x.dtype)))
  walk((), tree)
  return out


def test_checkpoint_size_scales_with_trainable_weights(run, tmp_path):
  tr = run["tr"]
  trainable = sum(x.nbytes for x in jax.tree.leaves(run["state3"].params))
  frozen = sum(x.nbytes for x in jax.tree.leaves(tr.frozen))
  assert frozen > 3 * trainable
  state_dir = os.path.join(run["workdir"], "checkpoints", "2", "state")
  stored = _stored_leaves(state_dir)
  # No frozen base weight is stored: with train_llm='lora' and train_vision=False every
  # backbone weight (layers.BaseParam, listed from the model itself, not from the trainer's
  # split) is frozen, and no stored path may end with one's path.
  from flax import nnx
  from feallm_jax.models import layers
  assert run["config"].model.train_llm == "lora" and not run["config"].model.train_vision
  abstract = feallm.abstract_model(feallm.spec_from_config(run["config"]),
                                   sharding.single_device_mesh())
  frozen_paths = {tuple(str(k) for k in p)
                  for p, _ in nnx.to_flat_state(nnx.state(abstract, layers.BaseParam))}
  assert len(frozen_paths) > 10
  leaks = lambda leaves: [p for p, _, _ in leaves for f in frozen_paths if p[-len(f):] == f]
  assert not leaks(stored), leaks(stored)[:3]
  # The detector sees a leak where there is one: the frozen weights saved under another key.
  import orbax.checkpoint as ocp
  planted = os.path.join(tmp_path, "planted")
  ocp.PyTreeCheckpointer().save(planted, {"rest": ckpt_lib.to_nested(tr.frozen)})
  assert len(leaks(_stored_leaves(planted))) >= len(frozen_paths) // 2
  assert any(p[0] == "params" for p, _, _ in stored)
  # What it holds: params + Adam mu/nu + a few counters and RNG/iterator scalars.
  payload = sum(int(np.prod(shape)) * dt.itemsize for _, shape, dt in stored)
  assert 3 * trainable <= payload < 3 * trainable + 4096, (payload, trainable)
  # What the files hold: the saved version's values (zstd-compressed chunks + zarr metadata)
  # are about the payload and well under the frozen weights ...
  values = _stored_bytes(state_dir)
  held = sum(values.values())
  assert payload // 2 < held < payload + 200 * len(values) < frozen / 3, (held, payload, frozen)
  assert {_array_path(k) for k in values} == {p for p, _, _ in stored}
  # ... and no commit, superseded ones included, ever wrote a frozen weight.
  commits = _commits(state_dir)
  assert commits
  for generation in commits:
    keys = _ocdbt(os.path.join(state_dir, "ocdbt.process_0"), version=generation).list().result()
    written = [(_array_path(k.decode()), None, None) for k in keys]
    assert written and not leaks(written), (generation, leaks(written)[:3])


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
  # The first check train_and_evaluate makes, before the base weights are known: architecture.
  assert ckpt_lib.check_workdir(config, workdir, base_fingerprint=None) == 2
  assert sorted(os.listdir(workdir)) == before                 # no metrics/tb files created
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ckpt_dir_before
  # Runtime-only keys (remat, compute dtype) may change on resume.
  ok = config.copy_and_resolve_references()
  ok.model.remat = True
  assert ckpt_lib.check_workdir(ok, workdir, base_fingerprint="fp-A") == 2
  # The cheap check train_and_evaluate runs before the base fingerprint is known compares the
  # architecture only: it used to compare against '' and refused every resume of a LoRA run.
  assert ckpt_lib.check_workdir(config, workdir) == 2
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="num_layers"):
    ckpt_lib.check_workdir(other, workdir)


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
