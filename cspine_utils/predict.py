"""Fracture probabilities for image files with a saved model bundle: one path for CLI, GUI and notebooks.

    paths (files, folders, globs) -> :func:`expand_paths` -> for each file ``guard.check_input``
    (refuse what is not a CT slice) -> ``pipeline.load_and_preprocess`` (the bundle's ``image_size``
    and ``crop_roi``, as in training) -> ``Bundle.assess`` (calibrated probability, distance to the
    training data) -> :class:`PredictionResult` (file, probability, label, flags, error)

A file that cannot be used (unsupported type, empty or corrupt, DICOM without pixels, over the pixel
limit, not a CT slice: MR, too small, wrong shape, colour) gets a plain-words ``error``; the other files
are still predicted. ``flags`` say in words when a probability should not be believed (not a
bone-window slice; unlike the slices the model learned from). Uploaded bytes (the GUI) go
through :func:`predict_bytes` via a temporary file deleted straight afterwards.

>>> bundle = modelbundle.load_bundle(default_bundle_dir())         # doctest: +SKIP
>>> for r in predict_paths(["data/synthetic/cpu/val"], bundle):    # doctest: +SKIP
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
from .trust import UNLIKE_TRAINING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .modelbundle import Bundle

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
    """The outcome for one file; ``probability`` and ``label`` are None when ``error`` says why it failed."""

    file: str  # as given (or found in a folder / by a glob); for an upload, its name
    probability: float | None = None  # calibrated fracture probability in [0, 1]
    label: str | None = None  # "fracture" if probability >= threshold else "normal"
    error: str | None = None  # why the file could not be used, in plain words
    threshold: float | None = None  # the threshold the label was decided at
    # the model input (S, S) float32 in [0, 1] (DICOM in the bone window), and its Grad-CAM (S, S) in [0, 1]
    image: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    gradcam_file: str | None = None  # where the Grad-CAM overlay PNG was written
    gradcam_error: str | None = None  # why Grad-CAM could not be computed
    heatmap_name: str = "Grad-CAM"  # the method (and layer) that drew ``heatmap``: :func:`heatmap_name`
    flags: list[str] = field(default_factory=list)  # warnings to show beside the probability
    distance: float | None = None  # distance to the training data (trust.FeatureReference)
    unlike_training: bool | None = None  # True: beyond the bundle's cut-off (None: the bundle has no reference)

    @property
    def ok(self) -> bool:
        """True when the file was predicted."""
        return self.error is None

    def to_dict(self) -> dict:
        """``{"file", "probability", "label", "error", "flags", "unlike_training_data", "distance"}``
        (+ ``"gradcam"`` when one was written)."""
        out = {"file": self.file, "probability": self.probability, "label": self.label, "error": self.error}
        out.update(flags=list(self.flags), unlike_training_data=self.unlike_training, distance=self.distance)
        if self.gradcam_file is not None:
            out["gradcam"] = self.gradcam_file
        return out


def _models_dir(models_dir: str | os.PathLike | None) -> Path:
    return Path(models_dir) if models_dir is not None else config.artifacts_dir() / "models"


def find_bundles(models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{name: folder}`` of the bundles (folders with a ``bundle.json``) in ``models_dir``.

    ``models_dir`` defaults to ``config.artifacts_dir() / "models"``. Order: :data:`BUNDLE_PREFERENCE`
    (vgg16, then cnn), then the others alphabetically; empty if there are none.
    """
    from .modelbundle import BUNDLE_FILE  # noqa: PLC0415 - keeps Keras out of the import

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
    """The preferred bundle folder (vgg16, then cnn, then any), or None."""
    return next(iter(find_bundles(models_dir).values()), None)


def no_model_message(models_dir: str | os.PathLike | None = None) -> str:
    """The plain-words message for "no trained model yet", naming the folder searched."""
    return f"no trained model found in {_models_dir(models_dir)}: {NO_MODEL_HINT}"


def check_threshold(threshold: float | None) -> float | None:
    """``threshold`` as a float (or None); ValueError unless it is a number in [0, 1]."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not np.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    return value


def _folder_images(folder: Path) -> list[Path]:
    """Supported files under ``folder`` (recursive, hidden files and folders skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [
            Path(root) / n
            for n in sorted(files)
            if not n.startswith(".") and Path(n).suffix.lower() in SUPPORTED_SUFFIXES
        ]
    return out


def _expand_one(text: str) -> list[tuple[str, str | None]]:
    """``(file, error)`` pairs for one argument: a file, a folder or a glob pattern."""
    p = Path(text).expanduser()
    if p.is_file():
        return [(str(p), None)]
    if p.is_dir():
        files = _folder_images(p)
        return [(str(f), None) for f in files] or [(text, f"folder holds no {SUPPORTED_TYPES_TEXT} files")]
    if not glob.has_magic(text):
        return [(text, "file not found")]
    matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
    if not matches:
        return [(text, "no file matches this pattern")]
    return [pair for m in matches if Path(m).exists() for pair in _expand_one(m)]


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str | None]]:
    """Turn command-line style arguments into ``(file, error)`` pairs.

    An argument may be a file (kept whatever its type, so that an unsupported one is reported), a
    folder (searched recursively for :data:`SUPPORTED_SUFFIXES`) or a glob such as ``"scans/**/*.dcm"``
    (matching folders are searched too). An existing name is taken literally even if it contains
    ``*``, ``?`` or ``[``. ``error`` is None for a file to predict, or says why the argument gave
    nothing (no such file, empty folder, glob without matches). Duplicates are dropped, order kept.
    """
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for arg in paths:
        for name, error in _expand_one(os.fspath(arg)):
            key = os.path.normpath(os.path.abspath(name)) if error is None else f"\0{name}"
            if key not in seen:
                seen.add(key)
                out.append((name, error))
    return out


def _strip_path(message: str, path: str) -> str:
    for prefix in (f"{path}: ", f"{path}:", path):
        if message.startswith(prefix):
            return message[len(prefix) :].strip()
    return message.replace(path, "the file").strip()


def explain_error(exc: BaseException, path: str | os.PathLike, max_pixels: int | None = None) -> str:
    """A one-line reason why ``path`` could not be predicted, without the (maybe temporary) path.

    It starts with the kind of problem: ``unsupported file type``, ``empty file``, ``corrupt or
    unreadable file``, ``DICOM without pixel data``, ``image too large`` or ``file not found``.
    """
    message = _strip_path(str(exc), os.fspath(path))
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
    """Why ``path``'s type is not accepted, or None (a DICOM file may have no extension)."""
    suffix = Path(path).suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return None
    if suffix:
        return f"unsupported file type '{suffix}': use {SUPPORTED_TYPES_TEXT}"
    from . import dicom  # noqa: PLC0415

    try:
        if dicom.is_dicom(path):
            return None
    except OSError:
        pass
    return f"unsupported file type (no extension): use {SUPPORTED_TYPES_TEXT}"


def heatmap_method(bundle: Bundle) -> tuple[str, str | None]:
    """``(method, layer)`` of ``explain.gradcam`` for this bundle: the one notebook 05 chose on validation
    (``explain.json`` beside the bundle), else plain Grad-CAM at the default layer (``None``)."""
    from . import records  # noqa: PLC0415

    path = Path(bundle.path) / "explain.json"
    chosen = records.read_json(path) if path.is_file() else {}
    return str(chosen.get("method", "gradcam")), chosen.get("layer")


def heatmap_name(bundle: Bundle) -> str:
    """The heat map's method in words, e.g. ``"HiResCAM at block3_conv3"``."""
    method, layer = heatmap_method(bundle)
    name = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM", "layercam": "LayerCAM"}.get(method, method)
    return f"{name} at {layer}" if layer else name


def gradcam_heatmaps(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """Heat maps ``(N, S, S)`` in [0, 1] of model inputs ``(N, S, S, 1)`` by :func:`heatmap_method`."""
    from . import explain  # noqa: PLC0415

    method, layer = heatmap_method(bundle)
    return np.asarray(explain.gradcam(bundle.model, images, layer, method=method), dtype=np.float32)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Grad-CAM heat map over the model input ``(S, S)`` as uint8 RGB ``(S, S, 3)`` (``explain.overlay``)."""
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


def _read_inputs(entries, bundle: Bundle, max_pixels: int, results: list[PredictionResult]) -> list[np.ndarray]:
    """Preprocess every usable entry ``(shown, path, error)``; set ``error`` on the others."""
    from . import guard, pipeline  # noqa: PLC0415

    crop = bool(bundle.preprocessing.get("crop_roi", False))
    images = []
    for result, (_, path, error) in zip(results, entries):
        if error is None and path is not None:
            error = _unsupported(path)
        if error is None and path is not None:
            try:
                check = guard.check_input(path, max_pixels)
                error, result.flags = check.refusal, list(check.flags)
                if error is None:
                    images.append(
                        pipeline.load_and_preprocess(path, bundle.image_size, crop_roi=crop, max_pixels=max_pixels)
                    )
            except Exception as exc:  # noqa: BLE001 - every failure becomes a plain message
                error = explain_error(exc, path, max_pixels)
        result.error = error
    return images


def _add_gradcam(good: list[PredictionResult], bundle: Bundle, batch: np.ndarray, out_dir: Path | None) -> None:
    """Grad-CAM heat maps into ``good`` (and overlay PNGs into ``out_dir`` when given)."""
    try:
        heatmaps = gradcam_heatmaps(bundle, batch)
    except Exception as exc:  # noqa: BLE001
        for r in good:
            r.gradcam_error = f"Grad-CAM could not be computed ({type(exc).__name__}: {exc})"
        return
    if out_dir is not None:
        from PIL import Image  # noqa: PLC0415

        out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    name = heatmap_name(bundle)
    for r, image, heatmap in zip(good, batch[..., 0], heatmaps):
        r.heatmap, r.heatmap_name = heatmap, name
        if out_dir is not None:
            target = _unique_png(out_dir, Path(r.file).stem, used)
            Image.fromarray(overlay_rgb(image, heatmap)).save(target)
            r.gradcam_file = str(target)


def _predict_entries(
    entries, bundle: Bundle, thr, max_pixels: int, *, batch_size=1, keep_images=False, gradcam=False, gradcam_dir=None
) -> list[PredictionResult]:
    """The single prediction path. ``entries``: ``(shown name, path to read or None, error or None)``."""
    thr = bundle.threshold if thr is None else thr
    results = [PredictionResult(file=shown, threshold=thr) for shown, _, _ in entries]
    images = _read_inputs(entries, bundle, max_pixels, results)
    good = [r for r in results if r.ok]
    if not good:
        return results
    batch = np.stack(images)
    scores = bundle.assess(batch, batch_size)
    for r, p, d, unlike in zip(good, scores["probability"], scores["distance"], scores["unlike"]):
        r.probability = float(p)
        r.label = bundle.class_names[1] if r.probability >= thr else bundle.class_names[0]
        if bundle.reference is not None:
            r.distance, r.unlike_training = float(d), bool(unlike)
            if unlike:
                r.flags.append(f"{UNLIKE_TRAINING} (distance {d:.1f}, cut-off {bundle.reference.cutoff:.1f})")
    want_cam = gradcam or gradcam_dir is not None
    if want_cam:
        _add_gradcam(good, bundle, batch, Path(gradcam_dir) if gradcam_dir is not None else None)
    if keep_images or want_cam:
        for r, image in zip(good, batch[..., 0]):
            r.image = image
    return results


def _pixel_limit(max_pixels: int | None) -> int:
    from . import data  # noqa: PLC0415

    return int(max_pixels or data.DEFAULT_MAX_PIXELS)


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
    """Fracture probabilities for files, folders (recursive) and globs (:func:`expand_paths`), in order.

    Each file is preprocessed as in training (the bundle's ``image_size`` and ``crop_roi``, as
    :meth:`Bundle.predict_files` does) and predicted in batches of ``batch_size``; a file that cannot
    be used gets an ``error`` and does not stop the others. ``threshold`` in [0, 1] (ValueError
    otherwise) defaults to the bundle's, chosen on validation data. ``gradcam_dir``: write a Grad-CAM
    overlay PNG per predicted file there (``<stem>_gradcam.png``). ``max_pixels`` (width x height)
    defaults to ``data.DEFAULT_MAX_PIXELS``. ``keep_images`` keeps each model input ``(S, S)``.
    """
    thr = check_threshold(threshold)
    entries = [(name, None if err else name, err) for name, err in expand_paths(paths)]
    limit = _pixel_limit(max_pixels)
    return _predict_entries(
        entries, bundle, thr, limit, batch_size=batch_size, keep_images=keep_images, gradcam_dir=gradcam_dir
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
    """Predict one uploaded file given as bytes (the GUI's path); ``image`` holds the model input.

    The bytes go to a temporary file with ``name``'s suffix (so the type is recognised as on disk),
    deleted before returning; the file then takes the path of :func:`predict_paths`.
    ``gradcam=True`` also computes the heat map; the other arguments are those of :func:`predict_paths`.
    """
    thr, limit = check_threshold(threshold), _pixel_limit(max_pixels)
    shown = Path(str(name)).name or "upload"
    unsupported = _unsupported(shown) if _safe_suffix(shown) else None
    if unsupported is not None:
        return _predict_entries([(shown, None, unsupported)], bundle, thr, limit)[0]
    fd, tmp = tempfile.mkstemp(prefix="cspine_upload_", suffix=_safe_suffix(shown))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(content))
        entry = [(shown, tmp, None)]
        result = _predict_entries(entry, bundle, thr, limit, gradcam=gradcam, keep_images=True)[0]
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
    if result.error:
        result.error = result.error.replace(tmp, shown)
    return result


def results_to_frame(results: Sequence[PredictionResult]):
    """A ``pandas.DataFrame`` with columns file, probability, label, threshold, error, warnings, distance."""
    import pandas as pd  # noqa: PLC0415

    columns = ["file", "probability", "label", "threshold", "error"]
    rows = [
        {**{c: getattr(r, c) for c in columns}, "warnings": "; ".join(r.flags), "distance": r.distance} for r in results
    ]
    return pd.DataFrame(rows, columns=[*columns, "warnings", "distance"])
