"""The ipywidgets app: uploads set as ipywidgets 8 does, results and plain errors in the widgets."""

from __future__ import annotations

import datetime as dt
import html
import io
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_dicom import write_ct
from test_predict import make_tiny_bundle

from cspine_utils import config, gui, phantom, pipeline

NOTEBOOK = config.repo_root() / "notebooks" / "06_predict_gui.ipynb"


def upload_entry(name: str, content: bytes, mime: str = "image/png") -> dict:
    """One file as ipywidgets 8 puts it in ``FileUpload.value``."""
    return {
        "name": name,
        "type": mime,
        "size": len(content),
        "content": memoryview(content),
        "last_modified": dt.datetime.now(dt.timezone.utc),
    }


def upload(app: gui.App, *files: tuple[str, bytes]) -> None:
    app.upload.value = tuple(upload_entry(n, c) for n, c in files)


def shown_text(app: gui.App) -> str:
    """All text the app shows now: the HTML and Label widgets that are not hidden, tags stripped."""
    parts: list[str] = []

    def walk(widget) -> None:
        value = getattr(widget, "value", None)
        if widget.__class__.__name__ in ("HTML", "Label") and isinstance(value, str):
            text = re.sub(r"<br\s*/?>|</(?:div|p|tr|li|table)>", "\n", value)
            parts.append(html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"</t[dh]>", " ", text))))
        if getattr(getattr(widget, "layout", None), "display", None) == "none":
            return
        for child in getattr(widget, "children", ()):
            walk(child)

    walk(app.widget)
    return re.sub(r"[ \t]+", " ", "\n".join(p.strip() for p in parts if p.strip()))


def card_images(card) -> list:
    """The Image widgets of a result card (model input, Grad-CAM overlay)."""
    return [w for box in card.children for w in getattr(box, "children", ()) if w.__class__.__name__ == "Image"]


def slice_png(seed: int, fracture: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    spec = phantom.SliceSpec(phantom.sample_subject(rng, f"g{seed}"), "C5", "linear" if fracture else "none", 0.3, seed)
    buf = io.BytesIO()
    Image.fromarray(phantom.render_slice(spec).image).save(buf, format="PNG")
    return buf.getvalue()


def slice_dicom(path: Path, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    spec = phantom.SliceSpec(phantom.sample_subject(rng, f"d{seed}"), "C4", "burst", 0.2, seed)
    hu = phantom.render_slice(spec).hu
    return write_ct(path, np.clip(np.round(hu + 1024), -2000, 4000).astype(np.int16), intercept=-1024.0)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gui artifacts") / "models"
    make_tiny_bundle(root, "cnn", threshold=0.37)
    make_tiny_bundle(root, "other", threshold=0.8)
    return root


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    return {"fracture.png": slice_png(1), "normal.png": slice_png(2, fracture=False)}


@pytest.fixture()
def app(models_dir, tmp_path) -> gui.App:
    return gui.build_app(models_dir, predictions_dir=tmp_path / "predictions")


def test_controls_and_the_not_for_diagnosis_note(app):
    assert app.upload.accept == ".png,.jpg,.jpeg,.bmp,.tif,.tiff,.dcm" and app.upload.multiple
    assert [v for _, v in app.model_dropdown.options] == ["cnn", "other"]
    assert app.model_dropdown.value == "cnn" and app.bundle is not None
    assert app.threshold.value == pytest.approx(0.37)
    assert app.gradcam.value is True
    assert "Teaching tool, not for diagnosis" in shown_text(app)


def test_png_upload_shows_model_input_probability_and_decision(app, pngs, models_dir):
    upload(app, ("fracture.png", pngs["fracture.png"]))
    assert app.upload.value == (), "uploads are cleared after processing"
    [result] = app.results
    assert result.ok and 0.0 <= result.probability <= 1.0
    text = shown_text(app)
    assert f"Fracture probability: {result.probability:.3f}" in text
    assert f"Decision at threshold 0.370: {result.label}" in text
    images = card_images(app.results_box.children[0])
    assert len(images) == 2, "model input and Grad-CAM overlay"
    shown = np.asarray(Image.open(io.BytesIO(images[0].value)))
    assert shown.shape[0] >= gui.DISPLAY_PX and shown.shape[0] % result.image.shape[0] == 0
    assert result.heatmap is not None and result.heatmap.shape == (32, 32)
    assert "Traceback" not in text


def test_dicom_upload_is_shown_in_the_bone_window(app, tmp_path):
    path = slice_dicom(tmp_path / "slice.dcm")
    app.upload.value = (upload_entry("slice.dcm", path.read_bytes(), "application/dicom"),)
    [result] = app.results
    assert result.ok, result.error
    expected = pipeline.load_and_preprocess(path, 32)[..., 0]  # read_image applies the bone window
    np.testing.assert_array_equal(result.image, expected)
    assert f"Fracture probability: {result.probability:.3f}" in shown_text(app)


def test_bad_files_get_plain_messages_and_the_app_keeps_working(app, pngs, tmp_path):
    header_only = write_ct(tmp_path / "header.dcm", None).read_bytes()
    upload(
        app,
        ("notes.png", b"my notes, not an image"),
        ("empty.png", b""),
        ("header.dcm", header_only),
        ("normal.png", pngs["normal.png"]),
    )
    errors = {r.file: r.error for r in app.results}
    assert errors["normal.png"] is None
    assert errors["notes.png"].startswith("corrupt or unreadable file: it is a text file")
    assert errors["empty.png"].startswith("empty file")
    assert errors["header.dcm"].startswith("DICOM without pixel data")
    text = shown_text(app)
    for name in ("notes.png", "empty.png", "header.dcm"):
        assert f"{name}: could not be used — {errors[name]}" in text
    assert "3 could not be used" in text and "Traceback" not in text and "cspine_upload_" not in text
    # still responsive: the next upload is predicted
    upload(app, ("fracture.png", pngs["fracture.png"]))
    assert app.results[-1].ok and app.upload.value == ()


def test_image_larger_than_the_limit_and_unsupported_type(models_dir, tmp_path):
    small_app = gui.build_app(models_dir, max_pixels=50 * 50, predictions_dir=tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    upload(small_app, ("big.png", buf.getvalue()), ("scan.gif", b"GIF89a"))
    big, gif = small_app.results
    assert big.error.startswith("image too large: 4,096 pixels (64x64), the limit is 2,500 pixels")
    assert gif.error.startswith("unsupported file type '.gif'")
    assert "2,500 pixels" in shown_text(small_app)  # the limit is stated in the note


def test_threshold_changes_decisions_and_a_new_model_brings_its_own(app, pngs):
    upload(app, ("fracture.png", pngs["fracture.png"]))
    p = app.results[0].probability
    app.threshold.value = max(0.0, p - 0.01)
    assert app.results[0].label == "fracture" and "Decision at threshold" in shown_text(app)
    app.threshold.value = min(1.0, p + 0.01)
    assert app.results[0].label == "normal"
    app.model_dropdown.value = "other"
    assert app.bundle.path.name == "other" and app.threshold.value == pytest.approx(0.8)
    assert len(app.results) == 1 and app.results[0].threshold == pytest.approx(0.8), "re-predicted"


def test_gradcam_toggle(app, pngs):
    app.gradcam.value = False
    upload(app, ("normal.png", pngs["normal.png"]))
    assert app.results[0].heatmap is None
    assert len(card_images(app.results_box.children[0])) == 1
    app.gradcam.value = True
    assert app.results[0].heatmap is not None
    assert len(card_images(app.results_box.children[0])) == 2
    assert "Grad-CAM: where the model looked" in shown_text(app)


def test_table_for_several_files_saved_as_csv(app, pngs, tmp_path):
    assert app.table_box.layout.display == "none"
    upload(app, *pngs.items(), ("bad.png", b"x"))
    assert app.table_box.layout.display != "none"
    assert "<th>file</th><th>probability</th><th>decision</th>" in app.table.value
    app.save_button.click()
    saved = sorted((tmp_path / "predictions").glob("predictions_*.csv"))
    assert len(saved) == 1 and str(saved[0]) in app.save_status.value
    table = pd.read_csv(saved[0])
    assert list(table.columns) == [
        "file",
        "probability",
        "decision",
        "threshold",
        "model",
        "error",
        "warnings",
        "distance",
    ]
    assert list(table["file"]) == ["fracture.png", "normal.png", "bad.png"]
    assert table["error"].isna().tolist() == [True, True, False]


def test_csv_goes_to_artifacts_predictions_by_default(models_dir, pngs, tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "art"))
    default_app = gui.build_app(models_dir)
    default_app.predict_bytes("normal.png", pngs["normal.png"])
    path = default_app.save_csv()
    assert path.parent == tmp_path / "art" / "predictions" and path.is_file()


def test_no_model_yet_says_which_notebook_to_run(tmp_path, pngs):
    empty = tmp_path / "models"
    app = gui.build_app(empty)
    assert app.bundle is None and app.model_dropdown.disabled
    text = shown_text(app)
    assert "No trained model yet" in text and "notebooks/03_cnn_training.ipynb" in text
    upload(app, ("normal.png", pngs["normal.png"]))
    assert app.results[0].error.startswith("no trained model found") and app.upload.value == ()
    assert "Traceback" not in shown_text(app)
    # train (here: save) a model, press Refresh: the same app now predicts, the earlier upload too
    make_tiny_bundle(empty, "cnn")
    app.refresh_button.click()
    assert app.bundle is not None and app.results[0].ok


def test_an_unexpected_failure_is_a_message_not_a_traceback(app, pngs, monkeypatch):
    from cspine_utils import predict

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(predict, "predict_bytes", boom)
    upload(app, ("normal.png", pngs["normal.png"]))
    assert "simulated failure" in app.results[0].error and "Traceback" not in shown_text(app)
    monkeypatch.undo()
    upload(app, ("normal.png", pngs["normal.png"]))
    assert app.results[-1].ok


def test_stored_notebook_has_no_outputs_and_builds_the_app_in_one_call():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert sources.count("gui.build_app(") == 1 and "app.predict_bytes(" in sources
    unchecked = [c for c in nb.cells if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" not in c.source]
    assert all(c.outputs == [] for c in unchecked), "no uploads or images in the stored notebook"


def _run_notebook(tmp_path, artifacts: Path) -> str:
    import papermill

    out = tmp_path / "06.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(out),
        kernel_name="python3",
        progress_bar=False,
        cwd=str(NOTEBOOK.parent),
        parameters={"N_DEMO": 2},
    )
    nb = nbformat.read(out, as_version=4)
    return "\n".join(
        o.get("text", "") if o.output_type == "stream" else str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        for o in c.get("outputs", [])
    )


@pytest.mark.slow
def test_notebook_06_runs_with_a_bundle(tmp_path, models_dir, monkeypatch):
    monkeypatch.setenv("CSPINE_PROFILE", "smoke")
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(models_dir.parent))
    text = _run_notebook(tmp_path, models_dir.parent)
    assert "app, command line and Bundle.predict_files agree" in text
    assert "error shown to the user: corrupt or unreadable file" in text


@pytest.mark.slow
def test_notebook_06_without_a_bundle_names_notebook_03(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_PROFILE", "smoke")
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "empty artifacts"))
    text = _run_notebook(tmp_path, tmp_path / "empty artifacts")
    assert "No trained model yet" in text and "run notebooks/03_cnn_training.ipynb first" in text
