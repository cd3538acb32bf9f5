"""The course's code, GENERATED from the notebooks' ``#@save`` cells by ``python -m cspine_utils.export``.

Do not edit: edit the cell in its notebook and re-run the export (tests/test_export.py fails when this is stale).
"""

from pathlib import Path

import keras
import numpy as np


# notebooks/03_cnn_training.ipynb, cell 10
def build_cnn(image_size, filters=(32, 64, 128, 192), convs_per_block=None, dropout=0.3, name="cnn"):
    """A compact CNN: input (B, S, S, 1) in [0, 1] with S = image_size pixels, output (B, 1) fracture probability.

    One block per entry of `filters`: `convs_per_block[k]` x (Conv2D 3x3 -> BatchNormalization -> ReLU)
    (default 1, and 2 in the last block), then MaxPooling 2x2; the last block ends in global average pooling.
    """
    convs_per_block = convs_per_block or [1] * (len(filters) - 1) + [2]
    if len(convs_per_block) != len(filters):
        raise ValueError(f"convs_per_block has {len(convs_per_block)} entries but filters has {len(filters)}")
    if image_size < 2 ** (len(filters) - 1) or not 0 <= dropout < 1:
        raise ValueError(
            f"need image_size >= {2 ** (len(filters) - 1)}, dropout in [0, 1); got {image_size}, {dropout}"
        )
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    for k, (n_filters, n_convs) in enumerate(zip(filters, convs_per_block), start=1):
        for j in range(1, n_convs + 1):
            last = k == len(filters) and j == n_convs
            base = "last_conv" if last else f"block{k}_conv{j}"
            x = keras.layers.Conv2D(n_filters, 3, padding="same", use_bias=False, name=base)(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"{base}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{base}_relu")(x)
        if k < len(filters):
            x = keras.layers.MaxPooling2D(2, name=f"block{k}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="fracture_probability")(x)
    return keras.Model(inputs, outputs, name=name)


# notebooks/03_cnn_training.ipynb, cell 14
def classifier_metrics():
    """Fresh metrics for a binary classifier: accuracy, ROC AUC ("auc"), and precision and recall at 0.5."""
    return [
        keras.metrics.BinaryAccuracy(name="accuracy"),
        keras.metrics.AUC(name="auc"),
        keras.metrics.Precision(name="precision"),
        keras.metrics.Recall(name="recall"),
    ]


# notebooks/03_cnn_training.ipynb, cell 17
def training_callbacks(out_dir, patience=5, monitor="val_auc", append=False, initial_best=None):
    """EarlyStopping and ReduceLROnPlateau on `monitor` (higher is better); with `out_dir` (created) also
    ModelCheckpoint of the best epoch to out_dir/best.keras and CSVLogger to out_dir/history.csv."""
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode="max", factor=0.5, patience=max(1, patience // 2), min_lr=1e-6
        ),
    ]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                str(Path(out_dir) / "best.keras"),
                monitor=monitor,
                mode="max",
                save_best_only=True,
                initial_value_threshold=initial_best,
            ),
            keras.callbacks.CSVLogger(str(Path(out_dir) / "history.csv"), append=append),
        ]
    return callbacks


# notebooks/03_cnn_training.ipynb, cell 20
def balanced_class_weights(labels):
    """`{0: w0, 1: w1}` with w_c = n / (2 n_c) for 0/1 labels of shape (N,): each class adds equally to the loss."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be a non-empty list of 0/1 values, got {labels[:5].tolist()}...")
    counts = np.bincount(labels.astype(int), minlength=2)
    if counts.min() == 0:
        raise ValueError(f"both classes are needed for class weights; counts (normal, fracture) = {counts.tolist()}")
    return {c: float(labels.size / (2 * counts[c])) for c in (0, 1)}
