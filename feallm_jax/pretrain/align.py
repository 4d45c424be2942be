"""Adapter alignment: LLaVA's feature-alignment stage for FEALLM's new modules.

LLaVA-1.5 (and EmoLA on top of it) train in two stages: first only the projector, on
image-caption pairs, with the vision tower and the LLM frozen (`pretrain_mm_mlp_adapter`); then
instruction tuning starts from that projector. The FEALLM paper is silent on it; this is that
first stage for FEALLM's trainable vision-side modules (Local Clue Aggregator + projector): the
captioned stage-0 faces (`faces.py`, minimal pairs included, train pools of seeds 1..N) are
described by the frozen LLM through them, "<image> Describe this face." -> caption.

Stage 1 (`configs/tiny_synthetic.py`) starts its LCA and projector from the output through
``model.init_adapter``; LoRA starts fresh, as in LLaVA. The output directory holds
``adapter/`` (Orbax, the trainable non-LoRA parameters by NNX path) and ``adapter.json`` (the
model settings it fits, the base checkpoint's fingerprint, losses, timings).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from feallm_jax import sharding
from feallm_jax.data import pipeline
from feallm_jax.models import feallm, layers
from feallm_jax.pretrain import captions, faces

PROMPTS = ("Describe this face.", "What does this face look like?",
           "Describe the person's expression and appearance.", "Write a caption for this face.")
# Model settings an adapter depends on: stage 1 must match them to start from it (the towers
# are pinned by the base checkpoint's fingerprint, their dims come from it).
MODEL_KEYS = ("feature_layer", "multi_layers", "local_clues", "projector", "projector_heads",
              "lca")


def adapter_filter():
  """What the adapter holds: FEALLM's new trainable weights, LoRA excluded."""
  return nnx.All(nnx.Param, nnx.Not(layers.BaseParam), nnx.Not(nnx.LoRAParam),
                 nnx.Not(nnx.PathContains("lora")))


def _records(data: dict[str, np.ndarray], seed: int) -> list[dict]:
  """Stage-0 faces as free-form records: the conversation is the caption (pipeline's LLaVA
  path), so tokenization, truncation and views are exactly stage 1's."""
  rng = np.random.default_rng([seed, 13])
  from feallm_jax.data import synthetic
  out = []
  for j in range(len(data["emotion"])):
    ident = synthetic.make_identity("train", int(data["subject"][j]), int(data["seed"][j]))
    cap = captions.caption(int(data["emotion"][j]), faces.active(data["au_present"][j]), ident,
                           rng)
    conv = [{"from": "human", "value": f"<image>\n{PROMPTS[j % len(PROMPTS)]}"},
            {"from": "gpt", "value": cap}]
    out.append(dict(id=f"stage0-{int(data['seed'][j])}-{j}", image=data["image"][j],
                    has_landmarks=False, landmarks=np.zeros((68, 2), np.float32),
                    emotion=np.int32(data["emotion"][j]), au_present=data["au_present"][j],
                    subject=str(int(data["subject"][j])), conversations=json.dumps(conv)))
  return out


def _batches(config, records: list[dict], batch: int, seed: int, pair_fraction: float
             ) -> Iterator[dict[str, np.ndarray]]:
  d = config.data
  spec = pipeline.ExampleSpec(
      tokenizer=str(d.tokenizer), image_size=int(config.model.vision.image_size),
      max_len=int(config.align.max_len), tasks=tuple(d.tasks),
      use_landmarks=str(d.regions) == "landmarks",
      augment=pipeline.Augment() if bool(d.augment) else None, seed=seed,
      num_records=len(records), lca_image_size=int(d.get("lca_image_size", 0)))
  make = pipeline.TrainExample(spec, records)
  rng = np.random.default_rng([seed, 17])
  n = len(records)
  keys = ("image", "regions", "lca_image", "input_ids", "attention_mask", "loss_mask",
          "example_mask", "emotion", "au_present")
  pos = 0
  while True:
    idx = faces.batch_rows(rng, n, batch, pair_fraction)
    rows = []
    for i in idx:
      rows.append(make.map((pos, int(i))))
      pos += 1
    yield {k: np.stack([r[k] for r in rows]) for k in keys if k in rows[0]}


def settings(config) -> dict[str, Any]:
  """The model settings recorded with an adapter (and compared by `restore_into`)."""
  m = json.loads(config.model.to_json())
  return dict(model={k: m.get(k) for k in MODEL_KEYS},
              data=dict(regions=str(config.data.regions),
                        lca_image_size=int(config.data.get("lca_image_size", 0))))


def align_adapter(config, data: dict[str, np.ndarray], out_dir: str, *,
                  log_every: int = 100) -> dict[str, Any]:
  """Trains the adapter of `config`'s model (its base checkpoint frozen, no LoRA) on the
  captioned faces `data` (faces.render output) and writes it to `out_dir`."""
  from feallm_jax.pretrain import stage0
  a = config.align
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.train_llm = "frozen"
    cfg.model.train_vision = False
    cfg.model.init_adapter = ""
  mesh = sharding.single_device_mesh()
  t0 = time.perf_counter()
  with sharding.mesh_rules(mesh):
    model = feallm.build_model(cfg, mesh, log=False)

    def loss(model, batch):
      l, aux = feallm.loss_fn(model, batch)
      return l, aux["accuracy"]
    hist = stage0._fit(model, loss, _batches(cfg, _records(data, int(config.seed)),
                                             int(a.batch_size), int(config.seed),
                                             float(a.pair_fraction)),
                       steps=int(a.steps), lr=float(a.lr), weight_decay=float(a.weight_decay),
                       warmup=int(a.warmup), name="adapter (alignment)",
                       log_every=log_every, wrt=adapter_filter())
  save(out_dir, model, config, dict(history=hist, seconds=round(time.perf_counter() - t0, 1),
                                    faces=int(len(data["emotion"]))))
  return dict(history=hist, model=model)


def save(out_dir: str, model: feallm.FEALLM, config, extra: dict[str, Any]) -> None:
  import orbax.checkpoint as ocp
  from feallm_jax.weights import base_checkpoint
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  state = {"/".join(map(str, p)): v.get_value()
           for p, v in nnx.to_flat_state(nnx.state(model, adapter_filter()))}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "adapter"), state, force=True)
  ckptr.wait_until_finished()
  base = str(config.model.base_checkpoint)
  rec = dict(settings(config), base_fingerprint=base_checkpoint.read_meta(base)["fingerprint"],
             align=json.loads(config.align.to_json()),
             label_loss_weight=float(config.model.get("label_loss_weight", 0.0)),
             shapes={k: list(np.shape(v)) for k, v in state.items()}, **extra)
  with open(os.path.join(out_dir, "adapter.json"), "w") as f:
    json.dump(rec, f, indent=1)


class AdapterError(ValueError):
  """An adapter that does not fit the model being built (checked before any training)."""


def check_adapter(adapter_dir: str, config) -> dict[str, Any]:
  """The adapter record of `adapter_dir` when it fits `config` (its model settings and base
  checkpoint); else :class:`AdapterError` naming what differs. Reads JSON only (pre-flight)."""
  from feallm_jax.weights import base_checkpoint
  path = os.path.join(adapter_dir, "adapter.json")
  if not os.path.isfile(path):
    raise AdapterError(f"--config.model.init_adapter={adapter_dir}: no adapter.json there")
  with open(path) as f:
    rec = json.load(f)
  want, got = settings(config), dict(model=rec["model"], data=rec["data"])
  diff = [f"{part}.{k}" for part in ("model", "data") for k in want[part]
          if json.dumps(want[part][k], sort_keys=True) != json.dumps(got[part].get(k),
                                                                      sort_keys=True)]
  if diff:
    raise AdapterError(f"--config.model.init_adapter={adapter_dir} was aligned with other "
                       f"settings ({', '.join(diff)} differ); set --config.model.init_adapter=''"
                       f" to start those modules fresh")
  base = str(config.model.get("base_checkpoint", ""))
  fp = base_checkpoint.read_meta(base)["fingerprint"] if base else ""
  if fp != rec["base_fingerprint"]:
    raise AdapterError(f"--config.model.init_adapter={adapter_dir} was aligned on base "
                       f"checkpoint {rec['base_fingerprint'][:16]}…, the config's "
                       f"model.base_checkpoint is {fp[:16] or 'none'}; set "
                       f"--config.model.init_adapter='' to start the LCA and projector fresh, or "
                       f"align one on this base (python -m launch.align_adapter)")
  return rec


def restore_into(adapter_dir: str, model: feallm.FEALLM, config) -> None:
  """Fills the model's adapter weights from `adapter_dir` (``model.init_adapter``); refuses an
  adapter made for other settings or another base checkpoint, naming what differs."""
  import orbax.checkpoint as ocp
  rec = check_adapter(adapter_dir, config)
  ours = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model,
                                                                            adapter_filter()))}
  # The auxiliary label head (model.label_loss_weight) is optional on either side: it is
  # restored when both have it, else the model's own (fresh or absent) head is kept.
  optional = lambda k: k.startswith("label_head/")  # noqa: E731
  stored = {k: v for k, v in rec["shapes"].items() if not optional(k) or k in ours}
  ours = {k: v for k, v in ours.items() if not optional(k) or k in stored}
  if sorted(ours) != sorted(stored) or any(
      list(np.shape(ours[k].get_value())) != stored[k] for k in ours):
    raise AdapterError(f"--config.model.init_adapter={adapter_dir}: its tensors do not match "
                       f"the model's ({len(rec['shapes'])} stored, {len(ours)} in the model)")
  target = {k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                    sharding=v.get_value().sharding) for k, v in ours.items()}
  # A stored head the model lacks is read and dropped (Orbax restores the whole tree).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target.update({k: jax.ShapeDtypeStruct(tuple(s), np.float32, sharding=one)
                 for k, s in rec["shapes"].items() if k not in target})
  restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(adapter_dir),
                                                             "adapter"), target)
  for k, v in ours.items():
    v.set_value(restored[k])
