"""Read CT slices stored as DICOM and turn them into Hounsfield units and display windows.

A CT scanner stores integers; the Hounsfield unit (HU) value of a pixel is
``stored * RescaleSlope + RescaleIntercept`` (air ≈ -1000 HU, water = 0 HU, cortical bone
≈ +1000 HU and more). Pixels outside the reconstructed field of view carry a *padding value*
(often -2000 or -3024 after rescaling); they are replaced by air (-1024 HU) so that they do not
look like a structure to a model.

A *window* maps an HU range to display brightness: ``width`` HU centred on ``level`` HU become
0…1, everything below is black and everything above white. Strong solutions of the RSNA 2022
cervical-spine fracture challenge fed three windows as the three colour channels of a CNN,
see :func:`multi_window`.

Example
-------
>>> from pydicom.data import get_testdata_file
>>> hu, info = read_dicom_hu(get_testdata_file("CT_small.dcm"))
>>> hu.shape, info["pixel_spacing_mm"]
((128, 128), (0.661468, 0.661468))
>>> multi_window(hu).shape
(128, 128, 3)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "AIR_HU",
    "MIN_VALID_HU",
    "WINDOWS",
    "DicomError",
    "is_dicom",
    "read_dicom_header",
    "read_dicom_hu",
    "window",
    "multi_window",
]

AIR_HU = -1024.0
"""HU value given to padding pixels and to anything below :data:`MIN_VALID_HU`."""

MIN_VALID_HU = -2000.0
"""Values below this (in HU) are not tissue but padding or out-of-field markers."""

WINDOWS: dict[str, tuple[float, float]] = {
    "bone": (2000.0, 500.0),
    "soft": (400.0, 40.0),
    "wide": (2500.0, 480.0),
}
"""Named display windows as ``(width, level)`` in HU; the channel order of :func:`multi_window`."""

_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"


class DicomError(ValueError):
    """A DICOM file that cannot be turned into an image; the message names the file and why."""


def is_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` has a ``.dcm`` suffix or carries the ``DICM`` magic at byte 128.

    Only the first 132 bytes are read. A missing or unreadable file gives ``False``.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(_DICM_OFFSET + len(_DICM_MAGIC))
    except OSError:
        return False
    return head[_DICM_OFFSET:] == _DICM_MAGIC


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(_DICM_OFFSET + 4)[_DICM_OFFSET:] == _DICM_MAGIC
    except OSError:
        return False


def _dcmread(path: Path):
    """Parse a DICOM file (pixel data read but not decoded); raise :class:`DicomError` if not DICOM."""
    import pydicom  # noqa: PLC0415 - keep import of the package light
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    if path.stat().st_size == 0:
        raise DicomError(f"{path}: is empty (0 bytes), not a DICOM file")
    try:
        # force=True also reads files written without the 128-byte preamble.
        return pydicom.dcmread(path, force=not _has_magic(path))
    except InvalidDicomError as exc:
        raise DicomError(f"{path}: is not a DICOM file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage input
        raise DicomError(f"{path}: cannot be parsed as DICOM ({type(exc).__name__}: {exc})") from exc


def _transfer_syntax(ds) -> tuple[str, str]:
    """The transfer syntax UID of a dataset and its readable name ('' when absent)."""
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None:
        return "", "unknown (no TransferSyntaxUID in the file meta)"
    return str(uid), getattr(uid, "name", str(uid)) or str(uid)


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
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _first(value):
    """First element of a multi-valued DICOM attribute (or the value itself)."""
    if value is None:
        return None
    try:
        return value[0] if not isinstance(value, (str, bytes)) else value
    except (TypeError, IndexError):
        return value


def _header_info(ds, path: Path) -> dict:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    spacing_mm = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) >= 2 else None
    uid, name = _transfer_syntax(ds)
    padding = ds.get("PixelPaddingValue")
    return {
        "path": path.as_posix(),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "frames": int(_float_or(ds.get("NumberOfFrames", 1), 1)),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "modality": str(ds.get("Modality", "")),
        "pixel_spacing_mm": spacing_mm,  # (row spacing, column spacing) in mm
        "slice_thickness_mm": _float_or(ds.get("SliceThickness"), float("nan")),
        "rescale_slope": _float_or(ds.get("RescaleSlope"), 1.0),
        "rescale_intercept": _float_or(ds.get("RescaleIntercept"), 0.0),
        "padding_value": None if padding is None else _float_or(padding, float("nan")),
        "window_center": _float_or(_first(ds.get("WindowCenter")), float("nan")),
        "window_width": _float_or(_first(ds.get("WindowWidth")), float("nan")),
        "transfer_syntax_uid": uid,
        "transfer_syntax": name,
        "has_pixel_data": "PixelData" in ds,
    }


def read_dicom_header(path: str | os.PathLike) -> dict:
    """Read a DICOM file's header without decoding its pixels (fast; used by data discovery).

    Returns
    -------
    dict
        ``rows``, ``columns`` (pixels), ``frames``, ``modality``, ``pixel_spacing_mm``
        (row, column in mm, or ``None``), ``slice_thickness_mm``, ``rescale_slope``,
        ``rescale_intercept``, ``padding_value`` (stored value or ``None``), ``window_center``,
        ``window_width`` (HU, NaN if absent), ``transfer_syntax`` (name and ``..._uid``),
        ``photometric_interpretation`` and ``path``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DicomError
        If the file is not DICOM or has no pixel data.
    """
    path = Path(path)
    ds = _dcmread(path)
    info = _header_info(ds, path)
    if not info["has_pixel_data"]:
        raise DicomError(f"{path}: has no pixel data (PixelData element missing)")
    return info


def read_dicom_hu(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """Read one DICOM slice and return it in Hounsfield units.

    ``hu = stored * RescaleSlope + RescaleIntercept`` (slope 1 and intercept 0 when the tags are
    absent). Pixels equal to ``PixelPaddingValue`` (a stored value, compared before rescaling)
    and any HU below :data:`MIN_VALID_HU` (-2000) are set to :data:`AIR_HU` (-1024).

    Parameters
    ----------
    path
        The ``.dcm`` file (any name; the content decides).
    max_pixels
        Refuse slices with more than this many pixels (rows × columns × frames) before decoding.

    Returns
    -------
    hu : np.ndarray
        float32 array of shape (rows, columns), in HU.
    info : dict
        The header fields of :func:`read_dicom_header`, plus ``n_padding_pixels``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DicomError
        If the file is not DICOM, has no pixel data, is multi-frame or colour, is larger than
        ``max_pixels``, or its transfer syntax cannot be decoded here (the message names it).
    """
    path = Path(path)
    ds = _dcmread(path)
    info = _header_info(ds, path)
    if not info["has_pixel_data"]:
        raise DicomError(f"{path}: has no pixel data (PixelData element missing)")
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
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise RuntimeError, NotImplementedError, ...
        raise DicomError(
            f"{path}: cannot decode the pixel data with transfer syntax {info['transfer_syntax']} "
            f"({info['transfer_syntax_uid'] or 'no UID'}): {_decoder_problem(info['transfer_syntax_uid'])} "
            f"({type(exc).__name__}: {str(exc).strip()})"
        ) from exc
    stored = np.asarray(stored)
    if stored.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D slice, got pixel data of shape {stored.shape}")
    hu = stored.astype(np.float32) * np.float32(info["rescale_slope"]) + np.float32(info["rescale_intercept"])
    invalid = hu < MIN_VALID_HU
    if info["padding_value"] is not None and np.isfinite(info["padding_value"]):
        invalid |= stored == info["padding_value"]
    hu[invalid] = AIR_HU
    info["n_padding_pixels"] = int(invalid.sum())
    return hu, info


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to display brightness: ``[level - width/2, level + width/2]`` HU → ``[0, 1]``.

    Parameters
    ----------
    hu
        Array of any shape, in HU.
    width, level
        Window width and centre, in HU; ``width`` must be positive.

    Returns
    -------
    np.ndarray
        float32 array of the same shape, clipped to [0, 1].
    """
    if not np.isfinite(width) or width <= 0:
        raise ValueError(f"window width must be a positive number of HU, got {width!r}")
    if not np.isfinite(level):
        raise ValueError(f"window level must be a finite number of HU, got {level!r}")
    low = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def multi_window(hu: np.ndarray, names: tuple[str, ...] = ("bone", "soft", "wide")) -> np.ndarray:
    """Stack several named windows of a slice as channels (bone, soft tissue, wide by default).

    Parameters
    ----------
    hu
        Array of shape (H, W), in HU.
    names
        Keys of :data:`WINDOWS`, one per output channel.

    Returns
    -------
    np.ndarray
        float32 array of shape (H, W, len(names)) in [0, 1].
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"multi_window expects a 2-D slice (H, W), got shape {hu.shape}")
    unknown = [n for n in names if n not in WINDOWS]
    if unknown:
        raise ValueError(f"unknown window(s) {unknown}; choose from {', '.join(WINDOWS)}")
    return np.stack([window(hu, *WINDOWS[n]) for n in names], axis=-1)
