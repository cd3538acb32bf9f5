"""GENERATED from the notebooks' ``# @save`` cells by ``python -m cspine_utils.export``: do not edit."""

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from scipy.optimize import minimize

from cspine_utils import modelbundle, pretrained


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


# notebooks/03_cnn_training.ipynb, cell 28
def fit_calibration(logits, labels, bias=True):
    """(T, b) minimising the log loss of p = sigmoid(logit / T + b) on validation logits (N,) and 0/1 labels (N,).

    bias=False is temperature scaling (b = 0; Guo et al. 2017); with the bias it is Platt scaling.
    T is searched in [0.05, 20] and b in [-10, 10] (SciPy's L-BFGS-B); neither changes the ranking.
    """
    z, y = np.asarray(logits, dtype=float).ravel(), np.asarray(labels, dtype=float).ravel()
    if z.shape != y.shape or z.size < 2 or not np.isin(y, (0, 1)).all() or len(np.unique(y)) < 2:
        raise ValueError("need N >= 2 finite logits and 0/1 labels of both classes, of the same length")

    def log_loss(params):
        q = z * np.exp(-params[0]) + (params[1] if bias else 0.0)
        return float(np.mean(np.logaddexp(0.0, q) - y * q))

    bounds = [(np.log(0.05), np.log(20.0)), (-10.0, 10.0) if bias else (0.0, 0.0)]
    fit = minimize(log_loss, x0=[0.0, 0.0], method="L-BFGS-B", bounds=bounds)
    return float(np.exp(fit.x[0])), float(fit.x[1])


# notebooks/04_vgg_finetuning_tuner.ipynb, cell 9
def add_vgg_head(features, head_units=128, dropout=0.4):
    """Our head on pooled VGG16 features (B, F): batch norm -> dense (ReLU) -> dropout -> sigmoid, output (B, 1)."""
    x = keras.layers.BatchNormalization(momentum=0.9, name="head_norm")(features)
    x = keras.layers.Dense(head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=modelbundle.OUTPUT_LAYER)(x)


# notebooks/04_vgg_finetuning_tuner.ipynb, cell 10
def build_vgg16_classifier(image_size, weights="auto", head_units=128, dropout=0.4, name="vgg16"):
    """VGG16's convolutions and our head for gray slices (B, S, S, 1) in [0, 1] -> (B, 1) fracture probability.

    Returns the model, its base frozen, and the WeightsInfo that says where the convolutions came from.
    """
    if image_size < pretrained.VGG16_MIN_SIZE:
        raise ValueError(f"image_size must be at least {pretrained.VGG16_MIN_SIZE} px for VGG16, got {image_size}")
    info = pretrained.resolve_vgg16_weights(weights)
    image = keras.Input((image_size, image_size, 1), name="image")
    rgb = keras.layers.Concatenate(name="gray_to_rgb", dtype="float32")([image] * 3)
    offset = [-mean for mean in pretrained.VGG16_BGR_MEAN]  # x 255, minus the ImageNet means (BGR)
    x = keras.layers.Rescaling(255.0, offset=offset, name="vgg_preprocess", dtype="float32")(rgb)
    base = keras.applications.VGG16(include_top=False, weights=None, input_tensor=x)
    pretrained.load_vgg16_weights(base, info)
    base.trainable = False  # phase 1: only the head learns
    block4 = keras.layers.GlobalAveragePooling2D(name="block4_gap")(base.get_layer("block4_pool").output)
    block5 = keras.layers.GlobalAveragePooling2D(name="block5_gap")(base.output)
    pooled = keras.layers.Concatenate(name="avg_pool")([block4, block5])
    return keras.Model(image, add_vgg_head(pooled, head_units, dropout), name=name), info


# notebooks/04_vgg_finetuning_tuner.ipynb, cell 15
def unfreeze_top_blocks(model, n_blocks):
    """Phase 2: VGG16's top `n_blocks` blocks trainable (1: block 5; 3: blocks 3-5), the lower ones frozen.

    Returns the names of the trainable convolutions. Recompile afterwards: Keras reads `trainable` at compile.
    """
    if not 0 <= n_blocks <= 5:
        raise ValueError(f"unfreeze_blocks must be an integer from 0 to 5, got {n_blocks!r}")
    if not set(pretrained.VGG16_CONV_LAYERS) <= {layer.name for layer in model.layers}:
        raise ValueError(f"model {model.name!r} has no VGG16 convolution layers (block1_conv1 ... block5_conv3)")
    for block, layer_names in pretrained.VGG16_BLOCKS.items():
        for layer_name in layer_names:
            model.get_layer(layer_name).trainable = block > 5 - n_blocks
    return [name for name in pretrained.VGG16_CONV_LAYERS if model.get_layer(name).trainable]


# notebooks/04_vgg_finetuning_tuner.ipynb, cell 18
def make_optimizer(name, learning_rate):
    """ "adam", "sgd" (momentum 0.9) or "rmsprop" with the given learning rate."""
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    key = str(name).strip().lower()
    if key not in optimizers:
        raise ValueError(f"unknown optimizer {name!r}; choose 'adam', 'sgd' or 'rmsprop'")
    extra = {"momentum": 0.9} if key == "sgd" else {}
    return optimizers[key](learning_rate=learning_rate, **extra)


def head_hyperparameters(hp):
    """Declare the head's search space in a keras_tuner.HyperParameters and return this trial's values."""
    return {
        "head_units": hp.Choice("head_units", [64, 128, 256]),
        "dropout": hp.Float("dropout", 0.2, 0.6, step=0.1),
        "optimizer": hp.Choice("optimizer", ["adam", "sgd", "rmsprop"]),
        "lr_head": hp.Float("lr_head", 1e-4, 3e-3, sampling="log"),
    }


# notebooks/04_vgg_finetuning_tuner.ipynb, cell 25
def build_head(head_units=128, dropout=0.4, features=1024):
    """The head of build_vgg16_classifier as a model on pooled features (B, 1024) -> (B, 1), for cached features."""
    inputs = keras.Input((features,), name="features")
    return keras.Model(inputs, add_vgg_head(inputs, head_units, dropout), name="vgg16_head")


def transplant_head(head, classifier):
    """Copy the head's layers (same names) into the full classifier and return it; shapes must match."""
    for name in ("head_norm", "head_dense", modelbundle.OUTPUT_LAYER):
        source, target = head.get_layer(name), classifier.get_layer(name)
        shapes, expected = [w.shape for w in source.get_weights()], [tuple(w.shape) for w in target.weights]
        if shapes != expected:
            raise ValueError(f"{name}: the head has weights {shapes}, the classifier {expected}; same head_units?")
        target.set_weights(source.get_weights())
    return classifier


# notebooks/07_studies_2p5d.ipynb, cell 6
RSNA_LABEL_WEIGHTS = ((7.0, 14.0), (1.0, 2.0))  # (negative, positive): patient_overall, then each of C1..C7


def weighted_log_loss(y_true, y_prob, per_study=False, eps=1e-15):
    """The RSNA 2022 metric for labels and probabilities (N studies, 8): patient_overall, C1..C7.

    Binary cross-entropy per label, weighted 14 / 7 (patient_overall positive / negative) and 2 / 1 (each
    vertebra), summed and divided by the study's summed weights; the mean over studies (per_study=True:
    the (N,) per-study values). Probabilities must lie in [0, 1]; they are clipped to [eps, 1 - eps] (as
    sklearn's log_loss, which Kaggle scored with, did) so that a confident miss costs -log(eps), not infinity.
    """
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_prob, dtype=float)
    if y.ndim != 2 or y.shape[1:] != (8,) or p.shape != y.shape or len(y) == 0:
        raise ValueError(f"need labels and probabilities of the same shape (N, 8), got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (patient_overall, C1..C7)")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"probabilities must be finite and in [0, 1], got values from {np.nanmin(p)} to {np.nanmax(p)}"
        )
    p = np.clip(p, eps, 1 - eps)
    (w_neg0, w_pos0), (w_neg, w_pos) = RSNA_LABEL_WEIGHTS
    weights = np.where(y == 1, w_pos, w_neg)
    weights[:, 0] = np.where(y[:, 0] == 1, w_pos0, w_neg0)
    losses = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    per = (weights * losses).sum(axis=1) / weights.sum(axis=1)
    return per if per_study else float(per.mean())


# notebooks/07_studies_2p5d.ipynb, cell 16
SLICE_MODES = ("2.5d", "windows")


def slice_inputs(windows, mode):
    """Model inputs (Z, S, S, 3) float32 in [0, 1] from a cached study's windows (W, Z, S, S) uint8, W >= 3.

    mode "2.5d": the first (bone) window of slices z-1, z, z+1 as the three channels (at the first and last
    slice the missing neighbour repeats the slice); "windows": the first three windows of slice z.
    """
    w = np.asarray(windows)
    if w.ndim != 4 or w.shape[0] < 3 or w.shape[1] < 1:
        raise ValueError(f"windows must have shape (W >= 3, Z >= 1, S, S), got {w.shape}")
    if mode == "2.5d":
        bone = np.concatenate([w[0, :1], w[0], w[0, -1:]])
        stacked = np.stack([bone[:-2], bone[1:-1], bone[2:]], axis=-1)
    elif mode == "windows":
        stacked = np.moveaxis(w[:3], 0, -1)
    else:
        raise ValueError(f"mode must be one of {SLICE_MODES}, got {mode!r}")
    return stacked.astype(np.float32) / 255.0


# notebooks/07_studies_2p5d.ipynb, cell 24
def make_strategy(devices=None):
    """The tf.distribute strategy a training cell runs under.

    `devices` (e.g. ["/cpu:0", "/cpu:1"]): MirroredStrategy over them. Otherwise MirroredStrategy over all GPUs
    when there are two or more (one model copy per GPU, gradients summed every step), else TensorFlow's default
    strategy: no distribution, one device (the GPU when there is one, else the CPU), as a plain `fit` without a
    strategy. Build and compile the model inside `strategy.scope()`.
    """
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def describe_strategy(strategy):
    """One line for the log: the strategy's kind, its replicas and their devices."""
    try:
        devices = ", ".join(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy names no devices: TensorFlow places the ops itself
        gpus = tf.config.list_logical_devices("GPU")
        return f"default strategy (no distribution), 1 replica on {gpus[0].name if gpus else 'the CPU'}"
    return f"{type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s) on {devices}"


# notebooks/07_studies_2p5d.ipynb, cell 25
def fit_slice_head(strategy, train, val, epochs, class_weight=None, learning_rate=1e-3, batch_size=64, patience=3):
    """Notebook 04's head trained on slice features under `strategy`; returns (head, history dict).

    train, val: (features (N, F) float32, labels (N,) 0/1). Built and compiled inside `strategy.scope()`;
    `batch_size` is per replica. Notebook 03's callbacks stop early on validation AUC and keep the best epoch.
    """
    from cspine_utils import course  # notebook 04's head, notebook 03's metrics and callbacks

    with strategy.scope():
        head = course.build_head(features=train[0].shape[1])
        head.compile(
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=course.classifier_metrics(),
        )
    history = head.fit(
        *train,
        validation_data=val,
        epochs=epochs,
        batch_size=batch_size * strategy.num_replicas_in_sync,
        class_weight=class_weight,
        callbacks=course.training_callbacks(None, patience=patience),
        verbose=2,
    )
    return head, history.history


# notebooks/07_studies_2p5d.ipynb, cell 29
def aggregate_slices(scores, presence, how="max", k=3):
    """Scores (8,) [study, C1..C7] of one study from its slice scores (Z,) and vertebra presence (Z, 7) 0/1.

    how="max": the highest slice score; "topk": the mean of the k highest. Vertebra v pools the slices where
    presence[:, v] is 1; the study pools the slices that show any of C1..C7 (all slices when presence is all 0,
    i.e. no mask): a slice above C1 or below C7 cannot hold a cervical fracture. A vertebra on no slice gets
    the study's score.
    """
    s, present = np.asarray(scores, dtype=float).ravel(), np.asarray(presence).astype(bool)
    if s.size == 0 or present.shape != (s.size, 7) or how not in ("max", "topk") or int(k) < 1:
        raise ValueError(
            f"need scores (Z,), presence (Z, 7), how 'max' or 'topk', k >= 1; got {s.shape}, {present.shape}, {how!r}, {k}"
        )

    def pool(values):
        return float(values.max()) if how == "max" else float(np.sort(values)[-int(k) :].mean())

    spine = present.any(axis=1)
    study = pool(s[spine] if spine.any() else s)
    return np.array([study] + [pool(s[present[:, v]]) if present[:, v].any() else study for v in range(7)])


# notebooks/07_studies_2p5d.ipynb, cell 34
def build_sequence_model(n_inputs, units=32, dropout=0.2, name="study_gru"):
    """A GRU over a study's slices (B, Z, n_inputs), zero-padded in front -> (B, 8) probabilities.

    The GRU's final state (after the last slice) feeds 8 sigmoids: patient_overall, C1..C7.
    """
    inputs = keras.Input((None, n_inputs), name="slices")
    x = keras.layers.GRU(units, dropout=dropout, name="gru")(inputs)
    outputs = keras.layers.Dense(8, activation="sigmoid", dtype="float32", name="study_probabilities")(x)
    return keras.Model(inputs, outputs, name=name)
