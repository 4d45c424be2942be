"""``train_and_evaluate(config, workdir)``: the whole training run, importable from a notebook.

Order matters for the "refuse before writing" guarantee: ``feallm_jax.preflight`` checks everything
knowable (and resolves the towers from their checkpoints), then the workdir's checkpoints are checked
against the config (architecture, base-weight fingerprint, trainable shapes) *before* any file
is created. Restarting the same command resumes from the newest good checkpoint; SIGTERM (a
preempted VM) saves at the next step boundary and exits cleanly.

Examples that cannot be fitted are dropped by the pipeline, never fatal one by one: the run
refuses to start when the first examples it would draw all drop (pre-flight's
``check_data_fit``: data.max_len against the conversations with their visual tokens), logs
the cumulative counts by reason with every record, and stops (``DroppedExamplesError``, naming
the reason, the count and the flag) only once more than ``data.max_dropped_fraction`` of the
examples drawn were dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from feallm_jax import distributed, paths, sharding
from feallm_jax.train import checkpoint as ckpt_lib
from feallm_jax.train import metrics_log
from feallm_jax.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps."""


# -- base-weight fingerprint -------------------------------------------------------------------

def _hf_dir_fingerprint(path: str) -> str:
  """Cheap identity of an HF directory: config.json text plus weight-file names and sizes."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if name == "config.json":
      with open(full, "rb") as f:
        h.update(f.read())
    elif name.endswith((".safetensors", ".bin", ".json")) and os.path.isfile(full):
      h.update(f"{name}:{os.path.getsize(full)}".encode())
  return h.hexdigest()


def base_fingerprint(config, *, has_frozen: bool) -> str:
  """Which frozen weights this run starts from (checked on resume; the weights are not saved)."""
  if not has_frozen:
    return ""
  m = config.model
  base = m.get("base_checkpoint", "")
  if base:
    from feallm_jax.weights import base_checkpoint as bc
    meta = bc.read_meta(base)
    return f"base_checkpoint:{meta.get('fingerprint') or bc.fingerprint(base)}"
  parts = []
  for tower in ("vision", "llm"):
    path = m[tower].get("hf_path", "")
    parts.append(f"{tower}=hf:{_hf_dir_fingerprint(path)}" if path else
                 f"{tower}=init(seed={int(config.get('seed', 0))})")
  return ";".join(parts)


# -- config checks ----------------------------------------------------------------------------

def _check_config(config) -> None:
  t, d = config.train, config.data
  for key in ("num_steps", "log_every", "save_every", "keep"):
    if int(t[key]) <= 0:
      raise ValueError(f"train.{key} must be positive, got {t[key]}")
  if int(t.get("max_bad_steps", 0)) < 0:
    raise ValueError(f"train.max_bad_steps must be >= 0, got {t.max_bad_steps}")
  if config.get("require_pretrained", False):
    m = config.model
    if not m.get("base_checkpoint", "") and not (m.vision.hf_path and m.llm.hf_path):
      raise ValueError(
          f"config {config.get('name', '')!r} trains adapters on pretrained backbones: set "
          "--config.model.base_checkpoint=DIR (from launch/import_hf.py) or both "
          "--config.model.vision.hf_path and --config.model.llm.hf_path to local HF dirs")
    if not d.get("tokenizer", ""):
      raise ValueError("set --config.data.tokenizer to the LLM's local HF tokenizer dir")
  frac = float(d.get("max_dropped_fraction", 0.01))
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f"data.max_dropped_fraction must be in [0, 1], got {frac}")
  if int(d.get("drop_check_after", 1000)) < 0 or int(d.get("fit_check_examples", 256)) < 0:
    raise ValueError("data.drop_check_after and data.fit_check_examples must be >= 0")
  pc = jax.process_count()
  if int(d.batch_size) % pc:
    raise ValueError(f"data.batch_size={d.batch_size} does not split over {pc} processes")


# -- SIGTERM ----------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM (a preempted VM) -> "save and stop at this step boundary", at the same step on every
  process. Poll ``should_stop(step)`` once per step, before the step runs.

  * One process: a Python SIGTERM handler sets a flag (no communication at all).
  * Several processes (``jax.distributed``): JAX's preemption sync manager (what Orbax's
    ``CheckpointManager.reached_preemption`` asks) catches SIGTERM on any host and the
    coordination service agrees in the background on a step every host reaches;
    ``reached_preemption_sync_point(step)`` is then a local check (~0.2 us), where the former
    ``process_allgather`` of the flag was a host round trip every step (``bench/preemption.py``).
    Orbax's wrapper turns a disabled service into "never preempted", so its JAX call is made
    here directly, which tells the two apart.
  * Several processes without that service (``jax_enable_preemption_service=False``): the
    Python flag is all-gathered only every ``train.preemption_check_every`` steps, the same steps
    on every host.
  """

  def __init__(self, check_every: int = 10):
    if check_every < 1:
      raise ValueError(f"train.preemption_check_every must be >= 1, got {check_every}")
    self.check_every = check_every
    self.requested = False
    self._previous = None
    self.mode = "flag"
    if jax.process_count() > 1:
      self.mode = "jax" if jax.config.jax_enable_preemption_service else "gather"

  def __enter__(self):
    if self.mode != "jax":       # JAX's own notifier owns SIGTERM otherwise
      self._install()
    return self

  def _install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    log.warning("signal %d received: saving a checkpoint at the next step boundary", signum)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """True on every process at the same ``step`` once any process got SIGTERM."""
    if self.mode == "flag":
      return self.requested
    if self.mode == "jax":
      from jax.experimental import multihost_utils
      try:
        hit = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:      # no sync manager after all: fall back to the flag
        log.warning("JAX preemption service unavailable (%s); all-gathering the SIGTERM flag "
                    "every %d steps", e, self.check_every)
        self.mode = "gather"
        self._install()
        return self.should_stop(step)
      if hit:
        log.warning("preemption sync point reached at step %d on every process: saving", step)
      return bool(hit)
    if step % self.check_every:
      return False
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.asarray([int(self.requested)]))))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _global_drops(data_iter):
  """The run's drop counts summed over processes (the same DropLog on every host, so every
  host stops at the same step); None for an iterator without drop accounting."""
  drops = getattr(data_iter, "drops", None)
  if drops is None or jax.process_count() == 1:
    return drops
  from jax.experimental import multihost_utils
  from feallm_jax.data import pipeline
  vectors = multihost_utils.process_allgather(drops.to_vector().astype(np.int32))
  return pipeline.DropLog.from_vectors(np.asarray(vectors), ids=drops.ids)


# -- evaluation -------------------------------------------------------------------------------

def _evaluate(config, workdir: str, step: int, logger: metrics_log.MetricsLogger | None = None,
              *, model=None):
  """Evaluates step ``step`` into its own folder under ``eval/`` (indexed); the headline metrics
  go to ``logger`` (or a logger ``feabench.evaluate`` opens) as ``eval/<mode>/...``.

  ``model`` is the live train state (``Trainer.merge``: the trainer's own buffers, trainable +
  frozen, merged once per evaluation): nothing is rebuilt and the base weights are not read
  again, so at 7B no second copy of the frozen towers is allocated.
  ``feabench.evaluate(config, workdir, checkpoint=step)`` gives the same numbers offline from the
  step's checkpoint.
  """
  suites = tuple(config.eval.get("suites", ()) or ())
  if not suites:
    return None
  try:
    from feallm_jax.eval import feabench
  except ImportError as e:
    log.warning("evaluation skipped at step %d: feallm_jax.eval.feabench unavailable (%s)", step, e)
    return None
  return feabench.evaluate(config, workdir, checkpoint=step, suites=suites,
                           mode=config.eval.get("mode", "generate"), logger=logger, model=model)


# -- the run ----------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary."""
  from feallm_jax.data import pipeline
  from feallm_jax.models import feallm

  from feallm_jax import compile_cache, console, preflight
  console.setup_once()                # quiet library logs inside absl apps (--verbosity=0: all)
  workdir = paths.resolve(workdir)    # a gs:// URL stays a URL
  # 0. Everything knowable before the first step (suites, data, checkpoint vs config, tokenizer,
  #    mesh, batch, workdir); the towers' own configs replace the config's backbone fields.
  config = preflight.run(config, workdir)
  # 1. Refuse a foreign workdir before building anything (cheap architecture check).
  _check_config(config)
  ckpt_lib.check_workdir(config, workdir, base_fingerprint=None)
  compile_cache.enable_once(config)   # before the first compile: reruns/resumes reuse programs
  source = pipeline.data_source(config, split="train", decode_images=False)

  mesh = sharding.make_mesh(dict(config.mesh))
  model = feallm.build_model(config, mesh)
  if config.model.get("init_adapter", ""):
    from feallm_jax.pretrain import align   # LCA + projector from adapter alignment
    with sharding.mesh_rules(mesh):
      align.restore_into(str(config.model.init_adapter), model, config)
  overview = feallm.parameter_overview(model, config)
  trainable = feallm.trainable_filter(config)
  distributed.barrier("trainer")      # the processes meet before the first collective
  trainer = step_lib.Trainer(config, model, mesh, loss_fn=feallm.loss_fn, trainable=trainable)
  del model  # the train state holds its own copy of the trainable weights: free this one
  has_frozen = bool(jax.tree.leaves(trainer.frozen))
  fingerprint = base_fingerprint(config, has_frozen=has_frozen)
  # 2. Full check (base fingerprint, trainable shapes) still before anything is written.
  found = ckpt_lib.check_workdir(config, workdir, fingerprint)
  data_iter = pipeline.train_iterator(config, split="train", seed=int(config.get("seed", 0)),
                                      source=source)

  ckpt = ckpt_lib.Checkpointer(workdir, config, base_fingerprint=fingerprint)
  logger = None
  summary: dict[str, Any] = {"workdir": workdir}
  try:
    restored = ckpt.restore(trainer.abstract_state(), data_iter) if found is not None else None
    if restored is not None:
      state, start = restored
      log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
      state, start = trainer.initial_state(), 0
    num_steps = int(config.train.num_steps)
    logger = metrics_log.MetricsLogger(workdir, total_steps=num_steps, start_step=start,
                                       progress=bool(config.train.get("progress", True)))
    if start == 0:
      logger.text("config", "```\n" + json.dumps(ckpt_lib.config_json(config), indent=1) + "\n```")
    logger.text("parameters", "```\n" + overview + "\n```", step=start)
    summary.update(start_step=start, resumed=restored is not None)
    result = _run(config, workdir, trainer, state, start, data_iter, ckpt, logger)
    summary.update(result)
  finally:
    ckpt.close()       # waits for every async save
    if logger is not None:
      logger.close()
  if summary.get("preempted"):
    return summary
  if config.train.get("final_eval", True) and config.eval.get("suites", ()):
    summary["eval"] = _evaluate(config, workdir, summary["final_step"],
                                model=trainer.merge(summary["state"]))
  return summary


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x), jax.device_get(tree))


def _run(config, workdir, trainer, state, start, data_iter, ckpt, logger) -> dict[str, Any]:
  from feallm_jax.data import pipeline
  t = config.train
  num_steps, log_every = int(t.num_steps), int(t.log_every)
  save_every, eval_every = int(t.save_every), int(t.get("eval_every", 0))
  max_bad = int(t.get("max_bad_steps", 5))
  d = config.data
  max_dropped = float(d.get("max_dropped_fraction", 0.01))
  drop_check_after, max_len = int(d.get("drop_check_after", 1000)), int(d.max_len)
  pending: list[dict] = []          # device metrics since the last log
  last_record: dict[str, Any] = {}
  lagged = None                     # previous step's bad-streak scalar (checked one step late)
  step = start
  t_log, tokens_since = time.perf_counter(), 0
  preempted = False

  def check_streak(value) -> None:
    streak = int(np.asarray(value))
    if streak > max_bad:
      last = ckpt.latest_step()
      raise NonFiniteError(
          f"{streak} consecutive non-finite steps (loss or gradient NaN/Inf) at step {step}, "
          f"more than train.max_bad_steps={max_bad}; stopping. The last good checkpoint "
          f"({'step ' + str(last) if last is not None else 'none'}) in {ckpt.directory} is intact.")

  def flush_logs():
    nonlocal pending, t_log, tokens_since, last_record
    if not pending:
      return
    host = _host([m for _, m in pending])
    elapsed = time.perf_counter() - t_log
    n = len(host)
    # loss, accuracy, grad_norm, and the loss parts when the loss has several (lm_loss,
    # label_loss, ...): the run's curves.
    keys = [k for k in host[-1] if k in ("loss", "accuracy", "grad_norm") or k.endswith("_loss")]
    rec = {k: float(np.mean([h[k] for h in host])) for k in keys}
    # Averages over finite steps only: one skipped NaN step must not poison the curve.
    finite = [h for h in host if bool(h["finite"])]
    if finite and len(finite) < n:
      for k in keys:
        rec[k] = float(np.mean([h[k] for h in finite]))
    for k in host[-1]:
      if k.startswith("lr_"):
        rec[k] = float(host[-1][k])
    rec.update(skipped=int(host[-1]["skipped"]), bad_streak=int(host[-1]["bad_streak"]),
               step_time=elapsed / n, tokens_per_s=tokens_since / max(elapsed, 1e-9),
               loss_tokens=float(np.mean([h["tokens"] for h in host])))
    drops = _global_drops(data_iter)   # cumulative: examples drawn, dropped (by reason)
    if drops is not None:
      rec.update(drops.metrics())
    last_record = logger.log(pending[-1][0], rec)
    pending, t_log, tokens_since = [], time.perf_counter(), 0
    check_streak(rec["bad_streak"])
    if drops is not None:
      try:
        drops.check(max_dropped, drop_check_after, max_len)
      except pipeline.DroppedExamplesError as e:
        last = ckpt.latest_step()
        raise pipeline.DroppedExamplesError(
            f"{e} Stopped at step {step}; the last checkpoint "
            f"({'step ' + str(last) if last is not None else 'none'}) in {ckpt.directory} is "
            "intact: rerun with the changed flag to resume.") from None

  def save(at: int) -> bool:
    if int(np.asarray(jax.device_get(state.bad_streak))) > 0:
      log.warning("step %d: not saving (the last step was non-finite)", at)
      return False
    return ckpt.save(at, state, data_iter)

  with _Preemption(int(t.get("preemption_check_every", 10))) as preemption:
    while step < num_steps:
      if preemption.should_stop(step):
        preempted = True
        break
      local = next(data_iter)
      tokens_since += int(np.asarray(local["attention_mask"]).sum()) * jax.process_count()
      batch = trainer.put_batch(local)
      if step == start and jax.process_count() > 1:
        # Compile first (one process may take much longer, e.g. a compile-cache miss), then
        # meet: gloo gives a process only 30 s to join the step's first collective.
        trainer.lower(batch).compile()
        distributed.barrier("first step")
      state, metrics = trainer.step(state, batch)
      step += 1
      pending.append((step, metrics))
      if lagged is not None:
        check_streak(lagged)
      lagged = metrics["bad_streak"]
      if step % log_every == 0 or step == num_steps:
        flush_logs()
      logger.advance()
      if step % save_every == 0:
        save(step)
      if eval_every > 0 and step % eval_every == 0 and step < num_steps:
        flush_logs()
        save(step)
        # The live state, not the checkpoint: the async save above overlaps the evaluation.
        _evaluate(config, workdir, step, logger, model=trainer.merge(state))
    flush_logs()
    if lagged is not None:
      check_streak(lagged)
    save(step)
    ckpt.wait()
  if preempted:
    log.warning("preempted: checkpoint saved at step %d; rerun the same command to resume", step)
  drops = _global_drops(data_iter)
  if drops is not None and drops.dropped:
    logger.text("dropped", f"{drops.summary()}: {drops.describe(max_len)}", step=step)
  return {"final_step": step, "preempted": preempted, "metrics": last_record,
          "dropped": drops.state() if drops is not None else None,
          "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
          "state": state}
