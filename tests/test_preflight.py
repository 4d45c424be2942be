"""Pre-flight: every check that can run before the first step does, and names the flag to change.

One test per check (suite names, suite datasets, training data, checkpoint vs config, tokenizer
vs vocab, mesh vs devices, batch vs processes / accumulation / shards, model spec, workdir,
``data.max_len`` vs the longest conversation with its visual tokens), then the whole thing
through ``train_and_evaluate`` and ``launch/train.py``: refused in seconds, before a model is
built or a file is written. (The max_len refusal through ``launch/train.py``, exit code 2 and
no traceback, is ``test_unfit.test_train_cli_refuses_naming_the_flag``.)
"""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import hf_fixtures as fx
import jax
import numpy as np
import pytest

import configs.tiny_synthetic as tiny
from feallm_jax import preflight
from feallm_jax.data import pipeline
from feallm_jax.eval import feabench
from feallm_jax.models import feallm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import import_hf  # noqa: E402


def _config(tmp_path, **data):
  c = tiny.get_config()
  c.model.base_checkpoint = ""
  c.model.init_adapter = ""
  c.data.update(data_dir=str(tmp_path / "data"), builder_config="small", batch_size=8,
                **data)
  c.eval.suites = ("synthetic_fea",)
  return c


def _problems(fn, *args, **kwargs) -> str:
  with pytest.raises(preflight.PreflightError) as e:
    fn(*args, **kwargs)
  return str(e.value)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A real HF CLIPVisionModel dir: 32 px, patch 8 (a 4x4 grid), 3 layers, width 32."""
  return fx.clip_vision_dir(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, clip_dir):
  """import_hf's base checkpoint of that CLIP and a tiny LLaMA with its own tokenizer."""
  llama = fx.llama_dir(str(tmp_path_factory.mktemp("llama")))
  fx.tokenizer_dir(llama)
  out = str(tmp_path_factory.mktemp("base") / "base")
  import_hf.import_hf(clip_dir, llama, out)
  return out


# -- suites --------------------------------------------------------------------------------------

def test_unknown_suite_is_named_with_the_flag(tmp_path):
  c = _config(tmp_path)
  c.eval.suites = ("synthetic_fea", "affectnet")
  msg = _problems(preflight.run, c)
  assert "unknown suite 'affectnet'" in msg and "affectnet_7" in msg and "affectnet_8" in msg
  assert "--config.eval.suites" in msg
  # Not evaluating at all: suite names do not matter.
  c.train.final_eval = False
  assert not preflight.check_suites(c, ()) and not preflight.evaluates(c)


def test_eval_matmul_dtype_is_checked_before_the_model_loads(tmp_path):
  c = _config(tmp_path)
  assert not preflight.check_eval_settings(c)          # the shipped "float32"
  c.eval.matmul_dtype = "bfloat16"
  assert not preflight.check_eval_settings(c)
  c.eval.matmul_dtype = "float16"
  msg = _problems(preflight.run, c)
  assert "eval.matmul_dtype='float16'" in msg and "--config.eval.matmul_dtype" in msg
  with pytest.raises(preflight.PreflightError, match="--config.eval.matmul_dtype"):
    feabench.evaluate(c, str(tmp_path / "no_run"))     # refused before any restore


def test_every_shipped_config_names_known_suites():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if "eval" not in c:
      continue
    unknown = [s for s in c.eval.get("suites", ()) if s not in feabench.SUITES]
    assert not unknown, f"{os.path.basename(path)}: unknown eval suites {unknown}"


def test_suite_whose_dataset_is_not_built(tmp_path):
  c = _config(tmp_path)
  c.eval.suites = ("raf_db", "affectnet_7")
  probs = preflight.check_suites(c)
  text = "\n".join(map(str, probs))
  assert len(probs) == 2
  assert "suite raf_db: dataset raf_db is not built" in text
  assert "--dataset=raf_db" in text and "--config.data.data_dir" in text
  assert "affectnet/7class" in text and "--config=7class" in text
  # eval_feabench's --suites flag is named when the suites came from it.
  with pytest.raises(preflight.PreflightError, match="--suites"):
    feabench.evaluate(c, str(tmp_path / "run"), suites="raf_db")


def test_training_dataset_not_built(tmp_path):
  c = _config(tmp_path)
  c.data.dataset = "raf_db"
  c.data.builder_config = ""
  probs = preflight.check_train_data(c)
  assert len(probs) == 1 and "data.dataset='raf_db'" in str(probs[0])
  assert "launch/build_dataset.py --dataset=raf_db" in str(probs[0])
  c.data.dataset = "rafdb"
  assert "unknown dataset 'rafdb'" in str(preflight.check_train_data(c)[0])


# -- checkpoint vs config ------------------------------------------------------------------------

def test_checkpoint_conflict_names_both_values(tmp_path, clip_dir):
  c = _config(tmp_path)
  c.model.vision.update(hf_path=clip_dir, image_size=64, patch_size=8, hidden_size=32,
                        intermediate_size=64, num_layers=3, num_heads=4)
  msg = _problems(preflight.resolve_backbones, c)
  assert "model.vision.image_size=64" in msg and "has 32" in msg and clip_dir in msg
  assert "--config.model.vision.image_size=32" in msg
  assert "patch_size" not in msg     # agreeing fields are not reported


def test_checkpoint_decides_image_size_patch_grid_and_lengths(tmp_path, clip_dir, base_dir):
  for source in ("hf", "base"):
    c = _config(tmp_path)
    c.model.multi_layers, c.model.projector_heads = (1, 2), 4
    for k in preflight.VISION_KEYS:
      c.model.vision[k] = "" if isinstance(c.model.vision[k], str) else 0
    if source == "hf":
      c.model.vision.hf_path = clip_dir
    else:
      c.model.base_checkpoint = base_dir
      for k in preflight.LLM_KEYS:
        if k not in ("model_type", "tie_word_embeddings"):
          c.model.llm[k] = 0
    before = c.to_dict()
    r = preflight.resolve_backbones(c)
    assert c.to_dict() == before                         # the caller's config is untouched
    assert (r.model.vision.image_size, r.model.vision.patch_size) == (32, 8)
    assert r.model.vision.hidden_size == 32 and r.model.vision.num_layers == 3
    # The pipeline, the batch signature and the model spec all follow the checkpoint.
    views = pipeline.eval_views(r, np.full((50, 40, 3), 100, np.uint8))
    assert views["image"].shape == (32, 32, 3)
    assert pipeline.batch_signature(r, 2)["image"][0] == (2, 32, 32, 3)
    if source == "base":
      assert r.model.llm.vocab_size == fx.LLAMA["vocab_size"] and r.model.llm.num_layers == 2
      assert r.model.llm.max_position_embeddings == fx.LLAMA["max_position_embeddings"]
      r.data.tokenizer = os.path.join(base_dir, "tokenizer")
      spec = feallm.spec_from_config(r)
      assert spec.vision.num_patches == 16 and spec.num_visual_tokens == 17
      assert "4x4 grid): 17 visual tokens" in preflight.describe_towers(r)
    assert preflight.resolve_backbones(r).to_dict() == r.to_dict()   # idempotent


def test_missing_checkpoint_is_named(tmp_path):
  c = _config(tmp_path)
  c.model.base_checkpoint = str(tmp_path / "nope")
  msg = _problems(preflight.resolve_backbones, c)
  assert "no meta.json" in msg and "--config.model.base_checkpoint" in msg


# -- tokenizer vs vocab ----------------------------------------------------------------------------

def test_tokenizer_larger_than_the_embedding_table(tmp_path):
  tok = fx.tokenizer_dir(str(tmp_path / "tok"), vocab_size=96)
  c = _config(tmp_path, tokenizer=tok)
  c.model.llm.vocab_size = 64
  msg = "\n".join(map(str, preflight.check_tokenizer(c)))
  assert "96 text tokens" in msg and "model.llm.vocab_size=64" in msg
  assert "--config.data.tokenizer" in msg
  c.model.llm.vocab_size = 96
  assert preflight.check_tokenizer(c) == []
  c.data.tokenizer = str(tmp_path / "missing")
  assert "does not exist" in str(preflight.check_tokenizer(c)[0])


def test_tokenizer_differs_from_the_base_checkpoints(tmp_path, base_dir):
  c = _config(tmp_path)            # data.tokenizer '' = the tiny shipped one
  c.model.base_checkpoint = base_dir
  r = preflight.resolve_backbones(c, [])
  msg = "\n".join(map(str, preflight.check_tokenizer(r)))
  assert "differently from the tokenizer the base LLM was trained with" in msg
  assert f"--config.data.tokenizer={os.path.join(base_dir, 'tokenizer')}" in msg
  r.data.tokenizer = os.path.join(base_dir, "tokenizer")
  assert preflight.check_tokenizer(r) == []


# -- mesh and batch --------------------------------------------------------------------------------

def test_mesh_vs_device_count(tmp_path, devices):
  c = _config(tmp_path)
  c.mesh.update(data=3, fsdp=1, tensor=1)
  msg = "\n".join(map(str, preflight.check_mesh_and_batch(c)))
  assert "needs 3 devices, but 8 are available" in msg
  assert "--config.mesh.data" in msg and "product of 8" in msg


def test_batch_vs_processes_accumulation_and_shards(tmp_path, devices, monkeypatch):
  c = _config(tmp_path)
  c.mesh.update(data=-1, fsdp=1, tensor=1)          # 8 batch shards
  assert preflight.check_mesh_and_batch(c) == []   # 8 rows over 8 shards
  c.data.batch_size = 12
  msg = str(preflight.check_mesh_and_batch(c)[0])
  assert "micro-batches of 12 rows" in msg and "8 batch shards" in msg
  assert "--config.data.batch_size=<a multiple of 8>" in msg
  c.data.batch_size, c.optim.accum_steps = 16, 3
  msg = str(preflight.check_mesh_and_batch(c)[0])
  assert "optim.accum_steps=3" in msg and "--config.optim.accum_steps" in msg
  c.optim.accum_steps = 1
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  msg = "\n".join(map(str, preflight.check_mesh_and_batch(c)))
  assert "data.batch_size=16 does not split over 3 processes" in msg
  assert "eval batch 64 does not split over 3 processes" in msg


# -- model spec and workdir -----------------------------------------------------------------------

def test_model_spec_checked_on_the_resolved_towers(tmp_path):
  c = _config(tmp_path)
  c.model.feature_layer = -9      # the tiny ViT has 4 hidden states
  probs = preflight.check_model_spec(c)
  assert len(probs) == 1 and "model.feature_layer=-9" in str(probs[0])
  assert "--config.model.feature_layer" in str(probs[0])


def test_workdir_that_cannot_be_written(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  msg = str(preflight.check_workdir_writable(str(blocker / "run"))[0])
  assert "cannot be created" in msg and "--workdir" in msg
  assert "is a file" in str(preflight.check_workdir_writable(str(blocker))[0])
  assert preflight.check_workdir_writable(str(tmp_path / "new" / "run")) == []
  assert preflight.check_workdir_writable(str(tmp_path)) == []


# -- max_len vs the conversations ------------------------------------------------------------------

def test_max_len_vs_the_longest_conversation_with_its_visual_tokens(tmp_path, devices):
  """max_len=10 (text tokens; the towers' 17 visual tokens come on top) leaves no answer token
  in any tiny synthetic conversation: every example the run would draw drops. Refused by
  pre-flight (a Problem naming the flag and the length that fits), through
  ``train_and_evaluate`` before a model is built or the workdir written; the named length
  really keeps them."""
  from feallm_jax.train import train_and_evaluate
  c = _config(tmp_path, max_len=10)
  workdir = tmp_path / "run"
  msg = _problems(train_and_evaluate, c, str(workdir))
  assert "pre-flight found 1 problem" in msg and "[max_len]" in msg, msg
  assert "would be dropped" in msg and "empty_answer" in msg
  need = int(re.search(r"fix: --config\.data\.max_len=(\d+) \(it is 10", msg).group(1))
  assert need > 10 and not workdir.exists()
  c.data.max_len = need
  assert preflight.check_data_fit(preflight.resolve_backbones(c)) == []
  c.data.max_len = need - 1
  assert pipeline.fit_check(c).dropped > 0


# -- the whole pre-flight, where a user meets it ----------------------------------------------------

def test_train_and_evaluate_refuses_in_seconds_listing_every_problem(tmp_path, clip_dir,
                                                                     devices):
  from feallm_jax.train import train_and_evaluate
  c = _config(tmp_path)
  c.eval.suites = ("affectnet",)
  c.model.vision.update(hf_path=clip_dir, image_size=64)
  c.mesh.update(data=3, fsdp=1, tensor=1)
  workdir = tmp_path / "run"
  t0 = time.perf_counter()
  msg = _problems(train_and_evaluate, c, str(workdir))
  assert time.perf_counter() - t0 < 60
  for part in ("unknown suite 'affectnet'", "model.vision.image_size=64", "needs 3 devices"):
    assert part in msg
  assert not workdir.exists()          # nothing built, nothing written


def test_good_config_passes_and_returns_the_resolved_copy(tmp_path, devices):
  c = _config(tmp_path)
  r = preflight.run(c, str(tmp_path / "run"))
  assert r is not c and r.to_dict() == c.to_dict()   # no checkpoint: the config decides


def test_train_cli_exits_with_the_message_and_no_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"),
       "--config=" + os.path.join(ROOT, "configs", "llava7b_lora.py"),
       f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}",
       "--compile_cache=off"],
      capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)   # a loaded 2-core CPU
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  err = r.stderr
  assert "pre-flight found" in err and "--config.model.base_checkpoint" in err
  assert "--config.data.tokenizer" in err
  # llava7b_lora's suites are real suite names now; their data is missing, and said so.
  assert "unknown suite" not in err and "suite affectnet_7: dataset affectnet/7class" in err
  assert not (tmp_path / "run").exists()


def test_unset_tower_field_without_a_checkpoint(tmp_path):
  c = _config(tmp_path)
  c.model.vision.patch_size = 0
  msg = _problems(preflight.run, c)
  assert "model.vision.patch_size is unset" in msg and "--config.model.vision.patch_size" in msg
  assert "ZeroDivision" not in msg


# -- adapter vs model and base -----------------------------------------------------------------------

def test_adapter_for_another_model_or_base_is_refused_naming_the_flag(tmp_path):
  from feallm_jax.pretrain import SHIPPED_BASE, align
  from feallm_jax.weights import base_checkpoint
  c = tiny.get_config()                       # the shipped base checkpoint
  c.model.base_checkpoint = SHIPPED_BASE
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  rec = dict(align.settings(c),
             base_fingerprint=base_checkpoint.read_meta(SHIPPED_BASE)["fingerprint"])
  (adapter / "adapter.json").write_text(json.dumps(rec))
  c.model.init_adapter = str(adapter)
  assert preflight.check_adapter(c) == []
  other = c.copy_and_resolve_references()
  other.model.update(local_clues=False, projector="mlp")
  msg = "\n".join(map(str, preflight.check_adapter(other)))
  assert "model.local_clues" in msg and "model.projector" in msg
  assert "--config.model.init_adapter=''" in msg
  c.model.base_checkpoint = ""                # random towers: not what it was aligned on
  msg = "\n".join(map(str, preflight.check_adapter(c)))
  assert "aligned on base checkpoint" in msg and "--config.model.init_adapter" in msg
  c.model.init_adapter = str(tmp_path / "nowhere")
  assert "no adapter.json" in str(preflight.check_adapter(c)[0])
