"""Task metrics, computed offline with scipy and scikit-learn.

``evaluate.load`` fetches metric scripts from the Hub at run time, so an offline run would fail; these
are the same definitions from the libraries those scripts call.

- ``accuracy`` = mean(pred == gold)
- ``f1`` = binary F1 of the positive class (label id 1), as GLUE reports it for MRPC and QQP
- ``mcc`` = Matthews correlation (CoLA)
- ``pearson`` / ``spearman`` = linear / rank correlation between predicted and gold scores
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction has no defined correlation; report NaN rather than a warning-laden 0.
    if len(predictions) < 2 or np.all(predictions == predictions[0]) or np.all(labels == labels[0]):
        return math.nan
    return float(fn(predictions, labels)[0])


METRICS = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, average="binary", pos_label=1, zero_division=0)),
    "mcc": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(pearsonr, p, y),
    "spearman": lambda p, y: _correlation(spearmanr, p, y),
}


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Regression heads give ``[N, 1]``: squeeze to ``[N]`` (the original harness forgot to, and its
    STS-B correlations were wrong); classifiers give class ids."""
    logits = np.asarray(logits)
    if regression:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
    return logits.argmax(axis=-1)


def compute(metric_names, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    return {name: METRICS[name](predictions, labels) for name in metric_names}
