"""Course orchestration: progress, one clear message on failure, partial output kept, --from resumes;
and the committed report stays in step with the notebooks."""

from __future__ import annotations

import json

import kaggle_layout
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cspine_utils import audit, cli, config, report
from cspine_utils.records import shown_path, write_json


def _notebook(path, *codes):
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# {path.stem[:2]} · test"),
            new_code_cell('PROFILE = "smoke"\nDATA_DIR = ""\nSEED = 0', metadata={"tags": ["parameters"]}),
            *[new_code_cell(c) for c in codes],
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def mini_course(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    flag = tmp_path / "fixed.txt"
    _notebook(nbdir / "01_first.ipynb", "print('first', PROFILE)")
    _notebook(
        nbdir / "02_second.ipynb",
        "x = 1",
        f"import pathlib\nif not pathlib.Path({str(flag)!r}).exists():\n    raise ValueError('the data are broken')",
        "print('second done')",
    )
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "artifacts"))
    return nbdir, tmp_path / "report", flag


def test_failure_stops_with_one_message_keeps_partial_and_from_resumes(mini_course):
    nbdir, rep, flag = mini_course
    lines = []
    with pytest.raises(report.NotebookFailed) as info:
        report.run_course("smoke", notebooks_dir=nbdir, report_dir=rep, render=False, log=lines.append)
    msg = str(info.value)
    assert "02_second.ipynb" in msg and "cell 4" in msg and "ValueError: the data are broken" in msg
    assert "--from 02" in msg
    partial = rep / "executed" / "02_second.ipynb"
    assert partial.is_file() and info.value.partial == partial
    assert any("[1/2] 01_first" in line for line in lines) and any("[2/2] 02_second" in line for line in lines)
    assert (rep / "executed" / "01_first.ipynb").is_file()
    # the source notebooks are never overwritten
    assert all(
        c.get("outputs", []) == [] for c in nbformat.read(nbdir / "02_second.ipynb", 4).cells if c.cell_type == "code"
    )

    flag.write_text("ok")
    lines.clear()
    runs = report.run_course(
        "smoke", notebooks_dir=nbdir, report_dir=rep, render=False, start_from="02", log=lines.append
    )
    assert [r.name for r in runs] == ["02_second"]
    lines.clear()
    report.run_course("smoke", notebooks_dir=nbdir, report_dir=rep, render=False, log=lines.append)
    assert "ETA" in lines[0], "a later run shows an ETA from the previous run's timings"
    timings = json.loads((rep / "timings.json").read_text())
    assert set(timings) == {"01_first", "02_second"}


def test_cli_run_reports_failure_in_one_line(mini_course, capsys, monkeypatch):
    nbdir, rep, _ = mini_course
    monkeypatch.setattr(report, "course_notebooks", lambda d=None: sorted(nbdir.glob("*.ipynb")))
    monkeypatch.setenv("CSPINE_REPORT_DIR", str(rep))
    assert cli.main(["run", "--profile", "smoke", "--no-render"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "02_second.ipynb failed in cell 4" in err[0]


def test_selecting_notebooks(tmp_path):
    names = [tmp_path / f"{n}.ipynb" for n in ("01_a", "02_b", "03_c", "04_d")]
    assert [p.stem for p in report.select_notebooks(names, only="03,1")] == ["01_a", "03_c"]
    assert [p.stem for p in report.select_notebooks(names, start_from="03")] == ["03_c", "04_d"]
    with pytest.raises(ValueError, match="no notebook matches 07"):
        report.select_notebooks(names, only="07")
    with pytest.raises(ValueError, match="either"):
        report.select_notebooks(names, only="01", start_from="02")


def test_committed_report_lists_exactly_the_course_notebooks():
    run = json.loads((config.repo_root() / "report" / "run.json").read_text())
    listed = [nb["name"] for nb in run["notebooks"]]
    on_disk = [p.stem for p in report.course_notebooks()]
    assert listed == on_disk, f"report lists {listed}, notebooks/ has {on_disk}: rerun `make run`"
    assert len(run["notebooks_commit"]) == 40
    for nb in run["notebooks"]:
        assert (config.repo_root() / "report" / nb["html"]).is_file()
    for fig in run["figures"]:
        assert (config.repo_root() / "report" / fig).is_file()


def test_rendered_report_shows_results_and_no_absolute_path(mini_course, tmp_path):
    """The report's Markdown and HTML carry the metrics, bundles and audit, and no machine path."""
    nbdir, rep, flag = mini_course
    flag.write_text("ok")
    art = tmp_path / "artifacts"
    row = {"model": "cnn", "n": "120", "ROC AUC [95% CI]": "0.877 [0.766, 0.955]", "Brier": "0.1", "weights": "none"}
    write_json(art / "metrics" / "combined.json", {"table": [row], "paired_test": "p ≤ 0.002"})
    write_json(art / "models" / "cnn" / "bundle.json", {"threshold": 0.72444, "image_size": 64, "weights": None})
    write_json(art / "data" / "audit.json", {"n_files": 120, "shortcut_auc": 0.61, "warnings": ["a <b>warning</b>"]})
    data = tmp_path / "my data"
    data.mkdir()
    lines = []
    report.run_course("smoke", data, notebooks_dir=nbdir, report_dir=rep, log=lines.append)
    markdown = (rep / "README.md").read_text()
    page = (rep / "index.html").read_text()
    facts = json.loads((rep / "run.json").read_text())
    assert "| model | weights | n | ROC AUC [95% CI] |" in markdown and "Brier" not in markdown
    assert "| cnn | none | 120 | 0.877 [0.766, 0.955] |" in markdown and "p ≤ 0.002" in markdown
    assert "- **cnn**: none: trained from scratch; threshold 0.724, 64 px" in markdown
    assert "shortcut AUC: 0.61" in markdown and "<td>0.877 [0.766, 0.955]</td>" in page
    assert "a &lt;b&gt;warning&lt;/b&gt;" in page, "text from the records is escaped in the HTML"
    assert '<a href="html/01_first.html">01_first</a>' in page
    assert facts["data_source"] == f"…/{tmp_path.name}/my data"
    assert shown_path(config.repo_root() / "data" / "x") == "data/x" and shown_path("/") == "…/"
    for text in (markdown, page, json.dumps(facts), "\n".join(lines)):
        assert str(tmp_path) not in text and str(config.repo_root()) not in text


def test_refresh_checked_outputs_keeps_what_nbval_checks(tmp_path):
    """Checked cells keep their text output *and* execution count (nbval skips cells stored without one)."""
    src = tmp_path / "01_a.ipynb"
    _notebook(src, "# NBVAL_CHECK_OUTPUT\nprint(1)\n2", "print('not checked')")
    run = nbformat.read(src, 4)
    run.cells.insert(2, new_code_cell("PROFILE = 'cpu'", metadata={"tags": ["injected-parameters"]}))
    run.cells[3].execution_count = 3
    run.cells[3].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="1\n"),
        nbformat.v4.new_output("execute_result", {"text/plain": "2", "text/html": "<b>2</b>"}, execution_count=3),
        nbformat.v4.new_output("display_data", {"image/png": "iVBORw0KGgo="}),
    ]
    run.cells[4].execution_count = 4
    run.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="not checked\n")]
    nbformat.write(run, tmp_path / "executed.ipynb")
    assert report.refresh_checked_outputs(src, tmp_path / "executed.ipynb") == 1
    checked, other = nbformat.read(src, 4).cells[2:]
    assert checked.execution_count == 3 and checked.metadata["keep_output"] is True
    assert [o.output_type for o in checked.outputs] == ["stream", "execute_result"]
    assert checked.outputs[1].data == {"text/plain": "2"}
    assert other.execution_count is None and other.outputs == [] and "keep_output" not in other.metadata
    run.cells.pop(0)
    nbformat.write(run, tmp_path / "executed.ipynb")
    with pytest.raises(ValueError, match="cell for cell"):
        report.refresh_checked_outputs(src, tmp_path / "executed.ipynb")


def _render_stand_in(nbdir, rep, art, audit_record: dict, class_diff: float):
    """render_report on stand-in executed notebooks, an audit.json, class_means.json and two figures."""
    (rep / "executed").mkdir(parents=True)
    for nb in nbdir.glob("*.ipynb"):
        (rep / "executed" / nb.name).write_bytes(nb.read_bytes())
    row = {"model": "vgg16", "weights": "ImageNet", "n": "60", "ROC AUC [95% CI]": "1.000 [1.000, 1.000]"}
    write_json(art / "metrics" / "combined.json", {"table": [row]})
    write_json(art / "data" / "audit.json", audit_record)
    write_json(art / "data" / "class_means.json", {"max_abs_difference": class_diff})
    for name in ("phantom_montage", "01_class_means"):
        (rep / "figures").mkdir(exist_ok=True)
        (rep / "figures" / f"{name}.png").write_bytes(b"\x89PNG stand-in")
    report.render_report(report_dir=rep, notebooks_dir=nbdir, profile="smoke")
    return (rep / "README.md").read_text(), json.loads((rep / "run.json").read_text())


def test_report_on_kaggle_data_tells_the_truth(mini_course, tmp_path):
    """Kaggle-layout data whose labels follow the scans: the note, source, captions and the alarm above
    the metrics table are computed from the audit, with no machine path."""
    nbdir, rep, _ = mini_course
    root = kaggle_layout.write_scans(tmp_path / "public set", kaggle_layout.CONFOUNDED)
    record = audit.audit_dataset(root).to_dict()
    assert record["labels_confounded_with_patients"] and record["layout"] == "kaggle"
    record |= {"shortcut_auc": 1.0, "shortcut_alarm": True}  # as the audit of the public set's part recorded
    markdown, facts = _render_stand_in(nbdir, rep, tmp_path / "artifacts", record, class_diff=0.4)
    lines = markdown.splitlines()
    alarm = "**Not evidence of fracture detection: shortcut AUC 1.00, labels confounded with patients** "
    at = next(i for i, line in enumerate(lines) if line.startswith(alarm))
    assert lines[at + 2].startswith("| model | weights | n | ROC AUC"), "the alarm stands directly above the table"
    assert "| vgg16 | ImageNet | 60 | 1.000 [1.000, 1.000] |" in lines[at + 4]
    assert facts["data_source"] == "…/public set/cervical fracture (kaggle layout)" and not facts["phantom"]
    assert "> Teaching project, not a medical device. Results are on …/public set/cervical fracture" in markdown
    assert "synthetic phantom" not in markdown and "figures/phantom_montage.png" not in markdown
    assert "largest difference 0.40 of the grey range, the classes differ in coarse appearance" in markdown
    assert (
        "4 patients" in markdown
        and "exact duplicates" not in markdown
        and "- labels confounded with patients: fracture: 27 slices" in markdown
    )
    for text in (markdown, (rep / "index.html").read_text(), json.dumps(facts)):
        assert str(tmp_path) not in text


def test_report_on_the_phantom_says_so_and_raises_no_alarm(mini_course, tmp_path):
    nbdir, rep, _ = mini_course
    record = {"layout": "synthetic", "root": str(tmp_path / "synth"), "shortcut_auc": 0.55, "shortcut_alarm": False}
    markdown, facts = _render_stand_in(nbdir, rep, tmp_path / "artifacts", record, class_diff=0.076)
    assert facts["phantom"] and facts["alarms"] == []
    assert "Results are on the course's synthetic phantom: they say nothing about real CT." in markdown
    assert "Not evidence" not in markdown and "figures/phantom_montage.png" in markdown
    assert "largest difference 0.08 of the grey range, no coarse difference between the classes" in markdown
    assert facts["data_source"] == "synthetic phantom (default dataset of the smoke profile)"


def test_the_app_screenshot_is_captioned_from_what_the_app_showed(mini_course, tmp_path):
    nbdir, rep, _ = mini_course
    (rep / "figures").mkdir(parents=True)
    (rep / "figures" / "gui.png").write_bytes(b"\x89PNG stand-in")
    shown = {"bundle": "vgg16", "weights": "VGG16 convs from HED/BSDS500", "file": "S00042_C5.png", "split": "test"}
    shown |= {"label": "fracture", "probability": 0.912, "decision": "fracture", "threshold": 0.41, "gradcam": True}
    write_json(rep / "figures" / "gui.json", shown)
    record = {"layout": "synthetic", "root": str(tmp_path / "synth"), "shortcut_auc": 0.55, "shortcut_alarm": False}
    markdown, facts = _render_stand_in(nbdir, rep, tmp_path / "artifacts", record, class_diff=0.05)
    assert facts["app_screenshot"]["file"] == "S00042_C5.png"
    assert "![The upload-and-predict app (Voilà, real browser)](figures/gui.png)" in markdown
    assert (
        "model vgg16 (VGG16 convs from HED/BSDS500), file S00042_C5.png, a phantom test fracture slice, Grad-CAM on; "
        "the app showed probability 0.912, decision fracture at threshold 0.410." in markdown
    )


def test_calibration_and_heatmap_lines_come_from_notebook_05s_record():
    e = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    cal = {"temperature": 0.71, "bias": -5.33, "before": {"ece": e(0.361, 0.288, 0.444), "brier": e(0.269, 0.19, 0.35)}}
    cal["after"] = {"ece": e(0.07, 0.037, 0.126), "brier": e(0.075, 0.039, 0.116)}
    lines = report._calibration_and_localisation({"calibration": {"vgg16": cal}, "localisation": {"vgg16": "pg 0.83"}})
    assert lines == [
        "- **vgg16** calibration (T = 0.71, b = -5.33, fitted on validation): test ECE 0.361 [0.288, 0.444] → "
        "0.070 [0.037, 0.126], Brier 0.269 [0.190, 0.350] → 0.075 [0.039, 0.116]",
        "- **vgg16** heatmap chosen on validation: pg 0.83",
        "",
    ]
    assert report._calibration_and_localisation({}) == []


def test_study_level_section_shows_notebook_07s_table_and_says_whether_targets_were_met():
    ci = lambda v, lo, hi: {"value": v, "ci_low": lo, "ci_high": hi}  # noqa: E731
    rows = [
        {"aggregation": "max", "study AUC [95% CI]": "0.610 [0.323, 0.860]"},
        {"aggregation": "prevalence only (baseline)", "study AUC [95% CI]": "–"},
    ]
    targets = {
        "aggregation": "max",
        "study_auc": ci(0.61, 0.323, 0.86),
        "minus_baseline": ci(-0.05, -0.09, -0.01),
        "study_auc_met": False,
        "log_loss_met": True,
    }
    studies = {"table": rows, "targets": targets, "n_studies": {"test": 20, "test_fractured": 10, "labelled": 80}}
    text = "\n".join(report._studies_markdown({"studies": studies}))
    assert "| max | 0.610 [0.323, 0.860] |" in text and "| prevalence only (baseline) | – |" in text
    assert "20 test studies (10 fractured) of 80" in text
    assert "study AUC 0.610 [0.323, 0.860] (≥ 0.95: **not met**)" in text
    assert "-0.050 [-0.090, -0.010] (CI below 0: met)" in text
    assert report._studies_markdown({}) == [] and report._studies_markdown({"studies": {"table": []}}) == []
