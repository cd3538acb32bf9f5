"""VGG16 classifier (temporary home; moves into notebook 04)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .modelbundle import OUTPUT_LAYER
from .models import (
    _fit_shuffle,
    _fraction,
    _history_dict,
    _positive_int,
    compile_binary_classifier,
    make_optimizer,
    standard_callbacks,
)
from .pretrained import (
    VGG16_BGR_MEAN,
    VGG16_BLOCKS,
    VGG16_CONV_LAYERS,
    VGG16_MIN_SIZE,
    WeightsInfo,
    load_vgg16_weights,
    resolve_vgg16_weights,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import tensorflow as tf

__all__ = [
    "VGG16_FEATURE_DIM",
    "build_vgg16_classifier",
    "gradcam_layer_name",
    "set_vgg_trainable",
    "train_two_phase",
    "make_optimizer",
]


VGG16_FEATURE_DIM = 1024  # avg_pool: pooled block 4 (512) + pooled block 5 (512)


def build_vgg16_classifier(
    image_size: int,
    *,
    weights: str | os.PathLike | WeightsInfo | None = "auto",
    head_units: int = 128,
    dropout: float = 0.4,
    name: str = "vgg16",
) -> tuple[keras.Model, WeightsInfo]:
    """VGG16's convolutional base with a small binary head, for grayscale slices.

    Layers, in order::

        image (S, S, 1) in [0, 1]
        gray_to_rgb      Concatenate: the gray channel three times      (S, S, 3)
        vgg_preprocess   Rescaling: x 255, minus the BGR means 103.939, 116.779, 123.68
                         (= keras.applications.vgg16.preprocess_input; for gray images the
                         RGB -> BGR swap changes nothing)
        block1_conv1 ... block5_pool   the 13 VGG16 convolutions and 5 poolings, flat
        avg_pool         GlobalAveragePooling2D of block4_pool and of block5_pool,
                         concatenated                                    (1024,)
        head_norm        BatchNormalization (standardises the pooled features)
        head_dense       Dense(head_units, relu)
        head_dropout     Dropout(dropout)
        fracture_probability  Dense(1, sigmoid), float32

    Only built-in layers are used, so ``keras.saving.load_model(..., safe_mode=True)`` loads
    the saved model without this package. The VGG16 layers sit directly in the classifier
    (not as a nested ``"vgg16"`` model) so that ``model.get_layer("block5_conv3").output`` can
    be wired to ``model.inputs`` for Grad-CAM. VGG16 has no batch normalisation or dropout, so
    the ``training=False`` call of a frozen base in the Keras transfer-learning guide changes
    nothing here; freezing is done with :func:`set_vgg_trainable`. The base starts frozen.

    Parameters
    ----------
    image_size : int
        Side ``S`` of the square input, pixels, >= 32.
    weights : {"auto", "imagenet", "hed-bsds500", None}, path or WeightsInfo, default "auto"
        See :func:`resolve_vgg16_weights`. On a slow connection, resolve first with a longer
        ``download_timeout`` and pass the :class:`WeightsInfo`.
    head_units : int, default 128
        Units of the hidden dense layer.
    dropout : float, default 0.4
        Dropout rate in the head, in [0, 1).
    name : str, default "vgg16"
        Model name.

    Returns
    -------
    model : keras.Model
        Input ``(B, S, S, 1)`` float32 in [0, 1]; output ``(B, 1)`` fracture probability.
    weights_info : WeightsInfo
        Where the convolution weights came from (store it in the bundle).

    Raises
    ------
    ValueError, RuntimeError, FileNotFoundError
        See :func:`resolve_vgg16_weights` and :func:`load_vgg16_weights`.
    """
    import keras  # noqa: PLC0415

    size = _positive_int("image_size", image_size, minimum=VGG16_MIN_SIZE)
    units = _positive_int("head_units", head_units)
    rate = _fraction("dropout", dropout)
    info = resolve_vgg16_weights(weights)

    # The weights go into a stand-alone keras.applications base first (it reads every file
    # format Keras writes), then are copied by layer name into the flat classifier.
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    load_vgg16_weights(base, info)

    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb", dtype="float32")([inputs] * 3)
    x = keras.layers.Rescaling(255.0, offset=[-m for m in VGG16_BGR_MEAN], name="vgg_preprocess", dtype="float32")(x)
    x, block4 = _vgg16_conv_stack(x)
    # Features: block 5 (as in the Keras guide) AND block 4, each globally averaged. VGG16's most
    # ImageNet-specific block 5 transfers worst to CT slices; its mid-level (edge/texture)
    # block 4 transfers better (frozen HED features, logistic regression on the cpu synthetic
    # set: validation AUC 0.85 for block 4, 0.74 for block 5), so the head sees both.
    x = keras.layers.Concatenate(name="avg_pool")(
        [
            keras.layers.GlobalAveragePooling2D(name="block4_gap")(block4),
            keras.layers.GlobalAveragePooling2D(name="block5_gap")(x),
        ]
    )
    # pooled VGG activations differ in scale by orders of magnitude between channels (the HED
    # weights especially): standardise them before the dense layer, as one would for a linear model
    x = keras.layers.BatchNormalization(momentum=0.9, name="head_norm")(x)
    x = keras.layers.Dense(units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(rate, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    model = keras.Model(inputs, outputs, name=name)
    for layer_name in VGG16_CONV_LAYERS:
        model.get_layer(layer_name).set_weights(base.get_layer(layer_name).get_weights())
    set_vgg_trainable(model, unfreeze_blocks=0)
    return model, info


def _vgg16_conv_stack(x: keras.KerasTensor) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """VGG16's convolutional base (``include_top=False``) applied to ``x``, layer by layer.

    Same layers and names as ``keras.applications.VGG16``: 3x3 convolutions with ReLU and
    "same" padding, 2x2 max pooling after each block. Returns the outputs of ``block5_pool``
    and ``block4_pool``.
    """
    import keras  # noqa: PLC0415

    channels = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    taps = {}
    for block, layer_names in VGG16_BLOCKS.items():
        for layer_name in layer_names:
            x = keras.layers.Conv2D(channels[block], (3, 3), activation="relu", padding="same", name=layer_name)(x)
        x = keras.layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{block}_pool")(x)
        taps[block] = x
    return x, taps[4]


def gradcam_layer_name(model: keras.Model) -> str:
    """The layer whose output Grad-CAM should use: ``"block4_conv3"``
    (:func:`build_vgg16_classifier`, whose head also reads block 4) or ``"last_conv_relu"``
    (:func:`build_cnn`).

    The choice is :func:`cspine_utils.explain.gradcam_layer_name`'s (one rule for the whole
    package); this one refuses models it was not made for instead of falling back to their last
    image-like layer. A Grad-CAM model is then ``keras.Model(model.inputs,
    [model.get_layer(name).output, model.output])``.

    Raises
    ------
    ValueError
        If the model has none of those layers.
    """
    from . import explain  # noqa: PLC0415 - explain owns the rule; it imports nothing heavy

    known = (explain.VGG_SKIP_LAYER, explain.VGG_LAYER, *explain.CNN_LAYERS)
    try:
        name = explain.gradcam_layer_name(model)
    except ValueError:
        name = None
    if name not in known:
        raise ValueError(
            f"model {model.name!r} has no {explain.VGG_SKIP_LAYER!r} or {explain.CNN_LAYERS[0]!r} "
            "layer; build it with build_vgg16_classifier or build_cnn"
        )
    return name


def set_vgg_trainable(model: keras.Model, unfreeze_blocks: int) -> list[str]:
    """Freeze VGG16's convolutions except the top ``unfreeze_blocks`` blocks.

    ``0`` freezes the whole base (phase 1), ``1`` unfreezes block 5, ``2`` blocks 4 and 5, ...
    ``5`` everything. Layers outside the base (the head) are left trainable. Recompile the model
    afterwards: Keras reads the flags when it compiles.

    Parameters
    ----------
    model : keras.Model
        From :func:`build_vgg16_classifier`.
    unfreeze_blocks : int
        0 to 5.

    Returns
    -------
    list of str
        The VGG16 convolution layers now trainable.

    Raises
    ------
    ValueError
        If ``unfreeze_blocks`` is outside 0-5 or the model has no VGG16 layers.
    """
    if (
        isinstance(unfreeze_blocks, bool)
        or not isinstance(unfreeze_blocks, (int, np.integer))
        or not 0 <= unfreeze_blocks <= 5
    ):
        raise ValueError(f"unfreeze_blocks must be an integer from 0 to 5, got {unfreeze_blocks!r}")
    names = {layer.name for layer in model.layers}
    if not set(VGG16_CONV_LAYERS) <= names:
        raise ValueError(
            f"model {model.name!r} has no VGG16 convolution layers (block1_conv1 ...); "
            "build it with build_vgg16_classifier"
        )
    open_blocks = set(range(6 - int(unfreeze_blocks), 6))
    trainable = []
    for block, layer_names in VGG16_BLOCKS.items():
        for layer_name in layer_names:
            layer = model.get_layer(layer_name)
            layer.trainable = block in open_blocks
            if layer.trainable:
                trainable.append(layer_name)
    return trainable


def train_two_phase(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs_head: int,
    epochs_finetune: int,
    lr_head: float = 1e-3,
    lr_finetune: float = 1e-5,
    unfreeze_blocks: int = 1,
    optimizer: str = "adam",
    class_weight: dict[int, float] | None = None,
    callbacks: list | None = None,
    out_dir: str | os.PathLike | None = None,
    patience: int = 5,
    verbose: int | str = "auto",
) -> dict[str, list]:
    """Transfer learning in two phases, as in the Keras transfer-learning guide.

    1. **Head**: all VGG16 convolutions frozen; compile with ``lr_head``; train
       ``epochs_head`` epochs. Only the new head learns, so the pretrained features are not
       wrecked by the large gradients of a random head.
    2. **Fine-tuning** (skipped if ``epochs_finetune == 0``): unfreeze the top
       ``unfreeze_blocks`` block(s) (block 5, then 4, ...), **recompile** (Keras reads the
       trainable flags at compile time) with the low ``lr_finetune`` and continue for
       ``epochs_finetune`` more epochs; epoch numbers continue from phase 1.

    Each phase restores its best epoch (early stopping); ``out_dir/best.keras`` keeps the best
    epoch of both phases, ``out_dir/history.csv`` logs both.

    Parameters
    ----------
    model : keras.Model
        From :func:`build_vgg16_classifier`.
    train_ds, val_ds : tf.data.Dataset
        ``(images (B, S, S, 1), labels (B,))`` batches.
    epochs_head, epochs_finetune : int
        Epochs of each phase (``>= 0``, not both 0). ``epochs_head=0`` keeps a head trained
        elsewhere (e.g. on cached features by the tuner) and only fine-tunes; its validation AUC
        is then the bar phase 2 has to beat.
    lr_head, lr_finetune : float
        Learning rates of the two phases.
    unfreeze_blocks : int, default 1
        VGG16 blocks unfrozen in phase 2 (1-5).
    optimizer : {"adam", "sgd", "rmsprop"}, default "adam"
    class_weight : dict, optional
    callbacks : list, optional
        Used in both phases instead of :func:`standard_callbacks`.
    out_dir : str or PathLike, optional
        Folder for ``best.keras`` and ``history.csv``.
    patience : int, default 5
    verbose : int or "auto"

    Returns
    -------
    dict
        Per-epoch lists of both phases joined (``loss``, ``val_auc``, ...), plus ``phase``
        (1 or 2 for each epoch) and ``trainable`` (the trainable VGG16 layers of each phase,
        ``{1: [...], 2: [...]}``).
    """
    epochs_head = _positive_int("epochs_head", epochs_head, minimum=0)
    epochs_finetune = _positive_int("epochs_finetune", epochs_finetune, minimum=0)
    if epochs_head + epochs_finetune == 0:
        raise ValueError("epochs_head and epochs_finetune are both 0: nothing to train")
    if epochs_finetune and not 1 <= unfreeze_blocks <= 5:
        raise ValueError(f"unfreeze_blocks must be from 1 to 5, got {unfreeze_blocks!r}")

    trainable = {1: set_vgg_trainable(model, 0)}
    compile_binary_classifier(model, lr_head, optimizer)
    if epochs_head:
        phase_callbacks = callbacks if callbacks is not None else standard_callbacks(out_dir, patience=patience)
        h1 = _history_dict(
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=epochs_head,
                class_weight=class_weight,
                callbacks=phase_callbacks,
                verbose=verbose,
                shuffle=_fit_shuffle(train_ds),
            )
        )
    head_best = None
    if not epochs_head:  # the head was trained elsewhere (e.g. on cached features)
        h1 = {}
        head_best = model.evaluate(val_ds, verbose=0, return_dict=True).get("auc")  # phase 2's bar
    n1 = len(h1.get("loss", []))
    merged: dict[str, list] = {k: list(v) for k, v in h1.items()}
    merged["phase"] = [1] * n1
    if epochs_finetune:
        trainable[2] = set_vgg_trainable(model, unfreeze_blocks)
        compile_binary_classifier(model, lr_finetune, optimizer)
        if callbacks is None:
            best = max(h1["val_auc"]) if h1.get("val_auc") else head_best
            phase_callbacks = standard_callbacks(out_dir, patience=patience, append=bool(n1), initial_best=best)
        h2 = _history_dict(
            model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=n1,
                epochs=n1 + epochs_finetune,
                class_weight=class_weight,
                callbacks=phase_callbacks,
                verbose=verbose,
                shuffle=_fit_shuffle(train_ds),
            )
        )
        n2 = len(h2.get("loss", []))
        for key in set(merged) | set(h2):
            if key == "phase":
                continue
            merged.setdefault(key, [float("nan")] * n1)
            merged[key] = merged[key][:n1] + h2.get(key, [float("nan")] * n2)
        merged["phase"] += [2] * n2
    merged["trainable"] = trainable  # type: ignore[assignment]
    return merged
