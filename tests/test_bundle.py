"""Model bundles: model.keras + bundle.json, written atomically, checked on load (real Keras models)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cspine_utils import config, course, modelbundle, pipeline

# TensorFlow tensors meet NumPy 2's copy keyword inside Keras: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def small_cnn():
    config.set_seed(0)
    return course.build_cnn(32, filters=(8, 16, 16))


def images(n: int = 6, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, size=(n, size, size, 1)).astype(np.float32)


def test_manifest_fingerprint():
    m = pd.DataFrame({"path": ["/d/a.png", "/d/b.png"], "label": ["normal", "fracture"], "split": ["train", "val"]})
    fp = modelbundle.manifest_fingerprint(m)
    assert len(fp) == 64 and fp == modelbundle.manifest_fingerprint(m.iloc[::-1])
    by_hand = "\n".join(sorted(["/d/a.png\tnormal\ttrain", "/d/b.png\tfracture\tval"]))
    assert fp == hashlib.sha256(by_hand.encode()).hexdigest()  # bundles written before keep their fingerprint
    changed = m.assign(label=["fracture", "fracture"])
    assert modelbundle.manifest_fingerprint(changed) != fp
    moved = m.assign(path=["/e/a.png", "/e/b.png"])
    fp_moved = modelbundle.manifest_fingerprint(moved, root="/e")
    assert fp_moved == modelbundle.manifest_fingerprint(m, root="/d")
    with pytest.raises(ValueError, match="'label'"):
        modelbundle.manifest_fingerprint(m.drop(columns="label"))


def save_small_bundle(model, folder, **overrides):
    kwargs = dict(
        class_names=pipeline.CLASS_NAMES,
        image_size=32,
        channels=1,
        preprocessing={"crop_roi": False, "window": [400, 1800]},
        threshold=0.42,
        val_metrics={"auc": np.float32(0.9), "n": np.int64(8)},
        weights_info=None,
        data_fingerprint="abc123",
        seed=0,
        profile="smoke",
        name="toy",
    )
    kwargs.update(overrides)
    return modelbundle.save_bundle(model, folder, **kwargs)


def test_bundle_round_trip_and_fields(tmp_path, small_cnn):
    x = images()
    folder = save_small_bundle(small_cnn, tmp_path / "bundle")
    record = json.loads((folder / "bundle.json").read_text())
    for key in (
        "format_version",
        "name",
        "created",
        "model_file",
        "model_sha256",
        "class_names",
        "image_size",
        "channels",
        "preprocessing",
        "threshold",
        "val_metrics",
        "weights",
        "data_fingerprint",
        "seed",
        "profile",
        "versions",
        "compute_dtype",
        "trained_compute_dtypes",
    ):
        assert key in record, key
    assert set(record["versions"]) == {"tensorflow", "keras", "keras_backend", "numpy", "cspine_utils"}
    assert record["val_metrics"] == {"auc": pytest.approx(0.9), "n": 8}
    digest = hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest()
    assert record["model_sha256"] == digest
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "model.keras"]  # no temporary left

    bundle = modelbundle.load_bundle(folder)
    assert bundle.image_size == 32 and bundle.threshold == 0.42
    assert bundle.class_names == ("normal", "fracture")
    expected = np.asarray(small_cnn.predict(x, verbose=0)).ravel()
    np.testing.assert_allclose(bundle.predict_proba(x), expected, atol=1e-6)
    assert bundle.predict_proba(x[0]).shape == (1,)
    assert bundle.classify([0.41, 0.42]) == ["normal", "fracture"]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bundle.predict_proba(x * 255)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 1\)"):
        bundle.predict_proba(np.zeros((1, 64, 64, 1), np.float32))

    # files go through pipeline.load_and_preprocess with the bundle's settings (64 px: the input guard's minimum)
    paths = []
    for i in range(2):
        p = tmp_path / f"slice{i}.png"
        Image.fromarray((np.kron(x[i, ..., 0], np.ones((2, 2))) * 255).astype(np.uint8), mode="L").save(p)
        paths.append(p)
    pre = np.stack([pipeline.load_and_preprocess(p, 32) for p in paths])
    np.testing.assert_allclose(bundle.predict_files(paths), bundle.predict_proba(pre), atol=1e-6)


def test_undefined_metrics_are_written_as_strict_json_null(tmp_path, small_cnn):
    folder = save_small_bundle(small_cnn, tmp_path / "b", val_metrics={"auc": 0.7, "ppv": float("nan")})
    text = (folder / "bundle.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["val_metrics"] == {"auc": 0.7, "ppv": None}


def test_bundle_refuses_tampered_or_missing_files(tmp_path, small_cnn):
    folder = save_small_bundle(small_cnn, tmp_path / "bundle")
    with open(folder / "model.keras", "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        ValueError,
        match=r"model.keras in .*bundle does not match the checksum "
        r"recorded in bundle.json",
    ):
        modelbundle.load_bundle(folder)
    (folder / "model.keras").unlink()
    with pytest.raises(FileNotFoundError, match="no model.keras in .*save_bundle"):
        modelbundle.load_bundle(folder)
    (folder / "bundle.json").write_text("{not json")
    with pytest.raises(ValueError, match="bundle.json: not valid JSON"):
        modelbundle.load_bundle(folder)
    (folder / "bundle.json").write_text('{"image_size": 32}')
    with pytest.raises(ValueError, match="lacks model_sha256, channels, class_names, threshold"):
        modelbundle.load_bundle(folder)
    (folder / "bundle.json").unlink()
    with pytest.raises(FileNotFoundError, match="no bundle.json in .*save_bundle"):
        modelbundle.load_bundle(folder)
    with pytest.raises(FileNotFoundError, match="no model bundle folder"):
        modelbundle.load_bundle(tmp_path / "nowhere")


def test_save_bundle_validates(tmp_path, small_cnn):
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        save_small_bundle(small_cnn, tmp_path / "b", profile="huge")
    with pytest.raises(ValueError, match="do not match the model's input"):
        save_small_bundle(small_cnn, tmp_path / "b", image_size=64)
    with pytest.raises(ValueError, match="threshold"):
        save_small_bundle(small_cnn, tmp_path / "b", threshold=1.5)
    with pytest.raises(ValueError, match="class_names"):
        save_small_bundle(small_cnn, tmp_path / "b", class_names=("a",))
    with pytest.raises(ValueError, match="seed"):
        save_small_bundle(small_cnn, tmp_path / "b", seed=-1)
    with pytest.raises(ValueError, match="weights_info"):
        save_small_bundle(small_cnn, tmp_path / "b", weights_info={"source": "random"})
    with pytest.raises(ValueError, match="keras.Model"):
        save_small_bundle("not a model", tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing is written before the arguments are checked
