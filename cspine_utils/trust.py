"""What a probability can be trusted for: the model's logits and features, and the "unlike the training data" flag.

Every course model ends in ``Dense(1, sigmoid)`` named ``modelbundle.OUTPUT_LAYER``. Its input is the
*feature vector* ``f`` (penultimate layer) and ``logit = f · w + b``. Two things are built on that:

* **Calibration** (notebook 03 fits it): ``p = sigmoid(logit / T + b)`` with a temperature ``T`` and a
  bias ``b`` fitted on validation (temperature scaling, Guo et al. 2017, with Platt's bias). Logits are
  computed from the features, so probabilities that a float32 sigmoid rounds to 1.000 keep their order
  and can still be calibrated.
* **Unlike the training data** (:class:`FeatureReference`, Lee et al. 2018): class means and one shared
  covariance of the training slices' features; an image whose Mahalanobis distance to the nearest class
  mean exceeds a cut-off (the ``quantile`` of validation distances, 99 %: about 1 % of in-distribution
  slices are flagged) is one the model has never seen the like of, and its probability means nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

__all__ = ["FeatureReference", "logits_and_features", "sigmoid", "split_logits", "split_output", "UNLIKE_TRAINING"]

UNLIKE_TRAINING = "this image is unlike the slices the model learned from: its probability means nothing"


def sigmoid(z: Any) -> np.ndarray:
    """The logistic function, float64, without overflow warnings for large ``|z|``."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def split_output(model: keras.Model) -> tuple[keras.Model, np.ndarray, float]:
    """``(feature model, w (D,), b)``: the network up to the output layer's input, and that layer's weights."""
    import keras  # noqa: PLC0415

    from .modelbundle import OUTPUT_LAYER  # noqa: PLC0415

    try:
        out = model.get_layer(OUTPUT_LAYER)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no output layer named {OUTPUT_LAYER!r}") from None
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in out.get_weights())
    if kernel.shape[-1] != 1:
        raise ValueError(f"{OUTPUT_LAYER} must have one unit, has {kernel.shape[-1]}")
    return keras.Model(model.inputs, out.input, name=f"{model.name}_features"), kernel[:, 0], float(bias[0])


def logits_and_features(model: keras.Model, data: Any, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N,)`` and penultimate features ``(N, D)`` (float64) of images ``(N, S, S, C)`` or a dataset."""
    tf_logger = logging.getLogger("tensorflow")  # a new feature model traces anew: TF's "retracing" warning is expected
    level, _ = tf_logger.level, tf_logger.setLevel(logging.ERROR)
    try:
        return split_logits(split_output(model), data, batch_size)
    finally:
        tf_logger.setLevel(level)


def split_logits(split: tuple, data: Any, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`logits_and_features` from a kept :func:`split_output`; arrays go through ``predict_on_batch``
    (``predict`` builds a data pipeline per call, most of the app's time for one image), datasets ``predict``."""
    features_model, w, b = split
    step = max(1, int(batch_size))
    if isinstance(data, np.ndarray):
        parts = [np.asarray(features_model.predict_on_batch(data[i : i + step])) for i in range(0, len(data), step)]
        features = np.concatenate(parts) if parts else np.zeros((0, w.size))
    else:
        features = features_model.predict(data, verbose=0)
    features = np.asarray(features, dtype=np.float64).reshape(-1, w.size)
    return features @ w + b, features


@dataclass
class FeatureReference:
    """What the training data looked like in the model's feature space (Lee et al. 2018, tied covariance).

    ``means`` (K, D) per class, ``precision`` (D, D) the inverse of the shared (Ledoit–Wolf shrunk)
    covariance, ``cutoff`` the distance above which an image is flagged, ``quantile`` of the validation
    distances it was set at, ``val_flagged`` the share of validation images above it.
    """

    means: np.ndarray
    precision: np.ndarray
    cutoff: float
    quantile: float = 0.99
    val_flagged: float = float("nan")
    n_train: int = 0

    @classmethod
    def fit(cls, train_features, train_labels, val_features, quantile: float = 0.99) -> FeatureReference:
        """Class means and shared covariance from training features; the cut-off from validation features."""
        from sklearn.covariance import LedoitWolf  # noqa: PLC0415

        x = np.asarray(train_features, dtype=np.float64)
        y = np.asarray(train_labels).ravel()
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise ValueError(f"need training features (N, D) and N labels, N >= 2; got {x.shape} and {y.shape}")
        if not 0.5 <= quantile < 1.0:
            raise ValueError(f"quantile must be in [0.5, 1), got {quantile!r}")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        ref = cls(means, precision, cutoff=np.inf, quantile=quantile, n_train=len(x))
        val_distances = ref.distance(val_features)
        ref.cutoff = float(np.quantile(val_distances, quantile))
        ref.val_flagged = float(np.mean(val_distances > ref.cutoff))
        return ref

    def distance(self, features) -> np.ndarray:
        """Mahalanobis distance ``(N,)`` of features ``(N, D)`` to the nearest class mean."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must have shape (N, {self.means.shape[1]}), got {f.shape}")
        d2 = [np.einsum("nd,de,ne->n", f - m, self.precision, f - m) for m in self.means]
        return np.sqrt(np.maximum(np.min(d2, axis=0), 0.0))

    def unlike(self, features) -> np.ndarray:
        """True where an image is farther from the training data than the cut-off."""
        return self.distance(features) > self.cutoff

    def describe(self) -> dict:
        """The facts ``bundle.json`` records (the arrays go to an ``.npz`` file)."""
        return {
            "method": "Mahalanobis distance to the nearest class mean of the training features "
            "(penultimate layer, shared Ledoit-Wolf covariance; Lee et al. 2018)",
            "cutoff": self.cutoff,
            "quantile": self.quantile,
            "val_flagged": self.val_flagged,
            "n_train": self.n_train,
            "dim": int(self.means.shape[1]),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays and numbers to ``path`` (``.npz``)."""
        np.savez(
            path,
            means=self.means,
            precision=self.precision,
            numbers=np.array([self.cutoff, self.quantile, self.val_flagged, self.n_train], dtype=np.float64),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureReference:
        """Read what :meth:`save` wrote (no pickled objects)."""
        with np.load(path, allow_pickle=False) as z:
            cutoff, quantile, val_flagged, n_train = z["numbers"].tolist()
            return cls(z["means"], z["precision"], cutoff, quantile, val_flagged, int(n_train))
