"""tfds builders for FEALLM data; every one yields the records of docs/interfaces.md.

`build()` is what launch/build_dataset.py and the tests call: it prepares one dataset as
ArrayRecord and returns a summary (examples per split, skipped examples by reason).

``data_dir`` may be a ``gs://`` URL. tfds reads and lists it through ``etils.epath`` (gcsfs when
TensorFlow is absent), and ArrayRecord's reader opens ``gs://`` shards with its own C++ GCS client
(riegeli's GcsReader: application default credentials; ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` for an
emulator). ArrayRecord's *writer* writes local files only, so a build for a bucket is prepared in
a local temporary directory and copied up (see ``_build_staged``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import tempfile
import time
from typing import Any

from feallm_jax import paths

# name -> (module, class); imported lazily so one dataset's dependencies never block another.
BUILDERS: dict[str, tuple[str, str]] = {
    "synthetic_fea": ("synthetic_fea", "SyntheticFea"),
    "raf_db": ("raf_db", "RafDb"),
    "affectnet": ("affectnet", "Affectnet"),
    "bp4d": ("bp4d", "Bp4d"),
    "disfa": ("disfa", "Disfa"),
    "llava_instruct": ("llava_instruct", "LlavaInstruct"),
}


# Keyword arguments a builder takes besides data_dir/config (launch/build_dataset.py flags).
BUILDER_KWARGS: dict[str, tuple[str, ...]] = {
    "disfa": ("image_root",),
    "bp4d": ("image_root",),
    "llava_instruct": ("image_root", "default_split", "detect_faces"),
}

# BP4D and DISFA splits: ``fold<k>`` holds subject *part* k (common.BP4D_FOLDS / DISFA_FOLDS,
# listed in the order of ME-GraphAU's tool/BP4D_image_label_process.py and
# tool/DISFA_image_label_process.py). Published tables (ME-GraphAU, JAA-Net) name a fold by the
# part it *tests* on: their fold1 trains on parts 1+2 and tests on part 3, fold2 tests on part 2,
# fold3 on part 1. These split names give that naming; ``part<k>`` is an alias of ``fold<k>``.
PUBLISHED_FOLDS: dict[int, int] = {1: 3, 2: 2, 3: 1}   # published fold -> the part it tests on
FOLD_DATASETS = ("bp4d", "disfa")


def split_aliases() -> dict[str, str]:
  """{alias: tfds split} for the fold datasets: test_fold<k>, train_fold<k>, part<k>."""
  out = {}
  for k, test in PUBLISHED_FOLDS.items():
    out[f"test_fold{k}"] = f"fold{test}"
    out[f"train_fold{k}"] = "+".join(f"fold{p}" for p in (1, 2, 3) if p != test)
    out[f"part{k}"] = f"fold{k}"
  return out


def resolve_split(name: str, split: str) -> str:
  """``split`` with the fold aliases of bp4d/disfa replaced (``test_fold1`` -> ``fold3``)."""
  if name.split("/")[0] not in FOLD_DATASETS:
    return split
  aliases = split_aliases()
  parts = []
  for p in split.split("+"):
    base, _, sl = p.partition("[")
    parts.append(aliases.get(base, base) + (f"[{sl}" if sl else ""))
  return "+".join(parts)


def builder_class(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
  mod, cls = BUILDERS[name]
  return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


def register_all() -> None:
  """Import every builder so tfds.builder(name) / tfds.data_source(name) find them."""
  for name in BUILDERS:
    builder_class(name)


def make_builder(name: str, data_dir: str, *, config: str | None = None,
                 overrides: dict[str, Any] | None = None,
                 **kwargs):
  """A builder; `overrides` replace fields of the named config (e.g. num_train=1000)."""
  cls = builder_class(name)
  unknown_kw = set(kwargs) - set(BUILDER_KWARGS.get(name, ()))
  if unknown_kw:
    takers = {k: sorted(n for n, ks in BUILDER_KWARGS.items() if k in ks) for k in unknown_kw}
    raise ValueError(f"{name} takes no {sorted(unknown_kw)} (" + "; ".join(
        f"--{k} applies to {', '.join(v) or 'no dataset'}" for k, v in sorted(takers.items()))
        + ")")
  cfg = None
  if getattr(cls, "BUILDER_CONFIGS", None):
    by_name = {c.name: c for c in cls.BUILDER_CONFIGS}
    cfg_name = config or cls.BUILDER_CONFIGS[0].name
    if cfg_name not in by_name:
      built = _built_custom(name, data_dir, cfg_name)
      if built is not None and not overrides:
        return built
      raise ValueError(f"{name}: unknown config {cfg_name!r}; known: {sorted(by_name)}")
    cfg = by_name[cfg_name]
    if overrides:
      fields = {f.name for f in dataclasses.fields(cfg)}
      unknown = set(overrides) - fields
      if unknown:
        raise ValueError(f"{name}/{cfg_name}: no config fields {sorted(unknown)}")
      # tfds refuses a changed config under a known name: the overrides go into the name,
      # e.g. default_num_train1000 (use it as config.data.builder_config).
      suffix = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
      cfg = dataclasses.replace(cfg, name=f"{cfg_name}_{suffix}", **overrides)
    else:
      # By name: a pickled data source (Grain workers) re-creates the builder from its
      # arguments, and tfds rejects a config *object* that merely equals a registered one.
      cfg = cfg_name
  elif config:
    raise ValueError(f"{name} has no builder configs (got config={config!r})")
  elif overrides:
    raise ValueError(f"{name} has no config fields to override ({sorted(overrides)})")
  return cls(data_dir=data_dir, config=cfg, **kwargs)


def _built_custom(name: str, data_dir: str, cfg_name: str):
  """A builder read back from disk for a config built earlier with overrides."""
  import tensorflow_datasets as tfds
  root = paths.path(data_dir) / name / cfg_name
  if not root.is_dir():
    return None
  versions = sorted(p.name for p in root.iterdir() if p.name[:1].isdigit())
  if not versions:
    return None
  builder_class(name)   # registers the features' module
  return tfds.builder_from_directory(root / versions[-1])


def _build_staged(name: str, target, dl, *, config, overrides, **kwargs):
  """Prepares a dataset for a remote ``data_dir`` whose version folder is ``target``.

  ArrayRecord's writer opens local files only (riegeli's FdWriter: a ``gs://`` path fails with
  "open() failed"), so tfds prepares it under a local temporary data_dir, removed afterwards, and
  the version folder is copied up through epath. ``dataset_info.json`` and ``features.json`` go
  last: tfds takes a folder as prepared once both exist, so no reader sees half a dataset, and a
  copy cut short is redone by the next build. Returns the local builder (its skip counts).
  """
  with tempfile.TemporaryDirectory(prefix="feallm_tfds_") as tmp:
    local = make_builder(name, tmp, config=config, overrides=overrides, **kwargs)
    local.download_and_prepare(download_config=dl)
    src = paths.path(local.data_dir)
    (src / "skipped.json").write_text(local.skips.to_json(noted=local.noted))
    if target.exists():     # an earlier copy cut short
      target.rmtree()
    paths.upload_tree(src, target, last=("features.json", "dataset_info.json"))
  return local


def build(name: str, data_dir: str, *, config: str | None = None, manual_dir: str | None = None,
          overrides: dict[str, Any] | None = None, overwrite: bool = False,
          **kwargs) -> dict[str, Any]:
  """Prepare one dataset; returns {name, config, path, splits: {split: n}, skipped, seconds}.

  ``skipped`` counts what was left out by split and reason (``skipped_first``: the first
  message of each, naming the file and line); ``noted`` counts what was kept but changed or
  noticed (text-only conversations, renamed duplicate ids, occluded frames, the detected
  DISFA frame numbering, ...). Both are also written next to the data as skipped.json, so a
  later reader can see what the build left out. ``kwargs`` go to the builder (e.g.
  ``image_root``, ``default_split``).
  """
  import tensorflow_datasets as tfds
  from feallm_jax import console
  console.setup_once()
  if manual_dir:
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  remote = paths.is_remote(data_dir)
  b = make_builder(name, data_dir, config=config, overrides=overrides,
                   **kwargs)
  dl = tfds.download.DownloadConfig(manual_dir=manual_dir)
  t0 = time.time()
  target = paths.path(b.data_dir)
  if overwrite and target.is_dir():
    target.rmtree()
    b = make_builder(name, data_dir, config=config, overrides=overrides,
                     **kwargs)
  # Locally tfds renames a finished folder into place; in a bucket a folder is there in part
  # while it is copied up, so there only a prepared one counts.
  existed = b.is_prepared() if remote else target.is_dir()
  if not existed and console.is_quiet():
    logging.getLogger(__name__).info("building %s/%s under %s", name,
                                     b.builder_config.name if b.builder_config else "", data_dir)
  report_path = target / "skipped.json"
  with console.quiet_tfds():
    if remote and not existed:
      local = _build_staged(name, target, dl, config=config, overrides=overrides, **kwargs)
      b = make_builder(name, data_dir, config=config, overrides=overrides, **kwargs)
      b.skips, b.noted = local.skips, local.noted
    else:
      b.download_and_prepare(download_config=dl)
  secs = time.time() - t0
  if not existed and not remote:
    report_path.write_text(b.skips.to_json(noted=b.noted))
  elif existed and report_path.exists():
    old = json.loads(report_path.read_text())
    b.skips.counts.update({(s, r): n for s, d in old["counts"].items() for r, n in d.items()})
    b.skips.first.update({(s, r): m for s, d in old.get("first", {}).items()
                          for r, m in d.items()})
    b.noted.counts.update({(s, r): n for s, d in old.get("noted", {}).items()
                           for r, n in d.items()})
    b.noted.first.update({(s, r): m for s, d in old.get("noted_first", {}).items()
                          for r, m in d.items()})
  return dict(
      name=name, config=b.builder_config.name if b.builder_config else None,
      data_dir=data_dir, path=b.data_dir, reused=existed,
      splits={s: int(info.num_examples) for s, info in b.info.splits.items()},
      skipped=b.skips.by_reason(), skipped_total=b.skips.total(),
      skipped_first=b.skips.first_by_reason(),
      noted=b.noted.by_reason(), noted_first=b.noted.first_by_reason(),
      seconds=round(secs, 2))
