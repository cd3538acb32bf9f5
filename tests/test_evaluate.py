"""Tests of cspine_utils.evaluate: metrics against scikit-learn and hand-computed cases, operating
points, the grouped bootstrap, the paired AUC test, metrics.json, tables and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from cspine_utils import evaluate


def random_scores(n: int = 300, seed: int = 0, signal: float = 1.5):
    """Labels and probabilities of a moderately good model (rounded, so there are ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    z = rng.normal(size=n) + signal * y
    p = np.round(1.0 / (1.0 + np.exp(-z)), 2)
    return y, p


# --------------------------------------------------------------------------------------------
# Metrics at a threshold
# --------------------------------------------------------------------------------------------
def test_threshold_metrics_hand_case():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.6, 0.1, 0.7]
    m = evaluate.threshold_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["npv"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # p == threshold counts as positive
    assert evaluate.threshold_metrics([1], [0.5], 0.5)["tp"] == 1


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.77])
def test_threshold_metrics_match_sklearn(threshold):
    y, p = random_scores()
    m = evaluate.threshold_metrics(y, p, threshold)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_no_positives_gives_nan_not_crash():
    m = evaluate.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert math.isnan(m["sensitivity"])
    assert math.isnan(m["balanced_accuracy"])
    assert math.isnan(m["f1"])  # no positives and none predicted
    assert math.isnan(m["ppv"])  # nothing predicted positive
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0 and m["npv"] == 1.0
    assert math.isnan(evaluate.roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(evaluate.pr_auc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_all_predictions_equal():
    y = [0, 1, 0, 1, 1]
    p = [0.5] * 5
    m = evaluate.threshold_metrics(y, p, 0.5)  # everything called fracture
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0
    assert math.isnan(m["npv"])
    assert evaluate.roc_auc(y, p) == pytest.approx(0.5)
    assert evaluate.pr_auc(y, p) == pytest.approx(skm.average_precision_score(y, p))


# --------------------------------------------------------------------------------------------
# Threshold-free metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_free_match_sklearn(seed):
    y, p = random_scores(seed=seed)
    assert evaluate.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert evaluate.pr_auc(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert evaluate.brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    tf = evaluate.threshold_free_metrics(y, p)
    assert set(tf) == set(evaluate.THRESHOLD_FREE_METRICS)
    assert tf["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))


def test_ece_hand_case_and_bins():
    # bin [0.2, 0.3): mean p 0.2, observed 0.5; bin [0.8, 0.9): mean p 0.8, observed 1.0
    y, p = [0, 1, 1, 1], [0.2, 0.2, 0.8, 0.8]
    assert evaluate.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)
    # p = 1 falls in the last bin; a perfect confident prediction has zero error
    assert evaluate.expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)
    table = evaluate.calibration_bins(y, p, n_bins=10)
    assert len(table) == 10 and table["n"].sum() == 4
    assert table.loc[2, "observed_fraction"] == pytest.approx(0.5)


def test_ece_calibrated_near_zero_overconfident_positive():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)  # calibrated by construction
    assert evaluate.expected_calibration_error(y, p) < 0.02
    overconfident = np.clip(0.5 + 2.0 * (p - 0.5), 0.0, 1.0)
    assert evaluate.expected_calibration_error(y, overconfident) > 0.1


# --------------------------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------------------------
def test_youden_hand_case():
    y = [0, 0, 1, 0, 1, 1]
    p = [0.1, 0.2, 0.35, 0.3, 0.6, 0.8]
    assert evaluate.choose_operating_points(y, p)["youden"] == pytest.approx(0.35)  # J = 1
    # a tie in J (t=0.3: sens 1, spec 2/3; t=0.6: sens 2/3, spec 1) goes to the lower threshold
    tie = evaluate.choose_operating_points([0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.6, 0.8])
    assert tie["youden"] == pytest.approx(0.3)


def test_sens95_is_largest_threshold_with_enough_sensitivity():
    y, p = random_scores(n=400, seed=3)
    points = evaluate.choose_operating_points(y, p)
    assert set(points) == {"youden", "sens95"}
    t = points["sens95"]
    assert evaluate.threshold_metrics(y, p, t)["sensitivity"] >= 0.95
    higher = np.unique(p)[np.unique(p) > t]
    assert evaluate.threshold_metrics(y, p, higher[0])["sensitivity"] < 0.95
    assert t <= points["youden"]


def test_choose_threshold_by_hand():
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.6, 0.5, 0.9]
    # J at 0.1, 0.2, 0.5, 0.6, 0.9: 0, 1/3, 2/3, 1/6, 1/2
    assert evaluate.choose_threshold(y, p) == 0.5
    # F1: 4/9, 2/3, 4/5, 1/2, 2/3
    assert evaluate.choose_threshold(y, p, method="f1") == 0.5
    # sensitivity at 0.1, 0.2, 0.5, 0.6, 0.9: 1, 1, 1, 1/2, 1/2 -> largest with >= 0.95 is 0.5; >= 0.5 is 0.9
    assert evaluate.choose_threshold(y, p, method="sensitivity") == 0.5
    assert evaluate.choose_threshold(y, p, method="sensitivity", target_sensitivity=0.5) == 0.9
    # ties (J = 2/3 at 0.5 and 0.7) go to the lower threshold: the higher sensitivity
    assert evaluate.choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.6, 0.5, 0.7, 0.9]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        evaluate.choose_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate.choose_threshold([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.choose_threshold([0, 1], [0.1, 0.2], method="accuracy")
    with pytest.raises(ValueError, match="target_sensitivity"):
        evaluate.choose_threshold([0, 1], [0.1, 0.2], method="sensitivity", target_sensitivity=0)


def test_choose_threshold_matches_brute_force():
    y, p = random_scores(n=200, seed=5)
    for method, score in (
        ("youden", lambda m: m["sensitivity"] + m["specificity"] - 1),
        ("f1", lambda m: m["f1"]),
    ):
        scores = [score(evaluate.threshold_metrics(y, p, t)) for t in np.unique(p)]
        best = np.unique(p)[int(np.flatnonzero(np.isclose(scores, max(scores)))[0])]
        assert evaluate.choose_threshold(y, p, method) == pytest.approx(best)


def test_validation_metrics_hand_case_and_sklearn():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.6, 0.1, 0.7]
    m = evaluate.validation_metrics(y, p, 0.5)
    assert set(m) == {"auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "tp", "fp", "tn", "fn", "n"}
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 1, 1, 1, 5)
    # AUC by hand: pairs (pos, neg) with pos > neg: 0.9>0.6, 0.9>0.1, 0.4>0.1, 0.7>0.6, 0.7>0.1 -> 5 of 6
    assert m["auc"] == pytest.approx(5 / 6)
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"], m["accuracy"]) == pytest.approx(
        (2 / 3, 1 / 2, 2 / 3, 1 / 2, 3 / 5)
    )
    yr, pr = random_scores(seed=2)
    assert evaluate.validation_metrics(yr, pr, 0.5)["auc"] == pytest.approx(skm.roc_auc_score(yr, pr))
    assert math.isnan(evaluate.validation_metrics([0, 0], [0.1, 0.7], 0.5)["auc"])
    assert json.loads(json.dumps(m)) == m  # plain Python numbers


def test_operating_points_need_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        evaluate.choose_operating_points([1, 1], [0.2, 0.9])


# --------------------------------------------------------------------------------------------
# Grouped bootstrap
# --------------------------------------------------------------------------------------------
def test_bootstrap_deterministic_and_contains_point():
    y, p = random_scores(n=200)
    groups = np.arange(200) // 4
    a = evaluate.bootstrap_ci(evaluate.roc_auc, y, p, groups, n_resamples=200, seed=5)
    b = evaluate.bootstrap_ci(evaluate.roc_auc, y, p, groups, n_resamples=200, seed=5)
    c = evaluate.bootstrap_ci(evaluate.roc_auc, y, p, groups, n_resamples=200, seed=6)
    assert tuple(a) == tuple(b)
    assert tuple(a) != tuple(c)
    point, low, high = a
    assert point == pytest.approx(skm.roc_auc_score(y, p))
    assert low < point < high
    assert a.n_skipped == 0 and a.n_resamples == 200


def test_bootstrap_resamples_groups_not_rows():
    # 40 independent single-row groups plus one group of 80 identical rows (a source image
    # copied many times): resampling rows pretends those 80 rows are independent evidence.
    rng = np.random.default_rng(1)
    y_small = rng.integers(0, 2, 40)
    p_small = np.clip(0.3 + 0.4 * y_small + rng.normal(0, 0.15, 40), 0, 1)
    y = np.r_[y_small, np.ones(80, int)]
    p = np.r_[p_small, np.full(80, 0.2)]  # a confidently missed fracture, copied
    groups = np.r_[np.arange(40).astype(str), np.full(80, "big")]
    sens = lambda yy, pp: evaluate.threshold_metrics(yy, pp, 0.5)["sensitivity"]  # noqa: E731
    grouped = evaluate.bootstrap_ci(sens, y, p, groups, n_resamples=300, seed=0)
    rows = evaluate.bootstrap_ci(sens, y, p, None, n_resamples=300, seed=0)
    assert grouped.point == rows.point
    assert (grouped.high - grouped.low) > 2 * (rows.high - rows.low)
    # every resample keeps the big group whole: its row count is a multiple of 80 plus singles
    for idx in evaluate.grouped_resample_indices(groups, 20, seed=0):
        assert np.count_nonzero(idx >= 40) % 80 == 0


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_single_class_resamples_are_skipped_and_counted():
    # one positive group among 12: many resamples miss it
    y = np.r_[np.ones(3, int), np.zeros(33, int)]
    p = np.linspace(0.9, 0.1, 36)
    groups = np.repeat(np.arange(12), 3)
    ours = evaluate.bootstrap_ci(evaluate.roc_auc, y, p, groups, n_resamples=200, seed=0)
    # scikit-learn returns NaN (recent versions) or raises ValueError on one class: both are skipped
    sk = evaluate.bootstrap_ci(skm.roc_auc_score, y, p, groups, n_resamples=200, seed=0)
    assert ours.n_skipped > 0
    assert ours.n_skipped == sk.n_skipped
    assert tuple(ours) == pytest.approx(tuple(sk))

    def strict_auc(yy, pp):
        if len(set(yy.tolist())) < 2:
            raise ValueError("Only one class present in y_true")
        return evaluate.roc_auc(yy, pp)

    strict = evaluate.bootstrap_ci(strict_auc, y, p, groups, n_resamples=200, seed=0)
    assert strict.n_skipped == ours.n_skipped and tuple(strict) == pytest.approx(tuple(ours))
    acc = evaluate.bootstrap_ci(
        lambda a, b: evaluate.threshold_metrics(a, b, 0.5)["accuracy"], y, p, groups, n_resamples=200, seed=0
    )
    assert acc.n_skipped == 0


def test_bootstrap_mean_ci():
    values = np.r_[np.ones(30), np.zeros(10)]
    ci = evaluate.bootstrap_mean_ci(values, np.arange(40) // 2, n_resamples=200, seed=0)
    assert ci.point == pytest.approx(0.75)
    assert ci.low < 0.75 < ci.high


# --------------------------------------------------------------------------------------------
# Paired AUC test
# --------------------------------------------------------------------------------------------
def test_paired_test_identical_models():
    y, p = random_scores(n=150)
    res = evaluate.paired_auc_test(y, p, p, np.arange(150) // 3, n_resamples=200, seed=0)
    assert res["diff"] == 0.0
    assert res["ci_low"] == 0.0 and res["ci_high"] == 0.0
    assert res["p_value"] == pytest.approx(1.0)


def test_paired_test_clearly_better_model():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    good = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.1, 200), 0, 1)
    noise = rng.random(200)
    res = evaluate.paired_auc_test(y, good, noise, np.arange(200) // 2, n_resamples=300, seed=0)
    assert res["diff"] > 0.3
    assert res["ci_low"] > 0
    assert res["p_value"] < 0.01
    assert res["p_value"] >= 2 / (300 + 1)  # never exactly 0
    swapped = evaluate.paired_auc_test(y, noise, good, np.arange(200) // 2, n_resamples=300, seed=0)
    assert swapped["diff"] == pytest.approx(-res["diff"])
    assert swapped["p_value"] == pytest.approx(res["p_value"])


def test_p_value_at_the_resolution_limit_is_a_bound():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    good = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.1, 200), 0, 1)
    res = evaluate.paired_auc_test(y, good, rng.random(200), np.arange(200) // 2, n_resamples=999, seed=0)
    # every resample favours the good model: p is at its floor 2 / (B + 1) = 0.002, printed as a bound
    assert res["p_min"] == pytest.approx(2 / 1000) and res["p_value"] == pytest.approx(res["p_min"])
    assert evaluate.p_value_text(res) == "p ≤ 0.002"
    assert evaluate.p_value_text({"p_value": 2 / 1001, "p_min": 2 / 1001}) == "p ≤ 0.002"  # rounded up, never down
    assert evaluate.p_value_text({"p_value": 2 / 301, "p_min": 2 / 301}) == "p ≤ 0.0067"
    assert evaluate.p_value_text({"p_value": 0.0345, "p_min": 0.002}) == "p = 0.0345"
    assert evaluate.p_value_text({"p_value": float("nan"), "p_min": float("nan")}) == "p not estimable"


def test_exact_binomial_interval():
    # Clopper-Pearson by hand: x = n gives [(alpha/2)^(1/n), 1]; x = 0 gives [0, 1 - (alpha/2)^(1/n)]
    low, high = evaluate.exact_binomial_interval(35, 35)
    assert low == pytest.approx(0.025 ** (1 / 35)) and high == 1.0
    assert round(low, 3) == 0.9
    low, high = evaluate.exact_binomial_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = evaluate.exact_binomial_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.1871, 0.8129)  # the textbook value
    assert all(math.isnan(v) for v in evaluate.exact_binomial_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        evaluate.exact_binomial_interval(3, 2)


def test_a_proportion_the_bootstrap_cannot_vary_gets_an_exact_interval():
    y, p = random_scores(n=120)
    groups = np.arange(120) // 3
    m = evaluate.evaluate_model(y, p, groups, {"all": 0.0, "half": 0.5}, n_resamples=100, seed=0)
    sens = m["operating_points"]["all"]["sensitivity"]  # threshold 0 flags every case: 1.0 in every resample
    n_pos = int(y.sum())
    assert sens["value"] == 1.0 and sens["interval"] == evaluate.EXACT_INTERVAL
    assert (sens["ci_low"], sens["ci_high"]) == pytest.approx(evaluate.exact_binomial_interval(n_pos, n_pos))
    assert sens["ci_low"] < 1.0
    spec = m["operating_points"]["all"]["specificity"]  # 0 of n_negative: exact [0, high]
    assert spec["value"] == 0.0 and spec["ci_low"] == 0.0 and spec["ci_high"] > 0.0
    varying = m["operating_points"]["half"]["sensitivity"]
    assert "interval" not in varying and varying["ci_low"] < varying["value"] < varying["ci_high"]
    table = evaluate.combined_table({"m": m})
    assert table.loc[0, "sensitivity (all)"].endswith("exact")
    assert not table.loc[0, "sensitivity (half)"].endswith("exact")


# --------------------------------------------------------------------------------------------
# metrics.json and tables
# --------------------------------------------------------------------------------------------
def test_evaluate_model_and_save(tmp_path):
    y, p = random_scores(n=120)
    groups = np.arange(120) // 3
    thresholds = {"youden": 0.45, "sens95": 0.2}
    m = evaluate.evaluate_model(y, p, groups, thresholds, n_resamples=100, seed=0)
    assert m["counts"] == {
        "n": 120,
        "n_positive": int(y.sum()),
        "n_negative": int(120 - y.sum()),
        "n_groups": 40,
        "prevalence": pytest.approx(y.mean()),
    }
    assert m["threshold_free"]["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p))
    auc = m["threshold_free"]["roc_auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    same = evaluate.bootstrap_ci(evaluate.roc_auc, y, p, groups, n_resamples=100, seed=0)
    assert (auc["ci_low"], auc["ci_high"]) == pytest.approx((same.low, same.high))
    for name, t in thresholds.items():
        op = m["operating_points"][name]
        ref = evaluate.threshold_metrics(y, p, t)
        assert op["threshold"] == t and op["tp"] == ref["tp"]
        for metric in evaluate.THRESHOLD_METRICS:
            assert op[metric]["value"] == pytest.approx(ref[metric])
    path = evaluate.save_metrics({**m, "weights": "random", "nan": float("nan")}, tmp_path / "a" / "metrics.json")
    loaded = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert loaded["nan"] is None
    assert loaded["threshold_free"]["roc_auc"]["value"] == pytest.approx(auc["value"])
    assert evaluate.load_metrics(path)["counts"]["n"] == 120

    table = evaluate.combined_table({"cnn": m, "vgg": loaded}, weights={"cnn": "none (scratch)"})
    assert list(table["model"]) == ["cnn", "vgg"]
    assert {
        "ROC AUC [95% CI]",
        "PR AUC [95% CI]",
        "Brier",
        "ECE",
        "sensitivity (youden)",
        "specificity (sens95)",
        "weights",
    } <= set(table.columns)
    assert table.loc[1, "weights"] == "random"
    assert table.loc[0, "ROC AUC [95% CI]"].startswith(f"{auc['value']:.3f} [")


def test_subgroup_table():
    df = pd.DataFrame(
        {
            "y": [1, 1, 1, 0, 0, 0, 1, 0],
            "p": [0.9, 0.2, 0.8, 0.1, 0.7, 0.3, 0.6, 0.4],
            "fracture_type": ["linear", "linear", "burst", "none", "none", "none", "burst", "none"],
            "difficulty": ["0.5", "0.5", "0.5", "", "", "", "1", ""],
            "level": ["C2", "C2", "C10", "C2", "C10", "C3", "C3", "C3"],
        }
    )
    t = evaluate.subgroup_table(df, 0.5)
    assert list(dict.fromkeys(t["variable"])) == ["fracture_type", "difficulty", "level"]
    cell = t[(t.variable == "fracture_type") & (t.value == "linear")].iloc[0]
    assert cell["n"] == 2 and cell["sensitivity"] == 0.5 and math.isnan(cell["specificity"])
    assert cell["sensitivity_low"] < 0.5 < cell["sensitivity_high"]
    none = t[(t.variable == "fracture_type") & (t.value == "none")].iloc[0]
    assert math.isnan(none["sensitivity"]) and none["specificity"] == pytest.approx(3 / 4)
    assert math.isnan(none["roc_auc"])
    levels = t[t.variable == "level"]
    assert list(levels["value"]) == ["C2", "C3", "C10"]  # natural order
    c2 = levels.iloc[0]
    assert c2["roc_auc"] == pytest.approx(skm.roc_auc_score([1, 1, 0], [0.9, 0.2, 0.1]))
    assert "n/a" in set(t[t.variable == "difficulty"]["value"])
    with pytest.raises(ValueError, match="nope"):
        evaluate.subgroup_table(df, 0.5, by=["nope"])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "y, p, match",
    [
        ([0, 2], [0.1, 0.2], "0/1"),
        ([0, 1], [0.1, 1.2], "1.2"),
        ([0, 1], [0.1, float("nan")], "probabilities"),
        ([0, 1, 1], [0.1, 0.2], "3 values"),
    ],
)
def test_bad_labels_or_probabilities(y, p, match):
    with pytest.raises(ValueError, match=match):
        evaluate.threshold_metrics(y, p, 0.5)


def test_bad_arguments():
    y, p = random_scores(n=20)
    with pytest.raises(ValueError, match="1.5"):
        evaluate.threshold_metrics(y, p, 1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        evaluate.bootstrap_ci(evaluate.roc_auc, y, p, None, n_resamples=0)
    with pytest.raises(ValueError, match="groups has 3"):
        evaluate.bootstrap_ci(evaluate.roc_auc, y, p, [1, 2, 3], n_resamples=10)
    with pytest.raises(ValueError, match="n_bins"):
        evaluate.expected_calibration_error(y, p, n_bins=0)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def test_plots_return_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    y, p = random_scores(n=120)
    _, q = random_scores(n=120, seed=9, signal=0.5)
    q = np.where(y == random_scores(n=120)[0], q, 1 - q)
    points = evaluate.choose_operating_points(y, p)
    m = evaluate.evaluate_model(y, p, None, points, n_resamples=20, seed=0)
    df = pd.DataFrame({"y": y, "p": p, "level": np.array(["C2", "C5", "C7"])[np.arange(120) % 3]})
    figures = [
        evaluate.plot_confusion(y, p, points["youden"], title="test"),
        evaluate.plot_roc_pr(y, {"a": p, "b": q}, cis={"a": m, "b": {"roc_auc": (0.4, 0.6)}}),
        evaluate.plot_calibration(y, {"a": p, "b": q}),
        evaluate.plot_threshold_sweep(y, p, marks=points),
        evaluate.plot_subgroups(evaluate.subgroup_table(df, points["youden"])),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
        assert fig.axes
        plt.close(fig)


def test_subgroup_plot_of_a_small_test_split():
    """The smoke course's test split: one to seven cases per cell, metrics undefined in many cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(
        {
            "level": ["C2", "C2", "C3", "C3", "C4", "C4", "C5", "C5", "C6", "C6"],
            "fracture_type": [
                "none",
                "burst",
                "none",
                "none",
                "none",
                "none",
                "none",
                "posterior",
                "none",
                "posterior",
            ],
            "difficulty": ["", "0.5", "", "", "", "", "", "0.5", "", "0.5"],
        }
    )
    df = df.assign(y=(df["fracture_type"] != "none").astype(int), p=np.linspace(0.1, 0.9, 10))
    table = evaluate.subgroup_table(df, 0.5)
    fig = evaluate.plot_subgroups(table)
    assert [ax.get_title() for ax in fig.axes] == ["fracture_type", "difficulty", "level"]
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == [f"C{k}\nn=2" for k in range(2, 7)]
    plt.close(fig)


def test_confusion_heatmap_shows_the_counts():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.6, 0.1, 0.7]  # at 0.5: TP 2, FN 1, FP 1, TN 1
    fig, axes = plt.subplots(1, 2)
    assert evaluate.plot_confusion(y, p, 0.5, ax=axes[1]) is fig  # draws into a given grid
    texts = [t.get_text() for t in axes[1].texts]
    assert texts == ["1\n(50 %)", "1\n(50 %)", "1\n(33 %)", "2\n(67 %)"]  # TN, FP / FN, TP
    assert "sensitivity 0.67, specificity 0.50" in axes[1].get_title()
    assert not axes[0].texts
    plt.close(fig)


def test_predictive_values_by_bayes_hand_case():
    # 1,000 patients, prevalence 0.1: 100 fractured, se 0.9 -> TP 90, FN 10; sp 0.8 -> TN 720, FP 180
    got = evaluate.predictive_values(0.9, 0.8, 0.1)
    assert got["ppv"] == pytest.approx(90 / 270) and got["npv"] == pytest.approx(720 / 730)
    # at the sample's own prevalence Bayes reproduces the counted PPV and NPV
    m = evaluate.threshold_metrics(
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.2, 0.1, 0.05], 0.5
    )
    bayes = evaluate.predictive_values(m["sensitivity"], m["specificity"], 0.4)
    assert bayes["ppv"] == pytest.approx(m["ppv"]) and bayes["npv"] == pytest.approx(m["npv"])
    assert math.isnan(evaluate.predictive_values(0.0, 1.0, 0.5)["ppv"])  # nothing flagged: PPV undefined
    assert math.isnan(evaluate.predictive_values(math.nan, 0.8, 0.1)["npv"])  # undefined stays undefined
    with pytest.raises(ValueError, match="prevalence"):
        evaluate.predictive_values(0.9, 0.8, 24)  # a percentage, not a proportion
