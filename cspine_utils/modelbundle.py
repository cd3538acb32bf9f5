"""The model bundle: ``model.keras`` plus ``bundle.json`` (image size, preprocessing, threshold,
validation metrics, weights provenance, data fingerprint, versions, sha256 of the model)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config
from .hardware import as_float32, compute_dtypes
from .pretrained import WeightsInfo

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import pandas as pd

__all__ = [
    "MODEL_FILE",
    "BUNDLE_FILE",
    "BUNDLE_FORMAT_VERSION",
    "OUTPUT_LAYER",
    "manifest_fingerprint",
    "Bundle",
    "save_bundle",
    "load_bundle",
]


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


MODEL_FILE = "model.keras"


BUNDLE_FILE = "bundle.json"


BUNDLE_FORMAT_VERSION = 1


OUTPUT_LAYER = "fracture_probability"


def manifest_fingerprint(manifest: pd.DataFrame, root: str | os.PathLike | None = None) -> str:
    """A sha256 that changes whenever the data of a run changes: files, labels or splits.

    Rows ``path \\t label \\t split`` are sorted (row order does not matter) and hashed. Paths
    are compared as text (posix form): moving the data changes the fingerprint unless ``root``
    is given, in which case paths are taken relative to it.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``path`` (or ``file``) and ``label``; ``split`` if present.
    root : str or PathLike, optional
        Make paths relative to this folder first.

    Returns
    -------
    str
        64 hex characters.

    Raises
    ------
    ValueError
        If the path or label column is missing.
    """
    columns = getattr(manifest, "columns", ())
    path_col = "path" if "path" in columns else ("file" if "file" in columns else None)
    if path_col is None or "label" not in columns:
        raise ValueError(f"manifest needs columns 'path' (or 'file') and 'label'; found {list(columns)}")
    splits = manifest["split"] if "split" in columns else [""] * len(manifest)
    rows = []
    for path, label, split in zip(manifest[path_col], manifest["label"], splits):
        p = Path(str(path))
        if root is not None:
            try:
                p = p.relative_to(Path(root))
            except ValueError:
                pass
        split_text = "" if split is None else str(split)
        rows.append(f"{p.as_posix()}\t{str(label).strip().lower()}\t{split_text}")
    return hashlib.sha256("\n".join(sorted(rows)).encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _jsonable(value: Any, what: str) -> Any:
    """Convert NumPy scalars/arrays and paths so ``json`` can write them."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"{what} holds {value!r} ({type(value).__name__}), which JSON cannot store")


def _create_hint(folder: Path) -> str:
    return (
        f"train a model and save it with modelbundle.save_bundle(model, {str(folder)!r}, ...) "
        "(the training notebooks do this; `make run` runs them all)"
    )


@dataclass
class Bundle:
    """A trained model with everything needed to use it correctly.

    Attributes
    ----------
    model : keras.Model
        Input ``(B, S, S, C)`` float32 in [0, 1], output ``(B, 1)`` probability.
    config : dict
        The contents of ``bundle.json``.
    path : pathlib.Path
        The bundle folder.
    """

    model: keras.Model
    config: dict = field(repr=False)
    path: Path

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

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Fracture probabilities of preprocessed images.

        Parameters
        ----------
        images : numpy.ndarray, shape (N, S, S, C) or (S, S, C), float in [0, 1]
            As produced by ``pipeline.load_and_preprocess`` with this bundle's settings.
        batch_size : int, default 32

        Returns
        -------
        numpy.ndarray, shape (N,), float32
            Probability of the class ``class_names[1]``.

        Raises
        ------
        ValueError
            If the shape does not match the bundle, or values lie outside [0, 1] (e.g. 0-255
            grey levels or Hounsfield units).
        """
        x = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if x.shape == expected:
            x = x[np.newaxis]
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"images must have shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) for this bundle, got {np.shape(images)}"
            )
        if x.shape[0] == 0:
            return np.zeros((0,), dtype=np.float32)
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if not np.isfinite(x).all() or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"images must be in [0, 1] (the bone window), got values from "
                f"{lo:g} to {hi:g}; preprocess with pipeline.load_and_preprocess"
            )
        out = self.model.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """Fracture probabilities of image files, preprocessed as at training time.

        Uses ``pipeline.load_and_preprocess(path, image_size, crop_roi)`` with the bundle's
        ``image_size`` and ``preprocessing["crop_roi"]``.

        Returns
        -------
        numpy.ndarray, shape (N,), float32
        """
        from . import pipeline  # noqa: PLC0415 - lazy

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        crop = bool(self.preprocessing.get("crop_roi", False))
        images = [pipeline.load_and_preprocess(p, self.image_size, crop_roi=crop) for p in paths]
        if not images:
            return np.zeros((0,), dtype=np.float32)
        return self.predict_proba(np.stack(images), batch_size=batch_size)

    def classify(self, probabilities: Iterable[float]) -> list[str]:
        """Class names for probabilities: ``class_names[1]`` where ``p >= threshold``."""
        names = self.class_names
        return [names[1] if float(p) >= self.threshold else names[0] for p in probabilities]


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
) -> Path:
    """Save a trained model as a bundle: ``model.keras`` + ``bundle.json``.

    ``bundle.json`` records: ``format_version``, ``name``, ``created`` (UTC, ISO 8601),
    ``model_file`` and ``model_sha256``, ``class_names``, ``image_size`` (pixels),
    ``channels``, ``input_range`` ([0, 1]), ``preprocessing`` (e.g. ``crop_roi``, the HU
    window), ``threshold`` (probability), ``val_metrics``, ``weights`` (a
    :class:`WeightsInfo` as a dict, or null), ``data_fingerprint`` (see
    :func:`manifest_fingerprint`), ``seed``, ``profile``, and ``versions`` (tensorflow, keras,
    numpy, cspine_utils, the Keras backend), ``compute_dtype`` (always ``"float32"``: a model
    trained under a mixed policy is saved through :func:`as_float32`) and
    ``trained_compute_dtypes`` (e.g. ``["bfloat16", "float32"]``). Both files are written to
    temporary names first and then renamed, so a bundle is never half-written.

    Parameters
    ----------
    model : keras.Model
        Input ``(None, image_size, image_size, channels)``.
    bundle_dir : str or PathLike
        Folder (created; files in it are replaced).
    class_names : sequence of 2 str, default ("normal", "fracture")
        Label order; the model's probability is that of ``class_names[1]``.
    image_size, channels : int
        Input geometry; must match the model.
    preprocessing : dict, optional
        JSON-serialisable settings used by ``pipeline.load_and_preprocess``, e.g.
        ``{"crop_roi": False, "window": [400, 1800]}``.
    threshold : float, default 0.5
        Decision threshold in [0, 1], e.g. from :func:`choose_threshold`.
    val_metrics : dict, optional
        Validation metrics (floats).
    weights_info : WeightsInfo, optional
    data_fingerprint : str, optional
    seed : int, optional
    profile : str or Profile, optional
        Validated with :func:`cspine_utils.config.get_profile` (None: ``CSPINE_PROFILE`` or
        the default).
    name : str, optional
        Default: the model's name.

    Returns
    -------
    pathlib.Path
        The bundle folder.

    Raises
    ------
    ValueError
        If a value is invalid or does not match the model (the value is named), or the profile
        is unknown.
    """
    import keras  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

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
    threshold = _fraction("threshold", threshold, allow_one=True)
    prof = profile if isinstance(profile, config.Profile) else config.get_profile(profile)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if weights_info is not None and not isinstance(weights_info, WeightsInfo):
        raise ValueError(f"weights_info must be a WeightsInfo or None, got {weights_info!r}")

    trained_dtypes = sorted(compute_dtypes(model))
    model = as_float32(model)  # bundles predict the same on any machine, whatever trained them
    folder = Path(bundle_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    tmp_model = folder / f".{MODEL_FILE}.tmp.keras"
    model.save(str(tmp_model))
    os.replace(tmp_model, model_path)

    record = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": str(name or model.name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_file": MODEL_FILE,
        "model_sha256": _sha256(model_path),
        "class_names": names,
        "image_size": size,
        "channels": channels,
        "input_range": [0.0, 1.0],
        "preprocessing": _jsonable(dict(preprocessing or {}), "preprocessing"),
        "threshold": threshold,
        "val_metrics": _jsonable(dict(val_metrics or {}), "val_metrics"),
        "weights": weights_info.as_dict() if weights_info is not None else None,
        "data_fingerprint": data_fingerprint,
        "seed": None if seed is None else int(seed),
        "profile": prof.name,
        "compute_dtype": "float32",
        "trained_compute_dtypes": trained_dtypes,
        "versions": {
            "tensorflow": _package_version("tensorflow"),
            "keras": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy": np.__version__,
            "cspine_utils": __version__,
        },
    }
    tmp_json = folder / f".{BUNDLE_FILE}.tmp"
    tmp_json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_json, folder / BUNDLE_FILE)
    return folder


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Load a bundle written by :func:`save_bundle`, checking it first.

    ``model.keras`` must match the sha256 recorded in ``bundle.json`` (a replaced or corrupted
    model is refused), and is loaded with ``keras.saving.load_model(..., safe_mode=True)``, which
    never runs code stored in the file.

    Parameters
    ----------
    bundle_dir : str or PathLike

    Returns
    -------
    Bundle

    Raises
    ------
    FileNotFoundError
        If the folder, ``bundle.json`` or ``model.keras`` is missing (the message says how to
        create the bundle).
    ValueError
        If ``bundle.json`` is unreadable or the checksum does not match.
    """
    import keras  # noqa: PLC0415

    folder = Path(bundle_dir)
    json_path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"no model bundle folder {folder}: {_create_hint(folder)}")
    if not json_path.is_file():
        raise FileNotFoundError(f"no {BUNDLE_FILE} in {folder}: {_create_hint(folder)}")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{json_path} must hold a JSON object")
    missing = [k for k in ("model_sha256", "image_size", "channels", "class_names", "threshold") if k not in record]
    if missing:
        raise ValueError(f"{json_path} lacks {', '.join(missing)}: not a bundle from save_bundle")
    model_path = folder / str(record.get("model_file", MODEL_FILE))
    if not model_path.is_file():
        raise FileNotFoundError(f"no {model_path.name} in {folder}: {_create_hint(folder)}")
    if _sha256(model_path) != record["model_sha256"]:
        raise ValueError(
            f"{model_path.name} in {folder} does not match the checksum recorded in "
            f"{BUNDLE_FILE}: it was changed or replaced after the bundle was saved; "
            "save the bundle again"
        )
    model = keras.saving.load_model(str(model_path), safe_mode=True)
    return Bundle(model=model, config=record, path=folder)
