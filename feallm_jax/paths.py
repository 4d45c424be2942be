"""One path abstraction for everything a run reads or writes: ``etils.epath`` (what Orbax uses).

Local directories and ``gs://`` buckets then take the same code: checkpoints, ``metrics.jsonl``,
TensorBoard events, evaluation outputs, the base checkpoint and datasets' ``data_dir`` (tfds goes
through epath; ArrayRecord's writer is local-only, see ``data/builders``). ``os.path.abspath``
must never see a URL (it turns ``gs://b/run`` into ``<cwd>/gs:/b/run``): call :func:`resolve`
instead. ``gs://`` needs the ``gcs`` extra (``pip install -e '.[gcs]'``: gcsfs,
google-cloud-storage).
"""

from __future__ import annotations

import os
import shutil

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


def upload_tree(src: str | os.PathLike, dst: str | os.PathLike, *, first: tuple[str, ...] = (),
                last: tuple[str, ...] = ()) -> list[str]:
  """Copies the local folder ``src`` into ``dst`` (any backend) file by file, streamed.

  For what is rendered or built locally because the remote side cannot take it in place (no
  atomic folder rename; ArrayRecord's local-only writer). Files named in ``first`` go before the
  rest and those in ``last`` after it: the order in which a reader of ``dst`` recognises a
  complete folder. Returns the copied paths, relative to ``src``.
  """
  src, out = os.fspath(src), path(dst)
  rels = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs]

  def order(rel: str) -> tuple[int, str]:
    name = os.path.basename(rel)
    return (0 if name in first else 2 if name in last else 1, rel)

  rels.sort(key=order)
  for rel in rels:
    target = out.joinpath(*rel.split(os.sep))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(src, rel), "rb") as f, target.open("wb") as g:
      shutil.copyfileobj(f, g, 16 << 20)
  return rels
