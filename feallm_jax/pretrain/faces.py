"""Many synthetic faces for stage 0, rendered in parallel from fresh identity pools.

Pretraining draws identities from the *train* pools of seeds 1..N (`synthetic.make_identity(
"train", i, seed)`): the instruction set uses seed 0, so stage 0 sees far more people than the
instruction set, and the test pool (a disjoint seed stream of every seed) is never touched.
Workers are spawned (never forked after jax started) and import only numpy and PIL.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Sequence

import numpy as np

from feallm_jax.data import facs


def _jpeg_round_trip(image: np.ndarray) -> np.ndarray:
  """The pixels a builder stores (JPEG at its quality), so stage 0 sees stage 1's statistics."""
  import io
  from PIL import Image
  from feallm_jax.data.builders.common import JPEG_QUALITY
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _row(r: dict) -> tuple:
  return (_jpeg_round_trip(r["image"]), int(r["emotion"]),
          np.asarray(r["au_present"], np.int8), int(r["subject"].rsplit("-", 1)[1]))


def _minimal_pair(i: int, seed: int, size: int) -> tuple[dict, dict]:
  """Record i of a train pool and its partner: the same person, pose and lighting with one
  optional AU of the same emotion switched on or off (a neutral face's partner shows an
  expression). In one contrastive batch the two captions differ only in that movement, so
  the towers must see it; the rare, subtle AUs (AU10, AU17, AU24) are otherwise never the
  only difference between a face and its negatives."""
  import copy
  from feallm_jax.data import synthetic
  emotion, ident, aus, pose, rng = synthetic.draw(i, split="train", seed=seed)
  pick = np.random.default_rng([seed, 7, i])
  cands = synthetic.toggleable_aus(emotion, aus)
  if cands:
    emotion_b, aus_b = emotion, synthetic.toggle(aus, int(pick.choice(cands)), pick)
  else:
    others = [e for e in facs.RAF_DB if facs.emotion_name(e) != emotion]
    emotion_b = facs.emotion_name(others[int(pick.integers(len(others)))])
    aus_b = synthetic.sample_expression(pick, emotion_b)
  out = []
  for emo, au in ((emotion, aus), (emotion_b, aus_b)):
    image, lm = synthetic.render(ident, au, pose=pose, image_size=size,
                                 unilateral=emo in facs.UNILATERAL_EMOTIONS,
                                 rng=copy.deepcopy(rng))
    out.append(synthetic.make_record(i, "train", seed, emo, ident, au, image, lm))
  return out[0], out[1]


def _render(job: tuple[int, int, int, int, bool]) -> dict:
  from feallm_jax.data import synthetic
  seed, start, stop, size, pairs = job
  rows = []
  for i in range(start, stop):
    if pairs:
      rows.extend(_row(r) for r in _minimal_pair(i, seed, size))
    else:
      rows.append(_row(synthetic.generate(i, split="train", seed=seed, image_size=size)))
  imgs, emo, aus, subj = zip(*rows)
  return dict(image=np.stack(imgs), emotion=np.asarray(emo, np.int32),
              au_present=np.stack(aus), subject=np.asarray(subj, np.int32),
              seed=np.full(len(emo), seed, np.int32))


def render(seeds: Sequence[int], per_seed: int, image_size: int = 128, workers: int = 0,
           chunk: int = 200, pairs: bool = False) -> dict[str, np.ndarray]:
  """Faces of `per_seed` records from each seed's train pool (seed 0 is the instruction set).
  With `pairs`, each record is followed by its minimal-pair partner (rows 2k and 2k+1), so
  2 * per_seed faces per seed."""
  if any(int(s) == 0 for s in seeds):
    raise ValueError("stage 0 must not render seed 0: it is the instruction set's own seed")
  jobs = [(int(s), a, min(a + chunk, per_seed), image_size, bool(pairs))
          for s in seeds for a in range(0, per_seed, chunk)]
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    parts = [_render(j) for j in jobs]
  else:
    with mp.get_context("spawn").Pool(workers) as pool:
      parts = pool.map(_render, jobs, chunksize=1)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def cached(path: str, seeds: Sequence[int], per_seed: int, image_size: int = 128,
           workers: int = 0, pairs: bool = False) -> dict[str, np.ndarray]:
  """`render(...)`, memoized in an .npz keyed by its arguments (a rerun skips rendering)."""
  key = f"seeds={','.join(map(str, seeds))};n={per_seed};size={image_size};pairs={pairs}"
  if os.path.exists(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        return {k: z[k] for k in z.files if k != "key"}
  data = render(seeds, per_seed, image_size, workers, pairs=pairs)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, key=np.asarray(key), **data)
  os.replace(tmp, path)
  return data


def batch_rows(rng: np.random.Generator, n: int, batch: int, pair_fraction: float) -> np.ndarray:
  """Row indices of one batch from `n` faces: `pair_fraction` of it whole minimal pairs (rows
  2k, 2k+1 of a `render(..., pairs=True)` output), the rest drawn at random."""
  n_pairs = int(round(batch * pair_fraction / 2))
  if n_pairs and n % 2:
    raise ValueError("pair_fraction > 0 needs faces rendered as minimal pairs "
                     "(--config.minimal_pairs=True)")
  first = 2 * rng.integers(0, n // 2, n_pairs)
  return np.concatenate([np.stack([first, first + 1], 1).reshape(-1),
                         rng.integers(0, n, batch - 2 * n_pairs)])


def active(au_present_row: np.ndarray) -> list[int]:
  return [au for au, p in zip(facs.ALL_AUS, au_present_row) if p == 1]
