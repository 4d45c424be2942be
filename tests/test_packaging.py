"""pyproject.toml builds metadata without deprecation warnings (PEP 639 SPDX license)."""
import os
import shutil
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_license_is_an_spdx_string_and_metadata_builds_cleanly(tmp_path):
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["license"] == "Apache-2.0"
  # setuptools' own metadata build, on a copy (keeps egg-info out of the checkout).
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), tmp_path / name)
  (tmp_path / "feallm_jax").mkdir()
  (tmp_path / "feallm_jax" / "__init__.py").write_text("")
  (tmp_path / "out").mkdir()
  code = ("import warnings; warnings.simplefilter('always');"
          "from setuptools import build_meta as b;"
          "print(b.prepare_metadata_for_build_wheel('out'))")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Deprecat" not in r.stderr and "deprecat" not in r.stderr, r.stderr[-3000:]
  meta = (tmp_path / "out" / r.stdout.strip().splitlines()[-1] / "METADATA").read_text()
  assert "License-Expression: Apache-2.0" in meta
