"""LLaVA-format instruction data: FABA-Instruct as EmoLA ships it, LLaVA's own mixes, any list
of {image, conversations}.

What the real files hold, and what is done with it:
* LLaVA-1.5's ``llava_v1_5_mix665k.json`` has text-only entries (no ``image`` key; LLaVA's
  ``LazySupervisedDataset.__getitem__`` checks ``'image' in sources[0]``). They are kept (the
  model trains on a row without ``<image>``), with a blank placeholder image no token attends
  to, and counted (``noted``: text_only).
* A conversation may open with a ``gpt`` turn; LLaVA's ``preprocess_v1`` skips it ("Skip the
  first one if it is not from human"). So does this builder, counting it.
* File names often name no split (``llava_v1_5_mix665k.json``, ``llava_instruct_150k.json``):
  they go to ``default_split`` (train; --default_split).
* Duplicate ids within a split are made unique (``<id>#2``) and counted.
* EmoLA's FABA-Instruct (README: ``data/FABAInstruct/{train,eval}/*.json``, image paths
  relative to ``data/`` as EmoLA trains with ``--image_folder ./data/``) is read as shipped:
  JSON files are found in subfolders, image paths are tried against --image_root, manual_dir,
  the JSON's folder and the folders above manual_dir. Its eval files hold ``label`` and
  ``gpt4`` instead of conversations (EmoLA ``emollava/eval/eval_FABA.py``): they become one
  question (EmoLA's own) and its reference answer, with the label kept as the record's
  emotion / AUs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from feallm_jax.data import facs
from feallm_jax.data.builders import common

# Path words that name a split (whole words of the file or folder name).
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "test", "valid": "test", "validation": "test", "eval": "test",
               "evaluation": "test", "dev": "test"}
ROLES = ("human", "gpt")
MAX_DEPTH = 3                       # JSON files are looked for this many folders deep
SKIP_DIRS = {"images", "image", "landmarks", "landmark", "__pycache__"}

# EmoLA emollava/eval/eval_FABA.py: the questions it asks and its emotion label codes.
FABA_QUESTIONS = {"au": "What AUs are conveyed by this face?",
                  "emotion": "What emotions are conveyed by this face?"}
FABA_EMOTION_CODES = ("happiness", "sadness", "surprise", "anger", "neutral", "disgust", "fear")
# AUIndicesMap(dataset='FABA'): the AUs a FABA-Instruct AU label can name.
FABA_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27, 43)


@dataclasses.dataclass
class Entry:
  """One validated example."""
  rid: str
  image: str | None                   # path as written in the JSON; None: text-only
  conversations: list
  emotion: int = -1
  au_present: np.ndarray | None = None
  notes: tuple = ()                   # what was changed or noticed, counted in `noted`


class LlavaInstruct(common.FeaBuilder):
  """Records keep their own conversations (JSON) and carry no emotion / AU labels (except
  FABA-Instruct's eval files, whose labels are kept)."""

  name = "llava_instruct"
  DESCRIPTION = "Any LLaVA-format instruction set with face images (FABA-Instruct layout)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Point manual_dir at a folder holding LLaVA-format files (up to 3 folders deep) and their images:
  <name>.json   [{"id": ..., "image": "<relative path>", "conversations":
                  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."},
                   ...]}, ...]   (or .jsonl); an entry without "image" is text-only
  FABA-Instruct as EmoLA ships it: manual_dir = data/FABAInstruct (train/train_*_anno.json,
  eval/eval_*_anno.json, image paths 'FABAInstruct/train/images/...' relative to data/).
Image paths are resolved against --image_root, manual_dir/images, manual_dir, the JSON's
folder (and its images/), and the two folders above manual_dir, in that order.
The split comes from the path's words: train/training -> train; test/val/validation/eval/dev ->
test; a path naming none (llava_v1_5_mix665k.json) -> --default_split (train).
Images are taken as given (face crops); set detect_faces in the builder to crop raw photos.
"""

  def __init__(self, *args, detect_faces: bool = False, image_root: str | None = None,
               default_split: str = "train", **kwargs):
    super().__init__(*args, **kwargs)
    self._detect = detect_faces
    self._image_root = (os.path.abspath(os.path.expanduser(image_root))
                        if image_root else None)
    if not re.fullmatch(r"[A-Za-z]\w*", default_split or ""):
      raise ValueError(f"llava_instruct: default_split={default_split!r} is not a split name "
                       "(--default_split=train)")
    self._default_split = default_split

  def _split_generators(self, dl_manager):
    root = self._require(dl_manager.manual_dir, "the manual folder")
    if self._image_root and not os.path.isdir(self._image_root):
      raise FileNotFoundError(f"llava_instruct: image_root {self._image_root} (--image_root) "
                              "is not a folder")
    splits: dict[str, list[str]] = {}
    for path in find_files(root):
      split = split_of(os.path.relpath(path, root)) or self._default_split
      splits.setdefault(split, []).append(path)
    if not splits:
      raise FileNotFoundError(f"llava_instruct: no .json/.jsonl files in {root} (looked "
                              f"{MAX_DEPTH} folders deep).\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    # Validate everything before a single image is read: a malformed entry stops the build
    # naming its file and line, not after hours of generation.
    return {s: self._examples(s, self._entries(s, paths, root), root)
            for s, paths in splits.items()}

  def _entries(self, split, paths, root):
    out, seen = [], {}
    for path in paths:
      task = faba_task(os.path.relpath(path, root))
      for k, (where, raw) in enumerate(load_entries(path)):
        e = validate(raw, path, where, faba_task=task, index=k)
        n = seen.get(e.rid, 0) + 1
        seen[e.rid] = n
        if n > 1:
          new = f"{e.rid}#{n}"
          self.noted.add(split, "renamed_duplicate_id",
                         f"{path}:{where} (entry {k}): id {e.rid!r} seen before in split "
                         f"{split}; kept as {new!r}")
          e.rid = new
        for note in e.notes:
          self.noted.add(split, note, f"{path}:{where} (entry {k}): id {e.rid!r}")
        key = f"{os.path.relpath(path, root)}#{k}"     # unique even when all sit on one line
        out.append((key, (e, path)))
    return out

  def _examples(self, split, entries, root):
    placeholder = common.encode_jpeg(blank_image())
    bases: dict[str, list[str]] = {}

    def make(item):
      e, path = item
      conv = json.dumps(e.conversations)
      if e.image is None:
        return common.make_record(e.rid, placeholder, conversations=conv)
      json_dir = os.path.dirname(path)
      if json_dir not in bases:
        bases[json_dir] = image_bases(root, json_dir, self._image_root)
      img = resolve(e.image, bases[json_dir])
      if img is None:
        raise common.SkipImage(f"{e.rid}: image file missing ({e.image}; looked under "
                               f"{bases[json_dir]})")
      image, _ = common.load_face(img, e.rid, detect=self._detect)
      return common.make_record(e.rid, image, conversations=conv, emotion=e.emotion,
                                au_present=e.au_present)

    return self._guarded(split, entries, make)


def blank_image():
  """The image of a text-only record: mid grey, the smallest size the pipeline upsamples."""
  from PIL import Image
  return Image.new("RGB", (common.MIN_SIDE, common.MIN_SIDE), (128, 128, 128))


def find_files(root: str) -> list[str]:
  """.json/.jsonl files under root, at most MAX_DEPTH folders deep, image folders skipped."""
  out = []
  base_depth = root.rstrip(os.sep).count(os.sep)
  for d, dirs, files in os.walk(root):
    depth = d.rstrip(os.sep).count(os.sep) - base_depth
    dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x.lower() not in SKIP_DIRS
                     and depth < MAX_DEPTH)
    out += [os.path.join(d, f) for f in sorted(files)
            if f.endswith((".json", ".jsonl")) and not f.startswith(".")]
  return out


def _words(rel: str) -> list[list[str]]:
  """Lower-case words of each path component, the file name first."""
  parts = rel.replace("\\", "/").split("/")
  parts[-1] = os.path.splitext(parts[-1])[0]
  return [re.split(r"[^a-z0-9]+", p.lower()) for p in reversed(parts)]


def split_of(rel: str) -> str | None:
  """The split a path names by a whole word (file name first, then its folders), or None."""
  for words in _words(rel):
    for w in words:
      if w in SPLIT_WORDS:
        return SPLIT_WORDS[w]
  return None


def faba_task(rel: str) -> str | None:
  """'au' or 'emotion' when the path names one (FABA-Instruct: eval_au_anno.json)."""
  for words in _words(rel):
    for w in words:
      if w in ("au", "aus"):
        return "au"
      if w in ("emotion", "emotions", "emo"):
        return "emotion"
  return None


def load_entries(path: str):
  """[(location, entry)]: location is 'line N' for .jsonl, 'entry N' for a JSON list."""
  if path.endswith(".jsonl"):
    out = []
    with open(path, encoding="utf-8") as f:
      for ln, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append((ln, json.loads(line)))
          except json.JSONDecodeError as e:
            raise common.LabelFileError(path, ln, f"invalid JSON ({e.msg})") from None
    return out
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise common.LabelFileError(path, e.lineno, f"invalid JSON ({e.msg})") from None
  if not isinstance(data, list):
    raise common.LabelFileError(path, 1, "expected a JSON list of examples")
  # Line of each top-level entry, so errors point into the file.
  lines = []
  decoder = json.JSONDecoder()
  i = text.index("[") + 1
  for _ in data:
    while text[i] in " \t\r\n,":
      i += 1
    lines.append(text.count("\n", 0, i) + 1)
    _, i = decoder.raw_decode(text, i)
  return list(zip(lines, data))


def validate(entry, path: str, line: int, *, faba_task: str | None = None,
             index: int | None = None) -> Entry:
  """One entry as an :class:`Entry`: exactly one ``<image>`` when it has an image (added to
  the first human turn if absent), none when it is text-only; a leading gpt turn dropped.
  Anything else malformed raises LabelFileError naming the file and line."""
  def bad(msg):
    return common.LabelFileError(path, line, msg if index is None else f"entry {index}: {msg}")
  if not isinstance(entry, dict):
    raise bad("example is not an object")
  img = entry.get("image")
  if img is not None and (not isinstance(img, str) or not img):
    raise bad(f"'image' must be one path, got {img!r}")
  notes = []
  emotion, aus = -1, None
  conv = entry.get("conversations")
  if conv is None and "gpt4" in entry:      # FABA-Instruct eval file: label + reference answer
    conv, emotion, aus = _faba_eval(entry, faba_task, bad)
    notes.append("faba_eval_entry")
  if not isinstance(conv, list):
    raise bad("'conversations' must list at least one human and one gpt turn")
  if conv and isinstance(conv[0], dict) and conv[0].get("from") != ROLES[0]:
    conv = conv[1:]                         # LLaVA preprocess_v1: "Skip the first one if it is
    notes.append("leading_gpt_turn_dropped")   # not from human"
  if len(conv) < 2:
    raise bad("'conversations' must list at least one human and one gpt turn")
  out = []
  for k, turn in enumerate(conv):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise bad(f"turn {k} needs 'from' and a string 'value'")
    role = turn.get("from")
    if role != ROLES[k % 2]:
      raise bad(f"turn {k} is from {role!r}, expected {ROLES[k % 2]!r} (turns alternate)")
    out.append({"from": role, "value": turn["value"]})
  n_img = sum(t["value"].count("<image>") for t in out)
  if img is None:
    if n_img:
      raise bad(f"{n_img} <image> placeholder(s) but no 'image' path")
    notes.append("text_only")
  else:
    if n_img > 1:
      raise bad(f"{n_img} <image> placeholders; exactly one is supported")
    if n_img == 0:
      out[0]["value"] = "<image>\n" + out[0]["value"]
  rid = entry.get("id")
  if rid is None or rid == "":
    rid = (os.path.splitext(os.path.basename(img))[0] if img else
           f"{os.path.splitext(os.path.basename(path))[0]}_{line if index is None else index}")
  return Entry(str(rid), img, out, emotion, aus, tuple(notes))


def _faba_eval(entry, task, bad):
  """(conversation, emotion index, au_present) of a FABA-Instruct eval entry."""
  if task is None:
    raise bad("FABA-Instruct eval entry (label/gpt4) in a file whose name says neither 'au' "
              "nor 'emotion' (eval_au_anno.json / eval_emotion_anno.json)")
  answer, label = entry.get("gpt4"), entry.get("label")
  if not isinstance(answer, str):
    raise bad("'gpt4' must be the reference answer text")
  conv = [{"from": "human", "value": "<image>\n" + FABA_QUESTIONS[task]},
          {"from": "gpt", "value": answer}]
  emotion, aus = -1, None
  if task == "emotion":
    name = None
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
      k = int(label)
      name = FABA_EMOTION_CODES[k] if 0 <= k < len(FABA_EMOTION_CODES) else None
    elif isinstance(label, str):
      name = facs.normalize_emotion(label)
    if name is None:
      raise bad(f"emotion label {label!r} is neither a code 0-6 nor an emotion name")
    emotion = facs.emotion_index(name)
  else:
    if not isinstance(label, str):
      raise bad(f"AU label {label!r} must be a string like '1, 2, 4'")
    named = {int(x) for x in re.findall(r"\d+", label)}
    aus = np.full(len(facs.ALL_AUS), -1, np.int32)
    for a in FABA_AUS:
      if a in facs.ALL_AUS:
        aus[facs.au_index(a)] = int(a in named)
  return conv, emotion, aus


def image_bases(root: str, json_dir: str, image_root: str | None) -> list[str]:
  """Folders an image path may be relative to, most specific first."""
  cands = [image_root] if image_root else []
  cands += [os.path.join(root, "images"), root, json_dir, os.path.join(json_dir, "images")]
  up = root
  for _ in range(2):        # EmoLA: 'FABAInstruct/train/images/...' relative to data/
    up = os.path.dirname(up)
    cands.append(up)
  return list(dict.fromkeys(os.path.abspath(c) for c in cands))


def resolve(rel: str, bases) -> str | None:
  for base in bases:
    p = os.path.join(base, rel)
    if os.path.isfile(p):
      return p
  return None
