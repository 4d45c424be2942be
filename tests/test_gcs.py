"""``gs://`` workdirs and datasets end to end, against a real GCS JSON API on this machine:
gcp-storage-emulator on 127.0.0.1 (no mock of the project's code). The synthetic dataset is built
into the bucket (--data_dir=gs://bucket/tfds), a tiny run trains from it with
--workdir=gs://bucket/run, is stopped by SIGTERM at step 1, resumes from the bucket, is evaluated
from the bucket (its own folder under eval/, indexed in eval/index.jsonl, metrics in the bucket's
metrics.jsonl), compared from the bucket's index, and nothing is written locally: neither in the
working directory nor left in the temporary directory (where a dataset is staged for the bucket).

How each client finds the emulator: gcsfs (behind etils.epath, so tfds too) and
google-cloud-storage (behind tensorboardX) read STORAGE_EMULATOR_HOST; TensorStore (Orbax's
array store) reads TENSORSTORE_GCS_HTTP_URL and takes GOOGLE_AUTH_TOKEN_FOR_TESTING as its bearer
token (the emulator ignores auth); ArrayRecord's C++ reader (google-cloud-cpp, behind riegeli's
GcsReader) reads CLOUD_STORAGE_EMULATOR_ENDPOINT. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
switches off gcsfs's gRPC bucket-type probe, which the emulator does not serve (it waits 60 s per
bucket otherwise).

Two gaps of the emulator are filled here, both by wrapping its download handler: real GCS answers
a media download with the object's ``x-goog-generation`` header, and TensorStore refuses a read
without it ("Malformed StorageGeneration": restoring a checkpoint written by another process
fails); and real GCS serves suffix ranges (``Range: bytes=-N``, the last N bytes), with which
ArrayRecord's reader fetches a shard's footer, where the emulator sends the whole object as 200.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from feallm_jax import paths  # noqa: F401  (before any gs:// use: no stale gcsfs listings)
from tests.cli_helpers import tiny_train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "feallm-test"
RUN = f"gs://{BUCKET}/run"
DATA = f"gs://{BUCKET}/tfds"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve_downloads_as_gcs(monkeypatch):
  """The emulator's media downloads carry x-goog-generation / x-goog-metageneration and honour
  suffix ranges (``bytes=-N``), as GCS's do."""
  from gcp_storage_emulator import server as emu_server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      obj = None
    headers = request._request_handler.headers          # an email.message.Message
    suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("range", "") or "")
    if obj is not None and suffix:
      start = max(0, int(obj["size"]) - int(suffix.group(1)))
      del headers["range"]
      headers["range"] = f"bytes={start}-"               # the form the emulator serves
    original(request, response, storage, *args, **kwargs)
    if obj is not None:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")

  monkeypatch.setattr(objects, "download", download)      # objects.get(alt=media) calls it
  for _, handlers in emu_server.HANDLERS:                 # the /download/... route holds it
    for method, fn in list(handlers.items()):
      if fn is original:
        monkeypatch.setitem(handlers, method, download)


class UploadGate:
  """Holds the emulator's answer to the upload that first leaves one object holding a marker,
  until released: the uploading process is then known to be inside that write (the trainer: in
  its step-1 log call, SIGTERM handler installed, step 2 not begun) for as long as the test
  needs. The emulator serves one request at a time, so nothing else is answered meanwhile.
  (gcsfs writes even a small object as a resumable upload: a POST that opens the session, a
  PUT that carries the bytes; both handlers are wrapped.)"""

  def __init__(self, monkeypatch, bucket: str, name: str, marker: bytes):
    from gcp_storage_emulator import server as emu_server
    from gcp_storage_emulator.handlers import objects
    self.bucket, self.name, self.marker = bucket, name, marker
    self.seen, self.release = threading.Event(), threading.Event()
    for original in (objects.insert, objects.upload_partial):
      held = self._holding(original)
      for _, handlers in emu_server.HANDLERS:
        for method, fn in list(handlers.items()):
          if fn is original:
            monkeypatch.setitem(handlers, method, held)

  def _holding(self, original):
    def handler(request, response, storage, *args, **kwargs):
      out = original(request, response, storage, *args, **kwargs)
      if not self.seen.is_set() and self.marker in self._content(storage):
        self.seen.set()
        self.release.wait(timeout=900)
      return out
    return handler

  def _content(self, storage) -> bytes:
    from gcp_storage_emulator.exceptions import NotFound
    try:
      data = storage.get_file(self.bucket, self.name)
    except NotFound:
      return b""
    return data if isinstance(data, bytes) else data.encode()


@pytest.fixture
def gcs(monkeypatch):
  """The emulator (in memory, one bucket) and the environment that points every client at it."""
  from gcp_storage_emulator.server import create_server
  _serve_downloads_as_gcs(monkeypatch)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = dict(STORAGE_EMULATOR_HOST=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
             TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
             CLOUD_STORAGE_EMULATOR_ENDPOINT=url, GOOGLE_CLOUD_PROJECT="test")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  # fsspec caches filesystems per process, each bound to the emulator it was made for.
  # And whatever another test of this worker registered for gs:// (a fake) must not serve it.
  import fsspec
  import gcsfs
  from etils.epath import backend
  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, gcsfs.GCSFileSystem, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    yield env
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


def _train(data_dir, steps):
  return [sys.executable, "-m", "launch.train", f"--workdir={RUN}", *tiny_train_flags(data_dir),
          f"--config.train.num_steps={steps}", "--config.train.log_every=1",
          "--config.train.save_every=100", "--config.train.progress=False",
          "--config.eval.suites=()"]


def _bucket_steps(path):
  """Metric steps in a metrics.jsonl in the bucket (read through the project's own reader)."""
  from feallm_jax.train import metrics_log
  try:
    return [r["step"] for r in metrics_log.read(path)]
  except FileNotFoundError:
    return []


def _files_under(folder) -> list[str]:
  """Every file below ``folder``. (Empty ``tmp*tfds`` folders may stay behind in a temporary
  directory: tfds' DatasetInfo.initialize_from_bucket makes one per builder of an unprepared
  dataset, for a local build too, and never removes it.)"""
  return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


def _same_tree(a, b):
  import jax
  import numpy as np
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_gs_data_dir_builds_in_the_bucket_and_reads_from_it(gcs, tmp_path, monkeypatch):
  """builders.build with data_dir=gs://… stages the ArrayRecord build locally (its writer cannot
  write gs://), copies it up and removes the staging folder; the Grain pipeline then reads the
  bucket through tfds and ArrayRecord's own GCS reader, record for record and batch for batch
  what a local build gives."""
  import tempfile
  from etils import epath
  from feallm_jax.data import builders, pipeline
  from tests.test_train_step import small_config
  staging = tmp_path / "tmp"
  staging.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(staging))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  local_dir = str(tmp_path / "local")
  local = builders.build("synthetic_fea", local_dir, config="small")
  remote = builders.build("synthetic_fea", DATA, config="small")
  assert not remote["reused"] and remote["path"] == f"{DATA}/synthetic_fea/small/1.0.0"
  assert remote["splits"] == local["splits"] == {"train": 96, "validation": 16, "test": 32}
  assert remote["skipped"] == local["skipped"] and remote["noted"] == local["noted"]
  lroot, rroot = epath.Path(local["path"]), epath.Path(remote["path"])
  names = sorted(p.name for p in lroot.iterdir())
  assert sorted(p.name for p in rroot.iterdir()) == names and "skipped.json" in names
  shards = [n for n in names if ".array_record-" in n]
  assert len(shards) == 3
  for n in shards:                                  # the same bytes went up
    assert (rroot / n).read_bytes() == (lroot / n).read_bytes()
  assert _files_under(staging) == []                # the staging folder is gone
  assert not any(n.startswith("feallm_tfds_") for n in os.listdir(staging))
  again = builders.build("synthetic_fea", DATA, config="small")
  assert again["reused"] and again["splits"] == remote["splits"]
  assert again["skipped"] == remote["skipped"]      # read back from the bucket's skipped.json

  lc, rc = small_config(local_dir), small_config(DATA)
  for split in ("validation", "train"):
    ls = pipeline.data_source(lc, split=split, decode_images=False)
    rs = pipeline.data_source(rc, split=split, decode_images=False)
    assert len(rs) == len(ls) == local["splits"][split]
    for i in range(len(ls)):
      _same_tree(rs[i], ls[i])
  _same_tree(next(pipeline.train_iterator(rc)), next(pipeline.train_iterator(lc)))
  assert os.listdir(cwd) == [] and _files_under(staging) == []


@pytest.mark.slow
def test_gs_workdir_train_preempt_resume_evaluate(gcs, tmp_path, monkeypatch):
  from etils import epath
  cwd = tmp_path / "cwd"          # the processes' working directory: must stay empty
  cwd.mkdir()
  tmp = tmp_path / "tmp"          # their temporary directory: must be empty again at the end
  tmp.mkdir()
  env = dict(os.environ, **gcs, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TMPDIR=str(tmp),
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  steps = 6

  # 0. Build the dataset into the bucket (staged in TMPDIR, copied up); its length report reads
  # the bucket back.
  out = subprocess.run([sys.executable, "-m", "launch.build_dataset", "--dataset=synthetic_fea",
                        "--config=small", f"--data_dir={DATA}", "--train_config="
                        + os.path.join(ROOT, "configs", "tiny_synthetic.py"),
                        "--train_config.data.max_len=96"],
                       cwd=cwd, env=env, capture_output=True, timeout=1800)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
  assert not summary["reused"] and summary["path"] == f"{DATA}/synthetic_fea/small/1.0.0"
  assert summary["splits"] == {"train": 96, "validation": 16, "test": 32}
  assert summary["lengths"]["train"]["examples"] == 96

  # 1. Train from the bucket into the bucket. The emulator holds its answer to the first upload
  # of a train record to metrics.jsonl (the step-1 log call): SIGTERM arrives while the trainer
  # is inside step 1, whatever the machine's speed, so it saves at step 1 and exits.
  gate = UploadGate(monkeypatch, BUCKET, "run/metrics.jsonl", b'"kind": "train"')
  log = tmp_path / "train1.log"          # a file, not a pipe: nothing can block on it
  with open(log, "wb") as f:
    proc = subprocess.Popen(_train(DATA, steps), cwd=cwd, env=env, stdout=f, stderr=f)
  deadline = time.time() + 1800            # generous: a loaded 2-core machine starts jax slowly
  try:
    while not gate.seen.wait(timeout=1):
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
    proc.send_signal(signal.SIGTERM)
  finally:
    gate.release.set()
  proc.wait(timeout=900)
  err = log.read_text()
  assert proc.returncode == 0, err[-4000:]
  assert "preempted: checkpoint saved at step 1" in err, err[-4000:]
  ckpts = epath.Path(RUN) / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1]
  assert _bucket_steps(RUN) == [1]

  # 2. The same command resumes from the bucket at step 1 and finishes: every step logged once
  # (a restart from scratch would log step 1 twice).
  out = subprocess.run(_train(DATA, steps), cwd=cwd, env=env, capture_output=True, timeout=1800)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  assert _bucket_steps(RUN) == list(range(1, steps + 1))
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert saved == [1, steps]              # train.keep=2
  assert any(p.name.startswith("events.out.tfevents") for p in (epath.Path(RUN) / "tb").iterdir())

  # 3. Evaluate the bucket's checkpoint; outputs land in the bucket.
  out = subprocess.run([sys.executable, "-m", "launch.eval_feabench", f"--workdir={RUN}",
                        *tiny_train_flags(DATA), "--config.eval.num_samples=2",
                        "--config.eval.max_new_tokens=4", "--suites=synthetic_fea",
                        "--mode=generate", "--noprogress"],
                       cwd=cwd, env=env, capture_output=True, timeout=1800)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  from feallm_jax.eval import store
  from feallm_jax.train import metrics_log
  (entry,) = store.read_index(RUN)                  # eval/index.jsonl in the bucket
  assert entry["step"] == steps and entry["mode"] == "generate"
  assert entry["path"].startswith(f"step_{steps}_generate_synthetic_fea_n2_"), entry["path"]
  evaluated = epath.Path(RUN) / "eval" / entry["path"]
  results = json.loads((evaluated / "results.json").read_text())
  assert results["meta"]["step"] == steps and results["meta"]["workdir"] == RUN
  assert results["meta"]["key"] == entry["key"] and entry["path"].endswith(entry["key"])
  assert set(results["suites"]["synthetic_fea"]["summary"]) == {"fer", "aur", "joint", "reasoning"}
  names = {p.name for p in evaluated.iterdir()}
  assert {"results.md", "predictions_synthetic_fea.jsonl"} <= names
  png = next(p for p in evaluated.iterdir() if p.name.endswith(".png"))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not any(p.name.startswith(".") for p in (epath.Path(RUN) / "eval").iterdir())
  # The headline metrics went to the bucket's metrics.jsonl, after the training records.
  evals = metrics_log.read(RUN, kind="eval/generate")
  assert [r["step"] for r in evals] == [steps]
  assert evals[0]["synthetic_fea/fer/num_samples"] == entry["metrics"]["synthetic_fea/fer/num_samples"] == 2

  # 4. Compare the run from the bucket's index, writing the comparison into the bucket.
  out = subprocess.run([sys.executable, "-m", "launch.compare_runs", f"--workdirs={RUN}",
                        f"--out=gs://{BUCKET}/cmp/compare.md"],
                       cwd=cwd, env=env, capture_output=True, timeout=900)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  cmp_dir = epath.Path(f"gs://{BUCKET}/cmp")
  assert {p.name for p in cmp_dir.iterdir()} == {"compare.md", "compare_steps.png",
                                                 "compare_scaling.png", "compare.json"}
  assert "run" in (cmp_dir / "compare.md").read_text()

  # Nothing was written locally: no 'gs:' directory or any other file in the working directory,
  # nothing left in the temporary directory.
  assert sorted(os.listdir(cwd)) == []
  assert _files_under(tmp) == []
