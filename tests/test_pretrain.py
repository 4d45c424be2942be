"""Stage 0: captions, face rendering, the contrastive loss, a tiny end-to-end pretraining that
stage 1 loads through `model.base_checkpoint`, and the shipped base checkpoint itself."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain_tiny, tiny_synthetic
from feallm_jax import sharding
from feallm_jax.data import facs, instructions, synthetic, tokenizer as tok_lib
from feallm_jax.models import feallm, layers, vision as vision_lib
from feallm_jax.pretrain import SHIPPED_ADAPTER, SHIPPED_BASE, captions, clip, faces, lm, stage0
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


def test_caption_loss_is_next_token_cross_entropy_after_the_image_prefix():
  """CoCa/CapPa head: position N-1+j (N patch tokens) predicts caption token j, padding ignored,
  a blind row reads only padding, and the gradient reaches the ViT (what stage 0 trains)."""
  vcfg = vision_lib.VisionConfig(image_size=16, patch_size=8, hidden_size=16,
                                 intermediate_size=32, num_layers=2, num_heads=2)
  tcfg = clip.TextTowerConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                              num_layers=1, num_heads=2, max_len=8)
  with sharding.mesh_rules(sharding.single_device_mesh()):
    model = clip.CLIP(vcfg, tcfg, 8, caption_feature_layer=-2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  px = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 64, (3, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6], jnp.int32)
  inputs = ids.at[2].set(0)                                    # row 2 blind (parallel prediction)
  loss, acc = clip.coca_loss(model, px, ids, mask, jnp.arange(3), inputs, caption_weight=2.0,
                             contrastive_weight=0.0)
  assert float(acc) == 0.0
  cap = model.captioner
  prefix = np.asarray(cap.proj(model.vision(px)[-2][:, 1:]))
  n = vcfg.num_patches
  emb = np.asarray(cap.decoder.embed(inputs))
  logits = np.asarray(cap.decoder(inputs_embeds=jnp.asarray(np.concatenate([prefix, emb], 1)),
                                  attention_mask=jnp.concatenate([jnp.ones((3, n), jnp.int32),
                                                                  mask], 1)), np.float64)
  total, count = 0.0, 0
  for b in range(3):
    for j in range(8):
      if mask[b, j]:
        row = logits[b, n - 1 + j]
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[int(ids[b, j])]
        count += 1
  np.testing.assert_allclose(float(loss), 2.0 * total / count, rtol=1e-5)
  grads = nnx.grad(lambda m: clip.coca_loss(m, px, ids, mask, jnp.arange(3), inputs,
                                            caption_weight=1.0, contrastive_weight=0.0)[0])(model)
  assert float(jnp.abs(grads.vision.pos_embed[...]).sum()) > 0
  assert float(jnp.abs(grads.text.embed_tokens[...]).sum()) == 0     # contrastive towers idle


def test_clip_batches_blind_rows_for_parallel_prediction():
  tok = tok_lib.load("")
  data = faces.render((1,), 16, 32, workers=1)
  vcfg = vision_lib.VisionConfig(image_size=32, patch_size=16, hidden_size=16,
                                 intermediate_size=32, num_layers=1, num_heads=2)
  px, ids, mask, group, inputs = next(stage0._clip_batches(data, tok, vcfg, 64, 64, 0,
                                                           parallel_fraction=0.5))
  blind = (inputs == tok.pad_token_id).all(1)
  assert 16 < blind.sum() < 48                       # about half the rows, drawn per row
  np.testing.assert_array_equal(inputs[~blind], ids[~blind])
  assert (ids[blind] != tok.pad_token_id).any()      # the targets stay the real captions
  assert len(next(stage0._clip_batches(data, tok, vcfg, 8, 64, 0))) == 4   # captioning off


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


def test_stage0_caption_stage_starts_from_a_base_vision_tower(tiny_stage0, tmp_path):
  """`clip.init_vision` continues a base's ViT (here with a zero first learning rate, so the
  saved tower must equal the one it started from); a tower of another shape is refused before
  any face is rendered."""
  c, out, _ = tiny_stage0
  c2 = copy.deepcopy(c)
  c2.clip.update(dict(steps=1, warmup=1, init_vision=out, caption_weight=1.0,
                      contrastive_weight=0.0, parallel_fraction=0.5))
  c2.probe_faces = 0
  rec = stage0.pretrain_backbones(c2, str(tmp_path / "cap"), reuse_llm_from=out)
  assert rec["vision_history"][-1]["step"] == 1
  with sharding.mesh_rules(sharding.single_device_mesh()):
    a = vision_lib.VisionEncoder(stage0.vision_config(c), rngs=nnx.Rngs(5))
    b = vision_lib.VisionEncoder(stage0.vision_config(c), rngs=nnx.Rngs(6))
  base_checkpoint.restore_into(out, a, None)
  base_checkpoint.restore_into(str(tmp_path / "cap"), b, None)
  np.testing.assert_array_equal(np.asarray(a.pos_embed[...]), np.asarray(b.pos_embed[...]))
  c2.vision.hidden_size = 64
  with pytest.raises(ValueError, match="init_vision"):
    stage0.pretrain_backbones(c2, str(tmp_path / "bad"), reuse_llm_from=out)
  assert not os.path.exists(tmp_path / "bad")


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


@pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED_ADAPTER, "adapter.json")),
                    reason="no shipped adapter")
def test_shipped_adapter_fits_the_quickstart_config_and_the_shipped_base():
  from feallm_jax.pretrain import align
  with open(os.path.join(SHIPPED_ADAPTER, "adapter.json")) as f:
    rec = json.load(f)
  t = tiny_synthetic.get_config()
  assert t.model.init_adapter == SHIPPED_ADAPTER
  assert rec["base_fingerprint"] == base_checkpoint.read_meta(SHIPPED_BASE)["fingerprint"]
  # Made by the reproduce command: the quickstart config's own model settings and align block.
  want = align.settings(t)
  assert rec["model"] == want["model"] and rec["data"] == want["data"]
  assert rec["align"] == json.loads(t.align.to_json())
  assert rec["label_loss_weight"] == t.model.label_loss_weight
  assert 0 not in rec["align"]["seeds"]           # never the instruction set's faces
  # Its tensors are exactly the quickstart model's adapter (abstract build: nothing allocated).
  model = feallm.abstract_model(feallm.spec_from_config(t), sharding.single_device_mesh())
  shapes = {"/".join(map(str, p)): list(v.get_value().shape)
            for p, v in nnx.to_flat_state(nnx.state(model, align.adapter_filter()))}
  assert shapes == rec["shapes"]


def test_minimal_pairs_differ_in_one_optional_au_of_the_same_person():
  d = faces.render([3], 24, 64, workers=1, pairs=True)
  assert len(d["emotion"]) == 48
  toggled = set()
  for k in range(24):
    a, b = 2 * k, 2 * k + 1
    assert d["subject"][a] == d["subject"][b] and d["seed"][a] == d["seed"][b]
    sa, sb = set(faces.active(d["au_present"][a])), set(faces.active(d["au_present"][b]))
    name = facs.EMOTIONS[int(d["emotion"][a])]
    if name == "neutral":   # the partner shows an expression of another emotion
      assert not sa and sb and d["emotion"][b] != d["emotion"][a]
      continue
    assert d["emotion"][a] == d["emotion"][b]
    diff = sa ^ sb
    # One AU (AU26/AU16 switched on bring AU25 along), never a required one, and the label
    # stays EMFACS-consistent.
    assert 1 <= len(diff) <= 2 and (len(diff) == 1 or 25 in diff), (name, sa, sb)
    assert not diff & synthetic.REQUIRED_AUS[name]
    assert facs.emfacs_consistent(name, sorted(sb))
    toggled |= diff
    # Same pose and lighting: the pixels differ only where the face moved (not the background).
    px = np.abs(d["image"][a].astype(int) - d["image"][b]).sum(-1) > 40
    assert px.any() and not px[:, :6].any() and not px[:6].any()
  assert toggled & {10, 17, 24}


def test_reuse_llm_from_refuses_an_llm_trained_with_other_settings(tiny_stage0, tmp_path):
  c, out, _ = tiny_stage0
  other = c.copy_and_resolve_references()
  other.lm.steps = int(c.lm.steps) + 1
  with pytest.raises(ValueError, match=r"reuse_llm_from=.*lm differ"):
    stage0.pretrain_backbones(other, str(tmp_path / "x"), reuse_llm_from=out)
  assert not (tmp_path / "x").exists()      # refused before anything ran or was written


def test_adapter_alignment_trains_only_the_adapter_and_stage1_starts_from_it(tiny_stage0,
                                                                             tmp_path):
  from feallm_jax.pretrain import align
  _, base, _ = tiny_stage0
  meta = base_checkpoint.read_meta(base)
  v, q = meta["vision_hf_config"], meta["llm_hf_config"]
  cfg = tiny_synthetic.get_config()
  cfg.model.base_checkpoint = base
  cfg.model.vision.update(image_size=v["image_size"], patch_size=v["patch_size"],
                          hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                          num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"])
  cfg.model.llm.update(hidden_size=q["hidden_size"], intermediate_size=q["intermediate_size"],
                       num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
                       num_kv_heads=q["num_key_value_heads"], head_dim=q["head_dim"])
  cfg.model.multi_layers = (1,)
  cfg.model.lca.update(crop_size=8, depth=1, width=16, num_heads=2)
  cfg.model.projector_heads = 2
  cfg.align.update(steps=4, batch_size=4, warmup=1, lr=1e-2)
  cfg.model.label_loss_weight = 0.5     # the faces' own labels supervise the adapter too
  data = faces.render([1], 8, v["image_size"], workers=1, pairs=True)
  out = str(tmp_path / "adapter")
  rec = align.align_adapter(cfg, data, out, log_every=1)
  assert len(rec["history"]) == 4 and all(np.isfinite(h["loss"]) for h in rec["history"])
  mesh = sharding.single_device_mesh()
  flat = lambda m, f: {"/".join(map(str, p)): np.asarray(x.get_value())  # noqa: E731
                       for p, x in nnx.to_flat_state(nnx.state(m, f))}
  frozen_cfg = cfg.copy_and_resolve_references()
  frozen_cfg.model.train_llm = "frozen"
  start = feallm.build_model(frozen_cfg, mesh, log=False)     # what alignment started from
  trained = rec["model"]
  a0, a1 = flat(start, align.adapter_filter()), flat(trained, align.adapter_filter())
  assert any(k.startswith("lca/") for k in a1) and any(k.startswith("projector/") for k in a1)
  assert any(k.startswith("label_head/") for k in a1)
  # Every adapter module moved; the towers are exactly the base checkpoint's (frozen).
  assert {k.split("/")[0] for k in a1} == {
      k.split("/")[0] for k in a1 if not np.array_equal(a0[k], a1[k])}
  towers = nnx.All(layers.BaseParam)
  t0, t1 = flat(start, towers), flat(trained, towers)
  assert t0 and all(np.array_equal(t0[k], t1[k]) for k in t0)
  # Stage 1 (LoRA on) starts from exactly the aligned weights; LoRA itself starts fresh.
  loaded = feallm.build_model(cfg, mesh, log=False)
  with sharding.mesh_rules(mesh):
    align.restore_into(out, loaded, cfg)
  a2 = flat(loaded, align.adapter_filter())
  assert a2.keys() == a1.keys() and all(np.array_equal(a1[k], a2[k]) for k in a1)
  assert any("lora" in k for k in flat(loaded, nnx.Param)) and not any("lora" in k for k in a2)
  # A stage 1 without the label head takes the LCA and projector and leaves the head behind.
  headless = cfg.copy_and_resolve_references()
  headless.model.label_loss_weight = 0.0
  plain = feallm.build_model(headless, mesh, log=False)
  with sharding.mesh_rules(mesh):
    align.restore_into(out, plain, headless)
  a3 = flat(plain, align.adapter_filter())
  assert a3 and not any(k.startswith("label_head/") for k in a3)
  assert all(np.array_equal(a1[k], a3[k]) for k in a3)
  # Refused, naming the flag, when the model or the base checkpoint differ.
  wider = cfg.copy_and_resolve_references()
  wider.model.lca.width = 32
  with pytest.raises(align.AdapterError, match=r"init_adapter=.*model\.lca differ"):
    align.restore_into(out, loaded, wider)
  with open(os.path.join(out, "adapter.json")) as f:
    stored = json.load(f)
  stored["base_fingerprint"] = "0" * 64
  with open(os.path.join(out, "adapter.json"), "w") as f:
    json.dump(stored, f)
  with pytest.raises(align.AdapterError, match="aligned on base checkpoint 0000"):
    align.restore_into(out, loaded, cfg)
