"""FEABench: metrics assembly, suites, checkpoint resolution, and an end-to-end CLI run on a tiny
checkpoint saved through train/checkpoint.py (every output file and metric present)."""
import importlib.util
import json
import os

import numpy as np
import pytest

from feallm_jax.data import facs
from feallm_jax.eval import feabench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
import os, sys
sys.path.insert(0, {configs!r})
import tiny_synthetic


def get_config():
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""      # random tiny towers of the dims below
  c.model.init_adapter = ""
  c.data.data_dir = {data_dir!r}
  c.data.builder_config = "small"
  c.data.batch_size = 8
  c.data.max_len = 48
  c.model.vision.update(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=2)
  c.model.multi_layers = (1, 2)
  c.model.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16)
  c.model.lca.update(crop_size=8, depth=1, width=8, num_heads=2)
  c.model.projector_heads = 2
  c.eval.update(num_samples=3, max_new_tokens=6, batch_size=16)
  return c
'''


def _load_config(path):
  spec = importlib.util.spec_from_file_location("tiny_eval_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
  """A tiny model's initial weights saved as step 1 of a training workdir."""
  from feallm_jax import sharding
  from feallm_jax.models import feallm
  from feallm_jax.train import checkpoint as ckpt_lib
  from feallm_jax.train import step as step_lib
  tmp = tmp_path_factory.mktemp("feabench")
  cfg_path = tmp / "tiny_eval.py"
  cfg_path.write_text(TINY_CONFIG.format(configs=os.path.join(ROOT, "configs"),
                                         data_dir=str(tmp / "data")))
  config = _load_config(str(cfg_path))
  workdir = str(tmp / "run")
  mesh = sharding.make_mesh(dict(config.mesh))
  model = feallm.build_model(config, mesh)
  trainer = step_lib.Trainer(config, model, mesh, loss_fn=feallm.loss_fn,
                             trainable=feallm.trainable_filter(config))
  ckpt = ckpt_lib.Checkpointer(workdir, config)
  ckpt.save(1, trainer.initial_state())
  ckpt.close()
  return dict(config=config, cfg_path=str(cfg_path), workdir=workdir, tmp=tmp)


def test_cli_end_to_end_writes_every_output(run, capsys):
  from tests.cli_helpers import load_cli
  cli = load_cli("eval_feabench")
  out_dir = str(run["tmp"] / "out")
  cli.FLAGS([ "eval_feabench", f"--config={run['cfg_path']}", f"--workdir={run['workdir']}",
             "--suites=synthetic_fea", "--mode=generate", f"--out_dir={out_dir}",
             "--noprogress"])
  cli.main(["eval_feabench"])
  printed = capsys.readouterr().out
  assert "| synthetic_fea | fer |" in printed

  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)
  assert results["meta"]["step"] == 1 and results["meta"]["mode"] == "generate"
  suite = results["suites"]["synthetic_fea"]
  assert set(suite["summary"]) == {"fer", "aur", "joint", "reasoning"}
  assert suite["num_samples"] == 12  # 3 records x 4 tasks
  s = suite["summary"]
  for task in ("fer", "joint", "reasoning"):
    for key in ("accuracy", "macro_f1", "uar", "emotion_unparsed"):
      assert key in s[task], (task, key)
    emo = suite["tasks"][task]["emotion"]
    assert np.asarray(emo["confusion"]).shape == (7, 7)
    # Unparsed answers are counted, never dropped: confusion + unparsed = all samples.
    assert np.sum(emo["confusion"]) + emo["unparsed"] == emo["num_samples"] == 3
  for task in ("aur", "joint", "reasoning"):
    assert "au_mean_f1" in s[task] and "aus_unparsed" in s[task]
    assert set(suite["tasks"][task]["aus"]["per_au_f1"]) >= {"AU6", "AU12"}
  assert 0 <= s["reasoning"]["rouge_l"] <= 1 and 0 <= s["reasoning"]["emfacs_consistency"] <= 1

  with open(os.path.join(out_dir, "predictions_synthetic_fea.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 12 and all(isinstance(r["prediction"], str) for r in rows)
  for task in ("fer", "joint", "reasoning"):
    png = os.path.join(out_dir, f"confusion_synthetic_fea_{task}.png")
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out_dir, "results.md")) as f:
    md = f.read()
  assert "| synthetic_fea | reasoning |" in md and "per-AU F1" in md


def _oracle_answer(batch, row):
  """What a perfect model would say for one eval row, read from the batch row itself (its
  task, emotion and AU labels), in the training answers' wording."""
  from feallm_jax.data import instructions
  task = instructions.TASKS[int(batch["task"][row])]
  e = int(batch["emotion"][row])
  active = [au for au, v in zip(facs.ALL_AUS, batch["au_present"][row]) if v == 1]
  if task == "fer":
    return instructions.answer_emotion(e)
  if task == "aur":
    return instructions.answer_aus(active)
  if task == "joint":
    return instructions.answer_joint(e, active)
  return instructions.answer_reasoning(e, active)


def test_reference_answers_score_perfectly_through_the_whole_path(run, monkeypatch):
  """Generation replaced by an oracle that answers each batch row from that row's own labels:
  decoding, parsing, the row -> record bookkeeping, metrics and the written files must then
  report perfect scores. A shifted, shuffled or mislabelled row anywhere shows."""
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.eval import generate as gen
  tok = tok_lib.load("")
  eos = int(tok.eos_token_id)
  calls = []

  def oracle_generate(model, batch, sampling, mesh=None):
    rows = []
    for r in range(len(batch["input_ids"])):
      ids = tok.encode(_oracle_answer(batch, r), add_special_tokens=False) + [eos] \
          if batch["example_mask"][r] else [eos]
      rows.append(ids)
    n = max(map(len, rows))
    tokens = np.full((len(rows), n), sampling.pad_id, np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)] = ids
    calls.append(len(rows))
    return tokens, np.array([len(ids) for ids in rows], np.int32)

  monkeypatch.setattr(gen, "generate", oracle_generate)
  config = run["config"].copy_and_resolve_references()
  config.eval.num_samples = 0          # the whole test split: every emotion that occurs in it
  out_dir = str(run["tmp"] / "oracle")
  res = feabench.evaluate(config, run["workdir"], suites="synthetic_fea", mode="generate",
                          out_dir=out_dir, progress=False)
  assert calls and sum(calls) >= 4 * 2   # more than one batch, padded rows included
  suite = res["suites"]["synthetic_fea"]
  s = suite["summary"]
  for task in ("fer", "joint", "reasoning"):
    emo = suite["tasks"][task]["emotion"]
    assert (s[task]["accuracy"], s[task]["macro_f1"], s[task]["uar"]) == (1.0, 1.0, 1.0), task
    assert s[task]["emotion_unparsed"] == 0
    cm = np.asarray(emo["confusion"])
    assert cm.sum() == np.trace(cm) == emo["num_samples"] and (cm.diagonal() > 0).sum() >= 3
  for task in ("aur", "joint"):
    aus = suite["tasks"][task]["aus"]
    assert aus["unparsed"] == 0 and aus["mean_accuracy"] == 1.0, task
    assert all(aus["per_au_f1"][k] == 1.0 for k, n in aus["positives"].items() if n), task
  # Reasoning cites only the prototype AUs of its emotion: no false positives, all consistent.
  r_aus = suite["tasks"]["reasoning"]["aus"]
  assert r_aus["unparsed"] == 0
  assert suite["tasks"]["reasoning"]["emfacs_consistency"]["rate"] == 1.0
  assert suite["tasks"]["reasoning"]["emfacs_consistency"]["not_judged"] == 0
  with open(os.path.join(out_dir, "predictions_synthetic_fea.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == suite["num_samples"]
  for r in rows:
    if r["task"] in ("fer", "aur", "joint"):
      assert r["prediction"] == r["reference"], r     # the oracle says the reference
    if r["task"] in ("fer", "joint", "reasoning"):
      assert r["emotion_pred"] == r["emotion_true"], r


def test_score_mode_maps_candidates_to_labels(run, monkeypatch):
  """Closed-set scoring with known log-likelihoods: the candidate scored highest for a row is
  that row's true emotion, so every prediction must be right and every reported probability
  must be the softmax of the known scores, under the candidate's own label."""
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.eval import generate as gen
  tok = tok_lib.load("")
  from feallm_jax.data import pipeline
  labels = list(pipeline.label_set("synthetic_fea")["emotions"])

  def fake_scores(model, batch, cand_ids, cand_mask, reduction="sum", mesh=None):
    # The candidates are the label answers, in label-set order.
    texts = [tok.decode(i[:m.sum()]).strip() for i, m in zip(cand_ids, cand_mask)]
    assert texts == [lab.capitalize() + "." for lab in labels], texts
    b = len(batch["input_ids"])
    ll = -np.tile(np.arange(1.0, len(labels) + 1), (b, 1))       # -1, -2, ... by position
    for r in range(b):
      if batch["example_mask"][r]:
        ll[r, labels.index(facs.EMOTIONS[batch["emotion"][r]])] = 0.5
    probs = np.exp(ll) / np.exp(ll).sum(1, keepdims=True)
    return gen.Scores(log_likelihood=ll, probs=probs, pred=ll.argmax(1))

  monkeypatch.setattr(gen, "score_candidates", fake_scores)
  model, step = feabench.load_model(run["config"], run["workdir"])
  assert step == 1
  suite = feabench.Suite("synthetic_fea", "synthetic_fea", "test", ("fer",))
  records = feabench.predict_suite(model, run["config"], suite, "score", tok,
                                   gen.SamplingConfig(max_new_tokens=6), progress=False)
  assert len(records) == 3
  for r in records:
    assert r["prediction"] is None  # no generation needed for FER in score mode
    assert r["emotion_pred"] == r["emotion_true"]
    true = labels.index(r["emotion_true"])
    ll = -np.arange(1.0, len(labels) + 1)
    ll[true] = 0.5
    want = np.exp(ll) / np.exp(ll).sum()
    for k, lab in enumerate(labels):
      assert r["emotion_probs"][lab] == pytest.approx(want[k], rel=1e-9), (lab, r)
  m = feabench.suite_metrics(records, suite, "score")
  assert m["summary"]["fer"]["emotion_unparsed"] == 0 and m["summary"]["fer"]["accuracy"] == 1.0


def test_each_face_is_encoded_once_for_all_its_questions(run, monkeypatch):
  """Four tasks per face, batches of 8 rows: every face goes through the vision side once
  (``FaceTokens``), later questions reuse its tokens, and every answer equals the answer of the
  path that encodes the image with each question."""
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.eval import generate as gen
  tok = tok_lib.load("")
  config = run["config"].copy_and_resolve_references()
  config.eval.batch_size = 8
  model, _ = feabench.load_model(config, run["workdir"])
  suite = feabench.Suite("synthetic_fea", "synthetic_fea", "test",
                         ("fer", "aur", "joint", "reasoning"))
  sampling = gen.SamplingConfig(max_new_tokens=6)
  encoded = []
  real_visual = gen.visual_tokens

  def counting(model, batch, mesh=None):
    encoded.append(int(np.asarray(batch["example_mask"]).sum()))
    return real_visual(model, batch, mesh)

  monkeypatch.setattr(gen, "visual_tokens", counting)
  records = feabench.predict_suite(model, config, suite, "generate", tok, sampling,
                                   progress=False)
  faces = {r["id"] for r in records}
  assert len(faces) == 3 and len(records) > 8          # the 3 faces' questions fill 2 batches
  assert len(encoded) == 1, encoded     # batch 1 holds every face; batch 2 reuses (not: [8, 4])
  monkeypatch.setattr(feabench.FaceTokens, "encode", lambda self, m, batch, metas: batch)
  plain = feabench.predict_suite(model, config, suite, "generate", tok, sampling,
                                 progress=False)
  assert len(encoded) == 1              # the image path encodes inside generate
  key = lambda r: (r["id"], r["task"])
  assert [(key(r), r["prediction"]) for r in records] == [(key(r), r["prediction"])
                                                          for r in plain]


def test_eval_rows_come_in_windows_of_records_task_by_task(run):
  from feallm_jax.data import pipeline
  order = lambda w: [(m["record"], m["task"]) for _, metas in pipeline.eval_batches(
      run["config"], split="test", tasks=("fer", "aur"), batch_size=8, num_samples=3,
      window=w) for m in metas if m["real"]]
  assert order(0) == [(0, "fer"), (1, "fer"), (2, "fer"), (0, "aur"), (1, "aur"), (2, "aur")]
  assert order(2) == [(0, "fer"), (1, "fer"), (0, "aur"), (1, "aur"), (2, "fer"), (2, "aur")]
  with pytest.raises(ValueError, match="reuse_window"):
    order(-1)


def test_unbuilt_suite_names_builder_and_command(run):
  from feallm_jax.data import tokenizer as tok_lib
  from feallm_jax.eval import generate as gen
  with pytest.raises(feabench.SuiteDataError, match=r"raf_db.*launch/build_dataset.py --dataset=raf_db"):
    feabench.predict_suite(None, run["config"], feabench.SUITES["raf_db"], "generate",
                           tok_lib.load(""), gen.SamplingConfig(), progress=False)


def test_suite_metrics_hand_computed():
  suite = feabench.SUITES["synthetic_fea"]
  aus = (6, 12)
  from feallm_jax.data import pipeline
  au_set = pipeline.label_set("synthetic_fea")["aus"]

  def ann(*present):
    return [1 if a in present else 0 for a in au_set]

  recs = [
      dict(task="fer", emotion_true="happiness", emotion_pred="happiness"),
      dict(task="fer", emotion_true="sadness", emotion_pred=None),
      dict(task="fer", emotion_true="anger", emotion_pred="sadness"),
      dict(task="aur", aus_true=[6, 12], au_annotation=ann(6, 12), aus_pred=[6]),
      dict(task="aur", aus_true=[], au_annotation=ann(), aus_pred=None),
      dict(task="reasoning", emotion_true="happiness", emotion_pred="happiness",
           aus_true=[6, 12], au_annotation=ann(6, 12), aus_pred=[6, 12],
           text_emotion="happiness", text_aus=[6, 12], rouge_l=0.5),
      dict(task="reasoning", emotion_true="sadness", emotion_pred="sadness",
           aus_true=[1], au_annotation=ann(1), aus_pred=None,
           text_emotion="sadness", text_aus=None, rouge_l=0.25),
  ]
  m = feabench.suite_metrics(recs, suite, "generate")
  s = m["summary"]
  assert s["fer"]["accuracy"] == pytest.approx(1 / 3)
  assert s["fer"]["emotion_unparsed"] == 1
  assert s["aur"]["aus_unparsed"] == 1
  per = m["tasks"]["aur"]["aus"]["per_au_f1"]
  assert per["AU6"] == pytest.approx(1.0) and per["AU12"] == 0.0
  assert s["reasoning"]["accuracy"] == 1.0
  assert s["reasoning"]["rouge_l"] == pytest.approx(0.375)
  assert m["tasks"]["reasoning"]["emfacs_consistency"] == dict(
      rate=1.0, consistent=1, judged=1, not_judged=1)
  assert aus  # (names used in the fixture)


def test_candidate_ids_match_in_context_tokens():
  from feallm_jax.data import tokenizer as tok_lib
  tok = tok_lib.load("")
  ids, mask = feabench.candidate_ids(tok, ["Happiness.", "Sadness."])
  conv = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "Happiness."}]
  full, loss = tok_lib.encode_conversation(tok, conv)
  answer = [int(t) for t, m in zip(full, loss) if m][:-1]  # drop the EOS
  assert ids[0, :mask[0].sum()].tolist() == answer


def test_resolve_checkpoint(tmp_path):
  assert feabench.resolve_checkpoint("w", None) == ("w", None)
  assert feabench.resolve_checkpoint("w", 7) == ("w", 7)
  assert feabench.resolve_checkpoint("w", "12") == ("w", 12)
  (tmp_path / "other" / "checkpoints" / "30").mkdir(parents=True)
  assert feabench.resolve_checkpoint("w", str(tmp_path / "other")) == (str(tmp_path / "other"), None)
  assert feabench.resolve_checkpoint("w", str(tmp_path / "other" / "checkpoints" / "30")) == (
      str(tmp_path / "other"), 30)
  with pytest.raises(FileNotFoundError, match="--checkpoint"):
    feabench.resolve_checkpoint("w", str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="unknown suite"):
    feabench.resolve_suites("synthetic_fea,nope")
