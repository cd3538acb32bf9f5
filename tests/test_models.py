"""Models, weights provenance, training loops and model bundles (real TensorFlow, tiny data)."""

from __future__ import annotations

import hashlib
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cspine_utils import config, course, explain, hardware, modelbundle, models, pipeline

# TensorFlow tensors meet NumPy 2's copy keyword inside Keras: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def toy_images(n: int = 40, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; label 1 ones carry a bright square. (n, size, size, 1) in [0, 1], (n,)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, size=(n, size, size, 1)).astype(np.float32)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(2, size - 10, size=2)
        x[i, r : r + 8, c : c + 8, 0] = 0.9
    return x, y.astype(np.float32)


def toy_dataset(x: np.ndarray, y: np.ndarray, batch: int = 8) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


@pytest.fixture
def small_cnn() -> keras.Model:
    config.set_seed(0)
    return models.build_cnn(32, filters=(8, 16, 16))


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------
def test_build_cnn_shapes_and_gradcam_layer(small_cnn):
    x, _ = toy_images(4)
    p = np.asarray(small_cnn(x, training=False))
    assert p.shape == (4, 1) and ((p > 0) & (p < 1)).all()
    assert small_cnn.get_layer("last_conv").output.shape == (None, 8, 8, 16)
    assert explain.gradcam_layer_name(small_cnn) == "last_conv_relu"
    grad_model = keras.Model(small_cnn.input, [small_cnn.get_layer("last_conv_relu").output, small_cnn.output])
    maps, probs = grad_model(x)
    assert maps.shape == (4, 8, 8, 16) and probs.shape == (4, 1)
    assert small_cnn.get_layer(modelbundle.OUTPUT_LAYER).dtype_policy.compute_dtype == "float32"


def test_build_cnn_default_and_bad_arguments():
    model = models.build_cnn(64)
    assert model.input_shape == (None, 64, 64, 1) and model.output_shape == (None, 1)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-2:] == [
        "block4_conv1",
        "last_conv",
    ]
    with pytest.raises(ValueError, match="image_size"):
        models.build_cnn(4)  # 4 blocks need >= 8 px
    with pytest.raises(ValueError, match="dropout"):
        models.build_cnn(32, dropout=1.0)
    with pytest.raises(ValueError, match="convs_per_block"):
        models.build_cnn(32, filters=(8, 16), convs_per_block=(1,))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_cnn_decreases_loss_and_logs(tmp_path, small_cnn):
    x, y = toy_images(40)
    train, val = toy_dataset(x[:32], y[:32]), toy_dataset(x[32:], y[32:])
    history = models.train_cnn(
        small_cnn,
        train,
        val,
        epochs=2,
        lr=1e-2,
        class_weight=models.class_weights_from_labels(y[:32]),
        out_dir=tmp_path,
        verbose=0,
    )
    assert history["loss"][1] < history["loss"][0]
    assert {"loss", "accuracy", "auc", "precision", "recall", "val_auc"} <= set(history)
    assert (tmp_path / "best.keras").is_file()
    assert len((tmp_path / "history.csv").read_text().strip().splitlines()) == 1 + 2


def test_standard_callbacks_and_optimizers(tmp_path):
    cbs = models.standard_callbacks(tmp_path / "run", patience=4)
    kinds = {type(c).__name__: c for c in cbs}
    assert set(kinds) == {"EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint", "CSVLogger"}
    stopper = kinds["EarlyStopping"]
    assert stopper.monitor == "val_auc" and stopper.restore_best_weights
    assert kinds["ModelCheckpoint"].mode == "max"
    assert len(models.standard_callbacks(None)) == 2


def test_class_weights_are_balanced():
    w = models.class_weights_from_labels([0, 0, 0, 1])
    assert w == pytest.approx({0: 4 / 6, 1: 2.0})
    assert models.class_weights_from_labels(["normal", "fracture"]) == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="both classes"):
        models.class_weights_from_labels([0, 0])
    with pytest.raises(ValueError, match="0 or 1, got 2"):
        models.class_weights_from_labels([0, 1, 2])


def test_choose_threshold_by_hand():
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.6, 0.5, 0.9]
    # J at 0.1, 0.2, 0.5, 0.6, 0.9: 0, 1/3, 2/3, 1/6, 1/2
    assert models.choose_threshold(y, p) == 0.5
    # F1: 4/9, 2/3, 4/5, 1/2, 2/3
    assert models.choose_threshold(y, p, method="f1") == 0.5
    # ties (J = 2/3 at 0.5 and 0.7) go to the lower threshold: the higher sensitivity
    assert models.choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.6, 0.5, 0.7, 0.9]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        models.choose_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        models.choose_threshold([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="unknown method"):
        models.choose_threshold([0, 1], [0.1, 0.2], method="accuracy")


def test_manifest_fingerprint():
    import pandas as pd

    m = pd.DataFrame({"path": ["/d/a.png", "/d/b.png"], "label": ["normal", "fracture"], "split": ["train", "val"]})
    fp = modelbundle.manifest_fingerprint(m)
    assert len(fp) == 64 and fp == modelbundle.manifest_fingerprint(m.iloc[::-1])
    changed = m.assign(label=["fracture", "fracture"])
    assert modelbundle.manifest_fingerprint(changed) != fp
    moved = m.assign(path=["/e/a.png", "/e/b.png"])
    fp_moved = modelbundle.manifest_fingerprint(moved, root="/e")
    assert fp_moved == modelbundle.manifest_fingerprint(m, root="/d")
    with pytest.raises(ValueError, match="'label'"):
        modelbundle.manifest_fingerprint(m.drop(columns="label"))


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------
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
    x, _ = toy_images(6)
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
    ):
        assert key in record, key
    assert set(record["versions"]) >= {"tensorflow", "keras", "numpy", "cspine_utils"}
    assert record["val_metrics"] == {"auc": pytest.approx(0.9), "n": 8}
    digest = hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest()
    assert record["model_sha256"] == digest

    bundle = modelbundle.load_bundle(folder)
    assert bundle.image_size == 32 and bundle.threshold == 0.42
    assert bundle.class_names == ("normal", "fracture")
    expected = np.asarray(small_cnn.predict(x, verbose=0)).ravel()
    np.testing.assert_allclose(bundle.predict_proba(x), expected, atol=1e-6)
    assert bundle.predict_proba(x[0]).shape == (1,)
    assert bundle.classify([0.41, 0.42]) == ["normal", "fracture"]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        bundle.predict_proba(x * 255)
    with pytest.raises(ValueError, match="shape"):
        bundle.predict_proba(np.zeros((1, 64, 64, 1), np.float32))

    # files go through pipeline.load_and_preprocess with the bundle's settings
    paths = []
    for i in range(2):
        p = tmp_path / f"slice{i}.png"
        Image.fromarray((x[i, ..., 0] * 255).astype(np.uint8), mode="L").save(p)
        paths.append(p)
    pre = np.stack([pipeline.load_and_preprocess(p, 32) for p in paths])
    np.testing.assert_allclose(bundle.predict_files(paths), bundle.predict_proba(pre), atol=1e-6)


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


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def test_describe_device_and_mixed_precision(monkeypatch):
    text = hardware.describe_device()
    assert text.startswith(("CPU only", "GPU:")) and "TensorFlow" in text
    original = keras.mixed_precision.global_policy().name
    try:
        monkeypatch.delenv(hardware.MIXED_PRECISION_ENV, raising=False)
        monkeypatch.setattr(hardware, "_gpu_devices", lambda: [])
        monkeypatch.setattr(hardware, "cpu_has_native_bfloat16", lambda: False)
        assert hardware.enable_mixed_precision() == "float32"
        assert keras.mixed_precision.global_policy().name == "float32"
        monkeypatch.setattr(hardware, "cpu_has_native_bfloat16", lambda: True)
        assert hardware.mixed_precision_policy() == "mixed_bfloat16"
        monkeypatch.setenv(hardware.MIXED_PRECISION_ENV, "off")
        assert hardware.mixed_precision_policy() == "float32"
        monkeypatch.delenv(hardware.MIXED_PRECISION_ENV)
        monkeypatch.setattr(hardware, "_gpu_devices", lambda: ["fake GPU"])
        assert hardware.enable_mixed_precision() == "mixed_float16"
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        cnn = models.build_cnn(32, filters=(4, 4))
        assert cnn.get_layer("last_conv").dtype_policy.compute_dtype == "float16"
        assert cnn.get_layer(modelbundle.OUTPUT_LAYER).dtype_policy.compute_dtype == "float32"
        vgg, _ = course.build_vgg16_classifier(32, weights=None, head_units=4)
        assert vgg.get_layer("block5_conv3").dtype_policy.compute_dtype == "float16"
        assert vgg.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(original)


def test_cpu_bfloat16_flag_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512vl\n")
    assert hardware.cpu_has_native_bfloat16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512vl\n")
    assert hardware.cpu_has_native_bfloat16(info) is False
    assert hardware.cpu_has_native_bfloat16(tmp_path / "missing") is False


def test_a_model_trained_in_bfloat16_is_bundled_in_float32(tmp_path):
    original = keras.mixed_precision.global_policy().name
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        config.set_seed(0)
        model, info = course.build_vgg16_classifier(32, weights=None, head_units=4)
        assert hardware.compute_dtypes(model) == {"bfloat16", "float32"}
    finally:
        keras.mixed_precision.set_global_policy(original)
    x, y = toy_images(8, size=32)
    models.compile_binary_classifier(model, 1e-3)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    plain = hardware.as_float32(model)
    assert hardware.compute_dtypes(plain) == {"float32"}
    assert hardware.as_float32(plain) is plain
    assert plain.count_params() == model.count_params()
    p16 = np.asarray(model.predict(x, verbose=0)).ravel()
    p32 = np.asarray(plain.predict(x, verbose=0)).ravel()
    assert np.abs(p16 - p32).max() < 0.05  # bfloat16 keeps ~3 significant digits
    folder = modelbundle.save_bundle(model, tmp_path / "b", image_size=32, weights_info=info, profile="smoke")
    record = json.loads((folder / "bundle.json").read_text())
    assert record["compute_dtype"] == "float32"
    assert record["trained_compute_dtypes"] == ["bfloat16", "float32"]
    bundle = modelbundle.load_bundle(folder)
    assert hardware.compute_dtypes(bundle.model) == {"float32"}
    np.testing.assert_allclose(bundle.predict_proba(x), p32, atol=1e-6)
