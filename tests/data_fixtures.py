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


def face(seed: int, size: int = 96, bg: tuple | None = None) -> Image.Image:
  """A cartoon face: skin ellipse, eyes, brows, mouth; varied by seed (``bg``: background)."""
  rng = np.random.default_rng(seed)
  bg_rand = tuple(int(v) for v in rng.integers(0, 255, 3))
  img = Image.new("RGB", (size, size), bg or bg_rand)
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


def write_image(path: str, kind: str, seed: int = 0, *, keep_ext: bool = False,
                bg: tuple | None = None) -> str:
  """Write one image of `kind`; the extension is chosen to fit the kind (``keep_ext``: the
  path's own extension, for layouts whose tool fixes it). Returns the path."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  stem, ext = os.path.splitext(path)
  img = face(seed, bg=bg)
  if keep_ext and kind == "rgb":
    img.save(path, "JPEG" if ext.lower() in (".jpg", ".jpeg") else "PNG")
    return path
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


RAF_LABELLED_BG = (200, 40, 200)    # background of the labelled face in make_raf_db_original


def make_raf_db_original(root: str, n: int = 3) -> dict:
  """RAF-DB basic, config 'original': group photos ``Image/original/<name>.jpg`` with the
  release's face boxes ``Annotation/boundingbox/<name>_boundingbox.txt`` ("x0 y0 x1 y1", one
  line) next to ``EmoLabel/list_patition_label.txt`` (Self-Cure-Network src/train.py reads
  ``EmoLabel/list_patition_label.txt`` and ``Image/aligned/<name>_aligned.jpg`` under
  ``datasets/raf-basic/``; public RAF-DB loaders read the box as four numbers with
  ``np.loadtxt(dataPath_prefix + '/RAF/basic/Annotation/boundingbox/' + name[:-4] +
  '_boundingbox.txt')`` and ``x_min, y_min, x_max, y_max = f.readline().strip().split()``).
  Each photo is a group: scikit-image's astronaut.png (a real face the Haar cascade finds) and,
  right of it, the labelled person (a face turned sideways on a magenta background, which no
  cascade finds), whose box the file gives. The last train photo has no box file: the
  detector then crops the astronaut. Returns {split: {id: emotion index}}, "no_box": [ids]."""
  import skimage
  astro = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data",
                                  "astronaut.png")).convert("RGB")
  truth: dict = {"train": {}, "test": {}, "no_box": []}
  lines = []
  for split, count in (("train", n), ("test", 2)):
    for i in range(count):
      name = f"{split}_{i + 1:05d}"
      label = (i + (split == "test")) % 7 + 1
      img = Image.new("RGB", (700, 512), (90, 90, 90))
      img.paste(astro, (0, 0))
      img.paste(face(1100 + i, size=100, bg=RAF_LABELLED_BG).rotate(90), (560, 200))
      path = os.path.join(root, "Image", "original", f"{name}.jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      img.save(path, "JPEG", quality=95)
      box_dir = os.path.join(root, "Annotation", "boundingbox")
      os.makedirs(box_dir, exist_ok=True)
      if split == "train" and i == count - 1:
        truth["no_box"].append(name)
      else:
        with open(os.path.join(box_dir, f"{name}_boundingbox.txt"), "w") as f:
          f.write("560.0 200.0 660.0 300.0\n")
      truth[split][name] = label - 1
      lines.append(f"{name}.jpg {label}")
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


def affectnet_photo(path: str, box: tuple, seed: int) -> None:
  """A full AffectNet-style photo: grey scene, the face drawn inside ``box`` = (x, y, w, h),
  and a bright green decoy square right of it (outside the box's crop)."""
  x, y, w, h = box
  img = Image.new("RGB", (320, 240), (90, 90, 90))
  img.paste(face(seed, size=max(w, h)).resize((w, h)), (x, y))
  ImageDraw.Draw(img).rectangle([260, 150, 310, 200], fill=(0, 255, 0))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, "JPEG", quality=95)


def make_affectnet_csv(root: str, *, validation_header: bool = False) -> dict:
  """AffectNet's original release: ``Manually_Annotated_file_lists/{training,validation}.csv``
  (columns subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks
  'x1;y1;...', expression, valence, arousal) and the photos under
  ``Manually_Annotated/Manually_Annotated_Images/<dir>/<sha>.jpg``. Sources: the column list in
  a loader of training.csv (``# subDirectory_filePath face_x face_y face_width face_height
  facial_landmarks expression valence arousal``, reading it with ``reader.__next__()`` to skip
  the header and images from ``Manually_Annotated/Manually_Annotated_Images``); landmarks split
  on ';' as x, y pairs (a noisyFER loader's ``lms_to_np``); an AffectNetDataset loader that reads
  validation.csv with ``header=None`` and skips a header row only for training.csv, while the
  hcai_affectnet tfds builder reads both with a header: ``validation_header`` picks one.
  Includes contempt (7), 'uncertain' (9) and 'non-face' (10) rows and one row whose photo is
  missing. Returns {split: {id: (emotion index, box centre landmark index)}}."""
  from feallm_jax.data import facs
  lists = os.path.join(root, "Manually_Annotated_file_lists")
  imgs = os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images")
  os.makedirs(lists, exist_ok=True)
  header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
            "facial_landmarks", "expression", "valence", "arousal"]
  truth: dict = {"train": {}, "test": {}, "box": (60, 40, 120, 140)}
  x, y, w, h = truth["box"]
  # 68 landmarks inside the box; landmark 30 (the nose tip) at the box centre.
  lm = np.stack([np.linspace(x + 10, x + w - 10, 68), np.linspace(y + 10, y + h - 10, 68)], -1)
  lm[30] = (x + w / 2, y + h / 2)
  lm_text = ";".join(f"{v:.2f}" for v in lm.reshape(-1))
  codes = {"train": [1, 7, 9, 6, 0, 3], "test": [2, 10, 5]}
  for split, name in (("train", "training.csv"), ("test", "validation.csv")):
    rows = [header] if split == "train" or validation_header else []
    for i, code in enumerate(codes[split]):
      sub = f"{100 + i}"
      sha = f"{split[:2]}{i:02d}737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca"[:56]
      rel = f"{sub}/{sha}.jpg"
      missing = split == "train" and i == 3
      if not missing:
        affectnet_photo(os.path.join(imgs, rel), truth["box"], seed=900 + i)
      rows.append([rel, str(x), str(y), str(w), str(h), lm_text, str(code), "0.5", "-0.2"])
      rid = f"{split}_{sub}_{sha}"
      if code <= 7 and not missing:
        truth[split][rid] = facs.emotion_index(facs.AFFECTNET_8[code])
    with open(os.path.join(lists, name), "w", newline="") as f:
      csv.writer(f).writerows(rows)
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


def make_bp4d_release(root: str, layout: str = "me_graphau", frames: int = 5) -> dict:
  """BP4D as released plus frames where a tool keeps them.

  ``AUCoding/AU_OCC/<subject>_<task>.csv``: header of integers, '0' the frame column and one
  column per AU number (ME-GraphAU tool/BP4D_image_label_process.py reads it with
  ``label_folder = "../data/BP4D/AUCoding/AU_OCC"``, ``pd.read_csv(..., header=0, index_col=0,
  usecols=["0", "1", "2", "4", "6", "7", "10", "12", "14", "15", "17", "23", "24"])``), then one
  row per coded frame, 0/1 per AU, 9 = not coded; the LAST column is the occlusion flag
  (OpenFace model_training/AU_training/data extraction/extract_BP4D_labels.m: ``occlusions =
  OCC(2:end,end)``). Neither source shows how many AU columns the real files have: 1..27 plus
  the flag here. Frames (named by the CSV frame number, from 2440 as in ME-GraphAU's sample
  data/BP4D/img/F001/T1/2440.jpg):
    "me_graphau": ``img/F001/T1/2440.jpg`` (ME-GraphAU tool/README.md)
    "jaanet":     ``BP4D/F001/T1/2440.jpg`` (PyTorch-JAANet data/imgs/BP4D/F001/T1/2440.jpg);
                  read with image_root=<root>/BP4D
  Per subject: frame 2441 is occluded, frame 2442 has AU4 = 2 (a bad value), AU2 is 9 in every
  frame. Returns {"labels": {id: au_present}, "folds": {id: split}, "occluded": [ids],
  "bad": [(csv name, line)]}.
  """
  from feallm_jax.data import facs
  aus = list(range(1, 28))
  occ = os.path.join(root, "AUCoding", "AU_OCC")
  os.makedirs(occ, exist_ok=True)
  out: dict = {"labels": {}, "folds": {}, "occluded": [], "bad": []}
  for k, subj in enumerate(("F001", "M011", "F007")):
    rows = [["0"] + [str(a) for a in aus] + [str(len(aus) + 1)]]
    for i in range(frames):
      frame = 2440 + i
      vals = [(a + i + k) % 2 for a in aus]
      vals[aus.index(2)] = 9
      occluded = int(i == 1)
      if i == 2:
        vals[aus.index(4)] = 2
        out["bad"].append((f"{subj}_T1.csv", len(rows) + 1))
      rows.append([str(frame)] + [str(v) for v in vals] + [str(occluded)])
      sub = "img" if layout == "me_graphau" else "BP4D"
      write_image(os.path.join(root, sub, subj, "T1", f"{frame}.jpg"), "rgb",
                  seed=1000 + 10 * k + i, keep_ext=True)
      if i == 2:
        continue
      rid = f"{subj}_T1_{frame:04d}"
      pres = np.full(len(facs.ALL_AUS), -1, np.int32)
      for a, v in zip(aus, vals):
        if a in facs.BP4D_AUS and v != 9:
          pres[facs.au_index(a)] = v
      out["labels"][rid] = pres
      out["folds"][rid] = f"fold{k + 1}"
      if occluded:
        out["occluded"].append(rid)
    with open(os.path.join(occ, f"{subj}_T1.csv"), "w", newline="") as f:
      csv.writer(f).writerows(rows)
  return out


def make_disfa(root: str, *, frames: int = 3, bad: bool = True, malformed: bool = False) -> dict:
  """DISFA layout of the builder's instructions: ``ActionUnit_Labels/SN001/SN001_au<N>.txt``
  (``<frame>,<intensity>`` from frame 1, as released) and ``Images/SN001/<n>.png`` numbered from
  1 like the labels; SN001 fold1, SN013 fold2, SN003 fold3; AU intensities 0-5. The layouts of
  the extraction tools are in :func:`make_disfa_extraction`."""
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


# Background colour of the image that shows video frame v (1-based) in make_disfa_extraction:
# the test reads it back from the built record to know which video frame a record holds.
FRAME_COLORS = ((210, 40, 40), (40, 210, 40), (40, 40, 210), (210, 210, 40), (210, 40, 210),
                (40, 210, 210), (120, 120, 120))
DISFA_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)   # the 12 AUs of the DISFA release


def disfa_intensity(subj_k: int, frame: int, au: int) -> int:
  """The intensity make_disfa_extraction labels video frame ``frame`` of subject k with."""
  return (au + 2 * frame + subj_k) % 6


def make_disfa_extraction(root: str, layout: str, *, frames: int = 5,
                          subjects=("SN001", "SN013", "SN003")) -> dict:
  """DISFA labels as released plus frames extracted the way one tool writes them.

  Labels (every layout): ``ActionUnit_Labels/SN001/SN001_au<N>.txt``, one ``<frame>,<int>`` line
  per video frame, frames numbered from 1 (ME-GraphAU tool/DISFA_image_label_process.py reads
  them as ``frameIdx, AUIntensity = lines.split(',')`` and pairs line i with image i).
  Frames, by ``layout`` (image of video frame v has background FRAME_COLORS[v - 1]):
    "me_graphau": ``img/SN001/{v-1}.png`` from 0 (ME-GraphAU tool/README.md: "data/DISFA/img/
                  SN001/0.png"; tool/DISFA_image_label_process.py: ``str(i) + '.png'``, i from 0)
    "jaanet":     ``DISFA/SN001/{v-1}.jpg`` from 0, one frame missing (PyTorch-JAANet
                  data/list/DISFA_part1_path.txt: DISFA/SN002/0.jpg ... 798.jpg, 826.jpg: frames
                  without a usable face are absent); read with image_root=<root>/DISFA
    "libreface":  ``images/RightVideoSN001_comp/RightVideoSN001_comp_{v:04d}.png`` from 1, plus
                  one trailing frame past the labels (LibreFace extract_frames_DISFA.py:
                  ``ffmpeg -i {vpath} '{cur_v_path}/{cur_v_name}_%04d.png'``, ffmpeg's image2
                  numbering starts at 1; folder named after Videos_RightCamera/RightVideoSN001_comp.avi)
    "subsampled": ``Images/SN001/{v}.png`` for every 2nd frame only (2, 4, ...): no file says
                  where the numbering starts.
  Returns {"labels": {(subject, video frame): intensities [len(ALL_AUS)]}, "folds": {subject:
  fold split}, "missing": [(subject, video frame)] without an image}.
  """
  from feallm_jax.data import facs
  folds = {"SN001": "fold1", "SN013": "fold2", "SN003": "fold3"}
  out: dict = {"labels": {}, "folds": {s: folds[s] for s in subjects}, "missing": []}
  for k, subj in enumerate(subjects):
    lab = os.path.join(root, "ActionUnit_Labels", subj)
    os.makedirs(lab, exist_ok=True)
    for a in DISFA_AUS:
      with open(os.path.join(lab, f"{subj}_au{a}.txt"), "w") as f:
        f.write("".join(f"{v},{disfa_intensity(k, v, a)}\n" for v in range(1, frames + 1)))
    for v in range(1, frames + 1):
      it = np.full(len(facs.ALL_AUS), -1.0, np.float32)
      for a in DISFA_AUS:
        it[facs.au_index(a)] = disfa_intensity(k, v, a)
      out["labels"][(subj, v)] = it
    video = range(1, frames + 2) if layout == "libreface" else range(1, frames + 1)
    for v in video:
      bg = FRAME_COLORS[(v - 1) % len(FRAME_COLORS)]
      if layout == "me_graphau":
        path = os.path.join(root, "img", subj, f"{v - 1}.png")
      elif layout == "jaanet":
        if v == 3:
          out["missing"].append((subj, v))
          continue
        path = os.path.join(root, "DISFA", subj, f"{v - 1}.jpg")
      elif layout == "libreface":
        name = f"RightVideo{subj}_comp"
        path = os.path.join(root, "images", name, f"{name}_{v:04d}.png")
      elif layout == "subsampled":
        if v % 2:
          out["missing"].append((subj, v))
          continue
        path = os.path.join(root, "Images", subj, f"{v}.png")
      else:
        raise ValueError(layout)
      write_image(path, "rgb", seed=300 + v, keep_ext=True, bg=bg)
  return out


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


def make_llava_mix(root: str) -> dict:
  """LLaVA-1.5's instruction mix as its README lays it out: ``./playground/data`` holds
  ``llava_v1_5_mix665k.json`` and the image folders ``coco/train2017``, ``gqa/images``,
  ``ocr_vqa/images``, ``textvqa/train_images``, ``vg/VG_100K`` (haotian-liu/LLaVA README.md,
  "Visual Instruction Tuning"; scripts/v1_5/finetune.sh: ``--data_path
  ./playground/data/llava_v1_5_mix665k.json --image_folder ./playground/data``). Like the real
  file it holds text-only ShareGPT entries (no "image" key; LLaVA train.py
  ``LazySupervisedDataset``: ``if 'image' in sources[0]``), one conversation opening with a gpt
  turn (LLaVA ``preprocess_v1`` skips it), ``<image>`` after the question, and an id used twice.
  Pass ``root`` = playground/data. Returns {"train": {id: kind}} of what the build must keep,
  with the duplicate's new id."""
  def conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]
  entries = [
      {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": conv(
          ("human", "<image>\nWhat are the colors of the bus in the image?"),
          ("gpt", "The bus in the image is white and red."),
          ("human", "What feature can be seen on the back of the bus?"),
          ("gpt", "The back of the bus features an advertisement."))},
      {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": conv(
          ("human", "Is the sky dark?\nAnswer the question using a single word or phrase."
                    "\n<image>"), ("gpt", "Yes"))},
      {"id": "i6IyJda_0", "model": "", "conversations": conv(
          ("human", "How to tell if a customer segment is well segmented? In 3 bullet points."),
          ("gpt", "1. Homogeneity. 2. Distinctiveness. 3. Stability."))},
      {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": conv(
          ("human", "<image>\nWho is wearing the shirt?"), ("gpt", "The man"))},
      {"id": "wa12Kx3_4", "model": "", "conversations": conv(
          ("gpt", "Sure, here is the rest of the story."),
          ("human", "Continue the story in two sentences."),
          ("gpt", "The ship sailed on. Nobody looked back."))},
      {"id": "71789111", "image": "ocr_vqa/images/71789111.jpg", "conversations": conv(
          ("human", "<image>\nWho wrote this book?"), ("gpt", "Sandra Boynton"))},
      {"id": "0a0bc91825468c45", "image": "textvqa/train_images/0a0bc91825468c45.jpg",
       "conversations": conv(("human", "<image>\nWhat brand is this?"), ("gpt", "Sony"))},
      {"id": "1592343", "image": "vg/VG_100K/1592343.jpg", "conversations": conv(
          ("human", "<image>\nDescribe the region [0.1, 0.2, 0.5, 0.6]."),
          ("gpt", "A red umbrella."))},
  ]
  truth: dict = {"train": {}}
  seen: dict = {}
  for i, e in enumerate(entries):
    if "image" in e:
      write_image(os.path.join(root, e["image"]), "rgb", seed=700 + i, keep_ext=True)
    seen[e["id"]] = seen.get(e["id"], 0) + 1
    rid = e["id"] if seen[e["id"]] == 1 else f"{e['id']}#{seen[e['id']]}"
    truth["train"][rid] = "image" if "image" in e else "text"
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "llava_v1_5_mix665k.json"), "w") as f:
    json.dump(entries, f)
  return truth


# FABA-Instruct eval labels as EmoLA's emollava/eval/eval_FABA.py reads them: emotion labels are
# an int code or a name (``int(img_label)``, else ``emotions2num[img_label]``), AU labels a
# string split on ', ' (``AUint2Labels``).
FABA_EVAL_EMOTIONS = (("Happiness", "happiness"), (3, "anger"))
FABA_EVAL_AUS = ("1, 2, 4", "6, 12, 25")


def make_faba_release(data: str) -> dict:
  """FABA-Instruct as EmoLA ships it (JackYFL/EmoLA README.md "Downloading"): unzipped under
  ``data/``, ``FABAInstruct/{train,eval}/`` each with ``*_au_anno.json``,
  ``*_emotion_anno.json``, ``images/`` and ``landmarks/``; every path in the JSON is relative
  to ``data/`` ("image": "FABAInstruct/train/images/AffectNet/AffectNet_v2/1194/<sha>.jpg"; EmoLA
  scripts/train_emola/train_emola_au.sh trains with ``--image_folder ./data/``). Train entries
  have source/image/id/conversations/landmark (README's annotation demo, ``<image>`` after the
  question); eval entries have image/label/gpt4/landmark (emollava/eval/eval_FABA.py).
  Returns {split: {id: dict(kind, labels)}}."""
  truth: dict = {"train": {}, "test": {}}
  base = os.path.join(data, "FABAInstruct")
  n = 0
  for split_dir, split in (("train", "train"), ("eval", "test")):
    for task in ("au", "emotion"):
      entries = []
      for i in range(2):
        n += 1
        sha = f"{n:02d}" + "4dfc35e0be3712362e8795bf27fe332cbd809e08a19340d935d4ec"[:54]
        stem = f"AffectNet/AffectNet_v2/{1190 + n}/{sha}"
        img = f"FABAInstruct/{split_dir}/images/{stem}.jpg"
        write_image(os.path.join(data, img), "rgb", seed=800 + n, keep_ext=True)
        lm = f"FABAInstruct/{split_dir}/landmarks/{stem}.npy"
        os.makedirs(os.path.dirname(os.path.join(data, lm)), exist_ok=True)
        np.save(os.path.join(data, lm), np.zeros((68, 2), np.float32))
        if split == "train":
          q = ("In this face, what are the discernible action units?\n<image>" if task == "au"
               else "What is the emotion of this face?\n<image>")
          a = ("AU4 - Brow Lowerer: the eyebrows are drawn together." if task == "au"
               else "The person appears calm, a neutral expression.")
          entries.append({"source": "AffectNet", "image": img, "id": stem, "conversations": [
              {"from": "human", "value": q}, {"from": "gpt", "value": a}], "landmark": lm})
          truth[split][stem] = dict(kind="conversation", labels=None)
        else:
          label = (FABA_EVAL_AUS[i] if task == "au" else FABA_EVAL_EMOTIONS[i][0])
          entries.append({"image": img, "label": label, "gpt4": f"Reference answer {n}.",
                          "landmark": lm})
          want = (FABA_EVAL_AUS[i] if task == "au" else FABA_EVAL_EMOTIONS[i][1])
          truth[split][sha] = dict(kind=task, labels=want)   # no id: the image's name
      os.makedirs(os.path.join(base, split_dir), exist_ok=True)
      with open(os.path.join(base, split_dir, f"{split_dir}_{task}_anno.json"), "w") as f:
        json.dump(entries, f, indent=2)
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
