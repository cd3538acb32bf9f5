"""Read CT slices stored as DICOM and turn them into Hounsfield units and display windows.

A scanner stores integers; ``HU = stored * RescaleSlope + RescaleIntercept`` (air ≈ -1000 HU,
water 0 HU, cortical bone ≈ +1000 HU and more). Pixels outside the reconstructed field of view carry
a *padding value* (often -2000 or -3024 HU); they become air (-1024 HU) so a model does not see
them as structure. A *window* maps ``width`` HU centred on ``level`` HU to 0…1 brightness; strong
RSNA 2022 cervical-spine solutions fed three windows as a CNN's colour channels (:func:`multi_window`).

>>> from pydicom.data import get_testdata_file
>>> hu, info = read_dicom_hu(get_testdata_file("CT_small.dcm"))
>>> hu.shape, info["pixel_spacing_mm"], multi_window(hu).shape
((128, 128), (0.661468, 0.661468), (128, 128, 3))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: HU given to padding pixels and to anything below :data:`MIN_VALID_HU`.
AIR_HU = -1024.0
#: Values below this (HU) are not tissue but padding or out-of-field markers.
MIN_VALID_HU = -2000.0
#: Named display windows ``(width, level)`` in HU; the channel order of :func:`multi_window`.
WINDOWS: dict[str, tuple[float, float]] = {"bone": (2000.0, 500.0), "soft": (400.0, 40.0), "wide": (2500.0, 480.0)}


class DicomError(ValueError):
    """A DICOM file that cannot be turned into an image; the message names the file and why."""


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm`` suffix or the ``DICM`` magic at byte 128 (a missing file gives False)."""
    path = Path(path)
    return path.suffix.lower() == ".dcm" or _has_magic(path)


def _dcmread(path: Path):
    """Parse a DICOM file (pixels read, not decoded) and its header; :class:`DicomError` if unusable."""
    import pydicom  # noqa: PLC0415 - keep importing the package light
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    if path.stat().st_size == 0:
        raise DicomError(f"{path}: is empty (0 bytes), not a DICOM file")
    try:
        ds = pydicom.dcmread(path, force=not _has_magic(path))  # force: files without the 128-byte preamble
    except InvalidDicomError as exc:
        raise DicomError(f"{path}: is not a DICOM file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage input
        raise DicomError(f"{path}: cannot be parsed as DICOM ({type(exc).__name__}: {exc})") from exc
    info = _header_info(ds, path)
    if not info["has_pixel_data"]:
        raise DicomError(f"{path}: has no pixel data (PixelData element missing)")
    return ds, info


def _decoder_problem(uid: str) -> str:
    """Why pixel data in this transfer syntax may not decode: no decoder, missing plugin, or bad data."""
    from pydicom.pixels import get_decoder  # noqa: PLC0415

    if not uid:
        return "the file does not say how its pixels are encoded"
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        return "pydicom has no decoder for this transfer syntax"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        return f"unsupported here, no decoder plugin is installed (needs one of: {missing})"
    return "a decoder is installed but the compressed data are corrupt or unsupported"


def _float_or(value, default: float) -> float:
    """``float(value)``, the first of a multi-valued attribute, or ``default``."""
    if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _header_info(ds, path: Path) -> dict:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    padding = ds.get("PixelPaddingValue")
    return {
        "path": path.as_posix(),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "frames": int(_float_or(ds.get("NumberOfFrames", 1), 1)),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "modality": str(ds.get("Modality", "")),
        "pixel_spacing_mm": (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) >= 2 else None,
        "slice_thickness_mm": _float_or(ds.get("SliceThickness"), float("nan")),
        "rescale_slope": _float_or(ds.get("RescaleSlope"), 1.0),
        "rescale_intercept": _float_or(ds.get("RescaleIntercept"), 0.0),
        "padding_value": None if padding is None else _float_or(padding, float("nan")),
        "window_center": _float_or(ds.get("WindowCenter"), float("nan")),
        "window_width": _float_or(ds.get("WindowWidth"), float("nan")),
        "transfer_syntax_uid": "" if uid is None else str(uid),
        "transfer_syntax": "unknown (no TransferSyntaxUID in the file meta)"
        if uid is None
        else getattr(uid, "name", "") or str(uid),
        "has_pixel_data": "PixelData" in ds,
    }


def read_dicom_header(path: str | os.PathLike) -> dict:
    """A DICOM file's header, pixels not decoded (fast; used by data discovery).

    Keys: ``rows``, ``columns`` (pixels), ``frames``, ``samples_per_pixel``, ``modality``,
    ``pixel_spacing_mm`` (row, column in mm, or None), ``slice_thickness_mm``, ``rescale_slope``,
    ``rescale_intercept``, ``padding_value`` (stored value or None), ``window_center``,
    ``window_width`` (HU, NaN if absent), ``transfer_syntax`` (name) and ``transfer_syntax_uid``,
    ``photometric_interpretation``, ``has_pixel_data`` and ``path``. FileNotFoundError for a
    missing file; :class:`DicomError` if it is not DICOM or has no pixel data.
    """
    return _dcmread(Path(path))[1]


def _stored_pixels(ds, info: dict, path: Path, max_pixels: int | None) -> np.ndarray:
    """The stored (rows, columns) integers of a single-frame, single-sample slice."""
    n_pixels = info["rows"] * info["columns"] * max(info["frames"], 1)
    if max_pixels is not None and n_pixels > max_pixels:
        raise DicomError(
            f"{path}: {info['columns']}x{info['rows']}x{info['frames']} = {n_pixels} pixels exceeds "
            f"the limit of {max_pixels} pixels; refusing to decode it"
        )
    if info["frames"] > 1:
        raise DicomError(f"{path}: is a multi-frame DICOM ({info['frames']} frames); pass a single 2-D slice")
    if info["samples_per_pixel"] != 1:
        raise DicomError(
            f"{path}: is a colour DICOM ({info['samples_per_pixel']} samples per pixel, "
            f"{info['photometric_interpretation']}); a CT slice has one"
        )
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoders raise RuntimeError, NotImplementedError, ...
        uid = info["transfer_syntax_uid"]
        raise DicomError(
            f"{path}: cannot decode the pixel data with transfer syntax {info['transfer_syntax']} "
            f"({uid or 'no UID'}): {_decoder_problem(uid)} ({type(exc).__name__}: {str(exc).strip()})"
        ) from exc
    if stored.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D slice, got pixel data of shape {stored.shape}")
    return stored


def read_dicom_hu(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """One DICOM slice in Hounsfield units: float32 (rows, columns), and its header info.

    ``hu = stored * RescaleSlope + RescaleIntercept`` (1 and 0 when absent); stored values equal to
    ``PixelPaddingValue`` and HU below :data:`MIN_VALID_HU` become :data:`AIR_HU`. ``info`` is
    :func:`read_dicom_header`'s plus ``n_padding_pixels``. Raises as :func:`read_dicom_header`, and
    :class:`DicomError` for a multi-frame or colour file, more than ``max_pixels`` (rows × columns ×
    frames), or a transfer syntax that cannot be decoded here (the message names it and why).
    """
    path = Path(path)
    ds, info = _dcmread(path)
    stored = _stored_pixels(ds, info, path, max_pixels)
    hu = stored.astype(np.float32) * np.float32(info["rescale_slope"]) + np.float32(info["rescale_intercept"])
    invalid = hu < MIN_VALID_HU
    if info["padding_value"] is not None and np.isfinite(info["padding_value"]):
        invalid |= stored == info["padding_value"]
    hu[invalid] = AIR_HU
    info["n_padding_pixels"] = int(invalid.sum())
    return hu, info


def read_dicom_unit(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """A DICOM slice as float32 (rows, columns) in [0, 1]: CT through the bone window, other modalities min-max."""
    hu, info = read_dicom_hu(path, max_pixels=max_pixels)
    if info["modality"].upper() in ("CT", "") or info["rescale_intercept"] != 0:
        return window(hu, *WINDOWS["bone"])
    lo, hi = float(hu.min()), float(hu.max())
    unit = (hu - lo) / (hi - lo) if hi > lo else np.zeros_like(hu)
    return (1.0 - unit if info["photometric_interpretation"] == "MONOCHROME1" else unit).astype(np.float32)


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU (any shape) → float32 brightness in [0, 1]: ``[level - width/2, level + width/2]`` HU → ``[0, 1]``."""
    if not np.isfinite(width) or width <= 0:
        raise ValueError(f"window width must be a positive number of HU, got {width!r}")
    if not np.isfinite(level):
        raise ValueError(f"window level must be a finite number of HU, got {level!r}")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(level - width / 2.0)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def multi_window(hu: np.ndarray, names: tuple[str, ...] = ("bone", "soft", "wide")) -> np.ndarray:
    """Named :data:`WINDOWS` of an (H, W) slice in HU stacked as channels: float32 (H, W, len(names))."""
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"multi_window expects a 2-D slice (H, W), got shape {hu.shape}")
    unknown = [n for n in names if n not in WINDOWS]
    if unknown:
        raise ValueError(f"unknown window(s) {unknown}; choose from {', '.join(WINDOWS)}")
    return np.stack([window(hu, *WINDOWS[n]) for n in names], axis=-1)
