"""JAX's persistent compilation cache: reruns, resumes and evaluation reuse compiled programs.

The first training step of even the tiny model spends most of its time in XLA compilation; a
resumed run, a rerun with the same shapes, or an evaluation after training compiled the same
programs again. With the cache on, XLA's executables are stored on disk keyed by the program
and the compile options, and later processes load them instead of compiling.

Where (first match wins):

1. the ``directory`` argument (``--compile_cache=DIR`` of the launch scripts; ``off`` disables),
2. ``$FEALLM_COMPILE_CACHE`` (a dir, or ``off``),
3. ``config.compile_cache`` when a config sets it,
4. a cache dir already given to jax (``$JAX_COMPILATION_CACHE_DIR`` or ``jax.config``),
5. ``$XDG_CACHE_HOME/feallm_jax/jax`` (``~/.cache/feallm_jax/jax``).

Entries are only written for programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (jax's default, 1 s) to compile.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

OFF = ("off", "none", "false", "0", "no")
ENV = "FEALLM_COMPILE_CACHE"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "feallm_jax", "jax")


def current() -> str:
  """The cache dir jax is configured with ('' = none)."""
  import jax
  return str(jax.config.jax_compilation_cache_dir or "")


def _choose(directory: str | None, config) -> str:
  for value in (directory, os.environ.get(ENV),
                config.get("compile_cache", None) if config is not None else None):
    if value is not None and str(value).strip() != "":
      return str(value).strip()
  return current() or default_dir()


def enable(directory: str | None = None, config=None) -> str:
  """Turns the cache on (see the module docstring for where); returns the dir, '' when off."""
  import jax
  choice = _choose(directory, config)
  if choice.lower() in OFF:
    if current():
      jax.config.update("jax_compilation_cache_dir", None)
      _reset()
    _state["done"] = True
    return ""
  path = os.path.abspath(os.path.expanduser(choice)) if "://" not in choice else choice
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      log.warning("compilation cache %s unusable (%s): compiling without it; set "
                  "--compile_cache=DIR or %s=off", path, e, ENV)
      return ""
  if current() != path:
    jax.config.update("jax_compilation_cache_dir", path)
    _reset()
  _state["done"] = True
  return path


def enable_once(config=None) -> str:
  """:func:`enable` for library entry points (``train_and_evaluate``, ``feabench.evaluate``):
  does nothing when a launch script (or an earlier call) already chose."""
  if _state["done"]:
    return current()
  return enable(None, config)


_state = {"done": False}


def _reset() -> None:
  """jax initializes its cache object once; a new dir needs a fresh one (private API, guarded)."""
  try:
    from jax._src import compilation_cache as cc
    cc.reset_cache()
  except Exception:  # noqa: BLE001 - newer jax: the public config update is enough
    pass
