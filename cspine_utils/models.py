"""CNN training helpers (temporary home; moves into notebook 03)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .modelbundle import OUTPUT_LAYER, _fraction, _positive_int

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import tensorflow as tf

__all__ = [
    "build_cnn",
    "make_optimizer",
    "compile_binary_classifier",
    "standard_callbacks",
    "class_weights_from_labels",
    "train_cnn",
    "choose_threshold",
]


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3) -> keras.optimizers.Optimizer:
    """``"adam"``, ``"sgd"`` (momentum 0.9) or ``"rmsprop"`` with the given learning rate.

    Raises
    ------
    ValueError
        If the name is unknown or the learning rate is not positive.
    """
    import keras  # noqa: PLC0415

    lr = float(learning_rate)
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    key = str(name).strip().lower()
    if key == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if key == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if key == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam', 'sgd' or 'rmsprop'")


def build_cnn(
    image_size: int,
    *,
    filters: Sequence[int] = (32, 64, 128, 192),
    convs_per_block: Sequence[int] | None = None,
    dropout: float = 0.3,
    name: str = "cnn",
) -> keras.Model:
    """A compact CNN for grayscale slices, trained from scratch.

    One block per entry of ``filters``: ``convs`` x (3x3 conv -> batch norm -> ReLU), then 2x2
    max pooling (the last block is followed by global average pooling instead). Then dropout and
    ``Dense(1, sigmoid)``. By default every block has one convolution except the last, which
    has two: at high resolution a second convolution costs the most and adds the least. With
    the ``cpu`` profile (96 px) the default has ~0.65 M parameters and takes about 0.5 s per
    batch of 32 on 2 busy cores, i.e. about 4 minutes for 15 epochs of 1000 images.

    Batch normalisation uses ``momentum=0.9`` (Keras: 0.99) so its moving statistics settle
    within ~20 steps: the small datasets of the course give only tens of steps per epoch.

    Layer names: ``block{k}_conv{j}``, ``..._bn``, ``..._relu``; the last convolution is
    ``"last_conv"`` and its ReLU output ``"last_conv_relu"`` (use :func:`gradcam_layer_name`);
    the output is ``"fracture_probability"`` (float32 also under mixed precision).

    Parameters
    ----------
    image_size : int
        Side ``S`` of the square input, pixels; at least ``2 ** (len(filters) - 1)``.
    filters : sequence of int, default (32, 64, 128, 192)
        Convolution filters per block.
    convs_per_block : sequence of int, optional
        Convolutions in each block (1 or 2 typically); default ``1`` for every block but the
        last, which has ``2``.
    dropout : float, default 0.3
        Dropout rate before the output unit, in [0, 1).
    name : str, default "cnn"
        Model name.

    Returns
    -------
    keras.Model
        Input ``(B, S, S, 1)`` float32 in [0, 1]; output ``(B, 1)`` fracture probability.

    Raises
    ------
    ValueError
        If a size or rate is out of range.
    """
    import keras  # noqa: PLC0415

    filters = [_positive_int("filters entry", f) for f in filters]
    if not filters:
        raise ValueError("filters must name at least one block, got an empty sequence")
    if convs_per_block is None:
        convs_per_block = [1] * (len(filters) - 1) + [2]
    convs = [_positive_int("convs_per_block entry", c) for c in convs_per_block]
    if len(convs) != len(filters):
        raise ValueError(f"convs_per_block has {len(convs)} entries but filters has {len(filters)}")
    size = _positive_int("image_size", image_size, minimum=2 ** (len(filters) - 1))
    rate = _fraction("dropout", dropout)

    inputs = keras.Input((size, size, 1), name="image")
    x = inputs
    n_blocks = len(filters)
    for k, (n_filters, n_convs) in enumerate(zip(filters, convs), start=1):
        for j in range(1, n_convs + 1):
            last = k == n_blocks and j == n_convs
            base = "last_conv" if last else f"block{k}_conv{j}"
            x = keras.layers.Conv2D(n_filters, 3, padding="same", use_bias=False, name=base)(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"{base}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{base}_relu")(x)
        if k < n_blocks:
            x = keras.layers.MaxPooling2D(2, name=f"block{k}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(rate, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=name)


def compile_binary_classifier(model: keras.Model, learning_rate: float = 1e-3, optimizer: str = "adam") -> keras.Model:
    """Compile for binary classification: binary cross-entropy, and the metrics ``accuracy``,
    ``auc`` (ROC AUC), ``precision`` and ``recall`` (at threshold 0.5). Returns ``model``."""
    import keras  # noqa: PLC0415

    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def standard_callbacks(
    out_dir: str | os.PathLike | None = None,
    monitor: str = "val_auc",
    patience: int = 5,
    *,
    mode: str = "auto",
    append: bool = False,
    initial_best: float | None = None,
    min_lr: float = 1e-6,
) -> list[keras.callbacks.Callback]:
    """The callbacks every training run of the course uses.

    * ``EarlyStopping(monitor, patience, restore_best_weights=True)``: stops when ``monitor``
      has not improved for ``patience`` epochs and puts back the best epoch's weights;
    * ``ReduceLROnPlateau``: halves the learning rate after ``max(1, patience // 2)`` flat
      epochs (down to ``min_lr``);
    * with ``out_dir``: ``ModelCheckpoint`` to ``out_dir/best.keras`` (best epoch only) and
      ``CSVLogger`` to ``out_dir/history.csv``.

    Parameters
    ----------
    out_dir : str or PathLike, optional
        Folder for ``best.keras`` and ``history.csv`` (created).
    monitor : str, default "val_auc"
        A logged quantity; needs validation data for ``val_*``.
    patience : int, default 5
        Epochs without improvement before stopping.
    mode : {"auto", "max", "min"}, default "auto"
        ``"auto"``: ``"min"`` for a loss, ``"max"`` otherwise.
    append : bool, default False
        Append to an existing ``history.csv`` (phase 2 of :func:`train_two_phase`).
    initial_best : float, optional
        Only save a checkpoint that beats this value.
    min_lr : float, default 1e-6

    Returns
    -------
    list of keras.callbacks.Callback
    """
    import keras  # noqa: PLC0415

    patience = _positive_int("patience", patience)
    if mode == "auto":
        mode = "min" if "loss" in monitor else "max"
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'auto', 'max' or 'min', got {mode!r}")
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=0.5, patience=max(1, patience // 2), min_lr=min_lr
        ),
    ]
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                str(folder / "best.keras"),
                monitor=monitor,
                mode=mode,
                save_best_only=True,
                initial_value_threshold=initial_best,
            ),
            keras.callbacks.CSVLogger(str(folder / "history.csv"), append=append),
        ]
    return callbacks


def class_weights_from_labels(y: Iterable) -> dict[int, float]:
    """Balanced class weights ``n / (2 n_c)``: each class contributes equally to the loss.

    Parameters
    ----------
    y : array-like, shape (N,)
        0/1 labels (1 = fracture), or the names ``"normal"`` / ``"fracture"``.

    Returns
    -------
    dict
        ``{0: w0, 1: w1}``; with 75 % normal, ``{0: 0.667, 1: 2.0}``.

    Raises
    ------
    ValueError
        If a label is not 0/1 (or a class name), or a class is absent.
    """
    arr = np.asarray(list(y) if not isinstance(y, np.ndarray) else y)
    if arr.size == 0:
        raise ValueError("no labels given")
    if arr.dtype.kind in "USO":
        from . import pipeline  # noqa: PLC0415

        arr = pipeline.label_to_int(arr.tolist())
    bad = arr[(arr != 0) & (arr != 1)]
    if bad.size:
        raise ValueError(f"labels must be 0 or 1, got {bad.flat[0].item()!r}")
    counts = np.bincount(arr.astype(np.int64).ravel(), minlength=2)
    if (counts == 0).any():
        raise ValueError(
            f"both classes are needed for class weights; counts (normal, fracture) = {tuple(int(c) for c in counts)}"
        )
    n = counts.sum()
    return {c: float(n / (2.0 * counts[c])) for c in (0, 1)}


def _fit_shuffle(train_data: Any) -> bool:
    """``fit``'s ``shuffle``: a ``tf.data.Dataset`` shuffles itself (make_dataset does)."""
    import tensorflow as tf  # noqa: PLC0415

    return not isinstance(train_data, tf.data.Dataset)


def _history_dict(history: keras.callbacks.History) -> dict[str, list[float]]:
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def train_cnn(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    epochs: int,
    lr: float = 1e-3,
    class_weight: dict[int, float] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    optimizer: str = "adam",
    callbacks: list | None = None,
    patience: int = 5,
    verbose: int | str = "auto",
) -> dict[str, list[float]]:
    """Compile and train a model from scratch with validation AUC as the guide.

    Parameters
    ----------
    model : keras.Model
        E.g. from :func:`build_cnn`.
    train_ds, val_ds : tf.data.Dataset
        ``(images (B, S, S, 1), labels (B,))`` batches, as from ``pipeline.make_dataset``.
    epochs : int
        Maximum epochs (early stopping may end sooner).
    lr : float, default 1e-3
        Learning rate.
    class_weight : dict, optional
        E.g. :func:`class_weights_from_labels` of the training labels.
    out_dir : str or PathLike, optional
        Where :func:`standard_callbacks` write ``best.keras`` and ``history.csv``.
    optimizer : {"adam", "sgd", "rmsprop"}, default "adam"
    callbacks : list, optional
        Replaces :func:`standard_callbacks` when given.
    patience : int, default 5
        Early-stopping patience, epochs.
    verbose : int or "auto"
        Passed to ``fit``.

    Returns
    -------
    dict
        ``History.history``: per-epoch lists ``loss``, ``auc``, ``val_auc``, ... (floats).
    """
    epochs = _positive_int("epochs", epochs)
    compile_binary_classifier(model, lr, optimizer)
    if callbacks is None:
        callbacks = standard_callbacks(out_dir, patience=patience)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=_fit_shuffle(train_ds),
    )
    return _history_dict(history)


def choose_threshold(y_true: Iterable, y_prob: Iterable, method: str = "youden") -> float:
    """A decision threshold on the predicted probability, from validation data.

    A slice is called "fracture" when ``probability >= threshold``. Candidates are the
    predicted probabilities themselves (the points of the ROC curve).

    ``"youden"``
        Maximises Youden's J = sensitivity + specificity - 1.
    ``"f1"``
        Maximises F1 = 2 TP / (2 TP + FP + FN).

    Ties go to the **lower** threshold (higher sensitivity: a missed fracture costs more than
    a false alarm).

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture; both classes needed.
    y_prob : array-like, shape (N,)
        Predicted fracture probabilities in [0, 1].
    method : {"youden", "f1"}, default "youden"

    Returns
    -------
    float
        The threshold, a probability.

    Raises
    ------
    ValueError
        On mismatched lengths, non-binary labels, a missing class, probabilities outside
        [0, 1] or an unknown method.
    """
    y = np.asarray(list(y_true), dtype=float).ravel()
    p = np.asarray(list(y_prob), dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = y[~np.isin(y, (0.0, 1.0))][0].item()
        raise ValueError(f"y_true must hold 0/1 labels, got {bad!r}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"both classes are needed; got {n_pos} fracture and {n_neg} normal")
    method = str(method).strip().lower()
    if method not in ("youden", "f1"):
        raise ValueError(f"unknown method {method!r}; choose 'youden' or 'f1'")
    candidates = np.unique(p)  # ascending
    predicted = p[None, :] >= candidates[:, None]  # (T, N)
    tp = (predicted & (y == 1)).sum(axis=1)
    fp = (predicted & (y == 0)).sum(axis=1)
    if method == "youden":
        score = tp / n_pos - fp / n_neg
    else:
        fn = n_pos - tp
        score = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.flatnonzero(np.isclose(score, score.max()))[0])  # lowest threshold among ties
    return float(candidates[best])
