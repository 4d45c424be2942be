"""FEABench-style evaluation: FER, AUR, joint and reasoning tasks over evaluation suites.

Suites (``SUITES``): ``synthetic_fea`` (test split, all four tasks; builds itself on first use)
is the embedded default; ``raf_db`` (7-way FER), ``affectnet_7`` / ``affectnet_8`` (FER),
``bp4d`` (12-AU F1) and ``disfa`` (8-AU F1) read the tfds builders under
``config.data.data_dir`` zero-shot. A suite whose data is not built fails with the builder name
and the command that builds it.

Modes:
* ``generate``: every answer is generated (greedy unless ``config.eval.temperature`` > 0) and
  parsed (``eval/parse.py``); unparseable answers count as wrong and are reported.
* ``score``: the emotion is the label whose answer string (" Happiness." …) has the highest
  log-likelihood after the prompt (``generate.score_candidates``): nothing to parse. Tasks that
  also need AUs or free text (aur, joint, reasoning) still generate for those parts.

``evaluate(config, workdir, ...)`` restores a training checkpoint; ``evaluate_model(model,
config, ...)`` takes a live model (the training loop's periodic eval, notebooks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from feallm_jax import paths
from feallm_jax.data import facs
from feallm_jax.eval import generate as gen
from feallm_jax.eval import metrics, parse, report

log = logging.getLogger(__name__)

MODES = ("generate", "score")
EMOTION_TASKS = ("fer", "joint", "reasoning")
AU_TASKS = ("aur", "joint", "reasoning")


@dataclasses.dataclass(frozen=True)
class Suite:
  name: str
  dataset: str          # tfds builder name, optionally '/config'
  split: str
  tasks: tuple[str, ...]


SUITES: dict[str, Suite] = {
    "synthetic_fea": Suite("synthetic_fea", "synthetic_fea", "test",
                           ("fer", "aur", "joint", "reasoning")),
    "raf_db": Suite("raf_db", "raf_db", "test", ("fer",)),
    "affectnet_7": Suite("affectnet_7", "affectnet/7class", "test", ("fer",)),
    "affectnet_8": Suite("affectnet_8", "affectnet/8class", "test", ("fer",)),
    "bp4d": Suite("bp4d", "bp4d", "fold1+fold2+fold3", ("aur",)),
    "disfa": Suite("disfa", "disfa", "fold1+fold2+fold3", ("aur",)),
}


class SuiteDataError(FileNotFoundError):
  """A suite's dataset is not built (the message names the builder and the build command)."""


def resolve_suites(names: Sequence[str] | str | None, config=None) -> list[Suite]:
  if names is None:
    names = tuple(config.eval.get("suites", ("synthetic_fea",))) if config is not None \
        else ("synthetic_fea",)
  if isinstance(names, str):
    names = [n for n in names.split(",") if n.strip()]
  out = []
  for n in names:
    n = n.strip()
    if n not in SUITES:
      raise ValueError(f"unknown suite {n!r}; known: {sorted(SUITES)}")
    out.append(SUITES[n])
  if not out:
    raise ValueError("no suites to evaluate")
  return out


# --- tokenizer helpers ---------------------------------------------------------------------------

def eos_ids(tok) -> tuple[int, ...]:
  """Ids that end an answer: the tokenizer's EOS plus chat end-of-turn tokens it knows."""
  ids = set()
  if tok.eos_token_id is not None:
    ids.add(int(tok.eos_token_id))
  vocab = tok.get_vocab()
  for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
    if t in vocab:
      ids.add(int(vocab[t]))
  return tuple(sorted(ids))


def candidate_ids(tok, candidates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Candidate answers tokenized *as they appear after the chat template's assistant prefix*.

  Tokenizing "Happiness." alone can differ from the in-context tokens (a BPE tokenizer merges
  the space after "ASSISTANT:" into the word), so each candidate is rendered as an assistant
  reply and the tokens that start inside it are kept (the same offset rule as the loss mask).
  """
  msgs = [{"role": "user", "content": "x"}]
  prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  rows = []
  for c in candidates:
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": c}], tokenize=False,
                                   add_generation_prompt=False)
    if not full.startswith(prompt) or c not in full[len(prompt):]:
      ids = tok.encode(" " + c, add_special_tokens=False)
    else:
      start = len(prompt)
      end = full.index(c, start) + len(c)
      enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
      ids = [i for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
             if start <= s < end and e > s]
    if not ids:
      raise ValueError(f"score: candidate {c!r} tokenizes to nothing")
    rows.append(ids)
  lc = max(len(r) for r in rows)
  out = np.zeros((len(rows), lc), np.int32)
  mask = np.zeros((len(rows), lc), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)], mask[i, :len(r)] = r, 1
  return out, mask


def emotion_candidates(labels: Sequence[str]) -> list[str]:
  """The canonical FER answer of every label ("Happiness."), as the model was trained to say."""
  from feallm_jax.data import instructions
  return [instructions.answer_emotion(e) for e in labels]


# --- one suite -----------------------------------------------------------------------------------

def _progress(iterable, desc: str, enabled: bool):
  if not enabled:
    return iterable
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    return iterable
  return tqdm(iterable, desc=desc, unit="batch", dynamic_ncols=True)


def _true_aus(au_present: Sequence[int], au_set: Sequence[int]) -> list[int] | None:
  vec = metrics.select_aus(np.asarray(au_present), au_set)
  if np.all(vec < 0):
    return None
  return [a for a, v in zip(au_set, vec) if v == 1]


def predict_suite(model, config, suite: Suite, mode: str, tok, sampling: gen.SamplingConfig, *,
                  progress: bool = True, source=None) -> list[dict[str, Any]]:
  """Per-sample predictions (one dict per real eval row) for one suite."""
  from feallm_jax.data import pipeline
  labels = pipeline.label_set(suite.dataset)
  emotions, au_set = labels["emotions"], labels["aus"]
  e = config.eval
  cand = None
  if mode == "score" and emotions:
    cand = candidate_ids(tok, emotion_candidates(emotions))
  try:
    batches = pipeline.eval_batches(
        config, dataset=suite.dataset, split=suite.split, tasks=suite.tasks,
        batch_size=int(e.get("batch_size", 0) or config.data.eval_batch_size),
        num_samples=int(e.get("num_samples", 0)), source=source)
    first = next(batches, None)
  except FileNotFoundError as err:
    raise SuiteDataError(f"suite {suite.name}: {err}") from err
  if first is None:
    return []
  records: list[dict[str, Any]] = []

  def chain():
    yield first
    yield from batches

  for batch, metas in _progress(chain(), f"{suite.name} ({mode})", progress):
    real = np.asarray(batch["example_mask"]).astype(bool)
    tasks = [m["task"] for m in metas]
    need_text = mode == "generate" or any(t in AU_TASKS or t is None
                                          for t, r in zip(tasks, real) if r)
    texts = [None] * len(metas)
    if need_text:
      tokens, lengths = gen.generate(model, batch, sampling)
      texts = gen.decode_tokens(tok, tokens, lengths, sampling.eos_ids)
    scores = None
    if cand is not None and any(t in EMOTION_TASKS for t, r in zip(tasks, real) if r):
      scores = gen.score_candidates(model, batch, *cand,
                                    reduction=str(e.get("score_reduction", "sum")))
    for i, meta in enumerate(metas):
      if not real[i]:
        continue
      task = meta["task"] or "free"
      text = texts[i]
      true_emotion = facs.EMOTIONS[meta["emotion"]] if meta["emotion"] >= 0 else None
      rec: dict[str, Any] = dict(id=meta["id"], task=task, prompt=meta["prompt"],
                                 reference=meta["reference"], prediction=text)
      if emotions and task in EMOTION_TASKS:
        rec["emotion_true"] = true_emotion if true_emotion in emotions else None
        if scores is not None:
          rec["emotion_pred"] = emotions[int(scores.pred[i])]
          rec["emotion_probs"] = {lab: float(p) for lab, p in zip(emotions, scores.probs[i])}
        else:
          rec["emotion_pred"] = parse.parse_emotion(text or "", emotions)
      if au_set and task in AU_TASKS:
        rec["aus_true"] = _true_aus(meta["au_present"], au_set)
        rec["au_annotation"] = metrics.select_aus(np.asarray(meta["au_present"]),
                                                  au_set).tolist()
        pred = parse.parse_aus(text or "", au_set)
        rec["aus_pred"] = sorted(pred) if pred is not None else None
      if task == "reasoning":
        # Internal consistency of the free text itself, over every emotion and AU it names.
        rec["text_emotion"] = parse.parse_emotion(text or "")
        named = parse.parse_aus(text or "")
        rec["text_aus"] = sorted(named) if named is not None else None
        rec["rouge_l"] = metrics.rouge_l(meta["reference"], text or "")["fmeasure"]
      records.append(rec)
  return records


def suite_metrics(records: Sequence[Mapping[str, Any]], suite: Suite, mode: str) -> dict:
  """Every metric of one suite, per task, plus a flat summary per task for tables and logs."""
  from feallm_jax.data import pipeline
  labels = pipeline.label_set(suite.dataset)
  emotions, au_set = labels["emotions"], labels["aus"]
  tasks: dict[str, Any] = {}
  summary: dict[str, Any] = {}
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    per: dict[str, Any] = {"num_samples": len(rows)}
    summ: dict[str, Any] = {"num_samples": len(rows)}
    if emotions and task in EMOTION_TASKS:
      judged = [r for r in rows if r["emotion_true"] is not None]
      y_true = [emotions.index(r["emotion_true"]) for r in judged]
      y_pred = [emotions.index(r["emotion_pred"]) if r["emotion_pred"] is not None else -1
                for r in judged]
      em = metrics.classification_metrics(y_true, y_pred, len(emotions), emotions)
      per["emotion"] = em
      summ.update(accuracy=em["accuracy"], macro_f1=em["macro_f1"], uar=em["uar"],
                  emotion_unparsed=em["unparsed"])
    if au_set and task in AU_TASKS:
      judged = [r for r in rows if r["aus_true"] is not None]
      if judged:
        t = np.asarray([r["au_annotation"] for r in judged], np.int64)
        p = np.stack([metrics.aus_to_vector(r["aus_pred"], au_set) for r in judged])
        am = metrics.au_f1(t, p, au_set)
      else:
        am = metrics.au_f1(np.zeros((0, len(au_set))), np.zeros((0, len(au_set))), au_set)
      am["unparsed"] = sum(r["aus_pred"] is None for r in judged)
      per["aus"] = am
      summ.update(au_mean_f1=am["mean_f1"], aus_unparsed=am["unparsed"])
    if task == "reasoning":
      cons = metrics.emfacs_consistency([r["text_emotion"] for r in rows],
                                        [r["text_aus"] for r in rows])
      per["emfacs_consistency"] = cons
      per["rouge_l"] = float(np.mean([r["rouge_l"] for r in rows])) if rows else 0.0
      summ.update(emfacs_consistency=cons["rate"], rouge_l=per["rouge_l"])
    tasks[task] = per
    summary[task] = summ
  return dict(dataset=suite.dataset, split=suite.split, mode=mode,
              num_samples=len(records), tasks=tasks, summary=summary)


# --- entry points ----------------------------------------------------------------------------------

def evaluate_model(model, config, suites: Sequence[str] | str | None = None,
                   mode: str | None = None, out_dir: str | None = None, *,
                   progress: bool = True, meta: Mapping[str, Any] | None = None,
                   tasks: Sequence[str] | None = None) -> dict:
  """Evaluates a live model on ``suites``; writes every output to ``out_dir`` when given.

  ``tasks`` (optional) keeps only those tasks of each suite (e.g. ``("fer",)`` for a
  closed-set FER pass in score mode). Returns ``{"meta": ..., "suites": {name: metrics}}``
  (plus ``"files"`` when written).
  """
  from feallm_jax.data import tokenizer as tok_lib
  mode = mode or str(config.eval.get("mode", "generate"))
  if mode not in MODES:
    raise ValueError(f"eval mode must be one of {MODES}, got {mode!r}")
  chosen = resolve_suites(suites, config)
  if tasks is not None:
    chosen = [dataclasses.replace(s, tasks=tuple(t for t in s.tasks if t in tasks))
              for s in chosen]
    chosen = [s for s in chosen if s.tasks]
    if not chosen:
      raise ValueError(f"tasks={tuple(tasks)}: no suite has any of them")
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  e = config.eval
  sampling = gen.SamplingConfig(
      max_new_tokens=int(e.get("max_new_tokens", 48)),
      temperature=float(e.get("temperature", 0.0)), top_p=float(e.get("top_p", 1.0)),
      eos_ids=eos_ids(tok), pad_id=int(tok.pad_token_id), seed=int(config.get("seed", 0)))
  results: dict[str, Any] = {"meta": dict(meta or {}, mode=mode,
                                          config=str(config.get("name", "")),
                                          max_new_tokens=sampling.max_new_tokens,
                                          temperature=sampling.temperature)}
  results["suites"] = {}
  predictions = {}
  for suite in chosen:
    t0 = time.perf_counter()
    records = predict_suite(model, config, suite, mode, tok, sampling, progress=progress)
    res = suite_metrics(records, suite, mode)
    res["seconds"] = time.perf_counter() - t0
    results["suites"][suite.name] = res
    predictions[suite.name] = records
    log.info("%s: %s", suite.name, res["summary"])
  if out_dir:
    results["files"] = report.write_all(out_dir, results, predictions)
  return results


def resolve_checkpoint(workdir: str, checkpoint: int | str | None) -> tuple[str, int | None]:
  """``(run workdir, step or None = latest)`` from a step, a run dir or a step directory."""
  if checkpoint is None or checkpoint == "":
    return workdir, None
  if isinstance(checkpoint, (int, np.integer)) or str(checkpoint).isdigit():
    return workdir, int(checkpoint)
  path = paths.resolve(str(checkpoint))          # local or gs://
  if (paths.path(path) / "checkpoints").exists():
    return path, None
  base = os.path.basename(path.rstrip("/"))
  parent = os.path.dirname(path.rstrip("/"))
  if base.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(base)
  raise FileNotFoundError(f"--checkpoint={checkpoint}: expected a step number, a training "
                          "workdir (with checkpoints/) or a checkpoints/<step> directory")


def load_model(config, workdir: str, checkpoint: int | str | None = None, mesh=None):
  """Builds the model for ``config`` and restores a run's trained weights; returns (model, step)."""
  from feallm_jax import sharding
  from feallm_jax.models import feallm
  from feallm_jax.train import checkpoint as ckpt_lib
  run_dir, step = resolve_checkpoint(workdir, checkpoint)
  if not (paths.path(run_dir) / "checkpoints").exists():
    raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory (train first with "
                            f"launch/train.py --workdir={run_dir})")
  mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
  model = feallm.build_model(config, mesh)
  step = ckpt_lib.restore_weights(model, config, run_dir, trainable=feallm.trainable_filter(config),
                                  step=step)
  return model, step


def evaluate(config, workdir: str, checkpoint: int | str | None = None,
             suites: Sequence[str] | str | None = None, mode: str | None = None, *,
             out_dir: str | None = None, progress: bool = True,
             tasks: Sequence[str] | None = None, model=None) -> dict:
  """Restores ``workdir``'s checkpoint (latest unless given) and evaluates it.

  Outputs go to ``out_dir`` (default ``<workdir>/eval/step_<step>``). ``model`` (the training
  loop's live state, ``Trainer.merge``) is evaluated as step ``checkpoint`` instead of restoring
  it: nothing is rebuilt and the base weights are not read again.
  """
  if model is None:
    model, step = load_model(config, workdir, checkpoint)
  elif isinstance(checkpoint, (int, np.integer)) or str(checkpoint).isdigit():
    step = int(checkpoint)
  else:
    raise ValueError(f"evaluate(model=...): checkpoint must be the model's step, got {checkpoint!r}")
  out_dir = out_dir or os.path.join(workdir, "eval", f"step_{step}")
  return evaluate_model(model, config, suites, mode, out_dir, progress=progress,
                        meta=dict(step=step, workdir=paths.resolve(workdir)), tasks=tasks)
