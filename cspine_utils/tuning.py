"""The course's speed-up of notebook 04's search: VGG16 heads searched on cached frozen-base features.

A frozen base computes the same features for an image in every trial: :class:`FeatureCache` runs it once (and
on ``copies`` seeded augmented copies per strength); :class:`VGGHyperModel` trains only the head on the pooled
``(N, 1024)`` features and, for ``unfreeze_blocks > 0``, fine-tunes the classifier on images. :func:`run_search`
records ``search_settings.json`` ("resume" continues equal settings only, where KerasTuner's own
``overwrite=False`` silently reloads any old project) and writes ``results.csv``.

Distributed search (KerasTuner's chief/worker mode): the *chief* serves the oracle over gRPC, *workers* ask
it for trials; ``--role``/``--tuner-id``/``--oracle-ip``/``--oracle-port`` set ``KERASTUNER_TUNER_ID``,
``KERASTUNER_ORACLE_IP`` and ``_PORT``. Start the chief, then the workers, with the same data, settings and
``--project-dir`` (shared across machines); a worker refuses different settings::

    python -m cspine_utils.tuning --role chief --oracle-ip 0.0.0.0 --data data/synthetic/cpu --kind random
    python -m cspine_utils.tuning --role worker --tuner-id tuner0 --oracle-ip CHIEF_HOST ... (the same)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import math
import os
import random
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import keras_tuner
import numpy as np
import pandas as pd
import tensorflow as tf

from . import config, course, hardware, modelbundle, pipeline, pretrained, records

FEATURE_DIM = 1024  # avg_pool: pooled block 4 (512) + block 5 (512)
SPACE_VERSION = 5  # bump when the search space changes meaning: older projects cannot be resumed
CACHED_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0)  # augmentation strengths with cached features
DEFAULT_COPIES = 2  # augmented copies cached per strength
TUNER_KINDS = ("hyperband", "bayesian", "random")
OBJECTIVE = "val_auc"
HYPERPARAMETERS = "head_units dropout optimizer lr_head unfreeze_blocks lr_finetune augment_strength batch_size".split()
SETTINGS_FILE, RESULTS_FILE, RUN_FILE = "search_settings.json", "results.csv", "run.json"
_UNCOMPARED = {"created", "resumed", "seed", "max_trials", "weights", "n_train", "n_val", "profile", "versions"}


_count = modelbundle._positive_int  # the bundle's integer check: "<name> must be an integer >= <minimum>"


def _strength(value: Any) -> float:
    s = float(value)
    if not np.isfinite(s) or not 0.0 <= s <= 2.0:
        raise ValueError(f"augmentation strength must be in [0, 2], got {value!r}")
    return s


def _train_val(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    missing = [c for c in ("path", "label", "split") if c not in getattr(manifest, "columns", ())]
    if missing:
        raise ValueError(f"manifest needs columns path, label and split; missing {missing} (see data.choose_split)")
    split = manifest["split"].astype(str).str.strip().str.lower()
    for name in ("train", "val"):
        if not (split == name).any():
            raise ValueError(f"manifest has no rows with split == {name!r}; splits found: {sorted(set(split))}")
    return manifest[split == "train"], manifest[split == "val"]


def _manifest_key(rows: pd.DataFrame) -> str:
    """:func:`modelbundle.manifest_fingerprint` relative to the files' common folder (a moved dataset,
    or one mounted elsewhere on a worker, keeps its fingerprint)."""
    paths = [os.path.abspath(str(p)) for p in rows["path"]]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return modelbundle.manifest_fingerprint(rows, root=root)


class TuningData:
    """The ``train``/``val`` rows of a manifest; ``arrays()`` decodes them on first use (a chief never does):
    ``(x_train, y_train, x_val, y_val)``, images ``(N, S, S, 1)`` float32 in [0, 1], labels ``(N,)`` int64."""

    def __init__(self, manifest: pd.DataFrame, image_size: int, crop_roi: bool = False):
        self.train_rows, self.val_rows = _train_val(manifest)
        self.image_size, self.crop_roi = _count("image_size", image_size), bool(crop_roi)
        self.train_fingerprint, self.val_fingerprint = _manifest_key(self.train_rows), _manifest_key(self.val_rows)
        self.fingerprint = records.sha256_text(self.train_fingerprint, self.val_fingerprint)
        self.n_train, self.n_val = len(self.train_rows), len(self.val_rows)
        self._arrays: tuple[np.ndarray, ...] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            rows = (self.train_rows, self.val_rows)
            self._arrays = sum((pipeline.load_arrays(r, self.image_size, crop_roi=self.crop_roi) for r in rows), ())
        return self._arrays


def image_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, training: bool, strength: float = 0.0, seed=0):
    """:func:`pipeline.shuffle_batch_augment` over images already in memory (no decoding per trial)."""
    ds = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y.astype(np.float32)))
    augment = strength if training else 0.0
    return pipeline.shuffle_batch_augment(ds, len(x), batch_size, shuffle=training, augment_strength=augment, seed=seed)


def build_classifier(image_size: int, info: pretrained.WeightsInfo, seed: int, head_units=128, dropout=0.4):
    """:func:`course.build_vgg16_classifier`; a random base is seeded first, so the feature cache, the
    fine-tuning trials and :func:`best_head_model` share one base."""
    if not info.pretrained:
        keras.utils.set_random_seed(int(seed))
    return course.build_vgg16_classifier(image_size, info, head_units, dropout)[0]


class FeatureCache:
    """Pooled frozen-base features of image sets, computed once for all trials (and processes: ``cache_dir``
    keeps ``.npz`` files), keyed by size, weights, images, strength, copies, seed and dtype policy. Copy ``k``
    is ``pipeline.augmentation_layers(strength, seed=seed + 101 k)`` then the base. ``stats`` counts use."""

    def __init__(self, image_size: int, weights=None, *, copies=DEFAULT_COPIES, seed=0, cache_dir=None, batch_size=32):
        self.image_size = _count("image_size", image_size, pretrained.VGG16_MIN_SIZE)
        self.weights_info = pretrained.resolve_vgg16_weights(weights)
        self.copies, self.seed = _count("copies", copies), _count("seed", seed, 0)
        self.batch_size = _count("batch_size", batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}
        self._extractor: keras.Model | None = None
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0, "build_seconds": 0.0}

    def key(self, fingerprint: str, strength: float) -> str:
        """24 hex characters naming the features of an image set at an augmentation strength."""
        s, info = _strength(strength), self.weights_info
        stat = os.stat(info.path) if info.path and os.path.isfile(info.path) else None  # a replaced file is another
        stamp = (info.source, os.path.basename(info.path or ""), stat and stat.st_size, stat and stat.st_mtime_ns)
        policy = keras.mixed_precision.global_policy().name
        parts = (self.image_size, policy, stamp, fingerprint, round(s, 6), self.copies if s else 1, self.seed)
        return records.sha256_text(*map(str, parts))[:24]

    def get(self, images: np.ndarray, strength: float = 0.0, *, fingerprint: str | None = None) -> np.ndarray:
        """Features ``(C, N, 1024)`` float32 of ``images`` ``(N, S, S, 1)`` (``C = 1`` at strength 0, else
        ``copies``), computed on the first request; ``fingerprint`` names the images (default: a hash)."""
        x, s = np.asarray(images, dtype=np.float32), _strength(strength)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 1):
            raise ValueError(f"images must have shape (N, {self.image_size}, {self.image_size}, 1), got {x.shape}")
        key = self.key(fingerprint or records.sha256_text(x), s)
        if key in self._memory:
            self.stats["hits"] += 1
            return self._memory[key]
        path = Path(self.cache_dir or ".") / f"vgg16_S{self.image_size}_{self.weights_info.source}_aug{s:g}_{key}.npz"
        if self.cache_dir is not None and path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as stored:
                if stored["features"].shape[1] == len(x):  # else a damaged file: recompute
                    self.stats["disk_hits"] += 1
                    self._memory[key] = stored["features"]
                    return self._memory[key]
        started = time.perf_counter()
        self._memory[key] = feats = self._compute(x, s)
        self.stats["build_seconds"] += time.perf_counter() - started
        self.stats["misses"] += 1
        if self.cache_dir is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, features=feats)
            os.replace(tmp, path)
        return feats

    def _compute(self, x: np.ndarray, strength: float) -> np.ndarray:
        if self._extractor is None:  # seeds kept: later layers draw the same ones whether the cache was warm or not
            states = random.getstate(), np.random.get_state()
            full = build_classifier(self.image_size, self.weights_info, self.seed)
            self._extractor = keras.Model(full.inputs, full.get_layer("avg_pool").output, name="vgg16_features")
            random.setstate(states[0]), np.random.set_state(states[1])
        copies = [x]
        if strength:
            copies = []
            for k in range(self.copies):
                augment = pipeline.augmentation_layers(strength, seed=self.seed + 101 * k)
                batches = range(0, len(x), self.batch_size)
                copies.append(
                    np.concatenate([np.asarray(augment(x[i : i + self.batch_size], training=True)) for i in batches])
                )
        feats = [self._extractor.predict(c, batch_size=self.batch_size, verbose=0) for c in copies]
        return np.stack(feats).astype(np.float32)

    def release(self) -> None:  # drop the extractor (about 60 MB); the features stay
        if self._extractor is not None:
            self._extractor = None
            gc.collect()


class FeatureBatches(keras.utils.PyDataset):
    """Shuffled batches of cached features; epoch ``e`` reads copy ``e mod C``."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0, first_epoch: int = 0):
        super().__init__()
        self.features, self.labels, self.batch_size = features, labels.astype(np.float32), int(batch_size)
        self.epoch, self.rng = int(first_epoch), np.random.default_rng(seed + first_epoch)
        self.order = self.rng.permutation(len(labels))

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.features[self.epoch % len(self.features)][rows], self.labels[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self.rng.permutation(len(self.labels))


def compile_for_search(model: keras.Model, learning_rate: float, optimizer: str = "adam") -> keras.Model:
    """Binary cross-entropy and only the metric the tuner needs, ``auc`` (each adds to a trial's tracing time)."""
    opt = course.make_optimizer(optimizer, learning_rate)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(), metrics=[keras.metrics.AUC(name="auc")])
    return model


class VGGHyperModel(keras_tuner.HyperModel):
    """Notebook 04's search, trained on cached features: ``build(hp)`` is the compiled head; ``fit`` trains
    it on the :class:`FeatureCache` of a :class:`TuningData` (phase 1) and, for ``unfreeze_blocks > 0``,
    fine-tunes the full classifier on images for ``ceil(finetune_fraction x epochs)`` epochs (phase 2).
    ``fit`` returns ``val_auc`` (both phases' best), ``val_auc_head`` and ``val_auc_finetune``. The space:
    :func:`course.head_hyperparameters`, then ``unfreeze_blocks`` (choices 0-5), ``lr_finetune`` (1e-5 -
    3e-4, log, only when unfrozen), ``augment_strength`` (cached ``strengths``) and ``batch_size``.
    """

    def __init__(self, image_size, weights=None, *, feature_cache=None, seed=0, distribution_strategy=None, **space):
        super().__init__(name="vgg16_transfer", tunable=True)
        self.image_size = _count("image_size", image_size, pretrained.VGG16_MIN_SIZE)
        self.seed = _count("seed", seed, 0)
        self.feature_cache = feature_cache or FeatureCache(self.image_size, weights, seed=self.seed)
        if self.feature_cache.image_size != self.image_size:
            raise ValueError(f"feature_cache is for {self.feature_cache.image_size} px images, not {self.image_size}")
        self.weights_info, self.distribution_strategy = self.feature_cache.weights_info, distribution_strategy
        self.unfreeze_blocks = [int(b) for b in space.pop("unfreeze_blocks", (0, 1, 2, 3))]
        self.strengths = [_strength(s) for s in space.pop("strengths", CACHED_STRENGTHS)]
        self.batch_sizes = [_count("batch_sizes choice", b) for b in space.pop("batch_sizes", (16, 32, 64))]
        self.finetune_fraction = float(space.pop("finetune_fraction", 0.5))
        if space:
            raise ValueError(f"unknown options {sorted(space)}; use unfreeze_blocks, strengths, batch_sizes, ...")
        if not (
            self.unfreeze_blocks and set(self.unfreeze_blocks) <= set(range(6)) and self.strengths and self.batch_sizes
        ):
            raise ValueError(f"each choice list needs a value; unfreeze_blocks from 0-5, got {self.unfreeze_blocks!r}")

    def space(self) -> dict:
        """The choices as plain data (recorded in ``search_settings.json``)."""
        keys = ("unfreeze_blocks", "strengths", "batch_sizes", "finetune_fraction")
        return {k: getattr(self, k) for k in keys} | {"copies": self.feature_cache.copies}

    def hyperparameter_values(self, hp: keras_tuner.HyperParameters) -> dict:
        """Declare the space in ``hp`` and return this trial's values (``lr_finetune`` None if frozen)."""
        values = course.head_hyperparameters(hp)
        values["unfreeze_blocks"] = hp.Choice("unfreeze_blocks", self.unfreeze_blocks)
        values["lr_finetune"] = None
        unfrozen = [b for b in self.unfreeze_blocks if b > 0]
        if unfrozen:
            with hp.conditional_scope("unfreeze_blocks", unfrozen):
                lr = hp.Float("lr_finetune", 1e-5, 3e-4, sampling="log")
            values["lr_finetune"] = lr if values["unfreeze_blocks"] > 0 else None
        values["augment_strength"] = hp.Choice("augment_strength", self.strengths)
        values["batch_size"] = hp.Choice("batch_size", self.batch_sizes)
        return values

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        v = self.hyperparameter_values(hp)
        return compile_for_search(course.build_head(v["head_units"], v["dropout"]), v["lr_head"], v["optimizer"])

    def build_full_model(self, values: dict) -> keras.Model:
        """The full classifier (base frozen, not compiled) on the feature cache's base."""
        with self._scope():
            units, rate = int(values["head_units"]), float(values["dropout"])
            return build_classifier(self.image_size, self.weights_info, self.seed, units, rate)

    def _scope(self):
        return self.distribution_strategy.scope() if self.distribution_strategy else contextlib.nullcontext()

    def fit(self, hp, model, data: TuningData, *, epochs=1, initial_epoch=0, callbacks=None, verbose=0) -> dict:
        values = self.hyperparameter_values(hp)
        if not 0 <= initial_epoch < _count("epochs", epochs):
            raise ValueError(f"initial_epoch ({initial_epoch}) must be in [0, epochs ({epochs}))")
        x_train, y_train, x_val, y_val = data.arrays()
        try:
            strength = float(values["augment_strength"])
            train_feats = self.feature_cache.get(x_train, strength, fingerprint=data.train_fingerprint)
            val_feats = self.feature_cache.get(x_val, 0.0, fingerprint=data.val_fingerprint)[0]
        finally:
            self.feature_cache.release()
        batches = FeatureBatches(train_feats, y_train, values["batch_size"], self.seed, first_epoch=initial_epoch)
        kwargs = dict(epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks or [], verbose=verbose)
        weights = course.balanced_class_weights(y_train)
        history = model.fit(
            batches, validation_data=(val_feats, y_val.astype(np.float32)), class_weight=weights, **kwargs
        )
        head_auc = float(np.nanmax(history.history.get(OBJECTIVE) or [np.nan]))
        result = {OBJECTIVE: head_auc, "val_auc_head": head_auc}
        if values["unfreeze_blocks"] > 0:
            tuned = self._fine_tune(model, values, data, math.ceil((epochs - initial_epoch) * self.finetune_fraction))
            result.update(val_auc_finetune=tuned, val_auc=float(np.nanmax([head_auc, tuned])))
        return result

    def _fine_tune(self, head: keras.Model, values: dict, data: TuningData, epochs: int) -> float:
        """Phase 2 of a trial: the trained head in the full classifier, top blocks open, on images."""
        x_train, y_train, x_val, y_val = data.arrays()
        batch, strength = int(values["batch_size"]), float(values["augment_strength"])
        full = course.transplant_head(head, self.build_full_model(values))
        try:
            course.unfreeze_top_blocks(full, values["unfreeze_blocks"])
            with self._scope():
                compile_for_search(full, values["lr_finetune"], values["optimizer"])
            train = image_dataset(x_train, y_train, batch, training=True, strength=strength, seed=self.seed)
            val = image_dataset(x_val, y_val, batch, training=False)
            cw = course.balanced_class_weights(y_train)
            history = full.fit(train, validation_data=val, epochs=epochs, class_weight=cw, shuffle=False, verbose=0)
        finally:
            del full
            gc.collect()
        return float(np.nanmax(history.history.get(OBJECTIVE) or [np.nan]))


class _TrialBookkeeping:
    """Tuner mix-in: time each trial, record who ran it (``trial_<id>/run.json``), free memory after."""

    def on_trial_begin(self, trial):
        self._trial_started = time.perf_counter()
        super().on_trial_begin(trial)

    def _build_hypermodel(self, hp):
        with warnings.catch_warnings():  # Hyperband reloads a head; its optimizer starts afresh
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return super()._build_hypermodel(hp)

    def on_trial_end(self, trial):
        seconds = time.perf_counter() - getattr(self, "_trial_started", time.perf_counter())
        record = {"trial_id": trial.trial_id, "tuner_id": self.tuner_id, "seconds": seconds, "status": trial.status}
        try:
            record.update(host=socket.gethostname(), pid=os.getpid())
            records.write_json(Path(self.get_trial_dir(trial.trial_id)) / RUN_FILE, record)
            super().on_trial_end(trial)
        finally:
            keras.backend.clear_session()
            gc.collect()


_BASES = (keras_tuner.Hyperband, keras_tuner.BayesianOptimization, keras_tuner.RandomSearch)
_TUNERS = {kind: type(f"VGG{base.__name__}", (_TrialBookkeeping, base), {}) for kind, base in zip(TUNER_KINDS, _BASES)}


def _check_kind(kind: str) -> str:
    key = str(kind).strip().lower()
    if key not in TUNER_KINDS:
        raise ValueError(f"unknown tuner kind {kind!r}; choose one of {', '.join(TUNER_KINDS)}")
    return key


def make_tuner(hypermodel, kind="hyperband", *, project_dir, max_trials=None, max_epochs=6, seed=0, **kwargs):
    """A KerasTuner ``Hyperband``, ``BayesianOptimization`` or ``RandomSearch`` maximising ``val_auc``, timing
    each trial; ``max_trials`` required except for Hyperband (a cap there); ``kwargs`` go to the tuner."""
    key, folder = _check_kind(kind), Path(project_dir)
    kwargs.setdefault("max_consecutive_failed_trials", 3)
    _count("max_consecutive_failed_trials", kwargs["max_consecutive_failed_trials"])
    objective = keras_tuner.Objective(OBJECTIVE, direction="max")
    common = dict(hypermodel=hypermodel, objective=objective, seed=int(seed), directory=str(folder.parent), **kwargs)
    common.update(project_name=folder.name, overwrite=kwargs.get("overwrite", False))
    if key == "hyperband":
        tuner = _TUNERS[key](max_epochs=_count("max_epochs", max_epochs), **common)
        if max_trials is not None:
            tuner.oracle.max_trials = _count("max_trials", max_trials)
        return tuner
    if max_trials is None:
        raise ValueError(f"kind={key!r} needs max_trials")
    trials = _count("max_trials", max_trials)
    extra = {"num_initial_points": max(2, trials // 3)} if key == "bayesian" else {}
    return _TUNERS[key](max_trials=trials, **extra, **common)


def _check_settings(project: Path, current: dict, *, what: str) -> dict:
    """The recorded settings, or ``ValueError`` listing every difference from ``current``."""
    current = records.jsonable(current)
    try:
        recorded = records.read_json(project / SETTINGS_FILE)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {project / SETTINGS_FILE}: {exc}; use mode='fresh' to start over") from exc
    diffs = []
    for key in sorted((set(recorded) | set(current)) - _UNCOMPARED):
        old, new = recorded.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [k for k in sorted(old | new) if old.get(k) != new.get(k)]
            diffs += [f"{key}.{k}: recorded {old.get(k)!r}, now {new.get(k)!r}" for k in changed]
        elif old != new:
            diffs.append(f"{key}: recorded {old!r}, now {new!r}")
    if diffs:
        raise ValueError(
            f"cannot {what} the search in {project}: its {SETTINGS_FILE} differs from this run:\n  "
            + "\n  ".join(diffs)
            + f"\nUse mode='fresh' to start over (this deletes {project}) or another project_dir."
        )
    return recorded


def _prepare_project(project: Path, settings: dict, mode: str, role: str) -> None:
    """Check (resume, worker) or wipe (fresh) the project folder, then write the settings (not a worker)."""
    if role == "worker":
        if (project / SETTINGS_FILE).is_file():
            _check_settings(project, settings, what="join")
        return
    if mode == "resume":
        if not (project / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: no {SETTINGS_FILE} in {project}; use mode='fresh'")
        recorded = _check_settings(project, settings, what="resume")
        settings.update(created=recorded.get("created"), resumed=settings["created"])
    elif project.exists():
        entries = list(project.iterdir()) if project.is_dir() else [project]
        markers = {SETTINGS_FILE, RESULTS_FILE, "oracle.json"}
        if entries and not any(e.name in markers or e.name.startswith(("trial_", "tuner")) for e in entries):
            raise ValueError(f"refusing to delete {project}: it does not look like a tuner project; choose another")
        shutil.rmtree(project)
    project.mkdir(parents=True, exist_ok=True)
    records.write_json(project / SETTINGS_FILE, settings)


def _role() -> str:
    """ "chief", "worker" or "single", from KerasTuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def run_search(
    manifest: pd.DataFrame,
    profile: str | config.Profile | None = None,
    *,
    project_dir=None,
    mode: str = "fresh",
    kind: str = "hyperband",
    max_trials: int | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    weights="auto",
    crop_roi: bool = False,
    copies: int = DEFAULT_COPIES,
    cache_dir=True,
    hypermodel_class: type = VGGHyperModel,
    hypermodel_options: dict | None = None,
    verbose=0,
) -> pd.DataFrame:
    """Run, resume or (as a distributed worker) join a search on cached features; returns :func:`results_table`.

    ``profile`` gives ``image_size``, ``max_trials`` and ``epochs`` unless given. ``mode="fresh"`` deletes
    ``project_dir`` (only an empty folder or a tuner project), ``"resume"`` continues equal settings only
    (``ValueError`` naming each difference; ``FileNotFoundError`` with nothing to resume). ``cache_dir``: the
    :class:`FeatureCache` folder (True: ``<artifacts>/tuner/cache``; None: memory only).
    """
    if mode not in ("fresh", "resume"):
        raise ValueError(f"mode must be 'fresh' or 'resume', got {mode!r}")
    key = _check_kind(kind)
    prof = profile if isinstance(profile, config.Profile) else config.get_profile(profile)
    size = _count("image_size", image_size or prof.image_size, pretrained.VGG16_MIN_SIZE)
    trials = _count("max_trials", max_trials or prof.tuner_trials)
    n_epochs = _count("epochs", epochs or prof.tuner_epochs)
    project = Path(project_dir) if project_dir is not None else config.artifacts_dir() / "tuner" / f"vgg16_{key}"
    cache_dir = config.artifacts_dir() / "tuner" / "cache" if cache_dir is True else cache_dir or None
    # everything cheap first, so that a mismatch is reported before anything is loaded or trained
    data = TuningData(manifest, size, crop_roi=crop_roi)
    cache = FeatureCache(size, weights, copies=copies, seed=seed, cache_dir=cache_dir)
    hypermodel = hypermodel_class(size, feature_cache=cache, seed=seed, **(hypermodel_options or {}))
    info = hypermodel.weights_info  # what makes two searches comparable; _UNCOMPARED entries are only recorded:
    settings = dict(space_version=SPACE_VERSION, kind=key, objective=OBJECTIVE, epochs=n_epochs, image_size=size)
    settings.update(crop_roi=data.crop_roi, data_fingerprint=data.fingerprint, space=hypermodel.space())
    settings.update(weights_source=info.source, weights_file=os.path.basename(info.path) if info.path else None)
    settings.update(weights=info.as_dict(), n_train=data.n_train, n_val=data.n_val, seed=seed, max_trials=trials)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    settings.update(profile=prof.name, versions=records.package_versions(), created=now)
    _prepare_project(project, settings, mode, _role())
    config.set_seed(seed)
    tuner = make_tuner(hypermodel, key, project_dir=project, max_trials=trials, max_epochs=n_epochs, seed=seed)
    return _search(tuner, data, n_epochs, verbose)


def _search(tuner: keras_tuner.Tuner, data: TuningData, epochs: int, verbose) -> pd.DataFrame:
    """``tuner.search`` in 16-bit compute where native (not on a chief; the policy is restored after),
    on all GPUs when there are several; then the results table (saved unless a worker)."""
    policy, project = keras.mixed_precision.global_policy(), Path(tuner.project_dir)
    try:
        if _role() != "chief":
            hardware.enable_mixed_precision(verbose=False)
        if len(tf.config.list_physical_devices("GPU")) > 1:
            tuner.distribution_strategy = tuner.hypermodel.distribution_strategy = tf.distribute.MirroredStrategy()
        tuner.search(data, epochs=epochs, verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(policy)
        if _role() != "worker":
            results_table(project).to_csv(project / RESULTS_FILE, index=False)
    return results_table(project)


def _read_trials(project: Path) -> list[dict]:
    trials = []
    for path in sorted(project.glob("trial_*/trial.json")):
        with contextlib.suppress(OSError, ValueError):  # being written by another process
            trial = records.read_json(path)
            run_path = path.with_name(RUN_FILE)
            with contextlib.suppress(OSError, ValueError):
                trial["run"] = records.read_json(run_path) if run_path.is_file() else {}
            trials.append(trial)
    return trials


def results_table(project_dir) -> pd.DataFrame:
    """One row per trial: ``trial_id``, ``status``, ``score`` (best ``val_auc``, NaN unless completed),
    ``seconds``, ``tuner_id``, the hyperparameters (Hyperband's ``tuner/...`` last) and ``error`` (the
    last traceback line of a failed trial). ``FileNotFoundError`` without the project folder."""
    project = Path(project_dir)
    if not project.is_dir():
        raise FileNotFoundError(f"no tuner project folder {project}; run run_search first")
    rows, names = [], {}
    for trial in _read_trials(project):
        values = ((trial.get("hyperparameters") or {}).get("values")) or {}
        values = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in values.items()}
        names.update(dict.fromkeys(values))
        message, score = (trial.get("message") or "").strip().splitlines(), trial.get("score")
        run = trial.get("run", {})
        row = {"trial_id": str(trial.get("trial_id")), "status": trial.get("status")}
        row.update(score=float("nan" if score is None else score), seconds=float(run.get("seconds", "nan")))
        row.update(tuner_id=run.get("tuner_id"), **values)
        rows.append(row | {"error": message[-1] if message else None})
    order = [n for n in HYPERPARAMETERS if n in names] + sorted(n for n in names if n not in HYPERPARAMETERS)
    order = [n for n in order if not n.startswith("tuner/")] + [n for n in order if n.startswith("tuner/")]
    table = pd.DataFrame(rows, columns=["trial_id", "status", "score", "seconds", "tuner_id", *order, "error"])
    ids = [int(t) if t.isdigit() else 1 << 62 for t in table["trial_id"]]  # numbers as numbers: "9" before "10"
    return table.iloc[np.argsort(ids, kind="stable")].reset_index(drop=True)


def best_hyperparameters(project_dir) -> tuple[dict, dict]:
    """The best completed trial's values (plus ``trial_id``, ``score``) and the project's settings."""
    project = Path(project_dir)
    if not (project / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"no {SETTINGS_FILE} in {project}: not a project of run_search")
    done = [t for t in _read_trials(project) if t.get("status") == "COMPLETED" and t.get("score") is not None]
    done = [t for t in done if np.isfinite(t["score"])]
    if not done:
        raise ValueError(f"no completed trial in {project}; run (or resume) the search first")
    best = min(done, key=lambda t: (-float(t["score"]), str(t["trial_id"])))
    values = {k: v for k, v in best["hyperparameters"]["values"].items() if not k.startswith("tuner/")}
    values.setdefault("lr_finetune", None)
    values.update(trial_id=best["trial_id"], score=float(best["score"]))
    return values, records.read_json(project / SETTINGS_FILE)


def best_head_model(project_dir) -> tuple[keras.Model, dict, dict]:
    """The full classifier with the best trial's head (trained on cached features, from its checkpoint),
    base frozen, not compiled; with the trial's values and the project's settings (image size, weights,
    seed, crop)."""
    project = Path(project_dir)
    values, settings = best_hyperparameters(project)
    checkpoint = project / f"trial_{values['trial_id']}" / "checkpoint.weights.h5"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"the best trial's head {checkpoint} is missing; rerun the search")
    info, units, rate = (
        pretrained.WeightsInfo(**settings["weights"]),
        int(values["head_units"]),
        float(values["dropout"]),
    )
    model = build_classifier(int(settings["image_size"]), info, int(settings.get("seed", 0)), units, rate)
    head = course.build_head(units, rate)  # after the classifier: its layers draw the same seeds as in the search
    head.load_weights(str(checkpoint))
    return course.transplant_head(head, model), values, settings


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cspine_utils.tuning", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (data.discover)")
    ap.add_argument("--mode", choices=("fresh", "resume"), default="fresh")
    ap.add_argument("--kind", choices=TUNER_KINDS, default="hyperband")
    ap.add_argument("--role", choices=("single", "chief", "worker"), default="single")
    ap.add_argument("--cache-dir", type=Path, default=True, help="feature cache (default <artifacts>/tuner/cache)")
    ap.add_argument("--project-dir", type=Path, default=None)
    for flag in ("--max-trials", "--epochs", "--image-size", "--seed", "--verbose", "--oracle-port"):
        ap.add_argument(flag, type=int, default={"--seed": 0, "--verbose": 0, "--oracle-port": 8000}.get(flag))
    for flag, default in (("--profile", None), ("--weights", "auto"), ("--split-policy", "auto")):
        ap.add_argument(flag, default=default, help="--weights: auto, imagenet, hed-bsds500, none or a .h5 file")
    ap.add_argument("--tuner-id", default="tuner0", help="a worker's id: tuner0, tuner1, ...")
    ap.add_argument("--oracle-ip", default="127.0.0.1")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cspine_utils.tuning``; see the module docstring."""
    args = _parser().parse_args(argv)
    role = "single" if args.role == "single" else "chief" if args.role == "chief" else args.tuner_id
    if args.role == "worker" and "chief" in role:
        raise SystemExit("error: a worker's --tuner-id must not contain 'chief'")
    if role != "single":
        os.environ.update(KERASTUNER_TUNER_ID=role, KERASTUNER_ORACLE_IP=args.oracle_ip)
        os.environ["KERASTUNER_ORACLE_PORT"] = str(args.oracle_port)
    from . import data  # noqa: PLC0415

    manifest, message = data.choose_split(data.discover(args.data).manifest, policy=args.split_policy, seed=args.seed)
    print(f"[{role}] {message}\n[{role}] {hardware.describe_device()}", flush=True)
    options = {k: getattr(args, k) for k in ("mode", "kind", "max_trials", "epochs", "image_size", "seed", "verbose")}
    weights = None if args.weights.strip().lower() in ("none", "random") else args.weights
    table = run_search(
        manifest, args.profile, project_dir=args.project_dir, weights=weights, cache_dir=args.cache_dir, **options
    )
    done, mine = table[table["status"] == "COMPLETED"], int((table["tuner_id"] == role).sum())
    best = f"{len(table)} trial(s), {len(done)} completed, best val_auc {done['score'].max():.3f}"
    print(f"[{role}] " + (f"ran {mine} trial(s)" if args.role == "worker" else best), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
