"""Pre-flight: everything a run can know before its first step is checked before its first step.

A paper-scale run that trains for its whole budget and then fails on ``unknown suite``, or
compiles for a minute and dies on a 112 px tower fed 64 px images, wastes the expensive part.
:func:`run` is called by ``train_and_evaluate`` before any model is built, compiled or written;
it checks, and reports together, every problem it finds, each naming the flag that fixes it:

* the run's own numbers (``train.*`` positive, pretrained weights set where the config needs them)
* evaluation suites: known names, datasets built under ``data.data_dir``; the training dataset
* backbones: the checkpoint's own config (base checkpoint ``meta.json`` or HF ``config.json``)
  against ``model.vision`` / ``model.llm`` (:func:`resolve_backbones`)
* tokenizer against the LLM's vocabulary (and the base checkpoint's own tokenizer)
* mesh against the device count; global batch against processes, micro-batches and shards
* the model spec (feature layers, projector heads, attention kernel) on the resolved towers
* a writable ``--workdir``
* ``data.max_len`` against the conversations: the first examples the run would draw, made by
  the pipeline's own code on the resolved towers (the ``<image>`` token counts once, its visual
  tokens are added beyond max_len); refused when none of them fits, naming the
  ``--config.data.max_len`` that keeps them (:func:`check_data_fit`; last, on a clean slate)

The towers' own configs decide the architecture: :func:`resolve_backbones` returns a copy of the
config whose ``model.vision`` / ``model.llm`` fields are the checkpoint's, so the pipeline's image
size, the patch grid and every derived length follow the weights. A config field left at 0 / ''
takes the checkpoint's value; a field set to a different value is a real conflict and is refused,
naming both values. (``llm.max_position_embeddings`` is not architecture: the checkpoint's wins.)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

VISION_KEYS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
               "num_heads", "layer_norm_eps", "hidden_act")
LLM_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps",
            "tie_word_embeddings")
LLM_TAKEN = ("max_position_embeddings",)   # always the checkpoint's (positions, not weights)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing that would fail later: what is wrong, and the flag(s) to change."""
  check: str
  what: str
  fix: str

  def __str__(self) -> str:
    return f"[{self.check}] {self.what}\n     fix: {self.fix}"


class PreflightError(ValueError):
  """The run cannot succeed as configured; raised before anything is built or written."""

  def __init__(self, problems: Sequence[Problem]):
    self.problems = list(problems)
    n = len(self.problems)
    super().__init__(f"pre-flight found {n} problem{'s' if n != 1 else ''} before the first "
                     "step (nothing was built, trained or written):\n  "
                     + "\n  ".join(str(p) for p in self.problems))


# -- backbones: the checkpoint's own config ----------------------------------------------------

def _unset(v: Any) -> bool:
  """0 / '' / None (a bool False is a value, not 'unset')."""
  return v is None or (type(v) in (int, float) and v == 0) or (isinstance(v, str) and not v)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    try:
      return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    except (TypeError, ValueError):
      return False
  return a == b


def _set(root, section, key: str, value: Any) -> None:
  """``section[key] = value`` on a (possibly locked, type-safe) ConfigDict; a 0 placeholder may
  be an int where the checkpoint's value is a float."""
  with root.unlocked():
    try:
      section[key] = value
    except TypeError:
      del section[key]
      section[key] = value


def tower_sources(config) -> dict[str, tuple[str, dict[str, Any]] | None]:
  """``{tower: (description, our-field dict) or None}``: where each tower's architecture comes
  from (the base checkpoint, else ``model.<tower>.hf_path``); None = the config decides."""
  from feallm_jax.models import llm as llm_lib, vision as vision_lib
  from feallm_jax.weights import base_checkpoint as bc, hf
  m = config.model
  base = m.get("base_checkpoint", "") or ""
  meta = bc.read_meta(base) if base else {}
  out: dict[str, tuple[str, dict[str, Any]] | None] = {}
  for tower, cls in (("vision", vision_lib.VisionConfig), ("llm", llm_lib.LLMConfig)):
    hf_cfg, where = meta.get(f"{tower}_hf_config"), f"base checkpoint {base} (meta.json)"
    if not hf_cfg and m[tower].get("hf_path", ""):
      where = f"{m[tower].hf_path}/config.json"
      hf_cfg = hf.read_config(m[tower].hf_path)
    out[tower] = (where, dataclasses.asdict(cls.from_hf(hf_cfg))) if hf_cfg else None
  return out


def resolve_backbones(config, problems: list[Problem] | None = None):
  """A copy of ``config`` whose ``model.vision`` / ``model.llm`` architecture fields are the
  checkpoint's. Conflicts are appended to ``problems`` (or raised as :class:`PreflightError`
  when ``problems`` is None). Idempotent, and cheap: only JSON files are read."""
  raise_now = problems is None
  problems = [] if problems is None else problems
  try:
    sources = tower_sources(config)
  except (FileNotFoundError, ValueError) as e:
    flag = ("--config.model.base_checkpoint" if config.model.get("base_checkpoint", "")
            else "--config.model.vision.hf_path / --config.model.llm.hf_path")
    problems.append(Problem("checkpoint", str(e), f"point {flag} at an existing checkpoint "
                            "(launch/import_hf.py writes base checkpoints)"))
    if raise_now:
      raise PreflightError(problems) from e
    return config
  out = copy.deepcopy(config)
  for tower, keys in (("vision", VISION_KEYS), ("llm", LLM_KEYS + LLM_TAKEN)):
    src = sources[tower]
    if src is None:
      # The config decides; 0 / '' would mean "the checkpoint's", and there is none (the LLM's
      # vocab_size=0 is the exception: it comes from the tokenizer).
      for key in keys:
        if key in out.model[tower] and _unset(out.model[tower][key]) and not (
            tower == "llm" and key == "vocab_size"):
          problems.append(Problem(
              "checkpoint vs config", f"model.{tower}.{key} is unset (0 / '' = take it from "
              "the checkpoint), but no checkpoint gives the " + tower + " tower",
              f"--config.model.{tower}.{key}=<value>, or --config.model.base_checkpoint / "
              f"--config.model.{tower}.hf_path"))
      continue
    where, theirs = src
    section = out.model[tower]
    conflicts = []
    for key in keys:
      if key not in theirs or key not in section:
        continue
      ours = section[key]
      if key in LLM_TAKEN or _unset(ours):
        if not _same(ours, theirs[key]):
          _set(out, section, key, type(ours)(theirs[key]) if not _unset(ours) else theirs[key])
      elif not _same(ours, theirs[key]):
        conflicts.append((key, ours, theirs[key]))
    for key, ours, theirs_v in conflicts:
      problems.append(Problem(
          "checkpoint vs config",
          f"model.{tower}.{key}={ours!r} but the {tower} tower of {where} has {theirs_v!r}",
          f"--config.model.{tower}.{key}={theirs_v} (or 0 / '' to take the checkpoint's value), "
          f"or a checkpoint with {key}={ours!r}"))
  if raise_now and problems:
    raise PreflightError(problems)
  return out


def describe_towers(config) -> str:
  """One line: what the (resolved) towers give the data pipeline."""
  v = config.model.vision
  grid = int(v.image_size) // int(v.patch_size)
  n = grid * grid + (1 if config.model.get("local_clues", True) else 0)
  return (f"vision tower {v.image_size} px, patch {v.patch_size} ({grid}x{grid} grid): "
          f"{n} visual tokens per image")


# -- individual checks (each returns its problems) ---------------------------------------------

def check_run_numbers(config) -> list[Problem]:
  t, out = config.train, []
  for key in ("num_steps", "log_every", "save_every", "keep"):
    if int(t[key]) <= 0:
      out.append(Problem("train", f"train.{key}={t[key]} must be positive",
                         f"--config.train.{key}=<a positive number>"))
  if int(t.get("max_bad_steps", 0)) < 0:
    out.append(Problem("train", f"train.max_bad_steps={t.max_bad_steps} must be >= 0",
                       "--config.train.max_bad_steps=5"))
  if int(config.optim.get("accum_steps", 1)) < 1:
    out.append(Problem("train", f"optim.accum_steps={config.optim.accum_steps} must be >= 1",
                       "--config.optim.accum_steps=1"))
  if config.get("require_pretrained", False):
    m = config.model
    if not m.get("base_checkpoint", "") and not (m.vision.hf_path and m.llm.hf_path):
      out.append(Problem(
          "checkpoint", f"config {config.get('name', '')!r} trains adapters on pretrained "
          "backbones, and none is set",
          "--config.model.base_checkpoint=DIR (from launch/import_hf.py), or both "
          "--config.model.vision.hf_path and --config.model.llm.hf_path (local HF dirs)"))
    if not config.data.get("tokenizer", ""):
      out.append(Problem("tokenizer", "no tokenizer set for a pretrained LLM",
                         "--config.data.tokenizer=<the LLM's local HF tokenizer dir>"))
  return out


def check_eval_settings(config) -> list[Problem]:
  """Evaluation settings that would otherwise fail only when the first batch is answered."""
  from feallm_jax.eval import generate as gen
  matmul = gen.config_matmul_dtype(config)
  if matmul not in gen.MATMUL_DTYPES:
    return [Problem("eval", f"eval.matmul_dtype={matmul!r} is not one of {gen.MATMUL_DTYPES}",
                    "--config.eval.matmul_dtype=float32 (or bfloat16)")]
  return []


def _split_parts(split: str) -> list[str]:
  return [s.split("[")[0] for s in split.split("+") if s]


def _dataset_problem(config, dataset: str, splits: Sequence[str], what: str,
                     fix_flag: str) -> Problem | None:
  """None when ``dataset`` ('name' or 'name/config') is built with ``splits`` under data_dir."""
  from feallm_jax.data import builders
  d = config.data
  name, cfg = dataset.split("/", 1) if "/" in dataset else (dataset, None)
  if cfg is None and name == d.dataset:
    cfg = d.get("builder_config", "") or None
  if name not in builders.BUILDERS:
    return Problem("data", f"{what}: unknown dataset {name!r} (known: {sorted(builders.BUILDERS)})",
                   fix_flag)
  if name == "synthetic_fea":
    return None                  # builds itself on first use
  try:
    b = builders.make_builder(name, d.data_dir, config=cfg)
  except ValueError as e:
    return Problem("data", f"{what}: {e}", fix_flag)
  build = (f"python launch/build_dataset.py --dataset={name} --data_dir={d.data_dir} "
           f"--manual_dir=<downloads>{f' --config={cfg}' if cfg else ''}")
  if not b.is_prepared():
    return Problem("data", f"{what}: dataset {name}{'/' + cfg if cfg else ''} is not built "
                   f"under data.data_dir={d.data_dir}",
                   f"build it ({build}), or point --config.data.data_dir at where it is, "
                   f"or {fix_flag}")
  splits = _split_parts(builders.resolve_split(name, "+".join(splits)))  # test_fold1 -> fold3
  missing = [s for s in splits if s not in b.info.splits]
  if missing:
    return Problem("data", f"{what}: dataset {name} under {d.data_dir} has no split(s) {missing} "
                   f"(it has {sorted(b.info.splits)})", f"rebuild it ({build}) or {fix_flag}")
  return None


def evaluates(config) -> bool:
  """Whether this training run will evaluate (periodically or at the end)."""
  t = config.train
  return bool(config.eval.get("suites", ())) and (
      bool(t.get("final_eval", True)) or int(t.get("eval_every", 0) or 0) > 0)


def check_suites(config, suites: Sequence[str] | str | None = None, *,
                 flag: str = "--config.eval.suites") -> list[Problem]:
  """Suite names are known and each suite's dataset is built (``suites`` default: eval.suites)."""
  from feallm_jax.eval import feabench
  if suites is None:
    suites = tuple(config.eval.get("suites", ()) or ())
  if isinstance(suites, str):
    suites = [s for s in suites.split(",") if s.strip()]
  out = []
  for name in (s.strip() for s in suites):
    if name not in feabench.SUITES:
      near = difflib.get_close_matches(name, feabench.SUITES, n=3, cutoff=0.5)
      near += [s for s in feabench.SUITES if s.startswith(name + "_") and s not in near]
      hint = f" (did you mean {', '.join(near)}?)" if near else ""
      out.append(Problem("eval suites", f"unknown suite {name!r}{hint}; known: "
                         f"{sorted(feabench.SUITES)}", f"{flag}=<known suites, comma-separated>"))
      continue
    s = feabench.SUITES[name]
    p = _dataset_problem(config, s.dataset, _split_parts(s.split), f"suite {name}",
                         f"drop {name} from {flag}")
    if p is not None:
      out.append(p)
  return out


def check_train_data(config) -> list[Problem]:
  p = _dataset_problem(config, config.data.dataset, ["train"],
                       f"training data data.dataset={config.data.dataset!r}",
                       "--config.data.dataset=<a built dataset>")
  return [p] if p is not None else []


def _tok_desc(path: str) -> str:
  return repr(path) if path else "'' (the tiny tokenizer shipped in feallm_jax/assets)"


def check_tokenizer(config) -> list[Problem]:
  """The tokenizer loads, fits the LLM's embedding table and matches the base's own tokenizer."""
  from feallm_jax.data import tokenizer as tok_lib
  path = config.data.get("tokenizer", "") or ""
  try:
    tok = tok_lib.load(path)
  except (OSError, ValueError) as e:
    return [Problem("tokenizer", f"data.tokenizer={_tok_desc(path)}: {e}",
                    "--config.data.tokenizer=<a local HF tokenizer dir (tokenizer.json)>")]
  out = []
  vocab = int(config.model.llm.get("vocab_size", 0) or 0)
  image_id = tok_lib.image_token_id(tok)
  n = len(tok)
  n_text = n - 1 if image_id == n - 1 else n   # <image> never reaches the embedding table
  if vocab > 0 and n_text > vocab:
    out.append(Problem("tokenizer vs vocab",
                       f"data.tokenizer={_tok_desc(path)} has {n_text} text tokens, more than "
                       f"the LLM's embedding table (model.llm.vocab_size={vocab})",
                       "--config.data.tokenizer=<the tokenizer the LLM was trained with>"))
  base = config.model.get("base_checkpoint", "") or ""
  base_tok = os.path.join(base, "tokenizer") if base else ""
  if base_tok and os.path.isdir(base_tok) and os.path.abspath(base_tok) != os.path.abspath(
      path or tok_lib.TINY_DIR):
    try:
      theirs = tok_lib.load(base_tok).get_vocab()
    except (OSError, ValueError) as e:
      log.warning("base checkpoint tokenizer %s unreadable (%s): not compared", base_tok, e)
      return out
    ours = tok.get_vocab()
    diff = [t for t, i in theirs.items() if t != tok_lib.IMAGE_TOKEN and ours.get(t) != i]
    if diff:
      out.append(Problem("tokenizer vs vocab",
                         f"data.tokenizer={_tok_desc(path)} maps {len(diff)} token(s) "
                         f"differently from the tokenizer the base LLM was trained with "
                         f"({base_tok}), e.g. {diff[:3]}",
                         f"--config.data.tokenizer={base_tok}"))
  return out


def _mesh_shape(config, problems: list[Problem]) -> dict[str, int] | None:
  import jax
  from feallm_jax import sharding
  try:
    mesh = sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    problems.append(Problem("mesh vs devices", f"mesh={dict(config.mesh)}: {e}",
                            f"--config.mesh.data / --config.mesh.fsdp / --config.mesh.tensor "
                            f"with a product of {jax.device_count()} (one of them may be -1)"))
    return None
  return dict(mesh.shape)


def check_mesh_and_batch(config) -> list[Problem]:
  """Mesh vs device count; global batch vs processes, accumulation steps and batch shards."""
  import jax
  out: list[Problem] = []
  shape = _mesh_shape(config, out)
  d = config.data
  b, pc = int(d.batch_size), jax.process_count()
  k = int(config.optim.get("accum_steps", 1) or 1)
  if b % pc:
    out.append(Problem("batch vs processes", f"data.batch_size={b} does not split over "
                       f"{pc} processes", f"--config.data.batch_size=<a multiple of {pc}>"))
  if k >= 1 and b % k:
    out.append(Problem("batch vs accumulation", f"data.batch_size={b} (the global batch per "
                       f"update) does not split into optim.accum_steps={k} micro-batches",
                       f"--config.data.batch_size=<a multiple of {k}> or "
                       "--config.optim.accum_steps"))
  elif shape is not None and k >= 1:
    shards = shape["data"] * shape["fsdp"]
    if (b // k) % shards:
      out.append(Problem(
          "batch vs mesh", f"micro-batches of {b // k} rows (data.batch_size={b} / "
          f"optim.accum_steps={k}) do not split over data x fsdp = {shards} batch shards",
          f"--config.data.batch_size=<a multiple of {k * shards}>, fewer "
          "--config.optim.accum_steps, or another --config.mesh.data / --config.mesh.fsdp"))
  eb = int(config.eval.get("batch_size", 0) or d.get("eval_batch_size", 0) or 0)
  if evaluates(config) and eb and eb % pc:
    out.append(Problem("batch vs processes", f"eval batch {eb} does not split over {pc} "
                       "processes", f"--config.eval.batch_size=<a multiple of {pc}>"))
  return out


def check_model_spec(config) -> list[Problem]:
  """The FEALLM spec on the resolved towers (feature layers, heads, attention kernel...)."""
  from feallm_jax.models import feallm
  try:
    spec = feallm.spec_from_config(config)
  except (ValueError, FileNotFoundError, ZeroDivisionError) as e:
    # Spec errors name their key ("model.feature_layer=…", "vision.image_size …").
    words = str(e).replace("=", " ").split()
    key = next((w.rstrip(":,") for w in words if w.startswith(("model.", "llm.", "vision."))), "")
    if key and not key.startswith("model."):
      key = "model." + key
    return [Problem("model", str(e), f"--config.{key}" if key else "the model.* flag named above")]
  out = []
  longest = spec.expanded_length(int(config.data.max_len))
  if longest > spec.llm.max_position_embeddings:
    log.warning("data.max_len=%d expands to %d LLM positions (%d visual tokens), beyond the "
                "LLM's max_position_embeddings=%d", int(config.data.max_len), longest,
                spec.num_visual_tokens, spec.llm.max_position_embeddings)
  return out


def check_adapter(config) -> list[Problem]:
  """``model.init_adapter`` fits the model settings and the base checkpoint (JSON only)."""
  adapter = str(config.model.get("init_adapter", "") or "")
  if not adapter:
    return []
  from feallm_jax.pretrain import align
  try:
    align.check_adapter(adapter, config)
  except align.AdapterError as e:
    return [Problem("adapter", str(e), "--config.model.init_adapter='' (LCA + projector start "
                    "fresh), or one made for this model by python -m launch.align_adapter")]
  return []


def check_workdir_writable(workdir: str) -> list[Problem]:
  """The workdir exists as a writable directory or can be created (remote URLs are skipped)."""
  if "://" in str(workdir):
    return []
  path = os.path.abspath(os.path.expanduser(workdir))
  fix = "--workdir=<a directory you can write>"
  if os.path.exists(path) and not os.path.isdir(path):
    return [Problem("workdir", f"--workdir={workdir} is a file, not a directory", fix)]
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    return [Problem("workdir", f"--workdir={workdir} cannot be created: {probe} is a file", fix)]
  if not os.access(probe, os.W_OK | os.X_OK):
    return [Problem("workdir", f"--workdir={workdir}: {probe} is not writable", fix)]
  if probe == path:   # an existing workdir: prove it with a file (read-only mounts, quotas)
    try:
      with tempfile.TemporaryFile(dir=path):
        pass
    except OSError as e:
      return [Problem("workdir", f"--workdir={workdir} is not writable ({e})", fix)]
  return []


def check_data_fit(config, *, source=None) -> list[Problem]:
  """``data.max_len`` against the first training examples the run would draw
  (``data.fit_check_examples`` of them, made as the pipeline makes them: ``pipeline.check_fit``):
  a problem when every one of them would be dropped. Too many drops, but not all, is a
  warning (the run stops later past ``data.max_dropped_fraction``)."""
  from feallm_jax.data import pipeline
  d = config.data
  try:
    pipeline.check_fit(config, split="train", seed=int(config.get("seed", 0)), source=source)
  except pipeline.DroppedExamplesError as e:
    drops = getattr(e, "drops", None)
    if drops is not None and drops.needed_len:
      fix = (f"--config.data.max_len={drops.needed_len} (it is {int(d.max_len)}; "
             f"{drops.needed_len} keeps every one of these examples)")
    else:
      fix = "the change named above"
    return [Problem("max_len", str(e), fix)]
  return []


# -- the whole pre-flight -----------------------------------------------------------------------

def run(config, workdir: str | None = None, *, train: bool = True):
  """Checks everything knowable before the first step; returns the config with its towers
  resolved from the checkpoint(s). Raises :class:`PreflightError` listing every problem."""
  problems: list[Problem] = []
  if train:
    problems += check_run_numbers(config)
  resolved = resolve_backbones(config, problems)
  if train:
    problems += check_train_data(config)
  if not train or evaluates(config):
    problems += check_suites(config)
    problems += check_eval_settings(config)
  tok_problems = check_tokenizer(resolved)
  problems += tok_problems
  problems += check_mesh_and_batch(config) if train else []
  if not problems:   # the spec repeats the tokenizer/backbone errors: only on a clean slate
    problems += check_model_spec(resolved)
  if train and not problems:   # compares with the base checkpoint: only once it resolved
    problems += check_adapter(resolved)
  if workdir is not None:
    problems += check_workdir_writable(workdir)
  if train and not problems:   # reads and tokenizes examples: only once all else is sound
    problems += check_data_fit(resolved)
  if problems:
    raise PreflightError(problems)
  log.info("pre-flight passed: %s", describe_towers(resolved))
  return resolved
