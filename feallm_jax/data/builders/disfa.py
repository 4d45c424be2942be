"""DISFA (Mavadati et al., 2013): per-frame AU intensity 0-5; occurrence = intensity >= 2.

The labels number video frames from 1 (``SN001_au1.txt``: ``1,0`` is the first frame); the
frames users hold were extracted by some tool, and tools disagree on the first file's number:
ME-GraphAU (``tool/DISFA_image_label_process.py``: label line ``i`` <-> ``img/SN001/{i}.png``,
``i`` from 0) and PyTorch-JAANet (``data/list/DISFA_part1_path.txt``: ``DISFA/SN002/0.jpg``, ...)
start at 0; ffmpeg's image2 muxer, as LibreFace calls it (``extract_frames_DISFA.py``:
``<video>_%04d.png``), starts at 1. Pairing label frame ``f`` with file ``f`` on a 0-based
extraction puts every label on the next video frame, silently. So the numbering (``frame_base``:
the number of the file that holds the first video frame) is explicit, detected per subject when
left at ``auto`` and checked against the files when given; an ambiguous folder stops the build
naming the flag.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

import tensorflow_datasets as tfds

from feallm_jax.data.builders import common

log = logging.getLogger(__name__)

OCCURRENCE_THRESHOLD = 2   # the AU-detection convention (JAA-Net, ME-GraphAU)
FRAME_BASES = ("auto", "0", "1")
# Where each tool puts the per-subject frame folders, relative to the DISFA download.
FRAME_ROOTS = ("Images", "images", "img", "Img", "frames", "Frames")


class FrameBaseError(ValueError):
  """The frame files do not say (or contradict) whether they are numbered from 0 or 1."""


@dataclasses.dataclass
class DisfaConfig(tfds.core.BuilderConfig):
  detect_faces: bool = True
  frame_stride: int = 1
  # Number of the image file that holds the video's first frame (label frame 1): "0" for
  # ME-GraphAU / PyTorch-JAANet extractions, "1" for ffmpeg's default (LibreFace), "auto" to
  # detect it per subject (refused when the files do not tell). --frame_base on build_dataset.
  frame_base: str = "auto"
  # Older spelling, kept so existing override lists still work: image number = label frame +
  # offset, i.e. -1 = frame_base "0", 0 = frame_base "1". None: use frame_base.
  frame_offset: int | None = None
  # Which camera's folder to use when a subject has both (LeftVideoSN001_comp, RightVideo...).
  camera: str = "left"


class Disfa(common.FeaBuilder):
  """Splits fold1/fold2/fold3 = subject parts 1/2/3 of the JAA-Net / ME-GraphAU partition
  (common.DISFA_FOLDS). ME-GraphAU's *published* "fold k" tests on another part: read
  ``builders.PUBLISHED_FOLDS`` (splits ``test_fold1`` etc. are accepted by name)."""

  name = "disfa"
  BUILDER_CONFIGS = [
      DisfaConfig(name="frames", description="raw left-camera frames, face detected and cropped"),
      DisfaConfig(name="cropped", detect_faces=False, description="frames already face-cropped"),
  ]
  DESCRIPTION = "DISFA AU intensity (12 AUs), occurrence at intensity >= 2, 3 subject folds."
  HOMEPAGE = "http://mohammadmahoor.com/disfa/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request DISFA from http://mohammadmahoor.com/disfa/ and place in manual_dir:
  manual_dir/ActionUnit_Labels/SN001/SN001_au1.txt   lines '<frame>,<intensity 0-5>', frame from 1
  and the extracted frames, one folder per subject, in any of these layouts:
  manual_dir/img/SN001/0.png ...                     ME-GraphAU (numbered from 0)
  manual_dir/Images/SN001/1.png ...                  numbered from 1
  manual_dir/images/LeftVideoSN001_comp/LeftVideoSN001_comp_0001.png ...
                                                     ffmpeg '<video>_%04d.png' (LibreFace; from 1)
  <image_root>/SN001/0.jpg ...                       PyTorch-JAANet (from 0): --image_root
Frames are matched to labels by the trailing number of the file name. Whether that number
starts at 0 or 1 is detected per subject (a 0.* file, or as many files as labels from 1);
when the files do not tell, the build stops: pass --frame_base=0 or --frame_base=1.
"""

  def __init__(self, *args, image_root: str | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._image_root = image_root

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    lab_root = self._require(os.path.join(root, "ActionUnit_Labels"), "ActionUnit_Labels")
    img_root = common.frame_root(self, root, self._image_root, FRAME_ROOTS,
                                 "the extracted frame folders")
    base = configured_base(self.builder_config)
    by_fold: list[list] = [[], [], []]
    for subj in sorted(os.listdir(lab_root)):
      if not os.path.isdir(os.path.join(lab_root, subj)):
        continue
      k = common.fold_of(subj.upper(), common.DISFA_FOLDS)
      if k is None:
        self.skips.skip("all", "subject_not_in_folds", f"{subj}: not in any fold")
        continue
      labels = parse_subject(os.path.join(lab_root, subj), subj)
      folder = subject_folder(img_root, subj, self.builder_config.camera)
      if folder is None:
        self.skips.skip("all", "no_frame_folder",
                        f"{subj}: no frame folder for it under {img_root} "
                        f"({len(labels)} labelled frames left out)")
        continue
      frames = common.index_frames(folder)
      b, why = check_base(frames, labels, base, subj, folder)
      self.noted.add("all", f"frame_base_{b}", f"{subj}: {folder} numbered from {b} ({why})")
      by_fold[k].append((subj.upper(), labels, frames, b))
    return {f"fold{k + 1}": self._examples(f"fold{k + 1}", by_fold[k]) for k in range(3)}

  def _examples(self, split, subjects):
    cfg = self.builder_config

    def items():
      for subj, labels, frames, base in subjects:
        for rid, path, lab in pair_frames(subj, labels, frames, base, cfg.frame_stride):
          yield rid, (rid, subj, path, lab)

    def make(item):
      rid, subj, path, labels = item
      if path is None:
        raise common.SkipImage(f"{rid}: image file missing (no frame image)")
      image, _ = common.load_face(path, rid, detect=cfg.detect_faces)
      pres, inten = common.au_arrays(labels, present_threshold=OCCURRENCE_THRESHOLD)
      return common.make_record(rid, image, au_present=pres, au_intensity=inten, subject=subj)

    return self._guarded(split, items(), make)


def configured_base(cfg: DisfaConfig) -> int | None:
  """0 or 1 when the config names the numbering, None for auto."""
  if cfg.frame_offset is not None:
    if cfg.frame_offset not in (-1, 0):
      raise ValueError(f"disfa: frame_offset={cfg.frame_offset}: only -1 (files from 0) or 0 "
                       "(files from 1) are meaningful; set --frame_base=0 or --frame_base=1")
    by_offset = 1 + cfg.frame_offset
    if str(cfg.frame_base) not in ("auto", str(by_offset)):
      raise ValueError(f"disfa: frame_offset={cfg.frame_offset} contradicts "
                       f"frame_base={cfg.frame_base}; set only --frame_base")
    return by_offset
  fb = str(cfg.frame_base)
  if fb not in FRAME_BASES:
    raise ValueError(f"disfa: frame_base={cfg.frame_base!r}, expected one of {FRAME_BASES} "
                     "(--frame_base)")
  return None if fb == "auto" else int(fb)


def subject_folder(img_root: str, subj: str, camera: str = "left") -> str | None:
  """The subject's frame folder: ``SN001`` itself, else the one folder whose name contains
  the subject id (ffmpeg extractions are named after the video, ``LeftVideoSN001_comp``);
  with both cameras present, the one naming ``camera``."""
  names = [n for n in os.listdir(img_root) if os.path.isdir(os.path.join(img_root, n))]
  exact = [n for n in names if n.upper() == subj.upper()]
  if exact:
    return os.path.join(img_root, exact[0])
  hits = [n for n in names if re.search(rf"(?<!\d){re.escape(subj)}(?!\d)", n, re.I)]
  if len(hits) > 1:
    hits = [n for n in hits if camera.lower() in n.lower()] or hits
  if len(hits) > 1:
    raise ValueError(f"disfa: several frame folders for {subj} under {img_root}: {sorted(hits)}; "
                     "keep one, or set the builder config field camera='left'/'right'")
  return os.path.join(img_root, hits[0]) if hits else None


def detect_base(frames: dict[int, str], labels: dict[int, dict]) -> tuple[int | None, str]:
  """(0 or 1, why) from the file numbers, or (None, what was seen) when they do not tell.

  A file numbered 0 means a 0-based extraction (no tool writes a frame 0 from 1). Without
  one, files starting at 1 whose count matches the labelled frames (+- 1: a video may hold one
  frame more or less than its labels) are a 1-based extraction. Anything else (a subsampled or
  partial extraction, a first frame that was dropped) could be either.
  """
  if not frames:
    return None, "no numbered image files"
  nums = sorted(frames)
  if nums[0] == 0:
    return 0, "a file numbered 0 exists"
  if nums[0] == 1 and abs(len(nums) - len(labels)) <= 1:
    return 1, f"files run from 1, {len(nums)} files for {len(labels)} labelled frames"
  return None, (f"{len(nums)} files numbered {nums[0]}..{nums[-1]} for {len(labels)} labelled "
                f"frames {min(labels)}..{max(labels)}, no file numbered 0")


def check_base(frames: dict[int, str], labels: dict[int, dict], base: int | None, subj: str,
               folder: str) -> tuple[int, str]:
  """The numbering to use for one subject: detected when ``base`` is None, else ``base``
  after checking that the files do not contradict it. FrameBaseError names the flag."""
  found, why = detect_base(frames, labels)
  if base is None:
    if found is None:
      raise FrameBaseError(
          f"disfa: cannot tell whether the frames of {subj} in {folder} are numbered from 0 or "
          f"from 1 ({why}). Pass --frame_base=0 if the file numbered n shows label frame n+1 "
          "(ME-GraphAU, PyTorch-JAANet) or --frame_base=1 if it shows label frame n (ffmpeg "
          "'%04d' default, LibreFace).")
    return found, f"detected: {why}"
  nums = sorted(frames)
  if base == 1 and nums and nums[0] == 0:
    raise FrameBaseError(
        f"disfa: --frame_base=1 but {folder} holds a file numbered 0 ({os.path.basename(frames[0])})"
        f", so its frames are numbered from 0 and every label of {subj} would land on the next "
        "video frame. Use --frame_base=0 (or auto).")
  if base == 0 and nums and nums[0] > 0 and nums[-1] >= max(labels):
    raise FrameBaseError(
        f"disfa: --frame_base=0 but {folder} has no file numbered 0 and its files run "
        f"{nums[0]}..{nums[-1]}, up to the last labelled frame {max(labels)}: that is a 1-based "
        f"extraction, read from 0 every label of {subj} would land on the previous video frame. "
        "Use --frame_base=1 (or auto).")
  return base, "given" + (f" (files agree: {why})" if found == base else "")


def pair_frames(subj: str, labels: dict[int, dict], frames: dict[int, str], base: int,
                stride: int = 1):
  """(record id, image path or None, {AU: intensity}) per labelled frame: label frame f
  (1-based) is the file numbered ``f - 1 + base``. Ids name the label frame."""
  for n, frame in enumerate(sorted(labels)):
    if n % stride:
      continue
    yield f"{subj}_{frame:05d}", frames.get(frame - 1 + base), labels[frame]


def parse_subject(folder: str, subj: str) -> dict[int, dict[int, float]]:
  """{frame: {AU: intensity}} from every <subj>_au<N>.txt in folder."""
  out: dict[int, dict[int, float]] = {}
  files = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(".txt")]
  if not files:
    raise common.LabelFileError(folder, None, "no <subject>_au<N>.txt label files")
  for f in files:
    path = os.path.join(folder, f)
    m = re.fullmatch(rf"{re.escape(subj)}_au(\d+)\.txt", f, re.I)
    if not m:
      raise common.LabelFileError(path, None, f"name must be {subj}_au<N>.txt")
    au = int(m.group(1))
    with open(path, encoding="utf-8") as fh:
      for ln, line in enumerate(fh, 1):
        line = line.strip()
        if not line:
          continue
        parts = [p.strip() for p in line.split(",")]
        try:
          if len(parts) != 2:
            raise ValueError("expected '<frame>,<intensity>'")
          frame, val = int(parts[0]), float(parts[1])
          if not 0 <= val <= 5:
            raise ValueError(f"intensity {val} outside 0-5")
          if frame < 1:
            raise ValueError(f"frame {frame}: DISFA label frames are numbered from 1")
        except ValueError as e:
          raise common.LabelFileError(path, ln, f"{line!r}: {e}") from None
        out.setdefault(frame, {})[au] = val
  return out
