"""Task metrics beyond accuracy / RMSE: the GLUE ones, as fairseq's
`sentence_prediction` criterion reports them (it calls scikit-learn and
scipy; these are the textbook formulas in numpy, checked against both in
tests/test_glue.py):

- `mcc`: Matthews correlation of the predicted and true classes (CoLA; the
  multi-class form, sklearn `matthews_corrcoef`).
- `f1`: F1 of class 1 (MRPC, QQP: `f1_score(labels, preds)`, pos_label 1) and
  `acc_and_f1`, their mean with the accuracy.
- `pearson`, `spearman` (STS-B; Spearman is Pearson of the ranks, ties given
  their mean rank) and `pearson_and_spearman`, their mean.

`extra_metrics(names, outputs, labels, task)` computes the named ones from a
test set's logits (classification) or predictions (regression).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASSIFICATION_METRICS = ("mcc", "f1", "acc_and_f1")
REGRESSION_METRICS = ("pearson", "spearman", "pearson_and_spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def matthews_corrcoef(labels: np.ndarray, preds: np.ndarray) -> float:
    """Gorodkin's R_K from the confusion matrix C (rows true, columns predicted):
    (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c the trace, s the count, t
    and p the true and predicted class totals; 0 when a denominator is 0."""
    classes = np.union1d(labels, preds)
    t = np.array([np.sum(labels == k) for k in classes], np.float64)
    p = np.array([np.sum(preds == k) for k in classes], np.float64)
    c, s = float(np.sum(labels == preds)), float(len(labels))
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def binary_f1(labels: np.ndarray, preds: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2 tp / (2 tp + fp + fn); 0 when there is none."""
    tp = np.sum((preds == positive) & (labels == positive))
    fp = np.sum((preds == positive) & (labels != positive))
    fn = np.sum((preds != positive) & (labels == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; nan when either side is constant (scipy warns and returns nan)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values, and the mean rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    out = np.empty(len(x), np.float64)
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def extra_metrics(names: Sequence[str], outputs: np.ndarray, labels: np.ndarray, task: str
                  ) -> dict[str, float]:
    """The metrics `names` (of METRICS) of a test set: `outputs` are class
    scores [N, K] (classification) or predictions [N] (regression)."""
    out = {}
    if task == "classification":
        preds = np.argmax(outputs, axis=-1)
        acc = float(np.mean(preds == labels))
        for name in names:
            if name == "mcc":
                out["mcc"] = matthews_corrcoef(labels, preds)
            elif name in ("f1", "acc_and_f1"):
                f1 = binary_f1(labels, preds)
                out["f1"] = f1
                if name == "acc_and_f1":
                    out["acc_and_f1"] = (acc + f1) / 2
    else:
        for name in names:
            if name in ("pearson", "pearson_and_spearman"):
                out["pearson"] = pearson(outputs, labels)
            if name in ("spearman", "pearson_and_spearman"):
                out["spearman"] = spearman(outputs, labels)
            if name == "pearson_and_spearman":
                out[name] = (out["pearson"] + out["spearman"]) / 2
    return out
