"""The whole course in the `smoke` profile, executed ONCE through `cspine run` into a temporary
folder. That single execution serves three checks:

* the report assertions (every notebook rendered to HTML, metrics present, no error cells);
* nbval-style output checks: cells marked ``# NBVAL_CHECK_OUTPUT`` must print exactly what the
  stored notebook shows (the same rule as ``pytest --nbval-lax notebooks/``, which `make nbval`
  runs as a second, optional execution);
* the hand-over of products between notebooks (manifest, split, bundles, metrics), and that the
  products make sense: the metrics count exactly the test split, and the saved bundles load and
  reproduce them.

nbval's own run of the notebooks (`make nbval`, part of `make test`) checks the same cells again.
"""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from sklearn.metrics import roc_auc_score

from cspine_utils import (
    config,
    data,
    evaluate,
    explain,
    modelbundle,
    phantom,
    phantom3d,
    pipeline,
    records,
    report,
    series,
)
from cspine_utils import course as lessons

NOTEBOOKS = config.repo_root() / "notebooks"
COURSE = [p.stem for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))]
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """`cspine run --profile smoke` in a temporary folder; returns (root, report dir, printed lines)."""
    root = tmp_path_factory.mktemp("course")
    dataset = root / "data"
    prof = config.get_profile("smoke")
    phantom.generate_dataset(dataset, phantom.SynthConfig(n=prof.n_synthetic, seed=0), workers=2, progress=False)
    studies = root / "studies"  # notebook 07's CT studies in the RSNA layout
    phantom3d.write_rsna_dataset(
        studies, prof.n_studies, seed=0, matrix=prof.study_matrix, slice_mm=prof.study_slice_mm, progress=False
    )
    mp = pytest.MonkeyPatch()
    for key, value in {
        "CSPINE_ARTIFACTS": str(root / "artifacts"),
        "CSPINE_REPORT_DIR": str(root / "report"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }.items():
        mp.setenv(key, value)
    lines: list[str] = []
    try:
        runs = report.run_course("smoke", dataset, studies_dir=studies, log=lines.append)
        yield root, root / "report", runs, lines
    finally:
        mp.undo()


def _outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            parts.append(str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(p.rstrip() for p in parts).strip()


def _source_cells(nb) -> list:
    return [
        c
        for c in nb.cells
        if not ({"injected-parameters", "papermill-error-cell-tag"} & set(c.get("metadata", {}).get("tags", [])))
    ]


@pytest.mark.slow
def test_every_notebook_ran_without_errors_and_was_rendered(course):
    root, rep, runs, lines = course
    assert [r.name for r in runs] == COURSE
    for name in COURSE:
        executed = nbformat.read(rep / "executed" / f"{name}.ipynb", as_version=4)
        errors = [
            i
            for i, c in enumerate(executed.cells)
            if any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ]
        assert not errors, f"{name}: error cells {errors}"
        assert (rep / "html" / f"{name}.html").stat().st_size > 10_000
    assert any(line.startswith("[1/") for line in lines) and any(line.startswith(f"[{len(COURSE)}/") for line in lines)


@pytest.mark.slow
def test_report_index_has_metrics_figures_and_provenance(course):
    root, rep, runs, _ = course
    facts = json.loads((rep / "run.json").read_text())
    assert [nb["name"] for nb in facts["notebooks"]] == COURSE
    assert all(nb["seconds"] and nb["seconds"] > 0 for nb in facts["notebooks"])
    # the data folder is named without the machine's absolute path (outside the repository: …/parent/name)
    assert facts["profile"] == "smoke" and facts["data_source"] == records.shown_path(root / "data")
    assert str(root) not in json.dumps(facts)
    table = facts["metrics"]["table"]
    assert {row["model"] for row in table} == {"cnn", "vgg16"}
    assert all("[" in row["ROC AUC [95% CI]"] for row in table)
    assert facts["bundles"]["vgg16"]["weights"], "the weights source is named"
    assert facts["audit"]["n_files"] == config.get_profile("smoke").n_synthetic
    index = (rep / "index.html").read_text()
    for name in COURSE:
        assert f"html/{name}.html" in index
    assert "not a medical device" in index and "ROC AUC" in index
    for fig in facts["figures"]:
        assert (rep / fig).is_file()
    readme = (rep / "README.md").read_text()
    assert "| [01_data_exploration](html/01_data_exploration.html) |" in readme


@pytest.mark.slow
def test_products_are_handed_over(course):
    root, *_ = course
    art = root / "artifacts"
    split = data.load_manifest(art / "data" / "manifest.csv")
    assert set(split["split"]) == {"train", "val", "test"} and data.cross_split_leakage(split) == []
    for model in ("cnn", "vgg16"):
        assert (art / "models" / model / "bundle.json").is_file()
        assert (art / "metrics" / f"{model}.json").is_file()
        bundle = modelbundle.load_bundle(art / "models" / model)  # 03/04 calibrate and keep the feature reference
        assert bundle.calibration != (1.0, 0.0) and bundle.reference is not None
        assert 0 <= bundle.reference.val_flagged <= 0.1
        # 05 chose the heatmap on validation and saved it for the app
        assert records.read_json(art / "models" / model / "explain.json")["method"] in explain.CAM_METHODS
        assert set(evaluate.load_metrics(art / "metrics" / f"{model}.json")["calibration"]) >= {"before", "after"}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "vgg16"])
def test_metrics_count_the_test_split_and_the_saved_bundle_reproduces_them(course, model):
    root, *_ = course
    art = root / "artifacts"
    split = data.load_manifest(art / "data" / "manifest.csv")
    test_rows = split[split["split"] == "test"]
    y_test = pipeline.label_to_int(test_rows["label"])
    metrics = evaluate.load_metrics(art / "metrics" / f"{model}.json")
    assert metrics["counts"]["n"] == len(test_rows) > 0
    assert metrics["counts"]["n_positive"] == int(y_test.sum()) > 0
    assert metrics["counts"]["n_groups"] == test_rows["group"].nunique()
    bundle = modelbundle.load_bundle(art / "models" / model)
    p_test = bundle.predict_files(test_rows["path"])
    assert p_test.shape == (len(test_rows),) and np.all((p_test >= 0) & (p_test <= 1))
    assert metrics["threshold_free"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(y_test, p_test), abs=1e-6)
    for name, point in metrics["operating_points"].items():
        called = p_test >= point["threshold"]
        counts = {
            "tp": int(np.sum(called & (y_test == 1))),
            "fp": int(np.sum(called & (y_test == 0))),
            "tn": int(np.sum(~called & (y_test == 0))),
            "fn": int(np.sum(~called & (y_test == 1))),
        }
        assert {k: point[k] for k in counts} == counts, f"{model} {name}"


@pytest.mark.slow
def test_study_level_results_count_the_test_studies_and_recompute_from_the_predictions(course):
    """Notebook 07: the report's study-level figures follow from the saved test predictions."""
    root, rep, *_ = course
    out = root / "artifacts" / "studies"
    metrics = records.read_json(out / "metrics.json")
    predictions = pd.read_csv(out / "predictions.csv")
    cache = series.load_manifest(root / "artifacts" / "studies_cache")
    assert metrics["n_studies"]["test"] == len(predictions) > 0
    assert set(predictions["StudyInstanceUID"]) <= set(cache["StudyInstanceUID"])
    assert metrics["n_studies"]["labelled"] == len(cache) == config.get_profile("smoke").n_studies
    y = predictions[list(series.LABEL_COLUMNS)].to_numpy()
    chosen = metrics["targets"]["aggregation"]
    p = predictions[[f"{chosen}_{c}" for c in series.LABEL_COLUMNS]].to_numpy()
    assert metrics["targets"]["weighted_log_loss"]["value"] == pytest.approx(lessons.weighted_log_loss(y, p))
    assert metrics["targets"]["study_auc"]["value"] == pytest.approx(evaluate.roc_auc(y[:, 0], p[:, 0]), nan_ok=True)
    assert [row["aggregation"] for row in metrics["table"]][-1] == "prevalence only (baseline)"
    assert "Study-level results" in (rep / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", COURSE)
def test_checked_outputs_match_the_stored_notebook(course, name):
    """nbval's rule for cells marked NBVAL_CHECK_OUTPUT, on the single smoke execution."""
    _, rep, *_ = course
    stored = _source_cells(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    executed = _source_cells(nbformat.read(rep / "executed" / f"{name}.ipynb", as_version=4))
    assert len(stored) == len(executed)
    checked = [(s, e) for s, e in zip(stored, executed) if s.cell_type == "code" and CHECK_MARK in s.source]
    for s, e in checked:
        want = _outputs_text(s)
        assert want, f"{name}: a {CHECK_MARK} cell must store its expected output"
        assert _outputs_text(e) == want, f"{name}: output changed in cell:\n{s.source}"


def test_course_has_checked_cells():
    marked = [
        name
        for name in COURSE
        if any(CHECK_MARK in c.source for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4).cells)
    ]
    assert len(marked) >= 4, f"deterministic cells carry {CHECK_MARK} in most notebooks, found in {marked}"


def test_a_notebook_run_before_its_predecessor_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_PROFILE", "smoke")
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "empty artifacts"))
    monkeypatch.setenv("CSPINE_REPORT_DIR", str(tmp_path / "report"))
    out = tmp_path / "02.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(
            str(NOTEBOOKS / "02_preprocessing_augmentation.ipynb"),
            str(out),
            kernel_name="python3",
            progress_bar=False,
            cwd=str(NOTEBOOKS),
        )
    assert "run notebooks/01_data_exploration.ipynb first" in str(info.value)


def test_papermill_lists_each_notebooks_parameters():
    """What `papermill --help-notebook` prints comes from the tagged parameters cell; only notebooks 01
    (the slices) and 07 (the CT studies) choose their data (the others start from 01's products), so only
    they take DATA_DIR."""
    for name in COURSE:
        params = set(papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb")))
        assert {"PROFILE", "SEED"} <= params, name
        assert ("DATA_DIR" in params) == name.startswith(("01_", "07_")), name
