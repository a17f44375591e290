"""neurolm_nb.metrics: one set of metric names, hand-computed values, None (not NaN) where undefined, no warnings."""
import json
import math
import warnings

import numpy as np
import pytest

from neurolm_nb.metrics import METRIC_KEYS, label_metrics, logit_metrics, prob_metrics


def test_label_metrics_hand_computed():
    m = label_metrics([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0], 2)
    assert set(m) == {"balanced_accuracy", "accuracy", "cohen_kappa", "f1_weighted", "n"}
    assert math.isclose(m["balanced_accuracy"], 2 / 3) and math.isclose(m["accuracy"], 2 / 3)
    assert math.isclose(m["cohen_kappa"], 1 / 3) and math.isclose(m["f1_weighted"], 2 / 3) and m["n"] == 6
    # imbalanced: recalls 1/2 and 1 -> balanced 3/4 while accuracy is 4/5 ... weighted F1 by hand
    m = label_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], 2)
    assert math.isclose(m["balanced_accuracy"], 0.75) and math.isclose(m["accuracy"], 0.8)
    f1_0, f1_1 = 2 * 1 * 0.5 / 1.5, 2 * 0.75 * 1 / 1.75
    assert math.isclose(m["f1_weighted"], (2 * f1_0 + 3 * f1_1) / 5)


def test_unparsed_prediction_is_wrong_for_every_class():
    m = label_metrics([0, 1, 2, 2], [0, -1, 2, -1], 3)
    assert math.isclose(m["balanced_accuracy"], (1 + 0 + 0.5) / 3) and math.isclose(m["accuracy"], 0.5)


def test_prob_and_logit_metrics_agree_and_match_hand_values():
    p1, y = np.array([0.1, 0.6, 0.4, 0.9]), np.array([0, 0, 1, 1])
    m = prob_metrics(y, np.stack([1 - p1, p1], 1))
    assert list(m) == list(METRIC_KEYS)
    assert math.isclose(m["roc_auc"], 0.75) and math.isclose(m["pr_auc"], 5 / 6) and m["balanced_accuracy"] == 0.5
    logit = np.log(p1 / (1 - p1))
    for other in (logit_metrics(y, logit[:, None]), logit_metrics(y, logit), logit_metrics(y, np.stack([-logit, logit], 1))):
        assert all(math.isclose(other[k], m[k], abs_tol=1e-9) for k in METRIC_KEYS)


def test_binary_logit_threshold_is_inclusive():
    # sigmoid(0) = 0.5 -> class 1 (p >= 0.5), as labram_training always did
    assert logit_metrics([1, 0], [[0.0], [-1.0]])["accuracy"] == 1.0


def test_undefined_is_none_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = logit_metrics([1, 1, 1], [[0.3], [-0.2], [2.0]])
        multi = prob_metrics([0, 1, 2, 2], np.eye(3)[[0, 1, 2, 0]])
        empty = label_metrics([], [], 2)
        only_one_pred = label_metrics([0, 1], [0, 0], 2)
    assert one["roc_auc"] is None and one["pr_auc"] is None and one["cohen_kappa"] == 0.0
    assert label_metrics([1, 1], [1, 1], 2)["cohen_kappa"] is None  # 0/0
    assert multi["roc_auc"] is None and multi["pr_auc"] is None and multi["cohen_kappa"] is not None
    assert empty["n"] == 0 and all(empty[k] is None for k in empty if k != "n")
    assert only_one_pred["balanced_accuracy"] == 0.5
    json.dumps(one, allow_nan=False)  # None is JSON null; a NaN would fail here


@pytest.mark.parametrize("call, message", [
    (lambda: label_metrics([0, 3], [0, 1], 3), "labels: values must lie in [0, 2]"),
    (lambda: label_metrics([0, 1], [0, -2], 2), "pred: values must lie in [-1, 1]"),
    (lambda: label_metrics([0, 1], [0, 1], 1), "n_classes"),
    (lambda: label_metrics([0, 1], [0], 2), "differ in length"),
    (lambda: prob_metrics([0, 1], [[1.0], [0.0]]), "K >= 2"),
    (lambda: prob_metrics([0, 1], np.zeros((2, 2, 1))), "probs: expected a finite [n, K] array"),
    (lambda: logit_metrics([0, 1], [[np.inf], [0.0]]), "non-finite"),
    (lambda: logit_metrics([0, 1, 0], [[0.1], [0.0]]), "differ in length"),
])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_against_sklearn_on_random_data():
    from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    m = logit_metrics(y, s[:, None])
    assert math.isclose(m["roc_auc"], roc_auc_score(y, s)) and math.isclose(m["pr_auc"], average_precision_score(y, s))
    assert math.isclose(m["cohen_kappa"], cohen_kappa_score(y, (s >= 0).astype(int)))
