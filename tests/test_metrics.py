"""Metrics equal scikit-learn / rouge-score and hand-computed values."""
import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from feallm_jax.eval import metrics


def _random_fixture(seed, n=200, k=7, unparsed=0.1):
  rng = np.random.default_rng(seed)
  y_true = rng.integers(0, k, n)
  y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, k, n))
  y_pred[rng.random(n) < unparsed] = -1
  return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed):
  y_true, y_pred = _random_fixture(seed)
  m = metrics.classification_metrics(y_true, y_pred, 7)
  labels = list(range(7))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average="macro"))
  assert m["uar"] == pytest.approx(skm.recall_score(y_true, y_pred, labels=labels, average="macro"))
  np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(y_true, y_pred, labels=labels))
  assert m["unparsed"] == int((y_pred == -1).sum())
  assert sum(m["unparsed_per_class"]) == m["unparsed"]
  assert m["num_samples"] == 200


def test_absent_classes_follow_sklearn_with_present_labels():
  # 8-way label set, but the split has no class 7 and nobody predicts it.
  y_true = np.array([0, 0, 1, 1, 2, 3, 3, 3])
  y_pred = np.array([0, 1, 1, -1, 2, 3, 0, 5])
  m = metrics.classification_metrics(y_true, y_pred, 8)
  any_labels = [0, 1, 2, 3, 5]
  true_labels = [0, 1, 2, 3]
  assert m["macro_f1"] == pytest.approx(
      skm.f1_score(y_true, y_pred, labels=any_labels, average="macro"))
  assert m["uar"] == pytest.approx(
      skm.recall_score(y_true, y_pred, labels=true_labels, average="macro"))


def test_classification_hand_computed():
  y_true = [0, 0, 1, 1]
  y_pred = [0, 1, 1, -1]
  m = metrics.classification_metrics(y_true, y_pred, 2, class_names=["a", "b"])
  assert m["accuracy"] == 0.5
  # class a: tp 1, fp 0, fn 1 -> F1 2/3; class b: tp 1, fp 1, fn 1 -> F1 1/2.
  assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert m["uar"] == pytest.approx(0.5)
  assert m["confusion"] == [[1, 1], [0, 1]]
  assert m["unparsed_per_class"] == [0, 1]
  assert m["per_class"]["b"]["precision"] == 0.5


def test_au_f1_matches_sklearn_and_skips_unannotated():
  rng = np.random.default_rng(3)
  t = rng.integers(0, 2, (50, 4))
  p = rng.integers(0, 2, (50, 4))
  t[:5, 2] = -1  # not annotated
  m = metrics.au_f1(t, p, [1, 2, 4, 6])
  for j, au in enumerate([1, 2, 4, 6]):
    ann = t[:, j] >= 0
    assert m["per_au_f1"][f"AU{au}"] == pytest.approx(skm.f1_score(t[ann, j], p[ann, j]))
  assert m["mean_f1"] == pytest.approx(np.mean(list(m["per_au_f1"].values())))


def test_au_f1_hand_computed():
  t = np.array([[1, 0], [1, 0], [0, 0]])
  p = np.array([[1, 0], [0, 0], [1, 0]])
  m = metrics.au_f1(t, p, [6, 12])
  assert m["per_au_f1"] == {"AU6": pytest.approx(0.5), "AU12": 0.0}  # no positives -> 0
  assert m["mean_f1"] == pytest.approx(0.25)


def test_aus_to_vector_and_select():
  assert metrics.aus_to_vector({6, 12, 9}, (6, 12, 25)).tolist() == [1, 1, 0]
  assert metrics.aus_to_vector(None, (6, 12)).tolist() == [0, 0]
  from feallm_jax.data import facs
  full = np.zeros(len(facs.ALL_AUS), int)
  full[facs.au_index(12)] = 1
  assert metrics.select_aus(full, (6, 12)).tolist() == [0, 1]


@pytest.mark.parametrize("ref,pred", [
    ("The person is happy, with raised cheeks (AU6).", "Happy person: AU6 cheeks raised."),
    ("Sadness. The inner brows are raised.", "sadness inner brows raised"),
    ("a b c d e f", "f e d c b a"),
    ("identical text here", "identical text here"),
    ("", "something"),
    ("Anger: AU4, AU5, AU7, AU23!", "anger au4 au7 au23 au5 lowered brows"),
])
def test_rouge_l_matches_rouge_score(ref, pred):
  ref_score = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"]
  ours = metrics.rouge_l(ref, pred)
  assert ours["fmeasure"] == pytest.approx(ref_score.fmeasure)
  assert ours["precision"] == pytest.approx(ref_score.precision)
  assert ours["recall"] == pytest.approx(ref_score.recall)


def test_lcs_hand_computed():
  assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
  assert metrics.rouge_l("a b c", "a c")["fmeasure"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_emfacs_consistency_rate():
  m = metrics.emfacs_consistency(
      ["happiness", "happiness", "sadness", None, "neutral"],
      [{6, 12}, {4}, {1, 15, 23}, {6}, frozenset()])
  assert m == dict(rate=pytest.approx(2 / 4), consistent=2, judged=4, not_judged=1)
