"""``gs://`` workdirs end to end, against a real GCS JSON API on this machine: gcp-storage-emulator
on 127.0.0.1 (no mock of the project's code). A tiny run trains with --workdir=gs://bucket/run,
is stopped by SIGTERM, resumes from the bucket, is evaluated from the bucket (its own folder
under eval/, indexed in eval/index.jsonl, metrics in the bucket's metrics.jsonl), compared from
the bucket's index, and nothing is written to the local working directory.

How each client finds the emulator: gcsfs (behind etils.epath) and google-cloud-storage (behind
tensorboardX) read STORAGE_EMULATOR_HOST; TensorStore (Orbax's array store) reads
TENSORSTORE_GCS_HTTP_URL and takes GOOGLE_AUTH_TOKEN_FOR_TESTING as its bearer token (the
emulator ignores auth). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false switches off gcsfs's gRPC
bucket-type probe, which the emulator does not serve (it waits 60 s per bucket otherwise).

One gap of the emulator is filled here: real GCS answers a media download with the object's
``x-goog-generation`` header, and TensorStore refuses a read without it ("Malformed
StorageGeneration": restoring a checkpoint written by another process fails), so the emulator's
download handler is wrapped to send it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from feallm_jax import paths  # noqa: F401  (before any gs:// use: no stale gcsfs listings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "feallm-test"
RUN = f"gs://{BUCKET}/run"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve_generation_headers(monkeypatch):
  """The emulator's media downloads carry x-goog-generation / x-goog-metageneration, as GCS's."""
  from gcp_storage_emulator import server as emu_server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")

  monkeypatch.setattr(objects, "download", download)      # objects.get(alt=media) calls it
  for _, handlers in emu_server.HANDLERS:                 # the /download/... route holds it
    for method, fn in list(handlers.items()):
      if fn is original:
        monkeypatch.setitem(handlers, method, download)


@pytest.fixture
def gcs(monkeypatch):
  """The emulator (in memory, one bucket) and the environment that points every client at it."""
  from gcp_storage_emulator.server import create_server
  _serve_generation_headers(monkeypatch)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = dict(STORAGE_EMULATOR_HOST=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
             TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
             GOOGLE_CLOUD_PROJECT="test")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  try:
    yield env
  finally:
    server.stop()


def _args(data_dir):
  return ["--config=" + os.path.join(ROOT, "configs", "tiny_synthetic.py"),
          f"--config.data.data_dir={data_dir}", "--config.data.builder_config=small",
          "--config.data.batch_size=8", "--config.data.augment=False",
          "--config.data.max_len=96", "--config.model.base_checkpoint=",
          "--config.model.vision.hidden_size=64", "--config.model.vision.intermediate_size=128",
          "--config.model.vision.num_layers=2", "--config.model.vision.num_heads=2",
          "--config.model.llm.hidden_size=64", "--config.model.llm.intermediate_size=128",
          "--config.model.llm.num_layers=2", "--config.model.llm.num_heads=2",
          "--config.model.llm.num_kv_heads=1", "--config.model.llm.head_dim=32",
          "--config.model.multi_layers=(1,2)", "--config.model.projector=mlp",
          "--config.model.local_clues=False", "--config.model.lora.dropout=0.0"]


def _train(data_dir, steps):
  return [sys.executable, "-m", "launch.train", f"--workdir={RUN}", *_args(data_dir),
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


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=('racy under the parallel suite: the SIGTERM waits for bucket '
                           'metrics seen only after the run ended (issue 16 open)'))
def test_gs_workdir_train_preempt_resume_evaluate(gcs, tmp_path):
  from etils import epath
  cwd = tmp_path / "cwd"          # the processes' working directory: must stay empty
  cwd.mkdir()
  data = str(tmp_path / "data")   # datasets stay local (ArrayRecord readers need local files)
  env = dict(os.environ, **gcs, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  # Enough steps that SIGTERM lands mid-run however fast the machine is (on an idle one all of
  # 16 steps finished before the test saw the first metrics in the bucket).
  steps = 200

  # 1. Train; SIGTERM once the first metrics reach the bucket.
  proc = subprocess.Popen(_train(data, steps), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 1800   # generous: a loaded 2-core machine starts jax slowly
  while time.time() < deadline and proc.poll() is None and not _bucket_steps(RUN):
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err.decode()[-4000:]
  ckpts = epath.Path(RUN) / "checkpoints"
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert saved and 1 <= saved[-1] < steps, f"run was not interrupted mid-way: {saved}"

  # 2. The same command resumes from the bucket and finishes.
  out = subprocess.run(_train(data, steps), cwd=cwd, env=env, capture_output=True, timeout=1800)
  assert out.returncode == 0, out.stderr.decode()[-4000:]
  assert sorted(set(_bucket_steps(RUN))) == list(range(1, steps + 1))
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert saved[-1] == steps
  assert any(p.name.startswith("events.out.tfevents") for p in (epath.Path(RUN) / "tb").iterdir())

  # 3. Evaluate the bucket's checkpoint; outputs land in the bucket.
  out = subprocess.run([sys.executable, "-m", "launch.eval_feabench", f"--workdir={RUN}",
                        *_args(data), "--config.eval.num_samples=2",
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

  # Nothing was written locally: no 'gs:' directory or any other file in the working directory.
  assert sorted(os.listdir(cwd)) == []
