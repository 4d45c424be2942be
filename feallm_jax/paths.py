"""One path abstraction for everything a run reads or writes: ``etils.epath`` (what Orbax uses).

Local directories and ``gs://`` buckets then take the same code: checkpoints, ``metrics.jsonl``,
TensorBoard events, evaluation outputs and the base checkpoint. ``os.path.abspath`` must never see
a URL (it turns ``gs://b/run`` into ``<cwd>/gs:/b/run``): call :func:`resolve` instead. ``gs://``
needs the ``gcs`` extra (``pip install -e '.[gcs]'``: gcsfs, google-cloud-storage).
"""

from __future__ import annotations

import os

from etils import epath

try:
  import fsspec
except ImportError:  # pragma: no cover - gs:// needs the gcs extra, which brings fsspec
  fsspec = None
else:
  # gcsfs caches directory listings per process, but TensorStore (Orbax's array writes) and the
  # other hosts write behind its back: a cached listing could hide a new checkpoint step or
  # file. Every gs:// listing is made afresh (set before the first gs:// filesystem exists).
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (``gs://bucket/x``, ``s3://…``), False for a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path (``~`` expanded), or the URL unchanged (without a trailing ``/``)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(os.path.expanduser(path))


def path(p: str | os.PathLike) -> epath.Path:
  """``epath.Path`` of :func:`resolve` (``/``, ``open``, ``exists``, ``mkdir`` on any backend)."""
  return epath.Path(resolve(p))
