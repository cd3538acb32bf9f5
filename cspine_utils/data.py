"""Find the images of a dataset, group near-copies of the same source, and split by group.

Data flow: files → **manifest** (a DataFrame, one row per image: ``path``, ``label``, ``group``,
``split``, ...) → tf.data pipeline (:mod:`cspine_utils.pipeline`) → model. Layouts: ``kaggle``
(``cervical fracture/{train,val}/{fracture,normal}/*``), ``synthetic`` (:mod:`cspine_utils.phantom`),
``split-folders`` (``<dir>/<split>/<class>/*``), ``class-folders`` (``<dir>/<class>/*``) and ``csv``
(``path,label[,group][,split]``). The Kaggle set is *pre-augmented* (``X (18)-sharpened-rotated3.png``
and ``X (18)-rotated1.png`` are one source) and its train/val folders share sources, so images get a
``source`` (near-copies of one slice) and a ``patient`` (the scan: ``X`` of ``X (18)``, a CSV's
``patient``/``patient_id``/``subject_id`` column, the phantom's subject), joined into the ``group``
(:func:`assign_groups`) that :func:`grouped_stratified_split` never puts in two splits: slices of one
scan are not independent, so a patient's slices and copies stay on one side.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from . import config, dicom, records

#: Largest image (width × height, pixels) that is decoded; bigger files are refused unread.
DEFAULT_MAX_PIXELS = 50_000_000
#: Side of the difference hash: 32 × 32 = 1024 bits (64 bits are too coarse for CT slices).
DEFAULT_HASH_SIZE = 32
#: Largest Hamming distance (bits of 1024, about 5 %) between the hashes of two near-duplicates.
DEFAULT_HASH_DISTANCE = 51
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_EXTENSIONS = frozenset({".dcm"})
LABELS = ("fracture", "normal")
SPLITS = ("train", "val", "test")

_NORMAL_NAMES = "normal,healthy,negative,neg,no_fracture,nofracture,no fracture,non-fracture,0"
#: Folder names and CSV labels (lower-cased) accepted for each class.
LABEL_ALIASES: dict[str, str] = {
    **dict.fromkeys("fracture,fractures,fractured,abnormal,positive,pos,1".split(","), "fracture"),
    **dict.fromkeys(_NORMAL_NAMES.split(","), "normal"),
}
#: Split folder names (lower-cased) and the split they stand for.
SPLIT_ALIASES: dict[str, str] = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("val", "valid", "validation"), "val"),
    **dict.fromkeys(("test", "testing"), "test"),
}
#: Columns every manifest from :func:`discover` starts with.
MANIFEST_COLUMNS = ["path", "label", "group", "split", "width", "height", "mode", "bytes"]
KAGGLE_FOLDER = "cervical fracture"
CSV_NAME = "labels.csv"
SYNTHETIC_MARKER = "dataset.json"
SYNTHETIC_MANIFEST = "manifest.csv"
#: Manifest/CSV columns (lower-cased) that name a slice's patient (scan), in order of preference.
PATIENT_COLUMNS = ("patient", "patient_id", "subject_id")
_IGNORED_DIRS = {"__macosx", "masks"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_CANDIDATES = IMAGE_EXTENSIONS | DICOM_EXTENSIONS | {""}  # suffixes discovery tries to read
_Entry = tuple[Path, "dict | str"]  # a file to probe with its manifest fields, or to reject with a reason


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and the reason."""


# ------------------------------------------------------------------------------ reading one image
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
    text = head.decode("utf-8", errors="replace")[:200]  # U+FFFD marks bytes that are not UTF-8
    if head and "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"is a text file, not an image (starts with {(text.strip().splitlines() or [''])[0][:40]!r})"
    formats = "PNG, JPEG, BMP, TIFF or DICOM"
    return f"is not an image in a supported format ({formats}); it starts with bytes {head[:8].hex(' ')}"


@contextmanager
def _open_pil(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open lazily (header only), refuse images over ``max_pixels``, always close."""
    try:
        with warnings.catch_warnings():  # the max_pixels check below replaces PIL's own (89 Mpx)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: {_not_an_image_reason(path)}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"{path}: cannot be opened as an image ({exc})") from exc
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageReadError(
                f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} pixels (possible "
                "decompression bomb); refusing to decode it. Pass a larger max_pixels if the image is genuine."
            )
        if w == 0 or h == 0:
            raise ImageReadError(f"{path}: has no pixels ({w}x{h})")
        yield im
    finally:
        im.close()


def _pil_to_unit(im: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode as float32 (H, W) grey levels in [0, 1] (rules in :func:`read_image`)."""
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
    alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    arr = np.asarray(im.convert("RGBA" if alpha else "RGB"), dtype=np.float32) / np.float32(255)
    grey = arr[..., :3] @ _LUMA * (arr[..., 3] if alpha else 1.0)
    return np.clip(grey, 0.0, 1.0).astype(np.float32, copy=False)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file as float32 (H, W) grey levels in [0, 1], the same way for every format.

    8-bit grey / 255; 16-bit / 65535 (32-bit ``I`` too when it fits in 16 bits, else / (2**32 - 1));
    RGB and palette by luminance 0.299 R + 0.587 G + 0.114 B (as PIL's ``L``), so an RGB copy of a
    slice reads the same; alpha composited on black (air); float ``F`` clipped; DICOM by
    :func:`cspine_utils.dicom.read_dicom_unit` (CT in the bone window). First frame only.
    ``max_pixels`` (width × height) is checked before decoding. :class:`ImageReadError` for an
    empty, truncated, oversized or undecodable file.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS and dicom.is_dicom(path):  # .dcm or DICM magic
        try:
            return dicom.read_dicom_unit(path, max_pixels)
        except dicom.DicomError as exc:
            raise ImageReadError(str(exc)) from exc
    with _open_pil(path, max_pixels) as im:
        try:
            im.load()
        except _DECODE_ERRORS as exc:
            raise ImageReadError(f"{path}: is truncated or corrupt and cannot be decoded ({exc})") from exc
        return _pil_to_unit(im)


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """``width``, ``height`` (pixels), ``mode`` (PIL mode or ``'DICOM'``) and ``bytes`` of an image file.

    No pixel is decoded. PNGs are verified to their end (truncated files are found); other
    formats are only found corrupt when :func:`read_image` decodes them. Raises as :func:`read_image`.
    """
    path = Path(path)
    _check_file(path)
    size = path.stat().st_size
    if path.suffix.lower() not in IMAGE_EXTENSIONS and dicom.is_dicom(path):  # .dcm or DICM magic
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


# ------------------------------------------------------------------------------ labels, splits, layouts
def normalize_label(name: object) -> str | None:
    """``'fracture'``, ``'normal'``, or ``None`` for a name that is not a known alias."""
    return LABEL_ALIASES.get(str(name).strip().lower())


def normalize_split(name: object) -> str | None:
    """``'train'``, ``'val'``, ``'test'``, or ``None`` for a name that is not a split name."""
    return SPLIT_ALIASES.get(str(name).strip().lower())


def _alias_help() -> str:
    return "; ".join(f"{c}: {', '.join(a for a, k in LABEL_ALIASES.items() if k == c)}" for c in LABELS)


def _unknown_folders(folder: Path, subdirs: list[Path], unknown: list[str]) -> ValueError:
    return ValueError(
        f"unknown class folder(s) in {folder}: {', '.join(unknown)} (found: {', '.join(d.name for d in subdirs)}). "
        f"Class folders must be named for a class ({_alias_help()}); split folders train/val/test."
    )


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name.lower() not in _IGNORED_DIRS


def _subdirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and _visible(d)), key=lambda d: d.name)


@dataclass
class Discovery:
    """What :func:`discover` found: ``manifest``, ``rejected`` (``path``, ``reason``), ``layout``, ``root``.

    The manifest has one row per readable image: :data:`MANIFEST_COLUMNS` (``path`` absolute POSIX,
    ``split`` '' without split folders, ``width``/``height`` in pixels), ``source`` and ``patient``
    (:func:`assign_groups`), ``phash`` (hex, when hashed) and, for the synthetic layout, ``subject_id``, ``level``, ``fracture_type``, ``difficulty``, ``mask_path``.
    """

    manifest: pd.DataFrame
    rejected: pd.DataFrame
    layout: str
    root: Path

    def summary(self) -> str:
        """One line: layout, image counts per label and split, and rejected files."""
        m = self.manifest
        labels = ", ".join(f"{k} {v}" for k, v in m["label"].value_counts().sort_index().items())
        splits = m["split"].replace("", "(none)").value_counts().sort_index()
        split_txt = ", ".join(f"{k} {v}" for k, v in splits.items())
        return (
            f"{self.layout} layout at {records.shown_path(self.root)}: {len(m)} images ({labels}; splits: {split_txt}; "
            f"{m['group'].nunique()} groups, {_n_patients(m)} patients), {len(self.rejected)} rejected"
        )


def _resolve_layout(path: Path) -> tuple[Path, str]:
    """Find the dataset root under ``path`` and name its layout."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return path, "csv"
        raise ValueError(f"{path} is a file; pass a dataset folder or a CSV manifest (.csv)")
    if (path / SYNTHETIC_MARKER).is_file() and (path / SYNTHETIC_MANIFEST).is_file():
        return path, "synthetic"
    subdirs = _subdirs(path)
    kaggle = [d for d in [path, *subdirs] if d.name.lower() == KAGGLE_FOLDER]
    if kaggle:
        return kaggle[0], "kaggle"
    if (path / CSV_NAME).is_file():
        return path / CSV_NAME, "csv"
    if subdirs and all(normalize_split(d.name) for d in subdirs):
        return path, "split-folders"
    if subdirs and all(normalize_label(d.name) for d in subdirs):
        return path, "class-folders"
    has_files = any(
        f.is_file() and _visible(f) and f.suffix.lower() in _CANDIDATES and f.suffix for f in path.iterdir()
    )
    if len(subdirs) == 1 and not has_files:
        return _resolve_layout(subdirs[0])  # a wrapper folder, e.g. after unzipping
    if not subdirs:
        raise ValueError(
            f"no class folders found in {path}; expected <dir>/<class>/images (class fracture or "
            f"normal), <dir>/<split>/<class>/images, a {CSV_NAME}, or a synthetic dataset"
        )
    unknown = [d.name for d in subdirs if not (normalize_split(d.name) or normalize_label(d.name))]
    raise _unknown_folders(path, subdirs, unknown or [d.name for d in subdirs])


def _probe_all(entries: list[_Entry], max_pixels: int) -> tuple[list[dict], list[dict]]:
    """Manifest rows of the entries that probe as images, and rejections (path, reason), in order."""
    rows, rejected = [], []
    for path, fields in entries:
        if isinstance(fields, dict):
            try:
                info = probe_image(path, max_pixels)
                rows.append({"path": path.resolve().as_posix(), "group": "", "split": "", **fields, **info})
                continue
            except (ImageReadError, FileNotFoundError, OSError) as exc:
                fields = str(exc).replace(f"{path}: ", "")
        rejected.append({"path": path.absolute().as_posix(), "reason": fields})
    return rows, rejected


def _scan_class_folder(folder: Path, label: str, split: str) -> list[_Entry]:
    """Every file under one class folder (recursively), hidden files skipped."""
    accepted = ", ".join(sorted(IMAGE_EXTENSIONS | DICOM_EXTENSIONS))
    entries: list[_Entry] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() not in _CANDIDATES and not dicom.is_dicom(path):
            entries.append((path, f"unsupported file type {path.suffix!r} (accepted: {accepted})"))
        elif path.suffix == "" and not dicom.is_dicom(path):
            entries.append((path, "no file extension and no DICOM header"))
        else:
            entries.append((path, {"label": label, "split": split}))
    return entries


def _class_folders(folder: Path) -> list[tuple[Path, str]]:
    """The class sub-folders of ``folder`` with their labels; ValueError for unknown names."""
    subdirs = _subdirs(folder)
    unknown = [d.name for d in subdirs if normalize_label(d.name) is None]
    if unknown:
        raise _unknown_folders(folder, subdirs, unknown)
    return [(d, normalize_label(d.name)) for d in subdirs]


def _loose_files(folder: Path) -> list[tuple[Path, str]]:
    loose = [f for f in sorted(folder.iterdir()) if f.is_file() and _visible(f)]
    reason = "not inside a class folder, so its label is unknown"
    return [(f, reason) for f in loose if f.suffix.lower() in IMAGE_EXTENSIONS | DICOM_EXTENSIONS]


def _scan_folders(root: Path) -> list[_Entry]:
    """Class folders, or split folders holding class folders, under ``root``."""
    subdirs = _subdirs(root)
    split_named = [d.name for d in subdirs if normalize_split(d.name)]
    if split_named and len(split_named) < len(subdirs):
        others = [d.name for d in subdirs if not normalize_split(d.name)]
        raise ValueError(
            f"{root} mixes split folders ({', '.join(split_named)}) with other folders "
            f"({', '.join(others)}); use <dir>/<split>/<class>/ or <dir>/<class>/, not both"
        )
    entries: list[_Entry] = []
    for split_dir in subdirs if split_named else [root]:
        split = normalize_split(split_dir.name) if split_named else ""
        entries += _loose_files(split_dir) if split_named else []
        for class_dir, label in _class_folders(split_dir):
            entries += _scan_class_folder(class_dir, label, split)
    return entries + _loose_files(root)


def _csv_columns(csv_path: Path, table: pd.DataFrame) -> tuple:
    """The path column, the normalised labels and splits, and the group and patient columns of a CSV manifest."""
    lower = {c.strip().lower(): c for c in table.columns}
    column = lambda *names: next((lower[n] for n in names if n in lower), None)  # noqa: E731
    path_col, label_col = column("path", "file", "filename", "image", "image_path"), column("label", "class", "target")
    if path_col is None or label_col is None:
        found = ", ".join(map(str, table.columns)) or "none"
        raise ValueError(f"{csv_path}: a CSV manifest needs columns 'path' and 'label'; found {found}")
    labels = table[label_col].map(normalize_label)
    bad = sorted(set(table.loc[labels.isna(), label_col]))
    if bad:
        raise ValueError(
            f"{csv_path}: unknown label(s) {', '.join(map(repr, bad))} in column {label_col!r}; "
            f"use a class name ({_alias_help()})"
        )
    split_col = column("split")
    splits = table[split_col].map(lambda s: "" if s.strip() == "" else normalize_split(s)) if split_col else None
    if splits is not None and splits.isna().any():
        bad = sorted(set(table.loc[splits.isna(), split_col]))
        raise ValueError(f"{csv_path}: unknown split(s) {', '.join(map(repr, bad))}; use train/val/test")
    return path_col, labels, splits, column("group"), column(*PATIENT_COLUMNS)


def _scan_csv(csv_path: Path) -> list[_Entry]:
    """Entries of a ``path,label[,group][,split][,patient]`` CSV; paths relative to the CSV's folder."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv_path}: cannot be read as a CSV manifest ({exc})") from exc
    path_col, labels, splits, group_col, patient_col = _csv_columns(csv_path, table)
    entries: list[_Entry] = []
    for i, rel in enumerate(table[path_col]):
        path = Path(rel).expanduser()
        fields = {"label": labels.iat[i], "split": splits.iat[i] if splits is not None else ""}
        entries.append((path if path.is_absolute() else csv_path.parent / path, fields))
        if group_col:
            fields["group"] = table[group_col].iat[i]
        if patient_col:
            fields["patient"] = table[patient_col].iat[i].strip()
    return entries


def _scan_synthetic(root: Path) -> list[_Entry]:
    """Entries of a dataset from :mod:`cspine_utils.phantom`, read from its ``manifest.csv``."""
    table = pd.read_csv(root / SYNTHETIC_MANIFEST, dtype=str, keep_default_na=False)
    missing = {"file", "label", "split", "subject_id"} - set(table.columns)
    if missing:
        raise ValueError(f"{root / SYNTHETIC_MANIFEST}: missing column(s) {', '.join(sorted(missing))}")
    entries: list[_Entry] = []
    for rec in table.to_dict("records"):
        path, label = root / rec["file"], normalize_label(rec["label"])
        mask = root / rec["mask_file"] if rec.get("mask_file") else None
        fields = {"label": label, "split": normalize_split(rec["split"]) or "", "subject_id": rec["subject_id"]}
        fields |= {k: rec.get(k, "") for k in ("level", "fracture_type", "difficulty")}
        fields["mask_path"] = mask.resolve().as_posix() if mask is not None and mask.is_file() else ""
        entries.append((path, fields if label else f"unknown label {rec['label']!r}"))
    return entries


def check_two_classes(manifest: pd.DataFrame) -> None:
    """Raise ValueError unless ``manifest`` holds both classes (kept apart from :func:`discover` for audits)."""
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
    """Find every image of a dataset (a folder in a layout of the module docstring, or a CSV).

    Files are opened only to read size and mode (PNGs verified); with hash groups (all layouts but
    ``synthetic``) each image is decoded once. Unusable files go to ``rejected`` with their reason.
    ``group_method`` and ``max_distance`` go to :func:`assign_groups` (``'auto'`` keeps a CSV's full
    ``group`` column). ValueError for unknown class folders, a CSV without ``path``/``label``, no
    readable image, or one class only (unless ``require_two_classes=False``, for audits).
    """
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data directory not found: {path}")
    root, layout = _resolve_layout(path.resolve())
    scan = {"synthetic": _scan_synthetic, "csv": _scan_csv}.get(layout, _scan_folders)
    rows, rejected = _probe_all(scan(root), max_pixels)
    if not rows:
        reasons = "; ".join(f"{Path(r['path']).name}: {r['reason']}" for r in rejected[:3])
        example = f", e.g. {reasons}" if reasons else ""
        raise ValueError(f"no readable images found in {root} ({len(rejected)} files rejected{example})")
    manifest = pd.DataFrame(rows)
    manifest = manifest[MANIFEST_COLUMNS + [c for c in manifest if c not in MANIFEST_COLUMNS]]
    manifest = manifest.astype({"width": "int64", "height": "int64", "bytes": "int64"})
    if require_two_classes:
        check_two_classes(manifest)
    method = group_method
    if method == "auto" and layout == "csv" and (manifest["group"].astype(str) != "").all():
        method = "column"
    if _resolve_group_method(manifest, method) in ("hash", "name+hash"):
        hashes, errors = hash_images(manifest["path"], max_pixels=max_pixels)
        bad = np.array([h is None for h in hashes])  # undecodable images move to the rejected list
        rejected += [{"path": p, "reason": e} for p, e, b in zip(manifest["path"], errors, bad) if b]
        manifest = manifest.assign(phash=[h or "" for h in hashes])[~bad].reset_index(drop=True)
        if len(manifest) == 0:
            raise ValueError(f"no decodable images found in {root} ({len(rejected)} files rejected)")
        if require_two_classes:
            check_two_classes(manifest)
    manifest = assign_groups(manifest, method, max_distance=max_distance)
    return Discovery(manifest, pd.DataFrame(rejected, columns=["path", "reason"]), layout, root)


# ------------------------------------------------------------------------------ source groups
_AUGMENT_WORDS = (
    "rotated|rotate|rot|sharpened|sharpen|flipped|flip|mirrored|augmented|aug|copy|"
    "noise|noisy|zoomed|zoom|bright|contrast|blur|blurred"
)
_STEM_CUT = re.compile(rf"\s*-\s*(?=[A-Za-z])|[\s_]+(?:{_AUGMENT_WORDS})\d*(?=$|[\W_])|\s+\(copy\)", re.IGNORECASE)


def source_group_from_name(filename: str | os.PathLike) -> str:
    """The source image a (pre-augmented) file name stands for.

    The name is cut before its first ``-`` followed by a letter (``-sharpened``, ``- Copy``) or an
    ``_augmentation`` word; a ``-`` before a digit is kept (DICOM names such as ``IM-0001-0023``).

    >>> [source_group_from_name(n) for n in ("CSFDV1B10 (18)-sharpened-rotated3.png", "dir/IM-0001-0023.dcm")]
    ['CSFDV1B10 (18)', 'IM-0001-0023']
    """
    name = PurePath(filename).name
    suffix = PurePath(name).suffix.lower()
    stem = name[: -len(suffix)] if suffix in IMAGE_EXTENSIONS | DICOM_EXTENSIONS else name
    return _STEM_CUT.split(stem, maxsplit=1)[0].strip() or stem


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
    return sums / np.outer(np.diff(r_edges), np.diff(c_edges))


def perceptual_hash(img: np.ndarray, hash_size: int = DEFAULT_HASH_SIZE) -> int:
    """Difference hash (dHash) of a grey (H, W) image (channels averaged): ``hash_size**2`` bits as an int.

    Each bit says whether a block of the image averaged to ``hash_size`` × ``hash_size + 1`` is
    brighter than its left neighbour. Re-encoding, resizing, RGB vs grey and mild sharpening change
    a few percent of the bits, a rotation of a few degrees about 10 %, unrelated images many more.
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


def hash_images(
    paths, max_pixels: int = DEFAULT_MAX_PIXELS, hash_size: int = DEFAULT_HASH_SIZE
) -> tuple[list[str | None], list[str]]:
    """Hex :func:`perceptual_hash` per file (``None`` if unreadable), and '' or the reason it is unreadable."""
    digits = -(-hash_size * hash_size // 4)

    def one(p) -> tuple[str | None, str]:
        try:
            return f"{perceptual_hash(read_image(p, max_pixels=max_pixels), hash_size):0{digits}x}", ""
        except (ImageReadError, FileNotFoundError, OSError) as exc:
            return None, str(exc).replace(f"{p}: ", "")

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
        results = list(pool.map(one, paths))
    return [h for h, _ in results], [e for _, e in results]


def _components(n: int, edges_a: np.ndarray, edges_b: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``n`` nodes given undirected edges (a[i], b[i])."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    graph = coo_matrix((np.ones(len(edges_a), dtype=np.int8), (edges_a, edges_b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels)[0]  # renumbered by first appearance: stable, readable ids


def _close_pairs(hex_hashes: list[str], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of hashes at most ``max_distance`` bits apart ('' = no hash), in blocks."""
    idx = np.flatnonzero([h != "" for h in hex_hashes])
    edges_a, edges_b = [np.array([], dtype=np.int64)], [np.array([], dtype=np.int64)]
    if len(idx):
        n_hex = 16 * -(-max(len(hex_hashes[i]) for i in idx) // 16)  # as 64-bit words
        words = np.array([np.frombuffer(bytes.fromhex(hex_hashes[i].rjust(n_hex, "0")), ">u8") for i in idx], np.uint64)
        block = max(1, 2_000_000 // (len(idx) * words.shape[1]))
        for start in range(0, len(idx), block):
            part = words[start : start + block]
            dist = np.bitwise_count(part[:, None, :] ^ words[None, :, :]).sum(axis=-1, dtype=np.int64)
            i, j = np.nonzero(dist <= max_distance)
            keep = j > i + start
            edges_a.append(idx[i[keep] + start])
            edges_b.append(idx[j[keep]])
    return np.concatenate(edges_a), np.concatenate(edges_b)


def near_duplicate_clusters(
    manifest: pd.DataFrame, max_distance: int = DEFAULT_HASH_DISTANCE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pd.Series:
    """Int cluster id per row (0, 1, ... by first appearance): hashes at most ``max_distance`` bits apart, joined.

    Exact, renamed, re-encoded, resized, grey/RGB and mildly sharpened copies end up together;
    copies rotated by a few degrees usually do not. Uses the ``phash`` column when every row has
    one, else reads and hashes ``path``; an unreadable image gets a cluster of its own.
    """
    if not isinstance(max_distance, (int, np.integer)) or max_distance < 0:
        raise ValueError(f"max_distance must be a non-negative number of bits, got {max_distance!r}")
    if len(manifest) == 0:
        return pd.Series([], index=manifest.index, name="cluster", dtype="int64")
    if "phash" in manifest and (manifest["phash"].astype(str) != "").all():
        hex_hashes = manifest["phash"].astype(str).tolist()
    else:
        hex_hashes = [h or "" for h in hash_images(manifest["path"], max_pixels=max_pixels)[0]]
    comp = _components(len(manifest), *_close_pairs(hex_hashes, max_distance))
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


_SCAN_SLICE = re.compile(r"^(.*?\S)\s*\((\d+)\)$")  # "CSFDV1B10 (18)": scan CSFDV1B10, slice 18


def patient_from_name(filename: str | os.PathLike) -> str:
    """The scan (patient) a Kaggle-style name stands for: ``X`` of the source stem ``X (N)``, else ''.

    >>> patient_from_name("CSFDV1B10 (18)-sharpened-rotated3.png"), patient_from_name("IMG_0001.png")
    ('CSFDV1B10', '')
    """
    match = _SCAN_SLICE.match(source_group_from_name(filename))
    return match.group(1) if match else ""


def patient_keys(manifest: pd.DataFrame) -> pd.Series:
    """Each row's patient: the first filled-in :data:`PATIENT_COLUMNS` column, else from the file name; ''."""
    keys = pd.Series("", index=manifest.index, dtype=object)
    for col in (c for c in PATIENT_COLUMNS if c in manifest):
        keys = keys.where(keys != "", manifest[col].fillna("").astype(str).str.strip())
    return keys.where(keys != "", manifest["path"].astype(str).map(patient_from_name)).rename("patient")


def _patient_groups(source: pd.Series, patient: pd.Series) -> pd.Series:
    """Rows sharing a source or a patient joined; named by their smallest patient (else source)."""
    if (patient == "").all():
        return source.copy()
    key = patient.where(patient != "", "\0" + source)  # a row without a patient joins by its source only
    return _union_groups([source, key], ("0" + patient).where(patient != "", "1" + source)).str[1:]


def _n_patients(manifest: pd.DataFrame) -> int:
    return int(manifest.loc[manifest["patient"] != "", "patient"].nunique()) if "patient" in manifest else 0


def _union_groups(keys: list[pd.Series], names: pd.Series) -> pd.Series:
    """Join rows sharing any key; name each joined group by its smallest member name."""
    n = len(names)
    firsts = [pd.Series(np.arange(n)).groupby(pd.factorize(key.to_numpy())[0]).transform("min") for key in keys]
    comp = _components(n, np.tile(np.arange(n), len(keys)), np.concatenate([f.to_numpy() for f in firsts]))
    label = pd.Series(names.to_numpy()).groupby(comp).transform("min")
    return pd.Series(label.to_numpy(), index=names.index)


def assign_groups(
    manifest: pd.DataFrame, method: str = "auto", *, max_distance: int = DEFAULT_HASH_DISTANCE
) -> pd.DataFrame:
    """A copy of ``manifest`` with ``source`` (copies of one slice), ``patient`` and ``group`` columns.

    ``source`` by ``method``: ``'subject'`` (``subject_id``, one simulated patient), ``'name'``
    (:func:`source_group_from_name`), ``'hash'`` (:func:`near_duplicate_clusters`, named by the
    smallest stem), ``'name+hash'`` (both joined, so a renamed copy joins its source), ``'file'`` (no
    grouping), ``'column'`` (keep ``group``), ``'auto'`` (``'subject'`` if every row has one, else ``'name+hash'``).
    ``patient``: :func:`patient_keys` ('' where nothing names one). ``group``, the unit of splits and
    bootstraps: rows sharing a source or a patient, joined (the source alone when no row has a patient).
    """
    method = _resolve_group_method(manifest, method)
    out = manifest.copy()
    if len(out) == 0:
        for col in ("group", "source", "patient"):
            out[col] = pd.Series(dtype=str)
        return out
    names = out["path"].astype(str).map(lambda p: PurePath(p).name)
    if method == "subject":
        if "subject_id" not in out:
            raise ValueError("group method 'subject' needs a subject_id column")
        out["source"] = out["subject_id"].astype(str)
    elif method == "column":
        if "group" not in out or (out["group"].astype(str) == "").any():
            raise ValueError("group method 'column' needs a filled-in group column")
        out["source"] = out["group"].astype(str)
    elif method in ("file", "name"):
        out["source"] = out["path"].astype(str) if method == "file" else names.map(source_group_from_name)
    else:
        clusters = near_duplicate_clusters(out, max_distance=max_distance)
        if method == "hash":
            out["source"] = _union_groups([clusters], names.map(lambda s: PurePath(s).stem))
        else:
            stems = names.map(source_group_from_name)
            out["source"] = _union_groups([stems, clusters], stems)
    out["patient"] = patient_keys(out)
    out["group"] = _patient_groups(out["source"], out["patient"])
    return out


# ------------------------------------------------------------------------------ splits
def _check_fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.ndim != 1 or not 2 <= len(f) <= 3 or (f < 0).any() or not np.isclose(f.sum(), 1.0) or f[0] <= 0:
        raise ValueError(
            f"fractions must be 2 or 3 non-negative numbers (train, val[, test]) that sum "
            f"to 1 with train > 0, got {tuple(fractions)!r}"
        )
    return np.pad(f, (0, 3 - len(f)))


def _needs_columns(manifest: pd.DataFrame, caller: str, columns=("label", "group")) -> None:
    for col in columns:
        if col not in manifest:
            hint = " (call assign_groups first)" if col == "group" else ""
            raise ValueError(f"{caller} needs a {col!r} column{hint}")


def grouped_stratified_split(manifest: pd.DataFrame, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> pd.DataFrame:
    """A copy of ``manifest`` (needs ``label``, ``group``) with ``split``: by group, labels balanced per split.

    Groups go largest first (ties in a seeded order) to the split that most reduces
    ``sum((count - target)**2 / target)`` over splits and labels, target = fraction × images of the
    label (dividing by it keeps small val/test splits from staying empty). ``fractions`` (train,
    val[, test]) sum to 1. No group is in two splits; a seed always gives the same split.
    """
    f = _check_fractions(fractions)
    _needs_columns(manifest, "grouped_stratified_split")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = manifest.copy()
    if len(out) == 0:
        out["split"] = pd.Series(dtype=str)
        return out
    groups = out["group"].astype(str)
    counts = pd.crosstab(groups, out["label"].astype(str))  # groups × labels, sorted by name
    order = np.random.default_rng(int(seed)).permutation(len(counts))
    order = order[np.argsort(-counts.to_numpy().sum(axis=1)[order], kind="stable")]
    target = f[:, None] * counts.to_numpy().sum(axis=0)[None, :]  # splits × labels
    scale = np.maximum(target, 1e-9)
    have = np.zeros_like(target)
    chosen = np.empty(len(counts), dtype=object)
    for g in order:
        g_counts = counts.to_numpy()[g][None, :]
        # change of sum((have - target)**2 / target) if g joins each split
        delta = ((2 * (have - target) + g_counts) * g_counts / scale).sum(axis=1)
        delta[f == 0] = np.inf
        s = int(np.argmin(delta))
        have[s] += g_counts[0]
        chosen[g] = SPLITS[s]
    out["split"] = groups.map(dict(zip(counts.index, chosen))).astype(str)
    return out


def cross_split_leakage(manifest: pd.DataFrame) -> list[str]:
    """Groups found in more than one split (rows with an empty split are ignored), sorted."""
    _needs_columns(manifest, "cross_split_leakage", ("group", "split"))
    m = manifest[manifest["split"].astype(str) != ""]
    per_group = m.groupby(m["group"].astype(str))["split"].nunique()
    return sorted(per_group[per_group > 1].index.tolist())


def _split_counts(m: pd.DataFrame) -> str:
    counts = m["split"].value_counts()
    return ", ".join(f"{s} {int(counts.get(s, 0))}" for s in SPLITS)


def _resplit(
    m: pd.DataFrame, policy: str, has_folders: bool, leaking: list[str], f: np.ndarray, seed: int
) -> tuple[pd.DataFrame, str]:
    out = grouped_stratified_split(m, fractions=tuple(f), seed=seed)
    if policy == "resplit":
        why = "re-split by group as requested"
    elif not has_folders:
        why = "the dataset has no split folders, so it was split by group"
    else:
        examples = ", ".join(repr(g) for g in leaking[:3]) + ", ..." * (len(leaking) > 3)
        why = (
            f"the dataset's own split folders leak: {len(leaking)} groups (a patient's slices or copies of "
            "a slice) appear in more "
            f"than one of them (e.g. {examples}), so validation would score copies of training "
            "images; the data were re-split by group"
        )
    pct = "/".join(f"{x:.0%}".rstrip("%") for x in f) + " %"
    return out, f"{why} ({pct} train/val/test, seed {seed}, no group in two splits): {_split_counts(out)} images."


def _keep_folders(m: pd.DataFrame, leaking: list[str], f: np.ndarray, seed: int) -> tuple[pd.DataFrame, str]:
    """Keep the folders' splits (``m`` is changed); a missing val/test is carved out of train by group."""
    present = set(m["split"])
    missing = [s for s in ("val", "test") if s not in present and f[SPLITS.index(s)] > 0]
    train = m[m["split"] == "train"]
    if missing and len(train):
        share = np.zeros(3)  # of train, so that each carved split gets its share of all images
        for s in missing:
            share[SPLITS.index(s)] = min(f[SPLITS.index(s)] * len(m) / len(train), 0.45)
        share[0] = 1.0 - share[1:].sum()
        carved = grouped_stratified_split(train, fractions=tuple(share), seed=seed)
        m.loc[carved.index, "split"] = carved["split"]
    kept = "/".join(s for s in SPLITS if s in present)
    if leaking:
        msg = (
            f"kept the dataset's own {kept} folders as asked, although {len(leaking)} groups "
            "appear in more than one of them: validation scores will be optimistic"
        )
    else:
        msg = f"kept the dataset's own {kept} folders (no group appears in more than one)"
    if missing:
        msg += f" and carved {' and '.join(missing)} out of train by group"
    return m, f"{msg}: {_split_counts(m)} images."


def choose_split(discovery, policy: str = "auto", seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> tuple[pd.DataFrame, str]:
    """The train/val/test split of a :class:`Discovery` (or manifest) and a message saying what was done and why.

    ``'auto'`` keeps the dataset's split folders when no group is in two of them (carving a missing
    val/test out of train by group) and re-splits by group when they leak or are absent; ``'keep'``
    keeps leaking folders too (with a warning); ``'resplit'`` always re-splits with ``fractions``.
    The copy returned also has ``folder_split``, the split the files had.
    """
    policies = ("auto", "keep", "resplit")
    if policy not in policies:
        raise ValueError(f"unknown split policy {policy!r}; choose one of {', '.join(policies)}")
    f = _check_fractions(fractions)
    m = (discovery.manifest if isinstance(discovery, Discovery) else discovery).copy()
    _needs_columns(m, "choose_split")
    m["split"] = m["split"].astype(str) if "split" in m else ""
    m["folder_split"] = m["split"]
    has_folders = (m["split"] != "").all()
    leaking = cross_split_leakage(m) if has_folders else []
    if policy == "resplit" or not has_folders or (leaking and policy == "auto"):
        return _resplit(m, policy, has_folders, leaking, f, seed)
    return _keep_folders(m, leaking, f, seed)


# ------------------------------------------------------------------------------ saving and loading manifests
_STRING_COLUMNS = set(
    "path label group source patient patient_id split folder_split mode phash subject_id level fracture_type "
    "difficulty mask_path".split()
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
    """A manifest CSV from :func:`save_manifest` (text stays text, '' not NaN); it needs ``path`` and ``label``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    head = pd.read_csv(path, nrows=0)
    df = pd.read_csv(path, dtype={c: str for c in head.columns if c in _STRING_COLUMNS}, keep_default_na=False)
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a manifest, missing column(s) {', '.join(sorted(missing))}")
    return df


def artifacts_manifest_path() -> Path:
    """Where the chosen manifest is kept between notebooks: ``<artifacts>/data/manifest.csv``."""
    return config.artifacts_dir() / "data" / "manifest.csv"


def load_course_manifest() -> pd.DataFrame:
    """The split manifest notebook 02 wrote (:func:`artifacts_manifest_path`), or "run notebook 02 first"."""
    path = artifacts_manifest_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run notebooks/02_preprocessing_augmentation.ipynb first "
            "(it splits the data by group and writes this manifest)"
        )
    return load_manifest(path)
