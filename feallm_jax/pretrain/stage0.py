"""Stage 0 end to end: pretrain the tiny vision tower (CLIP-style) and LLM (text), then write a
base checkpoint in exactly the format `launch/import_hf.py` writes.

``pretrain_backbones(config, out_dir)`` is what `launch/pretrain_backbones.py` and the tests
call. The output is loaded by stage 1 through ``config.model.base_checkpoint`` like any imported
CLIP + LLaMA pair: HF-style configs in ``meta.json``, the tokenizer, a content fingerprint. A
``stage0.json`` beside it records the config, the data seen, losses, timings and the linear-probe
quality of the frozen features on the identity-disjoint test pool.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from feallm_jax import sharding
from feallm_jax.data import facs, instructions, pipeline, synthetic, tokenizer as tok_lib
from feallm_jax.models import llm as llm_lib, vision as vision_lib
from feallm_jax.pretrain import captions, clip, faces, lm


# --- HF-style configs (what meta.json records, as import_hf records the real ones) -------------

def hf_vision_config(cfg: vision_lib.VisionConfig) -> dict[str, Any]:
  return dict(model_type="clip_vision_model", image_size=cfg.image_size,
              patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, layer_norm_eps=cfg.layer_norm_eps,
              hidden_act=cfg.hidden_act, num_channels=cfg.num_channels)


def hf_llm_config(cfg: llm_lib.LLMConfig, tok) -> dict[str, Any]:
  return dict(model_type=cfg.model_type, architectures=["LlamaForCausalLM"],
              vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
              max_position_embeddings=cfg.max_position_embeddings,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)


def padded_vocab(tok) -> int:
  from feallm_jax.models.feallm import VOCAB_MULTIPLE
  return -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# --- a small shared training loop -------------------------------------------------------------

def _prefetch(it: Iterator, depth: int = 3) -> Iterator:
  """Host batches made in a thread while the device step runs (numpy/cv2 release the GIL)."""
  q: queue.Queue = queue.Queue(depth)
  stop = object()

  def work():
    for x in it:
      q.put(x)
    q.put(stop)
  threading.Thread(target=work, daemon=True).start()
  while (x := q.get()) is not stop:
    yield x


def _fit(model: nnx.Module, loss: Callable, batches: Iterator, *, steps: int, lr: float,
         weight_decay: float, warmup: int, name: str, log_every: int = 100,
         on_log: Callable[[int, nnx.Module], None] | None = None, wrt=nnx.Param) -> list[dict]:
  """AdamW + warmup-cosine on the `wrt` parameters of `model` (default: every nnx.Param);
  returns the logged history. Batches are tuples (positional loss arguments) or one dict.
  `on_log(step, model)` runs after each logged step (e.g. to snapshot a long run)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
  opt = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, opt, *batch):
    diff = nnx.DiffState(0, wrt)
    (l, acc), g = nnx.value_and_grad(loss, argnums=diff, has_aux=True)(model, *batch)
    opt.update(model, g)
    return l, acc

  history, t0, acc_l, acc_a = [], time.perf_counter(), [], []
  for i, batch in zip(range(1, steps + 1), _prefetch(batches)):
    args = ((jax.tree.map(jnp.asarray, batch),) if isinstance(batch, dict)
            else tuple(jnp.asarray(x) for x in batch))
    l, a = step(model, opt, *args)
    acc_l.append(l)
    acc_a.append(a)
    if i % log_every == 0 or i == steps:
      rec = dict(step=i, loss=float(np.mean(jax.device_get(acc_l))),
                 accuracy=float(np.mean(jax.device_get(acc_a))),
                 seconds=round(time.perf_counter() - t0, 1))
      history.append(rec)
      acc_l, acc_a = [], []
      print(f"[stage0] {name} {i}/{steps} loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} "
            f"({rec['seconds']:.0f} s)", flush=True)
      if on_log is not None:
        on_log(i, model)
  return history


# --- vision ------------------------------------------------------------------------------------

def _clip_batches(data: dict[str, np.ndarray], tok, vcfg: vision_lib.VisionConfig, batch: int,
                  max_len: int, seed: int, pair_fraction: float = 0.0,
                  parallel_fraction: float | None = None) -> Iterator[tuple]:
  """Batches of (pixels, caption ids, mask, content group). With `pair_fraction` > 0 (data
  rendered with `pairs`), that share of each batch is whole minimal pairs (rows 2k, 2k+1).
  With `parallel_fraction` set (captioning on), a fifth element: the captioner's input ids, in
  which that share of the rows is all padding (CapPa's parallel prediction)."""
  rng = np.random.default_rng([seed, 5])
  aug = pipeline.Augment()
  idents: dict[tuple[int, int], synthetic.Identity] = {}

  def ident(s, i):
    key = (int(s), int(i))
    if key not in idents:
      idents[key] = synthetic.make_identity("train", key[1], key[0])
    return idents[key]
  n = len(data["emotion"])
  while True:
    idx = faces.batch_rows(rng, n, batch, pair_fraction)
    px, caps, groups = [], [], []
    for j in idx:
      rec = dict(image=data["image"][j], has_landmarks=False, id="stage0")
      px.append(pipeline.image_and_regions(rec, vcfg.image_size, rng, aug, False)[0])
      aus = faces.active(data["au_present"][j])
      idt = ident(data["seed"][j], data["subject"][j])
      caps.append(captions.caption(int(data["emotion"][j]), aus, idt, rng))
      # Positives: captions that describe the same expression (emotion and movements), whatever
      # their wording and appearance words. Grouping by the whole caption let the towers match
      # on hair, skin and background alone (unique per person) and skip the face: a linear
      # probe of that tower read the emotion from its class token at 24 %.
      groups.append((int(data["emotion"][j]),) + tuple(aus))
    enc = tok(caps, padding="max_length", max_length=max_len, truncation=True,
              add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    keys = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    group = np.asarray([keys[g] for g in groups]).astype(np.int32)
    if parallel_fraction is None:
      yield np.stack(px), ids, mask, group
    else:
      blind = rng.random(len(ids)) < parallel_fraction
      inputs = np.where(blind[:, None], np.int32(tok.pad_token_id), ids)
      yield np.stack(px), ids, mask, group, inputs


def probe(vision: vision_lib.VisionEncoder, train: dict[str, np.ndarray],
          test: dict[str, np.ndarray], feature_layer: int = -2) -> dict[str, Any]:
  """Linear probes on frozen features: emotion (softmax) and each rendered AU (logistic).

  Features: the `feature_layer` patch tokens, concatenated (F_L, what FEALLM's projector
  reads). A measure of what stage 1 can read, not a training signal.
  """
  from feallm_jax.eval import metrics as metrics_lib
  size = vision.cfg.image_size

  @nnx.jit
  def feats(vision, px):
    h = vision(px)[feature_layer][:, 1:]
    return h.reshape(h.shape[0], -1)

  def featurize(images):
    out = []
    for i in range(0, len(images), 256):
      px = np.stack([pipeline.image_and_regions(dict(image=im, has_landmarks=False, id="p"),
                                                size, None, None, False)[0]
                     for im in images[i:i + 256]])
      out.append(np.asarray(feats(vision, jnp.asarray(px))))
    return np.concatenate(out)
  xa, xb = featurize(train["image"]), featurize(test["image"])
  mu, sd = xa.mean(0), xa.std(0) + 1e-6
  xa, xb = (xa - mu) / sd, (xb - mu) / sd
  scored = synthetic.occurring_aus(facs.RAF_DB)
  rendered = [facs.au_index(a) for a in scored]
  ya = np.concatenate([np.eye(len(facs.EMOTIONS))[train["emotion"]],
                       train["au_present"][:, rendered]], 1).astype(np.float32)
  w = _ridge_logistic(xa, ya, n_softmax=len(facs.EMOTIONS))
  logits = np.c_[xb, np.ones(len(xb))] @ w
  fer = float((logits[:, :len(facs.EMOTIONS)].argmax(1) == test["emotion"]).mean())
  pred = (logits[:, len(facs.EMOTIONS):] > 0).astype(np.int64)
  au = metrics_lib.au_f1(test["au_present"][:, rendered], pred, scored)
  return dict(fer_accuracy=fer, au_mean_f1=au["mean_f1"],
              au_f1={k: round(v, 4) for k, v in au["per_au_f1"].items()})


def _ridge_logistic(x: np.ndarray, y: np.ndarray, n_softmax: int, steps: int = 300,
                    l2: float = 1e-3) -> np.ndarray:
  """Full-batch gradient descent for softmax (first n_softmax columns) + logistic heads."""
  xb = jnp.asarray(np.c_[x, np.ones(len(x))], jnp.float32)
  yb = jnp.asarray(y)

  def loss(w):
    z = xb @ w
    ce = optax.softmax_cross_entropy(z[:, :n_softmax], yb[:, :n_softmax]).mean()
    bce = optax.sigmoid_binary_cross_entropy(z[:, n_softmax:], yb[:, n_softmax:]).mean()
    return ce + bce + l2 * jnp.sum(w[:-1] ** 2)
  w = jnp.zeros((xb.shape[1], y.shape[1]), jnp.float32)
  opt = optax.adam(0.05)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    g = jax.grad(loss)(w)
    u, state = opt.update(g, state)
    return optax.apply_updates(w, u), state
  for _ in range(steps):
    w, state = step(w, state)
  return np.asarray(w)


def _make_mesh():
  return sharding.single_device_mesh()


def vision_config(config) -> vision_lib.VisionConfig:
  return vision_lib.VisionConfig.from_dict(config.vision)


def train_vision(config, data: dict[str, np.ndarray], tok, on_log=None) -> tuple[
    vision_lib.VisionEncoder, list[dict]]:
  """CLIP-style pretraining of the vision tower on `data` (faces.render output)."""
  c = config.clip
  vcfg = vision_config(config)
  tcfg = clip.TextTowerConfig(vocab_size=padded_vocab(tok), hidden_size=int(c.text_width),
                              intermediate_size=2 * int(c.text_width),
                              num_layers=int(c.text_layers), num_heads=int(c.text_heads),
                              max_len=int(c.max_len))
  weight = float(c.get("caption_weight", 0.0))
  with sharding.mesh_rules(_make_mesh()):
    model = clip.CLIP(vcfg, tcfg, int(c.embed_dim), rngs=nnx.Rngs(int(config.seed)),
                      caption_feature_layer=(int(c.get("caption_feature_layer", -2))
                                             if weight > 0 else None))
    init = str(c.get("init_vision", ""))
    if init:
      from feallm_jax.weights import base_checkpoint
      base_checkpoint.restore_into(init, model.vision, None)
      print(f"[stage0] vision tower starts from {init}", flush=True)
    loss = (functools.partial(clip.coca_loss, caption_weight=weight,
                              contrastive_weight=float(c.get("contrastive_weight", 1.0)))
            if weight > 0 else clip.contrastive_loss)
    hist = _fit(model, loss,
                _clip_batches(data, tok, vcfg, int(c.batch_size), int(c.max_len),
                              int(config.seed), float(c.get("pair_fraction", 0.0)),
                              float(c.get("parallel_fraction", 0.0)) if weight > 0 else None),
                steps=int(c.steps), lr=float(c.lr), weight_decay=float(c.weight_decay),
                warmup=int(c.warmup), name="vision (CoCa)" if weight > 0 else "vision (CLIP)",
                on_log=None if on_log is None else lambda i, m: on_log(i, m.vision))
  return model.vision, hist


def llm_config(config, tok) -> llm_lib.LLMConfig:
  d = dict(config.llm)
  d.pop("steps", None)
  keep = {f.name for f in dataclasses.fields(llm_lib.LLMConfig)}
  d = {k: v for k, v in d.items() if k in keep}
  d["vocab_size"] = padded_vocab(tok)
  return llm_lib.LLMConfig.from_dict(d)


def train_llm(config, tok) -> tuple[llm_lib.Decoder, list[dict]]:
  """Text pretraining of the LLM on the stage-0 corpus (`lm.py`)."""
  t = config.lm
  cfg = llm_config(config, tok)
  with sharding.mesh_rules(_make_mesh()):
    model = llm_lib.Decoder(cfg, rngs=nnx.Rngs(int(config.seed) + 1))
    hist = _fit(model, lm.lm_loss,
                lm.batches(tok, int(t.batch_size), int(t.max_len), tuple(config.seeds),
                           int(config.seed)),
                steps=int(t.steps), lr=float(t.lr), weight_decay=float(t.weight_decay),
                warmup=int(t.warmup), name="llm (text)")
  return model, hist


def _test_faces(n: int, image_size: int) -> dict[str, np.ndarray]:
  """The first n faces of the identity-disjoint test pool, as the synthetic_fea builder makes
  them (seed 0, test split, JPEG): used only to *measure* the probe, never to train."""
  imgs, emo, aus = [], [], []
  for i in range(n):
    r = synthetic.generate(i, split="test", seed=0, image_size=image_size)
    imgs.append(faces._jpeg_round_trip(r["image"]))
    emo.append(int(r["emotion"]))
    aus.append(np.asarray(r["au_present"], np.int32))
  return dict(image=np.stack(imgs), emotion=np.asarray(emo), au_present=np.stack(aus))


# What decides the LLM of stage 0: equal values here mean an equal text-pretrained LLM.
LLM_KEYS = ("seed", "tokenizer", "seeds", "llm", "lm")


def _reusable_llm(config, src: str) -> dict[str, Any]:
  """The stage0.json of `src` if its LLM is the one `config` would train, else a clear error.
  Text pretraining does not depend on the vision recipe, so iterating on the vision tower need
  not repeat it (the output records where the LLM came from)."""
  path = os.path.join(src, "stage0.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--reuse_llm_from={src}: no stage0.json there (not a stage-0 output)")
  with open(path) as f:
    rec = json.load(f)
  ours = json.loads(config.to_json())
  diff = [k for k in LLM_KEYS if json.dumps(rec["config"].get(k), sort_keys=True)
          != json.dumps(ours.get(k), sort_keys=True)]
  if diff:
    raise ValueError(f"--reuse_llm_from={src}: its LLM was trained with other settings "
                     f"({', '.join(diff)} differ); drop the flag to train the LLM")
  return rec


def _check_init_vision(config) -> None:
  """Before any rendering: `clip.init_vision` is a base whose ViT has this config's shape."""
  from feallm_jax.weights import base_checkpoint
  init = str(config.clip.get("init_vision", ""))
  if not init:
    return
  base_checkpoint.verify(init)
  theirs = vision_lib.VisionConfig.from_hf(base_checkpoint.read_meta(init)["vision_hf_config"])
  ours = vision_config(config)
  if theirs != ours:
    diff = {f.name: (getattr(theirs, f.name), getattr(ours, f.name))
            for f in dataclasses.fields(ours) if getattr(theirs, f.name) != getattr(ours, f.name)}
    raise ValueError(f"--config.clip.init_vision={init}: its vision tower differs from "
                     f"config.vision (base, config): {diff}")


def pretrain_backbones(config, out_dir: str, *, overwrite: bool = False,
                       reuse_llm_from: str = "") -> dict[str, Any]:
  """Runs stage 0 and writes the base checkpoint to `out_dir`; returns the stage0.json record.
  `reuse_llm_from`: a stage-0 output whose LLM settings equal `config`'s; its LLM is copied
  instead of trained again (checked before anything runs)."""
  from feallm_jax.weights import base_checkpoint
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
  reused = _reusable_llm(config, reuse_llm_from) if reuse_llm_from else None
  if reused is not None:
    base_checkpoint.verify(reuse_llm_from)
  _check_init_vision(config)
  t0 = time.perf_counter()
  tok = tok_lib.load(config.get("tokenizer", ""))
  seeds = tuple(int(s) for s in config.seeds)
  data = faces.render(seeds, int(config.faces_per_seed), int(config.render_size),
                      workers=int(config.get("workers", 0)),
                      pairs=bool(config.get("minimal_pairs", False)))
  t_render = time.perf_counter() - t0
  print(f"[stage0] rendered {len(data['emotion'])} faces from {len(seeds)} train pools of "
        f"{synthetic.NUM_IDENTITIES['train']} identities ({t_render:.0f} s)", flush=True)
  n_probe = int(config.get("probe_faces", 0))
  every = int(config.get("probe_every", 0))
  probe_train = {k: v[-min(4800, len(v)):] for k, v in data.items()}
  probe_test = _test_faces(n_probe, int(config.render_size)) if n_probe else None
  probes = []

  def measure(step, vision):
    q = probe(vision, probe_train, probe_test)
    au = q["au_f1"]
    print(f"[stage0] linear probe at step {step} (test pool, {n_probe} faces): FER "
          f"{q['fer_accuracy']:.3f}, AU mean F1 {q['au_mean_f1']:.3f} (AU10 {au.get('AU10')}, "
          f"AU17 {au.get('AU17')}, AU24 {au.get('AU24')})", flush=True)
    probes.append(dict(step=step, **q))
  on_log = None
  if n_probe and every:
    on_log = lambda i, v: measure(i, v) if i % every == 0 and i < int(config.clip.steps) else None  # noqa: E731
  vision, vhist = train_vision(config, data, tok, on_log=on_log)
  quality = {}
  if n_probe:
    measure(int(config.clip.steps), vision)
    quality = probes[-1]
  del data
  probe_train = None   # frees the probe faces (a del of measure's closure name: ruff F821)
  if reused is None:
    llm, lhist = train_llm(config, tok)
  else:
    with sharding.mesh_rules(_make_mesh()):
      llm = llm_lib.Decoder(llm_config(config, tok), rngs=nnx.Rngs(int(config.seed) + 1))
      base_checkpoint.restore_into(reuse_llm_from, None, llm)
    lhist = reused["llm_history"]
    print(f"[stage0] LLM reused from {reuse_llm_from} (same LLM settings; fingerprint "
          f"{reused['fingerprint'][:16]}…)", flush=True)
  knows = text_check(llm, tok, seeds)
  print(f"[stage0] LLM from captions alone: emotion accuracy "
        f"{knows['fer_from_caption_accuracy']:.3f}, exact AU sets "
        f"{knows['aus_from_caption_exact']:.3f}", flush=True)
  with sharding.mesh_rules(_make_mesh()):
    fp = base_checkpoint.save(
        out_dir, vision, llm, vision_hf_config=hf_vision_config(vision.cfg),
        llm_hf_config=hf_llm_config(llm.cfg, tok),
        tokenizer_dir=config.get("tokenizer", "") or tok_lib.TINY_DIR, overwrite=overwrite)
  record = dict(
      fingerprint=fp, config=json.loads(config.to_json()),
      faces=dict(seeds=list(seeds), per_seed=int(config.faces_per_seed),
                 identities=len(seeds) * synthetic.NUM_IDENTITIES["train"],
                 split="train pools of seeds 1..N (the instruction set is seed 0; the test pool "
                       "is never rendered for training)"),
      vision_history=vhist, llm_history=lhist, probe=quality, probe_history=probes,
      llm_text_check=knows,
      llm_reused_from=None if reused is None else dict(
          fingerprint=reused["fingerprint"], llm_seconds=reused.get("seconds")),
      seconds=round(time.perf_counter() - t0, 1), jax_version=jax.__version__)
  with open(os.path.join(out_dir, "stage0.json"), "w") as f:
    json.dump(record, f, indent=1)
  return record


def text_check(llm: llm_lib.Decoder, tok, seeds: tuple[int, ...], n: int = 128,
               seed: int = 1) -> dict[str, float]:
  """What the text-pretrained LLM knows: from a caption alone (no image), the emotion (fer task)
  and the AUs (aur task) of fresh train-pool faces, greedy, scored with the evaluator's parser."""
  from feallm_jax.eval import generate as gen, parse
  from feallm_jax.eval.feabench import eos_ids
  rng = np.random.default_rng([seed, 11])
  rows = {"fer": [], "aur": []}
  while min(len(v) for v in rows.values()) < n:
    kind, conv = lm.sample_text(rng, seeds, caption_frac=0.0, glossary_frac=0.0)
    task = next((t for t in ("fer", "aur")
                 if conv[0]["value"].endswith(tuple(instructions.PROMPTS[t]))), None)
    if task is not None and len(rows[task]) < n:
      rows[task].append(conv)
  sampling = gen.SamplingConfig(max_new_tokens=48, eos_ids=eos_ids(tok), pad_id=tok.pad_token_id)
  out = {}
  for task, convs in rows.items():
    enc = [tok_lib.encode_prompt(tok, c) for c in convs]
    width = max(len(ids) for ids, _, _ in enc)
    ids = np.full((len(enc), width), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, (x, _, _) in enumerate(enc):
      ids[i, width - len(x):], mask[i, width - len(x):] = x, 1
    with sharding.mesh_rules(_make_mesh()):
      tokens, lengths = gen.generate(llm, dict(input_ids=ids, attention_mask=mask), sampling)
    texts = gen.decode_tokens(tok, tokens, lengths, sampling.eos_ids)
    refs = [ref for _, ref, _ in enc]
    if task == "fer":
      out["fer_from_caption_accuracy"] = float(np.mean(
          [parse.parse_emotion(t) == parse.parse_emotion(r) for t, r in zip(texts, refs)]))
    else:
      out["aus_from_caption_exact"] = float(np.mean(
          [parse.parse_aus(t) == parse.parse_aus(r) for t, r in zip(texts, refs)]))
  return out

