"""Examples that cannot be fitted are dropped, counted by reason and reported; never fatal alone.

The data: an FABA-Instruct-style set with real over-long conversations (an ``<image>`` placed
late in a long multi-turn chat, a question so long that the answer starts past ``max_len``, a
long answer that is cut but kept) and two records corrupted in the built shard (two ``<image>``
tokens, undecodable image bytes), tokenized with a byte-level BPE laid out like a real LLM's.
"""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
import hf_fixtures as hf
from configs import tiny_synthetic
from feallm_jax.data import builders, pipeline, tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPPED = {rid: why for rid, why in fx.PLANTED.items() if why}   # 4 of the 24 train records
N_TRAIN = 24


def _tiny_model(c):
  """Towers small enough for a loaded 2-core CPU (the numbers matter, not the quality)."""
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  c.model.vision.update(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=2)
  c.model.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16)
  c.model.multi_layers = (1, 2)
  c.model.projector, c.model.local_clues = "mlp", False
  c.model.train_llm, c.model.train_vision = "lora", False
  c.model.lora.update(rank=4, alpha=8.0, dropout=0.0)
  return c


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return hf.bpe_tokenizer_dir(str(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def planted(tmp_path_factory, bpe):
  root = tmp_path_factory.mktemp("planted")
  truth = fx.make_llava_unfit(str(root / "raw"))
  summary = builders.build("llava_instruct", str(root / "data"), manual_dir=str(root / "raw"))
  assert summary["splits"] == {"train": N_TRAIN, "test": 4} and not summary["skipped"]
  assert set(fx.plant_in_shards(summary["path"], "train")) == {"train-two-images",
                                                               "train-bad-bytes"}
  c = _tiny_model(tiny_synthetic.get_config())
  c.data.update(dataset="llava_instruct", builder_config="", data_dir=str(root / "data"),
                tokenizer=bpe, max_len=fx.UNFIT_MAX_LEN, batch_size=8, augment=False,
                max_dropped_fraction=0.5, drop_check_after=0)
  return dict(config=c, truth=truth, root=root)


def _records(config, split="train"):
  src = pipeline.data_source(config, split=split, decode_images=False)
  return {pipeline._clean_record(src[i])["id"]: pipeline._clean_record(src[i])
          for i in range(len(src))}


def _expected_needed(config) -> int:
  """The smallest max_len keeping the two length drops, from the token ids themselves: the
  image token and one answer token must both fit."""
  tok = T.load(config.data.tokenizer)
  img = T.image_token_id(tok)
  recs = _records(config)
  need = 0
  for rid in ("train-late-image", "train-cut-answer"):
    ids, loss = T.encode_conversation(tok, json.loads(recs[rid]["conversations"]))
    need = max(need, int(np.flatnonzero(ids == img)[0]) + 2, int(np.flatnonzero(loss)[0]) + 1)
  return need


def test_planted_conversations_really_do_not_fit(planted):
  """Preconditions, measured with the real tokenizer: what makes each planted example unfit."""
  c = planted["config"]
  tok = T.load(c.data.tokenizer)
  img, L = T.image_token_id(tok), c.data.max_len
  recs = _records(c)
  assert len(recs) == N_TRAIN
  enc = {rid: T.encode_conversation(tok, json.loads(recs[rid]["conversations"]))
         for rid in fx.PLANTED}
  ids, loss = enc["train-late-image"]
  assert np.flatnonzero(ids == img)[0] >= L - 1            # the image sits past max_len
  ids, loss = enc["train-cut-answer"]
  assert np.flatnonzero(ids == img)[0] < L - 1 and np.flatnonzero(loss)[0] >= L   # answer cut
  ids, loss = enc["train-long-kept"]
  assert len(ids) > L and np.flatnonzero(loss)[0] < L      # cut, but an answer is left
  assert (enc["train-two-images"][0] == img).sum() == 2
  with pytest.raises(pipeline.Unfit, match="undecodable image"):
    pipeline.decode_image(recs["train-bad-bytes"]["image"], "train-bad-bytes")
  good = [T.encode_conversation(tok, json.loads(r["conversations"]))[0]
          for rid, r in recs.items() if rid not in fx.PLANTED]
  assert max(len(g) for g in good) <= L < 2 * max(len(g) for g in good)


def test_drops_are_counted_exactly_and_batches_stay_full(planted):
  c = planted["config"]
  tok = T.load(c.data.tokenizer)
  img = T.image_token_id(tok)
  it = pipeline.train_iterator(c)
  sig = pipeline.batch_signature(c, 8)
  for step in range(1, 7):   # 2 epochs of 24 records = 6 batches of 8
    b = next(it)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == sig
    assert (b["example_mask"] == 1).all() and (b["loss_mask"].sum(1) > 0).all()
    assert ((b["input_ids"] == img).sum(1) == 1).all()
    for row in range(8):
      text = tok.decode(b["input_ids"][row][b["attention_mask"][row] == 1])
      if "PLANTED" in text:   # only the long answer that is cut but kept is trained on
        assert "Describe the face in detail" in text and b["truncated"][row] == 1
      else:
        assert b["truncated"][row] == 0
    if step % 3 == 0:
      # Every record is drawn once an epoch, so each planted one is dropped once an epoch,
      # whatever the shuffle: exact counts, by reason, with the ids.
      epochs = step // 3
      d = it.drops
      assert d.examples == 8 * step and d.dropped == 4 * epochs and d.unfilled == 0
      assert d.counts == {why: epochs for why in DROPPED.values()}
      assert d.ids == {why: [rid] for rid, why in DROPPED.items()}
      assert d.needed_len == _expected_needed(c)


def test_resume_restores_the_next_batch_and_the_counts(planted, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  c = planted["config"]
  it = pipeline.train_iterator(c)
  for _ in range(4):
    next(it)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
  want = [next(it) for _ in range(2)]
  want_drops = it.drops.state()
  it2 = pipeline.train_iterator(c)
  ckpt.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(it2))
  assert it2.drops.examples == 32
  got = [next(it2) for _ in range(2)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)
  assert it2.drops.state() == want_drops and it2.drops.dropped == 8


def test_every_process_drops_the_same_way(planted):
  """Two processes: their rows form the single-process global batches and their counts sum to
  the single-process counts (each process counts the positions of its own rows)."""
  c = planted["config"]
  one = pipeline.train_iterator(c, process_index=0, process_count=1)
  two = [pipeline.train_iterator(c, process_index=p, process_count=2) for p in range(2)]
  for _ in range(6):
    full, parts = next(one), [next(t) for t in two]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=k)
  merged = pipeline.DropLog.from_vectors(np.stack([t.drops.to_vector() for t in two]))
  assert merged.to_vector().tolist() == one.drops.to_vector().tolist()
  assert merged.counts == {why: 2 for why in DROPPED.values()}


def test_worker_processes_drop_the_same_way(planted):
  c = planted["config"].copy_and_resolve_references()
  c.data.num_workers = 1
  a, b = pipeline.train_iterator(planted["config"]), pipeline.train_iterator(c)
  for _ in range(3):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert a.drops.state() == b.drops.state() and b.drops.dropped == 4
  b.close()


def test_too_many_drops_stop_with_reason_count_and_flag(planted):
  c = planted["config"]
  it = pipeline.train_iterator(c)
  for _ in range(3):
    next(it)
  it.drops.check(0.2, 24)                           # 4 of 24 = 16.7% is allowed
  it.drops.check(0.1, 25)                           # not checked before 25 examples
  with pytest.raises(pipeline.DroppedExamplesError) as e:
    it.drops.check(0.1, 24, max_len=c.data.max_len)
  msg = str(e.value)
  assert "4 of 24 examples dropped (16.67%)" in msg and "max_dropped_fraction=0.1" in msg
  for rid, why in DROPPED.items():
    assert f"1 {why}" in msg and repr(rid) in msg
  assert f"--config.data.max_len={_expected_needed(c)}" in msg
  assert "--config.data.max_dropped_fraction" in msg and "build_dataset.py" in msg


def test_nothing_fits_is_refused_before_the_first_step(bpe, tmp_path):
  """The issue's run: a byte-level BPE tokenizer (the image token lands at 108) with
  tiny_synthetic's max_len=96. Refused by the pre-flight, before any model is built or file
  written, naming the flag; the value it names really keeps the examples."""
  from feallm_jax import preflight
  from feallm_jax.train import train_and_evaluate
  c = _tiny_model(tiny_synthetic.get_config())
  c.data.update(tokenizer=bpe, data_dir=str(tmp_path / "data"), builder_config="small",
                batch_size=8, max_len=96)
  workdir = tmp_path / "work"
  with pytest.raises(preflight.PreflightError) as e:
    train_and_evaluate(c, str(workdir))
  msg = str(e.value)
  assert "[max_len]" in msg and len(e.value.problems) == 1
  assert "every one of the first 96 training examples would be dropped" in msg, msg
  assert "image_past_max_len" in msg and "the <image> token sits past max_len" in msg
  need = int(re.search(r"fix: --config\.data\.max_len=(\d+)", msg).group(1))
  assert not workdir.exists()
  c.data.max_len = need
  assert pipeline.fit_check(c).dropped == 0
  c.data.max_len = need - 1
  assert pipeline.fit_check(c).dropped > 0


def test_train_cli_refuses_naming_the_flag(bpe, tmp_path):
  """launch/train.py, as the issue ran it: a pre-flight refusal before the first step (exit
  code 2, the message and the flag, no traceback), like every other pre-flight problem."""
  workdir = tmp_path / "work"
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"),
       "--config=" + os.path.join(ROOT, "configs", "tiny_synthetic.py"), f"--workdir={workdir}",
       f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.builder_config=small",
       f"--config.data.tokenizer={bpe}", "--config.data.max_len=96",
       "--config.data.batch_size=8", "--config.model.base_checkpoint=",
       "--config.model.init_adapter=",
       "--config.train.progress=False"],
      capture_output=True, text=True, timeout=900,             # a loaded 2-core CPU
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "DroppedExamplesError" not in out.stderr
  assert "pre-flight found 1 problem" in out.stderr and "[max_len]" in out.stderr
  assert "image_past_max_len" in out.stderr
  assert re.search(r"fix: --config\.data\.max_len=\d+ \(it is 96", out.stderr), \
      out.stderr[-3000:]
  assert not workdir.exists()


def test_length_report_and_build_dataset_cli(planted, tmp_path):
  c = planted["config"]
  src = pipeline.data_source(c, split="train", decode_images=False)
  rep = pipeline.length_report(c, src)
  # Text only: the undecodable image is the builder's to catch (it skips them when building).
  assert rep["dropped_by_reason"] == {"image_past_max_len": 1, "empty_answer": 1,
                                      "image_token_count": 1}
  assert rep["first_ids"]["image_past_max_len"] == ["train-late-image"]
  assert rep["truncated"] == 1 and rep["examples"] == N_TRAIN
  tok = T.load(c.data.tokenizer)
  lengths = [len(T.encode_conversation(tok, json.loads(r["conversations"]))[0])
             for r in _records(c).values()]
  assert rep["text_tokens"]["max"] == max(lengths) == rep["fits_untruncated"]
  assert rep["text_tokens"]["p50"] == float(np.median(lengths))
  visual = (32 // 8) ** 2   # patches of the config's tower, no local-clue token
  assert rep["visual_tokens"] == visual
  assert rep["llm_tokens"]["max"] == max(lengths) - 1 + visual
  assert rep["needed_max_len"] == _expected_needed(c)

  cfg_path = tmp_path / "cfg.py"
  cfg_path.write_text(
      "import sys\nsys.path.insert(0, %r)\nimport tiny_synthetic\n\n"
      "def get_config():\n  return tiny_synthetic.get_config()\n" % os.path.join(ROOT, "configs"))
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "build_dataset.py"),
       "--dataset=llava_instruct", f"--data_dir={c.data.data_dir}",
       f"--manual_dir={planted['root'] / 'raw'}", f"--train_config={cfg_path}",
       f"--train_config.data.tokenizer={c.data.tokenizer}",
       f"--train_config.data.max_len={c.data.max_len}",
       "--train_config.model.base_checkpoint=", "--train_config.model.init_adapter=",
       "--train_config.model.vision.image_size=32", "--train_config.model.vision.patch_size=8",
       "--train_config.model.local_clues=False"],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "reused existing llava_instruct" in text
  assert f"max_len {c.data.max_len}" in text and f"{visual} visual tokens" in text
  assert "3 would be dropped (1 image_past_max_len, 1 empty_answer, 1 image_token_count)" in text
  assert "1 would be truncated" in text
  assert f"--config.data.max_len={_expected_needed(c)}" in text


def test_eval_scores_an_over_long_prompt_as_unanswerable(planted, tmp_path, monkeypatch):
  from feallm_jax import sharding
  from feallm_jax.eval import feabench
  from feallm_jax.models import feallm
  c = planted["config"].copy_and_resolve_references()
  c.eval.update(max_new_tokens=3, batch_size=8, num_samples=0)
  batches = list(pipeline.eval_batches(c, split="test", batch_size=8))
  metas = [m for _, ms in batches for m in ms if m["real"]]
  assert sorted(m["id"] for m in metas) == ["test-0", "test-1", "test-2", "test-late-image"]
  for b, ms in batches:
    for row, m in enumerate(ms):
      if m["real"]:
        assert bool(b["example_mask"][row]) == (m["unfit"] is None)
        assert m["unfit"] == fx.TEST_PLANTED.get(m["id"])

  suite = feabench.Suite("faba", "llava_instruct", "test", ())
  monkeypatch.setitem(feabench.SUITES, "faba", suite)
  mesh = sharding.make_mesh(dict(c.mesh))
  model = feallm.build_model(c, mesh)
  res = feabench.evaluate_model(model, c, suites=("faba",), mode="generate",
                                out_dir=str(tmp_path / "eval"), progress=False)
  faba = res["suites"]["faba"]
  assert faba["num_samples"] == 4 and faba["num_unanswerable"] == 1
  assert faba["unanswerable"] == {"image_past_max_len": 1}
  assert faba["summary"]["free"] == {"num_samples": 4, "unanswerable": 1}
  with open(res["files"]["predictions"]["faba"]) as f:
    rows = {r["id"]: r for r in map(json.loads, f)}
  assert rows["test-late-image"]["prediction"] is None
  assert rows["test-late-image"]["unanswerable"] == "image_past_max_len"
  assert all(isinstance(rows[f"test-{i}"]["prediction"], str) for i in range(3))
  with open(res["files"]["results_md"]) as f:
    assert "| unanswerable |" in f.read()


class _PreemptAt:
  """The real training iterator; SIGTERM arrives while the ``n``-th batch is drawn."""

  def __init__(self, it, n):
    self.it, self.n, self.k = it, n, 0

  @property
  def drops(self):
    return self.it.drops

  def __iter__(self):
    return self

  def __next__(self):
    self.k += 1
    if self.k == self.n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def _last_per_step(workdir):
  from feallm_jax.train import metrics_log
  return {r["step"]: r for r in metrics_log.read(workdir)}


def test_training_with_planted_examples_runs_to_the_end_and_resumes_exactly(
    planted, tmp_path, monkeypatch):
  import jax
  from feallm_jax.train import train_and_evaluate
  jax.config.update("jax_compilation_cache_dir", str(tmp_path.parent / "jax_cache_unfit"))
  c = planted["config"].copy_and_resolve_references()
  c.optim.update(lr_lora=1e-2, lr_proj=1e-2, warmup_frac=0.0)
  c.train.update(num_steps=6, log_every=1, save_every=2, progress=False, final_eval=False)
  c.eval.suites = ()
  ref = str(tmp_path / "ref")
  summary = train_and_evaluate(c, ref)
  assert summary["final_step"] == 6
  rows = _last_per_step(ref)
  assert sorted(rows) == list(range(1, 7))
  for step in (3, 6):   # epoch ends: each planted record dropped once an epoch
    r = rows[step]
    assert r["examples"] == 8 * step and r["dropped"] == 4 * step // 3
    for why in DROPPED.values():
      assert r[f"dropped/{why}"] == step // 3
  assert all(np.isfinite(r["loss"]) for r in rows.values())
  assert summary["dropped"]["counts"] == {why: 2 for why in DROPPED.values()}

  # Preempted while drawing the 3rd batch (saved at step 3), then resumed by the same call.
  work = str(tmp_path / "work")
  real = pipeline.train_iterator
  monkeypatch.setattr(pipeline, "train_iterator", lambda *a, **k: _PreemptAt(real(*a, **k), 3))
  first = train_and_evaluate(c, work)
  assert first["preempted"] and first["final_step"] == 3
  monkeypatch.setattr(pipeline, "train_iterator", real)
  second = train_and_evaluate(c, work)
  assert second["resumed"] and second["start_step"] == 3 and second["final_step"] == 6
  got = _last_per_step(work)
  keys = ["loss", "examples", "dropped"] + [f"dropped/{w}" for w in DROPPED.values()]
  for step in range(1, 7):
    assert {k: got[step].get(k) for k in keys} == {k: rows[step].get(k) for k in keys}, step

  # A stricter limit stops the run, naming reason, count and flag, once it is exceeded.
  c.data.update(max_dropped_fraction=0.1, drop_check_after=8)
  strict = str(tmp_path / "strict")
  with pytest.raises(pipeline.DroppedExamplesError) as e:
    train_and_evaluate(c, strict)
  last = _last_per_step(strict)
  step = max(last)
  assert last[step]["dropped"] > 0.1 * last[step]["examples"]
  assert all(r["dropped"] <= 0.1 * r["examples"] for s, r in last.items() if s < step)
  msg = str(e.value)
  assert f"{last[step]['dropped']} of {last[step]['examples']} examples dropped" in msg
  assert "max_dropped_fraction=0.1" in msg and "--config.data.max_dropped_fraction" in msg
  assert f"Stopped at step {step}" in msg
