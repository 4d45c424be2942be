"""Round trip: tfds build -> data_source -> Grain pipeline -> batches of docs/interfaces.md."""

import numpy as np
import pytest

import data_fixtures as fx
from configs import tiny_synthetic
from feallm_jax.data import builders, facs, instructions, pipeline, regions, tokenizer as T
from feallm_jax.eval import parse

# OpenAI CLIP's normalization, as transformers.utils.constants.OPENAI_CLIP_MEAN / _STD.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _clip_processor(size):
  """The reference: what a pretrained CLIP is fed (PIL backend: exact, no torchvision)."""
  from transformers import CLIPImageProcessor
  from transformers.utils import constants
  np.testing.assert_array_equal(CLIP_MEAN, np.float32(constants.OPENAI_CLIP_MEAN))
  np.testing.assert_array_equal(CLIP_STD, np.float32(constants.OPENAI_CLIP_STD))
  proc = CLIPImageProcessor(size={"shortest_edge": size},
                            crop_size={"height": size, "width": size})
  return lambda img: np.asarray(proc(img, return_tensors="np")["pixel_values"][0]).transpose(
      1, 2, 0)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = tiny_synthetic.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
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
  # CLIP-normalized with OpenAI's constants: undone, the pixels lie in [0, 1]; a face's dark
  # pixels sit below -1 (raw [0, 1] pixels never go negative, raw 0..255 ones leave [0, 1]).
  raw = b["image"] * CLIP_STD + CLIP_MEAN
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, (raw.min(), raw.max())
  assert b["image"].min() < -1.0


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


def test_encoded_images_decode_as_tfds_does(cfg):
  """The pipeline reads encoded image bytes and decodes them itself (so a bad image drops one
  example): its batches equal those from tfds' own decoding, nothing dropped."""
  it = pipeline.train_iterator(cfg)
  a = next(it)
  decoded = pipeline.data_source(cfg, split="train", decode_images=True)
  it2 = iter(pipeline.train_dataset(cfg, source=decoded))
  b = next(it2)
  for d in (it.drops, it2.drops):
    assert d.dropped == 0 and d.examples == 8
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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


def test_rare_au_repeat_draws_rare_au_faces_k_times_an_epoch_each_copy_its_own_example(cfg):
  src = pipeline.data_source(cfg, split="validation")   # 16 labelled synthetic faces
  pres = np.stack([np.asarray(src[i]["au_present"]) for i in range(len(src))])
  c2 = cfg.copy_and_resolve_references()
  c2.data.rare_au_repeat, c2.data.rare_au_frequency = 3, 0.2
  rare = [a for a in range(pres.shape[1]) if 0 < pres[:, a].mean() < 0.2]   # by hand
  want = np.where((pres[:, rare] == 1).any(1), 3, 1)
  assert 1 < want.sum() - len(src) < 2 * len(src)       # the fixture has rare and common AUs
  reps = pipeline.rare_au_repeats(c2, src)
  np.testing.assert_array_equal(reps, want)
  n, length = len(src), int(reps.sum())
  order = pipeline._order(n, 0, reps)
  for epoch in range(2):
    elems = [int(order[epoch * length + g]) for g in range(length)]
    np.testing.assert_array_equal(np.bincount([e % n for e in elems], minlength=n), want)
    assert len(set(elems)) == length                    # each copy once, as its own element
  # A copy is its own example (own augmentation and task), the record's labels unchanged.
  spec = pipeline._spec(c2, n, train=True, seed=0, repeats=reps)
  ex = pipeline.TrainExample(spec, src)
  i = int(np.flatnonzero(want == 3)[0])
  a, b = ex.example(0, i), ex.example(0, 2 * n + i)
  assert not np.array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["au_present"], b["au_present"])
  c2.data.rare_au_repeat = 1                            # off: the order is the plain shuffle
  assert pipeline.rare_au_repeats(c2, src) is None
  c2.data.rare_au_repeat = 0
  with pytest.raises(ValueError, match="rare_au_repeat"):
    pipeline.rare_au_repeats(c2, src)


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


# --- the pixel path against CLIPImageProcessor ---------------------------------------------------

def test_eval_images_equal_clip_image_processor(cfg):
  """The evaluation batches (FEABench, predict) feed the ViT exactly CLIPImageProcessor's
  pixels, and the LCA's higher-resolution view is the same recipe at its size."""
  c = cfg.copy_and_resolve_references()
  c.data.lca_image_size = 96
  size = c.model.vision.image_size
  vit, lca = _clip_processor(size), _clip_processor(96)
  src = pipeline.data_source(c, split="test")
  by_id = {pipeline._clean_record(src[i])["id"]: i for i in range(len(src))}
  batch, metas = next(pipeline.eval_batches(c, split="test", tasks=("fer",), batch_size=8))
  for row, m in enumerate(metas):
    img = np.asarray(src[by_id[m["id"]]]["image"])
    np.testing.assert_allclose(batch["image"][row], vit(img), atol=1e-5, err_msg=m["id"])
    np.testing.assert_allclose(batch["lca_image"][row], lca(img), atol=1e-5, err_msg=m["id"])


@pytest.mark.parametrize("shape", [(90, 70), (70, 90), (333, 500), (64, 64), (40, 40)])
def test_eval_views_of_any_shape_equal_clip_image_processor(cfg, shape):
  """``pipeline.eval_views`` (predict's path) on non-square, larger and smaller photos."""
  rng = np.random.default_rng(sum(shape))
  img = rng.integers(0, 256, shape + (3,), np.uint8)   # noise: every resampling error shows
  size = cfg.model.vision.image_size
  got = pipeline.eval_views(cfg, img)["image"]
  np.testing.assert_allclose(got, _clip_processor(size)(img), atol=1e-5)


def test_train_images_without_augmentation_equal_clip_image_processor(cfg):
  """The train path with data.augment=False: every row is CLIP's image of one train record."""
  c = cfg.copy_and_resolve_references()
  c.data.augment = False
  ref = _clip_processor(c.model.vision.image_size)
  src = pipeline.data_source(c, split="train")
  clip_images = np.stack([ref(np.asarray(src[i]["image"])) for i in range(len(src))])
  b = next(pipeline.train_iterator(c))
  for row in range(len(b["image"])):
    err = np.abs(clip_images - b["image"][row]).reshape(len(src), -1).max(1)
    assert err.min() < 1e-5, (row, err.min())


# --- region boxes follow the random resized crop and the flip -----------------------------------

def _mirror_name(name: str) -> str:
  """The anatomical partner of a region: a mirrored face shows its left eye where a right one
  would be, so after a flip the box named right_eye must cover the marker of left_eye."""
  if name.startswith("left_"):
    return "right_" + name[5:]
  if name.startswith("right_"):
    return "left_" + name[6:]
  return name


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_region_boxes_follow_crop_and_flip(flip):
  """One white disc on black at the centre of a canonical region box (one image per region);
  the training augmentation (random resized crop, flip), drawn from the same seed for every
  image, must put each output box's centre on its region's disc (on the mirror-named one after
  a flip) within one output pixel."""
  src_size, size = 160, 128
  names = regions.REGION_NAMES
  boxes = regions.canonical_boxes()
  yy, xx = np.mgrid[:src_size, :src_size] + 0.5
  gy, gx = np.mgrid[:size, :size] + 0.5
  aug = pipeline.Augment(flip=flip, brightness=0.0, contrast=0.0, saturation=0.0)

  def view(k, seed):
    y0, x0, y1, x1 = boxes[k]
    cy, cx = (y0 + y1) / 2 * src_size, (x0 + x1) / 2 * src_size
    img = np.zeros((src_size, src_size, 3), np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4.5 ** 2] = 255
    rec = {"image": img, "has_landmarks": False, "id": names[k]}
    views, out = pipeline.image_views(rec, (size,), np.random.default_rng(seed), aug,
                                      use_landmarks=False)
    return (views[0] * CLIP_STD + CLIP_MEAN).mean(-1), out

  for seed in range(6):
    whole = 0
    for k, name in enumerate(names):
      want = names.index(_mirror_name(name)) if flip else k
      light, out_boxes = view(want, seed)
      w = np.clip(light, 0, None)
      assert w.sum() > 5, (seed, name)
      centroid = np.array([(w * gy).sum(), (w * gx).sum()]) / w.sum()
      y0, x0, y1, x1 = out_boxes[k]
      if 0 < y0 and y1 < 1 and 0 < x0 and x1 < 1:
        centre = np.array([(y0 + y1) / 2, (x0 + x1) / 2]) * size
        assert np.abs(centroid - centre).max() < 1.0, (seed, name, centroid, centre)
        whole += 1
      else:   # cut by the crop (clipped to the view): the disc is still inside it
        assert y0 * size <= centroid[0] <= y1 * size and x0 * size <= centroid[1] <= x1 * size
    assert whole >= 8, (seed, whole)


# --- the training answers, read back by the evaluator -------------------------------------------

def test_training_answers_parse_to_their_labels_with_the_evaluators_parser(cfg, tok):
  """Every supervised answer the pipeline trains on, decoded and read by ``eval/parse.py``
  (what FEABench scores with), gives back the example's own labels."""
  seen = set()
  it = pipeline.train_iterator(cfg)
  for _ in range(4):
    b = next(it)
    for row in range(len(b["task"])):
      task = instructions.TASKS[b["task"][row]]
      seen.add(task)
      ids = b["input_ids"][row][b["loss_mask"][row] == 1]
      answer = tok.decode(ids, skip_special_tokens=True)
      emotion = facs.EMOTIONS[b["emotion"][row]]
      active = {au for au, v in zip(facs.ALL_AUS, b["au_present"][row]) if v == 1}
      if task in ("fer", "joint", "reasoning"):
        assert parse.parse_emotion(answer) == emotion, (task, answer, emotion)
      if task in ("aur", "joint"):
        assert parse.parse_aus(answer) == active, (task, answer, sorted(active))
      if task == "reasoning":
        named = parse.parse_aus(answer)
        assert named is not None and named <= active, (answer, sorted(active))
        if emotion == "neutral":
          assert not named & set(facs.PROTOTYPE_AUS), answer
        else:
          assert named and named <= set(facs.EMFACS_PROTOTYPES[emotion]), (answer, emotion)
  assert seen == set(cfg.data.tasks), seen
