"""`cspine predict` and predict.py: exit codes, JSON, folders and globs, plain errors, one code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cspine_utils import cli, config, course, gui, modelbundle, phantom, pipeline, predict

SIZE = 32


def make_tiny_bundle(models_dir: Path, name: str = "cnn", threshold: float = 0.5, crop_roi: bool = False) -> Path:
    """The course's CNN (small), fitted for one epoch on 20 toy images, saved as a bundle (a few seconds)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((20, SIZE, SIZE, 1), dtype=np.float32)
    y = (np.arange(20) % 2).astype("float32")
    model = course.build_cnn(SIZE, filters=(8, 16), name=name)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=10, verbose=0)
    return modelbundle.save_bundle(
        model,
        models_dir / name,
        image_size=SIZE,
        threshold=threshold,
        preprocessing={"crop_roi": crop_roi},
        profile="smoke",
        name=name,
    )


def phantom_png(path: Path, seed: int, fracture: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    spec = phantom.SliceSpec(phantom.sample_subject(rng, f"t{seed}"), "C5", "linear" if fracture else "none", 0.3, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(phantom.render_slice(spec).image).save(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict artifacts")
    make_tiny_bundle(root / "models", "cnn", threshold=0.5)
    return root


@pytest.fixture(scope="module")
def bundle(artifacts):
    return modelbundle.load_bundle(artifacts / "models" / "cnn")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Folders and files with spaces and parentheses in their names."""
    root = tmp_path_factory.mktemp("scans") / "scans (1)"
    phantom_png(root / "sub dir" / "slice (2).png", 1)
    phantom_png(root / "sub dir" / "normal slice.png", 2, fracture=False)
    phantom_png(root / "top (a).png", 3)
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.fixture()
def use_artifacts(artifacts, monkeypatch):
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(artifacts))
    return artifacts


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------------
def test_exit_0_when_every_file_is_predicted(capsys, use_artifacts, scans):
    code, out, err = run_cli(capsys, str(scans / "top (a).png"))
    assert code == 0
    name, prob, label = out.strip().split("\t")
    assert name.endswith("top (a).png") and 0.0 <= float(prob) <= 1.0 and label in ("normal", "fracture")
    assert err.count("not for diagnosis") == 1


def test_exit_1_when_some_fail_and_the_others_are_still_printed(capsys, use_artifacts, scans, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    code, out, err = run_cli(capsys, str(scans / "top (a).png"), str(bad), str(tmp_path / "missing.png"))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "\t" in lines[0] and "error" not in lines[0]
    assert "error: corrupt or unreadable file" in lines[1] and "text file" in lines[1]
    assert "error: file not found" in lines[2]
    assert "2 could not be used" in err


def test_exit_2_without_paths(capsys, use_artifacts):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == ""
    assert "give at least one image file" in err


@pytest.mark.parametrize("threshold", ["1.5", "-0.1", "nan"])
def test_exit_2_for_a_threshold_outside_0_1(capsys, use_artifacts, scans, threshold):
    code, _, err = run_cli(capsys, str(scans), "--threshold", threshold)
    assert code == 2 and "[0, 1]" in err


def test_exit_2_for_a_threshold_that_is_not_a_number(capsys, use_artifacts, scans):
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", str(scans), "--threshold", "high"])
    assert info.value.code == 2


def test_exit_2_when_no_bundle_exists_names_the_notebook(capsys, monkeypatch, tmp_path, scans):
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "empty"))
    code, out, err = run_cli(capsys, str(scans))
    assert code == 2 and out == ""
    assert "no trained model found" in err and "notebooks/03_cnn_training.ipynb" in err


def test_exit_2_for_a_tampered_bundle(capsys, tmp_path, artifacts, scans):
    import shutil

    copy = tmp_path / "models" / "cnn"
    shutil.copytree(artifacts / "models" / "cnn", copy)
    with open(copy / "model.keras", "ab") as f:
        f.write(b"tampered")
    code, _, err = run_cli(capsys, str(scans), "--model", str(copy))
    assert code == 2 and "checksum" in err


# --------------------------------------------------------------------------------------------
# Output and path expansion
# --------------------------------------------------------------------------------------------
def test_json_output_lists_file_probability_label_error(capsys, use_artifacts, scans):
    code, out, _ = run_cli(capsys, str(scans), "--json", "--threshold", "0")
    assert code == 0  # a folder is searched for images only: readme.txt is not a failure
    rows = json.loads(out)
    keys = {"file", "probability", "label", "error", "flags", "unlike_training_data", "distance"}
    assert all(set(r) == keys for r in rows)
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 3 and all(r["label"] == "fracture" for r in good)  # threshold 0


def test_folders_are_searched_recursively_and_skip_other_files(scans):
    files = predict.expand_paths([scans])
    names = sorted(Path(f).name for f, err in files if err is None)
    assert names == ["normal slice.png", "slice (2).png", "top (a).png"]


def test_globs_with_spaces_and_parentheses(scans, bundle):
    pattern = str(scans / "**" / "*(*).png")
    results = predict.predict_paths([pattern], bundle)
    assert sorted(Path(r.file).name for r in results) == ["slice (2).png", "top (a).png"]
    assert all(r.ok for r in results)
    # a literal name that contains glob characters is taken as it is, and duplicates are dropped
    literal = str(scans / "top (a).png")
    assert [r.file for r in predict.predict_paths([literal, literal], bundle)] == [literal]
    assert predict.predict_paths([str(scans / "*.dcm")], bundle)[0].error == "no file matches this pattern"


def test_every_bad_input_kind_has_a_plain_message(tmp_path, bundle):
    from test_dicom import write_ct

    (tmp_path / "text.png").write_text("just text")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(phantom_png(tmp_path / "full.png", 4).read_bytes()[:300])
    write_ct(tmp_path / "header only.dcm", None)
    (tmp_path / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((120, 120), np.uint8)).save(tmp_path / "big.png")
    names = ["text.png", "empty.png", "cut.png", "header only.dcm", "notes.txt"]
    results = predict.predict_paths([tmp_path / n for n in names], bundle)
    errors = dict(zip(names, (r.error for r in results)))
    errors["big.png"] = predict.predict_paths([tmp_path / "big.png"], bundle, max_pixels=100 * 100)[0].error
    assert errors["text.png"].startswith("corrupt or unreadable file: it is a text file")
    assert errors["empty.png"].startswith("empty file")
    assert errors["cut.png"].startswith("corrupt or unreadable file")
    assert errors["header only.dcm"].startswith("DICOM without pixel data")
    assert errors["notes.txt"].startswith("unsupported file type '.txt'")
    assert errors["big.png"] == (
        "image too large: 14,400 pixels (120x120), the limit is 10,000 pixels; refused without decoding it"
    )
    assert all(str(tmp_path) not in e for e in errors.values()), "messages name no temporary path"


def test_gradcam_dir_gets_one_overlay_per_file(capsys, use_artifacts, scans, tmp_path):
    out_dir = tmp_path / "cams"
    code, out, _ = run_cli(capsys, str(scans / "sub dir"), "--gradcam", str(out_dir), "--json")
    assert code == 0
    rows = json.loads(out)
    written = sorted(p.name for p in out_dir.glob("*.png"))
    assert written == ["normal slice_gradcam.png", "slice (2)_gradcam.png"]
    assert all(Path(r["gradcam"]).is_file() for r in rows)
    assert Image.open(out_dir / written[0]).mode == "RGB"


def test_default_model_prefers_vgg16_then_cnn(tmp_path):
    for name in ("aaa", "cnn", "vgg16", "zzz"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bundle.json").write_text("{}")
    (tmp_path / "no bundle").mkdir()
    assert list(predict.find_bundles(tmp_path)) == ["vgg16", "cnn", "aaa", "zzz"]
    (tmp_path / "vgg16" / "bundle.json").unlink()
    assert predict.default_bundle_dir(tmp_path) == tmp_path / "cnn"
    assert predict.default_bundle_dir(tmp_path / "nothing here") is None


# --------------------------------------------------------------------------------------------
# One code path
# --------------------------------------------------------------------------------------------
def test_gui_cli_and_bundle_give_identical_probabilities(capsys, use_artifacts, scans, bundle):
    path = scans / "sub dir" / "slice (2).png"
    code, out, _ = run_cli(capsys, str(path), "--json")
    assert code == 0
    p_cli = json.loads(out)[0]["probability"]
    p_bundle = float(bundle.predict_files([path])[0])
    app = gui.build_app(use_artifacts / "models")
    p_gui = app.predict_bytes(path.name, path.read_bytes()).probability
    p_api = predict.predict_paths([path], bundle)[0].probability
    assert p_cli == p_bundle == p_gui == p_api


def test_console_script_exit_code_and_json(use_artifacts, scans, tmp_path):
    """The real command in a fresh process: exit status 1 with one bad file, JSON still printed."""
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    env = dict(os.environ, CSPINE_ARTIFACTS=str(use_artifacts), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "cspine_utils", "predict", str(scans / "sub dir"), str(bad), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["error"] is None for r in rows] == [True, True, False]
    assert rows[2]["error"].startswith("empty file")
    assert proc.stderr.count("not for diagnosis") == 1
    assert config.artifacts_dir() == use_artifacts


def test_a_bundle_that_crops_to_the_spine_crops_in_every_path(tmp_path, scans):
    """crop_roi=True (the course default) is applied by the CLI path, the GUI path and the bundle alike."""
    cropped = modelbundle.load_bundle(make_tiny_bundle(tmp_path / "models", "cnn", crop_roi=True))
    path = scans / "sub dir" / "slice (2).png"
    [result] = predict.predict_paths([path], cropped, keep_images=True)
    expected_input = pipeline.load_and_preprocess(path, SIZE, crop_roi=True)
    uncropped_input = pipeline.load_and_preprocess(path, SIZE, crop_roi=False)
    np.testing.assert_array_equal(result.image, expected_input[..., 0])
    assert not np.allclose(expected_input, uncropped_input), "the crop changes the model input"
    expected = float(cropped.model.predict_on_batch(expected_input[None]).reshape(-1)[0])
    assert result.probability == pytest.approx(expected, abs=1e-6)
    assert float(cropped.predict_files([path])[0]) == result.probability
    app = gui.build_app(tmp_path / "models", predictions_dir=tmp_path / "predictions")
    shown = app.predict_bytes(path.name, path.read_bytes())
    assert shown.probability == result.probability
    np.testing.assert_array_equal(shown.image, expected_input[..., 0])


def test_the_heatmap_chosen_in_notebook_05_is_the_one_the_app_draws(tmp_path):
    """explain.json beside a bundle (written by notebook 05) sets the method and layer of every heat map."""
    from cspine_utils import explain, records

    bundle = modelbundle.load_bundle(make_tiny_bundle(tmp_path / "models"))
    path = phantom_png(tmp_path / "slice.png", seed=4)
    plain = predict.predict_paths([path], bundle, gradcam_dir=tmp_path / "cams")[0]
    assert plain.heatmap_name == "Grad-CAM" and plain.heatmap is not None
    records.write_json(bundle.path / "explain.json", {"method": "hirescam", "layer": "block1_conv1_relu"})
    chosen = predict.predict_paths([path], bundle, gradcam_dir=tmp_path / "cams")[0]
    assert chosen.heatmap_name == "HiResCAM at block1_conv1_relu"
    expected = explain.gradcam(bundle.model, chosen.image[None, ..., None], "block1_conv1_relu", method="hirescam")
    np.testing.assert_allclose(chosen.heatmap, expected[0], atol=1e-6)
    assert not np.allclose(chosen.heatmap, plain.heatmap)
