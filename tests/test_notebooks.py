"""The course notebooks run end to end (papermill, `smoke` profile) and write their products."""

from __future__ import annotations

import json

import nbformat
import papermill
import pytest

from cspine_utils import config, data, phantom

NOTEBOOKS = config.repo_root() / "notebooks"


@pytest.fixture(scope="module")
def course_env(tmp_path_factory, monkeypatch_module):
    """A hermetic course run: smoke dataset, artifacts and report in a temporary folder."""
    root = tmp_path_factory.mktemp("course")
    dataset = root / "data"
    phantom.generate_dataset(dataset, phantom.SynthConfig(n=config.get_profile("smoke").n_synthetic, seed=0),
                             workers=2, progress=False)
    env = {"CSPINE_PROFILE": "smoke", "CSPINE_DATA_DIR": str(dataset), "CSPINE_ARTIFACTS": str(root / "artifacts"),
           "CSPINE_REPORT_DIR": str(root / "report"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for key, value in env.items():
        monkeypatch_module.setenv(key, value)
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _run(name: str, root):
    out = root / "executed" / f"{name}.ipynb"
    out.parent.mkdir(exist_ok=True)
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), kernel_name="python3",
                               progress_bar=False, cwd=str(NOTEBOOKS))
    return nbformat.read(out, as_version=4)


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") if o.output_type == "stream" else str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.slow
def test_01_then_02_run_and_hand_over_their_products(course_env):
    nb1 = _run("01_data_exploration", course_env)
    text1 = _text(nb1)
    audit_json = json.loads((course_env / "artifacts" / "data" / "audit.json").read_text())
    assert audit_json["n_files"] == config.get_profile("smoke").n_synthetic
    assert audit_json["leaking_groups"] == [] and audit_json["shortcut_auc"] < 0.9
    assert "SHORTCUT ALARM" in text1, "the Kaggle-like demo must raise the shortcut alarm"
    assert "cross-split leakage" in text1
    for fig in ("01_labelled_slice", "01_sample_grid", "01_class_means", "01_intensity_histograms", "phantom_montage"):
        assert (course_env / "report" / "figures" / f"{fig}.png").is_file()

    nb2 = _run("02_preprocessing_augmentation", course_env)
    split = data.load_manifest(data.artifacts_manifest_path())
    assert set(split["split"]) == {"train", "val", "test"}
    assert data.cross_split_leakage(split) == []
    assert "groups in more than one split: none" in _text(nb2)
    for fig in ("02_dicom_windows", "02_roi_crop", "02_augmentation_gallery"):
        assert (course_env / "report" / "figures" / f"{fig}.png").is_file()


def test_02_without_01_names_the_notebook_to_run_first(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_PROFILE", "smoke")
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "empty artifacts"))
    monkeypatch.setenv("CSPINE_REPORT_DIR", str(tmp_path / "report"))
    with pytest.raises(papermill.PapermillExecutionError) as info:
        _run("02_preprocessing_augmentation", tmp_path)
    assert "run notebooks/01_data_exploration.ipynb first" in str(info.value)
