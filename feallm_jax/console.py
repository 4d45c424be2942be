"""What a person sees on the terminal: the progress bar, the run's own messages and warnings.

absl apps print every library's INFO lines by default (absl turns ``--verbosity`` from WARNING
to INFO when it is not given), so each Orbax save streamed a dozen ``atomicity.py`` /
``checkpoint_manager.py`` lines through the tqdm bar. :func:`setup` makes the default quiet:

* libraries (Orbax, tfds, Grain, jax, absl) log WARNING and above;
* this package's own loggers (``feallm_jax.*``) log INFO as plain lines, written through tqdm
  so they never tear the progress bar;
* ``--verbosity=0`` (absl's flag: 0 = INFO, 1 = DEBUG) brings every library's INFO back, in
  absl's usual format.

Launch scripts call :func:`setup` first thing in ``main``; ``train_and_evaluate`` and
``feabench.evaluate`` call :func:`setup_once` so any absl app that uses them (e.g. the
quickstart) gets the same default. Outside an absl app (notebooks, pytest) nothing changes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys

PACKAGE = "feallm_jax"
_state = {"configured": False}


class _TqdmHandler(logging.Handler):
  """Plain ``message`` lines (``warning: message`` for warnings), written around tqdm bars."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      msg = self.format(record)
      if record.levelno >= logging.WARNING:
        msg = f"{record.levelname.lower()}: {msg}"
      try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
      except ImportError:  # pragma: no cover - tqdm is a pinned dependency
        print(msg, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


def _own_handler() -> logging.Handler | None:
  for h in logging.getLogger(PACKAGE).handlers:
    if isinstance(h, _TqdmHandler):
      return h
  return None


def explicit_verbosity() -> int | None:
  """``--verbosity`` when it was given on the command line of an absl app, else None."""
  from absl import flags
  f = flags.FLAGS
  try:
    if f.is_parsed() and f["verbosity"].present:
      return int(f.verbosity)
  except KeyError:  # absl.logging not imported: no such flag
    return None
  return None


def setup(verbosity: int | None = None) -> None:
  """Quiet default (``verbosity`` None or < 0) or absl's full logging at ``verbosity`` >= 0.

  ``verbosity`` None reads ``--verbosity`` from the command line when it was given there."""
  from absl import logging as absl_logging
  if verbosity is None:
    verbosity = explicit_verbosity()
  own = logging.getLogger(PACKAGE)
  handler = _own_handler()
  if verbosity is None or verbosity < 0:
    absl_logging.set_verbosity(absl_logging.WARNING)
    if handler is None:
      handler = _TqdmHandler()
      handler.setFormatter(logging.Formatter("%(message)s"))
      own.addHandler(handler)
    own.setLevel(logging.INFO)
    own.propagate = False
  else:
    absl_logging.set_verbosity(verbosity)
    if handler is not None:
      own.removeHandler(handler)
    own.setLevel(logging.NOTSET)
    own.propagate = True
  _state["configured"] = True


def setup_once() -> None:
  """:func:`setup` for library entry points: only inside an absl app whose main did not call
  it already (a notebook or a test keeps its own logging)."""
  from absl import flags
  f = flags.FLAGS
  if _state["configured"] or not f.is_parsed():
    return
  try:   # absl's app.run moves an unset --verbosity off its default; a bare parse does not
    if f["verbosity"].using_default_value:
      return
  except KeyError:
    return
  setup()


def is_quiet() -> bool:
  """Whether :func:`setup` chose the quiet default in this process."""
  return _own_handler() is not None


@contextlib.contextmanager
def quiet_tfds():
  """tfds' nested tqdm bars and bold stdout banners off for a build (quiet mode only)."""
  if not is_quiet():
    yield
    return
  import tensorflow_datasets as tfds
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)


@contextlib.contextmanager
def silence_library_warnings(enabled: bool = True):
  """absl-logged library WARNINGs off for a block (quiet mode only): for calls whose warning
  states the obvious, e.g. Orbax's "directory is read only" on a read-only open."""
  if not (enabled and is_quiet()):
    yield
    return
  absl_logger = logging.getLogger("absl")
  old = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(old)
