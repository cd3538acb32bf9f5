"""Predict fracture probabilities for image files with a saved model bundle.

One code path serves the command line (``cspine predict``), the GUI (:mod:`cspine_utils.gui`)
and notebooks:

    paths (files, folders, globs) -> :func:`expand_paths` -> for each file
    :func:`cspine_utils.pipeline.load_and_preprocess` (the bundle's ``image_size`` and
    ``crop_roi``, exactly as in training) -> :meth:`cspine_utils.modelbundle.Bundle.predict_proba`
    -> :class:`PredictionResult` (file, probability, label, error)

A file that cannot be used (unsupported type, empty or corrupt, a DICOM without pixels, an image
larger than the pixel limit) gives a result whose ``error`` says so in plain words; the other
files are still predicted. Uploaded bytes (the GUI) go through :func:`predict_bytes`, which writes
them to a temporary file that is deleted straight afterwards.

Example
-------
>>> bundle = modelbundle.load_bundle(find_bundles()["cnn"])               # doctest: +SKIP
>>> for r in predict_paths(["data/synthetic/cpu/val"], bundle):      # doctest: +SKIP
...     print(r.file, r.probability, r.label, r.error)

Teaching tool, not for diagnosis.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import config

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .modelbundle import Bundle

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "SUPPORTED_SUFFIXES",
    "SUPPORTED_TYPES_TEXT",
    "BUNDLE_PREFERENCE",
    "NO_MODEL_HINT",
    "PredictionResult",
    "find_bundles",
    "default_bundle_dir",
    "no_model_message",
    "check_threshold",
    "expand_paths",
    "explain_error",
    "predict_paths",
    "predict_bytes",
    "probabilities",
    "gradcam_heatmaps",
    "overlay_rgb",
    "results_to_frame",
]

NOT_FOR_DIAGNOSIS = (
    "Teaching tool, not for diagnosis: these models were trained on small or "
    "synthetic data and must never be used to make decisions about a patient."
)
"""The note shown by the GUI and printed (once, on stderr) by ``cspine predict``."""

SUPPORTED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
"""File name endings accepted by :func:`predict_paths`, the GUI upload and ``cspine predict``."""

SUPPORTED_TYPES_TEXT = "PNG, JPEG, BMP, TIFF or DICOM (.dcm)"

BUNDLE_PREFERENCE = ("vgg16", "cnn")
"""Bundle folder names under ``artifacts/models/`` in order of preference for the default."""

NO_MODEL_HINT = (
    "run notebooks/03_cnn_training.ipynb first (it trains the compact CNN and saves "
    "the bundle 'cnn'); notebooks/04_vgg_finetuning_tuner.ipynb adds 'vgg16'; "
    "`make run` runs them all"
)
"""What to do when no bundle exists yet."""


@dataclass
class PredictionResult:
    """The outcome for one file.

    Attributes
    ----------
    file : str
        The file as given (or found in a folder / by a glob); for an upload, its name.
    probability : float or None
        Fracture probability in [0, 1]; None when ``error`` is set.
    label : str or None
        The decision at the threshold (``"fracture"`` if ``probability >= threshold``, else
        ``"normal"``); None when ``error`` is set.
    error : str or None
        Why the file could not be used, in plain words; None on success.
    threshold : float or None
        The threshold the label was decided at.
    image : numpy.ndarray or None
        The model input, shape ``(S, S)`` float32 in [0, 1] (after the bundle's preprocessing;
        DICOM in the bone window). Not part of :meth:`to_dict`.
    heatmap : numpy.ndarray or None
        Grad-CAM heat map ``(S, S)`` in [0, 1], when requested.
    gradcam_file : str or None
        Where the Grad-CAM overlay PNG was written, when requested.
    gradcam_error : str or None
        Why Grad-CAM could not be computed, when requested and it failed.
    """

    file: str
    probability: float | None = None
    label: str | None = None
    error: str | None = None
    threshold: float | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    gradcam_file: str | None = None
    gradcam_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the file was predicted."""
        return self.error is None

    def to_dict(self) -> dict:
        """``{"file", "probability", "label", "error"}`` (+ ``"gradcam"`` when one was written)."""
        out = {"file": self.file, "probability": self.probability, "label": self.label, "error": self.error}
        if self.gradcam_file is not None:
            out["gradcam"] = self.gradcam_file
        return out


# --------------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------------
def _models_dir(models_dir: str | os.PathLike | None) -> Path:
    return Path(models_dir) if models_dir is not None else config.artifacts_dir() / "models"


def find_bundles(models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The model bundles saved under ``artifacts/models/`` (folders with a ``bundle.json``).

    Parameters
    ----------
    models_dir : str or PathLike, optional
        Default ``config.artifacts_dir() / "models"`` (``CSPINE_ARTIFACTS`` is honoured).

    Returns
    -------
    dict
        ``{name: folder}``, preferred first (:data:`BUNDLE_PREFERENCE`: vgg16, then cnn), then
        the others alphabetically. Empty if there are none.
    """
    from .modelbundle import BUNDLE_FILE  # noqa: PLC0415 - cheap, models imports Keras lazily

    root = _models_dir(models_dir)
    if not root.is_dir():
        return {}
    found = {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / BUNDLE_FILE).is_file()
    }
    order = [n for n in BUNDLE_PREFERENCE if n in found] + sorted(n for n in found if n not in BUNDLE_PREFERENCE)
    return {n: found[n] for n in order}


def default_bundle_dir(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The preferred bundle under ``artifacts/models/`` (vgg16, then cnn, then any), or None."""
    bundles = find_bundles(models_dir)
    return next(iter(bundles.values()), None)


def no_model_message(models_dir: str | os.PathLike | None = None) -> str:
    """The plain-words message for "no trained model yet", naming the folder searched."""
    return f"no trained model found in {_models_dir(models_dir)}: {NO_MODEL_HINT}"


def check_threshold(threshold: float | None) -> float | None:
    """Return ``threshold`` as a float, or None.

    Raises
    ------
    ValueError
        If it is not a number in [0, 1].
    """
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    return value


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def _has_glob_magic(text: str) -> bool:
    return glob.has_magic(text) if hasattr(glob, "has_magic") else bool(re.search(r"[*?[]", text))


def _folder_images(folder: Path) -> list[Path]:
    """Supported files under ``folder`` (recursive, hidden files and folders skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED_SUFFIXES:
                out.append(Path(root) / name)
    return out


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str | None]]:
    """Turn command-line style arguments into a list of files.

    Each argument may be a file (kept whatever its type, so that an unsupported one is reported),
    a folder (searched recursively for :data:`SUPPORTED_SUFFIXES`) or a glob pattern such as
    ``"scans/*.png"`` or ``"scans/**/*.dcm"`` (matches that are folders are searched too). An
    existing file or folder is taken literally even if its name contains ``*``, ``?`` or ``[``.
    Duplicates are dropped, order is kept.

    Returns
    -------
    list of (str, str or None)
        ``(file, error)``: ``error`` is None for a file to predict, or says why the argument
        gave nothing (no such file, empty folder, glob without matches).
    """
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(name: str, error: str | None = None) -> None:
        key = os.path.normpath(os.path.abspath(name)) if error is None else f"\0{name}"
        if key not in seen:
            seen.add(key)
            out.append((name, error))

    def add_folder(folder: Path, shown: str) -> None:
        files = _folder_images(folder)
        if not files:
            add(shown, f"folder holds no {SUPPORTED_TYPES_TEXT} files")
        for f in files:
            add(str(f))

    for arg in paths:
        text = os.fspath(arg)
        p = Path(text).expanduser()
        if p.is_file():
            add(str(p))
        elif p.is_dir():
            add_folder(p, text)
        elif _has_glob_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                add(text, "no file matches this pattern")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    add_folder(mp, m)
                elif mp.is_file():
                    add(m)
        else:
            add(text, "file not found")
    return out


# --------------------------------------------------------------------------------------------
# Errors in plain words
# --------------------------------------------------------------------------------------------
def _strip_path(message: str, path: str) -> str:
    for prefix in (f"{path}: ", f"{path}:", path):
        if message.startswith(prefix):
            return message[len(prefix) :].strip()
    return message.replace(path, "the file").strip()


def explain_error(exc: BaseException, path: str | os.PathLike, max_pixels: int | None = None) -> str:
    """A one-line, plain-words reason why ``path`` could not be predicted.

    The first words name the kind of problem: ``unsupported file type``, ``empty file``,
    ``corrupt or unreadable file``, ``DICOM without pixel data``, ``image too large``,
    ``file not found``; then the detail, without the (possibly temporary) path.
    """
    path = os.fspath(path)
    message = _strip_path(str(exc), path)
    low = message.lower()
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if "0 bytes" in low or "is empty" in low:
        return "empty file (0 bytes): nothing to read"
    if "no pixel data" in low:
        return "DICOM without pixel data: the file has a header but no image to classify"
    if "exceeds the limit" in low or "decompression bomb" in low:
        limit = f"the limit is {max_pixels:,} pixels" if max_pixels else "over the pixel limit"
        dims = re.search(r"(\d+)x(\d+)(?:x\d+)?", message)
        size = f"{int(dims[1]) * int(dims[2]):,} pixels ({dims[1]}x{dims[2]}), " if dims else ""
        return f"image too large: {size}{limit}; refused without decoding it"
    if "text file" in low:
        return f"corrupt or unreadable file: it {message}"
    if isinstance(exc, ValueError):
        return f"corrupt or unreadable file: {message}"
    return f"could not be processed ({type(exc).__name__}: {message})"


def _unsupported(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return None
    if suffix == "":
        from . import dicom  # noqa: PLC0415

        try:
            if dicom.is_dicom(path):  # DICOM files often have no extension
                return None
        except OSError:
            pass
        return f"unsupported file type (no extension): use {SUPPORTED_TYPES_TEXT}"
    return f"unsupported file type '{suffix}': use {SUPPORTED_TYPES_TEXT}"


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
def _load_one(path: str, bundle: Bundle, max_pixels: int) -> np.ndarray:
    from . import pipeline  # noqa: PLC0415

    crop = bool(bundle.preprocessing.get("crop_roi", False))
    return pipeline.load_and_preprocess(path, bundle.image_size, crop_roi=crop, max_pixels=max_pixels)


def probabilities(bundle: Bundle, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Fracture probabilities ``(N,)`` of model inputs ``(N, S, S, 1)``.

    The same model and numbers as :meth:`Bundle.predict_proba`, but batches go through
    ``model.predict_on_batch``: ``model.predict`` builds a data pipeline on every call, which
    costs ~140 ms per call on a 2-core CPU - most of the GUI's budget for one image.
    """
    if images.shape[1:] != (bundle.image_size, bundle.image_size, bundle.channels):
        return bundle.predict_proba(images, batch_size=batch_size)  # its error names the shape
    step = max(1, int(batch_size))
    out = [
        np.asarray(bundle.model.predict_on_batch(images[i : i + step]), dtype=np.float32).reshape(-1)
        for i in range(0, images.shape[0], step)
    ]
    return np.concatenate(out)


def gradcam_heatmaps(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """Grad-CAM heat maps ``(N, S, S)`` in [0, 1] of model inputs ``(N, S, S, 1)``
    (:func:`cspine_utils.explain.gradcam` at the bundle model's Grad-CAM layer)."""
    from . import explain  # noqa: PLC0415 - Grad-CAM lives in explain.py

    return np.asarray(explain.gradcam(bundle.model, images), dtype=np.float32)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Grad-CAM heat map over the model input as uint8 RGB ``(S, S, 3)`` (``explain.overlay``)."""
    from . import explain  # noqa: PLC0415

    rgb = np.asarray(explain.overlay(np.asarray(image, dtype=np.float32), heatmap, alpha))
    if rgb.dtype != np.uint8:
        scale = 255.0 if float(np.nanmax(rgb, initial=0.0)) <= 1.0 + 1e-6 else 1.0
        rgb = np.clip(np.round(rgb.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return rgb


def _unique_png(out_dir: Path, stem: str, used: set[str]) -> Path:
    safe = re.sub(r"[^\w.() -]+", "_", stem).strip() or "image"
    name, k = f"{safe}_gradcam.png", 1
    while name in used or (out_dir / name).exists():
        k += 1
        name = f"{safe}_{k}_gradcam.png"
    used.add(name)
    return out_dir / name


def _predict_entries(
    entries: Sequence[tuple[str, str | None, str | None]],
    bundle: Bundle,
    threshold: float | None,
    *,
    gradcam: bool,
    gradcam_dir: str | os.PathLike | None,
    max_pixels: int,
    batch_size: int,
    keep_images: bool,
) -> list[PredictionResult]:
    """The single prediction path. ``entries``: ``(shown name, path to read, error)``."""
    thr = bundle.threshold if threshold is None else check_threshold(threshold)
    names = bundle.class_names
    results: list[PredictionResult] = []
    images: list[np.ndarray] = []
    good: list[int] = []
    for shown, path, error in entries:
        result = PredictionResult(file=shown, threshold=thr)
        results.append(result)
        if error is None and path is not None:
            error = _unsupported(path)
        if error is None and path is not None:
            try:
                images.append(_load_one(path, bundle, max_pixels))
                good.append(len(results) - 1)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a plain message
                error = explain_error(exc, path, max_pixels)
        result.error = error
    if not good:
        return results
    batch = np.stack(images)
    probs = probabilities(bundle, batch, batch_size)
    for i, p in zip(good, probs):
        r = results[i]
        r.probability = float(p)
        r.label = names[1] if r.probability >= thr else names[0]
    want_cam = gradcam or gradcam_dir is not None
    if want_cam:
        try:
            heatmaps = gradcam_heatmaps(bundle, batch)
        except Exception as exc:  # noqa: BLE001
            heatmaps = None
            for i in good:
                results[i].gradcam_error = f"Grad-CAM could not be computed ({type(exc).__name__}: {exc})"
        if heatmaps is not None:
            out_dir = Path(gradcam_dir) if gradcam_dir is not None else None
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
            used: set[str] = set()
            for k, i in enumerate(good):
                results[i].heatmap = heatmaps[k]
                if out_dir is not None:
                    from PIL import Image  # noqa: PLC0415

                    target = _unique_png(out_dir, Path(results[i].file).stem, used)
                    Image.fromarray(overlay_rgb(batch[k, ..., 0], heatmaps[k])).save(target)
                    results[i].gradcam_file = str(target)
    if keep_images or want_cam:
        for k, i in enumerate(good):
            results[i].image = batch[k, ..., 0]
    return results


def predict_paths(
    paths: Iterable[str | os.PathLike],
    bundle: Bundle,
    threshold: float | None = None,
    gradcam_dir: str | os.PathLike | None = None,
    *,
    max_pixels: int | None = None,
    batch_size: int = 32,
    keep_images: bool = False,
) -> list[PredictionResult]:
    """Fracture probabilities for files, folders (recursive) and glob patterns.

    Every file is read and preprocessed by ``pipeline.load_and_preprocess`` with the bundle's
    ``image_size`` and ``preprocessing["crop_roi"]`` - as in training and in
    :meth:`Bundle.predict_files` - then predicted in batches. Files that cannot be used are
    reported in :attr:`PredictionResult.error` and do not stop the others.

    Parameters
    ----------
    paths : iterable of str or PathLike
        Files, folders and glob patterns (see :func:`expand_paths`).
    bundle : cspine_utils.modelbundle.Bundle
        From :func:`cspine_utils.modelbundle.load_bundle`.
    threshold : float, optional
        Decision threshold in [0, 1]; default the bundle's (chosen on validation data).
    gradcam_dir : str or PathLike, optional
        If given, write a Grad-CAM overlay PNG per predicted file there
        (``<stem>_gradcam.png``) and keep the heat maps in the results.
    max_pixels : int, optional
        Refuse images with more pixels (width x height); default
        ``data.DEFAULT_MAX_PIXELS`` (50 million).
    batch_size : int, default 32
    keep_images : bool, default False
        Keep each model input ``(S, S)`` in :attr:`PredictionResult.image`.

    Returns
    -------
    list of PredictionResult
        One per file (or per argument that gave no file), in order.

    Raises
    ------
    ValueError
        If ``threshold`` is outside [0, 1].
    """
    from . import data  # noqa: PLC0415

    thr = check_threshold(threshold)
    limit = int(max_pixels or data.DEFAULT_MAX_PIXELS)
    entries = [(name, None if err else name, err) for name, err in expand_paths(paths)]
    return _predict_entries(
        entries,
        bundle,
        thr,
        gradcam=False,
        gradcam_dir=gradcam_dir,
        max_pixels=limit,
        batch_size=batch_size,
        keep_images=keep_images,
    )


def _safe_suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def predict_bytes(
    name: str,
    content: bytes | bytearray | memoryview,
    bundle: Bundle,
    threshold: float | None = None,
    *,
    gradcam: bool = False,
    max_pixels: int | None = None,
) -> PredictionResult:
    """Predict one uploaded file given as bytes (the GUI's path).

    The bytes go to a temporary file (same suffix as ``name``, so the type is recognised
    the same way as on disk) that is deleted before returning; then the file takes exactly the
    path of :func:`predict_paths`.

    Parameters
    ----------
    name : str
        The file's name as uploaded (only its suffix is used to read it).
    content : bytes-like
    bundle, threshold, max_pixels
        As in :func:`predict_paths`.
    gradcam : bool, default False
        Also compute the Grad-CAM heat map (:attr:`PredictionResult.heatmap`).

    Returns
    -------
    PredictionResult
        With :attr:`~PredictionResult.image` (the model input) set when predicted.
    """
    from . import data  # noqa: PLC0415

    thr = check_threshold(threshold)
    limit = int(max_pixels or data.DEFAULT_MAX_PIXELS)
    shown = Path(str(name)).name or "upload"
    unsupported = _unsupported(shown) if _safe_suffix(shown) else None
    if unsupported is not None:
        return _predict_entries(
            [(shown, None, unsupported)],
            bundle,
            thr,
            gradcam=False,
            gradcam_dir=None,
            max_pixels=limit,
            batch_size=1,
            keep_images=False,
        )[0]
    fd, tmp = tempfile.mkstemp(prefix="cspine_upload_", suffix=_safe_suffix(shown))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(content))
        result = _predict_entries(
            [(shown, tmp, None)],
            bundle,
            thr,
            gradcam=gradcam,
            gradcam_dir=None,
            max_pixels=limit,
            batch_size=1,
            keep_images=True,
        )[0]
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
    if result.error:
        result.error = result.error.replace(tmp, shown)
    return result


def results_to_frame(results: Sequence[PredictionResult]):
    """A ``pandas.DataFrame`` with columns file, probability, label, threshold, error."""
    import pandas as pd  # noqa: PLC0415

    return pd.DataFrame(
        [
            {"file": r.file, "probability": r.probability, "label": r.label, "threshold": r.threshold, "error": r.error}
            for r in results
        ],
        columns=["file", "probability", "label", "threshold", "error"],
    )
