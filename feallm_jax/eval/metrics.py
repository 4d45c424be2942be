"""FEABench metrics in plain numpy: FER (accuracy, macro-F1, UAR, confusion), AUR (per-AU F1),
reasoning (EMFACS consistency, ROUGE-L).

Conventions (proven equal to scikit-learn in tests/test_metrics.py):
* An unparseable prediction is ``-1``: it counts as wrong (in the denominator of accuracy and of
  its true class's recall) but as no class's prediction (no false positive anywhere).
* Macro-F1 averages over the classes that occur in the labels or the valid predictions
  (sklearn ``f1_score(average="macro", labels=<those classes>)``); UAR averages recall over
  the classes present in the labels (sklearn ``recall_score(average="macro", labels=<present>)``),
  so a label set larger than the test split (contempt in a 7-class set) does not drag either down.
* Per-AU F1 uses only annotated samples (label != -1) and is 0 when an AU has neither positives
  nor predicted positives (sklearn's ``zero_division=0``); the mean is over the dataset's AU set.
* ROUGE-L is the LCS F-measure with rouge-score's tokenizer (lowercase, split on non
  alphanumerics, no stemming).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from feallm_jax.data import facs


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
  """``[K, K]`` counts, rows = true class, columns = predicted; unparseable (-1) rows dropped."""
  y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
  cm = np.zeros((num_classes, num_classes), np.int64)
  ok = (y_pred >= 0) & (y_true >= 0)
  np.add.at(cm, (y_true[ok], y_pred[ok]), 1)
  return cm


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                           class_names: Sequence[str] | None = None) -> dict:
  """Accuracy, macro-F1, UAR, confusion matrix and per-class scores for a K-way task.

  ``y_true`` in ``[0, K)`` (samples with -1 are skipped); ``y_pred`` in ``[0, K)`` or -1
  (unparseable: counted wrong).
  """
  y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
  keep = y_true >= 0
  y_true, y_pred = y_true[keep], y_pred[keep]
  if np.any(y_true >= num_classes) or np.any(y_pred >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}) or be -1")
  n = int(y_true.size)
  cm = confusion_matrix(y_true, y_pred, num_classes)
  tp = np.diag(cm).astype(np.float64)
  support = np.bincount(y_true, minlength=num_classes).astype(np.float64)  # includes unparsed
  predicted = cm.sum(0).astype(np.float64)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2 * tp, support + predicted)
  in_true = support > 0
  in_any = in_true | (predicted > 0)
  names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
  return dict(
      num_samples=n,
      accuracy=float(tp.sum() / n) if n else 0.0,
      macro_f1=float(f1[in_any].mean()) if in_any.any() else 0.0,
      uar=float(recall[in_true].mean()) if in_true.any() else 0.0,
      unparsed=int((y_pred < 0).sum()),
      confusion=cm.tolist(),
      unparsed_per_class=np.bincount(y_true[y_pred < 0], minlength=num_classes).tolist(),
      per_class={names[k]: dict(precision=float(precision[k]), recall=float(recall[k]),
                                f1=float(f1[k]), support=int(support[k]))
                 for k in range(num_classes)},
      labels=names)


def au_f1(au_true: np.ndarray, au_pred: np.ndarray, aus: Sequence[int]) -> dict:
  """Per-AU F1 and their mean over ``aus``.

  Args:
    au_true: ``[N, A]`` 1 / 0 / -1 (not annotated), columns in ``aus`` order.
    au_pred: ``[N, A]`` 1 / 0 predictions (unparseable answers: all 0, counted by the caller).
  """
  au_true, au_pred = np.asarray(au_true, np.int64), np.asarray(au_pred, np.int64)
  if au_true.shape != au_pred.shape or au_true.shape[-1] != len(aus):
    raise ValueError(f"au_f1: shapes {au_true.shape} / {au_pred.shape} for {len(aus)} AUs")
  per_au, per_au_acc, support = {}, {}, {}
  for j, au in enumerate(aus):
    ann = au_true[:, j] >= 0
    t, p = au_true[ann, j] == 1, au_pred[ann, j] == 1
    tp, fp, fn = np.sum(t & p), np.sum(~t & p), np.sum(t & ~p)
    per_au[f"AU{au}"] = float(_safe_div(2 * tp, 2 * tp + fp + fn))
    per_au_acc[f"AU{au}"] = float(np.mean(t == p)) if ann.any() else 0.0
    support[f"AU{au}"] = int(t.sum())
  return dict(mean_f1=float(np.mean(list(per_au.values()))) if aus else 0.0,
              mean_accuracy=float(np.mean(list(per_au_acc.values()))) if aus else 0.0,
              per_au_f1=per_au, per_au_accuracy=per_au_acc, positives=support,
              num_samples=int(au_true.shape[0]))


def aus_to_vector(aus: Iterable[int] | None, au_set: Sequence[int]) -> np.ndarray:
  """Multi-hot over ``au_set`` (``None`` = unparseable -> all zeros)."""
  named = set(aus or ())
  return np.array([1 if a in named else 0 for a in au_set], np.int64)


def select_aus(au_present: np.ndarray, au_set: Sequence[int]) -> np.ndarray:
  """Columns of an ``[..., len(ALL_AUS)]`` array for the AUs of ``au_set``, in that order."""
  idx = [facs.au_index(a) for a in au_set]
  return np.asarray(au_present)[..., idx]


# --- ROUGE-L ----------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
  """rouge-score's default tokenizer: lowercase, non-alphanumerics are separators."""
  return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0] * (len(b) + 1)
    for j, y in enumerate(b, 1):
      cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
    prev = cur
  return prev[-1]


def rouge_l(reference: str, prediction: str) -> dict:
  """ROUGE-L precision, recall and F-measure of ``prediction`` against ``reference``."""
  ref, pred = rouge_tokenize(reference), rouge_tokenize(prediction)
  if not ref or not pred:
    return dict(precision=0.0, recall=0.0, fmeasure=0.0)
  lcs = lcs_length(ref, pred)
  p, r = lcs / len(pred), lcs / len(ref)
  f = 2 * p * r / (p + r) if p + r > 0 else 0.0
  return dict(precision=p, recall=r, fmeasure=f)


# --- reasoning --------------------------------------------------------------------------------

def emfacs_consistency(emotions: Sequence[str | None], aus: Sequence[Iterable[int] | None]) -> dict:
  """Rate at which the AUs an answer names are EMFACS-consistent with the emotion it names.

  Only answers that name both an emotion and (possibly zero) AUs are judged; the rest are
  counted in ``not_judged``. AUs outside the FACS table are ignored.
  """
  judged = consistent = 0
  for emotion, named in zip(emotions, aus):
    if emotion is None or named is None:
      continue
    judged += 1
    known = [a for a in named if a in facs.AU_TABLE]
    consistent += bool(facs.emfacs_consistent(emotion, known))
  total = len(emotions)
  return dict(rate=consistent / judged if judged else 0.0, consistent=consistent, judged=judged,
              not_judged=total - judged)
