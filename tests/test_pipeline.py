"""Tests of cspine_utils.pipeline: preprocessing, augmentation and the tf.data datasets.

Real TensorFlow on tiny images (a few dozen files of 24-64 px), so the module runs in well under
a minute on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cspine_utils import data, pipeline

S = 24  # model input side used by most tests, pixels


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _write_png(path, array01: np.ndarray) -> str:
    Image.fromarray(np.round(np.clip(array01, 0, 1) * 255).astype(np.uint8), mode="L").save(path)
    return str(path)


def _label_coded_image(label: str, i: int, shape=(40, 56)) -> np.ndarray:
    """A slice whose mean grey level tells its label: fracture ~0.7, normal ~0.15."""
    rng = np.random.default_rng(i)
    base = 0.7 if label == "fracture" else 0.15
    return np.clip(base + rng.normal(0, 0.03, size=shape), 0, 1)


@pytest.fixture()
def tiny_manifest(tmp_path) -> pd.DataFrame:
    """12 PNGs (5 fracture, 7 normal, some non-square) and their manifest."""
    rows = []
    for i in range(12):
        label = "fracture" if i % 5 in (0, 2) else "normal"
        shape = (40, 56) if i % 2 else (48, 48)
        path = _write_png(tmp_path / f"img_{i:02d}.png", _label_coded_image(label, i, shape))
        rows.append({"path": path, "label": label, "group": f"g{i // 2}", "split": "train"})
    return pd.DataFrame(rows)


def _batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------------------------
# Importing is free of TensorFlow
# --------------------------------------------------------------------------------------------
def test_import_does_not_load_tensorflow():
    code = (
        "import sys, cspine_utils.pipeline as p; print(int('tensorflow' in sys.modules), int('keras' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0"]


# --------------------------------------------------------------------------------------------
# Single images
# --------------------------------------------------------------------------------------------
def test_class_names_and_labels():
    assert pipeline.CLASS_NAMES == ("normal", "fracture")
    assert pipeline.label_to_int(["normal", "fracture", " Fracture "]).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="'broken'"):
        pipeline.label_to_int(["normal", "broken"])


def test_load_and_preprocess_shape_dtype_range(tiny_manifest):
    for path in tiny_manifest["path"][:3]:
        x = pipeline.load_and_preprocess(path, S)
        assert x.shape == (S, S, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_load_and_preprocess_rejects_bad_size_and_file(tiny_manifest, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        pipeline.load_and_preprocess(tiny_manifest["path"][0], 0)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(data.ImageReadError, match="notes.png"):
        pipeline.load_and_preprocess(bad, S)


def test_resize_with_pad_keeps_aspect_ratio():
    wide = np.ones((20, 40), dtype=np.float32)  # 2:1, width twice the height
    out = pipeline.resize_with_pad(wide, 16)
    assert out.shape == (16, 16) and out.dtype == np.float32
    # scaled to 16 x 8 and centred: rows 4..11 are image, the rest is black padding
    assert np.allclose(out[4:12, :], 1.0)
    assert np.all(out[:4, :] == 0) and np.all(out[12:, :] == 0)
    tall = pipeline.resize_with_pad(np.ones((40, 20, 1), dtype=np.float32), 16)
    assert np.allclose(tall[:, 4:12], 1.0) and np.all(tall[:, :4] == 0) and np.all(tall[:, 12:] == 0)
    # a square image fills the square (no padding), an upscaled one too
    assert np.allclose(pipeline.resize_with_pad(np.full((5, 5), 0.5, np.float32), 16), 0.5)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_resize_with_pad_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        pipeline.resize_with_pad(np.zeros((4, 4), np.float32), size)


def test_roi_bbox_finds_planted_bright_blob():
    rng = np.random.default_rng(0)
    img = np.clip(0.25 + rng.normal(0, 0.05, size=(200, 300)), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[:200, :300]
    img[(yy - 130) ** 2 + (xx - 210) ** 2 <= 15**2] = 0.9  # the "vertebra": rows 115-145, cols 195-225
    img[20:23, 20:23] = 0.9  # a small bright speck elsewhere: not the largest region
    top, left, bottom, right = pipeline.roi_bbox(img, margin=0.0)
    assert 112 <= top <= 117 and 143 <= bottom <= 148
    assert 192 <= left <= 197 and 223 <= right <= 228
    # the margin is a fraction of the image height/width on each side
    t2, l2, b2, r2 = pipeline.roi_bbox(img, margin=0.1)
    assert (t2, l2, b2, r2) == (top - 20, left - 30, min(200, bottom + 20), min(300, right + 30))


def test_roi_bbox_falls_back_to_full_image():
    assert pipeline.roi_bbox(np.full((30, 50), 0.2, np.float32)) == (0, 0, 30, 50)
    with pytest.raises(ValueError, match="margin"):
        pipeline.roi_bbox(np.zeros((30, 50), np.float32), margin=-0.1)


def test_roi_crop_centres_the_spine(tmp_path):
    img = np.zeros((120, 160), dtype=np.float32)
    img[10:30, 110:150] = 0.9  # bright blob in the top-right corner
    path = _write_png(tmp_path / "corner.png", img)
    full = pipeline.load_and_preprocess(path, 32)[..., 0]
    cropped = pipeline.load_and_preprocess(path, 32, crop_roi=True)[..., 0]
    assert cropped.mean() > 2 * full.mean()  # the blob fills much more of the input
    rows, cols = np.nonzero(cropped > 0.5)
    assert abs(rows.mean() - 15.5) < 3 and abs(cols.mean() - 15.5) < 3


def test_roi_bbox_contains_fracture_on_phantom_slices(synthetic_dataset):
    manifest = pd.read_csv(synthetic_dataset / "manifest.csv")
    fractures = manifest[manifest["mask_file"].notna()]
    assert len(fractures) > 0
    for row in fractures.itertuples():
        img = data.read_image(synthetic_dataset / row.file)
        top, left, bottom, right = pipeline.roi_bbox(img)
        assert (bottom - top) * (right - left) < 0.5 * img.size, row.file  # a crop, not everything
        ys, xs = np.nonzero(np.asarray(Image.open(synthetic_dataset / row.mask_file)) > 0)
        assert top <= ys.min() and ys.max() < bottom and left <= xs.min() and xs.max() < right, row.file


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def _top_bright_batch(n: int = 64, size: int = 32) -> np.ndarray:
    """Top half bright (0.8), bottom half dark (0.2), a white mark in the top-left quarter."""
    img = np.full((size, size, 1), 0.2, dtype=np.float32)
    img[: size // 2] = 0.8
    img[2 : size // 4, 2 : size // 4] = 1.0
    return np.repeat(img[np.newaxis], n, axis=0)


def test_flip_is_left_right_only():
    x = _top_bright_batch()
    layer = pipeline.RandomAffine(rotation=0, translation=0, zoom=0, horizontal_flip=True, seed=1)
    out = np.asarray(layer(x, training=True))
    flipped = [np.allclose(o, x[0, :, ::-1]) for o in out]
    unchanged = [np.allclose(o, x[0]) for o in out]
    assert all(f or u for f, u in zip(flipped, unchanged))  # never anything else (no up-down)
    assert 10 < sum(flipped) < 54  # about half are mirrored


def test_augmentation_never_swaps_top_and_bottom():
    x = _top_bright_batch()
    for strength in (1.0, 2.0):
        out = np.asarray(pipeline.augmentation_layers(strength, seed=3)(x, training=True))
        assert out.shape == x.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        top, bottom = out[:, :12].mean(axis=(1, 2, 3)), out[:, 20:].mean(axis=(1, 2, 3))
        assert np.all(top > bottom + 0.2)  # an up-down flip would give about -0.6
        assert not np.allclose(out, x)  # it did augment


def test_augmentation_strength_zero_is_identity_and_eval_mode_too():
    x = _top_bright_batch(n=4)
    assert np.array_equal(np.asarray(pipeline.augmentation_layers(0.0)(x, training=True)), x)
    assert np.array_equal(np.asarray(pipeline.augmentation_layers(1.0)(x, training=False)), x)


@pytest.mark.parametrize("strength", [-0.1, 2.5, float("nan")])
def test_augmentation_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        pipeline.augmentation_layers(strength)


def test_random_affine_config_round_trip():
    layer = pipeline.RandomAffine(rotation=5, translation=0.1, zoom=0.05, horizontal_flip=False, seed=7)
    clone = pipeline.RandomAffine.from_config(layer.get_config())
    assert (clone.rotation, clone.translation, clone.zoom, clone.horizontal_flip, clone.seed) == (
        5,
        0.1,
        0.05,
        False,
        7,
    )
    with pytest.raises(ValueError, match="rotation"):
        pipeline.RandomAffine(rotation=-1)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def test_eval_dataset_is_deterministic_in_manifest_order_and_matches_load_arrays(tiny_manifest):
    ds = pipeline.make_dataset(tiny_manifest, S, batch_size=5, training=False)
    x1, y1 = _batches(ds)
    x2, y2 = _batches(ds)
    assert x1.shape == (12, S, S, 1) and x1.dtype == np.float32 and y1.dtype == np.float32
    assert 0.0 <= x1.min() and x1.max() <= 1.0
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    expected = (tiny_manifest["label"] == "fracture").to_numpy(np.float32)
    assert np.array_equal(y1, expected)  # manifest order, labels as in the manifest
    X, y = pipeline.load_arrays(tiny_manifest, S)  # same preprocessing as inference
    assert np.allclose(x1, X) and np.array_equal(y, expected.astype(int))


def test_training_dataset_shuffles_augments_and_keeps_labels(tiny_manifest):
    ds = pipeline.make_dataset(tiny_manifest, S, batch_size=4, training=True, seed=0)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in ds]
    assert shapes == [((4, S, S, 1), (4,))] * 3
    x, y = _batches(ds)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(y.tolist()) == sorted((tiny_manifest["label"] == "fracture").astype(float).tolist())
    # each image still carries its own label: the grey level codes it (fracture bright)
    centre_means = x[:, S // 4 : 3 * S // 4, S // 4 : 3 * S // 4].mean(axis=(1, 2, 3))
    assert np.array_equal(centre_means > 0.42, y == 1.0)
    x_eval, _ = _batches(pipeline.make_dataset(tiny_manifest, S, 12, training=False))
    assert not any(np.allclose(e, xi) for e in x_eval for xi in x)  # augmented, not eval images


def test_training_order_is_reproducible_with_seed(tiny_manifest):
    def order(seed):
        ds = pipeline.make_dataset(tiny_manifest, S, batch_size=12, training=True, seed=seed, augment_strength=0.0)
        x, _ = _batches(ds)
        return [int(np.argmin([np.abs(xi - e).sum() for e in eval_x])) for xi in x]

    eval_x, _ = _batches(pipeline.make_dataset(tiny_manifest, S, 12, training=False))
    first = order(0)
    assert sorted(first) == list(range(12)) and first != list(range(12))
    assert order(0) == first
    assert order(1) != first


def test_augmented_batches_are_reproducible_with_seed(tiny_manifest):
    """Same seed, same augmented images in the same order, epoch after epoch: training runs
    (the CNN of notebook 03) can be repeated exactly."""

    def stream(seed):
        ds = pipeline.make_dataset(tiny_manifest, S, batch_size=2, training=True, seed=seed, augment_strength=1.0)
        return np.concatenate([_batches(ds)[0] for _ in range(3)])

    first = stream(0)
    np.testing.assert_array_equal(stream(0), first)
    assert not np.allclose(stream(1), first)


def test_shuffle_without_augmentation_and_no_cache(tiny_manifest):
    ds = pipeline.make_dataset(tiny_manifest, S, 12, training=False, shuffle=True, cache=False, seed=0)
    x, y = _batches(ds)
    x_eval, y_eval = _batches(pipeline.make_dataset(tiny_manifest, S, 12, training=False))
    order = [int(np.argmin(np.abs(x_eval - xi).sum(axis=(1, 2, 3)))) for xi in x]
    assert sorted(order) == list(range(12)) and np.array_equal(y, y_eval[order])
    assert np.array_equal(x, x_eval[order])  # unaugmented: identical images, new order


def test_file_cache(tiny_manifest, tmp_path):
    cache_dir = tmp_path / "cache"
    ds = pipeline.make_dataset(tiny_manifest, S, 6, training=False, cache=cache_dir)
    x1, _ = _batches(ds)
    assert any(p.name.startswith("cspine_S24_full_") for p in cache_dir.iterdir())
    x2, _ = _batches(pipeline.make_dataset(tiny_manifest, S, 6, training=False, cache=cache_dir))
    assert np.array_equal(x1, x2)
    # another image size gets its own cache file, never the stale one
    x3, _ = _batches(pipeline.make_dataset(tiny_manifest, 16, 6, training=False, cache=cache_dir))
    assert x3.shape == (12, 16, 16, 1)


def test_make_dataset_rejects_bad_manifests(tiny_manifest):
    with pytest.raises(ValueError, match="label"):
        pipeline.make_dataset(tiny_manifest.drop(columns="label"), S, 4, training=False)
    bad = tiny_manifest.copy()
    bad.loc[3, "label"] = "maybe"
    with pytest.raises(ValueError, match="'maybe'"):
        pipeline.make_dataset(bad, S, 4, training=False)
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_dataset(tiny_manifest.iloc[:0], S, 4, training=False)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_dataset(tiny_manifest, S, 0, training=False)


def test_make_dataset_names_an_unreadable_file(tiny_manifest, tmp_path):
    import tensorflow as tf

    bad = tiny_manifest.copy()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    bad.loc[2, "path"] = str(tmp_path / "broken.png")
    with pytest.raises(tf.errors.OpError, match="broken.png"):
        _batches(pipeline.make_dataset(bad, S, 4, training=False))


# --------------------------------------------------------------------------------------------
# TensorFlow decoding: the same pixels as data.read_image
# --------------------------------------------------------------------------------------------
def _png_variants(folder, side: int = 40) -> dict[str, str]:
    """Real PNG files of one random slice, written by Pillow in the modes TensorFlow decodes."""
    rng = np.random.default_rng(5)
    grey16 = rng.integers(0, 65536, (side, side), dtype=np.uint16)
    grey8 = (grey16 >> 8).astype(np.uint8)
    colour = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
    images = {
        "grey8": Image.fromarray(grey8, mode="L"),
        "grey16": Image.fromarray(grey16),  # mode I;16: the full 16-bit depth
        "rgb_as_grey": Image.fromarray(np.repeat(grey8[..., None], 3, axis=2), mode="RGB"),
        "rgb": Image.fromarray(colour[..., :3], mode="RGB"),
        "rgba": Image.fromarray(colour, mode="RGBA"),
    }
    paths = {}
    for name, image in images.items():
        image.save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    return paths


def test_png_decoded_by_tensorflow_equals_read_image(tmp_path):
    paths = _png_variants(tmp_path)
    readers = {name: pipeline._png_reader(path) for name, path in paths.items()}
    assert readers == {"grey8": 1, "grey16": 2, "rgb_as_grey": 3, "rgb": 3, "rgba": 3}  # all TensorFlow
    manifest = pd.DataFrame({"path": list(paths.values()), "label": "normal"})
    # image_size = the images' side: resize_with_pad leaves them alone, so this compares the decoding
    x, _ = _batches(pipeline.make_dataset(manifest, 40, 8, training=False, cache=False))
    for i, (name, path) in enumerate(paths.items()):
        np.testing.assert_array_equal(x[i, ..., 0], data.read_image(path), err_msg=name)
    assert np.array_equal(x[1, ..., 0] * 65535, np.asarray(Image.open(paths["grey16"])))  # not cut to 8 bits


@pytest.mark.parametrize("crop_roi", [False, True])
def test_dataset_pixels_equal_load_and_preprocess(tmp_path, crop_roi):
    paths = list(_png_variants(tmp_path, side=56).values())
    img = np.zeros((60, 90), dtype=np.float32)
    img[10:40, 50:80] = 0.9  # a bright block to crop to, in a JPEG (PIL's reader) among the PNGs
    Image.fromarray((img * 255).astype(np.uint8), mode="L").save(tmp_path / "block.jpg")
    paths.insert(2, str(tmp_path / "block.jpg"))
    manifest = pd.DataFrame({"path": paths, "label": "fracture"})
    x, _ = _batches(pipeline.make_dataset(manifest, S, 3, training=False, crop_roi=crop_roi))
    expected = np.stack([pipeline.load_and_preprocess(p, S, crop_roi=crop_roi) for p in paths])
    np.testing.assert_array_equal(x, expected)


def test_damaged_or_unusual_pngs_go_to_the_pil_reader(tmp_path):
    import tensorflow as tf

    path = _png_variants(tmp_path)["grey8"]
    blob = open(path, "rb").read()
    (tmp_path / "truncated.png").write_bytes(blob[: len(blob) - 20])
    flipped = bytearray(blob)
    flipped[60] ^= 0xFF  # inside the image data: its chunk checksum no longer matches
    (tmp_path / "bitflip.png").write_bytes(bytes(flipped))
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "transparent.png", transparency=0)
    (tmp_path / "scan.dcm").write_bytes(blob)
    for name in ("truncated.png", "bitflip.png", "palette.png", "transparent.png", "scan.dcm", "gone.png"):
        assert pipeline._png_reader(str(tmp_path / name)) == 0, name
    manifest = pd.DataFrame({"path": [path, str(tmp_path / "bitflip.png")], "label": "normal"})
    with pytest.raises(tf.errors.OpError, match="bitflip.png"):  # the error names the file
        _batches(pipeline.make_dataset(manifest, S, 2, training=False))


# --------------------------------------------------------------------------------------------
# NumPy loader
# --------------------------------------------------------------------------------------------
def test_load_arrays_skips_and_reports_bad_files(tiny_manifest, tmp_path):
    manifest = tiny_manifest.copy()
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    good = open(manifest.loc[5, "path"], "rb").read()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    manifest.loc[2, "path"] = str(tmp_path / "text.png")
    manifest.loc[5, "path"] = str(tmp_path / "truncated.png")
    manifest.loc[7, "path"] = str(tmp_path / "gone.png")
    with pytest.warns(UserWarning, match="skipped 3 unreadable") as record:
        X, y, skipped = pipeline.load_arrays(manifest, S, return_skipped=True)
    message = str(record[0].message)
    assert all(name in message for name in ("text.png", "truncated.png", "gone.png"))
    kept = [i for i in range(12) if i not in (2, 5, 7)]
    assert X.shape == (9, S, S, 1) and X.dtype == np.float32 and y.shape == (9,)
    assert y.tolist() == (manifest["label"].iloc[kept] == "fracture").astype(int).tolist()
    assert [p for p, _ in skipped] == [manifest.loc[i, "path"] for i in (2, 5, 7)]
    with pytest.raises(data.ImageReadError, match="text.png"):
        pipeline.load_arrays(manifest, S, errors="raise")


def test_load_arrays_clean_set_gives_no_warning(tiny_manifest):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X, y = pipeline.load_arrays(tiny_manifest.iloc[:4], S, crop_roi=True)
    assert X.shape == (4, S, S, 1) and y.dtype.kind == "i"
