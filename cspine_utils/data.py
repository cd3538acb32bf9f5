"""Find the images of a dataset, group near-copies of the same source, and split by group.

Data flow: files → **manifest** (a DataFrame with one row per image: ``path``, ``label``,
``group``, ``split``, ...) → tf.data pipeline (:mod:`cspine_utils.pipeline`) → model.

Layouts understood by :func:`discover`
--------------------------------------
``kaggle``
    The public Kaggle "cervical fracture" dataset: ``cervical fracture/{train,val}/{fracture,normal}/*``.
    Pass either the folder ``cervical fracture`` itself or the folder that contains it.
``synthetic``
    A dataset made by :func:`cspine_utils.phantom.generate_dataset` (has ``dataset.json`` and
    ``manifest.csv``); the subject id is the group, fracture masks are attached.
``split-folders``
    ``<dir>/<split>/<class>/*`` with split names train, val/valid/validation, test (any case).
``class-folders``
    ``<dir>/<class>/*``; the data have no split of their own.
``csv``
    A CSV file with columns ``path,label`` and optionally ``group`` and ``split``; pass the CSV
    file itself, or a folder holding ``labels.csv``. Relative paths are relative to the CSV's folder.

Class folder names (and CSV labels) are matched case-insensitively through :data:`LABEL_ALIASES`
(``Abnormal`` → fracture, ``healthy`` → normal, ``1``/``0``, ...). A folder that wraps a dataset
(one sub-folder and no images, as after unzipping) is entered automatically.

Groups and leakage
------------------
The Kaggle set is *pre-augmented*: ``CSFDV1B10 (18)-sharpened-rotated3.png`` and
``CSFDV1B10 (18)-rotated1.png`` are copies of one source image, and its own train/val folders
share sources. A model validated on copies of its training images looks better than it is.
:func:`assign_groups` gives every image a ``group`` (name stem, subject id, or near-duplicate
cluster by perceptual hash) and :func:`grouped_stratified_split` never puts a group in two splits.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from . import config, dicom

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_HASH_SIZE",
    "DEFAULT_HASH_DISTANCE",
    "IMAGE_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "LABELS",
    "LABEL_ALIASES",
    "SPLIT_ALIASES",
    "MANIFEST_COLUMNS",
    "ImageReadError",
    "Discovery",
    "read_image",
    "probe_image",
    "normalize_label",
    "normalize_split",
    "discover",
    "check_two_classes",
    "source_group_from_name",
    "perceptual_hash",
    "hash_images",
    "near_duplicate_clusters",
    "assign_groups",
    "grouped_stratified_split",
    "cross_split_leakage",
    "choose_split",
    "save_manifest",
    "load_manifest",
    "artifacts_manifest_path",
    "load_course_manifest",
]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width × height, pixels) that is decoded; bigger files are refused unread."""

DEFAULT_HASH_SIZE = 32
"""Side of the difference hash: 32 × 32 = 1024 bits (64 bits are too coarse for CT slices)."""

DEFAULT_HASH_DISTANCE = 51
"""Largest Hamming distance (bits of 1024, about 5 %) between the hashes of two near-duplicates."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_EXTENSIONS = frozenset({".dcm"})
LABELS = ("fracture", "normal")

LABEL_ALIASES: dict[str, str] = {
    **{k: "fracture" for k in ("fracture", "fractures", "fractured", "abnormal", "positive", "pos", "1")},
    **{
        k: "normal"
        for k in (
            "normal",
            "healthy",
            "negative",
            "neg",
            "no_fracture",
            "nofracture",
            "no fracture",
            "non-fracture",
            "0",
        )
    },
}
"""Folder names and CSV labels (lower-cased) accepted for each class."""

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
"""Split folder names (lower-cased) and the split they stand for."""

MANIFEST_COLUMNS = ["path", "label", "group", "split", "width", "height", "mode", "bytes"]
"""Columns every manifest from :func:`discover` starts with."""

SYNTHETIC_COLUMNS = ["subject_id", "level", "fracture_type", "difficulty", "mask_path"]
KAGGLE_FOLDER = "cervical fracture"
CSV_NAME = "labels.csv"
SYNTHETIC_MARKER = "dataset.json"
SYNTHETIC_MANIFEST = "manifest.csv"
_IGNORED_DIRS = {"__macosx", "masks"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L"


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------
# Reading one image
# --------------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: is empty (0 bytes)")


def _not_an_image_reason(path: Path) -> str:
    """A plain explanation of why PIL could not identify ``path``."""
    try:
        head = path.read_bytes()[:256]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "is empty (0 bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text and all(c.isprintable() or c in "\r\n\t" for c in text[:200]):
        snippet = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"is a text file, not an image (starts with {snippet!r})"
    return (
        "is not an image in a supported format (PNG, JPEG, BMP, TIFF or DICOM); "
        f"it starts with bytes {head[:8].hex(' ')}"
    )


def _is_dicom_file(path: Path) -> bool:
    """DICOM by suffix, or by magic for files whose suffix is not an image format."""
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    return path.suffix.lower() not in IMAGE_EXTENSIONS and dicom.is_dicom(path)


@contextmanager
def _open_pil(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open lazily (header only), refuse images over ``max_pixels``, always close."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's warning (89 Mpx by default).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: {_not_an_image_reason(path)}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: cannot be opened as an image ({exc})") from exc
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageReadError(
                f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} pixels "
                "(possible decompression bomb); refusing to decode it. Pass a larger max_pixels "
                "if the image is genuine."
            )
        if w == 0 or h == 0:
            raise ImageReadError(f"{path}: has no pixels ({w}x{h})")
        yield im
    finally:
        im.close()


def _pil_to_unit(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to float32 (H, W) grey levels in [0, 1]."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / np.float32(65535)
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(2**32 - 1)
        return (np.clip(arr, 0, None) / scale).astype(np.float32)
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "LA":
        arr = np.asarray(im, dtype=np.float32) / np.float32(255)
        return arr[..., 0] * arr[..., 1]
    elif im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32) / np.float32(255)
    grey = arr[..., :3] @ _LUMA
    if arr.shape[-1] == 4:
        grey = grey * arr[..., 3]
    return np.clip(grey, 0.0, 1.0).astype(np.float32, copy=False)


def _read_dicom_unit(path: Path, max_pixels: int) -> np.ndarray:
    """DICOM → [0, 1]: the bone window of the HU values for CT; min-max for other modalities."""
    try:
        hu, info = dicom.read_dicom_hu(path, max_pixels=max_pixels)
    except dicom.DicomError as exc:
        raise ImageReadError(str(exc)) from exc
    if info["modality"].upper() in ("CT", "") or info["rescale_intercept"] != 0:
        return dicom.window(hu, *dicom.WINDOWS["bone"])
    lo, hi = float(hu.min()), float(hu.max())
    unit = (hu - lo) / (hi - lo) if hi > lo else np.zeros_like(hu)
    if info["photometric_interpretation"] == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file as grey levels.

    Every format and mode is converted the same way, so a grayscale slice and an RGB copy of it
    give the same array:

    * 8-bit grey (``L``, ``1``): value / 255;
    * 16-bit grey PNG/TIFF (``I;16``): value / 65535, the full 16-bit depth (not clipped to 255);
      32-bit ``I``: / 65535 when all values fit in 16 bits, else / (2**32 - 1);
    * RGB and palette: luminance 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as PIL's ``L``);
    * with alpha (``RGBA``, ``LA``, transparent palette): composited on **black** (grey × alpha),
      so transparent areas read as air;
    * float TIFF (``F``): assumed to be in [0, 1], clipped;
    * DICOM (``.dcm`` or the ``DICM`` magic): Hounsfield units through the bone window
      (width 2000, level 500 HU) for CT; other modalities are min-max scaled.

    The first frame of a multi-frame file is used; EXIF orientation is ignored.

    Parameters
    ----------
    path
        The image file.
    max_pixels
        Images with more than this many pixels (width × height) are refused before any pixel is
        decoded, guarding against decompression bombs.

    Returns
    -------
    np.ndarray
        float32 array of shape (H, W), values in [0, 1].

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ImageReadError
        If the file is empty, truncated, not an image, too large, or an undecodable DICOM.
    """
    path = Path(path)
    _check_file(path)
    if _is_dicom_file(path):
        return _read_dicom_unit(path, max_pixels)
    with _open_pil(path, max_pixels) as im:
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(f"{path}: is truncated or corrupt and cannot be decoded ({exc})") from exc
        return _pil_to_unit(im)


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read an image file's size and mode without decoding its pixels.

    PNG files are also verified (chunk checksums up to the end), which finds truncated files;
    :meth:`PIL.Image.Image.verify` does not check every format, so a truncated JPEG is only
    found when decoded (:func:`read_image`).

    Returns
    -------
    dict
        ``width``, ``height`` (pixels), ``mode`` (PIL mode, or ``'DICOM'``) and ``bytes``
        (file size).

    Raises
    ------
    FileNotFoundError, ImageReadError
        As :func:`read_image`.
    """
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size
    if _is_dicom_file(path):
        try:
            info = dicom.read_dicom_header(path)
        except dicom.DicomError as exc:
            raise ImageReadError(str(exc)) from exc
        w, h = info["columns"], info["rows"]
        if w * h * max(info["frames"], 1) > max_pixels:
            raise ImageReadError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels:,} pixels")
        return {"width": w, "height": h, "mode": "DICOM", "bytes": size}
    with _open_pil(path, max_pixels) as im:
        w, h, mode = im.width, im.height, im.mode
        try:
            im.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
            raise ImageReadError(f"{path}: is truncated or corrupt ({exc})") from exc
    return {"width": w, "height": h, "mode": mode, "bytes": size}


# --------------------------------------------------------------------------------------------
# Labels, splits and layouts
# --------------------------------------------------------------------------------------------
def normalize_label(name: object) -> str | None:
    """``'fracture'``, ``'normal'``, or ``None`` for a name that is not a known alias."""
    return LABEL_ALIASES.get(str(name).strip().lower())


def normalize_split(name: object) -> str | None:
    """``'train'``, ``'val'``, ``'test'``, or ``None`` for a name that is not a split name."""
    return SPLIT_ALIASES.get(str(name).strip().lower())


def _alias_help() -> str:
    by_label: dict[str, list[str]] = {}
    for alias, label in LABEL_ALIASES.items():
        by_label.setdefault(label, []).append(alias)
    return "; ".join(f"{label}: {', '.join(aliases)}" for label, aliases in by_label.items())


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name.lower() not in _IGNORED_DIRS


def _subdirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


def _is_candidate(path: Path) -> bool:
    """A file discovery should try to read (image or DICOM by suffix, or no suffix)."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS or suffix == ""


@dataclass
class Discovery:
    """What :func:`discover` found.

    Attributes
    ----------
    manifest
        One row per readable image: :data:`MANIFEST_COLUMNS` (``path`` absolute POSIX string,
        ``label`` fracture/normal, ``group``, ``split`` train/val/test or '' when the data have no
        split folders, ``width``/``height`` in pixels, ``mode``, ``bytes``), ``phash`` (16 hex
        digits, when perceptual hashes were computed) and, for the synthetic layout,
        ``subject_id``, ``level``, ``fracture_type``, ``difficulty`` and ``mask_path``.
    rejected
        Files that could not be used, columns ``path`` and ``reason``.
    layout
        ``'kaggle'``, ``'synthetic'``, ``'split-folders'``, ``'class-folders'`` or ``'csv'``.
    root
        The dataset folder (or the CSV file) that was read.
    """

    manifest: pd.DataFrame
    rejected: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    layout: str = ""
    root: Path = Path(".")

    def summary(self) -> str:
        """One line: layout, image counts per label and split, and rejected files."""
        m = self.manifest
        labels = ", ".join(f"{k} {v}" for k, v in m["label"].value_counts().sort_index().items())
        splits = m["split"].replace("", "(none)").value_counts().sort_index()
        split_txt = ", ".join(f"{k} {v}" for k, v in splits.items())
        return (
            f"{self.layout} layout at {self.root}: {len(m)} images ({labels}; splits: {split_txt}; "
            f"{m['group'].nunique()} groups), {len(self.rejected)} rejected"
        )


def _resolve_layout(path: Path) -> tuple[Path, str]:
    """Find the dataset root under ``path`` and name its layout."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return path, "csv"
        raise ValueError(f"{path} is a file; pass a dataset folder or a CSV manifest (.csv)")
    if (path / SYNTHETIC_MARKER).is_file() and (path / SYNTHETIC_MANIFEST).is_file():
        return path, "synthetic"
    if path.name.lower() == KAGGLE_FOLDER:
        return path, "kaggle"
    subdirs = _subdirs(path)
    for d in subdirs:
        if d.name.lower() == KAGGLE_FOLDER:
            return d, "kaggle"
    if (path / CSV_NAME).is_file():
        return path / CSV_NAME, "csv"
    if subdirs and all(normalize_split(d.name) for d in subdirs):
        return path, "split-folders"
    if subdirs and all(normalize_label(d.name) for d in subdirs):
        return path, "class-folders"
    has_files = any(f.is_file() and _visible(f) and _is_candidate(f) and f.suffix for f in path.iterdir())
    if len(subdirs) == 1 and not has_files:
        return _resolve_layout(subdirs[0])  # a wrapper folder, e.g. after unzipping
    if not subdirs:
        raise ValueError(
            f"no class folders found in {path}; expected <dir>/<class>/images (class fracture or "
            f"normal), <dir>/<split>/<class>/images, a {CSV_NAME}, or a synthetic dataset"
        )
    names = ", ".join(d.name for d in subdirs)
    unknown = ", ".join(d.name for d in subdirs if not (normalize_split(d.name) or normalize_label(d.name)))
    raise ValueError(
        f"unknown class folder(s) in {path}: {unknown or names} (found: {names}). Class folders "
        f"must be named for a class ({_alias_help()}); split folders train/val/test."
    )


def _probe_row(path: Path, max_pixels: int, rows: list, rejected: list, **fields) -> None:
    """Probe one file; append a manifest row, or a rejection with its reason."""
    try:
        info = probe_image(path, max_pixels=max_pixels)
    except (ImageReadError, FileNotFoundError, OSError) as exc:
        rejected.append({"path": path.absolute().as_posix(), "reason": str(exc).replace(f"{path}: ", "")})
        return
    rows.append(
        {
            "path": path.resolve().as_posix(),
            "label": fields.pop("label"),
            "group": "",
            "split": fields.pop("split", ""),
            **info,
            **fields,
        }
    )


def _scan_class_folder(folder: Path, label: str, split: str, max_pixels: int, rows: list, rejected: list) -> None:
    """Every file under one class folder (recursively), hidden files skipped."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if not _is_candidate(path) and not dicom.is_dicom(path):
            rejected.append(
                {
                    "path": path.absolute().as_posix(),
                    "reason": f"unsupported file type {path.suffix!r} (accepted: "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS | DICOM_EXTENSIONS))})",
                }
            )
            continue
        if path.suffix == "" and not dicom.is_dicom(path):
            rejected.append({"path": path.absolute().as_posix(), "reason": "no file extension and no DICOM header"})
            continue
        _probe_row(path, max_pixels, rows, rejected, label=label, split=split)


def _class_folders(folder: Path) -> list[tuple[Path, str]]:
    """The class sub-folders of ``folder`` with their labels; ValueError for unknown names."""
    subdirs = _subdirs(folder)
    unknown = [d.name for d in subdirs if normalize_label(d.name) is None]
    if unknown:
        raise ValueError(
            f"unknown class folder(s) in {folder}: {', '.join(unknown)} (found: "
            f"{', '.join(d.name for d in subdirs)}). Class folders must be named for a class "
            f"({_alias_help()})."
        )
    return [(d, normalize_label(d.name)) for d in subdirs]


def _reject_loose_files(folder: Path, rejected: list) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file() and _visible(f) and f.suffix.lower() in IMAGE_EXTENSIONS | DICOM_EXTENSIONS:
            rejected.append(
                {"path": f.absolute().as_posix(), "reason": "not inside a class folder, so its label is unknown"}
            )


def _scan_folders(root: Path, max_pixels: int) -> tuple[list, list]:
    """Class folders, or split folders holding class folders, under ``root``."""
    rows: list[dict] = []
    rejected: list[dict] = []
    subdirs = _subdirs(root)
    split_named = [d.name for d in subdirs if normalize_split(d.name)]
    if split_named and len(split_named) < len(subdirs):
        others = [d.name for d in subdirs if not normalize_split(d.name)]
        raise ValueError(
            f"{root} mixes split folders ({', '.join(split_named)}) with other folders "
            f"({', '.join(others)}); use <dir>/<split>/<class>/ or <dir>/<class>/, not both"
        )
    if split_named:
        for split_dir in subdirs:
            _reject_loose_files(split_dir, rejected)
            for class_dir, label in _class_folders(split_dir):
                split = normalize_split(split_dir.name)
                _scan_class_folder(class_dir, label, split, max_pixels, rows, rejected)
    else:
        for class_dir, label in _class_folders(root):
            _scan_class_folder(class_dir, label, "", max_pixels, rows, rejected)
    _reject_loose_files(root, rejected)
    return rows, rejected


def _find_column(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    lower = {c.strip().lower(): c for c in df.columns}
    return next((lower[n] for n in names if n in lower), None)


def _scan_csv(csv_path: Path, max_pixels: int) -> tuple[list, list]:
    """Rows of a ``path,label[,group][,split]`` CSV; paths relative to the CSV's folder."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: cannot be read as a CSV manifest ({exc})") from exc
    path_col = _find_column(table, ("path", "file", "filename", "image", "image_path"))
    label_col = _find_column(table, ("label", "class", "target"))
    if path_col is None or label_col is None:
        raise ValueError(
            f"{csv_path}: a CSV manifest needs columns 'path' and 'label'; "
            f"found {', '.join(map(str, table.columns)) or 'none'}"
        )
    labels = table[label_col].map(normalize_label)
    bad = sorted(set(table.loc[labels.isna(), label_col]))
    if bad:
        raise ValueError(
            f"{csv_path}: unknown label(s) {', '.join(map(repr, bad))} in column "
            f"{label_col!r}; use a class name ({_alias_help()})"
        )
    split_col = _find_column(table, ("split",))
    group_col = _find_column(table, ("group",))
    splits = None
    if split_col:
        splits = table[split_col].map(lambda s: "" if s.strip() == "" else normalize_split(s))
    if splits is not None and splits.isna().any():
        bad = sorted(set(table.loc[splits.isna(), split_col]))
        raise ValueError(f"{csv_path}: unknown split(s) {', '.join(map(repr, bad))}; use train/val/test")
    rows: list[dict] = []
    rejected: list[dict] = []
    for i, rel in enumerate(table[path_col]):
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else csv_path.parent / path
        extra = {"group": table[group_col].iat[i]} if group_col else {}
        _probe_row(
            path,
            max_pixels,
            rows,
            rejected,
            label=labels.iat[i],
            split=splits.iat[i] if splits is not None else "",
            **extra,
        )
    return rows, rejected


def _scan_synthetic(root: Path, max_pixels: int) -> tuple[list, list]:
    """Rows of a dataset from :mod:`cspine_utils.phantom`, read from its ``manifest.csv``."""
    table = pd.read_csv(root / SYNTHETIC_MANIFEST, dtype=str, keep_default_na=False)
    missing = {"file", "label", "split", "subject_id"} - set(table.columns)
    if missing:
        raise ValueError(f"{root / SYNTHETIC_MANIFEST}: missing column(s) {', '.join(sorted(missing))}")
    rows: list[dict] = []
    rejected: list[dict] = []
    for rec in table.to_dict("records"):
        path = root / rec["file"]
        label = normalize_label(rec["label"])
        if label is None:
            rejected.append({"path": path.absolute().as_posix(), "reason": f"unknown label {rec['label']!r}"})
            continue
        mask = root / rec["mask_file"] if rec.get("mask_file") else None
        _probe_row(
            path,
            max_pixels,
            rows,
            rejected,
            label=label,
            split=normalize_split(rec["split"]) or "",
            subject_id=rec["subject_id"],
            level=rec.get("level", ""),
            fracture_type=rec.get("fracture_type", ""),
            difficulty=rec.get("difficulty", ""),
            mask_path=mask.resolve().as_posix() if mask is not None and mask.is_file() else "",
        )
    return rows, rejected


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in df:
            df[col] = ""
    df = df[MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]]
    for col in ("width", "height", "bytes"):
        df[col] = df[col].astype("int64")
    return df.reset_index(drop=True)


def _rejected_frame(rejected: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rejected, columns=["path", "reason"])


def check_two_classes(manifest: pd.DataFrame) -> None:
    """Raise ValueError unless ``manifest`` holds images of both classes (fracture and normal).

    Kept separate from :func:`discover` so that an audit can report on a one-class dataset.
    """
    if len(manifest) == 0:
        raise ValueError("the manifest is empty: no images to classify")
    counts = manifest["label"].value_counts()
    missing = [label for label in LABELS if label not in counts.index]
    if missing:
        found = ", ".join(f"{k!r} ({v} images)" for k, v in counts.items())
        raise ValueError(
            f"only one class found: {found}; a classifier needs images of both "
            f"{' and '.join(map(repr, LABELS))} (missing: {', '.join(missing)}). Check the class "
            "folder names and that every class folder holds images."
        )


def discover(
    data_dir: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_two_classes: bool = True,
    group_method: str = "auto",
    max_distance: int = DEFAULT_HASH_DISTANCE,
) -> Discovery:
    """Find every image of a dataset, its label, split and source group.

    Each file is opened only far enough to read its size and mode (PNGs are also verified, so
    truncated files are found). When groups use perceptual hashes (the default for every layout
    but ``synthetic``) each image is also decoded once, which rejects any file that cannot be
    decoded. A file that cannot be used goes to ``rejected`` with its reason; discovery goes on.

    Parameters
    ----------
    data_dir
        A dataset folder in one of the layouts of this module's docstring, or a CSV manifest.
    max_pixels
        Refuse (reject) images with more pixels than this (decompression-bomb guard).
    require_two_classes
        Call :func:`check_two_classes` (set ``False`` to inspect a one-class dataset).
    group_method
        Passed to :func:`assign_groups`; with ``'auto'`` a CSV's own ``group`` column is kept.
    max_distance
        Hamming distance for near-duplicate clusters (see :func:`near_duplicate_clusters`).

    Returns
    -------
    Discovery
        ``manifest``, ``rejected``, ``layout`` and ``root``.

    Raises
    ------
    FileNotFoundError
        If ``data_dir`` does not exist.
    ValueError
        For an unknown class folder (the message lists the folders found), a CSV without
        ``path``/``label`` columns, no readable image at all, or only one class (when required).
    """
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data directory not found: {path}")
    root, layout = _resolve_layout(path.resolve())
    if layout == "synthetic":
        rows, rejected = _scan_synthetic(root, max_pixels)
    elif layout == "csv":
        rows, rejected = _scan_csv(root, max_pixels)
    else:
        rows, rejected = _scan_folders(root, max_pixels)
    if not rows:
        reasons = "; ".join(f"{Path(r['path']).name}: {r['reason']}" for r in rejected[:3])
        raise ValueError(
            f"no readable images found in {root} ({len(rejected)} files rejected"
            + (f", e.g. {reasons}" if reasons else "")
            + ")"
        )
    manifest = _frame(rows)
    if require_two_classes:
        check_two_classes(manifest)
    method = group_method
    if method == "auto" and layout == "csv" and (manifest["group"].astype(str) != "").all():
        method = "column"
    if _resolve_group_method(manifest, method) in ("hash", "name+hash"):
        manifest, failed = _attach_hashes(manifest, max_pixels)
        rejected += failed
        if len(manifest) == 0:
            raise ValueError(f"no decodable images found in {root} ({len(rejected)} files rejected)")
        if require_two_classes:
            check_two_classes(manifest)
    manifest = assign_groups(manifest, method, max_distance=max_distance)
    return Discovery(manifest=manifest, rejected=_rejected_frame(rejected), layout=layout, root=root)


# --------------------------------------------------------------------------------------------
# Source groups: names, perceptual hashes, near-duplicate clusters
# --------------------------------------------------------------------------------------------
_AUGMENT_WORDS = (
    "rotated|rotate|rot|sharpened|sharpen|flipped|flip|mirrored|augmented|aug|copy|"
    "noise|noisy|zoomed|zoom|bright|contrast|blur|blurred"
)
_STEM_CUT = re.compile(rf"\s*-\s*(?=[A-Za-z])|[\s_]+(?:{_AUGMENT_WORDS})\d*(?=$|[\W_])|\s+\(copy\)", re.IGNORECASE)


def source_group_from_name(filename: str | os.PathLike) -> str:
    """The source image a (pre-augmented) file name stands for.

    The name is cut before its first ``-`` followed by a letter (``-sharpened``, ``-rotated3``,
    ``- Copy``) or an ``_augmentation`` word; a ``-`` before a digit is kept, so DICOM export
    names such as ``IM-0001-0023`` stay whole.

    >>> source_group_from_name("CSFDV1B10 (18)-sharpened-rotated3.png")
    'CSFDV1B10 (18)'
    >>> source_group_from_name("dir/IM-0001-0023.dcm")
    'IM-0001-0023'
    """
    name = PurePath(filename).name
    suffix = PurePath(name).suffix.lower()
    stem = name[: -len(suffix)] if suffix in IMAGE_EXTENSIONS | DICOM_EXTENSIONS else name
    base = _STEM_CUT.split(stem, maxsplit=1)[0].strip()
    return base or stem


def _area_resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean over equal-as-possible blocks: (H, W) → (rows, cols)."""
    img = np.asarray(img, dtype=np.float64)
    if img.shape[0] < rows:
        img = np.repeat(img, -(-rows // img.shape[0]), axis=0)
    if img.shape[1] < cols:
        img = np.repeat(img, -(-cols // img.shape[1]), axis=1)
    r_edges = np.linspace(0, img.shape[0], rows + 1).astype(int)
    c_edges = np.linspace(0, img.shape[1], cols + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(img, r_edges[:-1], axis=0), c_edges[:-1], axis=1)
    counts = np.outer(np.diff(r_edges), np.diff(c_edges))
    return sums / counts


def perceptual_hash(img: np.ndarray, hash_size: int = DEFAULT_HASH_SIZE) -> int:
    """Difference hash (dHash) of a grey image: ``hash_size**2`` bits as a Python int.

    The image is averaged down to ``hash_size`` × ``hash_size + 1`` blocks; each bit says
    whether a block is brighter than its left neighbour. Re-encoding (PNG, JPEG), resizing, a
    change of format (RGB vs grey) and mild sharpening change a few percent of the bits;
    unrelated images differ in many more. (Rotation by a few degrees changes about 10 %, so
    rotated copies are found by their names, see :func:`assign_groups`.)

    Parameters
    ----------
    img
        float (H, W) grey levels (e.g. from :func:`read_image`); an (H, W, C) array is averaged
        over channels.
    hash_size
        Bits per side: 32 gives 1024 bits (the default), 8 the classic 64-bit dHash.

    Returns
    -------
    int
        The hash, ``0 <= h < 2**(hash_size**2)``.
    """
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(axis=-1)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"perceptual_hash expects a non-empty (H, W) image, got shape {img.shape}")
    if not isinstance(hash_size, (int, np.integer)) or hash_size < 2:
        raise ValueError(f"hash_size must be an integer >= 2, got {hash_size!r}")
    small = _area_resize(img, hash_size, hash_size + 1)
    bits = (small[:, 1:] > small[:, :-1] + 1e-6).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _hash_hex(value: int, hash_size: int = DEFAULT_HASH_SIZE) -> str:
    return f"{value:0{-(-hash_size * hash_size // 4)}x}"


def hash_images(
    paths, max_pixels: int = DEFAULT_MAX_PIXELS, hash_size: int = DEFAULT_HASH_SIZE
) -> tuple[list[str | None], list[str]]:
    """:func:`perceptual_hash` of each image file as hex digits (``None`` where unreadable).

    Returns
    -------
    hashes : list
        Hex strings of ``hash_size**2 / 4`` digits, or ``None``.
    errors : list
        '' for each readable image, else the reason it could not be read.
    """

    def one(p) -> tuple[str | None, str]:
        try:
            img = read_image(p, max_pixels=max_pixels)
            return _hash_hex(perceptual_hash(img, hash_size), hash_size), ""
        except (ImageReadError, FileNotFoundError, OSError) as exc:
            return None, str(exc).replace(f"{p}: ", "")

    paths = list(paths)
    workers = min(4, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 32:  # decoding releases the GIL: threads help
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, paths, chunksize=16))
    else:
        results = [one(p) for p in paths]
    return [h for h, _ in results], [e for _, e in results]


def _attach_hashes(manifest: pd.DataFrame, max_pixels: int) -> tuple[pd.DataFrame, list[dict]]:
    """Add column ``phash``; rows whose image cannot be decoded move to the rejected list."""
    hashes, errors = hash_images(manifest["path"], max_pixels=max_pixels)
    manifest = manifest.copy()
    manifest["phash"] = [h or "" for h in hashes]
    bad = (manifest["phash"] == "").to_numpy()
    failed = [{"path": p, "reason": e} for p, e, b in zip(manifest["path"], errors, bad) if b]
    return manifest[~bad].reset_index(drop=True), failed


def _hex_to_words(hex_hashes: list[str]) -> np.ndarray:
    """Hex hashes of equal length → (n, words) uint64 array (16 hex digits per word)."""
    digits = max(len(h) for h in hex_hashes)
    words = -(-digits // 16)
    out = np.zeros((len(hex_hashes), words), dtype=np.uint64)
    for i, h in enumerate(hex_hashes):
        h = h.rjust(words * 16, "0")
        out[i] = [int(h[k : k + 16], 16) for k in range(0, len(h), 16)]
    return out


def _components(n: int, edges_a: np.ndarray, edges_b: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``n`` nodes given undirected edges (a[i], b[i])."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    graph = coo_matrix((np.ones(len(edges_a), dtype=np.int8), (edges_a, edges_b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first_seen = np.unique(labels, return_index=True)
    order = np.argsort(first_seen)  # renumber by first appearance: stable, readable ids
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[labels]


def near_duplicate_clusters(
    manifest: pd.DataFrame, max_distance: int = DEFAULT_HASH_DISTANCE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pd.Series:
    """Cluster images whose perceptual hashes differ in at most ``max_distance`` bits.

    Pairs within the threshold are joined (union-find, so clusters are transitive). Exact,
    renamed and re-encoded copies, resized and grey/RGB copies end up together, and so do
    mildly sharpened ones; copies rotated by a few degrees usually do not (name stems catch
    those in the Kaggle set).

    Parameters
    ----------
    manifest
        Needs ``path``; a ``phash`` column (hex digits, as made by :func:`discover`) is used
        when every row has one, otherwise each image is read and hashed. Unreadable images get
        a cluster of their own.
    max_distance
        Largest Hamming distance, in bits (of 1024 with the default hash), still a copy.

    Returns
    -------
    pd.Series
        int cluster id per row (0, 1, ... in order of first appearance), same index as ``manifest``.
    """
    if not isinstance(max_distance, (int, np.integer)) or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative number of bits, got {max_distance!r}")
    n = len(manifest)
    if n == 0:
        return pd.Series([], index=manifest.index, name="cluster", dtype="int64")
    if "phash" in manifest and (manifest["phash"].astype(str) != "").all():
        hex_hashes = manifest["phash"].astype(str).tolist()
    else:
        hex_hashes = [h or "" for h in hash_images(manifest["path"], max_pixels=max_pixels)[0]]
    idx = np.flatnonzero([h != "" for h in hex_hashes])
    edges_a, edges_b = [np.array([], dtype=np.int64)], [np.array([], dtype=np.int64)]
    if len(idx):
        words = _hex_to_words([hex_hashes[i] for i in idx])
        block = max(1, 2_000_000 // (len(idx) * words.shape[1]))
        for start in range(0, len(idx), block):
            part = words[start : start + block]
            dist = np.bitwise_count(part[:, None, :] ^ words[None, :, :]).sum(axis=-1, dtype=np.int64)
            i, j = np.nonzero(dist <= max_distance)
            i = i + start
            keep = j > i
            edges_a.append(idx[i[keep]])
            edges_b.append(idx[j[keep]])
    comp = _components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    return pd.Series(comp, index=manifest.index, name="cluster")


def _resolve_group_method(manifest: pd.DataFrame, method: str) -> str:
    methods = ("auto", "subject", "name", "hash", "name+hash", "file", "column")
    if method not in methods:
        raise ValueError(f"unknown group method {method!r}; choose one of {', '.join(methods)}")
    if method != "auto":
        return method
    if "subject_id" in manifest and (manifest["subject_id"].astype(str) != "").all():
        return "subject"
    return "name+hash"


def _union_groups(keys: list[pd.Series], names: pd.Series) -> pd.Series:
    """Join rows sharing any key; name each joined group by its smallest member name."""
    n = len(names)
    edges_a, edges_b = [], []
    for key in keys:
        codes, _ = pd.factorize(key.to_numpy())
        first = pd.Series(np.arange(n)).groupby(codes).transform("min").to_numpy()
        edges_a.append(np.arange(n))
        edges_b.append(first)
    comp = _components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    label = pd.Series(names.to_numpy()).groupby(comp).transform("min")
    return pd.Series(label.to_numpy(), index=names.index)


def assign_groups(
    manifest: pd.DataFrame, method: str = "auto", *, max_distance: int = DEFAULT_HASH_DISTANCE
) -> pd.DataFrame:
    """Return a copy of ``manifest`` with a ``group`` column: images that share a source.

    Methods
    -------
    ``'subject'``
        ``subject_id`` (the synthetic data: all slices of one simulated patient).
    ``'name'``
        :func:`source_group_from_name` of the file name (Kaggle: ``CSFDV1B10 (18)``).
    ``'hash'``
        :func:`near_duplicate_clusters`, named by the smallest file stem in each cluster.
    ``'name+hash'``
        Name groups joined with near-duplicate clusters, so a renamed copy joins its source.
    ``'file'``
        Every file on its own (no grouping; for comparison only).
    ``'column'``
        Keep the existing ``group`` column (e.g. from a CSV).
    ``'auto'``
        ``'subject'`` when every row has a ``subject_id``, else ``'name+hash'``.

    Raises
    ------
    ValueError
        For an unknown method, or when a needed column (``subject_id``, ``group``) is missing.
    """
    method = _resolve_group_method(manifest, method)
    out = manifest.copy()
    if len(out) == 0:
        out["group"] = pd.Series(dtype=str)
        return out
    names = out["path"].astype(str).map(lambda p: PurePath(p).name)
    if method == "subject":
        if "subject_id" not in out:
            raise ValueError("group method 'subject' needs a subject_id column")
        out["group"] = out["subject_id"].astype(str)
    elif method == "column":
        if "group" not in out or (out["group"].astype(str) == "").any():
            raise ValueError("group method 'column' needs a filled-in group column")
        out["group"] = out["group"].astype(str)
    elif method == "file":
        out["group"] = out["path"].astype(str)
    elif method == "name":
        out["group"] = names.map(source_group_from_name)
    else:
        clusters = near_duplicate_clusters(out, max_distance=max_distance)
        if method == "hash":
            stems = names.map(lambda s: PurePath(s).stem)
            out["group"] = _union_groups([clusters], stems)
        else:
            stems = names.map(source_group_from_name)
            out["group"] = _union_groups([stems, clusters], stems)
    return out


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def _check_fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.ndim != 1 or not 2 <= len(f) <= 3 or (f < 0).any() or not np.isclose(f.sum(), 1.0) or f[0] <= 0:
        raise ValueError(
            f"fractions must be 2 or 3 non-negative numbers (train, val[, test]) that sum "
            f"to 1 with train > 0, got {tuple(fractions)!r}"
        )
    return np.pad(f, (0, 3 - len(f)))


def grouped_stratified_split(manifest: pd.DataFrame, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> pd.DataFrame:
    """Split by group, balancing the labels of each split; return a copy with column ``split``.

    Groups are visited largest first (ties in a seeded random order) and each goes to the split
    whose per-label counts are furthest below their targets ``fraction × images of that label``:
    the choice that most reduces ``sum((count - target)**2 / target)`` over splits and labels
    (dividing by the target keeps the small val/test splits from staying empty). So no group is
    in two splits, every split gets close to its share of each label, and a seed always gives
    the same split.

    Parameters
    ----------
    manifest
        Needs ``label`` and ``group`` columns (see :func:`assign_groups`).
    fractions
        (train, val, test) or (train, val) shares of the images; they must sum to 1.
    seed
        Seed of the tie-breaking order.

    Returns
    -------
    pd.DataFrame
        A copy of ``manifest`` (same index and order) with ``split`` set to train/val/test.
    """
    f = _check_fractions(fractions)
    for col in ("label", "group"):
        if col not in manifest:
            raise ValueError(
                f"grouped_stratified_split needs a {col!r} column"
                + (" (call assign_groups first)" if col == "group" else "")
            )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = manifest.copy()
    if len(out) == 0:
        out["split"] = pd.Series(dtype=str)
        return out
    groups = out["group"].astype(str)
    counts = pd.crosstab(groups, out["label"].astype(str))  # groups × labels, sorted by name
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(len(counts))
    sizes = counts.to_numpy().sum(axis=1)
    order = order[np.argsort(-sizes[order], kind="stable")]
    target = f[:, None] * counts.to_numpy().sum(axis=0)[None, :]  # splits × labels
    scale = np.maximum(target, 1e-9)
    have = np.zeros_like(target)
    chosen = np.empty(len(counts), dtype=object)
    for g in order:
        g_counts = counts.to_numpy()[g]
        # change of the chi-square-like error sum((have - target)**2 / target) if g joins each split
        delta = ((2 * (have - target) + g_counts[None, :]) * g_counts[None, :] / scale).sum(axis=1)
        delta[f == 0] = np.inf
        s = int(np.argmin(delta))
        have[s] += g_counts
        chosen[g] = SPLITS[s]
    out["split"] = groups.map(dict(zip(counts.index, chosen))).astype(str)
    return out


def cross_split_leakage(manifest: pd.DataFrame) -> list[str]:
    """Groups found in more than one split (rows with an empty split are ignored), sorted."""
    for col in ("group", "split"):
        if col not in manifest:
            raise ValueError(f"cross_split_leakage needs a {col!r} column")
    m = manifest[manifest["split"].astype(str) != ""]
    per_group = m.groupby(m["group"].astype(str))["split"].nunique()
    return sorted(per_group[per_group > 1].index.tolist())


def _split_counts(m: pd.DataFrame) -> str:
    counts = m["split"].value_counts()
    return ", ".join(f"{s} {int(counts.get(s, 0))}" for s in SPLITS)


def _carve(m: pd.DataFrame, missing: list[str], f: np.ndarray, seed: int) -> pd.DataFrame:
    """Move whole groups from train into the missing splits, to their share of all images."""
    train = m[m["split"] == "train"]
    if len(train) == 0:
        return m
    share = np.zeros(3)
    for s in missing:
        share[SPLITS.index(s)] = min(f[SPLITS.index(s)] * len(m) / len(train), 0.45)
    share[0] = 1.0 - share[1:].sum()
    carved = grouped_stratified_split(train, fractions=tuple(share), seed=seed)
    m = m.copy()
    m.loc[carved.index, "split"] = carved["split"]
    return m


def choose_split(discovery, policy: str = "auto", seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> tuple[pd.DataFrame, str]:
    """Decide the train/val/test split of a discovered dataset, and say why.

    Policies
    --------
    ``'auto'``
        Keep the dataset's own split folders when no group is in two of them, carving any
        missing val/test split out of train by group; re-split by group when the folders leak
        (or when there are none).
    ``'keep'``
        Keep the folders even if they leak (the message warns); carve missing splits as above.
    ``'resplit'``
        Always :func:`grouped_stratified_split` with ``fractions``.

    Parameters
    ----------
    discovery
        A :class:`Discovery` or a manifest DataFrame (needs label, group, split).
    fractions
        (train, val, test) shares for a re-split or for the carved splits.

    Returns
    -------
    manifest : pd.DataFrame
        A copy with ``split`` in train/val/test and ``folder_split``, the split the files had.
    message : str
        What was done and why, with image counts per split.
    """
    policies = ("auto", "keep", "resplit")
    if policy not in policies:
        raise ValueError(f"unknown split policy {policy!r}; choose one of {', '.join(policies)}")
    f = _check_fractions(fractions)
    m = (discovery.manifest if isinstance(discovery, Discovery) else discovery).copy()
    for col in ("label", "group"):
        if col not in m:
            raise ValueError(f"choose_split needs a {col!r} column")
    if "split" not in m:
        m["split"] = ""
    m["split"] = m["split"].astype(str)
    m["folder_split"] = m["split"]
    pct = "/".join(f"{x:.0%}".rstrip("%") for x in f) + " %"
    has_folders = (m["split"] != "").all()
    leaking = cross_split_leakage(m) if has_folders else []

    if policy == "resplit" or not has_folders or (leaking and policy == "auto"):
        out = grouped_stratified_split(m, fractions=tuple(f), seed=seed)
        if policy == "resplit":
            why = "re-split by group as requested"
        elif not has_folders:
            why = "the dataset has no split folders, so it was split by group"
        else:
            examples = ", ".join(repr(g) for g in leaking[:3]) + (", ..." if len(leaking) > 3 else "")
            why = (
                f"the dataset's own split folders leak: {len(leaking)} source groups appear in more "
                f"than one of them (e.g. {examples}), so validation would score copies of training "
                "images; the data were re-split by group"
            )
        return out, (f"{why} ({pct} train/val/test, seed {seed}, no group in two splits): {_split_counts(out)} images.")

    present = set(m["split"])
    missing = [s for s in ("val", "test") if s not in present and f[SPLITS.index(s)] > 0]
    out = _carve(m, missing, f, seed) if missing else m
    kept = "/".join(s for s in SPLITS if s in present)
    if leaking:
        msg = (
            f"kept the dataset's own {kept} folders as asked, although {len(leaking)} source groups "
            "appear in more than one of them: validation scores will be optimistic"
        )
    else:
        msg = f"kept the dataset's own {kept} folders (no source group appears in more than one)"
    if missing:
        msg += f" and carved {' and '.join(missing)} out of train by group"
    return out, f"{msg}: {_split_counts(out)} images."


# --------------------------------------------------------------------------------------------
# Saving and loading manifests
# --------------------------------------------------------------------------------------------
_STRING_COLUMNS = (
    "path",
    "label",
    "group",
    "split",
    "folder_split",
    "mode",
    "phash",
    "subject_id",
    "level",
    "fracture_type",
    "difficulty",
    "mask_path",
)


def save_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a manifest as CSV (creating folders); return the path written."""
    path = Path(path).expanduser()
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"a manifest needs columns path and label; missing {', '.join(sorted(missing))}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
    except OSError as exc:
        raise PermissionError(f"cannot write the manifest to {path}: {exc.strerror or exc}") from exc
    return path


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV written by :func:`save_manifest` (text columns stay text, '' not NaN).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it lacks the ``path`` or ``label`` column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    head = pd.read_csv(path, nrows=0)
    dtypes = {c: str for c in head.columns if c in _STRING_COLUMNS}
    df = pd.read_csv(path, dtype=dtypes, keep_default_na=False)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a manifest, missing column(s) {', '.join(sorted(missing))}")
    return df


def artifacts_manifest_path() -> Path:
    """Where the chosen manifest is kept between notebooks: ``<artifacts>/data/manifest.csv``."""
    return config.artifacts_dir() / "data" / "manifest.csv"


def load_course_manifest() -> pd.DataFrame:
    """The split manifest notebook 02 wrote to :func:`artifacts_manifest_path` (columns path, label, group, split).

    Raises
    ------
    FileNotFoundError
        If notebook 02 has not been run (the message says so and names the path).
    """
    path = artifacts_manifest_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run notebooks/02_preprocessing_augmentation.ipynb first "
            "(it splits the data by group and writes this manifest)"
        )
    return load_manifest(path)
