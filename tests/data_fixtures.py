"""Tiny dataset folders in the official layouts, made with PIL, for builder and pipeline tests.

Each maker writes a manual_dir and returns what a correct build must contain, so tests compare
against the truth rather than against the builder's own output. Every layout includes the
awkward inputs real downloads contain: a corrupt JPEG, a truncated PNG (both must be skipped and
counted), and grayscale / RGBA / CMYK / tiny images (all must be converted).
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

# Image kinds cycled through the examples of each fixture.
GOOD_KINDS = ("rgb", "gray", "rgba", "cmyk", "tiny", "rgb")
BAD_KINDS = ("corrupt", "truncated")


def face(seed: int, size: int = 96) -> Image.Image:
  """A cartoon face: skin ellipse, eyes, brows, mouth; varied by seed."""
  rng = np.random.default_rng(seed)
  bg = tuple(int(v) for v in rng.integers(0, 255, 3))
  img = Image.new("RGB", (size, size), bg)
  d = ImageDraw.Draw(img)
  s = size / 96
  skin = tuple(int(v) for v in rng.integers(150, 240, 3))
  d.ellipse([16 * s, 8 * s, 80 * s, 90 * s], fill=skin)
  for x in (34, 62):
    d.ellipse([(x - 5) * s, 36 * s, (x + 5) * s, 44 * s], fill=(30, 30, 30))
    d.line([(x - 8) * s, (30 - rng.integers(0, 4)) * s, (x + 8) * s, 28 * s], fill=(40, 20, 10),
           width=max(1, int(2 * s)))
  y = 68 + int(rng.integers(-4, 4))
  d.arc([34 * s, (y - 8) * s, 62 * s, (y + 8) * s], 0, 180, fill=(120, 20, 20),
        width=max(1, int(2 * s)))
  return img


def write_image(path: str, kind: str, seed: int = 0) -> str:
  """Write one image of `kind`; the extension is chosen to fit the kind. Returns the path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  stem = os.path.splitext(path)[0]
  img = face(seed)
  if kind == "rgb":
    path = stem + ".jpg"
    img.save(path, "JPEG", quality=92)
  elif kind == "gray":
    path = stem + ".jpg"
    img.convert("L").save(path, "JPEG")
  elif kind == "rgba":
    path = stem + ".png"
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.new("L", img.size, 200))
    rgba.save(path, "PNG")
  elif kind == "cmyk":
    path = stem + ".jpg"
    img.convert("CMYK").save(path, "JPEG")
  elif kind == "tiny":
    path = stem + ".png"
    face(seed, size=24).save(path, "PNG")
  elif kind == "corrupt":
    path = stem + ".jpg"
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[2:200] = bytes(np.random.default_rng(seed).integers(0, 256, 198, dtype=np.uint8))
    with open(path, "wb") as f:
      f.write(bytes(data))
  elif kind == "truncated":
    path = stem + ".png"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with open(path, "wb") as f:
      f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
  else:
    raise ValueError(kind)
  return path


def _kinds(n_good: int, with_bad: bool) -> list[str]:
  kinds = [GOOD_KINDS[i % len(GOOD_KINDS)] for i in range(n_good)]
  return kinds + (list(BAD_KINDS) if with_bad else [])


def make_raf_db(root: str, *, n_train: int = 6, n_test: int = 3, bad: bool = True,
                malformed_line: int | None = None) -> dict:
  """RAF-DB basic layout. Returns {split: {id: emotion index}} of the examples that must load."""
  lines, truth = [], {"train": {}, "test": {}}
  for split, n in (("train", n_train), ("test", n_test)):
    for i, kind in enumerate(_kinds(n, bad and split == "train")):
      name = f"{split}_{i + 1:05d}"
      label = i % 7 + 1
      write_image(os.path.join(root, "Image", "aligned", f"{name}_aligned.jpg"), kind, seed=i)
      write_image(os.path.join(root, "Image", "original", f"{name}.jpg"), kind, seed=i)
      lines.append(f"{name}.jpg {label}")
      if kind not in BAD_KINDS:
        truth[split][name] = label - 1   # RAF-DB label k -> EMOTIONS index k-1
  if malformed_line is not None:
    lines.insert(malformed_line - 1, "train_09999.jpg happy")
  os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
  with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return truth


def make_affectnet(root: str, *, n_train: int = 8, n_val: int = 4, bad: bool = True) -> dict:
  """AffectNet npy layout; includes contempt (7) and an excluded 'uncertain' (9) label."""
  from feallm_jax.data import facs
  truth: dict = {"train": {}, "test": {}, "excluded": 0}
  for split, folder, n in (("train", "train_set", n_train), ("test", "val_set", n_val)):
    kinds = _kinds(n, bad and split == "train")
    for i, kind in enumerate(kinds):
      label = [7, 9][i] if i < 2 else i % 7   # first two: contempt and uncertain
      path = write_image(os.path.join(root, folder, "images", f"{i}.jpg"), kind, seed=100 + i)
      ann = os.path.join(root, folder, "annotations")
      os.makedirs(ann, exist_ok=True)
      np.save(os.path.join(ann, f"{i}_exp.npy"), np.array(str(label)))
      w, h = Image.open(path).size if kind not in BAD_KINDS else (96, 96)
      lm = np.stack([np.linspace(0.2, 0.8, 68) * w, np.linspace(0.3, 0.9, 68) * h], -1)
      np.save(os.path.join(ann, f"{i}_lnd.npy"), lm.reshape(-1).astype(np.float64))
      if label == 9:
        truth["excluded"] += 1
      elif kind not in BAD_KINDS:
        truth[split][f"{split}_{i}"] = facs.emotion_index(facs.AFFECTNET_8[label])
  return truth


def make_bp4d(root: str, *, frames: int = 3, bad: bool = True, malformed: bool = False) -> dict:
  """BP4D layout: one subject per fold (F001 fold1, M011 fold2, F007 fold3), task T1."""
  from feallm_jax.data import facs
  truth: dict = {}
  aus = list(range(1, 28))
  occ = os.path.join(root, "AUCoding", "AU_OCC")
  os.makedirs(occ, exist_ok=True)
  for k, subj in enumerate(("F001", "M011", "F007")):
    rows = [["frame"] + [str(a) for a in aus]]
    kinds = _kinds(frames, bad and k == 0)
    for i, kind in enumerate(kinds):
      frame = 100 + i
      vals = [(a + i) % 2 for a in aus]
      vals[aus.index(2)] = 9   # AU2 unknown in every frame
      rows.append([str(frame)] + [str(v) for v in vals])
      write_image(os.path.join(root, "Sequences", subj, "T1", f"{frame:04d}.jpg"), kind,
                  seed=200 + 10 * k + i)
      if kind not in BAD_KINDS:
        pres = np.full(len(facs.ALL_AUS), -1, np.int32)
        for a, v in zip(aus, vals):
          if a in facs.BP4D_AUS and v != 9:
            pres[facs.au_index(a)] = v
        truth[f"{subj}_T1_{frame:04d}"] = (f"fold{k + 1}", pres)
    if malformed and k == 1:
      rows.insert(2, [str(999), "1", "x"])
    with open(os.path.join(occ, f"{subj}_T1.csv"), "w", newline="") as f:
      csv.writer(f).writerows(rows)
  return truth


def make_disfa(root: str, *, frames: int = 3, bad: bool = True, malformed: bool = False) -> dict:
  """DISFA layout: SN001 fold1, SN013 fold2, SN003 fold3; AU intensities 0-5."""
  from feallm_jax.data import facs
  truth: dict = {}
  aus = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
  for k, subj in enumerate(("SN001", "SN013", "SN003")):
    lab = os.path.join(root, "ActionUnit_Labels", subj)
    os.makedirs(lab, exist_ok=True)
    kinds = _kinds(frames, bad and k == 0)
    inten = {a: [(a + i + k) % 6 for i in range(len(kinds))] for a in aus}
    for a in aus:
      lines = [f"{i + 1},{inten[a][i]}" for i in range(len(kinds))]
      if malformed and k == 2 and a == 4:
        lines.insert(1, "2;3")
      with open(os.path.join(lab, f"{subj}_au{a}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for i, kind in enumerate(kinds):
      write_image(os.path.join(root, "Images", subj, f"{i + 1}.png"), kind, seed=300 + i)
      if kind not in BAD_KINDS:
        it = np.full(len(facs.ALL_AUS), -1.0, np.float32)
        for a in aus:
          it[facs.au_index(a)] = inten[a][i]
        truth[f"{subj}_{i + 1:05d}"] = (f"fold{k + 1}", it)
  return truth


def make_llava(root: str, *, n_train: int = 5, n_test: int = 2, bad: bool = True,
               malformed: bool = False) -> dict:
  """FABA-Instruct-like layout: train.json / test.json + images/."""
  truth: dict = {"train": {}, "test": {}}
  for split, n in (("train", n_train), ("test", n_test)):
    entries = []
    for i, kind in enumerate(_kinds(n, bad and split == "train")):
      rel = os.path.relpath(write_image(os.path.join(root, "images", split, f"{i}.jpg"), kind,
                                        seed=400 + i), os.path.join(root, "images"))
      conv = [{"from": "human", "value": "<image>\nDescribe the facial expression."},
              {"from": "gpt", "value": f"The person looks calm, sample {i}."},
              {"from": "human", "value": "Which action units are active?"},
              {"from": "gpt", "value": "AU12 lip corner puller."}]
      if i == 1:
        conv[0]["value"] = "Describe the facial expression."   # builder adds the <image>
      entries.append({"id": f"{split}-{i}", "image": rel, "conversations": conv})
      if kind not in BAD_KINDS:
        truth[split][f"{split}-{i}"] = conv
    if malformed and split == "train":
      entries[2]["conversations"][1]["from"] = "human"
    with open(os.path.join(root, f"faba_{split}.json"), "w") as f:
      json.dump(entries, f, indent=1)
  return truth


# --- examples no fixed max_len fits as they are ------------------------------------------------

# Real-looking long turns (a detailed question, a long description), repeated to length.
LONG_QUESTION = (
    "Before you answer, read the whole situation carefully. The photograph was taken at a "
    "family gathering in the late afternoon, a little after the speeches, when most people had "
    "moved to the garden and the light was coming low through the trees. The person in the "
    "picture had just heard some news from a cousin across the table, and several relatives "
    "said later that they could not tell whether the reaction was joy, surprise or worry. ")
LONG_ANSWER = (
    "The brows are raised and drawn slightly together, the upper lids are lifted so that more "
    "of the white of the eyes shows, and the lips are parted with the corners pulled a little "
    "sideways. Taken together these movements read as surprise with a trace of worry rather "
    "than plain happiness, because the cheeks are not raised and there are no crow's feet. ")

# id -> why the pipeline cannot fit it at max_len=UNFIT_MAX_LEN (None: truncated but kept).
UNFIT_MAX_LEN = 256
PLANTED = {
    "train-late-image": "image_past_max_len",   # long multi-turn chat, <image> in turn 3
    "train-cut-answer": "empty_answer",         # <image> first, then a question past max_len
    "train-two-images": "image_token_count",    # two <image> tokens (planted in the shard)
    "train-bad-bytes": "bad_image",             # undecodable image bytes (planted in the shard)
    "train-long-kept": None,                    # answer starts in time: cut, still trained on
}
TEST_PLANTED = {"test-late-image": "image_past_max_len"}


def _late_image_conv(tag: str) -> list:
  return [{"from": "human", "value": f"{tag}. " + LONG_QUESTION * 2},
          {"from": "gpt", "value": LONG_ANSWER},
          {"from": "human", "value": "<image>\nAnd this face, what does it express?"},
          {"from": "gpt", "value": "Surprise."}]


def make_llava_unfit(root: str, *, n_good: int = 19, n_test: int = 3) -> dict:
  """FABA-Instruct layout whose train split holds, besides ``n_good`` ordinary conversations,
  the PLANTED examples, and whose test split holds TEST_PLANTED besides ``n_test`` ordinary ones.
  Two of them (two images, bad bytes) cannot pass the builder's own checks: they are written as
  ordinary records here and corrupted in the built shard by :func:`plant_in_shards`.
  Every planted conversation carries the word 'PLANTED', which no kept row may contain."""
  truth: dict = {"train": {}, "test": {}}
  for split, n, planted in (("train", n_good, PLANTED), ("test", n_test, TEST_PLANTED)):
    entries = []
    for i in range(n):
      rel = os.path.relpath(write_image(os.path.join(root, "images", split, f"{i}.jpg"), "rgb",
                                        seed=500 + i), os.path.join(root, "images"))
      conv = [{"from": "human", "value": "<image>\nDescribe the facial expression."},
              {"from": "gpt", "value": f"The person looks calm, sample {i}."},
              {"from": "human", "value": "Which action units are active?"},
              {"from": "gpt", "value": "AU12 lip corner puller."}]
      entries.append({"id": f"{split}-{i}", "image": rel, "conversations": conv})
      truth[split][f"{split}-{i}"] = None
    for k, (rid, why) in enumerate(planted.items()):
      rel = os.path.relpath(write_image(os.path.join(root, "images", split, f"p{k}.jpg"), "rgb",
                                        seed=600 + k), os.path.join(root, "images"))
      if rid.endswith("late-image"):
        conv = _late_image_conv("PLANTED")
      elif rid.endswith("cut-answer"):
        conv = [{"from": "human", "value": "<image>\nPLANTED. " + LONG_QUESTION * 2 +
                 "What is the expression?"},
                {"from": "gpt", "value": "Surprise, with a trace of worry."}]
      elif rid.endswith("long-kept"):
        conv = [{"from": "human", "value": "<image>\nPLANTED. Describe the face in detail."},
                {"from": "gpt", "value": LONG_ANSWER * 2}]
      else:   # two-images / bad-bytes: ordinary here, corrupted after the build
        conv = [{"from": "human", "value": "<image>\nPLANTED. What is the expression?"},
                {"from": "gpt", "value": "Happiness."}]
      entries.append({"id": rid, "image": rel, "conversations": conv})
      truth[split][rid] = why
    with open(os.path.join(root, f"faba_{split}.json"), "w") as f:
      json.dump(entries, f, indent=1)
  return truth


def plant_in_shards(version_dir: str, split: str) -> dict[str, str]:
  """Corrupts, in the built ArrayRecord shards of ``split``, what the builder refused to write:
  '*-two-images' gets a second ``<image>`` in its conversation, '*-bad-bytes' gets image bytes
  no decoder reads (a damaged shard, or data written by another tool). Returns {id: change}."""
  import glob

  import tensorflow_datasets as tfds
  from array_record.python import array_record_module as ar

  from feallm_jax.data import builders
  builders.register_all()
  feats = tfds.builder_from_directory(version_dir).info.features
  skip = {"image": tfds.decode.SkipDecoding()}
  done = {}
  for path in sorted(glob.glob(os.path.join(version_dir, f"*-{split}.array_record-*"))):
    reader = ar.ArrayRecordReader(path)
    raws = reader.read_all()
    reader.close()
    out = []
    for raw in raws:
      rec = dict(feats.deserialize_example_np(raw, decoders=skip))
      rid = rec["id"].decode() if isinstance(rec["id"], bytes) else str(rec["id"])
      if rid.endswith("two-images"):
        conv = json.loads(rec["conversations"])
        conv[-2]["value"] += " Compare it with this one: <image>"
        rec["conversations"] = json.dumps(conv)
        done[rid] = "two <image> tokens"
      elif rid.endswith("bad-bytes"):
        rec["image"] = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4   # JPEG magic, then noise
        done[rid] = "undecodable image bytes"
      else:
        out.append(raw)
        continue
      out.append(feats.serialize_example(rec))
    writer = ar.ArrayRecordWriter(path, "group_size:1")
    for raw in out:
      writer.write(raw)
    writer.close()
  return done
