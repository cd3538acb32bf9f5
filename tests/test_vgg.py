"""Notebook 04's transfer learning, imported from cspine_utils.course: the VGG16 classifier built from
keras.applications with its head, freezing and unfreezing by layer name, the two phases of training, the
optimizers of the search space, and the bundle (real TensorFlow on tiny data)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import toy_images

from cspine_utils import config, course, explain, modelbundle, pretrained

# TensorFlow tensors meet NumPy 2's copy keyword inside Keras: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

HEAD = {"head_norm", "head_dense", modelbundle.OUTPUT_LAYER}


class TrainableRecorder(keras.callbacks.Callback):
    """Records which layers with weights are trainable when each ``fit`` starts."""

    def __init__(self):
        super().__init__()
        self.phases: list[set[str]] = []

    def on_train_begin(self, logs=None):
        self.phases.append({layer.name for layer in self.model.layers if layer.trainable and layer.weights})


def compile_model(model: keras.Model, optimizer: str, learning_rate: float) -> None:
    model.compile(
        optimizer=course.make_optimizer(optimizer, learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=course.classifier_metrics(),
    )


def test_vgg16_classifier_is_flat_preprocesses_and_serves_gradcam():
    model, info = course.build_vgg16_classifier(32, weights=None, head_units=16)
    assert info == pretrained.WeightsInfo("random", None, info.description, False)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # VGG16's layers, not a nested model
    assert {layer.name for layer in model.layers} >= set(pretrained.VGG16_CONV_LAYERS) | HEAD
    x = np.full((2, 32, 32, 1), 0.5, dtype=np.float32)
    assert model(x).shape == (2, 1)
    pre = keras.Model(model.input, model.get_layer("vgg_preprocess").output)(x)
    np.testing.assert_allclose(np.asarray(pre)[0, 0, 0], 127.5 - np.array(pretrained.VGG16_BGR_MEAN), rtol=1e-5)
    grad_model = keras.Model(model.input, [model.get_layer("block5_conv3").output, model.output])
    maps, probs = grad_model(x)
    assert maps.shape == (2, 2, 2, 512) and probs.shape == (2, 1)
    assert explain.gradcam_layer_name(model) == "block4_conv3"
    heat = explain.gradcam(model, toy_images(3)[0])
    assert heat.shape == (3, 32, 32) and np.isfinite(heat).all() and heat.max() <= 1.0
    # the base starts frozen, the head trainable
    assert not any(model.get_layer(n).trainable for n in pretrained.VGG16_CONV_LAYERS)
    assert model.get_layer("head_dense").trainable and model.get_layer("head_dense").units == 16
    with pytest.raises(ValueError, match="image_size"):
        course.build_vgg16_classifier(31, weights=None)


@pytest.mark.slow
def test_two_phases_train_the_head_then_the_unfrozen_top_block():
    config.set_seed(0)
    model, _ = course.build_vgg16_classifier(32, weights=None, head_units=8)
    x, y = toy_images(16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    block1 = model.get_layer("block1_conv1").get_weights()[0].copy()
    block5 = model.get_layer("block5_conv3").get_weights()[0].copy()
    recorder = TrainableRecorder()
    compile_model(model, "adam", 1e-3)
    model.fit(ds, validation_data=ds, epochs=1, callbacks=[recorder], verbose=0)
    np.testing.assert_array_equal(model.get_layer("block5_conv3").get_weights()[0], block5)  # frozen in phase 1
    assert course.unfreeze_top_blocks(model, 1) == list(pretrained.VGG16_BLOCKS[5])
    compile_model(model, "sgd", 1e-4)  # the new flags take effect at compile
    history = model.fit(ds, validation_data=ds, initial_epoch=1, epochs=2, callbacks=[recorder], verbose=0)
    assert recorder.phases == [HEAD, HEAD | set(pretrained.VGG16_BLOCKS[5])]
    assert history.epoch == [1] and len(history.history["val_auc"]) == 1
    np.testing.assert_array_equal(model.get_layer("block1_conv1").get_weights()[0], block1)
    assert not np.array_equal(model.get_layer("block5_conv3").get_weights()[0], block5)
    # unfreezing three blocks opens blocks 3, 4 and 5; 0 closes them all again
    assert course.unfreeze_top_blocks(model, 3) == [n for b in (3, 4, 5) for n in pretrained.VGG16_BLOCKS[b]]
    assert course.unfreeze_top_blocks(model, 0) == []
    with pytest.raises(ValueError, match="unfreeze_blocks"):
        course.unfreeze_top_blocks(model, 6)
    with pytest.raises(ValueError, match="no VGG16 convolution layers"):
        course.unfreeze_top_blocks(course.build_cnn(32, filters=(4, 4)), 1)


def test_optimizers_of_the_search_space():
    assert isinstance(course.make_optimizer("Adam", 1e-3), keras.optimizers.Adam)
    sgd = course.make_optimizer("sgd", 1e-2)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.9)
    rmsprop = course.make_optimizer("rmsprop", 1e-4)
    assert isinstance(rmsprop, keras.optimizers.RMSprop) and float(rmsprop.learning_rate) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        course.make_optimizer("adagrad", 1e-3)


def test_head_model_transplants_into_the_classifier():
    config.set_seed(0)
    head = course.build_head(16, 0.3)
    assert head.input_shape == (None, 1024) and head.output_shape == (None, 1)
    model, _ = course.build_vgg16_classifier(32, weights=None, head_units=16)
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    x = toy_images(4)[0]
    assert course.transplant_head(head, model) is model
    np.testing.assert_allclose(
        model.predict(x, verbose=0), head.predict(features.predict(x, verbose=0), verbose=0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="head_units"):
        course.transplant_head(course.build_head(8), model)


@pytest.mark.slow
def test_vgg_bundle_loads_in_safe_mode(tmp_path):
    config.set_seed(0)
    model, info = course.build_vgg16_classifier(32, weights=None, head_units=8)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    folder = modelbundle.save_bundle(model, tmp_path / "vgg", image_size=32, weights_info=info, profile="smoke")
    assert json.loads((folder / "bundle.json").read_text())["weights"]["source"] == "random"
    reloaded = keras.saving.load_model(str(folder / "model.keras"), safe_mode=True)
    x, _ = toy_images(3)
    expected = np.asarray(model.predict(x, verbose=0)).ravel()
    np.testing.assert_allclose(modelbundle.load_bundle(folder).predict_proba(x), expected, atol=1e-6)
    keras.Model(reloaded.input, [reloaded.get_layer("block4_conv3").output, reloaded.output])
