"""Outputs a user can trust: the input guard, calibration and the "unlike the training data" flag.

Real files throughout: pydicom's own MR and CT test images, scikit-image's colour photograph, PNGs
written here; real (tiny) Keras models saved as bundles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pydicom.data import get_testdata_file
from test_predict import make_tiny_bundle, phantom_png

from cspine_utils import course, evaluate, guard, modelbundle, predict, trust

ASTRONAUT = Path(skimage.data.__file__).parent / "astronaut.png"


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One real file per kind of input, keyed by what it is."""
    root = tmp_path_factory.mktemp("guard inputs")
    slice_path = phantom_png(root / "phantom slice.png", seed=3)
    grey = np.asarray(Image.open(slice_path))
    Image.new("L", (1, 1), 128).save(root / "one pixel.png")
    Image.new("L", (10, 4000), 128).save(root / "strip.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "grey as rgb.png")
    Image.fromarray((grey // 2).astype(np.uint8)).save(root / "dark.png")  # a slice exported with the wrong window
    return {
        "phantom": slice_path,
        "grey_rgb": root / "grey as rgb.png",
        "one_pixel": root / "one pixel.png",
        "strip": root / "strip.png",
        "dark": root / "dark.png",
        "mr": Path(pydicom_file("MR_small.dcm")),
        "ct": Path(pydicom_file("CT_small.dcm")),
        "colour": ASTRONAUT,
    }


@pytest.mark.parametrize(
    "kind, message",
    [
        ("mr", "MR image (DICOM Modality MR): this model reads CT"),
        ("one_pixel", "image too small: 1×1 pixels; this model needs at least 64 pixels on each side"),
        ("strip", "image too small: 10×4000 pixels"),
        ("colour", "colour image (54% of its pixels are coloured): a CT slice is grey"),
    ],
)
def test_inputs_that_are_not_ct_slices_are_refused(inputs, kind, message):
    check = guard.check_input(inputs[kind])
    assert check.refusal is not None and check.refusal.startswith(message), check


def test_a_long_strip_that_is_wide_enough_is_refused_for_its_shape(tmp_path):
    Image.new("L", (64, 400), 200).save(tmp_path / "tall.png")
    refusal = guard.check_input(tmp_path / "tall.png").refusal
    assert refusal == (
        "not the shape of a CT slice: 64×400 pixels is an aspect ratio of 6:1 "
        "(at most 3:1 is accepted; an axial slice is about square)"
    )


@pytest.mark.parametrize("kind", ["phantom", "grey_rgb", "ct"])
def test_ct_slices_pass_without_flags(inputs, kind):
    assert guard.check_input(inputs[kind]) == guard.InputCheck()


def test_an_image_without_bright_bone_is_flagged_not_refused(inputs):
    check = guard.check_input(inputs["dark"])
    assert check.refusal is None
    assert len(check.flags) == 1 and check.flags[0].startswith(guard.NOT_BONE_WINDOW + ": no bright bone (0.00%")


def test_one_path_for_cli_app_and_bundle(tmp_path, inputs):
    """predict_paths (CLI), predict_bytes (app) and Bundle.predict_files give the same verdicts in plain words."""
    bundle = modelbundle.load_bundle(make_tiny_bundle(tmp_path / "models"))
    kinds = ["phantom", "mr", "one_pixel", "strip", "colour", "dark"]
    results = predict.predict_paths([inputs[k] for k in kinds], bundle)
    by_kind = dict(zip(kinds, results))
    assert by_kind["phantom"].ok and by_kind["phantom"].flags == []
    assert by_kind["dark"].ok and by_kind["dark"].flags[0].startswith(guard.NOT_BONE_WINDOW)
    for kind in ("mr", "one_pixel", "strip", "colour"):
        assert by_kind[kind].error == guard.check_input(inputs[kind]).refusal
        assert json.loads(json.dumps(by_kind[kind].to_dict()))["error"] == by_kind[kind].error
    upload = predict.predict_bytes("scan.dcm", inputs["mr"].read_bytes(), bundle)
    assert upload.error == "MR image (DICOM Modality MR): this model reads CT"
    with pytest.raises(ValueError, match=r"1 of 2 file\(s\) not predicted: .*MR_small.dcm: MR image"):
        bundle.predict_files([inputs["phantom"], inputs["mr"]])
    with pytest.warns(
        UserWarning, match=r"^1 of 2 file\(s\) carry a warning: dark.png: does not look like a bone-window"
    ):
        assert bundle.predict_files([inputs["dark"], inputs["phantom"]]).shape == (2,)


def test_fit_calibration_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 4.0, 4000)
    y = (rng.random(4000) < trust.sigmoid(z / 2.0 - 1.0)).astype(int)  # true T = 2, b = -1
    t, b = course.fit_calibration(z, y)
    assert t == pytest.approx(2.0, rel=0.15) and b == pytest.approx(-1.0, abs=0.2)
    t_only, b_zero = course.fit_calibration(z, y, bias=False)
    assert b_zero == 0.0 and t_only > 1.0
    p_raw, p_cal = trust.sigmoid(z), trust.sigmoid(z / t + b)
    assert evaluate.roc_auc(y, p_cal) == pytest.approx(evaluate.roc_auc(y, p_raw))  # the ranking is kept
    assert evaluate.expected_calibration_error(y, p_cal) < 0.03 < evaluate.expected_calibration_error(y, p_raw)
    with pytest.raises(ValueError, match="both classes"):
        course.fit_calibration(z[:10], np.zeros(10))


def test_feature_reference_flags_about_one_percent_of_in_distribution_and_far_points(tmp_path):
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(2000, 8)), rng.normal(size=(1000, 8))
    labels = rng.integers(0, 2, 2000)
    ref = trust.FeatureReference.fit(train, labels, val, quantile=0.99)
    assert ref.val_flagged == pytest.approx(0.01, abs=0.002)
    assert ref.unlike(rng.normal(size=(1000, 8))).mean() < 0.03
    assert ref.unlike(rng.normal(size=(50, 8)) + 6.0).all()
    x = val[:3]  # the distance is the Mahalanobis distance to the nearer class mean
    by_hand = [np.sqrt(min((v - m) @ ref.precision @ (v - m) for m in ref.means)) for v in x]
    np.testing.assert_allclose(ref.distance(x), by_hand)
    ref.save(tmp_path / "r.npz")
    again = trust.FeatureReference.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(again.distance(val), ref.distance(val))
    assert (again.cutoff, again.n_train) == (ref.cutoff, 2000)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 8\)"):
        ref.distance(np.zeros((2, 3)))


def test_bundle_stores_calibration_and_reference(tmp_path, inputs):
    bundle = modelbundle.load_bundle(make_tiny_bundle(tmp_path / "models"))
    x = np.random.default_rng(0).random((12, bundle.image_size, bundle.image_size, 1), dtype=np.float32)
    z, features = trust.logits_and_features(bundle.model, x)
    np.testing.assert_allclose(trust.sigmoid(z), bundle.model.predict(x, verbose=0).ravel(), atol=1e-5)
    ref = trust.FeatureReference.fit(features, np.arange(12) % 2, features)
    folder = modelbundle.save_bundle(
        bundle.model, tmp_path / "calibrated", image_size=bundle.image_size, calibration=(2.5, -0.4), reference=ref
    )
    record = json.loads((folder / "bundle.json").read_text())
    assert record["calibration"]["temperature"] == 2.5 and record["calibration"]["bias"] == -0.4
    assert record["unlike_training"]["file"] == "reference.npz" and record["unlike_training"]["cutoff"] == ref.cutoff
    loaded = modelbundle.load_bundle(folder)
    scores = loaded.assess(x)
    np.testing.assert_allclose(scores["probability"], trust.sigmoid(z / 2.5 - 0.4), atol=1e-5)
    np.testing.assert_allclose(loaded.predict_proba(x, calibrated=False), trust.sigmoid(z), atol=1e-5)
    np.testing.assert_allclose(scores["distance"], ref.distance(features), rtol=1e-4)
    result = predict.predict_paths([inputs["phantom"]], loaded)[0]
    assert result.distance is not None and result.unlike_training == (result.distance > ref.cutoff)
    (folder / "reference.npz").write_bytes(b"changed")
    with pytest.raises(ValueError, match="reference.npz in .* does not match bundle.json"):
        modelbundle.load_bundle(folder)
    with pytest.raises(ValueError, match="calibration must be"):
        modelbundle.save_bundle(bundle.model, tmp_path / "bad", image_size=bundle.image_size, calibration=(0, 0))


def test_cspine_predict_json_gives_the_reasons_and_the_flags(tmp_path, inputs, capsys):
    from cspine_utils import cli

    bundle_dir = make_tiny_bundle(tmp_path / "models")
    files = [str(inputs[k]) for k in ("mr", "colour", "dark", "phantom")]
    code = cli.main(["predict", *files, "--model", str(bundle_dir), "--json"])
    rows = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert code == 1  # some files could not be used
    assert rows["MR_small.dcm"]["error"] == "MR image (DICOM Modality MR): this model reads CT"
    assert rows["astronaut.png"]["error"].startswith("colour image") and rows["astronaut.png"]["probability"] is None
    assert rows["dark.png"]["error"] is None and rows["dark.png"]["flags"][0].startswith(guard.NOT_BONE_WINDOW)
    assert rows["phantom slice.png"]["flags"] == [] and 0.0 <= rows["phantom slice.png"]["probability"] <= 1.0
