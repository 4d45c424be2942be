"""Batched, jitted generation with a KV cache, and closed-set answer scoring.

Generation = one prefill of ``[image tokens + prompt]`` into a fixed-size cache, then a decode
loop compiled as a single ``jax.lax.while_loop`` (no Python per token): static shapes, so one
compile serves every batch of the same size. Prompts are LEFT padded (the last prompt token of
every row sits in the same slot), positions are ``cumsum(mask) - 1``, and every row stops on its
own at EOS (later tokens are ``pad_id``); the loop ends when all rows are done or after
``max_new_tokens``. Greedy when ``temperature == 0``, else temperature + nucleus (top-p)
sampling from a seed.

Works on a bare ``llm.Decoder`` (text prompts) and on a FEALLM (anything with
``embed_inputs(image, regions, input_ids, attention_mask)`` and a ``llm`` decoder attribute).
Inputs are placed batch-sharded over ``data x fsdp`` of the mesh; the batch is padded with
empty rows to a multiple of that size and the padding is cut off again. In a multi-process job
every process passes its own rows (its block of the global batch, as ``pipeline.eval_batches``
yields them), every process runs the same program on the global batch, and each gets back the
results of its own rows.

Both run the model with dropout off (``layers.with_dropout``): LoRA dropout is for training only.

Closed-set scoring (``score_candidates``) never needs parsing: every candidate answer (e.g. the
seven emotion labels as answer strings) is scored by its log-likelihood after the shared prompt.
One prefill fills the cache; each candidate then runs as one teacher-forced pass that reads the
prefilled cache (``lax.map`` over candidates, so memory stays at one candidate batch). The
score is the SUM of the candidate's token log-probs, i.e. ``log P(candidate | prompt)`` — the
exact probability of producing that answer, with no length normalization ("mean" is available
for candidates of very different lengths). Per-label probabilities are the softmax of the
scores over the candidates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from feallm_jax import sharding as sharding_lib
from feallm_jax.models import layers
from feallm_jax.models import lora as lora_lib

PROMPT_KEYS_VISION = ("image", "regions", "input_ids", "attention_mask")
OPTIONAL_KEYS_VISION = ("lca_image",)   # the face at the LCA's resolution (data.lca_image_size)
PROMPT_KEYS_TEXT = ("input_ids", "attention_mask")
PROMPT_KEYS_VISUAL = ("visual", "input_ids", "attention_mask")   # faces encoded before
IMAGE_KEYS = ("image", "regions")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. ``temperature == 0`` is greedy (argmax); ``top_p < 1`` is nucleus."""
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


@dataclasses.dataclass(frozen=True, eq=False)
class EvalView:
  """A model made ready for evaluation once: dropout off, split into (graphdef, state), its
  mesh found, float32 LoRA adapters folded into their kernels. Every ``generate`` /
  ``score_candidates`` / ``visual_tokens`` call on a module does this again (tens of ms of
  graph traversal per call on the tiny model); FEABench makes one view per suite."""
  graphdef: Any
  state: Any
  mesh: Mesh | None
  vision: bool
  merged_lora: int
  matmul_dtype: str = "float32"


MATMUL_DTYPES = ("float32", "bfloat16")


def config_matmul_dtype(config) -> str:
  """``config.eval.matmul_dtype`` (float32 when unset): the evaluation view's decoder matmuls."""
  return str(config.eval.get("matmul_dtype", "float32"))


def eval_view(model: "nnx.Module | EvalView", *, merge_lora: bool = True,
              kernels_out_in: bool | None = None, matmul_dtype: str | None = None) -> EvalView:
  """The :class:`EvalView` of ``model`` (a view passes through). ``merge_lora`` folds every
  float32 adapter into its kernel in a copy (``lora.merge``; the caller's model is unchanged):
  one matmul per projection instead of three; bf16 kernels keep their adapters (folding would
  round the sum to bf16). The quickstart's 800 FEABench answers are identical either way.
  ``kernels_out_in`` stores the decoder's kernels and LM head ``[out, in]`` in that copy, the
  layout a decode step's few-row GEMMs stream fastest on XLA:CPU (``layers.dot_out_in``); it
  costs a second copy of every decoder weight, so by default (None) only for a model whose
  parameters live on CPU, where it was measured.

  ``matmul_dtype="bfloat16"`` (``config.eval.matmul_dtype``) stores the decoder's projection
  kernels and LM head in bfloat16 in that copy and multiplies bfloat16 inputs into float32
  accumulators: half the bytes a decode step streams. Not bit-identical to float32 (each input
  rounded to 8 mantissa bits): ``bench/generate.py --matmul_dtype=bfloat16`` measures the token
  agreement and the speed. None / "float32" changes nothing. The vision tower, projector and
  attention stay as they are."""
  if matmul_dtype not in (None,) + MATMUL_DTYPES:
    raise ValueError(f"eval_view: matmul_dtype={matmul_dtype!r} (config.eval.matmul_dtype); "
                     f"expected one of {MATMUL_DTYPES}")
  if isinstance(model, EvalView):
    if matmul_dtype is not None and matmul_dtype != model.matmul_dtype:
      raise ValueError(f"eval_view: a view with {model.matmul_dtype} matmuls cannot become "
                       f"{matmul_dtype} (config.eval.matmul_dtype); make it from the model")
    return model
  mesh = _mesh_of(model)
  if kernels_out_in is None:
    kernels_out_in = _on_cpu(model)
  graphdef, state = nnx.split(layers.with_dropout(model, False))
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  merged = lora_lib.merge(copy, dtype=jnp.float32) if merge_lora else 0
  if kernels_out_in:
    _store_kernels_out_in(decoder_of(copy))
  narrow = matmul_dtype not in (None, "float32")
  if narrow:
    _store_matmuls_in(decoder_of(copy), jnp.dtype(matmul_dtype))
  if merged or kernels_out_in or narrow:
    graphdef, state = nnx.split(copy)
  return EvalView(graphdef, state, mesh, is_vision_model(model), merged,
                  matmul_dtype if narrow else "float32")


def _store_kernels_out_in(dec: nnx.Module) -> None:
  """Transposes every Dense kernel of the decoder (and an untied LM head) to ``[out, in]`` in
  place, logical axes reversed with it, and marks the modules (``layers.dot_out_in``). Only for
  a copy: training code and checkpoints keep ``[in, out]``."""
  def transposed(var):
    axes = var.get_metadata("out_sharding", None)
    return var.copy(var[...].T, **({} if axes is None else {"out_sharding": tuple(axes)[::-1]}))

  for _, m in dec.iter_modules():
    if isinstance(m, layers.Dense) and not m.kernel_out_in:   # an adapter is added after
      m.kernel = transposed(m.kernel)
      m.kernel_out_in = True
  if getattr(dec, "lm_head", None) is not None:
    dec.lm_head = transposed(dec.lm_head)
  dec.kernels_out_in = True


def is_vision_model(model: "nnx.Module | EvalView") -> bool:
  if isinstance(model, EvalView):
    return model.vision
  return hasattr(model, "embed_inputs")


def decoder_of(model: nnx.Module) -> nnx.Module:
  """The decoder LM inside a FEALLM (or the model itself when it is a bare decoder)."""
  if not is_vision_model(model):
    return model
  for name in ("llm", "decoder", "language_model"):
    if hasattr(model, name):
      return getattr(model, name)
  raise AttributeError(f"{type(model).__name__} has embed_inputs but no decoder attribute "
                       "(expected .llm)")


def left_pad_positions(mask: jax.Array) -> jax.Array:
  """Positions for left-padded rows: ``cumsum(mask) - 1``, clipped at 0 on padding."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _embed_prompt(model, inputs: Mapping[str, jax.Array]):
  """(embeds [B,L,D], mask [B,L], positions [B,L]) of the prompt for either kind of model."""
  if is_vision_model(model) and "visual" in inputs:    # faces encoded before (visual_tokens)
    embeds, mask, positions = model.embed_visual(inputs["visual"], inputs["input_ids"],
                                                 inputs["attention_mask"])
    return embeds, mask.astype(jnp.int32), positions.astype(jnp.int32)
  if is_vision_model(model):
    embeds, mask, positions = model.embed_inputs(
        inputs["image"], inputs["regions"], inputs["input_ids"], inputs["attention_mask"],
        lca_image=inputs.get("lca_image"))
    return embeds, mask.astype(jnp.int32), positions.astype(jnp.int32)
  dec = model
  mask = inputs["attention_mask"].astype(jnp.int32)
  return dec.embed(inputs["input_ids"]), mask, left_pad_positions(mask)


def _store_matmuls_in(dec: nnx.Module, dtype) -> None:
  """Casts every Dense kernel of the decoder and the LM head to ``dtype`` in
  place and makes their matmuls take ``dtype`` inputs. A tied head gets its own cast copy (the
  embedding lookup keeps the float32 table). Only for a copy (``eval_view``)."""
  def cast(var):
    return var.copy(var[...].astype(dtype))

  for _, m in dec.iter_modules():
    if isinstance(m, layers.Dense):
      m.kernel = cast(m.kernel)
      m.matmul_dtype = dtype
  if getattr(dec, "lm_head", None) is not None:
    dec.lm_head = cast(dec.lm_head)
  elif dec.kernels_out_in:        # [vocab, hidden], the tied table's own layout
    dec.lm_head = nnx.data(cast(dec.embed_tokens))   # was a static None
  dec.head_matmul_dtype = dtype


def _constrain(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Batch-shard an array created inside jit (the cache) so it follows the inputs."""
  if mesh is None or x.shape[0] % sharding_lib.batch_shards(mesh):
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1)))))


def _prefill(model, inputs, extra_len: int, mesh: Mesh | None):
  """Runs the prompt through the decoder into a cache with ``extra_len`` free slots."""
  dec = decoder_of(model)
  embeds, mask, positions = _embed_prompt(model, inputs)
  b, t = mask.shape
  cache = dec.init_cache(b, t + extra_len)
  cache = jax.tree.map(lambda x: _constrain(x, mesh) if x.ndim else x, cache)
  cache_mask = jnp.concatenate([mask, jnp.zeros((b, extra_len), jnp.int32)], axis=1)
  # Only the last position's logits are needed: projecting the final hidden state of that one
  # slot (the full [B, L, V] logits are then dead code that XLA drops) saves a [B*L, D] x [D, V]
  # matmul — for 8 x 212 prompt slots and an 8k vocab, more FLOPs than the whole decoder.
  _, cache, hidden = dec(inputs_embeds=embeds, positions=positions, attention_mask=cache_mask,
                         cache=cache, return_hidden=True, empty_cache=True)
  last_logits = dec.logits(hidden[:, -1:])[:, 0]
  next_pos = positions[:, -1] + 1
  return last_logits, cache, cache_mask, next_pos


def _decode_step(dec, prev: jax.Array, cache, cache_mask: jax.Array, pos: jax.Array,
                 slot: jax.Array):
  """One token per row: marks cache ``slot`` valid, runs ``prev [B,1]`` at positions ``pos``
  through the decoder (writing its k/v at the cache index) -> (logits [B,V], cache, mask)."""
  b = prev.shape[0]
  cache_mask = jax.lax.dynamic_update_slice_in_dim(cache_mask, jnp.ones((b, 1), jnp.int32),
                                                   slot, axis=1)
  logits, cache = dec(inputs_embeds=dec.embed(prev), positions=pos[:, None],
                      attention_mask=cache_mask, cache=cache)
  return logits[:, -1], cache, cache_mask


# The two halves of generation as separate programs, for ahead-of-time compilation and cost
# analysis (``feallm_jax.aot``); ``generate`` runs both inside one compiled while loop.
@functools.partial(jax.jit, static_argnames=("graphdef", "extra_len", "mesh"))
def prefill_jit(graphdef, state, inputs, *, extra_len: int, mesh: Mesh | None):
  """``_prefill`` of a split model: (last logits, cache, cache mask, next positions)."""
  return _prefill(nnx.merge(graphdef, state), inputs, extra_len, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step_jit(graphdef, state, prev, cache, cache_mask, pos, slot):
  """``_decode_step`` of a split model (the loop body of ``generate``), cache donated."""
  return _decode_step(decoder_of(nnx.merge(graphdef, state)), prev, cache, cache_mask, pos, slot)


def _select(logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool,
            nucleus: bool) -> jax.Array:
  """Greedy argmax, or a sample from the temperature-scaled (nucleus-truncated) distribution."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if nucleus:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # top-1 always kept
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# Only what changes shapes or code is static: seeds, EOS ids, temperature and top-p values are
# traced, so changing them never recompiles.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "nucleus",
                                             "mesh"))
def _generate_jit(graphdef, state, inputs, key, eos, pad_id, temperature, top_p, *,
                  max_new_tokens: int, greedy: bool, nucleus: bool, mesh: Mesh | None):
  model = nnx.merge(graphdef, state)
  dec = decoder_of(model)
  n = max_new_tokens
  select = functools.partial(_select, temperature=temperature, top_p=top_p, greedy=greedy,
                             nucleus=nucleus)
  last_logits, cache, cache_mask, pos = _prefill(model, inputs, n, mesh)
  b = last_logits.shape[0]
  prompt_len = cache_mask.shape[1] - n

  first = select(last_logits, jax.random.fold_in(key, 0))
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(state):
    step, _, done, *_ = state
    return (step < n) & ~jnp.all(done)

  def body(state):
    step, tokens, done, lengths, cache, cache_mask, pos = state
    prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # [B,1]
    logits, cache, cache_mask = _decode_step(dec, prev, cache, cache_mask, pos,
                                             prompt_len + step - 1)
    tok = select(logits, jax.random.fold_in(key, step))
    tok = jnp.where(done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos)
    return step + 1, tokens, done, lengths, cache, cache_mask, pos + 1

  init = (jnp.ones((), jnp.int32), tokens, done, lengths, cache, cache_mask, pos)
  _, tokens, done, lengths, *_ = jax.lax.while_loop(cond, body, init)
  return tokens, lengths


# Prompt columns are kept in multiples of this many (see ``trim_left_padding``): few distinct
# shapes, so few compiles, while a batch of short prompts is not run at the longest length.
PROMPT_BUCKET = 32


def trim_left_padding(ids: np.ndarray, mask: np.ndarray, multiple: int = PROMPT_BUCKET,
                      at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Drops the leading columns that are padding in every row, keeping a multiple of ``multiple``
  (and at least ``at_least``) columns.

  Why: evaluation batches are left-padded to ``data.max_len`` (80 for the synthetic suites)
  while FEABench prompts hold 15-24 text tokens; the prefill's work and every decode step's
  cache read grow with the padded length. Only columns masked out in every row are dropped, so
  no row's tokens, positions (``cumsum(mask) - 1``) or attention change.
  """
  t = mask.shape[1]
  keep = min(t, max(-(-max(prompt_width(mask), at_least) // multiple) * multiple, 1))
  return ids[:, t - keep:], mask[:, t - keep:]


def prompt_width(mask: np.ndarray) -> int:
  """Columns from the first one any row uses to the end (1 when no row uses any)."""
  used = mask.astype(bool).any(axis=0)
  return mask.shape[1] - int(np.argmax(used)) if used.any() else 1


def _prepare(model, inputs: Mapping[str, Any], mesh: Mesh | None,
             keys: Sequence[str] | None = None):
  """Picks the prompt keys, pads the batch to the mesh's batch shards, places it sharded.

  A vision batch carrying ``visual`` (tokens from :func:`visual_tokens`) needs no image."""
  if keys is None and is_vision_model(model) and "visual" in inputs:
    keys = PROMPT_KEYS_VISUAL
  elif keys is None:
    keys = PROMPT_KEYS_VISION if is_vision_model(model) else PROMPT_KEYS_TEXT
  keys = tuple(keys)
  missing = [k for k in keys if k not in inputs]
  if missing:
    raise KeyError(f"generate: prompt batch lacks {missing}")
  if is_vision_model(model) and "image" in keys:
    keys = keys + tuple(k for k in OPTIONAL_KEYS_VISION if k in inputs)
  arrays = {k: np.asarray(inputs[k]) for k in keys}
  b = arrays[keys[0]].shape[0]
  shards = sharding_lib.batch_shards(mesh) if mesh is not None else 1
  pc = jax.process_count()
  if pc > 1:          # ``inputs`` holds this process's rows only: pad them to its share
    if mesh is None:
      raise ValueError("generate: a multi-process run needs the model on a mesh")
    if shards % pc:
      raise ValueError(f"mesh {dict(mesh.shape)}: data x fsdp = {shards} does not split over "
                       f"{pc} processes (set --config.mesh.data / fsdp)")
    shards //= pc
  pad = (-b) % shards
  if pad:
    arrays = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in
              arrays.items()}
  if "input_ids" in arrays:
    arrays["input_ids"] = arrays["input_ids"].astype(np.int32)
    arrays["attention_mask"] = arrays["attention_mask"].astype(np.int32)
    at_least = 0
    if pc > 1:        # every process must build the same global shape: agree on the longest
      from jax.experimental import multihost_utils
      need = np.int32(prompt_width(arrays["attention_mask"]))
      at_least = int(np.max(multihost_utils.process_allgather(need)))
    arrays["input_ids"], arrays["attention_mask"] = trim_left_padding(
        arrays["input_ids"], arrays["attention_mask"], at_least=at_least)
  if mesh is not None and pc > 1:
    placed = sharding_lib.global_batch(arrays, mesh)
  elif mesh is not None:
    placed = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim))
              for k, v in arrays.items()}
  else:
    placed = {k: jnp.asarray(v) for k, v in arrays.items()}
  return placed, b


def _on_cpu(model) -> bool:
  """Whether the model's parameters live on CPU devices."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    if isinstance(leaf, jax.Array):
      return all(d.platform == "cpu" for d in leaf.devices())
  return False


def _mesh_of(model) -> Mesh | None:
  """The mesh the model's parameters live on (None when they are not NamedSharded)."""
  for leaf in jax.tree.leaves(nnx.state(model)):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def generate(model: nnx.Module, inputs: Mapping[str, Any], cfg: SamplingConfig,
             mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generates up to ``cfg.max_new_tokens`` tokens for every left-padded prompt row.

  Returns ``(tokens [B, max_new_tokens] int32, lengths [B])``: ``lengths`` counts tokens up to
  and including EOS; positions after it hold ``cfg.pad_id``.
  """
  view = eval_view(model)
  mesh = mesh if mesh is not None else view.mesh
  placed, b = _prepare(view, inputs, mesh)
  args = (view.graphdef, view.state, placed, jax.random.key(cfg.seed),
          jnp.asarray(cfg.eos_ids or (-1,), jnp.int32), jnp.int32(cfg.pad_id),
          jnp.float32(max(cfg.temperature, 1e-6)), jnp.float32(cfg.top_p))
  kw = dict(max_new_tokens=cfg.max_new_tokens, greedy=cfg.temperature == 0,
            nucleus=cfg.top_p < 1, mesh=mesh)
  with _on(mesh):
    tokens, lengths = _generate_jit(*args, **kw)
  return _rows(tokens, mesh)[:b], _rows(lengths, mesh)[:b]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _visual_jit(graphdef, state, inputs):
  model = nnx.merge(graphdef, state)
  return model.visual_tokens(inputs["image"], inputs["regions"], lca_image=inputs.get("lca_image"))


def visual_tokens(model: nnx.Module, inputs: Mapping[str, Any],
                  mesh: Mesh | None = None) -> np.ndarray:
  """``[B, N_vis(+1), D]`` visual tokens of the batch's faces (this process's rows), to pass back
  as ``inputs["visual"]`` to :func:`generate` / :func:`score_candidates` in place of the image:
  FEABench asks up to four questions about each face and encodes it once."""
  view = eval_view(model)
  mesh = mesh if mesh is not None else view.mesh
  placed, b = _prepare(view, inputs, mesh, keys=IMAGE_KEYS)
  with _on(mesh):
    out = _visual_jit(view.graphdef, view.state, placed)
  return _rows(out, mesh)[:b]


def _on(mesh: Mesh | None):
  """``jax.set_mesh(mesh)``, or nothing for a model that is not on a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _rows(x: jax.Array, mesh: Mesh | None) -> np.ndarray:
  """The rows of a result that belong to this process's prompts (all rows in one process)."""
  return np.asarray(x) if mesh is None else sharding_lib.process_rows(x, mesh)


def decode_tokens(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                  eos_ids: Sequence[int] = ()) -> list[str]:
  """Token rows -> answer strings (EOS and everything after it dropped)."""
  out = []
  eos = set(int(e) for e in eos_ids)
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)]]
    if ids and ids[-1] in eos:
      ids = ids[:-1]
    out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
  return out


# --- closed-set scoring ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _score_jit(graphdef, state, inputs, cand_ids, cand_mask, *, mesh: Mesh | None):
  """Sum of log-probs of every candidate ``[C, Lc]`` after every prompt row -> ``[B, C]``."""
  model = nnx.merge(graphdef, state)
  dec = decoder_of(model)
  c, lc = cand_ids.shape
  last_logits, cache, cache_mask, pos = _prefill(model, inputs, lc, mesh)
  b = last_logits.shape[0]
  first_lp = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)  # [B, V]
  prompt_len = cache_mask.shape[1] - lc

  def one(args):
    ids, m = args  # [Lc], [Lc]
    ids_b = jnp.broadcast_to(ids, (b, lc))
    m_b = jnp.broadcast_to(m, (b, lc)).astype(jnp.int32)
    full_mask = jax.lax.dynamic_update_slice_in_dim(cache_mask, m_b, prompt_len, axis=1)
    positions = pos[:, None] + jnp.arange(lc, dtype=jnp.int32)[None]
    logits, _ = dec(inputs_embeds=dec.embed(ids_b), positions=positions,
                    attention_mask=full_mask, cache=cache)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, Lc, V]
    # token j is predicted by the logits at j-1 (j = 0 by the prefill's last logits).
    tok_lp = jnp.concatenate([
        first_lp[:, ids[0]][:, None],
        jnp.take_along_axis(lp[:, :-1], ids_b[:, 1:, None], axis=-1)[..., 0]], axis=1)
    return jnp.sum(tok_lp * m_b, axis=1)

  sums = jax.lax.map(one, (cand_ids, cand_mask))  # [C, B]
  return sums.T


def encode_candidates(tokenizer, candidates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Candidate answer strings -> right-padded ``ids [C, Lc]`` and ``mask [C, Lc]``."""
  if not candidates:
    raise ValueError("score: no candidates")
  enc = [tokenizer.encode(c, add_special_tokens=False) for c in candidates]
  empty = [c for c, e in zip(candidates, enc) if not e]
  if empty:
    raise ValueError(f"score: candidates {empty} tokenize to nothing")
  lc = max(len(e) for e in enc)
  ids = np.zeros((len(enc), lc), np.int32)
  mask = np.zeros((len(enc), lc), np.int32)
  for i, e in enumerate(enc):
    ids[i, :len(e)] = e
    mask[i, :len(e)] = 1
  return ids, mask


@dataclasses.dataclass
class Scores:
  """Per-row candidate scores: ``log_likelihood [B, C]`` (the chosen reduction),
  ``probs [B, C]`` (softmax over candidates) and ``pred [B]`` (argmax index)."""
  log_likelihood: np.ndarray
  probs: np.ndarray
  pred: np.ndarray


def score_candidates(model: nnx.Module, inputs: Mapping[str, Any], cand_ids: np.ndarray,
                     cand_mask: np.ndarray, *, reduction: str = "sum",
                     mesh: Mesh | None = None) -> Scores:
  """Scores every candidate continuation after every prompt row (see module docstring)."""
  if reduction not in ("sum", "mean"):
    raise ValueError(f"score: reduction must be 'sum' or 'mean', got {reduction!r}")
  view = eval_view(model)
  mesh = mesh if mesh is not None else view.mesh
  placed, b = _prepare(view, inputs, mesh)
  ids = jnp.asarray(cand_ids, jnp.int32)
  m = jnp.asarray(cand_mask, jnp.int32)
  with _on(mesh):
    sums = _score_jit(view.graphdef, view.state, placed, ids, m, mesh=mesh)
  sums = _rows(sums, mesh).astype(np.float64)[:b]
  if reduction == "mean":
    sums = sums / np.asarray(cand_mask).sum(1)[None]
  z = sums - sums.max(1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  return Scores(log_likelihood=sums, probs=probs, pred=sums.argmax(1))
