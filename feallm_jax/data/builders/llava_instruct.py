"""LLaVA-format instruction data (e.g. FABA-Instruct): a JSON list of {image, conversations}."""
from __future__ import annotations

import json
import os

from feallm_jax.data.builders import common

SPLIT_WORDS = (("train", "train"), ("test", "test"), ("val", "test"), ("eval", "test"))
ROLES = ("human", "gpt")


class LlavaInstruct(common.FeaBuilder):
  """Records keep their own conversations (JSON) and carry no emotion / AU labels."""

  name = "llava_instruct"
  DESCRIPTION = "Any LLaVA-format instruction set with face images (FABA-Instruct layout)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Place in manual_dir one or more LLaVA-format files and their images:
  manual_dir/<name>.json   [{"id": ..., "image": "<relative path>", "conversations":
                             [{"from": "human", "value": "<image>\\n..."},
                              {"from": "gpt", "value": "..."}, ...]}, ...]   (or .jsonl)
  manual_dir/images/...    image paths are resolved against manual_dir/images, manual_dir
                           and the JSON file's folder, in that order
The split comes from the file name: '*train*' -> train, '*test*', '*val*', '*eval*' -> test.
Images are taken as given (face crops); set detect_faces in the builder to crop raw photos.
"""

  def __init__(self, *args, detect_faces: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self._detect = detect_faces

  def _split_generators(self, dl_manager):
    root = self._require(dl_manager.manual_dir, "the manual folder")
    files = sorted(f for f in os.listdir(root) if f.endswith((".json", ".jsonl")))
    splits: dict[str, list[str]] = {}
    for f in files:
      low = f.lower()
      split = next((s for w, s in SPLIT_WORDS if w in low), None)
      if split is None:
        raise ValueError(f"llava_instruct: cannot tell the split of {os.path.join(root, f)}; "
                         "name it *train*.json or *test*.json")
      splits.setdefault(split, []).append(os.path.join(root, f))
    if not splits:
      raise FileNotFoundError(f"llava_instruct: no .json/.jsonl files in {root}.\n"
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {s: self._examples(s, paths, root) for s, paths in splits.items()}

  def _examples(self, split, paths, root):
    def items():
      for path in paths:
        for where, entry in load_entries(path):
          rid, img_rel, conv = validate(entry, path, where)
          yield f"{os.path.basename(path)}:{rid}", (rid, img_rel, conv, path)

    def make(item):
      rid, img_rel, conv, path = item
      img = resolve(img_rel, root, os.path.dirname(path))
      if img is None:
        raise common.SkipImage(f"{rid}: image file missing ({img_rel})")
      image, _ = common.load_face(img, rid, detect=self._detect)
      return common.make_record(rid, image, conversations=json.dumps(conv))

    return self._guarded(split, items(), make)


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


def validate(entry, path: str, line: int):
  """(id, image path, conversations) with exactly one <image> (added to turn 1 if absent)."""
  def bad(msg):
    return common.LabelFileError(path, line, msg)
  if not isinstance(entry, dict):
    raise bad("example is not an object")
  img = entry.get("image")
  if not isinstance(img, str) or not img:
    raise bad("missing 'image' path")
  conv = entry.get("conversations")
  if not isinstance(conv, list) or len(conv) < 2:
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
  if n_img > 1:
    raise bad(f"{n_img} <image> placeholders; exactly one is supported")
  if n_img == 0:
    out[0]["value"] = "<image>\n" + out[0]["value"]
  rid = str(entry.get("id") or os.path.splitext(os.path.basename(img))[0])
  return rid, img, out


def resolve(rel: str, root: str, json_dir: str) -> str | None:
  for base in (os.path.join(root, "images"), root, json_dir):
    p = os.path.join(base, rel)
    if os.path.isfile(p):
      return p
  return None
