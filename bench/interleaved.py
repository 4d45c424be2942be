"""Interleaved side-by-side timing for bench/generate.py: every side's calls round by round in
one process, and decode time per step from each round's own pair of calls.

Flag-free (bench/generate.py defines absl flags), so tests import it.
"""

import os
import statistics
import time


def _loadavg() -> float | None:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def timed(runners, n, runs):
  """Every runner's ``run(n)`` and ``run(1)`` times, all interleaved: round r times every
  runner's two calls, back to back, before round r + 1 starts (the runners' order rotates by
  one each round, so none always follows the same neighbour), so load from other processes hits
  every side alike and a round's ``t_n - t_1`` pair is taken seconds apart. One warm-up of each
  call first (compile excluded)."""
  for run in runners.values():
    run(n)
    run(1)
  times = {name: {n: [], 1: []} for name in runners}
  names = list(runners)
  load = [_loadavg()]
  for r in range(runs):
    for name in names[r % len(names):] + names[:r % len(names)]:
      for k in (n, 1):
        t0 = time.perf_counter()
        runners[name](k)
        times[name][k].append(time.perf_counter() - t0)
  load.append(_loadavg())
  return {name: (t[n], t[1], load) for name, t in times.items()}


def result(backend, b, n, all_n, all_1, load):
  """Decode time per step from each round's pair, ``t_n - t_1`` (its median over rounds): the
  pair is taken seconds apart, so the machine's drift between rounds (this VM's memory speed
  moves by tens of % minute to minute) cancels; ``ms_per_decode_step_unpaired`` is the older
  ``median(t_n) - median(t_1)``, reported beside it."""
  steps = max(n - 1, 1)
  t_n, t_1 = statistics.median(all_n), statistics.median(all_1)
  per_round = [(a - c) / steps for a, c in zip(all_n, all_1)]
  step = statistics.median(per_round)
  return dict(backend=backend, seconds_generate=t_n, seconds_prefill_only=t_1,
              runs_generate=all_n, runs_prefill_only=all_1,
              ms_per_decode_step=1000 * step,
              ms_per_decode_step_per_round=[1000 * x for x in per_round],
              ms_per_decode_step_unpaired=1000 * (t_n - t_1) / steps,
              decode_tokens_per_s=b / max(step, 1e-12),
              end_to_end_tokens_per_s=b * n / t_n, loadavg_1min_before_after=load)


def speedups(out):
  """Ours vs HF PyTorch from the sides' :func:`result` entries."""
  ours, hf = out["ours"], out["hf_torch"]
  # Round by round (both sides measured within seconds of each other): the spread says how far
  # one run's ratio can be trusted on this machine.
  ratios = sorted(h / o for h, o in zip(hf["ms_per_decode_step_per_round"],
                                       ours["ms_per_decode_step_per_round"]))
  best = max((out[k] for k in ("hf_torch", "hf_torch_1thread") if k in out),
             key=lambda r: r["decode_tokens_per_s"])
  return dict(
      decode_speedup=ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
      decode_speedup_unpaired=(hf["ms_per_decode_step_unpaired"]
                               / ours["ms_per_decode_step_unpaired"]),
      decode_speedup_per_round=dict(
          median=statistics.median(ratios), min=ratios[0], max=ratios[-1],
          quartiles=(statistics.quantiles(ratios, n=4, method="inclusive")
                     if len(ratios) > 1 else ratios * 3)),
      end_to_end_speedup=ours["end_to_end_tokens_per_s"] / hf["end_to_end_tokens_per_s"],
      decode_speedup_vs_best_torch=ours["decode_tokens_per_s"] / best["decode_tokens_per_s"])
