"""FEALLM: frozen CLIP ViT + Local Clue Aggregator + Multi-perspective Projector + LLM (+ LoRA).

The prompt holds one ``<image>`` token; :meth:`FEALLM.embed_inputs` replaces it by the visual
tokens followed by the F_local token (static shapes: ``L = T - 1 + N_vis (+1)``) with a gather,
so everything stays inside ``jit``. Training, evaluation and generation all go through it.

What trains is decided by variable type (:func:`trainable_filter`): backbone weights are
``layers.BaseParam`` (frozen unless their tower is unfrozen), adapters ``nnx.LoRAParam``, new
FEALLM weights plain ``nnx.Param``. Gradients and optimizer state exist only for the filter.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from feallm_jax import sharding
from feallm_jax.models import attention_kernels, layers
from feallm_jax.models import llm as llm_lib
from feallm_jax.models import local_clues as lca_lib
from feallm_jax.models import lora as lora_lib
from feallm_jax.models import label_head as label_head_lib
from feallm_jax.models import projector as proj_lib
from feallm_jax.models import vision as vision_lib

TRAIN_LLM = ("lora", "full", "frozen")
VOCAB_MULTIPLE = 128   # vocab taken from a tokenizer is padded to this (MXU/sharding friendly)


@dataclasses.dataclass(frozen=True)
class FEALLMSpec:
  """Everything needed to build the model, resolved from the config (and checkpoints)."""
  vision: vision_lib.VisionConfig
  llm: llm_lib.LLMConfig
  image_token_id: int
  lca: lca_lib.LCAConfig | None = lca_lib.LCAConfig()   # None = no Local Clue Aggregator
  projector: str = "multi_perspective"
  projector_heads: int = 8
  feature_layer: int = -2
  multi_layers: tuple[int, ...] = (1, 2, 3)
  train_llm: str = "lora"
  train_vision: bool = False
  lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()
  param_dtype: str = "float32"
  frozen_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False  # LLM layers as one lax.scan in training / scoring (compile size)
  attention: str = "xla"     # LLM causal attention: xla | splash | cudnn | auto (attention_kernels)
  # Auxiliary label loss on the visual tokens (models/label_head.py); 0 = none, the paper's.
  label_loss_weight: float = 0.0

  def __post_init__(self):
    n_hidden = self.vision.num_layers + 1
    attention_kernels.check_impl(self.attention)
    if self.attention == "splash" and not attention_kernels.splash_supported(self.llm.head_dim):
      raise ValueError(f"model.attention='splash' needs llm.head_dim % 128 == 0, got "
                       f"{self.llm.head_dim}; use 'auto' (falls back to XLA) or 'xla'")
    if self.projector not in proj_lib.PROJECTORS:
      raise ValueError(f"model.projector must be one of {proj_lib.PROJECTORS}, "
                       f"got {self.projector!r}")
    if self.train_llm not in TRAIN_LLM:
      raise ValueError(f"model.train_llm must be one of {TRAIN_LLM}, got {self.train_llm!r}")
    if self.train_llm == "lora" and self.lora is None:
      raise ValueError("model.train_llm='lora' needs model.lora")
    if not -n_hidden <= self.feature_layer < n_hidden:
      raise ValueError(f"model.feature_layer={self.feature_layer} is out of range for "
                       f"{n_hidden} vision hidden states")
    bad = [i for i in self.multi_layers if not -n_hidden <= i < n_hidden]
    if self.projector == "multi_perspective" and (not self.multi_layers or bad):
      raise ValueError(f"model.multi_layers={self.multi_layers}: need at least one index in "
                       f"[{-n_hidden}, {n_hidden}) (vision hidden states)")
    if not self.label_loss_weight >= 0.0:
      raise ValueError(f"model.label_loss_weight must be >= 0, got {self.label_loss_weight}")
    if self.projector == "multi_perspective" and self.vision.hidden_size % self.projector_heads:
      raise ValueError(f"model.projector_heads={self.projector_heads} does not divide the "
                       f"vision width {self.vision.hidden_size}")

  @property
  def num_visual_tokens(self) -> int:
    """Tokens that replace ``<image>``: the patch tokens, plus F_local with local clues."""
    return self.vision.num_patches + (1 if self.lca is not None else 0)

  def expanded_length(self, text_len: int) -> int:
    return text_len - 1 + self.num_visual_tokens


# ---------------------------------------------------------------------------------------------
# Config -> spec.

def _tokenizer_info(config, vocab_size: int) -> tuple[int, int]:
  """(vocab_size, image_token_id), reading the tokenizer only when it is needed."""
  m = config.model
  image_id = m.get("image_token_id", None)
  if vocab_size > 0 and image_id is not None and int(image_id) >= 0:
    return vocab_size, int(image_id)
  from feallm_jax.data import tokenizer as tok_lib   # transformers is slow to import
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  image_id = tok_lib.image_token_id(tok)
  n = len(tok)
  if vocab_size <= 0:
    return int(math.ceil(n / VOCAB_MULTIPLE) * VOCAB_MULTIPLE), image_id
  # <image> never reaches the embedding table, so a checkpoint may lack a row for it.
  n_text = n - 1 if image_id == n - 1 else n
  if n_text > vocab_size:
    raise ValueError(f"model.llm.vocab_size={vocab_size} is smaller than the tokenizer "
                     f"({n_text} text tokens, data.tokenizer={config.data.get('tokenizer', '')!r})")
  return vocab_size, image_id


def _backbone_configs(config) -> tuple[vision_lib.VisionConfig, dict]:
  m = config.model
  base = m.get("base_checkpoint", "")
  meta = {}
  if base:
    from feallm_jax.weights import base_checkpoint
    meta = base_checkpoint.read_meta(base)   # a tower the checkpoint lacks comes from config
  if meta.get("vision_hf_config"):
    vcfg = vision_lib.VisionConfig.from_hf(meta["vision_hf_config"])
  elif m.vision.get("hf_path", ""):
    from feallm_jax.weights import hf
    vcfg = hf.vision_config_from_dir(m.vision.hf_path)
  else:
    vcfg = vision_lib.VisionConfig.from_dict(m.vision)
  if meta.get("llm_hf_config"):
    lcfg = dataclasses.asdict(llm_lib.LLMConfig.from_hf(meta["llm_hf_config"]))
  elif m.llm.get("hf_path", ""):
    from feallm_jax.weights import hf
    lcfg = dataclasses.asdict(hf.llm_config_from_dir(m.llm.hf_path))
  else:
    lcfg = dict(m.llm)
  return vcfg, lcfg


def spec_from_config(config) -> FEALLMSpec:
  """Resolves ``config.model`` (+ tokenizer, checkpoints' config.json) into a :class:`FEALLMSpec`."""
  m = config.model
  vcfg, lcfg = _backbone_configs(config)
  vocab, image_id = _tokenizer_info(config, int(lcfg.get("vocab_size", 0) or 0))
  lcfg["vocab_size"] = vocab
  llm_cfg = llm_lib.LLMConfig.from_dict(lcfg)
  lora_cfg = lora_lib.LoRAConfig.from_dict(m.lora) if m.get("lora", None) is not None else None
  return FEALLMSpec(
      vision=vcfg, llm=llm_cfg, image_token_id=image_id,
      lca=lca_lib.LCAConfig.from_dict(m.lca) if m.get("local_clues", True) else None,
      projector=str(m.get("projector", "multi_perspective")),
      projector_heads=int(m.get("projector_heads", 8)),
      feature_layer=int(m.get("feature_layer", -2)),
      multi_layers=tuple(int(i) for i in m.get("multi_layers", ())),
      train_llm=str(m.get("train_llm", "lora")), train_vision=bool(m.get("train_vision", False)),
      lora=lora_cfg, param_dtype=str(m.get("param_dtype", "float32")),
      frozen_dtype=str(m.get("frozen_dtype", "float32")),
      compute_dtype=str(m.get("compute_dtype", "float32")), remat=bool(m.get("remat", False)),
      scan_layers=bool(m.get("scan_layers", False)), attention=str(m.get("attention", "xla")),
      label_loss_weight=float(m.get("label_loss_weight", 0.0)))


# ---------------------------------------------------------------------------------------------
# The model.

class FEALLM(nnx.Module):
  """The composed model; see the module docstring and ``docs/interfaces.md``."""

  def __init__(self, spec: FEALLMSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    compute = jnp.dtype(spec.compute_dtype)
    train_dt, frozen_dt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.frozen_dtype)
    dv, dl = spec.vision.hidden_size, spec.llm.hidden_size
    self.vision = vision_lib.VisionEncoder(
        spec.vision, dtype=compute, param_dtype=train_dt if spec.train_vision else frozen_dt,
        rngs=rngs)
    mp = spec.projector == "multi_perspective"
    self.lca = (lca_lib.LocalClueAggregator(spec.lca, vision_width=dv if mp else None,
                                            llm_width=dl, dtype=compute, param_dtype=train_dt,
                                            rngs=rngs)
                if spec.lca is not None else None)
    if mp:
      self.projector = proj_lib.MultiPerspectiveProjector(
          dv, dl, num_heads=spec.projector_heads, local_clues=spec.lca is not None,
          dtype=compute, param_dtype=train_dt, rngs=rngs)
    else:
      self.projector = proj_lib.MLPProjector(dv, dl, dtype=compute, param_dtype=train_dt,
                                             rngs=rngs)
    self.llm = llm_lib.Decoder(
        spec.llm, lora=spec.lora if spec.train_llm == "lora" else None, dtype=compute,
        param_dtype=train_dt if spec.train_llm == "full" else frozen_dt, remat=spec.remat,
        attention=spec.attention, scan_layers=spec.scan_layers,
        rngs=rngs)
    self.label_head = (label_head_lib.LabelHead(dl, dtype=compute, param_dtype=train_dt, rngs=rngs)
                       if spec.label_loss_weight > 0 else None)

  # -- vision side ------------------------------------------------------------------------------

  def visual_tokens(self, image: jax.Array, regions: jax.Array | None, *,
                    lca_image: jax.Array | None = None, return_attention: bool = False):
    """``[B, N_vis(+1), D_llm]``: projector tokens, then the F_local token (local clues on).

    ``lca_image`` (optional) is the same view of the face at a higher resolution: the Local Clue
    Aggregator crops its regions from it while the ViT sees ``image`` at its own input size.
    """
    spec = self.spec
    hidden = self.vision(image)
    if not spec.train_vision:
      hidden = tuple(jax.lax.stop_gradient(h) for h in hidden)    # frozen encoder
    f_l = hidden[spec.feature_layer][:, 1:]                         # drop the class token
    attn = {}
    f_local_v = f_local = None
    if self.lca is not None:
      if regions is None:
        raise ValueError("model.local_clues=True needs batch['regions'] [B,16,4]")
      res = self.lca(image if lca_image is None else lca_image, regions, return_attention=True)
      f_local_v, f_local, attn["lca"] = res
    if spec.projector == "mlp":
      tokens = self.projector(f_l)
    else:
      f_s = jnp.concatenate([hidden[i][:, 1:] for i in spec.multi_layers], axis=1)
      tokens, attn["regions"] = self.projector(f_l, f_s, f_local_v, return_attention=True)
    if f_local is not None:
      tokens = jnp.concatenate([tokens, f_local.astype(tokens.dtype)], axis=1)
    tokens = tokens.astype(self.llm.dtype)
    return (tokens, {k: v for k, v in attn.items() if v is not None}) if return_attention \
        else tokens

  # -- placeholder expansion ---------------------------------------------------------------------

  def _expand(self, visual: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
              extra: dict[str, jax.Array]):
    """Gathers text and visual rows into ``L = T - 1 + N`` slots (see :func:`expansion_index`)."""
    n = visual.shape[1]
    text_idx, vis_idx, is_vis, has_img = expansion_index(input_ids, self.spec.image_token_id, n)
    safe_ids = jnp.where(input_ids == self.spec.image_token_id, 0, input_ids)
    text = self.llm.embed(safe_ids)
    take = lambda x, i: jnp.take_along_axis(x, i, axis=1)
    text_rows = take(text, text_idx[..., None])
    vis_rows = take(visual, vis_idx[..., None])
    embeds = jnp.where(is_vis[..., None], vis_rows.astype(text_rows.dtype), text_rows)
    mask = jnp.where(is_vis, has_img[:, None], take(attention_mask.astype(jnp.int32), text_idx))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    out = {k: jnp.where(is_vis, 0, take(v, text_idx)) for k, v in extra.items()}
    return embeds, mask.astype(jnp.int32), positions, out

  def embed_inputs(self, image: jax.Array, regions: jax.Array | None, input_ids: jax.Array,
                   attention_mask: jax.Array, lca_image: jax.Array | None = None):
    """``(embeds [B,L,D], attention_mask [B,L], positions [B,L])`` with ``<image>`` expanded."""
    visual = self.visual_tokens(image, regions, lca_image=lca_image)
    return self.embed_visual(visual, input_ids, attention_mask)

  def embed_visual(self, visual: jax.Array, input_ids: jax.Array, attention_mask: jax.Array):
    """:meth:`embed_inputs` from visual tokens computed before (``visual_tokens``'s output):
    an evaluation asking several questions about one face encodes the face once."""
    embeds, mask, positions, _ = self._expand(visual, input_ids, attention_mask, {})
    return embeds, mask, positions

  def __call__(self, batch: dict[str, jax.Array], *, return_attention: bool = False):
    """Logits over the expanded sequence, with targets and loss mask aligned to it.

    Returns ``dict(logits [B,L,V], mask [B,L], positions, targets [B,L] (token ids, 0 on visual
    slots), loss_mask [B,L])`` and, with ``return_attention``, ``attention=dict(lca
    [B,h,16,16], regions [B,h,N_patches,16])`` (the keys that exist for this configuration).
    """
    ids = batch["input_ids"]
    am = batch.get("attention_mask")
    am = jnp.ones_like(ids) if am is None else am
    lm = batch.get("loss_mask")
    lm = jnp.zeros_like(ids) if lm is None else lm
    visual, attn = self.visual_tokens(batch["image"], batch.get("regions"),
                                      lca_image=batch.get("lca_image"), return_attention=True)
    embeds, mask, positions, extra = self._expand(visual, ids, am,
                                                  {"targets": ids, "loss_mask": lm})
    logits = self.llm(inputs_embeds=embeds, positions=positions, attention_mask=mask)
    out = dict(logits=logits, mask=mask, positions=positions, **extra)
    if self.label_head is not None:
      out["label_logits"] = self.label_head(visual)
    if return_attention:
      out["attention"] = attn
    return out


def expansion_index(input_ids: jax.Array, image_token_id: int, n: int):
  """For every output slot ``j < T - 1 + n``: the text index, the visual index, whether it is
  visual, and per row whether an ``<image>`` exists.

  Slots ``[p, p + n)`` (p = the placeholder's index) are visual; slot ``j < p`` takes text
  ``j``, slot ``j >= p + n`` takes text ``j - n + 1``. A row without ``<image>`` (e.g. an
  all-padding eval row; the contract is exactly one per row) uses ``p = T - 1`` and masks the
  visual slots out, so shapes stay static.
  """
  b, t = input_ids.shape
  is_img = input_ids == image_token_id
  has_img = is_img.any(axis=1)
  p = jnp.where(has_img, jnp.argmax(is_img, axis=1), t - 1).astype(jnp.int32)[:, None]
  j = jnp.arange(t - 1 + n, dtype=jnp.int32)[None, :]
  is_vis = (j >= p) & (j < p + n)
  text_idx = jnp.where(j < p, j, j - n + 1)
  text_idx = jnp.clip(jnp.where(is_vis, 0, text_idx), 0, t - 1)
  vis_idx = jnp.clip(j - p, 0, n - 1)
  return (jnp.broadcast_to(text_idx, (b, t - 1 + n)), jnp.broadcast_to(vis_idx, (b, t - 1 + n)),
          jnp.broadcast_to(is_vis, (b, t - 1 + n)), has_img.astype(jnp.int32))


def expanded_length(config, text_len: int) -> int:
  """``text_len - 1 + num_visual_tokens`` for ``config`` (no tokenizer or weights touched)."""
  m = config.model
  if m.get("base_checkpoint", "") or m.vision.get("hf_path", ""):
    vcfg, _ = _backbone_configs(config)
  else:
    vcfg = vision_lib.VisionConfig.from_dict(m.vision)
  return text_len - 1 + vcfg.num_patches + (1 if m.get("local_clues", True) else 0)


# ---------------------------------------------------------------------------------------------
# Loss.

def loss_fn(model: FEALLM, batch: dict[str, jax.Array]):
  """Next-token cross-entropy over assistant tokens, averaged per token over the whole batch,
  plus ``model.label_loss_weight`` x the label head's loss when the model has one."""
  out = model(batch)
  logits = out["logits"][:, :-1].astype(jnp.float32)
  targets = out["targets"][:, 1:]
  weights = (out["loss_mask"][:, 1:] * out["mask"][:, 1:]).astype(jnp.float32)
  if "example_mask" in batch:
    weights = weights * batch["example_mask"].astype(jnp.float32)[:, None]
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  tokens = weights.sum()
  denom = jnp.maximum(tokens, 1.0)
  loss = ((logz - gold) * weights).sum() / denom
  accuracy = ((jnp.argmax(logits, -1) == targets) * weights).sum() / denom
  metrics = dict(loss=loss, tokens=tokens, accuracy=accuracy)
  weight = model.spec.label_loss_weight
  if "label_logits" in out:
    missing = [k for k in ("emotion", "au_present") if k not in batch]
    if missing:   # silently training without the head's loss would change the objective
      raise ValueError(f"loss: the model has a label head (model.label_loss_weight={weight}) but "
                       f"the batch lacks {missing}; every data pipeline batch carries them (-1 = "
                       "unlabelled), or set --config.model.label_loss_weight=0")
    labels = label_head_lib.label_loss(out["label_logits"], batch["emotion"], batch["au_present"],
                                       weights.sum(axis=1))
    metrics.update(lm_loss=loss, **labels)
    loss = loss + weight * labels["label_loss"]
    metrics["loss"] = loss
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Freeze policy.

def _filter_from(train_llm: str, train_vision: bool):
  # New FEALLM weights and LoRA adapters: every Param that is not a backbone weight.
  parts: list[Any] = [nnx.All(nnx.Param, nnx.Not(layers.BaseParam))]
  if train_llm == "full":
    parts.append(nnx.All(layers.BaseParam, nnx.PathContains("llm")))
  if train_vision:
    parts.append(nnx.All(layers.BaseParam, nnx.PathContains("vision")))
  return nnx.Any(*parts)


def trainable_filter(config_or_spec):
  """The nnx filter of what trains (gets gradients and optimizer state)."""
  if isinstance(config_or_spec, FEALLMSpec):
    return _filter_from(config_or_spec.train_llm, config_or_spec.train_vision)
  m = config_or_spec.model
  train_llm = str(m.get("train_llm", "lora"))
  if train_llm not in TRAIN_LLM:
    raise ValueError(f"model.train_llm must be one of {TRAIN_LLM}, got {train_llm!r}")
  return _filter_from(train_llm, bool(m.get("train_vision", False)))


# ---------------------------------------------------------------------------------------------
# Building.

def model_rngs(key: jax.Array) -> nnx.Rngs:
  """The streams a FEALLM is built with: ``params`` (weight init) and ``dropout`` (LoRA dropout
  masks; its per-layer keys and counters are model state that the train step carries and the
  checkpoint saves). Both derive from one key, so a seed fixes initialization and masks."""
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 0x64726F70))   # "drop"


def _constructor(spec: FEALLMSpec, key: jax.Array):
  """The one way a FEALLM is constructed: :func:`build_from_spec` and :func:`abstract_model`
  share it, so an abstract build exercises exactly what a real build runs."""
  return lambda: FEALLM(spec, rngs=model_rngs(key))


def build_from_spec(spec: FEALLMSpec, mesh, *, rngs: nnx.Rngs | int | None = None,
                    vision_path: str = "", llm_path: str = "", base_checkpoint: str = "",
                    log: bool = True) -> FEALLM:
  """Abstract build -> rule validation -> jitted init straight into shardings -> weights."""
  # A concrete key, so the init below can run under jit (an Rngs object cannot be closed over).
  key = rngs.params() if isinstance(rngs, nnx.Rngs) else jax.random.key(rngs or 0)
  make = _constructor(spec, key)
  meta = {}
  if base_checkpoint:
    from feallm_jax.weights import base_checkpoint as bc
    meta = bc.read_meta(base_checkpoint)
  load_vision = bool(vision_path or meta.get("vision_hf_config"))
  load_llm = bool(llm_path or meta.get("llm_hf_config"))
  with sharding.mesh_rules(mesh):
    model = nnx.eval_shape(make)
    sharding.validate_rules(model, mesh)     # fail fast, before any allocation
    # Random init only for what no checkpoint fills: jit prunes the unused initializers.
    skip = [nnx.All(layers.BaseParam, nnx.PathContains(tower))
            for tower, loaded in (("vision", load_vision), ("llm", load_llm)) if loaded]
    wanted = nnx.Not(nnx.Any(*skip)) if skip else ...
    init_state = nnx.jit(lambda: nnx.state(make(), wanted))()
    nnx.update(model, init_state)
    if base_checkpoint:
      bc.restore_into(base_checkpoint, model.vision if meta.get("vision_hf_config") else None,
                      model.llm if meta.get("llm_hf_config") else None)
    from feallm_jax.weights import hf
    if vision_path and not meta.get("vision_hf_config"):
      hf.load_vision_weights(model.vision, vision_path)
    if llm_path and not meta.get("llm_hf_config"):
      hf.load_llm_weights(model.llm, llm_path)
  missing = [("/".join(map(str, p))) for p, v in nnx.to_flat_state(nnx.state(model))
             if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"build_model: {len(missing)} variable(s) were neither initialized nor "
                     f"loaded, e.g. {missing[:5]}")
  if log:
    logging.getLogger(__name__).info("FEALLM parameters:\n%s", parameter_overview(model, spec))
  return model


def build_model(config, mesh, *, rngs: nnx.Rngs | None = None, log: bool = True) -> FEALLM:
  """The model for ``config`` on ``mesh`` (vocab from the tokenizer when llm.vocab_size == 0);
  ``log`` prints the parameter table."""
  spec = spec_from_config(config)
  m = config.model
  base = m.get("base_checkpoint", "")
  return build_from_spec(spec, mesh, rngs=rngs if rngs is not None else int(config.get("seed", 0)),
                         vision_path=m.vision.get("hf_path", ""), llm_path=m.llm.get("hf_path", ""),
                         base_checkpoint=base, log=log)


def abstract_model(spec: FEALLMSpec, mesh) -> FEALLM:
  """Shapes, dtypes and shardings only (allocates nothing): for real-size checks and restores."""
  # The key is made before the mesh is active: an eager op under a mesh of compile-only
  # devices (an ahead-of-time TPU topology, ``feallm_jax.aot``) has nowhere to run.
  make = _constructor(spec, jax.random.key(0))
  with sharding.mesh_rules(mesh):
    model = nnx.eval_shape(make)
    sharding.validate_rules(model, mesh)
  return model


# ---------------------------------------------------------------------------------------------
# Parameter overview.

def _tower(path, var) -> str:
  head = str(path[0])
  if isinstance(var, nnx.LoRAParam):
    return "lora"
  if head == "llm":
    return "llm base"
  return {"lca": "lca", "projector": "projector", "vision": "vision",
          "label_head": "label head"}.get(head, head)


def parameter_counts(model: FEALLM, config_or_spec=None) -> dict[str, dict[str, int]]:
  """``{tower: {"trainable": n, "frozen": n}}`` plus a ``total`` row."""
  spec = config_or_spec if config_or_spec is not None else model.spec
  pred = nnx.filterlib.to_predicate(trainable_filter(spec))
  counts: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"trainable": 0, "frozen": 0})
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = int(np.prod(var.shape))
    kind = "trainable" if pred(path, var) else "frozen"
    counts[_tower(path, var)][kind] += n
    counts["total"][kind] += n
  return dict(counts)


def parameter_overview(model: FEALLM, config_or_spec=None) -> str:
  """Per tower: trainable / frozen counts, dtypes and the distinct sharding specs."""
  spec = config_or_spec if config_or_spec is not None else model.spec
  pred = nnx.filterlib.to_predicate(trainable_filter(spec))
  rows: dict[str, dict[str, Any]] = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    tower = _tower(path, var)
    r = rows.setdefault(tower, dict(trainable=0, frozen=0, dtypes=set(), specs=set()))
    r["trainable" if pred(path, var) else "frozen"] += int(np.prod(var.shape))
    value = var.get_value()
    r["dtypes"].add(str(value.dtype))
    shard = getattr(value, "sharding", None)
    pspec = (shard.spec if isinstance(shard, jax.sharding.NamedSharding)
             else sharding.logical_to_spec(var.get_metadata().get("out_sharding")))
    if any(a is not None for a in pspec):
      r["specs"].add(str(tuple(pspec)))
  order = ["vision", "lca", "projector", "llm base", "lora"]
  names = [t for t in order if t in rows] + sorted(set(rows) - set(order))
  lines = [f"{'tower':<10} {'trainable':>14} {'frozen':>14}  dtype      sharded as"]
  tt = tf = 0
  for t in names:
    r = rows[t]
    tt += r["trainable"]
    tf += r["frozen"]
    specs = ", ".join(sorted(r["specs"])[:4]) or "replicated"
    lines.append(f"{t:<10} {r['trainable']:>14,} {r['frozen']:>14,}  "
                 f"{'/'.join(sorted(r['dtypes'])):<10} {specs}")
  lines.append(f"{'total':<10} {tt:>14,} {tf:>14,}")
  return "\n".join(lines)
