"""Hyperparameter search for the VGG16 classifier with KerasTuner, on cached base features.

Overview
--------
A *trial* trains the VGG16 classifier of :func:`cspine_utils.vggnet.build_vgg16_classifier`
with one set of hyperparameters and reports its validation ROC AUC (``val_auc``, maximised).
:class:`VGGHyperModel` defines the search space:

====================  ======================================  ==============================
name                  values                                  used in
====================  ======================================  ==============================
``head_units``        64, 128, 256                            width of ``head_dense``
``dropout``           0.2 - 0.6 (step 0.1)                    rate of ``head_dropout``
``optimizer``         adam, sgd (momentum 0.9), rmsprop       both phases
``lr_head``           1e-4 - 3e-3 (log scale)                 phase 1: frozen base
``unfreeze_blocks``   0, 1, 2, 3 (0 = frozen base only)       phase 2: top blocks trained
``lr_finetune``       1e-5 - 3e-4 (log), only if unfrozen     phase 2
``augment_strength``  0, 0.5, 1 (the cached strengths)        ``pipeline.augmentation_layers``
``batch_size``        16, 32, 64                              both phases (through ``fit``)
====================  ======================================  ==============================

**Why trials are cheap: cached features.** While the VGG16 base is frozen (phase 1 of every
trial, and the whole of a trial with ``unfreeze_blocks = 0``) it computes the same function in
every epoch of every trial, and that is > 99 % of the work. :class:`FeatureCache` runs the base
*once* over the training images - unaugmented, and ``K`` seeded augmented copies per cached
augmentation strength - and keeps the pooled output (``avg_pool``, shape ``(N, 1024)``: pooled blocks 4 and 5) in memory
and optionally as ``.npz`` files (``artifacts/tuner/cache/``). The trial then trains only the
head (:func:`build_head`: ``head_dense`` -> ``head_dropout`` -> ``fracture_probability``, the
very layers of the full classifier) on those 1024 numbers per image; epoch ``e`` sees augmented
copy ``e mod K``, standing in for the fresh augmentation of each epoch. Trials with
``unfreeze_blocks > 0`` then build the full classifier, copy the trained head into it
(:func:`transplant_head`) and fine-tune on images (``ceil(finetune_fraction x epochs)`` epochs).
``benchmarks/bench_tuner.py`` measures the gain.

**Explicit state.** :func:`run_search` writes ``search_settings.json`` into the project folder
(data fingerprint, image size, weights source, tuner kind, search-space version, ...).
``mode="fresh"`` wipes the folder first; ``mode="resume"`` continues a project only when the
recorded settings equal this run's and raises a ``ValueError`` naming what differs otherwise
(KerasTuner itself, with ``overwrite=False``, silently reloads an old project - even one made on
other data - and may return its stale results). Every search writes ``results.csv``
(:func:`results_table`: trial id, status, score, seconds, hyperparameters). A trial that raises
is recorded as ``FAILED`` and the search goes on, until ``max_consecutive_failed_trials``
failures in a row stop it. :func:`best_model` retrains the best hyperparameters as a full
classifier with :func:`cspine_utils.vggnet.train_two_phase`.

Devices and scale-out
---------------------
* On a GPU, :func:`run_search` turns on mixed precision (float16 compute) and, with more than
  one GPU, a ``tf.distribute.MirroredStrategy`` that runs every trial on all of them
  (``distribution_strategy=``; :func:`default_distribution_strategy`).
* **Distributed search** (KerasTuner's chief/worker mode): one *chief* process runs the oracle -
  it decides which hyperparameters come next and records every result - and serves it over gRPC
  (``grpcio``, a dependency of keras-tuner); any number of *workers* ask it for trials, train
  them and report back. KerasTuner reads three environment variables:

  ``KERASTUNER_TUNER_ID``    ``chief`` for the chief, ``tuner0``, ``tuner1``, ... for workers
  ``KERASTUNER_ORACLE_IP``   the chief's address (the chief listens on it)
  ``KERASTUNER_ORACLE_PORT`` the chief's port

  The command line below sets them from ``--role``, ``--tuner-id``, ``--oracle-ip`` and
  ``--oracle-port``. Start the chief first (``--mode fresh`` wipes the project), then the
  workers, all with the same data, settings and ``--project-dir`` (on a shared filesystem when
  they run on several machines)::

      python -m cspine_utils.tuning --role chief  --oracle-ip 0.0.0.0 --oracle-port 8000 \\
          --data data/synthetic/cpu --project-dir artifacts/tuner/vgg16 --kind random
      CUDA_VISIBLE_DEVICES=0 python -m cspine_utils.tuning --role worker --tuner-id tuner0 \\
          --oracle-ip CHIEF_HOST --oracle-port 8000 --data data/synthetic/cpu \\
          --project-dir artifacts/tuner/vgg16 --kind random
      CUDA_VISIBLE_DEVICES=1 python -m cspine_utils.tuning --role worker --tuner-id tuner1 ...

  The chief trains nothing; it exits once every worker has been told the search is over, then
  writes ``results.csv``. Workers never wipe the project or write the settings; they refuse to
  start when the chief's ``search_settings.json`` differs from theirs. Random search and
  Bayesian optimisation spread well over workers; Hyperband makes workers wait at the end of each
  round.

Keras, TensorFlow and KerasTuner are imported inside the functions that need them, so importing
this module is cheap. :class:`VGGHyperModel` (a ``keras_tuner.HyperModel``) is created on first
access for the same reason.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config, hardware, modelbundle, models, pipeline, pretrained, vggnet

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import keras_tuner
    import pandas as pd
    import tensorflow as tf

__all__ = [
    "SPACE_VERSION",
    "CACHED_STRENGTHS",
    "TUNER_KINDS",
    "OBJECTIVE",
    "TuningData",
    "FeatureCache",
    "vgg16_feature_extractor",
    "build_head",
    "transplant_head",
    "compile_for_search",
    "VGGHyperModel",  # noqa: F822 (created lazily by __getattr__)
    "hyperparameters_from_values",
    "make_tuner",
    "default_distribution_strategy",
    "search_settings",
    "run_search",
    "results_table",
    "best_hyperparameters",
    "best_model",
    "main",
]

#: Bump when the meaning of the search space changes: a project made with another version
#: cannot be resumed.
SPACE_VERSION = 4  # 3: heads standardise (BatchNormalization) pooled block 4 + 5 features;
#                   4: fine-tuning may open block 3, at 1e-5 - 3e-4
#: Augmentation strengths with cached features; the ``augment_strength`` hyperparameter picks one.
CACHED_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0)
#: Augmented copies of the training set cached per strength (epoch ``e`` uses copy ``e mod K``).
DEFAULT_COPIES = 2
TUNER_KINDS = ("hyperband", "bayesian", "random")
#: What the tuner maximises: the validation ROC AUC (the metric ``auc`` on validation data).
OBJECTIVE = "val_auc"
#: The hyperparameters of :class:`VGGHyperModel`, in the order of the results table.
HYPERPARAMETERS = (
    "head_units",
    "dropout",
    "optimizer",
    "lr_head",
    "unfreeze_blocks",
    "lr_finetune",
    "augment_strength",
    "batch_size",
)
FEATURE_LAYER = "avg_pool"
FEATURE_DIM = vggnet.VGG16_FEATURE_DIM  # pooled block 4 + block 5
HEAD_LAYERS = ("head_norm", "head_dense", modelbundle.OUTPUT_LAYER)
SETTINGS_FILE = "search_settings.json"
RESULTS_FILE = "results.csv"
RUN_FILE = "run.json"  # per trial: seconds and the tuner that ran it
_CACHE_FORMAT = 1
#: Settings recorded for information only; they may change between a search and its resume.
_UNCOMPARED_SETTINGS = (
    "created",
    "resumed",
    "seed",
    "max_trials",
    "weights",
    "n_train",
    "n_val",
    "profile",
    "versions",
)


# --------------------------------------------------------------------------------------------
# Small checks
# --------------------------------------------------------------------------------------------
_positive_int = models._positive_int  # the same argument check as the models


def _strength(value: Any) -> float:
    s = float(value)
    if not np.isfinite(s) or not 0.0 <= s <= 2.0:
        raise ValueError(f"augmentation strength must be in [0, 2], got {value!r}")
    return s


def _profile(profile: str | config.Profile | None) -> config.Profile:
    return profile if isinstance(profile, config.Profile) else config.get_profile(profile)


def _write_json(path: Path, record: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def _manifest_key(manifest: pd.DataFrame) -> str:
    """:func:`modelbundle.manifest_fingerprint` with paths relative to their common folder, so that
    moving the dataset (or mounting it elsewhere on a worker) keeps the fingerprint."""
    paths = [os.path.abspath(str(p)) for p in manifest["path"]]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return modelbundle.manifest_fingerprint(manifest, root=root)


def _array_key(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class TuningData:
    """The training and validation images of a search, loaded once and shared by all trials.

    Build it with :meth:`from_manifest` (images are read on first use, so a chief process that
    trains nothing never reads them) or :meth:`from_arrays`.

    Attributes
    ----------
    train_fingerprint, val_fingerprint : str
        sha256 of the split's files, labels and split names (or of the arrays); they key the
        :class:`FeatureCache` and the project's ``search_settings.json``.
    image_size : int
        Side ``S`` of the images, pixels.
    """

    def __init__(
        self,
        *,
        image_size: int,
        train_fingerprint: str,
        val_fingerprint: str,
        loader: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
        n_train: int,
        n_val: int,
        crop_roi: bool = False,
    ):
        self.image_size = _positive_int("image_size", image_size)
        self.train_fingerprint = train_fingerprint
        self.val_fingerprint = val_fingerprint
        self.n_train, self.n_val = int(n_train), int(n_val)
        self.crop_roi = bool(crop_roi)
        self._loader = loader
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def fingerprint(self) -> str:
        """One sha256 for both splits."""
        both = f"{self.train_fingerprint}|{self.val_fingerprint}"
        return hashlib.sha256(both.encode()).hexdigest()

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, image_size: int, crop_roi: bool = False) -> TuningData:
        """Use the rows with ``split == "train"`` and ``split == "val"`` of a manifest.

        Raises
        ------
        ValueError
            If the manifest has no ``split`` column, or no training or validation rows.
        """
        train, val = _train_val(manifest)
        size = _positive_int("image_size", image_size)

        def load():
            x_train, y_train = pipeline.load_arrays(train, size, crop_roi=crop_roi)
            x_val, y_val = pipeline.load_arrays(val, size, crop_roi=crop_roi)
            return x_train, y_train, x_val, y_val

        return cls(
            image_size=size,
            train_fingerprint=_manifest_key(train),
            val_fingerprint=_manifest_key(val),
            loader=load,
            n_train=len(train),
            n_val=len(val),
            crop_roi=crop_roi,
        )

    @classmethod
    def from_arrays(cls, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> TuningData:
        """Use images already in memory: ``x`` ``(N, S, S, 1)`` float32 in [0, 1], ``y`` ``(N,)``
        0/1 labels."""
        arrays = []
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
            x = np.asarray(x, dtype=np.float32)
            y = np.asarray(y).astype(np.int64).ravel()
            if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] != 1 or x.shape[0] == 0:
                raise ValueError(f"x_{name} must have shape (N, S, S, 1) with N > 0, got {x.shape}")
            if len(y) != len(x):
                raise ValueError(f"x_{name} has {len(x)} images but y_{name} has {len(y)} labels")
            arrays += [x, y]
        if arrays[0].shape[1:] != arrays[2].shape[1:]:
            raise ValueError(
                f"train images {arrays[0].shape[1:]} and validation images {arrays[2].shape[1:]} differ in size"
            )
        frozen = tuple(arrays)
        return cls(
            image_size=int(arrays[0].shape[1]),
            train_fingerprint=_array_key(*arrays[:2]),
            val_fingerprint=_array_key(*arrays[2:]),
            loader=lambda: frozen,
            n_train=len(arrays[0]),
            n_val=len(arrays[2]),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_val, y_val)``: images ``(N, S, S, 1)`` float32, labels ``(N,)``
        int64; read on the first call."""
        if self._arrays is None:
            self._arrays = self._loader()
        return self._arrays


def _train_val(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    columns = getattr(manifest, "columns", ())
    missing = [c for c in ("path", "label", "split") if c not in columns]
    if missing:
        raise ValueError(
            f"manifest needs columns path, label and split; missing {missing} (make one with data.choose_split)"
        )
    split = manifest["split"].astype(str).str.strip().str.lower()
    train, val = manifest[split == "train"], manifest[split == "val"]
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise ValueError(f"manifest has no rows with split == {name!r}; splits found: {sorted(set(split))}")
    return train, val


def _image_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, training: bool, augment_strength: float = 0.0, seed: int = 0
) -> tf.data.Dataset:
    """:func:`pipeline.shuffle_batch_augment` on arrays already in memory, so trials do not
    decode the files again."""
    import tensorflow as tf  # noqa: PLC0415

    ds = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y.astype(np.float32)))
    return pipeline.shuffle_batch_augment(
        ds, len(x), batch_size, shuffle=training, augment_strength=augment_strength if training else 0.0, seed=seed
    )


# --------------------------------------------------------------------------------------------
# The frozen base and its cached output
# --------------------------------------------------------------------------------------------
def _build_classifier(
    image_size: int, info: pretrained.WeightsInfo, seed: int, *, head_units: int = 128, dropout: float = 0.4
) -> keras.Model:
    """:func:`vggnet.build_vgg16_classifier` whose base is the same in every call.

    Pretrained weights are the same anyway; random initialisation is made repeatable by seeding
    Keras first, so the feature cache, the fine-tuned trials and :func:`best_model` share one base.
    """
    import keras  # noqa: PLC0415

    if not info.pretrained:
        keras.utils.set_random_seed(int(seed))
    model, _ = vggnet.build_vgg16_classifier(image_size, weights=info, head_units=head_units, dropout=dropout)
    return model


def vgg16_feature_extractor(
    image_size: int,
    weights: str | os.PathLike | pretrained.WeightsInfo | None = "auto",
    seed: int = 0,
) -> tuple[keras.Model, pretrained.WeightsInfo]:
    """The frozen VGG16 base of the classifier, pooled: image -> ``avg_pool`` features.

    Parameters
    ----------
    image_size : int
        Side ``S`` of the input, pixels (>= 32).
    weights : see :func:`pretrained.resolve_vgg16_weights`
    seed : int, default 0
        Seeds random initialisation (``weights=None``) so every call gives the same base.

    Returns
    -------
    extractor : keras.Model
        Input ``(B, S, S, 1)`` float32 in [0, 1]; output ``(B, 1024)`` float32.
    weights_info : WeightsInfo
    """
    import keras  # noqa: PLC0415

    info = pretrained.resolve_vgg16_weights(weights)
    full = _build_classifier(image_size, info, seed)
    extractor = keras.Model(full.inputs, full.get_layer(FEATURE_LAYER).output, name="vgg16_features")
    return extractor, info


def _weights_key(info: pretrained.WeightsInfo, seed: int) -> str:
    if not info.pretrained:
        return f"random:seed={int(seed)}"
    stamp = ""
    if info.path and os.path.isfile(info.path):
        st = os.stat(info.path)
        stamp = f":{st.st_size}:{st.st_mtime_ns}"
    return f"{info.source}:{os.path.basename(info.path or '')}{stamp}"


class FeatureCache:
    """Pooled VGG16 base features of image sets, computed once and reused by every trial.

    Entries are keyed by image size, weights source, the images' fingerprint, augmentation
    strength, number of copies, seed and Keras dtype policy (float16 on a GPU). They live in
    memory and, with ``cache_dir``, in ``<cache_dir>/<name>.npz`` (written atomically), which
    later searches and other processes (distributed workers) read instead of recomputing.

    For ``strength = 0`` an entry is the base output of the images themselves, shape
    ``(1, N, 1024)``. For ``strength > 0`` it is ``copies`` augmented versions,
    ``(copies, N, 1024)``: copy ``k`` is made by ``pipeline.augmentation_layers(strength,
    seed=seed + 101 * k)`` applied batch by batch, then the base.

    Parameters
    ----------
    image_size : int
        Side ``S`` of the images, pixels (>= 32).
    weights : see :func:`pretrained.resolve_vgg16_weights`, default "auto"
    copies : int, default :data:`DEFAULT_COPIES`
        Augmented copies per strength.
    seed : int, default 0
        Seeds the augmentation (and a random base).
    cache_dir : str or PathLike, optional
        Folder for ``.npz`` files (e.g. ``artifacts/tuner/cache``); memory only when None.
    batch_size : int, default 32
        Images per forward pass.

    Attributes
    ----------
    stats : dict
        ``hits`` (memory), ``disk_hits``, ``misses`` and ``build_seconds`` (time spent computing).
    """

    def __init__(
        self,
        image_size: int,
        weights: str | os.PathLike | pretrained.WeightsInfo | None = "auto",
        *,
        copies: int = DEFAULT_COPIES,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
    ):
        self.image_size = _positive_int("image_size", image_size, minimum=pretrained.VGG16_MIN_SIZE)
        self.weights_info = pretrained.resolve_vgg16_weights(weights)
        self.copies = _positive_int("copies", copies)
        self.seed = _positive_int("seed", seed, minimum=0)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}
        self._extractor: keras.Model | None = None
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0, "build_seconds": 0.0}

    def key(self, fingerprint: str, strength: float) -> str:
        """The cache key (24 hex characters) of an image set at an augmentation strength."""
        import keras  # noqa: PLC0415

        s = _strength(strength)
        parts = {
            "format": _CACHE_FORMAT,
            "image_size": self.image_size,
            "features": FEATURE_DIM,
            "policy": keras.mixed_precision.global_policy().name,  # float16 features on a GPU
            "weights": _weights_key(self.weights_info, self.seed),
            "data": str(fingerprint),
            "strength": round(s, 6),
            "copies": self.copies if s > 0 else 1,
            "seed": self.seed if s > 0 else None,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def _path(self, key: str, strength: float) -> Path | None:
        if self.cache_dir is None:
            return None
        name = f"vgg16_S{self.image_size}_{self.weights_info.source}_aug{strength:g}_{key}.npz"
        return self.cache_dir / name

    def get(self, images: np.ndarray, strength: float = 0.0, *, fingerprint: str | None = None) -> np.ndarray:
        """Features of ``images`` at an augmentation strength, computed on the first request.

        Parameters
        ----------
        images : numpy.ndarray, shape (N, S, S, 1), float32 in [0, 1]
        strength : float, default 0
            0: the images as they are; > 0: ``copies`` augmented versions.
        fingerprint : str, optional
            Identifies the images (e.g. :attr:`TuningData.train_fingerprint`); default: a sha256
            of the array.

        Returns
        -------
        numpy.ndarray, shape (C, N, 1024), float32
            ``C = 1`` for strength 0, else ``copies``.
        """
        s = _strength(strength)
        x = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, 1)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"images must have shape (N, {self.image_size}, {self.image_size}, 1) for this cache, got {x.shape}"
            )
        key = self.key(fingerprint or _array_key(x), s)
        if key in self._memory:
            self.stats["hits"] += 1
            return self._memory[key]
        path = self._path(key, s)
        if path is not None and path.is_file():
            try:
                with np.load(path) as stored:
                    feats = stored["features"]
                if feats.shape[1] == len(x):
                    self.stats["disk_hits"] += 1
                    self._memory[key] = feats
                    return feats
            except (OSError, ValueError, KeyError):
                pass  # a damaged file: recompute and replace it
        started = time.perf_counter()
        feats = self._compute(x, s)
        self.stats["build_seconds"] += time.perf_counter() - started
        self.stats["misses"] += 1
        self._memory[key] = feats
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(
                tmp,
                features=feats,
                meta=json.dumps(
                    {
                        "strength": s,
                        "copies": int(feats.shape[0]),
                        "n": len(x),
                        "image_size": self.image_size,
                        "weights": self.weights_info.as_dict(),
                        "seed": self.seed,
                    }
                ),
            )
            os.replace(tmp, path)
        return feats

    def _compute(self, x: np.ndarray, strength: float) -> np.ndarray:
        if self._extractor is None:
            self._extractor, _ = vgg16_feature_extractor(self.image_size, self.weights_info, self.seed)
        if strength == 0:
            batches = [x]
        else:
            batches = []
            for k in range(self.copies):
                augment = pipeline.augmentation_layers(strength, seed=self.seed + 101 * k)
                batches.append(
                    np.concatenate(
                        [
                            np.asarray(augment(x[i : i + self.batch_size], training=True))
                            for i in range(0, len(x), self.batch_size)
                        ]
                    )
                )
        feats = [self._extractor.predict(b, batch_size=self.batch_size, verbose=0) for b in batches]
        return np.stack(feats).astype(np.float32)

    def release(self) -> None:
        """Drop the feature extractor (about 60 MB); the cached features stay."""
        if self._extractor is not None:
            self._extractor = None
            gc.collect()  # ~0.2 s, so only when there was something to free

    def __len__(self) -> int:
        return len(self._memory)


# --------------------------------------------------------------------------------------------
# The head, alone and inside the classifier
# --------------------------------------------------------------------------------------------
def build_head(head_units: int = 128, dropout: float = 0.4, *, name: str = "vgg16_head") -> keras.Model:
    """The classifier's head as a model of its own, trained on cached base features.

    ``features (1024,)`` -> ``head_norm`` BatchNormalization -> ``head_dense`` Dense(head_units,
    relu) -> ``head_dropout`` ->
    ``fracture_probability`` Dense(1, sigmoid, float32): the same names and shapes as the head
    of :func:`vggnet.build_vgg16_classifier`, so :func:`transplant_head` can copy it there.

    Returns
    -------
    keras.Model
        Input ``(B, 1024)`` float32; output ``(B, 1)`` fracture probability.
    """
    import keras  # noqa: PLC0415

    units = _positive_int("head_units", head_units)
    rate = models._fraction("dropout", dropout)
    inputs = keras.Input((FEATURE_DIM,), name="features")
    x = keras.layers.BatchNormalization(momentum=0.9, name="head_norm")(inputs)
    x = keras.layers.Dense(units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(rate, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=modelbundle.OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=name)


def transplant_head(head: keras.Model, classifier: keras.Model) -> keras.Model:
    """Copy the weights of ``head_norm``, ``head_dense`` and ``fracture_probability`` from ``head`` into
    ``classifier`` (same layer names); returns ``classifier``.

    Raises
    ------
    ValueError
        If a layer is missing or its weight shapes differ (e.g. another ``head_units``).
    """
    for layer_name in HEAD_LAYERS:
        try:
            source, target = head.get_layer(layer_name), classifier.get_layer(layer_name)
        except ValueError as exc:
            raise ValueError(f"both models need a layer {layer_name!r}: {exc}") from exc
        weights = source.get_weights()
        shapes = [w.shape for w in weights]
        expected = [tuple(w.shape) for w in target.weights]
        if shapes != expected:
            raise ValueError(
                f"{layer_name}: the head has weights {shapes} but the classifier "
                f"needs {expected}; build both with the same head_units"
            )
        target.set_weights(weights)
    return classifier


def compile_for_search(model: keras.Model, learning_rate: float, optimizer: str = "adam") -> keras.Model:
    """Compile with binary cross-entropy and the one metric the tuner needs, ROC ``auc``.

    :func:`models.compile_binary_classifier` also tracks accuracy, precision and recall; each
    metric adds to the start-up (tracing) cost of ``fit``, which dominates a trial on cached
    features. Returns ``model``.
    """
    import keras  # noqa: PLC0415

    model.compile(
        optimizer=vggnet.make_optimizer(optimizer, learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc")],
    )
    return model


def _feature_batches_class() -> type:
    """A ``keras.utils.PyDataset`` over cached features that uses copy ``epoch mod C``."""
    import keras  # noqa: PLC0415

    class FeatureBatches(keras.utils.PyDataset):
        def __init__(
            self, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0, first_epoch: int = 0
        ):
            super().__init__()
            self.features, self.labels = features, labels.astype(np.float32)
            self.batch_size = int(batch_size)
            self.epoch = int(first_epoch)
            self.rng = np.random.default_rng(seed + first_epoch)
            self.order = self.rng.permutation(len(labels))

        def __len__(self) -> int:
            return math.ceil(len(self.labels) / self.batch_size)

        def __getitem__(self, index: int):
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            return self.features[self.epoch % len(self.features)][rows], self.labels[rows]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self.rng.permutation(len(self.labels))

    return FeatureBatches


_FeatureBatches = functools.cache(_feature_batches_class)


# --------------------------------------------------------------------------------------------
# The hypermodel
# --------------------------------------------------------------------------------------------
class _VGGHyperModelMethods:
    """A KerasTuner ``HyperModel`` for VGG16 transfer learning, trained on cached features.

    ``build(hp)`` returns the compiled **head** (:func:`build_head`; KerasTuner's checkpoints
    and Hyperband's continued trials are then a few kB). ``fit(hp, head, data, epochs=...)``
    trains it on the :class:`FeatureCache` of ``data`` (phase 1) and, when ``unfreeze_blocks >
    0``, fine-tunes the full classifier on images (phase 2); it returns ``{"val_auc": best of
    both phases, "val_auc_head": ..., "val_auc_finetune": ...}``.

    Parameters
    ----------
    image_size : int
        Side ``S`` of the images, pixels (>= 32).
    weights : see :func:`pretrained.resolve_vgg16_weights`, default "auto"
        Resolved once, so every trial uses the same base.
    feature_cache : FeatureCache, optional
        Default: a memory-only cache with ``copies`` and ``seed``.
    seed : int, default 0
    copies : int, default :data:`DEFAULT_COPIES`
    head_units, optimizers, unfreeze_blocks, batch_sizes : sequences
        Choices of the search space.
    dropout, lr_head, lr_finetune : (low, high)
        Ranges (learning rates sampled on a log scale).
    strengths : sequence of float, default :data:`CACHED_STRENGTHS`
        Choices of ``augment_strength``; each gets its own cached features.
    finetune_fraction : float, default 0.5
        Phase 2 runs ``ceil(finetune_fraction x epochs)`` epochs of a trial's budget.
    class_weight : bool, default True
        Balance the classes with :func:`models.class_weights_from_labels`.
    distribution_strategy : tf.distribute.Strategy, optional
        Scope for the full model of phase 2 (the tuner scopes ``build``).
    fault_hook : callable, optional
        **Test-only**: called with the trial's hyperparameter values at the start of ``fit``;
        when it returns True, ``fit`` raises ``RuntimeError`` (to test failed-trial handling).
    """

    def __init__(
        self,
        image_size: int,
        weights: str | os.PathLike | pretrained.WeightsInfo | None = "auto",
        *,
        feature_cache: FeatureCache | None = None,
        seed: int = 0,
        copies: int = DEFAULT_COPIES,
        head_units: Sequence[int] = (64, 128, 256),
        dropout: tuple[float, float] = (0.2, 0.6),
        optimizers: Sequence[str] = ("adam", "sgd", "rmsprop"),
        lr_head: tuple[float, float] = (1e-4, 3e-3),
        lr_finetune: tuple[float, float] = (1e-5, 3e-4),
        unfreeze_blocks: Sequence[int] = (0, 1, 2, 3),
        strengths: Sequence[float] = CACHED_STRENGTHS,
        batch_sizes: Sequence[int] = (16, 32, 64),
        finetune_fraction: float = 0.5,
        class_weight: bool = True,
        distribution_strategy: tf.distribute.Strategy | None = None,
        fault_hook: Callable[[dict], bool] | None = None,
        name: str = "vgg16_transfer",
    ):
        super().__init__(name=name, tunable=True)
        self.image_size = _positive_int("image_size", image_size, minimum=pretrained.VGG16_MIN_SIZE)
        self.seed = _positive_int("seed", seed, minimum=0)
        if feature_cache is None:
            feature_cache = FeatureCache(self.image_size, weights, copies=copies, seed=self.seed)
        elif feature_cache.image_size != self.image_size:
            raise ValueError(
                f"feature_cache is for {feature_cache.image_size} px images, the hypermodel for {self.image_size} px"
            )
        elif (
            not (isinstance(weights, str) and weights == "auto")
            and pretrained.resolve_vgg16_weights(weights) != feature_cache.weights_info
        ):
            raise ValueError(
                f"weights {weights!r} differ from the feature cache's ({feature_cache.weights_info.description})"
            )
        self.feature_cache = feature_cache
        self.weights_info = feature_cache.weights_info
        self.head_units = [_positive_int("head_units choice", u) for u in head_units]
        self.dropout = self._range("dropout", dropout, 0.0, 0.95)
        self.optimizers = [str(o).strip().lower() for o in optimizers]
        for o in self.optimizers:
            vggnet.make_optimizer(o)  # raises ValueError for an unknown name
        self.lr_head = self._range("lr_head", lr_head, 1e-8, 1.0)
        self.lr_finetune = self._range("lr_finetune", lr_finetune, 1e-9, 1.0)
        self.unfreeze_blocks = [int(b) for b in unfreeze_blocks]
        if not self.unfreeze_blocks or any(not 0 <= b <= 5 for b in self.unfreeze_blocks):
            raise ValueError(f"unfreeze_blocks choices must be 0-5, got {list(unfreeze_blocks)!r}")
        self.strengths = [_strength(s) for s in strengths]
        self.batch_sizes = [_positive_int("batch_sizes choice", b) for b in batch_sizes]
        for name_, choices in (
            ("head_units", self.head_units),
            ("optimizers", self.optimizers),
            ("strengths", self.strengths),
            ("batch_sizes", self.batch_sizes),
        ):
            if not choices:
                raise ValueError(f"{name_} needs at least one choice")
        self.finetune_fraction = float(finetune_fraction)
        if not 0.0 < self.finetune_fraction <= 4.0:
            raise ValueError(f"finetune_fraction must be in (0, 4], got {finetune_fraction!r}")
        self.class_weight = bool(class_weight)
        self.distribution_strategy = distribution_strategy
        self.fault_hook = fault_hook

    @staticmethod
    def _range(name: str, pair: tuple[float, float], lowest: float, highest: float) -> tuple[float, float]:
        lo, hi = (float(v) for v in pair)
        if not (lowest <= lo <= hi <= highest):
            raise ValueError(f"{name} must be (low, high) with {lowest:g} <= low <= high <= {highest:g}, got {pair!r}")
        return lo, hi

    # -- the search space ----------------------------------------------------------------
    def space(self) -> dict:
        """The search space as plain data (recorded in ``search_settings.json``)."""
        return {
            "head_units": self.head_units,
            "dropout": list(self.dropout),
            "optimizer": self.optimizers,
            "lr_head": list(self.lr_head),
            "unfreeze_blocks": self.unfreeze_blocks,
            "lr_finetune": list(self.lr_finetune),
            "augment_strength": self.strengths,
            "batch_size": self.batch_sizes,
            "finetune_fraction": self.finetune_fraction,
            "copies": self.feature_cache.copies,
            "class_weight": self.class_weight,
        }

    def hyperparameter_values(self, hp: keras_tuner.HyperParameters) -> dict:
        """Declare the space in ``hp`` (first call) and return this trial's values.

        ``lr_finetune`` is active only when ``unfreeze_blocks > 0`` (None otherwise).
        """
        values = {
            "head_units": hp.Choice("head_units", self.head_units),
            "dropout": hp.Float(
                "dropout", *self.dropout, step=0.1 if self.dropout[1] - self.dropout[0] >= 0.1 else None
            ),
            "optimizer": hp.Choice("optimizer", self.optimizers),
            "lr_head": hp.Float("lr_head", *self.lr_head, sampling="log"),
            "unfreeze_blocks": hp.Choice("unfreeze_blocks", self.unfreeze_blocks),
            "lr_finetune": None,
        }
        unfrozen = [b for b in self.unfreeze_blocks if b > 0]
        if unfrozen:
            with hp.conditional_scope("unfreeze_blocks", unfrozen):
                lr = hp.Float("lr_finetune", *self.lr_finetune, sampling="log")
            values["lr_finetune"] = lr if values["unfreeze_blocks"] > 0 else None
        values["augment_strength"] = hp.Choice("augment_strength", self.strengths)
        values["batch_size"] = hp.Choice("batch_size", self.batch_sizes)
        return values

    # -- KerasTuner's two methods ----------------------------------------------------------
    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """The compiled head for this trial's ``head_units``, ``dropout``, ``optimizer`` and
        ``lr_head`` (:func:`build_head`, :func:`compile_for_search`)."""
        values = self.hyperparameter_values(hp)
        head = build_head(values["head_units"], values["dropout"])
        return compile_for_search(head, values["lr_head"], values["optimizer"])

    def fit(
        self,
        hp: keras_tuner.HyperParameters,
        model: keras.Model,
        data: TuningData,
        *,
        epochs: int = 1,
        initial_epoch: int = 0,
        callbacks: list | None = None,
        verbose: int | str = 0,
    ) -> dict[str, float]:
        """Train one trial: the head on cached features, then (if unfrozen) the full model.

        Parameters
        ----------
        hp : keras_tuner.HyperParameters
        model : keras.Model
            The head from :meth:`build` (Hyperband may have loaded an earlier trial's weights).
        data : TuningData
        epochs, initial_epoch : int
            The trial's epoch budget (Hyperband continues trials from ``initial_epoch``).
        callbacks : list, optional
            KerasTuner's callbacks; they watch phase 1 (its checkpoint is the head).
        verbose : int or "auto"

        Returns
        -------
        dict
            ``val_auc`` (the objective: the best epoch of both phases), ``val_auc_head`` and,
            after phase 2, ``val_auc_finetune``.
        """
        values = self.hyperparameter_values(hp)
        if self.fault_hook is not None and self.fault_hook(dict(hp.values)):
            raise RuntimeError(f"fault_hook rejected the hyperparameters {dict(hp.values)} (test-only fault injection)")
        epochs = _positive_int("epochs", epochs)
        initial_epoch = _positive_int("initial_epoch", initial_epoch, minimum=0)
        if initial_epoch >= epochs:
            raise ValueError(f"initial_epoch ({initial_epoch}) must be < epochs ({epochs})")
        x_train, y_train, x_val, y_val = data.arrays()
        batch, strength = int(values["batch_size"]), float(values["augment_strength"])
        class_weight = models.class_weights_from_labels(y_train) if self.class_weight else None
        try:
            train_feats = self.feature_cache.get(x_train, strength, fingerprint=data.train_fingerprint)
            val_feats = self.feature_cache.get(x_val, 0.0, fingerprint=data.val_fingerprint)[0]
        finally:
            self.feature_cache.release()
        batches = _FeatureBatches()(train_feats, y_train, batch, seed=self.seed, first_epoch=initial_epoch)
        history = model.fit(
            batches,
            validation_data=(val_feats, y_val.astype(np.float32)),
            batch_size=None,
            epochs=epochs,
            initial_epoch=initial_epoch,
            class_weight=class_weight,
            callbacks=callbacks or [],
            verbose=verbose,
        )
        head_auc = _best(history.history.get(OBJECTIVE, []))
        result = {OBJECTIVE: head_auc, "val_auc_head": head_auc}
        if values["unfreeze_blocks"] > 0:
            finetune_epochs = math.ceil((epochs - initial_epoch) * self.finetune_fraction)
            full = self.build_full_model(values)
            try:
                transplant_head(model, full)
                vggnet.set_vgg_trainable(full, values["unfreeze_blocks"])
                with self._scope():
                    compile_for_search(full, values["lr_finetune"], values["optimizer"])
                train_ds = _image_dataset(
                    x_train, y_train, batch, training=True, augment_strength=strength, seed=self.seed
                )
                val_ds = _image_dataset(x_val, y_val, batch, training=False)
                h2 = full.fit(
                    train_ds,
                    validation_data=val_ds,
                    epochs=finetune_epochs,
                    class_weight=class_weight,
                    shuffle=False,
                    verbose=verbose,
                )
            finally:
                del full
                gc.collect()
            tuned_auc = _best(h2.history.get(OBJECTIVE, []))
            result["val_auc_finetune"] = tuned_auc
            result[OBJECTIVE] = float(np.nanmax([head_auc, tuned_auc]))
        return result

    # -- helpers ---------------------------------------------------------------------------
    def _scope(self):
        import contextlib  # noqa: PLC0415

        if self.distribution_strategy is None:
            return contextlib.nullcontext()
        return self.distribution_strategy.scope()

    def build_full_model(self, values: dict | keras_tuner.HyperParameters) -> keras.Model:
        """The full classifier (base frozen) with this trial's ``head_units`` and ``dropout``,
        on the same base weights as the feature cache. Not compiled."""
        if not isinstance(values, dict):
            values = self.hyperparameter_values(values)
        with self._scope():
            return _build_classifier(
                self.image_size,
                self.weights_info,
                self.seed,
                head_units=int(values["head_units"]),
                dropout=float(values["dropout"]),
            )


def _best(scores: Sequence[float]) -> float:
    finite = [float(s) for s in scores if s is not None and np.isfinite(s)]
    return max(finite) if finite else float("nan")


@functools.cache
def _vgg_hypermodel_class() -> type:
    """Create (once) ``VGGHyperModel``, a subclass of ``keras_tuner.HyperModel``."""
    import keras_tuner  # noqa: PLC0415

    cls = type(
        "VGGHyperModel",
        (_VGGHyperModelMethods, keras_tuner.HyperModel),
        {"__doc__": _VGGHyperModelMethods.__doc__, "__module__": __name__},
    )
    return cls


def __getattr__(name: str):
    """Create :class:`VGGHyperModel` on first access (keeps ``import`` free of KerasTuner)."""
    if name == "VGGHyperModel":
        return _vgg_hypermodel_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hyperparameters_from_values(hypermodel: Any, values: dict) -> keras_tuner.HyperParameters:
    """A ``keras_tuner.HyperParameters`` with the space of ``hypermodel`` and the given values.

    Names not given keep their defaults; unknown names raise ``ValueError``.
    """
    import keras_tuner  # noqa: PLC0415

    hp = keras_tuner.HyperParameters()
    hypermodel.hyperparameter_values(hp)
    known = {p.name for p in hp.space}
    unknown = sorted(set(values) - known - {k for k in values if k.startswith("tuner/")})
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; the space has {sorted(known)}")
    hp.values.update({k: v for k, v in values.items() if k in known and v is not None})
    return hp


# --------------------------------------------------------------------------------------------
# Tuners
# --------------------------------------------------------------------------------------------
class _TrialBookkeeping:
    """Tuner mix-in: time each trial, note who ran it (``trial_<id>/run.json``), and free
    memory afterwards (``keras.backend.clear_session()`` + ``gc.collect()``)."""

    def on_trial_begin(self, trial):
        self._trial_started = time.perf_counter()
        super().on_trial_begin(trial)

    def _build_hypermodel(self, hp):
        # Hyperband continues a trial by loading the earlier trial's head weights into a newly
        # compiled head; the optimizer starts afresh (as in KerasTuner), and Keras says so.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return super()._build_hypermodel(hp)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # KerasTuner (TensorFlow backend) imports `tensorboard` here even when no TensorBoard
        # callback is used; TensorFlow >= 2.20 no longer installs it. Only call it when needed.
        if any(type(c).__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def on_trial_end(self, trial):
        import keras  # noqa: PLC0415

        seconds = time.perf_counter() - getattr(self, "_trial_started", time.perf_counter())
        try:
            _write_json(
                Path(self.get_trial_dir(trial.trial_id)) / RUN_FILE,
                {
                    "trial_id": trial.trial_id,
                    "tuner_id": self.tuner_id,
                    "seconds": seconds,
                    "status": trial.status,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                },
            )
            super().on_trial_end(trial)
        finally:
            keras.backend.clear_session()
            gc.collect()


@functools.cache
def _tuner_class(kind: str) -> type:
    import keras_tuner  # noqa: PLC0415

    base = {
        "hyperband": keras_tuner.Hyperband,
        "bayesian": keras_tuner.BayesianOptimization,
        "random": keras_tuner.RandomSearch,
    }[kind]
    return type(f"VGG{base.__name__}", (_TrialBookkeeping, base), {"__module__": __name__})


def _check_kind(kind: str) -> str:
    key = str(kind).strip().lower()
    if key not in TUNER_KINDS:
        raise ValueError(f"unknown tuner kind {kind!r}; choose one of {', '.join(TUNER_KINDS)}")
    return key


def make_tuner(
    hypermodel: Any,
    kind: str = "hyperband",
    *,
    project_dir: str | os.PathLike,
    max_trials: int | None = None,
    max_epochs: int = 6,
    seed: int = 0,
    distribution_strategy: tf.distribute.Strategy | None = None,
    max_consecutive_failed_trials: int = 3,
    overwrite: bool = False,
    hyperband_factor: int = 3,
) -> keras_tuner.Tuner:
    """A KerasTuner tuner maximising ``val_auc``, with per-trial timing and memory release.

    Parameters
    ----------
    hypermodel : VGGHyperModel (or any ``keras_tuner.HyperModel``)
    kind : {"hyperband", "bayesian", "random"}, default "hyperband"
        ``Hyperband`` (many short trials, the best continued for longer),
        ``BayesianOptimization`` (a Gaussian process proposes the next trial) or
        ``RandomSearch``.
    project_dir : str or PathLike
        The project folder (KerasTuner's ``directory/project_name``).
    max_trials : int, optional
        Trial budget. Required for "bayesian" and "random"; for "hyperband" a cap on top of
        the trials its brackets schedule.
    max_epochs : int, default 6
        Hyperband's largest per-trial budget (other kinds get ``epochs`` from ``search``).
    seed : int, default 0
    distribution_strategy : tf.distribute.Strategy, optional
        Each trial's model is built under it (see :func:`default_distribution_strategy`).
    max_consecutive_failed_trials : int, default 3
        The search stops (``RuntimeError``) after this many failed trials in a row.
    overwrite : bool, default False
        KerasTuner's own flag; :func:`run_search` handles fresh/resume itself.
    hyperband_factor : int, default 3

    Returns
    -------
    keras_tuner.Tuner
    """
    import keras_tuner  # noqa: PLC0415

    key = _check_kind(kind)
    folder = Path(project_dir)
    common = dict(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"),
        seed=int(seed),
        directory=str(folder.parent) or ".",
        project_name=folder.name,
        overwrite=bool(overwrite),
        distribution_strategy=distribution_strategy,
        max_consecutive_failed_trials=_positive_int("max_consecutive_failed_trials", max_consecutive_failed_trials),
    )
    if key == "hyperband":
        tuner = _tuner_class(key)(
            max_epochs=_positive_int("max_epochs", max_epochs),
            factor=_positive_int("hyperband_factor", hyperband_factor, 2),
            **common,
        )
        if max_trials is not None:
            tuner.oracle.max_trials = _positive_int("max_trials", max_trials)
        return tuner
    if max_trials is None:
        raise ValueError(f"kind={key!r} needs max_trials")
    trials = _positive_int("max_trials", max_trials)
    if key == "bayesian":
        return _tuner_class(key)(max_trials=trials, num_initial_points=max(2, trials // 3), **common)
    return _tuner_class(key)(max_trials=trials, **common)


def default_distribution_strategy() -> tf.distribute.Strategy | None:
    """``tf.distribute.MirroredStrategy()`` when TensorFlow sees more than one GPU, else None
    (one GPU or a CPU needs no strategy)."""
    import tensorflow as tf  # noqa: PLC0415

    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return None


# --------------------------------------------------------------------------------------------
# Explicit project state
# --------------------------------------------------------------------------------------------
def search_settings(hypermodel: Any, data: TuningData, kind: str, epochs: int) -> dict:
    """What makes two searches comparable, as written to ``search_settings.json``.

    Compared on resume: ``space_version``, ``kind``, ``objective``, ``image_size``,
    ``crop_roi``, ``weights_source``, ``weights_file``, ``data_fingerprint``, ``epochs``,
    ``space``. Recorded only: ``weights`` (full provenance), ``n_train``, ``n_val``, ``created``
    (and what :func:`run_search` adds: ``seed``, ``max_trials``, ``profile``, ``versions``).
    """
    info = hypermodel.weights_info
    return {
        "space_version": SPACE_VERSION,
        "kind": _check_kind(kind),
        "objective": OBJECTIVE,
        "image_size": int(hypermodel.image_size),
        "crop_roi": bool(data.crop_roi),
        "weights_source": info.source,
        "weights_file": os.path.basename(info.path) if info.path else None,
        "data_fingerprint": data.fingerprint,
        "epochs": int(epochs),
        "space": hypermodel.space(),
        "weights": info.as_dict(),
        "n_train": data.n_train,
        "n_val": data.n_val,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _settings_differences(recorded: dict, current: dict) -> list[str]:
    current = json.loads(json.dumps(current, default=str))  # tuples -> lists, as recorded
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key in _UNCOMPARED_SETTINGS:
            continue
        old, new = recorded.get(key, "<missing>"), current.get(key, "<missing>")
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub) != new.get(sub):
                    out.append(f"{key}.{sub}: recorded {old.get(sub)!r}, now {new.get(sub)!r}")
        else:
            out.append(f"{key}: recorded {old!r}, now {new!r}")
    return out


def _check_settings(project: Path, current: dict, *, what: str) -> None:
    path = project / SETTINGS_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; use mode='fresh' to start over") from exc
    diffs = _settings_differences(recorded, current)
    if diffs:
        raise ValueError(
            f"cannot {what} the search in {project}: its {SETTINGS_FILE} differs from this run:\n  "
            + "\n  ".join(diffs)
            + f"\nUse mode='fresh' to start over (this deletes {project}) or another project_dir."
        )


def _check_deletable(project: Path) -> None:
    """Refuse to wipe a folder that is neither empty nor a tuner project (a mistyped path)."""
    if not project.is_dir():
        raise ValueError(f"project_dir {project} exists and is not a folder")
    entries = list(project.iterdir())
    markers = {SETTINGS_FILE, RESULTS_FILE, "oracle.json"}
    if entries and not any(e.name in markers or e.name.startswith(("trial_", "tuner")) for e in entries):
        raise ValueError(
            f"refusing to delete {project}: it does not look like a tuner project "
            f"(no {SETTINGS_FILE}, oracle.json or trial_* folders); choose another "
            "project_dir"
        )


def _role() -> str:
    """ "chief", "worker" or "single", from KerasTuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def run_search(
    manifest: pd.DataFrame,
    profile: str | config.Profile | None = None,
    *,
    project_dir: str | os.PathLike | None = None,
    mode: str = "fresh",
    kind: str = "hyperband",
    max_trials: int | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    weights: str | os.PathLike | pretrained.WeightsInfo | None = "auto",
    crop_roi: bool = False,
    copies: int = DEFAULT_COPIES,
    cache_dir: str | os.PathLike | None | bool = True,
    distribution_strategy: Any = "auto",
    mixed_precision: bool | str = "auto",
    max_consecutive_failed_trials: int = 3,
    hypermodel_options: dict | None = None,
    fault_hook: Callable[[dict], bool] | None = None,
    verbose: int | str = 0,
) -> pd.DataFrame:
    """Run (or resume, or join as a distributed worker) a hyperparameter search.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns path, label, split; the ``train`` rows train, the ``val`` rows score.
    profile : str or Profile, optional
        Supplies ``image_size``, ``tuner_trials`` and ``tuner_epochs`` unless given.
    project_dir : str or PathLike, optional
        Default ``<artifacts>/tuner/vgg16_<kind>``.
    mode : {"fresh", "resume"}, default "fresh"
        ``"fresh"`` deletes ``project_dir`` first (only an empty folder or a tuner project: one
        holding ``search_settings.json``, ``oracle.json`` or ``trial_*``). ``"resume"``
        continues it (up to ``max_trials`` trials in all) if its ``search_settings.json``
        matches this run.
    kind : {"hyperband", "bayesian", "random"}, default "hyperband"
    max_trials : int, optional
        Default ``profile.tuner_trials``.
    epochs : int, optional
        Epochs per trial (Hyperband: the largest budget); default ``profile.tuner_epochs``.
    image_size : int, optional
        Default ``profile.image_size``.
    seed : int, default 0
        Seeds Python, NumPy and Keras (:func:`config.set_seed`) and the tuner.
    weights : see :func:`pretrained.resolve_vgg16_weights`, default "auto"
    crop_roi : bool, default False
    copies : int, default :data:`DEFAULT_COPIES`
        Augmented copies cached per strength.
    cache_dir : path, True or None/False, default True
        Where the :class:`FeatureCache` keeps ``.npz`` files; True: ``<artifacts>/tuner/cache``.
    distribution_strategy : tf.distribute.Strategy, "auto" or None
        "auto": :func:`default_distribution_strategy`.
    mixed_precision : "auto" or bool, default "auto"
        "auto" (or True): 16-bit compute during the search where it is native
        (:func:`hardware.enable_mixed_precision`: float16 on a GPU, bfloat16 on a CPU with
        AVX512-BF16/AMX, float32 elsewhere); False: keep Keras's current policy. The previous
        global policy is restored when the search ends.
    max_consecutive_failed_trials : int, default 3
    hypermodel_options : dict, optional
        More keyword arguments for :class:`VGGHyperModel` (e.g. smaller choice lists).
    fault_hook : callable, optional
        Test-only, see :class:`VGGHyperModel`.
    verbose : int or "auto", default 0

    Returns
    -------
    pandas.DataFrame
        :func:`results_table` of the project (also saved as ``results.csv`` by the chief or a
        single process; a worker returns what is on disk so far and writes nothing).

    Raises
    ------
    ValueError
        Unknown ``mode``/``kind``; a manifest without train/val rows; ``mode="resume"`` (or a
        worker) when the recorded settings differ - the message lists each difference.
    FileNotFoundError
        ``mode="resume"`` with no project to resume.
    RuntimeError
        When ``max_consecutive_failed_trials`` trials failed in a row (``results.csv`` is
        written first).
    """
    if mode not in ("fresh", "resume"):
        raise ValueError(f"mode must be 'fresh' or 'resume', got {mode!r}")
    key = _check_kind(kind)
    prof = _profile(profile)
    size = _positive_int(
        "image_size", image_size if image_size is not None else prof.image_size, minimum=pretrained.VGG16_MIN_SIZE
    )
    trials = _positive_int("max_trials", max_trials if max_trials is not None else prof.tuner_trials)
    n_epochs = _positive_int("epochs", epochs if epochs is not None else prof.tuner_epochs)
    seed = _positive_int("seed", seed, minimum=0)
    project = Path(project_dir) if project_dir is not None else config.artifacts_dir() / "tuner" / f"vgg16_{key}"
    if cache_dir is True:
        cache_dir = config.artifacts_dir() / "tuner" / "cache"
    role = _role()

    # Everything cheap first, so a mismatch is reported before anything is loaded or trained.
    data = TuningData.from_manifest(manifest, size, crop_roi=crop_roi)
    cache = FeatureCache(size, weights, copies=copies, seed=seed, cache_dir=cache_dir or None)
    options = dict(hypermodel_options or {})
    hypermodel = _vgg_hypermodel_class()(
        size, cache.weights_info, feature_cache=cache, seed=seed, fault_hook=fault_hook, **options
    )
    settings = search_settings(hypermodel, data, key, n_epochs)
    if role == "worker":
        if (project / SETTINGS_FILE).is_file():
            _check_settings(project, settings, what="join")
    elif mode == "resume":
        if not (project / SETTINGS_FILE).is_file():
            raise FileNotFoundError(
                f"nothing to resume: no {SETTINGS_FILE} in {project}; use mode='fresh' to start a search there"
            )
        _check_settings(project, settings, what="resume")
    elif project.exists():
        _check_deletable(project)
        shutil.rmtree(project)
    if role != "worker":
        project.mkdir(parents=True, exist_ok=True)
        settings.update(seed=seed, max_trials=trials, profile=prof.name, versions=_versions())
        if mode == "resume":
            recorded = json.loads((project / SETTINGS_FILE).read_text(encoding="utf-8"))
            settings.update(created=recorded.get("created"), resumed=settings["created"])
        _write_json(project / SETTINGS_FILE, settings)

    import keras  # noqa: PLC0415

    config.set_seed(seed)
    policy = keras.mixed_precision.global_policy()
    try:
        if mixed_precision and role != "chief":
            hardware.enable_mixed_precision()
        strategy = default_distribution_strategy() if distribution_strategy == "auto" else distribution_strategy
        hypermodel.distribution_strategy = strategy
        tuner = make_tuner(
            hypermodel,
            key,
            project_dir=project,
            max_trials=trials,
            max_epochs=n_epochs,
            seed=seed,
            distribution_strategy=strategy,
            max_consecutive_failed_trials=max_consecutive_failed_trials,
        )
        tuner.search(data, epochs=n_epochs, verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(policy)  # leave Keras as we found it
        if role != "worker":
            results_table(project).to_csv(project / RESULTS_FILE, index=False)
    return results_table(project)


def _versions() -> dict:
    out = {}
    for name in ("tensorflow", "keras", "keras-tuner", "numpy"):
        out[name] = modelbundle._package_version(name)
    return out


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def _read_trials(project: Path) -> list[dict]:
    trials = []
    for path in sorted(project.glob("trial_*/trial.json")):
        try:
            trials.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # being written by another process
    return trials


def results_table(project_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per trial of a project, read from its files (works for any process).

    Returns
    -------
    pandas.DataFrame
        ``trial_id``, ``status`` (COMPLETED, FAILED, RUNNING, ...), ``score`` (best
        ``val_auc``; NaN unless completed), ``seconds`` (wall time of the trial),
        ``tuner_id`` (who ran it), one column per hyperparameter (Hyperband's ``tuner/...``
        bookkeeping included), and ``error`` (last line of the traceback of a failed trial).

    Raises
    ------
    FileNotFoundError
        If ``project_dir`` does not exist.
    """
    import pandas as pd  # noqa: PLC0415

    project = Path(project_dir)
    if not project.is_dir():
        raise FileNotFoundError(f"no tuner project folder {project}; run run_search first")
    rows, hp_names = [], []
    for trial in _read_trials(project):
        tid = str(trial.get("trial_id"))
        run_path = project / f"trial_{tid}" / RUN_FILE
        run = {}
        if run_path.is_file():
            try:
                run = json.loads(run_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                run = {}
        values = {
            k: float(f"{v:.12g}") if isinstance(v, float) else v  # 0.30000000000000004 -> 0.3
            for k, v in ((trial.get("hyperparameters") or {}).get("values") or {}).items()
        }
        for name in values:
            if name not in hp_names:
                hp_names.append(name)
        message = (trial.get("message") or "").strip().splitlines()
        score = trial.get("score")
        rows.append(
            {
                "trial_id": tid,
                "status": trial.get("status"),
                "score": float(score) if score is not None else float("nan"),
                "seconds": float(run["seconds"]) if "seconds" in run else float("nan"),
                "tuner_id": run.get("tuner_id"),
                **values,
                "error": message[-1] if message else None,
            }
        )
    hp_names = (
        [n for n in HYPERPARAMETERS if n in hp_names]
        + [n for n in hp_names if n not in HYPERPARAMETERS and not n.startswith("tuner/")]
        + [n for n in hp_names if n.startswith("tuner/")]
    )
    columns = ["trial_id", "status", "score", "seconds", "tuner_id", *hp_names, "error"]
    table = pd.DataFrame(rows, columns=columns)
    order = sorted(range(len(table)), key=lambda i: _trial_order(table["trial_id"].iloc[i]))
    return table.iloc[order].reset_index(drop=True)


def _trial_order(trial_id: str) -> tuple:
    """Sort trial ids as numbers ("9" before "10"), whatever their zero padding."""
    return (0, int(trial_id), trial_id) if str(trial_id).isdigit() else (1, 0, str(trial_id))


def best_hyperparameters(project_dir: str | os.PathLike) -> tuple[dict, dict]:
    """The hyperparameter values of the best completed trial and the project's settings.

    Returns
    -------
    values : dict
        Without Hyperband's ``tuner/...`` entries; ``lr_finetune`` None when not fine-tuned.
    settings : dict
        The contents of ``search_settings.json``.

    Raises
    ------
    FileNotFoundError
        If the project or its settings are missing.
    ValueError
        If no trial completed.
    """
    project = Path(project_dir)
    settings_path = project / SETTINGS_FILE
    if not settings_path.is_file():
        raise FileNotFoundError(f"no {SETTINGS_FILE} in {project}: not a project of run_search")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    completed = [
        t
        for t in _read_trials(project)
        if t.get("status") == "COMPLETED" and t.get("score") is not None and np.isfinite(t["score"])
    ]
    if not completed:
        raise ValueError(f"no completed trial in {project}; run (or resume) the search first")
    best = sorted(completed, key=lambda t: (-float(t["score"]), str(t["trial_id"])))[0]
    values = {k: v for k, v in best["hyperparameters"]["values"].items() if not k.startswith("tuner/")}
    values.setdefault("lr_finetune", None)
    values["trial_id"] = best["trial_id"]
    values["score"] = float(best["score"])
    return values, settings


def best_model(
    tuner_or_project: Any,
    manifest: pd.DataFrame,
    profile: str | config.Profile | None = None,
    *,
    epochs_head: int | None = None,
    epochs_finetune: int | None = None,
    out_dir: str | os.PathLike | None = None,
    patience: int = 5,
    verbose: int | str = 0,
    head_from_search: bool = False,
    unfreeze_blocks: int | None = None,
    lr_finetune: float | None = None,
    optimizer: str | None = None,
) -> tuple[keras.Model, dict, dict]:
    """Retrain the best trial's hyperparameters as a full VGG16 classifier on full images.

    With ``head_from_search=True`` phase 1 is not repeated: the best trial's head (trained on
    the cached features, saved in its checkpoint) is transplanted into the classifier and only
    phase 2 (fine-tuning on images) runs — on a CPU this saves ``epochs_head`` passes of VGG16
    over the training images. ``unfreeze_blocks`` and ``lr_finetune`` override the trial's values
    and ``optimizer`` (e.g. a CPU search over frozen-base heads only, followed by one fine-tuning
    of the best head with Adam: a head searched with SGD at a rate right for a head is not
    what fine-tunes three blocks of VGG16 well).

    The image size, weights (and the seed of a random base) come from the project's
    ``search_settings.json``. Training is :func:`vggnet.train_two_phase` on
    :func:`pipeline.make_dataset` batches of the manifest's train/val rows, with the trial's
    batch size, augmentation strength, optimizer, learning rates and unfrozen blocks (phase 2
    is skipped when ``unfreeze_blocks == 0``), and balanced class weights.

    Parameters
    ----------
    tuner_or_project : keras_tuner.Tuner or str or PathLike
        A tuner from :func:`make_tuner`/:func:`run_search`, or its project folder.
    manifest : pandas.DataFrame
        Columns path, label, split.
    profile : str or Profile, optional
        Supplies ``epochs_head`` and ``epochs_finetune`` unless given.
    out_dir : str or PathLike, optional
        ``best.keras`` and ``history.csv`` (see :func:`models.standard_callbacks`).
    patience : int, default 5
    verbose : int or "auto", default 0

    Returns
    -------
    model : keras.Model
        Input ``(B, S, S, 1)`` in [0, 1], output ``(B, 1)`` fracture probability.
    values : dict
        The hyperparameters used, plus ``trial_id`` and ``score`` (the trial's ``val_auc``).
    history : dict
        From :func:`vggnet.train_two_phase`.
    """
    project = Path(getattr(tuner_or_project, "project_dir", tuner_or_project))
    values, settings = best_hyperparameters(project)
    prof = _profile(profile)
    train, val = _train_val(manifest)
    size = int(settings["image_size"])
    info = pretrained.WeightsInfo(**settings["weights"])
    model = _build_classifier(
        size, info, int(settings.get("seed", 0)), head_units=int(values["head_units"]), dropout=float(values["dropout"])
    )
    batch = int(values["batch_size"])
    strength = float(values["augment_strength"])
    crop = bool(settings.get("crop_roi", False))
    seed = int(settings.get("seed", 0))
    train_ds = pipeline.make_dataset(
        train, size, batch, training=True, augment_strength=strength, crop_roi=crop, seed=seed
    )
    val_ds = pipeline.make_dataset(val, size, batch, training=False, crop_roi=crop)
    unfreeze = int(values["unfreeze_blocks"] if unfreeze_blocks is None else unfreeze_blocks)
    values = {**values, "unfreeze_blocks": unfreeze}
    if lr_finetune is not None:
        values["lr_finetune"] = float(lr_finetune)
    if optimizer is not None:
        vggnet.make_optimizer(optimizer)  # a clear error for an unknown name, before any work
        values["optimizer"] = str(optimizer).strip().lower()
    n_head = epochs_head if epochs_head is not None else prof.epochs_head
    n_tune = epochs_finetune if epochs_finetune is not None else prof.epochs_finetune
    n_tune = n_tune if unfreeze else 0
    if head_from_search:
        checkpoint = project / f"trial_{values['trial_id']}" / "checkpoint.weights.h5"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"the best trial's head {checkpoint} is missing; rerun the search")
        head = build_head(int(values["head_units"]), float(values["dropout"]))
        head.load_weights(str(checkpoint))
        transplant_head(head, model)
        n_head = 0
        if not n_tune:  # the best trial kept the base frozen: the transplanted head is the model
            models.compile_binary_classifier(model, float(values["lr_head"]), str(values["optimizer"]))
            return model, values, {}
    class_weight = None
    if settings.get("space", {}).get("class_weight", True):
        labels = pipeline.label_to_int(train["label"].tolist())
        class_weight = models.class_weights_from_labels(labels)
    history = vggnet.train_two_phase(
        model,
        train_ds,
        val_ds,
        epochs_head=n_head,
        epochs_finetune=n_tune,
        lr_head=float(values["lr_head"]),
        lr_finetune=_finetune_rate(values),
        unfreeze_blocks=max(unfreeze, 1),
        optimizer=str(values["optimizer"]),
        class_weight=class_weight,
        out_dir=out_dir,
        patience=patience,
        verbose=verbose,
    )
    return model, values, history


def _finetune_rate(values: dict, default: float = 1e-5) -> float:
    """The trial's phase-2 learning rate; ``default`` when the trial did not fine-tune (the
    hyperparameter is inactive then: missing, None or NaN)."""
    rate = values.get("lr_finetune")
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(rate) or rate <= 0 else rate


# --------------------------------------------------------------------------------------------
# Command line: python -m cspine_utils.tuning
# --------------------------------------------------------------------------------------------
def _weights_arg(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "random") else text


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m cspine_utils.tuning",
        description="Hyperparameter search for the VGG16 classifier (single process, or the "
        "chief/a worker of a distributed KerasTuner search).",
    )
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (data.discover)")
    ap.add_argument("--profile", default=None, help="smoke, cpu or gpu (default CSPINE_PROFILE)")
    ap.add_argument("--project-dir", type=Path, default=None)
    ap.add_argument("--mode", choices=("fresh", "resume"), default="fresh")
    ap.add_argument("--kind", choices=TUNER_KINDS, default="hyperband")
    ap.add_argument("--max-trials", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument(
        "--weights", type=_weights_arg, default="auto", help="auto, imagenet, hed-bsds500, none, or a .h5 file"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-policy", default="auto", help="data.choose_split policy")
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="feature cache folder (default <artifacts>/tuner/cache)"
    )
    ap.add_argument("--role", choices=("single", "chief", "worker"), default="single")
    ap.add_argument("--tuner-id", default=None, help="worker id: tuner0, tuner1, ...")
    ap.add_argument("--oracle-ip", default="127.0.0.1")
    ap.add_argument("--oracle-port", type=int, default=8000)
    ap.add_argument("--verbose", type=int, default=0)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cspine_utils.tuning``; see the module docstring."""
    args = _parser().parse_args(argv)
    if args.role != "single":
        tuner_id = "chief" if args.role == "chief" else (args.tuner_id or "tuner0")
        if args.role == "worker" and "chief" in tuner_id:
            raise SystemExit("error: a worker's --tuner-id must not contain 'chief'")
        os.environ["KERASTUNER_TUNER_ID"] = tuner_id
        os.environ["KERASTUNER_ORACLE_IP"] = str(args.oracle_ip)
        os.environ["KERASTUNER_ORACLE_PORT"] = str(args.oracle_port)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import data  # noqa: PLC0415

    found = data.discover(args.data)
    manifest, message = data.choose_split(found.manifest, policy=args.split_policy, seed=args.seed)
    role = os.environ.get("KERASTUNER_TUNER_ID", "single") if args.role != "single" else "single"
    print(f"[{role}] {message}", flush=True)
    print(f"[{role}] {hardware.describe_device()}", flush=True)
    table = run_search(
        manifest,
        args.profile,
        project_dir=args.project_dir,
        mode=args.mode,
        kind=args.kind,
        max_trials=args.max_trials,
        epochs=args.epochs,
        image_size=args.image_size,
        seed=args.seed,
        weights=args.weights,
        cache_dir=args.cache_dir if args.cache_dir is not None else True,
        verbose=args.verbose,
    )
    done = table[table["status"] == "COMPLETED"]
    if args.role == "worker":
        mine = table[table["tuner_id"] == os.environ["KERASTUNER_TUNER_ID"]]
        print(f"[{role}] ran {len(mine)} trial(s)", flush=True)
    else:
        best = f"best val_auc {done['score'].max():.3f}" if len(done) else "no completed trial"
        print(f"[{role}] {len(table)} trial(s), {len(done)} completed, {best}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
