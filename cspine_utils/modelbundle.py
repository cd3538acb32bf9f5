"""The model bundle: ``model.keras`` plus ``bundle.json`` (image size, preprocessing, threshold,
calibration temperature, validation metrics, weights provenance, data fingerprint, versions, sha256 of
the model) and, when given, ``reference.npz`` (what the training data looked like: ``trust.FeatureReference``)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config, records
from .hardware import as_float32, compute_dtypes
from .pretrained import WeightsInfo
from .trust import FeatureReference, sigmoid, split_logits, split_output

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import pandas as pd

__all__ = ["Bundle", "load_bundle", "manifest_fingerprint", "save_bundle", "MODEL_FILE", "BUNDLE_FILE", "OUTPUT_LAYER"]

MODEL_FILE = "model.keras"
BUNDLE_FILE = "bundle.json"
REFERENCE_FILE = "reference.npz"
BUNDLE_FORMAT_VERSION = 1
#: Name of the sigmoid output layer of every course model (float32 also under mixed precision).
OUTPUT_LAYER = "fracture_probability"


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    v = float(value)
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if not np.isfinite(v) or v < 0.0 or not upper_ok:
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value!r}")
    return v


def manifest_fingerprint(manifest: pd.DataFrame, root: str | os.PathLike | None = None) -> str:
    """A sha256 (64 hex characters) that changes whenever the data of a run change: files, labels or splits.

    Sorted rows ``path \\t label \\t split`` are hashed, so row order does not matter. Paths are
    compared as posix text: moving the data changes the fingerprint unless ``root`` is given, in
    which case paths are taken relative to it. ``manifest`` needs columns ``path`` (or ``file``)
    and ``label`` (``ValueError`` otherwise); ``split`` is used if present.
    """
    columns = getattr(manifest, "columns", ())
    path_col = "path" if "path" in columns else ("file" if "file" in columns else None)
    if path_col is None or "label" not in columns:
        raise ValueError(f"manifest needs columns 'path' (or 'file') and 'label'; found {list(columns)}")
    splits = manifest["split"] if "split" in columns else [""] * len(manifest)
    rows = []
    for path, label, split in zip(manifest[path_col], manifest["label"], splits):
        p = Path(str(path))
        if root is not None and p.is_relative_to(Path(root)):
            p = p.relative_to(Path(root))
        rows.append(f"{p.as_posix()}\t{str(label).strip().lower()}\t{'' if split is None else split}")
    return records.sha256_text("\n".join(sorted(rows)))


def _create_hint(folder: Path) -> str:
    return f"train a model and save it with modelbundle.save_bundle(model, {str(folder)!r}, ...) (notebooks 03, 04)"


@dataclass
class Bundle:
    """A trained model with everything needed to use it correctly: ``model`` (input ``(B, S, S, C)``
    float32 in [0, 1], output ``(B, 1)`` probability), ``config`` (the contents of ``bundle.json``)
    and ``path`` (the bundle folder)."""

    model: keras.Model
    config: dict = field(repr=False)
    path: Path
    reference: FeatureReference | None = field(default=None, repr=False)
    _split: tuple | None = field(default=None, init=False, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config["class_names"])

    @property
    def preprocessing(self) -> dict:
        return dict(self.config.get("preprocessing") or {})

    @property
    def calibration(self) -> tuple[float, float]:
        """``(temperature T, bias b)`` fitted on validation: ``p = sigmoid(logit / T + b)``; (1, 0) = none."""
        cal = self.config.get("calibration") or {}
        return float(cal.get("temperature", 1.0)), float(cal.get("bias", 0.0))

    def assess(self, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Everything the course says about preprocessed images ``(N, S, S, C)`` in [0, 1], arrays of shape (N,).

        ``probability`` (calibrated: ``sigmoid(logit / T + b)``, :attr:`calibration`), ``uncalibrated`` (the model's
        own sigmoid), ``distance`` (to the training data, NaN without a reference) and ``unlike`` (True
        when beyond the reference's cut-off). Checks the input as :meth:`predict_proba` says.
        """
        x = self._checked(images)
        if self._split is None:
            self._split = split_output(self.model)
        logits, features = split_logits(self._split, x, batch_size)
        distance = self.reference.distance(features) if self.reference is not None else np.full(len(x), np.nan)
        temperature, bias = self.calibration
        return {
            "probability": sigmoid(logits / temperature + bias).astype(np.float32),
            "uncalibrated": sigmoid(logits).astype(np.float32),
            "distance": distance,
            "unlike": distance > (self.reference.cutoff if self.reference is not None else np.inf),
        }

    def predict_proba(self, images: np.ndarray, batch_size: int = 32, calibrated: bool = True) -> np.ndarray:
        """Fracture probabilities, shape (N,) float32, of preprocessed images (N, S, S, C) or (S, S, C) in [0, 1].

        Calibrated with the bundle's :attr:`calibration` unless ``calibrated=False`` (the model's own output).
        Raises ``ValueError`` if the shape does not match the bundle, or values lie outside [0, 1]
        (e.g. 0-255 grey levels or Hounsfield units: preprocess with ``pipeline.load_and_preprocess``).
        """
        return self.assess(images, batch_size)["probability" if calibrated else "uncalibrated"]

    def _checked(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if x.shape == expected:
            x = x[np.newaxis]
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, expected))}) for this bundle, got {x.shape}"
            )
        if x.size and (not np.isfinite(x).all() or x.min() < -1e-3 or x.max() > 1.0 + 1e-3):
            lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
            raise ValueError(
                f"images must be in [0, 1] (the bone window), got values from {lo:g} to {hi:g}; "
                "preprocess with pipeline.load_and_preprocess"
            )
        return x

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """Calibrated fracture probabilities, shape (N,) float32, of image files, through the one prediction
        path of the app and the CLI (``predict.predict_paths``: input guard, preprocessing as in training).

        Raises ``ValueError`` naming every file that was refused and why; the flags of the others (e.g.
        "unlike the slices the model learned from") become one ``UserWarning`` naming the first three.
        """
        import warnings  # noqa: PLC0415

        from . import predict  # noqa: PLC0415 - lazy

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        results = predict.predict_paths(paths, self, batch_size=batch_size)
        refused = [f"{r.file}: {r.error}" for r in results if not r.ok]
        if refused:
            raise ValueError(f"{len(refused)} of {len(results)} file(s) not predicted: " + "; ".join(refused))
        flagged = [f"{Path(r.file).name}: {r.flags[0]}" for r in results if r.flags]
        if flagged:  # one warning for the batch, files by name (a path may be the machine's)
            more = f" (and {len(flagged) - 3} more)" if len(flagged) > 3 else ""
            text = f"{len(flagged)} of {len(results)} file(s) carry a warning: " + "; ".join(flagged[:3]) + more
            warnings.warn(text, UserWarning, stacklevel=2)
        return np.array([r.probability for r in results], dtype=np.float32)

    def classify(self, probabilities: Iterable[float]) -> list[str]:
        """Class names for probabilities: ``class_names[1]`` where ``p >= threshold``."""
        names = self.class_names
        return [names[1] if float(p) >= self.threshold else names[0] for p in probabilities]


def _checked_arguments(model, class_names, image_size, channels, threshold, seed, weights_info) -> tuple:
    """``(class names, size, channels, threshold)`` after checking the arguments of :func:`save_bundle`."""
    import keras  # noqa: PLC0415

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if weights_info is not None and not isinstance(weights_info, WeightsInfo):
        raise ValueError(f"weights_info must be a WeightsInfo or None, got {weights_info!r}")

    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    names = [str(c) for c in class_names]
    if len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"class_names must be two different names, got {list(class_names)!r}")
    size = _positive_int("image_size", image_size)
    channels = _positive_int("channels", channels)
    input_shape = tuple(model.inputs[0].shape)
    if tuple(input_shape[1:]) != (size, size, channels):
        raise ValueError(f"image_size={size}, channels={channels} do not match the model's input shape {input_shape}")
    return names, size, channels, _fraction("threshold", threshold, allow_one=True)


def _save_model_float32(model: keras.Model, folder: Path) -> tuple[Path, list[str]]:
    """Write ``folder/model.keras`` (through a temporary name) in float32; return it and the trained dtypes."""
    trained_dtypes = sorted(compute_dtypes(model))
    model = as_float32(model)  # bundles predict the same on any machine, whatever trained them
    folder.mkdir(parents=True, exist_ok=True)
    tmp_model = folder / f".{MODEL_FILE}.tmp.keras"
    model.save(str(tmp_model))
    os.replace(tmp_model, folder / MODEL_FILE)
    return folder / MODEL_FILE, trained_dtypes


def _versions() -> dict[str, str | None]:
    import keras  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    found = records.package_versions(("tensorflow", "keras", "numpy"))
    return {
        "tensorflow": found["tensorflow"],
        "keras": found["keras"],
        "keras_backend": keras.backend.backend(),
        "numpy": found["numpy"],
        "cspine_utils": __version__,
    }


def save_bundle(
    model: keras.Model,
    bundle_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] = ("normal", "fracture"),
    image_size: int,
    channels: int = 1,
    preprocessing: dict | None = None,
    threshold: float = 0.5,
    val_metrics: dict | None = None,
    weights_info: WeightsInfo | None = None,
    data_fingerprint: str | None = None,
    seed: int | None = None,
    profile: str | config.Profile | None = None,
    name: str | None = None,
    calibration: tuple[float, float] = (1.0, 0.0),
    reference: FeatureReference | None = None,
) -> Path:
    """Save a trained model as a bundle folder (created; returned): ``model.keras`` + ``bundle.json``.

    ``bundle.json`` holds the arguments (``class_names[1]`` is the class whose probability is output;
    ``image_size`` and ``channels`` must match the model; ``threshold`` in [0, 1] on the calibrated
    scale; ``calibration`` ``(T > 0, b)``: ``p = sigmoid(logit / T + b)``, (1, 0) = none), plus
    ``created``, ``model_sha256``, ``versions``, ``compute_dtype`` "float32" (a mixed-precision model
    is saved through ``hardware.as_float32``) and ``unlike_training`` (``reference.describe()`` and
    the sha256 of ``reference.npz``, or null). Files are written to temporary names and renamed.
    Raises ``ValueError`` naming a value that is invalid or does not match the model.
    """
    checked = _checked_arguments(model, class_names, image_size, channels, threshold, seed, weights_info)
    names, size, channels, threshold = checked
    prof = profile if isinstance(profile, config.Profile) else config.get_profile(profile)
    calibration_record = _calibration_record(calibration, reference)
    folder = Path(bundle_dir)
    model_path, trained_dtypes = _save_model_float32(model, folder)
    unlike = _save_reference(reference, folder)
    record = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": str(name or model.name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_file": MODEL_FILE,
        "model_sha256": records.sha256_file(model_path),
        "class_names": names,
        "image_size": size,
        "channels": channels,
        "input_range": [0.0, 1.0],
        "preprocessing": dict(preprocessing or {}),
        "threshold": threshold,
        "val_metrics": dict(val_metrics or {}),
        "weights": weights_info.as_dict() if weights_info is not None else None,
        "data_fingerprint": data_fingerprint,
        "seed": None if seed is None else int(seed),
        "profile": prof.name,
        "compute_dtype": "float32",
        "trained_compute_dtypes": trained_dtypes,
        "calibration": calibration_record,
        "unlike_training": unlike,
        "versions": _versions(),
    }
    records.write_json(folder / BUNDLE_FILE, record)
    return folder


def _calibration_record(calibration: tuple[float, float], reference: FeatureReference | None) -> dict:
    """The checked ``calibration`` entry of ``bundle.json`` (``reference`` is checked here too)."""
    temperature, bias = (float(v) for v in calibration)
    if not (np.isfinite(temperature) and temperature > 0 and np.isfinite(bias)):
        raise ValueError(f"calibration must be (temperature > 0, finite bias), got {calibration!r}")
    if reference is not None and not isinstance(reference, FeatureReference):
        raise ValueError(f"reference must be a trust.FeatureReference or None, got {type(reference).__name__}")
    method = "temperature scaling" + (" with a bias (Platt scaling)" if bias else "") + ", fitted on validation"
    return {"method": method, "temperature": temperature, "bias": bias}


def _save_reference(reference: FeatureReference | None, folder: Path) -> dict | None:
    """Write ``reference.npz`` (through a temporary name); its facts and sha256 for ``bundle.json``."""
    target = folder / REFERENCE_FILE
    if reference is None:
        target.unlink(missing_ok=True)
        return None
    tmp = folder / f".{REFERENCE_FILE}.tmp.npz"
    reference.save(tmp)
    os.replace(tmp, target)
    return {**reference.describe(), "file": REFERENCE_FILE, "sha256": records.sha256_file(target)}


def _load_reference(record: dict, folder: Path) -> FeatureReference | None:
    unlike = record.get("unlike_training")
    if not unlike:
        return None
    path = folder / str(unlike.get("file", REFERENCE_FILE))
    if not path.is_file() or records.sha256_file(path) != unlike.get("sha256"):
        raise ValueError(f"{path.name} in {folder} is missing or does not match {BUNDLE_FILE}: save the bundle again")
    return FeatureReference.load(path)


def _read_record(folder: Path) -> dict:
    """The checked contents of ``folder/bundle.json``."""
    json_path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"no model bundle folder {folder}: {_create_hint(folder)}")
    if not json_path.is_file():
        raise FileNotFoundError(f"no {BUNDLE_FILE} in {folder}: {_create_hint(folder)}")
    record = records.read_json(json_path)
    if not isinstance(record, dict):
        raise ValueError(f"{json_path} must hold a JSON object")
    missing = [k for k in ("model_sha256", "image_size", "channels", "class_names", "threshold") if k not in record]
    if missing:
        raise ValueError(f"{json_path} lacks {', '.join(missing)}: not a bundle from save_bundle")
    return record


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Load a bundle written by :func:`save_bundle`, checking it first.

    ``model.keras`` must match the sha256 recorded in ``bundle.json`` (a replaced or corrupted model
    is refused) and is loaded with ``keras.saving.load_model(..., safe_mode=True)``, which never runs
    code stored in the file. Raises ``FileNotFoundError`` (saying how to create the bundle) if the
    folder or a file is missing, ``ValueError`` if ``bundle.json`` is unreadable or the checksum differs.
    """
    import keras  # noqa: PLC0415

    folder = Path(bundle_dir)
    record = _read_record(folder)
    model_path = folder / str(record.get("model_file", MODEL_FILE))
    if not model_path.is_file():
        raise FileNotFoundError(f"no {model_path.name} in {folder}: {_create_hint(folder)}")
    if records.sha256_file(model_path) != record["model_sha256"]:
        raise ValueError(
            f"{model_path.name} in {folder} does not match the checksum recorded in "
            f"{BUNDLE_FILE}: it was changed or replaced after the bundle was saved; "
            "save the bundle again"
        )
    reference = _load_reference(record, folder)
    model = keras.saving.load_model(str(model_path), safe_mode=True)
    return Bundle(model=model, config=record, path=folder, reference=reference)
