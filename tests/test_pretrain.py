"""Stage 0: captions, face rendering, the contrastive loss, a tiny end-to-end pretraining that
stage 1 loads through `model.base_checkpoint`, and the shipped base checkpoint itself."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain_tiny, tiny_synthetic
from feallm_jax import sharding
from feallm_jax.data import facs, instructions, synthetic
from feallm_jax.models import feallm, vision as vision_lib
from feallm_jax.pretrain import SHIPPED_BASE, captions, clip, faces, lm, stage0
from feallm_jax.weights import base_checkpoint


def test_caption_says_what_is_visible_in_words_never_au_numbers():
  ident = synthetic.make_identity("train", 3, seed=2)
  text = captions.caption("happiness", [6, 12, 25], ident, rng=0)
  for au in (6, 12, 25):
    assert instructions.AU_EFFECTS[au] in text
  assert "AU" not in text
  assert any(w in text.lower() for w in ("happy", "smiling", "joyful", "cheerful"))
  assert "hair" in text and "background" in text and "skin" in text
  assert "at rest" in captions.caption("neutral", [], ident, rng=1)
  # The same content in other words: wording varies with the rng, content does not.
  variants = {captions.caption("sadness", [1, 4, 15], ident, rng=r) for r in range(20)}
  assert len(variants) > 3
  assert all(instructions.AU_EFFECTS[15] in v for v in variants)


def test_render_uses_fresh_train_pools_and_refuses_the_instruction_seed():
  with pytest.raises(ValueError, match="seed 0"):
    faces.render([0, 1], 2, 32, workers=1)
  d = faces.render([1, 2], 3, 32, workers=1)
  assert d["image"].shape == (6, 32, 32, 3) and d["image"].dtype == np.uint8
  assert list(d["seed"]) == [1, 1, 1, 2, 2, 2]
  # Record-for-record the train split of that seed (the test split is never rendered).
  r = synthetic.generate(1, split="train", seed=2, image_size=32)
  assert int(d["emotion"][4]) == int(r["emotion"])
  np.testing.assert_array_equal(d["au_present"][4], r["au_present"])
  assert d["subject"][4] == int(r["subject"].rsplit("-", 1)[1])


def test_contrastive_loss_matches_hand_computed_multi_positive_infonce():
  vcfg = vision_lib.VisionConfig(image_size=16, patch_size=8, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2)
  tcfg = clip.TextTowerConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                              num_layers=1, num_heads=2, max_len=8)
  with sharding.mesh_rules(sharding.single_device_mesh()):
    model = clip.CLIP(vcfg, tcfg, 8, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  px = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 64, (4, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3, [1] * 8, [1] * 2 + [0] * 6], jnp.int32)
  group = jnp.asarray([0, 1, 0, 2], jnp.int32)    # rows 0 and 2 describe the same content
  loss, acc = clip.contrastive_loss(model, px, ids, mask, group)
  zi = np.asarray(model.encode_image(px), np.float64)
  zt = np.asarray(model.encode_text(ids, mask), np.float64)
  s = np.exp(float(model.log_scale[...])) * zi @ zt.T
  pos = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], np.float64)
  tgt = pos / pos.sum(1, keepdims=True)

  def ce(lg):
    lg = lg - lg.max(1, keepdims=True)
    return -(tgt * (lg - np.log(np.exp(lg).sum(1, keepdims=True)))).sum(1).mean()
  np.testing.assert_allclose(float(loss), (ce(s) + ce(s.T)) / 2, rtol=1e-5)
  assert float(acc) == pytest.approx(np.mean([pos[i, j] for i, j in enumerate(s.argmax(1))]))
  # Text pooling reads the last real token: changing a padded slot changes nothing.
  ids2 = ids.at[3, 5].set((int(ids[3, 5]) + 1) % 64)
  np.testing.assert_allclose(np.asarray(model.encode_text(ids2, mask)), zt, atol=1e-6)


def test_lm_corpus_is_text_with_captions_in_place_of_the_image():
  from feallm_jax.data import tokenizer as tok_lib
  tok = tok_lib.load("")
  rng = np.random.default_rng(0)
  kinds = {"text": 0, "conversation": 0}
  for _ in range(200):
    kind, item = lm.sample_text(rng, (1, 2))
    kinds[kind] += 1
    ids = lm.encode(tok, kind, item)
    assert tok_lib.image_token_id(tok) not in ids      # text only: no image ever
    if kind == "conversation" and not item[1]["value"].startswith(("AU", "No action")):
      e = instructions.parse_emotion(item[1]["value"])    # fer / joint / reasoning answers
      assert e >= 0 and facs.EMOTIONS[e] in facs.RAF_DB
  assert kinds["text"] > 20 and kinds["conversation"] > 100
  ids, mask = next(lm.batches(tok, 4, 64, (1,)))
  assert ids.shape == mask.shape == (4, 64) and mask.sum() > 0


@pytest.fixture(scope="module")
def tiny_stage0(tmp_path_factory):
  c = pretrain_tiny.get_config()
  c.seeds, c.faces_per_seed, c.render_size, c.workers, c.probe_faces = (1,), 64, 64, 1, 32
  c.vision.update(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=2)
  c.clip.update(steps=3, batch_size=8, warmup=1, embed_dim=16, text_width=32, text_layers=1,
                text_heads=2, max_len=64)
  c.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
               head_dim=16)
  c.lm.update(steps=3, batch_size=2, max_len=48, warmup=1)
  out = str(tmp_path_factory.mktemp("base"))
  rec = stage0.pretrain_backbones(c, out)
  return c, out, rec


def test_stage0_writes_a_base_checkpoint_that_stage1_loads(tiny_stage0):
  c, out, rec = tiny_stage0
  meta = base_checkpoint.read_meta(out)
  assert rec["fingerprint"] == meta["fingerprint"] == base_checkpoint.verify(out)
  assert meta["vision_hf_config"]["model_type"] == "clip_vision_model"
  assert meta["vision_hf_config"]["hidden_size"] == 32
  assert meta["llm_hf_config"]["num_hidden_layers"] == 2
  assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json"))
  assert set(rec["probe"]) >= {"fer_accuracy", "au_mean_f1", "au_f1"}
  with pytest.raises(FileExistsError, match="overwrite"):
    stage0.pretrain_backbones(c, out)
  # Stage 1 loads it as it loads an imported CLIP + LLaMA pair (the configs come from meta.json).
  cfg = tiny_synthetic.get_config()
  cfg.model.base_checkpoint = out
  cfg.model.lca.update(crop_size=8, depth=1, width=16, num_heads=2)
  cfg.model.projector_heads = 2
  mesh = sharding.single_device_mesh()
  model = feallm.build_model(cfg, mesh)
  assert model.spec.vision.hidden_size == 32 and model.spec.llm.num_layers == 2
  with sharding.mesh_rules(mesh):
    ref = vision_lib.VisionEncoder(model.spec.vision, rngs=nnx.Rngs(1))
  base_checkpoint.restore_into(out, ref, None)
  np.testing.assert_array_equal(np.asarray(model.vision.pos_embed[...]),
                                np.asarray(ref.pos_embed[...]))
  counts = feallm.parameter_counts(model, cfg)
  assert counts["vision"]["trainable"] == 0 and counts["llm base"]["trainable"] == 0
  assert counts["lora"]["trainable"] > 0 and counts["projector"]["trainable"] > 0


def test_probe_reads_separable_features():
  """The linear probe itself works: on features that carry the labels it is near perfect."""
  rng = np.random.default_rng(0)
  n, rendered = 400, [facs.au_index(a) for a in synthetic.RENDERED_AUS]
  emotion = rng.integers(0, 7, n)
  aus = np.zeros((n, len(facs.ALL_AUS)), np.int32)
  aus[:, rendered] = rng.integers(0, 2, (n, len(rendered)))
  x = np.c_[np.eye(7)[emotion] * 3, aus[:, rendered] * 3] + rng.normal(0, 0.3, (n, 7 + 18))
  w = stage0._ridge_logistic(x[:300], np.c_[np.eye(8)[emotion[:300]], aus[:300][:, rendered]],
                             n_softmax=8)
  logits = np.c_[x[300:], np.ones(100)] @ w
  assert (logits[:, :8].argmax(1) == emotion[300:]).mean() > 0.95
  assert ((logits[:, 8:] > 0) == aus[300:][:, rendered]).mean() > 0.95


@pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED_BASE, "meta.json")),
                    reason="no shipped base checkpoint")
def test_shipped_base_checkpoint_matches_its_recorded_config_and_fingerprint():
  meta = base_checkpoint.read_meta(SHIPPED_BASE)
  assert base_checkpoint.verify(SHIPPED_BASE) == meta["fingerprint"]
  with open(os.path.join(SHIPPED_BASE, "stage0.json")) as f:
    rec = json.load(f)
  assert rec["fingerprint"] == meta["fingerprint"]
  # The reproduce command is the default config: what was run is what the file says.
  assert rec["config"] == json.loads(pretrain_tiny.get_config().to_json())
  assert 0 not in rec["faces"]["seeds"]
  c = pretrain_tiny.get_config()
  v = meta["vision_hf_config"]
  assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"]) == (
      c.vision.image_size, c.vision.patch_size, c.vision.hidden_size, c.vision.num_layers)
  q = meta["llm_hf_config"]
  assert (q["hidden_size"], q["num_hidden_layers"], q["num_key_value_heads"]) == (
      c.llm.hidden_size, c.llm.num_layers, c.llm.num_kv_heads)
  # And the quickstart config agrees with it (no silent override of the towers' dims).
  t = tiny_synthetic.get_config()
  assert t.model.base_checkpoint == SHIPPED_BASE
  assert t.model.vision.image_size == v["image_size"]
  assert t.model.llm.hidden_size == q["hidden_size"]
