"""Metrics, confidence intervals and evaluation figures for a binary fracture classifier.

Overview
--------
What the reporting guidelines for medical-imaging AI (CLAIM, TRIPOD+AI) ask of a test-set
evaluation, in one module:

* **Operating points chosen on validation only** (:func:`choose_operating_points`): Youden's J
  and the largest threshold whose validation sensitivity is at least 0.95. They are then applied
  unchanged to the test set.
* **Metrics at a threshold** (:func:`threshold_metrics`): accuracy, sensitivity, specificity,
  PPV, NPV, F1 and balanced accuracy, with the 2 x 2 counts. A case is called "fracture" when
  ``probability >= threshold`` (as :meth:`cspine_utils.modelbundle.Bundle.classify` does).
* **Threshold-free metrics**: ROC AUC (:func:`roc_auc`), PR AUC as average precision
  (:func:`pr_auc`), the Brier score (:func:`brier_score`) and the expected calibration error
  (:func:`expected_calibration_error`).
* **95 % confidence intervals by grouped (cluster) bootstrap** (:func:`bootstrap_ci`): slices of
  one patient / one source image are not independent, so whole *groups* are resampled.
* **A paired comparison of two models** on the same cases (:func:`paired_auc_test`).
* **Subgroups** (:func:`subgroup_table`): sensitivity per fracture type and difficulty,
  specificity and AUC per level, always with ``n``.
* ``metrics.json`` (:func:`evaluate_model`, :func:`save_metrics`) and a table of models
  (:func:`combined_table`).
* Figures (return a Matplotlib figure; save with :func:`cspine_utils.plots.save_figure`):
  :func:`plot_confusion`, :func:`plot_roc_pr`, :func:`plot_calibration`,
  :func:`plot_threshold_sweep`, :func:`plot_subgroups`.

Undefined metrics are ``NaN``, never an exception: sensitivity without positives, specificity
without negatives, AUC on one class. They become ``null`` in JSON.

Labels are 0/1 with 1 = fracture; probabilities are of the class "fracture", in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "THRESHOLD_METRICS",
    "THRESHOLD_FREE_METRICS",
    "BootstrapCI",
    "check_labels_and_probabilities",
    "THRESHOLD_METHODS",
    "choose_threshold",
    "validation_metrics",
    "threshold_metrics",
    "roc_auc",
    "pr_auc",
    "brier_score",
    "expected_calibration_error",
    "calibration_bins",
    "threshold_free_metrics",
    "choose_operating_points",
    "grouped_resample_indices",
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "paired_auc_test",
    "evaluate_model",
    "subgroup_table",
    "wilson_interval",
    "save_metrics",
    "load_metrics",
    "combined_table",
    "plot_confusion",
    "plot_roc_pr",
    "plot_calibration",
    "plot_threshold_sweep",
    "plot_subgroups",
]

#: Metrics returned by :func:`threshold_metrics` (besides the counts), in report order.
THRESHOLD_METRICS: tuple[str, ...] = (
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "balanced_accuracy",
    "f1",
)
#: Metrics returned by :func:`threshold_free_metrics`, in report order.
THRESHOLD_FREE_METRICS: tuple[str, ...] = ("roc_auc", "pr_auc", "brier", "ece")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_labels_and_probabilities(
    y_true: Iterable, y_prob: Iterable, *, name: str = "y_prob"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities and return them as 1-D arrays.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels (1 = fracture). Booleans are accepted.
    y_prob : array-like, shape (N,)
        Probabilities in [0, 1].
    name : str, default "y_prob"
        How the probabilities are called in error messages.

    Returns
    -------
    y : numpy.ndarray, shape (N,), int64
    p : numpy.ndarray, shape (N,), float64

    Raises
    ------
    ValueError
        If the lengths differ, a label is not 0/1, or a probability is not finite or outside
        [0, 1]; the first offending value is named.
    """
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but {name} has {p.size}")
    try:
        y_float = y.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"y_true must hold 0/1 labels, got {y[:5].tolist()!r}...") from None
    bad = ~np.isin(y_float, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"y_true must hold 0/1 labels (1 = fracture), got {y[bad][0]!r}")
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        raise ValueError(f"{name} must hold probabilities in [0, 1], got {p[bad][0]!r}")
    return y_float.astype(np.int64), p


def _check_threshold(threshold: Any) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    return t


def _check_groups(groups: Iterable | None, n: int) -> np.ndarray:
    """Groups as a 1-D array of length ``n``; ``None`` makes every row its own group."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != n:
        raise ValueError(f"groups has {g.size} values but there are {n} cases")
    missing = [v for v in g if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise ValueError(f"groups must name a group for every case, got {missing[0]!r}")
    return g.astype(str)


def _check_resamples(n_resamples: Any, seed: Any, alpha: Any) -> tuple[int, int, float]:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (0.05 gives 95 % intervals), got {alpha!r}")
    return int(n_resamples), int(seed), float(alpha)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Metrics at a threshold
# --------------------------------------------------------------------------------------------
def _counts(y: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    pos = y == 1
    return {
        "tp": int(np.count_nonzero(predicted & pos)),
        "fp": int(np.count_nonzero(predicted & ~pos)),
        "tn": int(np.count_nonzero(~predicted & ~pos)),
        "fn": int(np.count_nonzero(~predicted & pos)),
    }


def _metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "balanced_accuracy": (sens + spec) / 2.0,  # NaN if either is undefined
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_metrics(y_true: Iterable, y_prob: Iterable, threshold: float) -> dict[str, float]:
    """Classification metrics at one decision threshold.

    A case is predicted "fracture" when ``y_prob >= threshold``.

    ==================  =========================  ==========================================
    metric              formula                    undefined (NaN) when
    ==================  =========================  ==========================================
    sensitivity         TP / (TP + FN)             no positives
    specificity         TN / (TN + FP)             no negatives
    ppv (precision)     TP / (TP + FP)             nothing predicted positive
    npv                 TN / (TN + FN)             nothing predicted negative
    accuracy            (TP + TN) / N              N = 0
    balanced_accuracy   (sens + spec) / 2          sensitivity or specificity is NaN
    f1                  2 TP / (2 TP + FP + FN)    no positives and none predicted positive
    ==================  =========================  ==========================================

    Undefined metrics are ``NaN`` rather than an error or 0 (scikit-learn's default for some of
    them), so a bootstrap resample or a subgroup without positives is visible as "not
    estimable", not as a sensitivity of 0.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture.
    y_prob : array-like, shape (N,)
        Fracture probabilities in [0, 1].
    threshold : float
        Decision threshold, a probability in [0, 1].

    Returns
    -------
    dict
        ``threshold``; ``n``, ``n_positive``, ``n_negative``; ``tp``, ``fp``, ``tn``, ``fn``
        (int); and the metrics of :data:`THRESHOLD_METRICS` (float, possibly NaN).

    Raises
    ------
    ValueError
        On invalid labels, probabilities or threshold (see
        :func:`check_labels_and_probabilities`).
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    t = _check_threshold(threshold)
    counts = _counts(y, p >= t)
    out: dict[str, Any] = {
        "threshold": t,
        "n": int(y.size),
        "n_positive": int((y == 1).sum()),
        "n_negative": int((y == 0).sum()),
    }
    out.update(counts)
    out.update(_metrics_from_counts(**counts))
    return out


# --------------------------------------------------------------------------------------------
# Threshold-free metrics
# --------------------------------------------------------------------------------------------
def roc_auc(y_true: Iterable, y_prob: Iterable) -> float:
    """Area under the ROC curve; ``NaN`` when only one class is present.

    Computed as the Mann-Whitney statistic: the probability that a random fracture case scores
    higher than a random normal one, ties counting one half (identical to
    ``sklearn.metrics.roc_auc_score``).

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels.
    y_prob : array-like, shape (N,)
        Probabilities (any scores work).

    Returns
    -------
    float
        In [0, 1]; 0.5 is chance.
    """
    from scipy.stats import rankdata  # noqa: PLC0415

    y, p = check_labels_and_probabilities(y_true, y_prob)
    return _roc_auc(y, p, rankdata)


def _roc_auc(y: np.ndarray, p: np.ndarray, rankdata: Callable) -> float:
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y_true: Iterable, y_prob: Iterable) -> float:
    """Area under the precision-recall curve as *average precision*; ``NaN`` without positives.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds in decreasing order (the
    step-wise sum of ``sklearn.metrics.average_precision_score``, not the trapezoidal rule, which
    is optimistic). Chance level is the prevalence, not 0.5.

    Parameters
    ----------
    y_true : array-like, shape (N,)
    y_prob : array-like, shape (N,)

    Returns
    -------
    float
        In [0, 1].
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return _average_precision(y, p)


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    # last index of each run of equal scores: one point of the curve per distinct threshold
    ends = np.r_[np.nonzero(np.diff(p_sorted))[0], y.size - 1]
    tp = np.cumsum(y_sorted)[ends]
    predicted = ends + 1
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(y_true: Iterable, y_prob: Iterable) -> float:
    """Mean squared error of the probabilities, ``mean((p - y)^2)``; 0 is perfect.

    A model that always predicts the prevalence ``pi`` scores ``pi (1 - pi)``.

    Returns
    -------
    float
        In [0, 1].
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin k holds ``k/n <= p < (k+1)/n``; p = 1 goes in the last."""
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def _check_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def expected_calibration_error(y_true: Iterable, y_prob: Iterable, n_bins: int = 10) -> float:
    """Expected calibration error (ECE) with equal-width probability bins.

    The predictions are put into ``n_bins`` bins of equal width on [0, 1] (bin ``k`` holds
    ``k / n_bins <= p < (k + 1) / n_bins``; ``p = 1`` goes into the last bin). Then

    ``ECE = sum_b (n_b / N) * | mean(y in b) - mean(p in b) |``

    i.e. the gap between observed fracture frequency and mean predicted probability, weighted
    by how many cases fall in each bin. Empty bins contribute nothing. 0 is perfect
    calibration; with few cases per bin, sampling noise alone makes ECE positive (about
    ``sqrt(p (1 - p) / n_b)`` per bin), so compare models on the same data and report its CI.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels.
    y_prob : array-like, shape (N,)
        Probabilities in [0, 1].
    n_bins : int, default 10
        Number of equal-width bins.

    Returns
    -------
    float
        In [0, 1]; NaN for empty input.
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return _ece(y, p, _check_bins(n_bins))


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    if y.size == 0:
        return math.nan
    b = _bin_index(p, n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    return float(np.abs(sum_y - sum_p).sum() / y.size)  # = sum (n_b/N) |mean_y - mean_p|


def calibration_bins(y_true: Iterable, y_prob: Iterable, n_bins: int = 10) -> pd.DataFrame:
    """The table behind a reliability diagram (same bins as :func:`expected_calibration_error`).

    Returns
    -------
    pandas.DataFrame
        One row per bin: ``bin_low``, ``bin_high``, ``n``, ``mean_predicted``,
        ``observed_fraction`` (NaN for empty bins).
    """
    import pandas as pd  # noqa: PLC0415

    y, p = check_labels_and_probabilities(y_true, y_prob)
    n_bins = _check_bins(n_bins)
    b = _bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=n_bins) / count
        frac_y = np.bincount(b, weights=y, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "n": count,
            "mean_predicted": mean_p,
            "observed_fraction": frac_y,
        }
    )


def threshold_free_metrics(y_true: Iterable, y_prob: Iterable, n_bins: int = 10) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision), Brier score and ECE in one dict.

    Returns
    -------
    dict
        Keys of :data:`THRESHOLD_FREE_METRICS`; NaN where undefined (one class).
    """
    from scipy.stats import rankdata  # noqa: PLC0415

    y, p = check_labels_and_probabilities(y_true, y_prob)
    n_bins = _check_bins(n_bins)
    return {
        "roc_auc": _roc_auc(y, p, rankdata),
        "pr_auc": _average_precision(y, p),
        "brier": float(np.mean((p - y) ** 2)) if y.size else math.nan,
        "ece": _ece(y, p, n_bins),
    }


# --------------------------------------------------------------------------------------------
# Operating points (validation only)
# --------------------------------------------------------------------------------------------
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "f1", "sensitivity")


def choose_threshold(
    y_true: Iterable, y_prob: Iterable, method: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """A decision threshold chosen on validation data: the project's one threshold chooser.

    Candidates are the distinct probabilities (the points of the ROC curve); a case is called
    "fracture" when ``probability >= threshold``.

    ``"youden"``: maximises Youden's J = sensitivity + specificity - 1.
    ``"f1"``: maximises F1 = 2 TP / (2 TP + FP + FN).
    ``"sensitivity"``: the **largest** threshold whose sensitivity is at least
    ``target_sensitivity`` (the most specific rule that still finds that share of fractures).

    Ties go to the **lower** threshold (higher sensitivity: a missed fracture costs more than a
    false alarm).

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture; both classes needed.
    y_prob : array-like, shape (N,)
        Fracture probabilities in [0, 1].
    method : {"youden", "f1", "sensitivity"}, default "youden"
    target_sensitivity : float, default 0.95
        In (0, 1]; used by ``"sensitivity"`` only.

    Returns
    -------
    float
        The threshold, a probability.

    Raises
    ------
    ValueError
        On invalid labels or probabilities, a missing class or an unknown method.
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    method = str(method).strip().lower()
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}")
    if not 0.0 < float(target_sensitivity) <= 1.0:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity!r}")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"both classes are needed; got {n_pos} fracture and {n_neg} normal cases")
    candidates = np.unique(p)  # ascending
    # cases with p >= candidates[i], by a search in the sorted scores (O(N log N))
    tp = n_pos - np.searchsorted(np.sort(p[y == 1]), candidates, side="left")
    fp = n_neg - np.searchsorted(np.sort(p[y == 0]), candidates, side="left")
    if method == "sensitivity":
        ok = np.flatnonzero(tp / n_pos >= float(target_sensitivity) - 1e-12)
        return float(candidates[int(ok[-1])])  # never empty: the lowest candidate gives sensitivity 1
    score = tp / n_pos - fp / n_neg if method == "youden" else 2 * tp / (n_pos + tp + fp)
    return float(candidates[int(np.flatnonzero(score >= score.max() - 1e-12)[0])])


def choose_operating_points(y_val: Iterable, p_val: Iterable, target_sensitivity: float = 0.95) -> dict[str, float]:
    """The report's two operating points, chosen on the **validation** set by :func:`choose_threshold`.

    Returns
    -------
    dict
        ``{"youden": t1, "sens95": t2}`` (the second key is ``f"sens{round(100 * target)}"``):
        Youden's J and the largest threshold with validation sensitivity >= ``target_sensitivity``.
        Applied unchanged to the test set, where the sensitivity may fall below the target.
    """
    key = f"sens{int(round(100 * float(target_sensitivity)))}"
    return {
        "youden": choose_threshold(y_val, p_val, "youden"),
        key: choose_threshold(y_val, p_val, "sensitivity", target_sensitivity),
    }


def validation_metrics(y_true: Iterable, y_prob: Iterable, threshold: float) -> dict[str, float | int]:
    """The one validation summary notebooks 03, 04 and 05 print and bundles store.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture.
    y_prob : array-like, shape (N,)
        Fracture probabilities in [0, 1].
    threshold : float
        Decision threshold (``probability >= threshold`` is "fracture").

    Returns
    -------
    dict
        ``auc`` (ROC AUC), ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``accuracy``
        (float, NaN where undefined) and ``tp``, ``fp``, ``tn``, ``fn``, ``n`` (int).
    """
    m = threshold_metrics(y_true, y_prob, threshold)
    out: dict[str, float | int] = {"auc": roc_auc(y_true, y_prob)}
    out.update({k: m[k] for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")})
    out.update({k: m[k] for k in ("tp", "fp", "tn", "fn", "n")})
    return out


# --------------------------------------------------------------------------------------------
# Grouped (cluster) bootstrap
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval.

    Unpacks like a tuple: ``point, low, high = bootstrap_ci(...)``.

    Attributes
    ----------
    point : float
        The metric on the full data.
    low, high : float
        The ``alpha / 2`` and ``1 - alpha / 2`` percentiles of the valid resamples (NaN if
        fewer than 2 were valid).
    n_resamples : int
        Resamples drawn.
    n_skipped : int
        Resamples where the metric was undefined (e.g. AUC on a resample with one class) and
        which were left out of the interval.
    alpha : float
    """

    point: float
    low: float
    high: float
    n_resamples: int
    n_skipped: int
    alpha: float

    def __iter__(self):
        return iter((self.point, self.low, self.high))

    def as_dict(self) -> dict[str, float | int]:
        """``{"value", "ci_low", "ci_high", "n_resamples", "n_skipped"}`` (for JSON)."""
        return {
            "value": self.point,
            "ci_low": self.low,
            "ci_high": self.high,
            "n_resamples": self.n_resamples,
            "n_skipped": self.n_skipped,
        }


def grouped_resample_indices(
    groups: Iterable | None, n_resamples: int, seed: int = 0, n: int | None = None
) -> list[np.ndarray]:
    """Row indices of cluster-bootstrap resamples: whole groups drawn with replacement.

    Each resample draws as many groups as there are (``G``), uniformly with replacement, and
    takes *all* rows of every drawn group (a group drawn twice appears twice), so a resample has
    about, not exactly, ``N`` rows. Rows of one group never get split, which keeps the
    within-group correlation (slices of one patient, augmented copies of one image) in the
    interval.

    Parameters
    ----------
    groups : array-like, shape (N,), or None
        Group of each row (e.g. the manifest's ``group``); None: every row is its own group
        (the ordinary bootstrap), then ``n`` is required.
    n_resamples : int
    seed : int, default 0
        Seed of ``numpy.random.default_rng``; the same seed gives the same resamples.
    n : int, optional
        Number of rows, needed when ``groups`` is None.

    Returns
    -------
    list of numpy.ndarray
        ``n_resamples`` integer index arrays.
    """
    if groups is None:
        if n is None:
            raise ValueError("n (the number of rows) is needed when groups is None")
        g = np.arange(int(n))
    else:
        g = np.asarray(groups).ravel()
        g = _check_groups(g, g.size if n is None else int(n))
    n_resamples, seed, _ = _check_resamples(n_resamples, seed, 0.05)
    _, inverse = np.unique(g, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="mergesort")
    starts = np.r_[0, np.cumsum(np.bincount(inverse))]
    n_groups = starts.size - 1
    if n_groups == 0:
        raise ValueError("cannot bootstrap an empty set of cases")
    members = [order[starts[k] : starts[k + 1]] for k in range(n_groups)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, n_groups, size=n_groups)
        out.append(np.concatenate([members[k] for k in drawn]))
    return out


def _single_class(y: np.ndarray) -> bool:
    return y.size == 0 or int(y.min()) == int(y.max())


def _bootstrap_many(
    metric_fns: Mapping[str, Callable], arrays: Sequence[np.ndarray], indices: list[np.ndarray], alpha: float
) -> dict[str, BootstrapCI]:
    """Apply every metric to the full data and to each resample (shared resamples)."""
    points = {}
    for name, fn in metric_fns.items():
        points[name] = _safe_metric(fn, arrays)
    stats: dict[str, list[float]] = {name: [] for name in metric_fns}
    for idx in indices:
        sub = [a[idx] for a in arrays]
        for name, fn in metric_fns.items():
            stats[name].append(_safe_metric(fn, sub))
    out = {}
    for name in metric_fns:
        values = np.asarray(stats[name], dtype=float)
        valid = values[np.isfinite(values)]
        if valid.size >= 2:
            low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
        else:
            low = high = math.nan
        out[name] = BootstrapCI(
            point=points[name],
            low=float(low),
            high=float(high),
            n_resamples=len(indices),
            n_skipped=int(values.size - valid.size),
            alpha=alpha,
        )
    return out


def _safe_metric(fn: Callable, arrays: Sequence[np.ndarray]) -> float:
    """The metric as a float; NaN when it is undefined on these rows (one class present)."""
    try:
        value = fn(*arrays)
    except ValueError:
        # e.g. sklearn.metrics.roc_auc_score on one class: an undefined value, not an error
        if len(arrays) >= 1 and _single_class(np.asarray(arrays[0])):
            return math.nan
        raise
    value = float(value)
    return value


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y: Iterable,
    p: Iterable,
    groups: Iterable | None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Point estimate and percentile CI of a metric by grouped (cluster) bootstrap.

    Resamples whole groups with replacement (:func:`grouped_resample_indices`), computes
    ``metric_fn(y[idx], p[idx])`` on each resample and takes the ``alpha / 2`` and
    ``1 - alpha / 2`` percentiles (the percentile interval). A resample on which the metric is
    undefined - it returns NaN, or raises ``ValueError`` on a resample with a single class
    (``sklearn.metrics.roc_auc_score`` does) - is **skipped** and counted in
    ``n_skipped``; report that number, as many skips mean the interval is unreliable (too few
    positive groups). Deterministic: the same seed gives the same interval.

    Parameters
    ----------
    metric_fn : callable
        ``metric_fn(y, p) -> float``, e.g. :func:`roc_auc` or
        ``lambda y, p: threshold_metrics(y, p, t)["sensitivity"]``.
    y : array-like, shape (N,)
        0/1 labels.
    p : array-like, shape (N,)
        Probabilities in [0, 1].
    groups : array-like, shape (N,), or None
        Source group of each case (patient, source image); None resamples rows (only right
        when rows are independent).
    n_resamples : int, default 1000
        E.g. ``config.get_profile().bootstrap_resamples``.
    seed : int, default 0
    alpha : float, default 0.05
        0.05 gives a 95 % interval.

    Returns
    -------
    BootstrapCI
        Unpacks as ``(point, low, high)``; also carries ``n_skipped`` and ``n_resamples``.

    Raises
    ------
    ValueError
        On invalid inputs.
    """
    y_arr, p_arr = check_labels_and_probabilities(y, p, name="p")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, y_arr.size), n_resamples, seed)
    return _bootstrap_many({"metric": metric_fn}, (y_arr, p_arr), indices, alpha)["metric"]


def bootstrap_mean_ci(
    values: Iterable, groups: Iterable | None, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> BootstrapCI:
    """Mean of per-case values (e.g. pointing-game hits) with a grouped bootstrap CI.

    Parameters
    ----------
    values : array-like, shape (N,)
        Finite numbers.
    groups : array-like, shape (N,), or None

    Returns
    -------
    BootstrapCI
    """
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("values is empty: nothing to average")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v[~np.isfinite(v)][0]!r}")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, v.size), n_resamples, seed)
    return _bootstrap_many({"mean": lambda a: float(np.mean(a))}, (v,), indices, alpha)["mean"]


def paired_auc_test(
    y: Iterable,
    p_a: Iterable,
    p_b: Iterable,
    groups: Iterable | None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Paired grouped-bootstrap comparison of two models' ROC AUC on the same cases.

    Both models are evaluated on the *same* resampled groups, so the correlation between them
    (same cases, same hard examples) is kept; this is what makes the test paired.

    ``diff = AUC(p_a) - AUC(p_b)`` on the full data; the CI is the percentile interval of the
    bootstrap differences ``d*``. The two-sided p-value inverts that interval:

    ``p = min(1, 2 * (min(#{d* <= 0}, #{d* >= 0}) + 1) / (B + 1))``

    with ``B`` the number of valid resamples: twice the share of the bootstrap distribution on
    the far side of 0, with the usual +1 so that it is never exactly 0 (its smallest value is
    ``2 / (B + 1)``). ``p < alpha`` corresponds to a ``1 - alpha`` percentile interval that
    excludes 0. Identical models give ``diff = 0`` and ``p = 1``. Resamples with one class are
    skipped and counted.

    Parameters
    ----------
    y : array-like, shape (N,)
        0/1 labels.
    p_a, p_b : array-like, shape (N,)
        The two models' probabilities for the same cases, in the same order.
    groups : array-like, shape (N,), or None
    n_resamples : int, default 1000
    seed : int, default 0
    alpha : float, default 0.05

    Returns
    -------
    dict
        ``diff``, ``ci_low``, ``ci_high``, ``p_value``, ``auc_a``, ``auc_b``,
        ``n_resamples``, ``n_skipped``.
    """
    from scipy.stats import rankdata  # noqa: PLC0415

    y_arr, pa = check_labels_and_probabilities(y, p_a, name="p_a")
    _, pb = check_labels_and_probabilities(y, p_b, name="p_b")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, y_arr.size), n_resamples, seed)
    auc_a, auc_b = _roc_auc(y_arr, pa, rankdata), _roc_auc(y_arr, pb, rankdata)
    diffs = []
    for idx in indices:
        yy = y_arr[idx]
        if _single_class(yy):
            continue
        diffs.append(_roc_auc(yy, pa[idx], rankdata) - _roc_auc(yy, pb[idx], rankdata))
    d = np.asarray(diffs, dtype=float)
    if d.size >= 2:
        low, high = (float(v) for v in np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0]))
        tail = min(int(np.count_nonzero(d <= 0)), int(np.count_nonzero(d >= 0)))
        p_value = min(1.0, 2.0 * (tail + 1) / (d.size + 1))
    else:
        low = high = p_value = math.nan
    return {
        "diff": auc_a - auc_b,
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
        "auc_a": auc_a,
        "auc_b": auc_b,
        "n_resamples": n_resamples,
        "n_skipped": n_resamples - int(d.size),
    }


# --------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------
def evaluate_model(
    y_true: Iterable,
    y_prob: Iterable,
    groups: Iterable | None,
    thresholds: Mapping[str, float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds for one model on one (test) set.

    All intervals come from the **same** grouped bootstrap resamples (one seed), so they are
    mutually consistent.

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture.
    y_prob : array-like, shape (N,)
        Fracture probabilities in [0, 1].
    groups : array-like, shape (N,), or None
        Source group of each case (the manifest's ``group``).
    thresholds : dict
        Operating points chosen on validation, e.g. from :func:`choose_operating_points`:
        ``{"youden": 0.41, "sens95": 0.18}``.
    n_resamples : int, default 1000
    seed : int, default 0
    alpha : float, default 0.05
    n_bins : int, default 10
        ECE bins.

    Returns
    -------
    dict
        ``counts``
            ``n``, ``n_positive``, ``n_negative``, ``n_groups``, ``prevalence``.
        ``threshold_free``
            For each of :data:`THRESHOLD_FREE_METRICS`: ``{"value", "ci_low", "ci_high",
            "n_resamples", "n_skipped"}``.
        ``operating_points``
            For each threshold name: ``threshold``, ``tp``, ``fp``, ``tn``, ``fn`` and each of
            :data:`THRESHOLD_METRICS` as ``{"value", "ci_low", "ci_high", ...}``.
        ``bootstrap``
            ``method``, ``unit``, ``n_resamples``, ``seed``, ``alpha``, ``interval``.

    Raises
    ------
    ValueError
        On invalid inputs or thresholds.
    """
    from scipy.stats import rankdata  # noqa: PLC0415

    y, p = check_labels_and_probabilities(y_true, y_prob)
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise ValueError(f"thresholds must be a non-empty dict name -> probability, got {thresholds!r}")
    checked = {str(k): _check_threshold(v) for k, v in thresholds.items()}
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    n_bins = _check_bins(n_bins)
    g = _check_groups(groups, y.size)
    indices = grouped_resample_indices(g, n_resamples, seed)

    fns: dict[str, Callable] = {
        "roc_auc": lambda yy, pp: _roc_auc(yy, pp, rankdata),
        "pr_auc": _average_precision,
        "brier": lambda yy, pp: float(np.mean((pp - yy) ** 2)),
        "ece": lambda yy, pp: _ece(yy, pp, n_bins),
    }

    def at(t: float, name: str) -> Callable:
        return lambda yy, pp: _metrics_from_counts(**_counts(yy, pp >= t))[name]

    for op, t in checked.items():
        for m in THRESHOLD_METRICS:
            fns[f"{op}/{m}"] = at(t, m)
    cis = _bootstrap_many(fns, (y, p), indices, alpha)

    n_pos = int(y.sum())
    result: dict[str, Any] = {
        "counts": {
            "n": int(y.size),
            "n_positive": n_pos,
            "n_negative": int(y.size - n_pos),
            "n_groups": int(np.unique(g).size),
            "prevalence": _ratio(n_pos, y.size),
        },
        "threshold_free": {m: cis[m].as_dict() for m in THRESHOLD_FREE_METRICS},
        "operating_points": {},
        "bootstrap": {
            "method": "grouped (cluster) bootstrap: source groups resampled with replacement",
            "unit": "group" if groups is not None else "case",
            "interval": "percentile",
            "n_resamples": n_resamples,
            "seed": seed,
            "alpha": alpha,
            "ece_bins": n_bins,
        },
    }
    for op, t in checked.items():
        entry: dict[str, Any] = {"threshold": t}
        entry.update(_counts(y, p >= t))
        for m in THRESHOLD_METRICS:
            entry[m] = cis[f"{op}/{m}"].as_dict()
        result["operating_points"][op] = entry
    return result


def _to_jsonable(value: Any) -> Any:
    """NumPy -> Python, NaN/inf -> None (strict JSON has no NaN), paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_to_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, BootstrapCI):
        return _to_jsonable(value.as_dict())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return _to_jsonable(asdict(value))
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to JSON")


def save_metrics(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write metrics as strict, indented JSON (NaN becomes ``null``); return the path.

    The parent folder is created. Typical path: ``config.artifacts_dir() / "<model>" /
    "metrics.json"``.

    Raises
    ------
    ValueError
        If a value cannot be written as JSON (it is named).
    """
    path = Path(path)
    text = json.dumps(_to_jsonable(metrics), indent=2, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_metrics` (``null`` stays ``None``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}: run evaluate_model and save_metrics first")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``(nan, nan)`` when ``n == 0``.

    Used for subgroup cells, where cases are few; it treats cases as independent.
    """
    from scipy.stats import norm  # noqa: PLC0415

    if n <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(1.0 - alpha / 2.0))
    phat = successes / n
    den = 1.0 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def _cell_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return "n/a"
    return str(v)


def subgroup_table(
    df: pd.DataFrame,
    threshold: float,
    by: Sequence[str] | None = None,
    y_col: str = "y",
    p_col: str = "p",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Performance per subgroup: sensitivity, specificity and AUC where defined, with ``n``.

    For each column in ``by`` and each of its values (a *cell*): ``n``, ``n_positive``,
    ``n_negative``; sensitivity (cells with fractures) and specificity (cells with normal
    cases), each with a Wilson ``1 - alpha`` interval; ROC AUC (cells with both classes).
    Undefined entries are NaN. Typical use on the synthetic data: sensitivity per
    ``fracture_type`` and ``difficulty`` (normal slices fall into the cell ``"none"`` /
    ``"n/a"`` and give specificity), specificity and AUC per ``level``.

    The Wilson intervals treat the cases of a cell as independent; small cells are the rule,
    so read the ``n`` before the point estimate.

    Parameters
    ----------
    df : pandas.DataFrame
        One row per case with ``y_col`` (0/1), ``p_col`` (probability) and the metadata columns.
    threshold : float
        The operating point (chosen on validation).
    by : sequence of str, optional
        Metadata columns; default those of ``("fracture_type", "difficulty", "level")`` that
        ``df`` has.
    y_col, p_col : str
    alpha : float, default 0.05

    Returns
    -------
    pandas.DataFrame
        Columns ``variable``, ``value``, ``n``, ``n_positive``, ``n_negative``, ``sensitivity``,
        ``sensitivity_low``, ``sensitivity_high``, ``specificity``, ``specificity_low``,
        ``specificity_high``, ``roc_auc``; one row per cell, variables in ``by`` order and
        values sorted.

    Raises
    ------
    ValueError
        If a named column is missing (it is named) or the values are invalid.
    """
    import pandas as pd  # noqa: PLC0415
    from scipy.stats import rankdata  # noqa: PLC0415

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    for col in (y_col, p_col):
        if col not in df.columns:
            raise ValueError(f"df has no column {col!r}; columns: {list(df.columns)}")
    if by is None:
        by = [c for c in ("fracture_type", "difficulty", "level") if c in df.columns]
        if not by:
            raise ValueError(
                "df has none of the columns fracture_type, difficulty, level; name the subgroup columns with by="
            )
    else:
        by = [by] if isinstance(by, str) else list(by)
        missing = [c for c in by if c not in df.columns]
        if missing:
            raise ValueError(f"df has no column {missing[0]!r}; columns: {list(df.columns)}")
    y, p = check_labels_and_probabilities(df[y_col].to_numpy(), df[p_col].to_numpy(), name=p_col)
    t = _check_threshold(threshold)
    predicted = p >= t
    rows = []
    for var in by:
        values = np.array([_cell_value(v) for v in df[var].tolist()], dtype=object)
        for value in sorted(set(values.tolist()), key=_natural_key):
            sel = values == value
            yy, pp = y[sel], p[sel]
            c = _counts(yy, predicted[sel])
            n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
            s_lo, s_hi = wilson_interval(c["tp"], n_pos, alpha)
            sp_lo, sp_hi = wilson_interval(c["tn"], n_neg, alpha)
            rows.append(
                {
                    "variable": var,
                    "value": value,
                    "n": int(sel.sum()),
                    "n_positive": n_pos,
                    "n_negative": n_neg,
                    "sensitivity": _ratio(c["tp"], n_pos),
                    "sensitivity_low": s_lo,
                    "sensitivity_high": s_hi,
                    "specificity": _ratio(c["tn"], n_neg),
                    "specificity_low": sp_lo,
                    "specificity_high": sp_hi,
                    "roc_auc": _roc_auc(yy, pp, rankdata),
                }
            )
    return pd.DataFrame(rows)


def _natural_key(text: str) -> tuple:
    """Sort "C2" before "C10" and "0.5" before "1"; "n/a" and "none" last."""
    import re  # noqa: PLC0415

    if text in ("n/a", "none"):
        return (2, text)
    try:
        return (0, float(text), "")
    except ValueError:
        parts = re.split(r"(\d+)", text)
        return (1, tuple((int(s) if s.isdigit() else s) for s in parts))


def _fmt_ci(entry: Mapping | None, digits: int) -> str:
    if not entry or entry.get("value") is None or not _finite(entry.get("value")):
        return "n/a"
    text = f"{entry['value']:.{digits}f}"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    if _finite(lo) and _finite(hi):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def combined_table(
    metrics_by_model: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, str] | None = None,
    digits: int = 3,
) -> pd.DataFrame:
    """One row per model from :func:`evaluate_model` results (or loaded ``metrics.json``).

    Parameters
    ----------
    metrics_by_model : dict
        Model name -> metrics dict.
    weights : dict, optional
        Model name -> where its weights came from (e.g. ``bundle.config["weights"]
        ["description"]``); a ``"weights"`` entry inside a metrics dict is used otherwise.
    digits : int, default 3

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``n``, ``ROC AUC [95% CI]``, ``PR AUC [95% CI]``, ``Brier``, ``ECE``,
        then for each operating point ``threshold (<op>)``, ``sensitivity (<op>)``,
        ``specificity (<op>)`` (point estimates with CIs, as text), and ``weights`` when any
        model has a source. Cells are strings ready to print.
    """
    import pandas as pd  # noqa: PLC0415

    if not isinstance(metrics_by_model, Mapping) or not metrics_by_model:
        raise ValueError("metrics_by_model must be a non-empty dict model name -> metrics")
    level = None
    ops: list[str] = []
    for name, m in metrics_by_model.items():
        if not isinstance(m, Mapping) or "threshold_free" not in m:
            raise ValueError(f"metrics of {name!r} are not from evaluate_model (no 'threshold_free')")
        level = level or (m.get("bootstrap") or {}).get("alpha")
        for op in m.get("operating_points") or {}:
            if op not in ops:
                ops.append(op)
    pct = f"{100 * (1 - float(level or 0.05)):g}% CI"
    rows = []
    for name, m in metrics_by_model.items():
        tf = m["threshold_free"]
        row: dict[str, Any] = {
            "model": str(name),
            "n": (m.get("counts") or {}).get("n"),
            f"ROC AUC [{pct}]": _fmt_ci(tf.get("roc_auc"), digits),
            f"PR AUC [{pct}]": _fmt_ci(tf.get("pr_auc"), digits),
            "Brier": _fmt_ci(tf.get("brier"), digits),
            "ECE": _fmt_ci(tf.get("ece"), digits),
        }
        for op in ops:
            entry = (m.get("operating_points") or {}).get(op) or {}
            t = entry.get("threshold")
            row[f"threshold ({op})"] = f"{t:.{digits}f}" if _finite(t) else "n/a"
            row[f"sensitivity ({op})"] = _fmt_ci(entry.get("sensitivity"), digits)
            row[f"specificity ({op})"] = _fmt_ci(entry.get("specificity"), digits)
        source = (weights or {}).get(name) if weights else None
        if source is None:
            w = m.get("weights")
            source = w.get("description", w.get("source")) if isinstance(w, Mapping) else w
        row["weights"] = "" if source is None else str(source)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table["weights"].astype(bool).any():
        table = table.drop(columns="weights")
    return table


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _pyplot():
    from .plots import pyplot  # noqa: PLC0415 - one backend rule for every figure

    return pyplot()


def plot_confusion(
    y: Iterable, p: Iterable, threshold: float, title: str = "", class_names: Sequence[str] = ("normal", "fracture")
) -> Figure:
    """Confusion matrix at ``threshold``: counts with the share of each true class.

    Rows are the true class, columns the predicted one; the title adds sensitivity and
    specificity.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    m = threshold_metrics(y, p, threshold)
    table = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    row_share = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{table[i, j]}\n({100 * row_share[i, j]:.0f} %)",
                ha="center",
                va="center",
                color="white" if row_share[i, j] > 0.6 else "black",
                fontsize=11,
            )
    ax.set_xticks([0, 1], [f"pred. {c}" for c in class_names])
    ax.set_yticks([0, 1], [f"true {c}" for c in class_names])
    sens = "n/a" if math.isnan(m["sensitivity"]) else f"{m['sensitivity']:.2f}"
    spec = "n/a" if math.isnan(m["specificity"]) else f"{m['specificity']:.2f}"
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}threshold {m['threshold']:.3f}: sensitivity {sens}, specificity {spec}", fontsize=10)
    fig.tight_layout()
    return fig


def _ci_text(cis: Mapping | None, model: str, key: str) -> str:
    """' [lo, hi]' from cis[model], which may be an evaluate_model dict or {key: (lo, hi)}."""
    if not cis or model not in cis:
        return ""
    entry = cis[model]
    if isinstance(entry, Mapping) and "threshold_free" in entry:
        entry = entry["threshold_free"]
    item = entry.get(key) if isinstance(entry, Mapping) else None
    if isinstance(item, Mapping):
        lo, hi = item.get("ci_low"), item.get("ci_high")
    elif isinstance(item, BootstrapCI):
        lo, hi = item.low, item.high
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        lo, hi = item[-2], item[-1]
    else:
        return ""
    return f" [{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""


def plot_roc_pr(y: Iterable, probs_by_model: Mapping[str, Iterable], cis: Mapping[str, Any] | None = None) -> Figure:
    """ROC curves (left) and precision-recall curves (right) of several models on the same cases.

    Parameters
    ----------
    y : array-like, shape (N,)
        0/1 labels, both classes present.
    probs_by_model : dict
        Model name -> probabilities, shape (N,).
    cis : dict, optional
        Model name -> either an :func:`evaluate_model` result or ``{"roc_auc": (low, high),
        "pr_auc": (low, high)}``; the intervals are shown in the legend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: PLC0415

    plt = _pyplot()
    if not probs_by_model:
        raise ValueError("probs_by_model is empty: pass at least one model's probabilities")
    y_arr = check_labels_and_probabilities(y, next(iter(probs_by_model.values())))[0]
    if _single_class(y_arr):
        raise ValueError("ROC and PR curves need both classes in y")
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.6))
    for name, probs in probs_by_model.items():
        yy, pp = check_labels_and_probabilities(y_arr, probs, name=f"probabilities of {name!r}")
        fpr, tpr, _ = roc_curve(yy, pp)
        ax_roc.plot(fpr, tpr, lw=1.8, label=f"{name}: AUC {roc_auc(yy, pp):.3f}{_ci_text(cis, name, 'roc_auc')}")
        precision, recall, _ = precision_recall_curve(yy, pp)
        ax_pr.step(
            recall,
            precision,
            where="post",
            lw=1.8,
            label=f"{name}: AP {pr_auc(yy, pp):.3f}{_ci_text(cis, name, 'pr_auc')}",
        )
    ax_roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    prevalence = float(y_arr.mean())
    ax_pr.axhline(prevalence, ls="--", c="grey", lw=1, label=f"chance (prevalence {prevalence:.2f})")
    ax_roc.set(
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
        title="ROC",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax_pr.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    for ax in (ax_roc, ax_pr):
        ax.set_aspect("equal")
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_calibration(y: Iterable, probs_by_model: Mapping[str, Iterable], n_bins: int = 10) -> Figure:
    """Reliability diagram: observed fracture fraction vs mean predicted probability per bin.

    The top panel shows one line per model (equal-width bins, as in
    :func:`expected_calibration_error`; ECE in the legend) and the diagonal of perfect
    calibration; the bottom panel the histogram of predictions (how many cases each point
    rests on).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    if not probs_by_model:
        raise ValueError("probs_by_model is empty: pass at least one model's probabilities")
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, _check_bins(n_bins) + 1)
    for name, probs in probs_by_model.items():
        yy, pp = check_labels_and_probabilities(y, probs, name=f"probabilities of {name!r}")
        table = calibration_bins(yy, pp, n_bins)
        table = table[table["n"] > 0]
        ax.plot(
            table["mean_predicted"],
            table["observed_fraction"],
            marker="o",
            lw=1.5,
            label=f"{name}: ECE {_ece(yy, pp, n_bins):.3f}",
        )
        ax_hist.hist(pp, bins=edges, histtype="step", lw=1.5, label=name)
    ax.set(ylabel="observed fraction of fractures", xlim=(0, 1), ylim=(0, 1), title="Calibration (reliability diagram)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax_hist.set(xlabel="predicted fracture probability", ylabel="cases")
    fig.tight_layout()
    return fig


def plot_threshold_sweep(
    y: Iterable, p: Iterable, marks: Mapping[str, float] | None = None, n_points: int = 201
) -> Figure:
    """Sensitivity, specificity and PPV against the threshold, with chosen thresholds marked.

    Parameters
    ----------
    y, p : array-like, shape (N,)
    marks : dict, optional
        Name -> threshold (e.g. from :func:`choose_operating_points`), drawn as vertical lines.
    n_points : int, default 201
        Thresholds evaluated, evenly spaced on [0, 1].

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    yy, pp = check_labels_and_probabilities(y, p)
    grid = np.linspace(0.0, 1.0, int(n_points))
    curves = {k: [] for k in ("sensitivity", "specificity", "ppv")}
    for t in grid:
        m = _metrics_from_counts(**_counts(yy, pp >= t))
        for k in curves:
            curves[k].append(m[k])
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"sensitivity": "-", "specificity": "-", "ppv": ":"}
    for k, values in curves.items():
        ax.plot(grid, values, ls=styles[k], lw=1.8, label=k.upper() if k == "ppv" else k)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, t) in enumerate((marks or {}).items()):
        t = _check_threshold(t)
        m = _metrics_from_counts(**_counts(yy, pp >= t))
        ax.axvline(
            t,
            color=colours[(i + 3) % len(colours)],
            ls="--",
            lw=1.2,
            label=f"{name}: t={t:.3f} (sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f})",
        )
    ax.set(
        xlabel="threshold on the fracture probability",
        ylabel="value",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title="Sensitivity and specificity vs threshold",
    )
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_subgroups(table: pd.DataFrame) -> Figure:
    """Bar chart of a :func:`subgroup_table`: one panel per variable, sensitivity and
    specificity per value with Wilson intervals and ``n`` under each bar group.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    need = {"variable", "value", "n", "sensitivity", "specificity"}
    if not need.issubset(getattr(table, "columns", ())):
        raise ValueError(f"table must come from subgroup_table (columns {sorted(need)})")
    variables = list(dict.fromkeys(table["variable"].tolist()))
    if not variables:
        raise ValueError("table is empty: no subgroups to plot")
    fig, axes = plt.subplots(1, len(variables), figsize=(4.2 * len(variables), 3.8), squeeze=False)
    for ax, var in zip(axes[0], variables):
        part = table[table["variable"] == var].reset_index(drop=True)
        x = np.arange(len(part))
        for offset, metric in ((-0.2, "sensitivity"), (0.2, "specificity")):
            values = part[metric].to_numpy(dtype=float)
            lo = part.get(f"{metric}_low", part[metric]).to_numpy(dtype=float)
            hi = part.get(f"{metric}_high", part[metric]).to_numpy(dtype=float)
            err = np.clip(np.vstack([np.nan_to_num(values - lo), np.nan_to_num(hi - values)]), 0, None)  # rounding
            ax.bar(x + offset, values, width=0.4, yerr=err, capsize=2, label=metric)  # NaN: no bar
        ax.set_xticks(x, [f"{v}\nn={n}" for v, n in zip(part["value"], part["n"])], fontsize=8)
        ax.set(ylim=(0, 1.05), title=str(var))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("value (95 % Wilson interval)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig
