"""FEABench-style evaluation: FER, AUR, joint and reasoning tasks over evaluation suites.

Suites (``SUITES``): ``synthetic_fea`` (test split, all four tasks; builds itself on first use)
is the embedded default; ``raf_db`` (7-way FER), ``affectnet_7`` / ``affectnet_8`` (FER),
``bp4d`` (12-AU F1) and ``disfa`` (8-AU F1) read the tfds builders under
``config.data.data_dir`` zero-shot. For bp4d / disfa the headline ``au_mean_f1`` is the
published protocol's 3-fold mean (F1 per subject part, averaged; ``au_mean_f1_pooled`` is
the F1 over all records, ``folds`` each part's own numbers). A suite whose data is not built
fails with the builder name and the command that builds it.

Modes:
* ``generate``: every answer is generated (greedy unless ``config.eval.temperature`` > 0) and
  parsed (``eval/parse.py``); unparseable answers count as wrong and are reported.
* ``score``: the emotion is the label whose answer string (" Happiness." …) has the highest
  log-likelihood after the prompt (``generate.score_candidates``): nothing to parse. Tasks that
  also need AUs or free text (aur, joint, reasoning) still generate for those parts.

A prompt that cannot be fitted into ``data.max_len`` (``pipeline.Unfit``: its ``<image>`` past
``max_len``, an undecodable image, ...) is scored as unanswerable: no prediction (wrong), and
counted per task (``unanswerable``) and per reason (``num_unanswerable``, ``unanswerable``).

``evaluate(config, workdir, ...)`` restores a training checkpoint (or, with ``model=``, takes the
training loop's live state as that step: the loop's periodic and final evaluations);
``evaluate_model(model, config, ...)`` takes a live model and writes no index (notebooks).

Where results go (``eval/store.py``): every evaluation gets its own folder,
``<workdir>/eval/step_<N>_<mode>_<suites>[-<tasks>]_n<samples>_<key>``, where ``key`` hashes the
settings that change the numbers (``eval_settings``, recorded in results.json as ``settings``);
re-running the same evaluation replaces its own folder (and says so), anything else is refused.
``evaluate`` also appends a line to ``<workdir>/eval/index.jsonl`` and logs the headline metrics
to ``metrics.jsonl`` / TensorBoard under ``eval/<mode>/<suite>/<task>/<metric>``.
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
from feallm_jax.eval import metrics, parse, store

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


class FaceTokens:
  """Visual tokens of the faces answered so far, by record: FEABench asks up to four questions
  about each face (FER, AUs, both, reasoning) and ``pipeline.eval_batches`` puts them in the
  same window of records, so each face is encoded once. Holds at most ``capacity`` faces
  (0 = no bound), oldest dropped first."""

  def __init__(self, capacity: int):
    self.capacity, self.rows = int(capacity), {}
    self.encoded = self.reused = 0

  def encode(self, model, batch: Mapping[str, Any], metas: Sequence[Mapping[str, Any]]) -> dict:
    """``batch`` with ``visual`` (from the store, or encoded now) in place of the images."""
    from feallm_jax import distributed
    keys = [m.get("record") if m.get("real") and not m.get("unfit") else None for m in metas]
    hit = any(k is not None for k in keys) and all(k is None or k in self.rows for k in keys)
    # One batch's faces are encoded on every process or on none (a collective computation).
    hit = not distributed.any_process(not hit)
    if hit:
      blank = np.zeros_like(next(self.rows[k] for k in keys if k is not None))
      visual = np.stack([self.rows[k] if k is not None else blank for k in keys])
      self.reused += sum(k is not None for k in keys)
    else:
      visual = gen.visual_tokens(model, batch)
      for k, row in zip(keys, visual):
        if k is not None:
          self.rows.pop(k, None)
          self.rows[k] = row
          self.encoded += 1
      while self.capacity and len(self.rows) > self.capacity:
        self.rows.pop(next(iter(self.rows)))
    out = {k: v for k, v in batch.items() if k not in gen.IMAGE_KEYS + gen.OPTIONAL_KEYS_VISION}
    out["visual"] = visual
    return out


def predict_suite(model, config, suite: Suite, mode: str, tok, sampling: gen.SamplingConfig, *,
                  progress: bool = True, source=None) -> list[dict[str, Any]]:
  """Per-sample predictions (one dict per real eval row) for one suite.

  In a multi-process job every process reads, prepares and answers only its block of each
  global batch (``pipeline.eval_batches``); the records are gathered afterwards, so every
  process returns the whole suite in the order a single process gives."""
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
  import jax

  from feallm_jax import distributed
  multi = jax.process_count() > 1
  per_batch: list[list[dict[str, Any]]] = []   # this process's records, batch by batch

  def chain():
    yield first
    yield from batches

  faces = FaceTokens(pipeline.reuse_window(config))
  # Split once, LoRA folded (and narrowed when eval.matmul_dtype asks): every batch reuses it.
  model = gen.eval_view(model, matmul_dtype=gen.config_matmul_dtype(config))

  distributed.barrier(f"eval {suite.name}")   # before the first collective of the suite
  for batch, metas in _progress(chain(), f"{suite.name} ({mode})",
                                progress and jax.process_index() == 0):
    records: list[dict[str, Any]] = []
    per_batch.append(records)
    # Rows the model answers; a real row whose prompt could not be fitted (meta "unfit") is
    # recorded below as unanswerable: no prediction, so it counts as wrong.
    real = np.asarray(batch["example_mask"]).astype(bool)
    tasks = [m["task"] for m in metas]
    need_text = mode == "generate" or any(t in AU_TASKS or t is None
                                          for t, r in zip(tasks, real) if r)
    need_scores = cand is not None and any(t in EMOTION_TASKS for t, r in zip(tasks, real) if r)
    if multi:   # a computation runs on every process or on none (the global batch decides)
      need_text, need_scores = (distributed.any_process(need_text),
                                distributed.any_process(need_scores))
    texts = [None] * len(metas)
    if (need_text or need_scores) and gen.is_vision_model(model):
      batch = faces.encode(model, batch, metas)
    if need_text:
      tokens, lengths = gen.generate(model, batch, sampling)
      texts = gen.decode_tokens(tok, tokens, lengths, sampling.eos_ids)
    scores = None
    if need_scores:
      scores = gen.score_candidates(model, batch, *cand,
                                    reduction=str(e.get("score_reduction", "sum")))
    for i, meta in enumerate(metas):
      unfit = meta.get("unfit")
      if not (real[i] or (meta["real"] and unfit)):
        continue
      task = meta["task"] or "free"
      text = None if unfit else texts[i]
      true_emotion = facs.EMOTIONS[meta["emotion"]] if meta["emotion"] >= 0 else None
      rec: dict[str, Any] = dict(id=meta["id"], task=task, prompt=meta["prompt"],
                                 reference=meta["reference"], prediction=text)
      if unfit:
        rec["unanswerable"] = unfit
      if emotions and task in EMOTION_TASKS:
        rec["emotion_true"] = true_emotion if true_emotion in emotions else None
        if unfit:
          rec["emotion_pred"] = None
        elif scores is not None:
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
  log.info("%s: %d faces encoded, %d answers reused an encoded face", suite.name, faces.encoded,
           faces.reused)
  if not multi:
    return [r for b in per_batch for r in b]
  # Every process answered its block of each global batch: batch by batch, process by
  # process is the order of the global rows (one process's order).
  gathered = distributed.allgather_objects(per_batch)
  return [r for k in range(len(per_batch)) for blocks in gathered for r in blocks[k]]


def suite_metrics(records: Sequence[Mapping[str, Any]], suite: Suite, mode: str) -> dict:
  """Every metric of one suite, per task, plus a flat summary per task for tables and logs."""
  from feallm_jax.data import pipeline
  labels = pipeline.label_set(suite.dataset)
  emotions, au_set = labels["emotions"], labels["aus"]
  tasks: dict[str, Any] = {}
  summary: dict[str, Any] = {}
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    unanswerable = sum(bool(r.get("unanswerable")) for r in rows)
    per: dict[str, Any] = {"num_samples": len(rows), "unanswerable": unanswerable}
    summ: dict[str, Any] = {"num_samples": len(rows), "unanswerable": unanswerable}
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
      folds = fold_au_f1(judged, au_set, suite.dataset)
      if folds:
        am = three_fold_mean(am, folds)
        summ.update(au_mean_f1_pooled=am["pooled_mean_f1"])
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
  unfit: dict[str, int] = {}
  for r in records:
    if r.get("unanswerable"):
      unfit[r["unanswerable"]] = unfit.get(r["unanswerable"], 0) + 1
  return dict(dataset=suite.dataset, split=suite.split, mode=mode,
              num_samples=len(records), num_unanswerable=sum(unfit.values()),
              unanswerable=unfit, tasks=tasks, summary=summary)


def fold_au_f1(judged: Sequence[Mapping[str, Any]], au_set, dataset: str) -> dict[str, dict]:
  """Per-fold AU F1 of a BP4D / DISFA suite: {'fold<k>': au_f1 over the records of subject
  part k} (the part is read from the record id's subject, ``F001_T1_2440`` / ``SN001_00001``).
  Empty for other datasets."""
  from feallm_jax.data import builders
  from feallm_jax.data.builders import common
  name = dataset.split("/")[0]
  if name not in builders.FOLD_DATASETS or not judged:
    return {}
  parts = common.BP4D_FOLDS if name == "bp4d" else common.DISFA_FOLDS
  by: dict[str, list] = {}
  for r in judged:
    k = common.fold_of(str(r["id"]).split("_")[0].upper(), parts)
    if k is not None:
      by.setdefault(f"fold{k + 1}", []).append(r)
  out = {}
  for f in sorted(by):
    rows = by[f]
    t = np.asarray([r["au_annotation"] for r in rows], np.int64)
    p = np.stack([metrics.aus_to_vector(r["aus_pred"], au_set) for r in rows])
    out[f] = metrics.au_f1(t, p, au_set)
  return out


def three_fold_mean(pooled: dict, folds: dict[str, dict]) -> dict:
  """The published BP4D / DISFA number: F1 per test fold, averaged over the folds (JAA-Net,
  ME-GraphAU; EmoLA llava/eval/calculate_threefolds_AU.py: per-AU mean over folds, then the
  mean). ``mean_f1`` / ``per_au_f1`` become those means; the F1 over all records pooled stays as
  ``pooled_mean_f1`` / ``pooled_per_au_f1``; ``folds`` holds each fold's own numbers."""
  out = dict(pooled)
  aus = list(pooled["per_au_f1"])
  out["pooled_mean_f1"], out["pooled_per_au_f1"] = pooled["mean_f1"], pooled["per_au_f1"]
  out["per_au_f1"] = {a: float(np.mean([f["per_au_f1"][a] for f in folds.values()]))
                      for a in aus}
  out["mean_f1"] = float(np.mean([f["mean_f1"] for f in folds.values()]))
  out["folds"] = {k: dict(mean_f1=f["mean_f1"], per_au_f1=f["per_au_f1"],
                          num_samples=f["num_samples"]) for k, f in folds.items()}
  out["fold_mean_over"] = sorted(folds)
  return out


# --- what an evaluation is --------------------------------------------------------------------

def plan(config, suites: Sequence[str] | str | None = None, mode: str | None = None,
         tasks: Sequence[str] | None = None) -> tuple[str, list[Suite]]:
  """``(mode, suites)`` after defaults and the ``tasks`` restriction; bad names fail here."""
  mode = mode or str(config.eval.get("mode", "generate"))
  if mode not in MODES:
    raise ValueError(f"eval mode must be one of {MODES}, got {mode!r} (--mode)")
  chosen = resolve_suites(suites, config)
  if tasks is not None:
    chosen = [dataclasses.replace(s, tasks=tuple(t for t in s.tasks if t in tasks))
              for s in chosen]
    chosen = [s for s in chosen if s.tasks]
    if not chosen:
      raise ValueError(f"tasks={tuple(tasks)}: no suite has any of them")
  return mode, chosen


def eval_settings(config, suites: Sequence[Suite], mode: str,
                  tasks: Sequence[str] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Every setting that changes an evaluation's numbers (its folder key hashes exactly these).

  The prompt seed picks the instruction wording (and seeds sampling); generation settings count
  only when something is generated (score mode on FER alone generates nothing), the score
  reduction only when candidates are scored. Batch size is left out: it changes no number.
  """
  e, d = config.eval, config.data
  all_tasks = {t for s in suites for t in s.tasks}
  generates = mode == "generate" or bool(all_tasks & set(AU_TASKS))
  scores = mode == "score" and bool(all_tasks & set(EMOTION_TASKS))
  data: dict[str, Any] = dict(max_len=int(d.max_len), regions=str(d.get("regions", "canonical")),
                              lca_image_size=int(d.get("lca_image_size", 0) or 0))
  if any(s.dataset == d.dataset for s in suites):      # pipeline.data_source uses it then
    data["builder_config"] = str(d.get("builder_config", "") or "")
  out: dict[str, Any] = dict(
      suites={s.name: dict(dataset=s.dataset, split=s.split, tasks=list(s.tasks))
              for s in suites},
      tasks=sorted(tasks) if tasks is not None else None,
      num_samples=int(e.get("num_samples", 0) or 0),
      seed=int(config.get("seed", 0)), data=data)
  if generates:
    out["generation"] = dict(max_new_tokens=int(e.get("max_new_tokens", 48)),
                             temperature=float(e.get("temperature", 0.0)),
                             top_p=float(e.get("top_p", 1.0)))
  if scores:
    out["score_reduction"] = str(e.get("score_reduction", "sum"))
  matmul = gen.config_matmul_dtype(config)
  if matmul != "float32":     # only then: float32 evaluations keep the keys they always had
    out["matmul_dtype"] = matmul
  out.update(extra or {})
  return out


def model_size(model, config, step: int | None) -> dict[str, Any]:
  """Trainable / frozen parameters and the analytic training FLOPs up to ``step`` (model FLOPs
  per padded example, ``flops.train_step``, x ``data.batch_size`` x steps): the x axes of a
  scaling comparison."""
  spec = getattr(model, "spec", None)
  if spec is None:
    return {}
  from feallm_jax import flops
  from feallm_jax.models import feallm
  counts = feallm.parameter_counts(model, spec)["total"]
  per_example = flops.train_step(spec, int(config.data.max_len))["total"]
  out = dict(trainable_params=int(counts["trainable"]), frozen_params=int(counts["frozen"]),
             train_flops_per_example=float(per_example))
  if step is not None:
    out["train_flops"] = float(per_example) * int(config.data.batch_size) * int(step)
  return out


# --- entry points ----------------------------------------------------------------------------------

def evaluate_model(model, config, suites: Sequence[str] | str | None = None,
                   mode: str | None = None, out_dir: str | None = None, *,
                   progress: bool = True, meta: Mapping[str, Any] | None = None,
                   tasks: Sequence[str] | None = None,
                   extra_settings: Mapping[str, Any] | None = None) -> dict:
  """Evaluates a live model on ``suites``; writes every output to ``out_dir`` when given.

  ``tasks`` (optional) keeps only those tasks of each suite (e.g. ``("fer",)`` for a
  closed-set FER pass in score mode). Returns ``{"meta": ..., "settings": ..., "suites":
  {name: metrics}}`` (plus ``"files"`` when written). An ``out_dir`` that holds another
  evaluation is refused before anything runs (``store.EvalConflictError``); one that holds this
  same evaluation is replaced.
  """
  from feallm_jax import preflight
  from feallm_jax.data import tokenizer as tok_lib
  config = preflight.resolve_backbones(config)   # image size etc. from the towers' checkpoints
  mode, chosen = plan(config, suites, mode, tasks)
  settings = eval_settings(config, chosen, mode, tasks, extra_settings)
  meta = dict(meta or {})
  results: dict[str, Any] = {"meta": dict(meta, mode=mode, config=str(config.get("name", "")),
                                          key=store.settings_key(settings)),
                             "settings": settings}
  results["meta"].update(model_size(model, config, meta.get("step")))
  writes = bool(out_dir) and _is_writer()
  if writes:
    store.check_target(out_dir, store.identity(results))
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  sampling = sampling_config(config, tok)
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
  if writes:
    results["files"], results["replaced"] = store.write_results(out_dir, results, predictions)
  return results


def sampling_config(config, tok) -> gen.SamplingConfig:
  """How an evaluation picks its answers' tokens (``config.eval``; stops at ``tok``'s EOS)."""
  e = config.eval
  return gen.SamplingConfig(
      max_new_tokens=int(e.get("max_new_tokens", 48)),
      temperature=float(e.get("temperature", 0.0)), top_p=float(e.get("top_p", 1.0)),
      eos_ids=eos_ids(tok), pad_id=int(tok.pad_token_id), seed=int(config.get("seed", 0)))


def _is_writer() -> bool:
  """Only process 0 writes result files and the index (every process computes the metrics)."""
  import jax
  return jax.process_index() == 0


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
  """Builds the model for ``config`` and restores a run's trained weights; returns (model, step).

  The model comes back with dropout off (``layers.with_dropout``): it is for evaluation,
  generation and ``predict --explain``'s forward pass."""
  from feallm_jax import preflight, sharding
  from feallm_jax.models import feallm
  from feallm_jax.train import checkpoint as ckpt_lib
  config = preflight.resolve_backbones(config)
  run_dir, step = resolve_checkpoint(workdir, checkpoint)
  if not (paths.path(run_dir) / "checkpoints").exists():
    raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory (train first with "
                            f"launch/train.py --workdir={run_dir})")
  mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
  model = feallm.build_model(config, mesh, log=False)   # the training run showed its table
  step = ckpt_lib.restore_weights(model, config, run_dir, trainable=feallm.trainable_filter(config),
                                  step=step)
  from feallm_jax.models import layers
  return layers.with_dropout(model, False), step


def evaluate(config, workdir: str, checkpoint: int | str | None = None,
             suites: Sequence[str] | str | None = None, mode: str | None = None, *,
             out_dir: str | None = None, progress: bool = True,
             tasks: Sequence[str] | None = None, logger=None, model=None) -> dict:
  """Restores ``workdir``'s checkpoint (latest unless given) and evaluates it.

  Outputs go to ``out_dir`` (default ``<workdir>/eval/<store.folder_name(step, mode,
  settings)>``; ``workdir`` local or ``gs://``); the evaluation is appended to
  ``<workdir>/eval/index.jsonl`` and its headline metrics are logged through ``logger`` (a
  ``train.metrics_log.MetricsLogger``; one is opened on ``workdir`` when None) as
  ``eval/<mode>/<suite>/<task>/<metric>``. Suite names and their datasets are checked before the
  model is built (``preflight.check_suites``).

  ``model`` (the training loop's live state, ``Trainer.merge``) is evaluated as step
  ``checkpoint`` of ``workdir`` instead of restoring it: nothing is rebuilt and the base weights
  are not read again. Its folder, key and numbers are those an offline evaluation of the saved
  step gives.
  """
  from feallm_jax import compile_cache, console, preflight
  from feallm_jax.train import metrics_log
  console.setup_once()
  compile_cache.enable_once(config)
  problems = preflight.check_suites(config, suites, flag="--suites" if suites is not None
                                    else "--config.eval.suites")
  problems += preflight.check_eval_settings(config)
  if problems:
    raise preflight.PreflightError(problems)
  mode, chosen = plan(config, suites, mode, tasks)     # bad names fail before the restore
  workdir = paths.resolve(workdir)                      # a gs:// URL stays a URL
  if model is None:
    run_dir, _ = resolve_checkpoint(workdir, checkpoint)
    run_dir = paths.resolve(run_dir)
    model, step = load_model(config, workdir, checkpoint)
  elif isinstance(checkpoint, (int, np.integer)) or str(checkpoint).isdigit():
    run_dir, step = workdir, int(checkpoint)
  else:
    raise ValueError(f"evaluate(model=...): checkpoint must be the model's step, got "
                     f"{checkpoint!r}")
  extra = {"checkpoint_run": run_dir} if run_dir != workdir else None
  if not out_dir:
    settings = eval_settings(config, chosen, mode, tasks, extra)
    out_dir = os.path.join(store.eval_dir(workdir), store.folder_name(step, mode, settings))
  results = evaluate_model(model, config, [s.name for s in chosen], mode, out_dir,
                           progress=progress, tasks=tasks, extra_settings=extra,
                           meta=dict(step=step, workdir=workdir, checkpoint=run_dir))
  if "files" in results:
    entry = store.index_entry(results, out_dir, workdir, replaced=results["replaced"])
    results["files"]["index"] = store.append_index(workdir, entry)
    log.info("evaluation %s indexed in %s", entry["path"], results["files"]["index"])
  own = logger is None
  logger = logger or metrics_log.MetricsLogger(workdir, total_steps=0, progress=False)
  try:
    logger.log(step, store.headline(results), kind=f"eval/{mode}")
  finally:
    if own:
      logger.close()
  return results
