"""Round trip: tfds build -> data_source -> Grain pipeline -> batches of docs/interfaces.md."""

import numpy as np
import pytest

import data_fixtures as fx
from configs import tiny_synthetic
from feallm_jax.data import builders, facs, instructions, pipeline, tokenizer as T


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""
  c.data.data_dir = str(tmp_path_factory.mktemp("data"))
  c.data.builder_config = "small"
  c.data.batch_size = 8
  builders.build("synthetic_fea", c.data.data_dir, config="small")
  return c


@pytest.fixture(scope="module")
def tok():
  return T.load()


def _check_train_batch(b, c, tok, rows):
  L, S = c.data.max_len, c.model.vision.image_size
  want = dict(image=(np.float32, (rows, S, S, 3)), regions=(np.float32, (rows, 16, 4)),
              input_ids=(np.int32, (rows, L)), attention_mask=(np.int32, (rows, L)),
              loss_mask=(np.int32, (rows, L)), example_mask=(np.int32, (rows,)),
              emotion=(np.int32, (rows,)), au_present=(np.int32, (rows, len(facs.ALL_AUS))),
              task=(np.int32, (rows,)))
  for k, (dt, shape) in want.items():
    assert b[k].dtype == dt and b[k].shape == shape, (k, b[k].dtype, b[k].shape)
  img = T.image_token_id(tok)
  assert ((b["input_ids"] == img).sum(1) == 1).all()
  am, lm = b["attention_mask"], b["loss_mask"]
  # right padding: ones then zeros; pads carry the pad id; loss only on real tokens
  assert (np.diff(am, axis=1) <= 0).all() and (am[:, 0] == 1).all()
  assert (b["input_ids"][am == 0] == tok.pad_token_id).all()
  assert (lm <= am).all() and (lm.sum(1) > 0).all()
  assert (b["example_mask"] == 1).all()
  r = b["regions"]
  assert (r >= 0).all() and (r <= 1).all() and (r[..., 2] >= r[..., 0]).all()
  assert abs(float(b["image"].mean())) < 2.5 and b["image"].std() > 0.1   # CLIP-normalized


def test_train_batch_contract(cfg, tok):
  it = pipeline.train_iterator(cfg)
  b = next(it)
  _check_train_batch(b, cfg, tok, 8)
  # the signature ahead-of-time compiles use (launch/aot_compile.py) is the real batch's
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == pipeline.batch_signature(cfg, 8)
  # the loss mask covers exactly the answer + end token of the drawn task
  for row in range(8):
    ids = b["input_ids"][row]
    answer = tok.decode(ids[b["loss_mask"][row] == 1])
    assert answer.endswith("</s>")
    prefix = tok.decode(ids[: np.flatnonzero(b["loss_mask"][row])[0]])
    assert prefix.rstrip().endswith("ASSISTANT:")
    assert instructions.TASKS[b["task"][row]] in cfg.data.tasks
  assert (b["emotion"] >= 0).all()
  assert set(np.unique(b["au_present"])) <= {0, 1}


def test_resume_from_orbax_checkpoint(cfg, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  it = pipeline.train_iterator(cfg)
  for _ in range(3):
    next(it)
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
  want = [next(it) for _ in range(2)]
  it2 = pipeline.train_iterator(cfg)
  ckpt.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(it2))
  got = [next(it2) for _ in range(2)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k], err_msg=k)


def test_epochs_reshuffle_and_augment(cfg):
  src = pipeline.data_source(cfg, split="validation")   # 16 records = 2 batches an epoch
  it = iter(pipeline.train_dataset(cfg, source=src))
  e0 = [next(it) for _ in range(2)]
  e1 = next(it)
  assert not np.array_equal(e0[0]["image"], e1["image"])   # new order / new augmentation
  c2 = cfg.copy_and_resolve_references()
  c2.data.augment = False
  b0 = next(pipeline.train_iterator(c2))
  b1 = next(pipeline.train_iterator(c2))
  np.testing.assert_array_equal(b0["image"], b1["image"])   # deterministic by position


def test_per_process_slices_form_the_global_batch(cfg):
  full = next(pipeline.train_iterator(cfg, process_index=0, process_count=1))
  parts = [next(pipeline.train_iterator(cfg, process_index=p, process_count=2))
           for p in range(2)]
  for k in full:
    assert parts[0][k].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k], err_msg=k)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_iterator(cfg, process_index=0, process_count=3)


def test_truncation_never_removes_the_image(cfg, tok):
  c = cfg.copy_and_resolve_references()
  c.data.max_len = 24
  c.data.tasks = ("reasoning",)
  b = next(pipeline.train_iterator(c))
  assert b["input_ids"].shape == (8, 24)
  assert b["truncated"].sum() == 8
  assert ((b["input_ids"] == T.image_token_id(tok)).sum(1) == 1).all()
  img = T.image_token_id(tok)
  ids = np.array([1, 5, 6, img, 7, 8, 9, 10, 11, 12], np.int32)
  out, loss, cut = pipeline.fit_length(ids, np.ones_like(ids), 6, img, keep_tail=True)
  assert cut and list(out) == [1, 5, 6, img, 11, 12]
  with pytest.raises(ValueError, match="no room after the image"):
    pipeline.fit_length(ids, ids, 3, img)


def test_eval_prompts_left_padded_and_padded_batches(cfg, tok):
  got = list(pipeline.eval_batches(cfg, split="test", tasks=("fer", "aur"), batch_size=24))
  n_rows = 32 * 2
  assert len(got) == 3   # 64 rows -> 3 global batches of 24, the last padded
  masks = np.concatenate([b["example_mask"] for b, _ in got])
  assert masks.sum() == n_rows and masks[n_rows:].sum() == 0
  sig = pipeline.batch_signature(cfg, 24, train=False)
  for b, metas in got:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == sig
    am = b["attention_mask"]
    assert (np.diff(am, axis=1) >= 0).all() and (am[:, -1] == 1).all()   # left padded
    assert ((b["input_ids"] == T.image_token_id(tok)).sum(1) == 1).all()
    assert "loss_mask" not in b
    for row, m in enumerate(metas):
      if not m["real"]:
        continue
      assert tok.decode(b["input_ids"][row][am[row] == 1]).endswith("ASSISTANT:")
      assert m["task"] in ("fer", "aur") and m["reference"]
      assert m["label_set"]["emotions"] == facs.RAF_DB
      if m["task"] == "fer":
        assert instructions.parse_emotion(m["reference"]) == m["emotion"]
  # per process: each takes its block of every global batch
  halves = [list(pipeline.eval_batches(cfg, split="test", tasks=("fer",), batch_size=16,
                                       process_index=p, process_count=2)) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == 2
  ids0 = [m["id"] for b, ms in halves[0] for m in ms if m["real"]]
  ids1 = [m["id"] for b, ms in halves[1] for m in ms if m["real"]]
  assert len(set(ids0) | set(ids1)) == 32 and not set(ids0) & set(ids1)


def test_llava_instruct_round_trip(cfg, tok, tmp_path):
  fx.make_llava(str(tmp_path / "raw"), n_train=10, bad=False)
  c = cfg.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path / "data")
  c.data.dataset, c.data.builder_config = "llava_instruct", ""
  builders.build("llava_instruct", c.data.data_dir, manual_dir=str(tmp_path / "raw"))
  b = next(pipeline.train_iterator(c))
  _check_train_batch(b, c, tok, 8)
  assert (b["task"] == pipeline.FREE_FORM_TASK).all() and (b["emotion"] == -1).all()
  # two answers per conversation are both supervised
  row = b["input_ids"][0][b["loss_mask"][0] == 1]
  assert (row == tok.eos_token_id).sum() == 2


def test_unbuilt_manual_dataset_is_a_clear_error(cfg, tmp_path):
  c = cfg.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path)
  c.data.dataset, c.data.builder_config = "raf_db", ""
  with pytest.raises(FileNotFoundError, match="build_dataset.py --dataset=raf_db"):
    pipeline.train_iterator(c)


def test_mp_prefetch_matches_in_process(cfg):
  c = cfg.copy_and_resolve_references()
  c.data.num_workers = 1
  a = next(pipeline.train_iterator(cfg))
  b = next(pipeline.train_iterator(c))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
