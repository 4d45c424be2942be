"""In-training evaluation runs on the live train state: the base checkpoint is read once (by the
trainer's build), and the numbers equal an offline evaluation of the saved step."""

import json

import configs.tiny_synthetic as tiny
from feallm_jax import sharding
from feallm_jax.data import tokenizer as tok_lib
from feallm_jax.eval import feabench
from feallm_jax.models import feallm
from feallm_jax.pretrain import stage0
from feallm_jax.train import checkpoint as ckpt_lib
from feallm_jax.train import train_and_evaluate
from feallm_jax.weights import base_checkpoint


def _config(data_dir: str):
  c = tiny.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  c.data.update(data_dir=data_dir, builder_config="small", batch_size=8, augment=False,
                max_len=48)
  m = c.model
  m.vision.update(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=2)
  m.multi_layers = (1, 2)
  m.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=16)
  m.lca.update(crop_size=8, depth=1, width=8, num_heads=2)
  m.projector_heads = 2
  m.train_llm, m.train_vision = "lora", False
  m.lora.update(rank=4, alpha=8.0, dropout=0.0)
  c.optim.update(lr_lora=1e-2, lr_proj=1e-2, lr_base=1e-2, warmup_frac=0.0)
  c.train.update(num_steps=4, eval_every=2, save_every=100, log_every=1, progress=False,
                 final_eval=True)
  # Score mode: FER answers carry per-label probabilities (floats that move with every weight),
  # the AU and reasoning tasks still generate text.
  c.eval.update(suites=("synthetic_fea",), mode="score", num_samples=3, max_new_tokens=6,
                batch_size=16)
  return c


def _write_base(config, out_dir: str) -> None:
  """Random tiny towers written as a base checkpoint (the format import_hf / stage 0 write)."""
  model = feallm.build_model(config, sharding.single_device_mesh())
  tok = tok_lib.load(config.data.get("tokenizer", ""))
  with sharding.mesh_rules(sharding.single_device_mesh()):
    base_checkpoint.save(out_dir, model.vision, model.llm,
                         vision_hf_config=stage0.hf_vision_config(model.vision.cfg),
                         llm_hf_config=stage0.hf_llm_config(model.llm.cfg, tok),
                         tokenizer_dir=tok_lib.TINY_DIR)


def _numbers(results):
  """Every suite's metrics (timings dropped) as JSON text: equal means equal in every number."""
  suites = {k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
            for k, v in results["suites"].items()}
  return json.dumps(suites, sort_keys=True, default=str)


def test_periodic_eval_uses_live_state_and_matches_offline(tmp_path, monkeypatch):
  config = _config(str(tmp_path / "data"))
  base = str(tmp_path / "base")
  _write_base(config, base)
  config.model.base_checkpoint = base

  reads, restores, live, records = [], [], [], []
  real_restore_into, real_restore_weights = base_checkpoint.restore_into, ckpt_lib.restore_weights
  real_evaluate_model, real_predict_suite = feabench.evaluate_model, feabench.predict_suite

  def counting_restore_into(*a, **k):
    reads.append(a[0])
    return real_restore_into(*a, **k)

  def counting_restore_weights(*a, **k):
    restores.append(k.get("step"))
    return real_restore_weights(*a, **k)

  def recording_evaluate_model(model, cfg, *a, **k):
    out = real_evaluate_model(model, cfg, *a, **k)
    live.append((out["meta"]["step"], out))
    return out

  def recording_predict_suite(*a, **k):
    out = real_predict_suite(*a, **k)
    records.append(out)
    return out

  monkeypatch.setattr(base_checkpoint, "restore_into", counting_restore_into)
  monkeypatch.setattr(feabench, "predict_suite", recording_predict_suite)
  monkeypatch.setattr(ckpt_lib, "restore_weights", counting_restore_weights)
  monkeypatch.setattr(feabench, "evaluate_model", recording_evaluate_model)
  workdir = str(tmp_path / "run")
  summary = train_and_evaluate(config, workdir)

  # One read of the base weights (the trainer's build); the periodic (step 2) and the final
  # (step 4) evaluations restored nothing.
  assert reads == [base], reads
  assert restores == [], restores
  assert [s for s, _ in live] == [2, 4]
  assert summary["eval"] is live[-1][1]
  assert ckpt_lib.Checkpointer(workdir, config, read_only=True).all_steps() == [2, 4]

  # Offline evaluation of each saved step (rebuilds the model, restores the checkpoint) gives
  # exactly the same numbers and the same per-sample predictions and label probabilities.
  monkeypatch.setattr(feabench, "evaluate_model", real_evaluate_model)
  for i, (step, online) in enumerate(live):
    offline = feabench.evaluate(config, workdir, checkpoint=step, progress=False,
                                out_dir=str(tmp_path / f"offline_{step}"))
    assert offline["meta"]["step"] == step
    assert _numbers(offline) == _numbers(online), step
    assert records[2 + i] == records[i], step
  assert restores == [2, 4] and len(reads) == 3
  # Not vacuous: training between the two evaluations moved the FER label probabilities.
  probs = [[r["emotion_probs"] for r in recs if "emotion_probs" in r] for recs in records[:2]]
  assert probs[0] and probs[0] != probs[1]
