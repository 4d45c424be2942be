"""Config files (``configs/*.py``) are loaded by file path, never imported as a package.

``configs/`` stays at the top of the repository, where users look for it, and is not installed:
launchers take ``--config=path`` through ``ml_collections.config_flags``, and a config that builds
on another one loads it with ``sibling(__file__, "tiny_synthetic")`` (not ``from configs import
...``, which works only when the repository root happens to be on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
import types


def load_module(path: str) -> types.ModuleType:
  """Executes the config file at ``path`` as a fresh module."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist (--config)")
  name = "feallm_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(path: str):
  """``get_config()`` of the config file at ``path``."""
  return load_module(path).get_config()


def sibling(this_file: str, name: str) -> types.ModuleType:
  """The config module ``name`` next to ``this_file`` (a config's ``__file__``)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), name + ".py"))
