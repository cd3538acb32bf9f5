"""Metrics, confidence intervals and evaluation figures for a binary fracture classifier.

Operating points chosen on validation only (:func:`choose_threshold`), metrics at a threshold and
threshold-free ones, 95 % intervals by grouped (cluster) bootstrap (slices of one patient are not
independent) or exact binomial where a bootstrap cannot vary, a paired model comparison, subgroups,
``metrics.json`` and figures: what CLAIM and TRIPOD+AI ask of a test-set evaluation. Labels are 0/1
(1 = fracture); probabilities are of "fracture"; ``probability >= threshold`` is called fracture.
Undefined metrics (sensitivity without positives, AUC on one class) are NaN (``null`` in JSON).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import binomtest, rankdata

from . import records

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Metrics of :func:`threshold_metrics` (besides the counts), in report order.
THRESHOLD_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "f1")
#: Metrics of :func:`threshold_free_metrics`, in report order.
THRESHOLD_FREE_METRICS: tuple[str, ...] = ("roc_auc", "pr_auc", "brier", "ece")
#: Rules of :func:`choose_threshold`.
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "f1", "sensitivity")
#: Proportions with their (successes, failures) counts: exact binomial intervals apply to them.
_PROPORTIONS = {
    "sensitivity": (("tp",), ("fn",)),
    "specificity": (("tn",), ("fp",)),
    "ppv": (("tp",), ("fp",)),
    "npv": (("tn",), ("fn",)),
    "accuracy": (("tp", "tn"), ("fp", "fn")),
}
EXACT_INTERVAL = "exact binomial (Clopper-Pearson)"


# --- Input checks ---
def check_labels_and_probabilities(
    y_true: Iterable, y_prob: Iterable, *, name: str = "y_prob"
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) int64 0/1 and probabilities (N,) float64 in [0, 1]; ``ValueError`` naming the first
    bad value (``name``: what the message calls the probabilities)."""
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
        t = math.nan
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    return t


def _check_groups(groups: Iterable | None, n: int) -> np.ndarray:
    """Groups as a 1-D str array of length ``n``; ``None`` makes every row its own group."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != n:
        raise ValueError(f"groups has {g.size} values but there are {n} cases")
    missing = [v for v in g if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise ValueError(f"groups must name a group for every case, got {missing[0]!r}")
    return g.astype(str)


def _is_count(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum


def _check_resamples(n_resamples: Any, seed: Any, alpha: Any) -> tuple[int, int, float]:
    if not _is_count(n_resamples, 1):
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not _is_count(seed, 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (0.05 gives 95 % intervals), got {alpha!r}")
    return int(n_resamples), int(seed), float(alpha)


def _check_bins(n_bins: Any) -> int:
    if not _is_count(n_bins, 1):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def _single_class(y: np.ndarray) -> bool:
    return y.size == 0 or int(y.min()) == int(y.max())


# --- Metrics at a threshold ---
def _counts(y: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    pos = y == 1
    tp, fp, fn = (int(np.count_nonzero(a & b)) for a, b in ((predicted, pos), (predicted, ~pos), (~predicted, pos)))
    return {"tp": tp, "fp": fp, "tn": int(y.size) - tp - fp - fn, "fn": fn}


def _metrics_from_counts(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
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
    """Metrics at one threshold: ``threshold``, ``n``, ``n_positive``, ``n_negative``, the counts
    ``tp``, ``fp``, ``tn``, ``fn`` and :data:`THRESHOLD_METRICS` (labels and probabilities shape (N,)).

    sensitivity TP/(TP+FN), specificity TN/(TN+FP), ppv TP/(TP+FP), npv TN/(TN+FN), accuracy
    (TP+TN)/N, balanced_accuracy (sens+spec)/2, f1 2TP/(2TP+FP+FN). An undefined metric is NaN, not
    scikit-learn's 0: a resample or subgroup without positives shows as "not estimable".
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    t = _check_threshold(threshold)
    counts = _counts(y, p >= t)
    out: dict[str, Any] = {"threshold": t, "n": int(y.size), "n_positive": int(y.sum())}
    out["n_negative"] = int(y.size - y.sum())
    return {**out, **counts, **_metrics_from_counts(**counts)}


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> dict[str, float]:
    """PPV and NPV at another prevalence, by Bayes' rule: ``{"ppv": ..., "npv": ...}`` (NaN where undefined).

    ``ppv = se pi / (se pi + (1 - sp)(1 - pi))`` and ``npv = sp (1 - pi) / (sp (1 - pi) + (1 - se) pi)``,
    with ``se``, ``sp`` and ``pi`` in [0, 1] (or NaN); at the test set's own prevalence they equal the counted ones.
    """
    se, sp, pi = (float(v) for v in (sensitivity, specificity, prevalence))
    if any(v < 0.0 or v > 1.0 for v in (se, sp, pi)):  # NaN (undefined) passes and gives NaN
        raise ValueError(f"sensitivity, specificity and prevalence must lie in [0, 1], got {se!r}, {sp!r}, {pi!r}")
    return {
        "ppv": _ratio(se * pi, se * pi + (1 - sp) * (1 - pi)),
        "npv": _ratio(sp * (1 - pi), sp * (1 - pi) + (1 - se) * pi),
    }


# --- Threshold-free metrics ---
def roc_auc(y_true: Iterable, y_prob: Iterable) -> float:
    """ROC AUC (0.5 is chance; NaN with one class): P(random fracture scores above random normal),
    ties counting one half (the Mann-Whitney statistic, as ``sklearn.metrics.roc_auc_score``)."""
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return _roc_auc(y, p)


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)  # average ranks for ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y_true: Iterable, y_prob: Iterable) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` (as scikit-learn; no optimistic trapezoids).

    Chance level is the prevalence, not 0.5; NaN without positives.
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return _average_precision(y, p)


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    ends = np.r_[np.nonzero(np.diff(p_sorted))[0], y.size - 1]  # one curve point per distinct score
    tp = np.cumsum(y_sorted)[ends]
    precision, recall = tp / (ends + 1), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def brier_score(y_true: Iterable, y_prob: Iterable) -> float:
    """``mean((p - y)^2)`` in [0, 1]; 0 is perfect, always predicting the prevalence pi scores pi (1 - pi)."""
    return _brier(*check_labels_and_probabilities(y_true, y_prob))


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin k holds ``k/n <= p < (k+1)/n``; p = 1 goes in the last."""
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(y_true: Iterable, y_prob: Iterable, n_bins: int = 10) -> float:
    """``sum_b (n_b / N) |mean(y in b) - mean(p in b)|`` over ``n_bins`` equal-width bins, in [0, 1].

    0 is perfect; with few cases per bin noise alone makes it positive, so compare models on the
    same data. NaN for empty input.
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
    """One row per bin of :func:`expected_calibration_error`: ``bin_low``, ``bin_high``, ``n``,
    ``mean_predicted``, ``observed_fraction`` (NaN for empty bins)."""
    import pandas as pd  # noqa: PLC0415

    y, p = check_labels_and_probabilities(y_true, y_prob)
    n_bins = _check_bins(n_bins)
    b = _bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=n_bins) / count
        frac_y = np.bincount(b, weights=y, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    columns = {"bin_low": edges[:-1], "bin_high": edges[1:], "n": count}
    return pd.DataFrame({**columns, "mean_predicted": mean_p, "observed_fraction": frac_y})


def _threshold_free_functions(n_bins: int) -> dict[str, Callable]:
    return {"roc_auc": _roc_auc, "pr_auc": _average_precision, "brier": _brier, "ece": lambda y, p: _ece(y, p, n_bins)}


def threshold_free_metrics(y_true: Iterable, y_prob: Iterable, n_bins: int = 10) -> dict[str, float]:
    """ROC AUC, PR AUC, Brier score and ECE: keys of :data:`THRESHOLD_FREE_METRICS`, NaN where undefined."""
    y, p = check_labels_and_probabilities(y_true, y_prob)
    return {k: fn(y, p) for k, fn in _threshold_free_functions(_check_bins(n_bins)).items()}


# --- Operating points (validation only) ---
def choose_threshold(
    y_true: Iterable, y_prob: Iterable, method: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """The decision threshold (a probability) chosen on validation data: the project's one chooser.

    Candidates are the distinct probabilities (both classes needed). ``"youden"`` maximises
    Youden's J = sensitivity + specificity - 1; ``"f1"`` maximises 2 TP / (2 TP + FP + FN);
    ``"sensitivity"`` is the **largest** threshold whose sensitivity is >= ``target_sensitivity``
    (in (0, 1]). Ties go to the **lower** threshold: a missed fracture costs more than a false alarm.
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
    """``{"youden": t1, "sens95": t2}`` chosen on **validation** by :func:`choose_threshold` (the second
    key is ``f"sens{round(100 * target)}"``); on test the sensitivity may fall below the target."""
    key = f"sens{int(round(100 * float(target_sensitivity)))}"
    return {
        "youden": choose_threshold(y_val, p_val, "youden"),
        key: choose_threshold(y_val, p_val, "sensitivity", target_sensitivity),
    }


def validation_metrics(y_true: Iterable, y_prob: Iterable, threshold: float) -> dict[str, float | int]:
    """The one validation summary notebooks 03, 04 and 05 print and bundles store: ``auc`` (ROC AUC),
    ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``accuracy`` (NaN where undefined) and the
    counts ``tp``, ``fp``, ``tn``, ``fn``, ``n`` at ``threshold``."""
    m = threshold_metrics(y_true, y_prob, threshold)
    keys = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "tp", "fp", "tn", "fn", "n")
    return {"auc": roc_auc(y_true, y_prob), **{k: m[k] for k in keys}}


# --- Grouped (cluster) bootstrap ---
@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate and the ``alpha/2``, ``1 - alpha/2`` percentiles of its valid resamples (NaN if
    fewer than 2); ``n_skipped`` resamples had an undefined metric. Unpacks as ``point, low, high``."""

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
        keys = ("value", "ci_low", "ci_high", "n_resamples", "n_skipped")
        return dict(zip(keys, (self.point, self.low, self.high, self.n_resamples, self.n_skipped)))


def grouped_resample_indices(
    groups: Iterable | None, n_resamples: int, seed: int = 0, n: int | None = None
) -> list[np.ndarray]:
    """``n_resamples`` index arrays of cluster-bootstrap resamples (same ``seed``, same resamples).

    Each draws as many groups as there are, with replacement, and takes all rows of each, so slices
    of one patient stay together (about, not exactly, N rows). ``groups=None``: every row is its own
    group (the ordinary bootstrap; ``n``, the number of rows, is then required).
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
    return [np.concatenate([members[k] for k in rng.integers(0, n_groups, size=n_groups)]) for _ in range(n_resamples)]


def _safe_metric(fn: Callable, arrays: Sequence[np.ndarray]) -> float:
    """The metric as a float; NaN when it raises ``ValueError`` on a resample with one class."""
    try:
        return float(fn(*arrays))
    except ValueError:  # e.g. sklearn.metrics.roc_auc_score on one class: undefined, not an error
        if _single_class(np.asarray(arrays[0])):
            return math.nan
        raise


def _bootstrap_many(
    metric_fns: Mapping[str, Callable], arrays: Sequence[np.ndarray], indices: list[np.ndarray], alpha: float
) -> dict[str, BootstrapCI]:
    """Every metric on the full data and on each resample (the same resamples for all)."""
    points = {name: _safe_metric(fn, arrays) for name, fn in metric_fns.items()}
    stats = np.array([[_safe_metric(fn, [a[idx] for a in arrays]) for fn in metric_fns.values()] for idx in indices])
    out = {}
    for k, name in enumerate(metric_fns):
        valid = stats[:, k][np.isfinite(stats[:, k])]
        low, high = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0]) if valid.size >= 2 else (math.nan,) * 2
        skipped = len(indices) - valid.size
        out[name] = BootstrapCI(points[name], float(low), float(high), len(indices), int(skipped), alpha)
    return out


def bootstrap_ci(
    metric_fn: Callable, y: Iterable, p: Iterable, groups: Iterable | None, n_resamples=1000, seed=0, alpha=0.05
) -> BootstrapCI:
    """Point estimate and percentile ``1 - alpha`` interval of ``metric_fn(y, p)`` by grouped bootstrap.

    ``groups`` (shape (N,)) name each case's source (patient); None resamples rows. A resample where
    the metric is undefined (NaN, or ``ValueError`` on one class) is skipped and counted in
    ``n_skipped``: many skips mean too few positive groups.
    """
    y_arr, p_arr = check_labels_and_probabilities(y, p, name="p")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, y_arr.size), n_resamples, seed)
    return _bootstrap_many({"metric": metric_fn}, (y_arr, p_arr), indices, alpha)["metric"]


def bootstrap_mean_ci(
    values: Iterable, groups: Iterable | None, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> BootstrapCI:
    """Mean of per-case finite values, shape (N,) (e.g. pointing-game hits), with a grouped bootstrap CI."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("values is empty: nothing to average")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v[~np.isfinite(v)][0]!r}")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, v.size), n_resamples, seed)
    return _bootstrap_many({"mean": lambda a: float(np.mean(a))}, (v,), indices, alpha)["mean"]


def exact_binomial_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) ``1 - alpha`` interval of ``successes`` of ``n`` independent cases.

    For small subgroups and where a bootstrap cannot vary (35 of 35 gives [0.900, 1.000], not
    [1, 1]); ``(nan, nan)`` when ``n == 0``.
    """
    if not (_is_count(successes, 0) and _is_count(n, 0) and successes <= n):
        raise ValueError(f"need 0 <= successes <= n (integers), got {successes!r} of {n!r}")
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=1.0 - float(alpha), method="exact")
    return float(ci.low), float(ci.high)


# --- Paired comparison ---
def paired_auc_test(
    y: Iterable, p_a: Iterable, p_b: Iterable, groups: Iterable | None, n_resamples=1000, seed=0, alpha=0.05
) -> dict[str, float | int]:
    """Paired grouped-bootstrap comparison of two models' ROC AUC on the same cases.

    Both models are scored on the *same* resampled groups (paired). Returns ``diff = AUC(p_a) -
    AUC(p_b)``, the percentile CI of the bootstrap differences ``d*`` (``ci_low``, ``ci_high``), the
    two-sided ``p_value = min(1, 2 (min(#{d* <= 0}, #{d* >= 0}) + 1) / (B + 1))`` for ``B`` valid
    resamples and its floor ``p_min = 2 / (B + 1)`` (print with :func:`p_value_text`), ``auc_a``,
    ``auc_b``, ``n_resamples``, ``n_skipped`` (resamples with one class).
    """
    y_arr, pa = check_labels_and_probabilities(y, p_a, name="p_a")
    _, pb = check_labels_and_probabilities(y, p_b, name="p_b")
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    indices = grouped_resample_indices(_check_groups(groups, y_arr.size), n_resamples, seed)
    kept = [idx for idx in indices if not _single_class(y_arr[idx])]
    d = np.array([_roc_auc(y_arr[idx], pa[idx]) - _roc_auc(y_arr[idx], pb[idx]) for idx in kept], dtype=float)
    low = high = p_value = p_min = math.nan
    if d.size >= 2:
        low, high = (float(v) for v in np.quantile(d, [alpha / 2.0, 1.0 - alpha / 2.0]))
        tail = min(int(np.count_nonzero(d <= 0)), int(np.count_nonzero(d >= 0)))
        p_value, p_min = min(1.0, 2.0 * (tail + 1) / (d.size + 1)), 2.0 / (d.size + 1)
    auc_a, auc_b = _roc_auc(y_arr, pa), _roc_auc(y_arr, pb)
    return {
        **{"diff": auc_a - auc_b, "ci_low": low, "ci_high": high, "p_value": p_value, "p_min": p_min},
        **{"auc_a": auc_a, "auc_b": auc_b, "n_resamples": n_resamples, "n_skipped": n_resamples - int(d.size)},
    }


def p_value_text(result: Mapping[str, Any]) -> str:
    """A :func:`paired_auc_test` p-value as text: ``"p = 0.034"``, or at the floor ``p_min = 2 / (B + 1)``
    that B resamples can resolve the bound, rounded up: ``"p ≤ 0.002"``."""
    p, p_min = result.get("p_value"), result.get("p_min")
    if not _finite(p):
        return "p not estimable"
    if _finite(p_min) and p <= p_min * (1 + 1e-9):
        digits = 1 - math.floor(math.log10(p_min))
        return f"p ≤ {math.ceil(round(p_min * 10**digits, 6)) / 10**digits:g}"
    return f"p = {p:.3g}"


# --- metrics.json ---
def _operating_point_functions(thresholds: Mapping[str, float]) -> dict[str, Callable]:
    def at(t: float, name: str) -> Callable:
        return lambda yy, pp: _metrics_from_counts(**_counts(yy, pp >= t))[name]

    return {f"{op}/{m}": at(t, m) for op, t in thresholds.items() for m in THRESHOLD_METRICS}


def _operating_point_entry(
    op: str, t: float, y: np.ndarray, p: np.ndarray, cis: Mapping[str, BootstrapCI], alpha: float
) -> dict[str, Any]:
    """Counts and metrics at one threshold; a proportion whose bootstrap interval has zero width
    (e.g. 35 of 35: every resample gives 1) gets the exact binomial interval instead."""
    counts = _counts(y, p >= t)
    entry: dict[str, Any] = {"threshold": t, **counts}
    for m in THRESHOLD_METRICS:
        entry[m] = cis[f"{op}/{m}"].as_dict()
        ci = entry[m]
        if m in _PROPORTIONS and _finite(ci["ci_low"]) and ci["ci_low"] == ci["ci_high"]:
            hits, misses = (sum(counts[k] for k in keys) for keys in _PROPORTIONS[m])
            ci["ci_low"], ci["ci_high"] = exact_binomial_interval(hits, hits + misses, alpha)
            ci["interval"] = EXACT_INTERVAL
    return entry


def evaluate_model(
    y_true: Iterable,
    y_prob: Iterable,
    groups: Iterable | None,
    thresholds: Mapping,
    n_resamples=1000,
    seed=0,
    alpha=0.05,
    n_bins=10,
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds for one model on one (test) set.

    ``groups`` (shape (N,)) are the cases' source groups; ``thresholds`` the operating points chosen
    on validation (:func:`choose_operating_points`). All intervals come from the **same** grouped
    bootstrap resamples; a proportion the bootstrap cannot vary (35 of 35) gets an exact binomial
    interval, marked ``"interval": EXACT_INTERVAL``. Returns ``counts`` (``n``, ``n_positive``,
    ``n_negative``, ``n_groups``, ``prevalence``); ``threshold_free`` (:data:`THRESHOLD_FREE_METRICS`
    as ``{"value", "ci_low", "ci_high", "n_resamples", "n_skipped"}``); ``operating_points`` (per name:
    ``threshold``, the counts and :data:`THRESHOLD_METRICS` as such dicts); ``bootstrap`` (settings).
    """
    y, p = check_labels_and_probabilities(y_true, y_prob)
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise ValueError(f"thresholds must be a non-empty dict name -> probability, got {thresholds!r}")
    checked = {str(k): _check_threshold(v) for k, v in thresholds.items()}
    n_resamples, seed, alpha = _check_resamples(n_resamples, seed, alpha)
    n_bins = _check_bins(n_bins)
    g = _check_groups(groups, y.size)
    fns = {**_threshold_free_functions(n_bins), **_operating_point_functions(checked)}
    cis = _bootstrap_many(fns, (y, p), grouped_resample_indices(g, n_resamples, seed), alpha)
    n_pos = int(y.sum())
    return {
        "counts": {
            **{"n": int(y.size), "n_positive": n_pos, "n_negative": int(y.size - n_pos)},
            **{"n_groups": int(np.unique(g).size), "prevalence": _ratio(n_pos, y.size)},
        },
        "threshold_free": {m: cis[m].as_dict() for m in THRESHOLD_FREE_METRICS},
        "operating_points": {op: _operating_point_entry(op, t, y, p, cis, alpha) for op, t in checked.items()},
        "bootstrap": {
            "method": "grouped (cluster) bootstrap: source groups resampled with replacement",
            "unit": "group" if groups is not None else "case",
            "interval": f"percentile; {EXACT_INTERVAL} where the bootstrap cannot vary",
            **{"n_resamples": n_resamples, "seed": seed, "alpha": alpha, "ece_bins": n_bins},
        },
    }


def save_metrics(metrics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write metrics as strict indented JSON (NaN becomes ``null``) with :func:`records.write_json`."""
    return records.write_json(path, metrics)


def load_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_metrics` (``null`` stays ``None``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no metrics file {path}: run evaluate_model and save_metrics first")
    return records.read_json(path)


# --- Tables ---
def _cell_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return "n/a"
    return str(v)


def _natural_key(text: str) -> tuple:
    """Sort "C2" before "C10" and "0.5" before "1"; "n/a" and "none" last."""
    if text in ("n/a", "none"):
        return (2, text)
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, tuple((int(s) if s.isdigit() else s) for s in re.split(r"(\d+)", text)))


def _subgroup_columns(df: Any, by: Sequence[str] | str | None, y_col: str, p_col: str) -> list[str]:
    import pandas as pd  # noqa: PLC0415

    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if by is None:
        by = [c for c in ("fracture_type", "difficulty", "level") if c in df.columns]
        if not by:
            raise ValueError("df has none of the columns fracture_type, difficulty, level; name them with by=")
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in (y_col, p_col, *by) if c not in df.columns]
    if missing:
        raise ValueError(f"df has no column {missing[0]!r}; columns: {list(df.columns)}")
    return by


def _subgroup_row(var: str, value: str, y: np.ndarray, p: np.ndarray, predicted: np.ndarray, alpha: float) -> dict:
    c = _counts(y, predicted)
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    row: dict[str, Any] = {"variable": var, "value": value, "n": int(y.size), "n_positive": n_pos, "n_negative": n_neg}
    for metric, hits, n in (("sensitivity", c["tp"], n_pos), ("specificity", c["tn"], n_neg)):
        row[metric] = _ratio(hits, n)
        row[f"{metric}_low"], row[f"{metric}_high"] = exact_binomial_interval(hits, n, alpha)
    row["roc_auc"] = _roc_auc(y, p)
    return row


def subgroup_table(
    df: pd.DataFrame, threshold: float, by: Sequence[str] | None = None, y_col="y", p_col="p", alpha=0.05
) -> pd.DataFrame:
    """Performance per subgroup: sensitivity, specificity and AUC where defined, with ``n``.

    For each column in ``by`` (default: those of ``fracture_type``, ``difficulty``, ``level`` that
    ``df`` has) and each of its values (a cell, sorted naturally, empty -> "n/a"): ``n``,
    ``n_positive``, ``n_negative``; sensitivity and specificity at ``threshold`` with exact binomial
    ``1 - alpha`` intervals (``*_low``, ``*_high``; cases treated as independent, so read ``n``
    first); ``roc_auc`` (cells with both classes). Undefined entries are NaN. ``df`` has one row per
    case with ``y_col`` (0/1), ``p_col`` (probability) and the metadata columns; a missing column is
    named in the ``ValueError``.
    """
    import pandas as pd  # noqa: PLC0415

    by = _subgroup_columns(df, by, y_col, p_col)
    y, p = check_labels_and_probabilities(df[y_col].to_numpy(), df[p_col].to_numpy(), name=p_col)
    predicted = p >= _check_threshold(threshold)
    rows = []
    for var in by:
        values = np.array([_cell_value(v) for v in df[var].tolist()], dtype=object)
        for value in sorted(set(values.tolist()), key=_natural_key):
            sel = values == value
            rows.append(_subgroup_row(var, value, y[sel], p[sel], predicted[sel], alpha))
    return pd.DataFrame(rows)


def _fmt_ci(entry: Mapping | None, digits: int) -> str:
    if not entry or not _finite(entry.get("value")):
        return "n/a"
    text = f"{entry['value']:.{digits}f}"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    if _finite(lo) and _finite(hi):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]" + (" exact" if entry.get("interval") == EXACT_INTERVAL else "")
    return text


def _combined_row(name: str, m: Mapping, ops: list[str], pct: str, source: Any, digits: int) -> dict[str, Any]:
    tf = m["threshold_free"]
    row: dict[str, Any] = {"model": str(name), "n": (m.get("counts") or {}).get("n")}
    row[f"ROC AUC [{pct}]"] = _fmt_ci(tf.get("roc_auc"), digits)
    row[f"PR AUC [{pct}]"] = _fmt_ci(tf.get("pr_auc"), digits)
    row.update({"Brier": _fmt_ci(tf.get("brier"), digits), "ECE": _fmt_ci(tf.get("ece"), digits)})
    for op in ops:
        entry = (m.get("operating_points") or {}).get(op) or {}
        t = entry.get("threshold")
        row[f"threshold ({op})"] = f"{t:.{digits}f}" if _finite(t) else "n/a"
        row[f"sensitivity ({op})"] = _fmt_ci(entry.get("sensitivity"), digits)
        row[f"specificity ({op})"] = _fmt_ci(entry.get("specificity"), digits)
    row["weights"] = "" if source is None else str(source)
    return row


def combined_table(
    metrics_by_model: Mapping[str, Mapping[str, Any]], weights: Mapping[str, str] | None = None, digits: int = 3
) -> pd.DataFrame:
    """One row per model from :func:`evaluate_model` results (or loaded ``metrics.json``).

    ``weights`` maps a model to where its weights came from (else a ``"weights"`` entry of its
    metrics is used). Columns: ``model``, ``n``, ``ROC AUC [95% CI]``, ``PR AUC [95% CI]``,
    ``Brier``, ``ECE``, then per operating point ``threshold (<op>)``, ``sensitivity (<op>)``,
    ``specificity (<op>)``, and ``weights`` when any model has a source. Cells are text ready to
    print; an exact binomial interval is followed by "exact".
    """
    import pandas as pd  # noqa: PLC0415

    if not isinstance(metrics_by_model, Mapping) or not metrics_by_model:
        raise ValueError("metrics_by_model must be a non-empty dict model name -> metrics")
    for name, m in metrics_by_model.items():
        if not isinstance(m, Mapping) or "threshold_free" not in m:
            raise ValueError(f"metrics of {name!r} are not from evaluate_model (no 'threshold_free')")
    ops = list(dict.fromkeys(op for m in metrics_by_model.values() for op in m.get("operating_points") or {}))
    level = next((b["alpha"] for m in metrics_by_model.values() if (b := m.get("bootstrap")) and "alpha" in b), 0.05)
    pct = f"{100 * (1 - float(level)):g}% CI"
    rows = []
    for name, m in metrics_by_model.items():
        source, w = (weights or {}).get(name), m.get("weights")
        if source is None:
            source = w.get("description", w.get("source")) if isinstance(w, Mapping) else w
        rows.append(_combined_row(name, m, ops, pct, source, digits))
    table = pd.DataFrame(rows)
    return table if table["weights"].astype(bool).any() else table.drop(columns="weights")


# --- Figures (seaborn on Matplotlib; each returns its figure) ---
def _pyplot():
    from .plots import pyplot  # noqa: PLC0415 - one backend rule for every figure

    return pyplot()


def _ratio_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def plot_confusion(
    y: Iterable,
    p: Iterable,
    threshold: float,
    title: str = "",
    class_names=("normal", "fracture"),
    ax: Axes | None = None,
) -> Figure:
    """Confusion matrix at ``threshold`` as an annotated ``seaborn.heatmap`` (rows: true class), on ``ax``
    if given; cells show count and share of the true class, the title sensitivity and specificity."""
    import seaborn as sns  # noqa: PLC0415

    m = threshold_metrics(y, p, threshold)
    table = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    share = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    labels = [[f"{table[i, j]}\n({100 * share[i, j]:.0f} %)" for j in range(2)] for i in range(2)]
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(4.2, 3.8))
    ticks = {"xticklabels": [f"pred. {c}" for c in class_names], "yticklabels": [f"true {c}" for c in class_names]}
    style = {"fmt": "", "cmap": "Blues", "vmin": 0, "vmax": 1, "cbar": False, "square": True}
    sns.heatmap(share, annot=np.array(labels), annot_kws={"fontsize": 11}, ax=ax, **style, **ticks)
    head = f"{title}\n" if title else ""
    sens, spec = _ratio_text(m["sensitivity"]), _ratio_text(m["specificity"])
    ax.set_title(f"{head}threshold {m['threshold']:.3f}: sensitivity {sens}, specificity {spec}", fontsize=10)
    ax.figure.tight_layout()
    return ax.figure


def _ci_text(cis: Mapping | None, model: str, key: str) -> str:
    """' [lo, hi]' from cis[model]: an evaluate_model dict or {key: (lo, hi)}."""
    entry = (cis or {}).get(model)
    if isinstance(entry, Mapping) and "threshold_free" in entry:
        entry = entry["threshold_free"]
    item = entry.get(key) if isinstance(entry, Mapping) else None
    if isinstance(item, Mapping):
        lo, hi = item.get("ci_low"), item.get("ci_high")
    elif isinstance(item, (BootstrapCI, tuple, list)) and len(tuple(item)) >= 2:
        lo, hi = tuple(item)[-2:]
    else:
        return ""
    return f" [{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""


def plot_roc_pr(y: Iterable, probs_by_model: Mapping[str, Iterable], cis: Mapping[str, Any] | None = None) -> Figure:
    """ROC (left) and precision-recall curves (right) of models (name -> probabilities (N,)) on the same
    cases; ``cis``: name -> :func:`evaluate_model` result or ``{"roc_auc": (low, high), ...}`` for the legend."""
    from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: PLC0415

    if not probs_by_model:
        raise ValueError("probs_by_model is empty: pass at least one model's probabilities")
    y_arr = check_labels_and_probabilities(y, next(iter(probs_by_model.values())))[0]
    if _single_class(y_arr):
        raise ValueError("ROC and PR curves need both classes in y")
    fig, (ax_roc, ax_pr) = _pyplot().subplots(1, 2, figsize=(11, 4.6))
    for name, probs in probs_by_model.items():
        yy, pp = check_labels_and_probabilities(y_arr, probs, name=f"probabilities of {name!r}")
        fpr, tpr, _ = roc_curve(yy, pp)
        ax_roc.plot(fpr, tpr, lw=1.8, label=f"{name}: AUC {_roc_auc(yy, pp):.3f}{_ci_text(cis, name, 'roc_auc')}")
        precision, recall, _ = precision_recall_curve(yy, pp)
        label = f"{name}: AP {_average_precision(yy, pp):.3f}{_ci_text(cis, name, 'pr_auc')}"
        ax_pr.step(recall, precision, where="post", lw=1.8, label=label)
    ax_roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    prevalence = float(y_arr.mean())
    ax_pr.axhline(prevalence, ls="--", c="grey", lw=1, label=f"chance (prevalence {prevalence:.2f})")
    ax_roc.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)", title="ROC")
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_calibration(y: Iterable, probs_by_model: Mapping[str, Iterable], n_bins: int = 10) -> Figure:
    """Reliability diagram: observed fracture fraction vs mean predicted probability per bin.

    Top: one line per model (the bins of :func:`expected_calibration_error`, ECE in the legend) and
    the diagonal of perfect calibration; bottom: the histogram of predictions (how many cases each
    point rests on).
    """
    if not probs_by_model:
        raise ValueError("probs_by_model is empty: pass at least one model's probabilities")
    fig, (ax, ax_hist) = _pyplot().subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, _check_bins(n_bins) + 1)
    for name, probs in probs_by_model.items():
        yy, pp = check_labels_and_probabilities(y, probs, name=f"probabilities of {name!r}")
        table = calibration_bins(yy, pp, n_bins)
        table = table[table["n"] > 0]
        label = f"{name}: ECE {_ece(yy, pp, n_bins):.3f}"
        ax.plot(table["mean_predicted"], table["observed_fraction"], marker="o", lw=1.5, label=label)
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
    """Sensitivity, specificity and PPV against ``n_points`` thresholds on [0, 1]; ``marks`` (name ->
    threshold, e.g. from :func:`choose_operating_points`) drawn as vertical lines."""
    plt = _pyplot()
    yy, pp = check_labels_and_probabilities(y, p)
    grid = np.linspace(0.0, 1.0, int(n_points))
    sweep = [_metrics_from_counts(**_counts(yy, pp >= t)) for t in grid]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("sensitivity", "-"), ("specificity", "-"), ("ppv", ":")):
        ax.plot(grid, [m[key] for m in sweep], ls=style, lw=1.8, label=key.upper() if key == "ppv" else key)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, t) in enumerate((marks or {}).items()):
        m = _metrics_from_counts(**_counts(yy, pp >= _check_threshold(t)))
        label = f"{name}: t={t:.3f} (sens {m['sensitivity']:.2f}, spec {m['specificity']:.2f})"
        ax.axvline(t, color=colours[(i + 3) % len(colours)], ls="--", lw=1.2, label=label)
    ax.set(xlabel="threshold on the fracture probability", ylabel="value", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_title("Sensitivity and specificity vs threshold")
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_subgroups(table: pd.DataFrame) -> Figure:
    """Bars of a :func:`subgroup_table` (``seaborn.barplot``): one panel per variable, sensitivity
    and specificity per value with Wilson intervals, ``n`` under each pair of bars."""
    import pandas as pd  # noqa: PLC0415
    import seaborn as sns  # noqa: PLC0415

    need = {"variable", "value", "n", "sensitivity", "specificity"}
    if not need.issubset(getattr(table, "columns", ())):
        raise ValueError(f"table must come from subgroup_table (columns {sorted(need)})")
    variables = list(dict.fromkeys(table["variable"].tolist()))
    if not variables:
        raise ValueError("table is empty: no subgroups to plot")
    metrics = ("sensitivity", "specificity")
    fig, axes = _pyplot().subplots(1, len(variables), figsize=(4.2 * len(variables), 3.8), squeeze=False)
    for ax, var in zip(axes[0], variables):
        part = table[table["variable"] == var].reset_index(drop=True)
        cells = [f"{v}\nn={n}" for v, n in zip(part["value"], part["n"])]
        long = pd.concat(
            [pd.DataFrame({"cell": cells, "metric": m, "value": part[m].astype(float)}) for m in metrics],
            ignore_index=True,
        )
        sns.barplot(long, x="cell", y="value", hue="metric", hue_order=metrics, order=cells, errorbar=None, ax=ax)
        for offset, m in zip((-0.2, 0.2), metrics):  # seaborn's dodge: width 0.8 split in two
            values = part[m].to_numpy(dtype=float)
            low = part.get(f"{m}_low", part[m]).to_numpy(dtype=float)
            high = part.get(f"{m}_high", part[m]).to_numpy(dtype=float)
            err = np.clip(np.vstack([np.nan_to_num(values - low), np.nan_to_num(high - values)]), 0, None)
            ax.errorbar(np.arange(len(part)) + offset, values, yerr=err, fmt="none", ecolor="black", capsize=2, lw=1)
        ax.set(ylim=(0, 1.05), title=str(var), xlabel="", ylabel="")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.get_legend().remove()
    axes[0][0].set_ylabel("value (95 % Wilson interval)")
    axes[0][0].legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig
