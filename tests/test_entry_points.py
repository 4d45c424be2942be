"""The CLIs and configs need no ``sys.path`` edits: launch/ and bench/ modules run as
``python -m launch.<name>`` from the repository root, and every config file loads by path from
any working directory (a config built on another loads its sibling by path)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "launch"))
                if f.endswith(".py") and f != "__init__.py")
SOURCES = sorted(os.path.join(d, f) for d in ("launch", "bench")
                 for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py"))


@pytest.mark.parametrize("path", SOURCES)
def test_no_sys_path_edits(path):
  with open(os.path.join(ROOT, path)) as f:
    assert "sys.path" not in f.read(), path


@pytest.mark.parametrize("name", LAUNCH)
def test_launch_module_runs_with_dash_m(name):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-m", f"launch.{name}", "--helpshort"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  text = out.stdout + out.stderr
  # absl prints the module docstring and the flags of this very file for --helpshort.
  assert "Traceback" not in text, text[-3000:]
  assert os.path.join(ROOT, "launch", name + ".py") + ":" in text, text[-3000:]


@pytest.mark.parametrize("name", ["tiny_synthetic", "bench_small", "llava7b_lora",
                                  "pretrain_tiny"])
def test_configs_load_by_path_from_another_directory(name, tmp_path):
  code = ("import sys; from feallm_jax import config_files; "
          f"c = config_files.get_config({os.path.join(ROOT, 'configs', name + '.py')!r}); "
          "assert not any(m == 'configs' or m.startswith('configs.') for m in sys.modules), "
          "'a config imported the configs package'; print(c.get('name', 'ok'))")
  # The repository root is not on sys.path here (only the package itself is importable, as in
  # an installed environment); configs must still load.
  pkg = tmp_path / "site"
  pkg.mkdir()
  os.symlink(os.path.join(ROOT, "feallm_jax"), pkg / "feallm_jax")
  env = dict(os.environ, PYTHONPATH=str(pkg), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
