"""Tests of cspine_utils.explain: Grad-CAM on the course models, that it finds a planted feature
in a trained network, the localisation scores, and masks aligned with the model input."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from PIL import Image

from cspine_utils import course, data, explain, phantom, pipeline

SIZE = 32
SQUARE = 6


# --------------------------------------------------------------------------------------------
# Grad-CAM on the course models
# --------------------------------------------------------------------------------------------
def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, SIZE, SIZE, 1)).astype("float32")


def test_gradcam_shape_and_range_cnn():
    keras.utils.set_random_seed(0)
    model = course.build_cnn(SIZE, filters=(4, 8))
    assert explain.gradcam_layer_name(model) == "last_conv_relu"
    heat = explain.gradcam(model, _images(5), batch_size=2)  # several batches
    assert heat.shape == (5, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    peaks = heat.reshape(5, -1).max(axis=1)
    assert np.all(np.isclose(peaks, 1.0) | (peaks == 0.0))  # scaled by the maximum, or no evidence
    single = explain.gradcam(model, _images(5)[0])  # (S, S, 1) is one image
    assert single.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(single[0], heat[0], atol=1e-5)


def test_gradcam_of_the_course_vgg_uses_block4_conv3():
    """Its head reads pooled block 4 and block 5: block4_conv3 is the deepest layer that carries
    all of the evidence, and both agree on which layer that is."""
    keras.utils.set_random_seed(0)
    model, _ = course.build_vgg16_classifier(SIZE, weights=None)
    assert explain.gradcam_layer_name(model) == "block4_conv3"
    heat = explain.gradcam(model, _images(2))
    assert heat.shape == (2, SIZE, SIZE)
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    np.testing.assert_allclose(heat, explain.gradcam(model, _images(2), layer_name="block4_conv3"))
    assert explain.gradcam(model, _images(2), layer_name="block5_conv3").shape == (2, SIZE, SIZE)


def test_cam_methods_shapes_ranges_and_bad_method():
    keras.utils.set_random_seed(0)
    model, _ = course.build_vgg16_classifier(SIZE, weights=None)
    maps = {m: explain.gradcam(model, _images(3), "block3_conv3", method=m) for m in explain.CAM_METHODS}
    for heat in maps.values():
        assert heat.shape == (3, SIZE, SIZE) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert not np.allclose(maps["gradcam"], maps["hirescam"])  # block 3's gradient varies over positions
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+\\+'"):
        explain.gradcam(model, _images(1), method="gradcam++")


def test_hirescam_equals_gradcam_when_the_gradient_is_spatially_constant():
    """The CNN's last feature maps feed global average pooling and one Dense unit, so ds/dA_k(i, j) =
    w_k / (h w) at every position: weighting by the gradient's mean or by the gradient is the same."""
    keras.utils.set_random_seed(1)
    model = course.build_cnn(SIZE, filters=(4, 8))
    np.testing.assert_allclose(
        explain.gradcam(model, _images(3), method="hirescam"), explain.gradcam(model, _images(3)), atol=1e-5
    )


def test_cam_methods_hand_computed():
    """feature maps A = x * (1, 2) (a 1x1 convolution), score = sum W * A + b (Flatten, Dense): the
    gradient is W, so each method's map can be written down (4x4 maps, resized to 4x4: unchanged)."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((4, 4, 1))
    features = keras.layers.Conv2D(2, 1, use_bias=False, name="feat")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(features))
    model = keras.Model(inputs, outputs)
    w = rng.normal(0.5, 1.0, size=(4, 4, 2)).astype("float32")  # mixed signs, positive on average
    model.get_layer("feat").set_weights([np.array([[[[1.0, 2.0]]]], np.float32)])
    model.layers[-1].set_weights([w.reshape(32, 1), np.zeros(1, np.float32)])
    x = rng.uniform(0.1, 1.0, (1, 4, 4, 1)).astype("float32")
    a = x[0] * np.array([1.0, 2.0])  # (4, 4, 2)
    expected = {
        "gradcam": (a * w.mean(axis=(0, 1))).sum(-1),
        "hirescam": (a * w).sum(-1),
        "layercam": (a * np.maximum(w, 0)).sum(-1),
    }
    for method, cam in expected.items():
        cam = np.maximum(cam, 0)
        assert 0 < cam.max() and cam.min() == 0 or method == "gradcam"  # the ReLU matters
        got = explain.gradcam(model, x, "feat", method=method)[0]
        np.testing.assert_allclose(got, cam / cam.max(), atol=1e-5, err_msg=method)
    assert not np.allclose(expected["gradcam"], expected["hirescam"])


def _vgg_like(nested: bool) -> keras.Model:
    layers = [
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="block5_conv1"),
        keras.layers.MaxPooling2D(2, name="block5_pool"),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="block5_conv3"),
    ]
    inputs = keras.Input((SIZE, SIZE, 1))
    if nested:
        x = keras.Sequential([keras.Input((SIZE, SIZE, 1)), *layers], name="vgg16")(inputs)
    else:
        x = inputs
        for layer in layers:
            x = layer(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="out")(x))


def test_gradcam_nested_model_equals_flat():
    keras.utils.set_random_seed(0)
    nested = _vgg_like(nested=True)
    flat = _vgg_like(nested=False)
    for name in ("block5_conv1", "block5_conv3"):
        flat.get_layer(name).set_weights(nested.get_layer("vgg16").get_layer(name).get_weights())
    flat.get_layer("out").set_weights(nested.get_layer("out").get_weights())
    assert explain.gradcam_layer_name(nested) == "block5_conv3"
    images = _images(3)
    np.testing.assert_allclose(flat.predict(images, verbose=0), nested.predict(images, verbose=0), atol=1e-6)
    np.testing.assert_allclose(explain.gradcam(nested, images), explain.gradcam(flat, images), atol=1e-5)


def test_gradcam_bad_input():
    model = course.build_cnn(SIZE, filters=(4, 8))
    with pytest.raises(ValueError, match="expects"):
        explain.gradcam(model, np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        explain.gradcam(model, _images(1), layer_name="nope")


# --------------------------------------------------------------------------------------------
# Grad-CAM finds a planted feature
# --------------------------------------------------------------------------------------------
def planted_dataset(n: int, seed: int):
    """Noise images with a bright 2x12 bar in every image (a distractor that carries no label)
    and, in every second image, a bright 6x6 square (the label)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.3, size=(n, SIZE, SIZE, 1)).astype("float32")
    y = (np.arange(n) % 2).astype("float32")
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        if rng.random() < 0.5:
            r, c = rng.integers(0, SIZE - 1), rng.integers(0, SIZE - 11)
            x[i, r : r + 2, c : c + 12, 0] = 1.0
        else:
            r, c = rng.integers(0, SIZE - 11), rng.integers(0, SIZE - 1)
            x[i, r : r + 12, c : c + 2, 0] = 1.0
        if y[i] == 1:
            r, c = rng.integers(0, SIZE - SQUARE + 1, 2)
            x[i, r : r + SQUARE, c : c + SQUARE, 0] = 1.0
            masks[i, r : r + SQUARE, c : c + SQUARE] = True
    return x, y, masks


def tiny_cnn() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="last_conv")(x)
    x = keras.layers.Activation("relu", name="last_conv_relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


@pytest.fixture(scope="module")
def planted():
    keras.utils.set_random_seed(0)
    x, y, _ = planted_dataset(200, seed=0)
    x_test, y_test, masks = planted_dataset(60, seed=1)
    untrained = tiny_cnn()
    keras.utils.set_random_seed(0)
    model = tiny_cnn()
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=10, batch_size=20, verbose=0)
    return model, untrained, x_test, y_test, masks


def _hit_rate(model, x, y, masks) -> float:
    pos = np.flatnonzero(y == 1)
    heat = explain.gradcam(model, x[pos])
    return float(np.mean([explain.pointing_game(h, masks[i], dilate_px=0) for h, i in zip(heat, pos)]))


def test_gradcam_points_at_planted_square(planted):
    model, untrained, x, y, masks = planted
    accuracy = float(np.mean((model.predict(x, verbose=0).ravel() >= 0.5) == (y == 1)))
    assert accuracy >= 0.9
    assert _hit_rate(model, x, y, masks) >= 0.8
    # sanity check (Adebayo et al., 2018): an untrained network does not find the square as well
    assert _hit_rate(untrained, x, y, masks) < 0.6

    pos = np.flatnonzero(y == 1)
    scores = explain.localisation_scores(
        explain.gradcam(model, x[pos]), masks[pos], groups=np.arange(pos.size) // 2, n_resamples=100, seed=0
    )
    assert scores["n"] == pos.size
    assert scores["pointing_game"]["value"] >= 0.8
    assert scores["pointing_game"]["value"] > scores["chance"]["pointing_game"]
    assert scores["heat_in_mask"]["value"] > 2 * scores["chance"]["heat_in_mask"]
    assert scores["heat_in_mask"]["ci_low"] <= scores["heat_in_mask"]["value"] <= scores["heat_in_mask"]["ci_high"]


# --------------------------------------------------------------------------------------------
# Localisation scores on hand-made masks
# --------------------------------------------------------------------------------------------
def _peak(r: int, c: int, size: int = 20) -> np.ndarray:
    heat = np.zeros((size, size), np.float32)
    heat[r, c] = 1.0
    return heat


def test_pointing_game_hand_cases():
    mask = np.zeros((20, 20), bool)
    mask[4:7, 4:7] = True
    assert explain.pointing_game(_peak(5, 5), mask, dilate_px=0)
    assert not explain.pointing_game(_peak(12, 12), mask, dilate_px=0)
    # (10, 6) is 4 rows below the mask: a tolerance of 4 px counts it, 3 px does not
    assert explain.pointing_game(_peak(10, 6), mask, dilate_px=4)
    assert not explain.pointing_game(_peak(10, 6), mask, dilate_px=3)
    assert not explain.pointing_game(np.zeros((20, 20)), mask)  # a flat heatmap points nowhere
    assert explain.default_pointing_tolerance(224) == 15 and explain.default_pointing_tolerance(64) == 4


def test_heat_in_mask_hand_cases():
    mask = np.zeros((10, 10), bool)
    mask[:2, :5] = True  # 10 % of the image
    assert explain.heat_in_mask(np.ones((10, 10)), mask) == pytest.approx(0.1)  # chance
    heat = np.zeros((10, 10))
    heat[0, 0], heat[9, 9] = 3.0, 1.0
    assert explain.heat_in_mask(heat, mask) == pytest.approx(0.75)
    assert math.isnan(explain.heat_in_mask(np.zeros((10, 10)), mask))


def test_localisation_bad_input():
    mask = np.zeros((10, 10), bool)
    with pytest.raises(ValueError, match="empty"):
        explain.pointing_game(_peak(1, 1, 10), mask)
    mask[2, 2] = True
    with pytest.raises(ValueError, match="same shape"):
        explain.heat_in_mask(np.ones((8, 8)), mask)
    with pytest.raises(ValueError, match="non-negative"):
        explain.heat_in_mask(-np.ones((10, 10)), mask)
    with pytest.raises(ValueError, match="dilate_px"):
        explain.pointing_game(_peak(2, 2, 10), mask, dilate_px=-1)


def test_localisation_scores_hand_case():
    masks = [np.pad(np.ones((2, 2), bool), 4) for _ in range(4)]  # 10x10, mask at rows/cols 4-5
    heats = [_peak(4, 4, 10), _peak(5, 5, 10), _peak(0, 0, 10), np.zeros((10, 10))]
    s = explain.localisation_scores(heats, masks, groups=["a", "a", "b", "c"], n_resamples=50, seed=0, dilate_px=0)
    assert s["per_image"]["pointing_game"] == [True, True, False, False]
    assert s["pointing_game"]["value"] == pytest.approx(0.5)
    assert s["n_no_heat"] == 1 and s["per_image"]["heat_in_mask"][3] is None
    assert s["heat_in_mask"]["value"] == pytest.approx(2 / 3)
    assert s["chance"]["heat_in_mask"] == pytest.approx(0.04)


def test_pointing_game_table_hand_case():
    hits = {"a": [True, True, False, True], "b": [False, False, False, True]}
    table = explain.pointing_game_table(hits, ["x", "x", "y", "y"]).set_index(["method", "fracture_type"])
    assert list(table.index) == [("a", "all"), ("a", "x"), ("a", "y"), ("b", "all"), ("b", "x"), ("b", "y")]
    assert table.loc[("a", "all"), "pointing_game"] == pytest.approx(0.75)
    assert (table.loc[("a", "x"), "hits"], table.loc[("b", "y"), "n"]) == (2, 2)
    low, high = table.loc[("b", "x"), ["ci_low", "ci_high"]]
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 2))  # 0 of 2: upper end solves (1-p)^2 = 0.025
    with pytest.raises(ValueError, match="3 fracture types"):
        explain.pointing_game_table(hits, ["x", "y", "y"])


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def test_overlay_and_gallery():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    cold = explain.overlay(image, np.zeros((8, 8)))
    assert cold.shape == (8, 8, 3) and cold.dtype == np.float32
    np.testing.assert_allclose(cold[..., 0], image, atol=1e-6)  # no heat: the plain slice
    hot = explain.overlay(image[..., None], np.ones((8, 8)), alpha=1.0)
    assert 0.0 <= hot.min() and hot.max() <= 1.0 and not np.allclose(hot[..., 0], hot[..., 2])
    with pytest.raises(ValueError, match="same shape"):
        explain.overlay(image, np.zeros((4, 4)))
    masks = [np.pad(np.ones((2, 2), bool), 3), None, np.zeros((8, 8), bool)]
    fig = explain.plot_gradcam_gallery(
        np.stack([image] * 3), np.stack([_peak(3, 3, 8)] * 3), masks=masks, titles=["a", "b", "c"], ncols=2
    )
    assert len(fig.axes) == 4
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Masks aligned with load_and_preprocess
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def obvious_fractures(tmp_path_factory):
    """Fracture rows (with masks) of a small phantom dataset at difficulty 0."""
    out = tmp_path_factory.mktemp("phantom") / "d0"
    phantom.generate_dataset(
        out,
        phantom.SynthConfig(n=6, seed=3, difficulty=0.0, fracture_fraction=0.5, slices_per_subject=2, val_fraction=0.0),
        workers=1,
        progress=False,
    )
    manifest = data.discover(out).manifest
    rows = manifest[(manifest["label"] == "fracture") & (manifest["mask_path"] != "")]
    assert len(rows) >= 2
    return rows


@pytest.mark.parametrize("crop_roi", [False, True])
def test_mask_lands_on_fracture_pixels(obvious_fractures, crop_roi, tmp_path):
    size = 96
    for row in obvious_fractures.itertuples():
        mask = explain.load_mask_like_input(row.mask_path, row.path, size, crop_roi=crop_roi)
        assert mask.shape == (size, size) and mask.dtype == bool and mask.any()
        # Paint the fracture pixels white in a copy of the slice and preprocess both: the pixels
        # that change are where the fracture lands in the model input.
        original = np.asarray(Image.open(row.path).convert("L"))
        full_mask = np.asarray(Image.open(row.mask_path).convert("L")) >= 128
        painted = original.copy()
        painted[full_mask] = 255
        painted_path = tmp_path / "painted.png"
        Image.fromarray(painted).save(painted_path)
        image = data.read_image(row.path)
        assert pipeline.roi_bbox(image) == pipeline.roi_bbox(data.read_image(painted_path))  # same crop
        before = pipeline.load_and_preprocess(row.path, size, crop_roi=crop_roi)[..., 0]
        after = pipeline.load_and_preprocess(painted_path, size, crop_roi=crop_roi)[..., 0]
        change = after - before
        changed = change > 0.02
        assert changed[mask].all()  # every mask pixel lies on changed (fracture) pixels
        # and the mask sits where the change is: centroids agree within a pixel
        rows_, cols_ = np.indices(change.shape)
        weight = np.clip(change, 0, None)
        centre_change = np.array([(rows_ * weight).sum(), (cols_ * weight).sum()]) / weight.sum()
        centre_mask = np.array([rows_[mask].mean(), cols_[mask].mean()])
        assert np.abs(centre_change - centre_mask).max() <= 1.0
        # a one-pixel shift of the mask would be detected
        assert not changed[np.roll(mask, 3, axis=1)].all()


def test_load_mask_like_input_bad_input(obvious_fractures, tmp_path):
    row = obvious_fractures.iloc[0]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="10 px"):
        explain.load_mask_like_input(tmp_path / "small.png", row["path"], 64)
    with pytest.raises(ValueError, match="normal slices"):
        explain.load_mask_like_input("", row["path"], 64)
    with pytest.raises(FileNotFoundError):
        explain.load_mask_like_input(tmp_path / "missing.png", row["path"], 64)
