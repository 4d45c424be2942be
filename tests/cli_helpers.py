"""The launch/ scripts as modules, for tests that call their main() in-process."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cli(script: str):
  """``launch/<script>.py``, loaded once per session (absl flags can be defined only once), with
  its flags back at their defaults (a previous test's values do not leak into the next parse)."""
  name = f"_launch_cli_{script}"
  mod = sys.modules.get(name)
  if mod is None:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "launch",
                                                                     f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
  mod.FLAGS.unparse_flags()
  return mod
