"""The training loop's preemption check (train/loop.py ``_Preemption``) in a real two-process
``jax.distributed`` run on 127.0.0.1: SIGTERM to one process stops both at the same step, and the
default check makes no collective per step."""

import os
import signal

import pytest

from bench import preemption as bench
from feallm_jax.train import loop


def test_single_process_sigterm_sets_the_flag():
  with loop._Preemption() as pre:
    assert pre.mode == "flag" and not pre.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert pre.should_stop(1)
  with pytest.raises(ValueError, match="train.preemption_check_every"):
    loop._Preemption(0)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step():
  out = bench.main(["--steps=20", "--check_every=5", "--modes=sync_point,gather_every_n"])
  sync, gather = out["modes"]["sync_point"], out["modes"]["gather_every_n"]
  # Default: JAX's preemption service; the stop step is agreed in the background.
  assert sync["check_mode"] == "jax"
  a, b = sync["stop_steps"]
  assert a is not None and a == b and a >= sync["sigterm_step"]
  # Service disabled: the flag is gathered every 5 steps, so both stop at the first multiple of
  # 5 at or after the signal.
  assert gather["check_mode"] == "gather"
  a, b = gather["stop_steps"]
  assert a is not None and a == b and a % 5 == 0 and 0 <= a - gather["sigterm_step"] < 10
