"""CT series in the RSNA 2022 layout: a study folder → a HU volume; a dataset → a compact windowed cache.

A study is a folder of axial DICOM slices (``train_images/<StudyInstanceUID>/<slice_number>.dcm``).
:func:`read_study` checks it as one CT series, orders the slices by ``ImagePositionPatient`` z
(superior first; file names and ``InstanceNumber`` may run either way) and returns HU with the voxel
spacing. :func:`read_segmentation` maps a NIfTI vertebra mask onto the slices through both
geometries. :func:`prepare` converts every study once, in parallel processes, into
``CACHE/studies/<UID>.npz`` (windowed uint8 slices resampled to a fixed spacing, labels, mask and
boxes); it is resumable and can be split into shards for several machines. Errors in one study are
:class:`SeriesError` (the message starts with the study folder) and skip that study only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import dicom, records
from .phantom import window_to_uint8

VERTEBRAE = tuple(f"C{i}" for i in range(1, 8))
LABEL_COLUMNS = ("patient_overall", *VERTEBRAE)
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")
DEFAULT_WINDOWS = ("bone", "soft", "wide")
DECODER_PACKAGES = "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"


class SeriesError(ValueError):
    """A study that cannot be used; the message starts with the study folder and names the problem."""


@dataclass
class Study:
    """One CT series: ``hu`` float32 (Z, H, W) superior → inferior, ``z_mm`` (Z,), ``spacing_mm`` (dz, dy, dx).

    ``positions`` (Z, 3) is each slice's ImagePositionPatient (LPS, mm), ``orientation`` the
    ImageOrientationPatient (row direction, column direction), ``slice_numbers`` the file names'
    numbers in the same (sorted) order.
    """

    uid: str
    folder: Path
    hu: np.ndarray
    z_mm: np.ndarray
    spacing_mm: tuple[float, float, float]
    slice_numbers: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray


def is_rsna_dir(path: str | os.PathLike) -> bool:
    """True for a folder with ``train.csv`` and ``train_images/`` (the RSNA 2022 layout)."""
    path = Path(path)
    return (path / "train.csv").is_file() and (path / "train_images").is_dir()


def is_cache(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`prepare` (``prepare.json`` and ``studies/``)."""
    path = Path(path)
    return (path / "prepare.json").is_file() and (path / "studies").is_dir()


def _headers(folder: Path) -> list[dict]:
    """Header fields of every ``.dcm`` in ``folder`` (pixels not read)."""
    import pydicom  # noqa: PLC0415

    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise SeriesError(f"{folder}: no .dcm files")
    heads = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            heads.append(
                {
                    "path": path,
                    "series": str(ds.get("SeriesInstanceUID", "")),
                    "modality": str(ds.get("Modality", "")),
                    "ipp": np.asarray(ds.ImagePositionPatient, dtype=np.float64),
                    "iop": np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64),
                    "spacing": tuple(float(v) for v in ds.PixelSpacing),
                    "shape": (int(ds.Rows), int(ds.Columns)),
                    "syntax": ds.file_meta.TransferSyntaxUID,
                }
            )
        except (AttributeError, TypeError, ValueError, OSError, pydicom.errors.InvalidDicomError) as exc:
            raise SeriesError(f"{folder}: {path.name} is not a usable CT slice ({type(exc).__name__}: {exc})") from exc
    return heads


def _can_decode(syntax) -> bool:
    from pydicom.pixels import get_decoder  # noqa: PLC0415

    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # a syntax pydicom cannot decode at all
        return False


def _check_series(folder: Path, heads: list[dict]) -> None:
    """One CT series, one geometry, and a decoder for every transfer syntax; SeriesError otherwise."""
    series = pd.Series([h["series"] for h in heads]).value_counts()
    if len(series) > 1:
        found = ", ".join(f"{uid} ({n} files)" for uid, n in series.items())
        raise SeriesError(f"{folder}: mixes {len(series)} series (SeriesInstanceUID {found}); keep one per folder")
    modalities = sorted({h["modality"] for h in heads})
    if modalities != ["CT"]:
        raise SeriesError(f"{folder}: modality {'/'.join(modalities)}, not CT; only CT series can be read")
    for key in ("spacing", "shape"):
        if len({h[key] for h in heads}) > 1:
            raise SeriesError(f"{folder}: slices differ in {key} ({sorted({h[key] for h in heads})})")
    if not all(np.allclose(h["iop"], heads[0]["iop"], atol=1e-3) for h in heads):
        raise SeriesError(f"{folder}: slices differ in ImageOrientationPatient")
    for syntax in sorted({h["syntax"] for h in heads}):
        if syntax.is_compressed and not _can_decode(syntax):
            raise SeriesError(
                f"{folder}: pixel data in transfer syntax {syntax.name} ({syntax}) and no decoder for it is "
                f"installed; install one: {DECODER_PACKAGES}"
            )


def _slice_order(folder: Path, heads: list[dict]) -> np.ndarray:
    """Indices of ``heads`` superior → inferior by ImagePositionPatient z; duplicated or missing positions raise."""
    z = np.array([h["ipp"][2] for h in heads])
    order = np.argsort(-z, kind="stable")
    z_sorted, steps = z[order], -np.diff(z[order])
    if len(steps) and np.any(steps < 1e-3):
        k = int(np.flatnonzero(steps < 1e-3)[0])
        names = [heads[order[i]]["path"].name for i in (k, k + 1)]
        raise SeriesError(f"{folder}: duplicated slice position z = {z_sorted[k]:.2f} mm in {names[0]} and {names[1]}")
    if len(steps) > 1 and np.any(steps > 1.5 * np.median(steps)):
        k = int(np.flatnonzero(steps > 1.5 * np.median(steps))[0])
        raise SeriesError(
            f"{folder}: missing slice(s) between z = {z_sorted[k]:.2f} and {z_sorted[k + 1]:.2f} mm "
            f"(gap {steps[k]:.2f} mm, median spacing {np.median(steps):.2f} mm)"
        )
    return order


def read_study(folder: str | os.PathLike) -> Study:
    """A study folder → :class:`Study` (HU float32 (Z, H, W), superior first, spacing in mm).

    Checks first, on headers only: one SeriesInstanceUID, Modality CT, one geometry, a decoder for
    every compressed transfer syntax (the message names the packages to install), no duplicated
    position and no missing slice (a step over 1.5x the median spacing). Then
    ``HU = stored * RescaleSlope + RescaleIntercept`` per slice (:func:`dicom.read_dicom_hu`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder}: study folder not found")
    heads = _headers(folder)
    _check_series(folder, heads)
    order = _slice_order(folder, heads)
    hu = np.empty((len(heads), *heads[0]["shape"]), dtype=np.float32)
    for k, i in enumerate(order):
        try:
            hu[k] = dicom.read_dicom_hu(heads[i]["path"])[0]
        except dicom.DicomError as exc:
            raise SeriesError(f"{folder}: {exc}") from exc
    positions = np.stack([heads[i]["ipp"] for i in order])
    z = positions[:, 2].astype(np.float32)
    dz = float(np.median(-np.diff(z))) if len(z) > 1 else float("nan")
    dy, dx = heads[0]["spacing"]
    stems = [heads[i]["path"].stem for i in order]
    numbers = np.array([int(s) if s.isdigit() else k for k, s in enumerate(stems)])
    return Study(folder.name, folder, hu, z, (dz, dy, dx), numbers, positions, heads[0]["iop"].reshape(2, 3))


def read_segmentation(nii_path: str | os.PathLike, study: Study) -> np.ndarray:
    """A NIfTI label mask mapped onto ``study``'s voxels: uint8 (Z, H, W), nearest neighbour.

    Each study voxel's patient position (IPP + column·dx·row direction + row·dy·column direction,
    LPS) is turned into RAS and through the inverse NIfTI affine into a mask index; voxels outside
    the mask get 0. SeriesError when under half of the study's voxels fall inside the mask.
    """
    import nibabel  # noqa: PLC0415

    try:
        img = nibabel.load(str(nii_path))
        data = np.asarray(img.dataobj)
        data = data.reshape(data.shape[:3]).astype(np.uint8)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on a broken file
        raise SeriesError(f"{study.folder}: cannot read the mask {nii_path} ({type(exc).__name__}: {exc})") from exc
    to_index = np.linalg.inv(img.affine)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    _, n_rows, n_cols = study.hu.shape
    _, dy, dx = study.spacing_mm
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    offset = cols[..., None] * dx * study.orientation[0] + rows[..., None] * dy * study.orientation[1]
    out = np.zeros(study.hu.shape, dtype=np.uint8)
    inside = 0
    for k, ipp in enumerate(study.positions):
        ras = (offset + ipp) @ lps_to_ras
        ijk = np.rint(ras @ to_index[:3, :3].T + to_index[:3, 3]).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.array(data.shape)), axis=-1)
        out[k][ok] = data[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]]
        inside += int(ok.sum())
    if inside < 0.5 * out.size:
        raise SeriesError(
            f"{study.folder}: the mask {Path(nii_path).name} covers only {inside / out.size:.0%} of the study's "
            "voxels; its geometry does not match the slices"
        )
    return out


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    return df


def _valid_labels(labels: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Rows of train.csv with 0/1 values, patient_overall = max(C1..C7) and a unique study."""
    values = labels[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    binary = values.isin([0, 1]).all(axis=1)
    consistent = values["patient_overall"] == values[list(VERTEBRAE)].max(axis=1)
    unique = ~labels["StudyInstanceUID"].duplicated(keep=False)
    checks = {
        "has values other than 0/1": ~binary,
        "has patient_overall != max(C1..C7)": binary & ~consistent,
        "appears more than once": ~unique,
    }
    for why, bad in checks.items():
        for uid in labels.loc[bad, "StudyInstanceUID"].unique():
            problems.append(f"train.csv: study {uid} {why}; its labels are not used")
    keep = binary & consistent & unique
    out = labels.loc[keep, ["StudyInstanceUID"]].copy()
    out[list(LABEL_COLUMNS)] = values.loc[keep].astype(int)
    return out.set_index("StudyInstanceUID")


def _box_problem(row, folder: Path, sizes: dict) -> str | None:
    """Why a box row cannot be used (unknown slice, outside the image), or None."""
    if not (folder / f"{int(row.slice_number)}.dcm").is_file():
        return f"slice_number {row.slice_number} is not a slice of the study"
    if folder not in sizes:
        sizes[folder] = dicom.read_dicom_header(next(folder.glob("*.dcm")))
    rows, cols = sizes[folder]["rows"], sizes[folder]["columns"]
    if row.width <= 0 or row.height <= 0 or row.x < -1 or row.y < -1:
        return f"box ({row.x}, {row.y}, {row.width}, {row.height}) is empty or outside the image"
    if row.x + row.width > cols + 1 or row.y + row.height > rows + 1:
        return f"box ({row.x}, {row.y}, {row.width}, {row.height}) lies outside the {cols}x{rows} image"
    return None


def read_rsna_labels(src: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Labels, boxes and problems of an RSNA-layout folder.

    Returns ``labels`` (index StudyInstanceUID, int columns patient_overall, C1..C7) for the
    studies with a folder, the usable ``boxes`` and a list of problems, each naming the study:
    invalid label rows and folders not in train.csv (prepared without labels), studies in
    train.csv with no folder (dropped), boxes for an unknown study, on a slice the study lacks or outside
    the image (dropped). Missing columns raise ValueError naming the file.
    """
    src = Path(src)
    problems: list[str] = []
    table = _read_csv(src / "train.csv", ("StudyInstanceUID", *LABEL_COLUMNS))
    labels, listed = _valid_labels(table, problems), set(table["StudyInstanceUID"])
    folders = {p.name for p in (src / "train_images").iterdir() if p.is_dir()}
    for uid in sorted(listed - folders):
        problems.append(f"train.csv: study {uid} has no folder in train_images/; skipped")
    for uid in sorted(folders - listed):
        problems.append(f"train_images/{uid}: not in train.csv; prepared without labels")
    labels = labels.loc[sorted(set(labels.index) & folders)]
    box_file = src / "train_bounding_boxes.csv"
    boxes = _read_csv(box_file, BOX_COLUMNS) if box_file.is_file() else pd.DataFrame(columns=list(BOX_COLUMNS))
    keep, sizes = [], {}
    for row in boxes.itertuples(index=False):
        why = "unknown study" if row.StudyInstanceUID not in folders else None
        why = why or _box_problem(row, src / "train_images" / row.StudyInstanceUID, sizes)
        keep.append(why is None)
        if why:
            problems.append(f"{box_file.name}: study {row.StudyInstanceUID}, slice {row.slice_number}: {why}; dropped")
    return labels, boxes[np.array(keep, dtype=bool)].reset_index(drop=True), problems


def window(hu: np.ndarray, name: str) -> np.ndarray:
    """HU (any shape) through the named window of :data:`dicom.WINDOWS` (bone, soft, wide) → uint8 0-255."""
    if name not in dicom.WINDOWS:
        raise ValueError(f"unknown window {name!r}; choose from {', '.join(dicom.WINDOWS)}")
    return window_to_uint8(hu, *dicom.WINDOWS[name])


def resample_z(volume: np.ndarray, z_mm: np.ndarray, spacing_mm: float, nearest: bool = False):
    """Resample (Z, ...) slices at ``z_mm`` (descending) to ``spacing_mm`` from the first slice down.

    Linear between the two neighbouring slices for images, nearest slice (``nearest=True``) for
    labels. Returns ``(volume, z)``, z float32 descending.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    z_mm = np.asarray(z_mm, dtype=np.float64)
    n_out = int(np.floor((z_mm[0] - z_mm[-1]) / spacing_mm + 1e-6)) + 1
    z_new = z_mm[0] - spacing_mm * np.arange(n_out)
    where = np.interp(-z_new, -z_mm, np.arange(len(z_mm), dtype=np.float64))
    if nearest:
        return volume[np.rint(where).astype(int)], z_new.astype(np.float32)
    lo = np.minimum(np.floor(where).astype(int), len(z_mm) - 1)
    hi = np.minimum(lo + 1, len(z_mm) - 1)
    w = (where - lo).astype(np.float32).reshape(-1, *([1] * (volume.ndim - 1)))
    return (volume[lo] * (1 - w) + volume[hi] * w).astype(volume.dtype), z_new.astype(np.float32)


def spine_center(hu: np.ndarray, bone_hu: float = 300.0) -> tuple[float, float]:
    """(row, col) of the spine in (Z, H, W) HU slices: the median over slices of the centroid of each
    slice's largest bone region (> ``bone_hu``), robust to the mandible or shoulders on some slices;
    the image centre when no slice has bone."""
    from scipy import ndimage  # noqa: PLC0415

    centres = []
    for image in hu[:: max(1, len(hu) // 32)]:  # at most ~32 slices: the spine moves little along z
        labels, n = ndimage.label(image > bone_hu)
        if n:
            largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
            centres.append(ndimage.center_of_mass(labels == largest))
    if not centres:
        return (hu.shape[1] - 1) / 2, (hu.shape[2] - 1) / 2
    row, col = np.median(np.asarray(centres), axis=0)
    return float(row), float(col)


def crop_resize(volume: np.ndarray, spacing_yx, crop_mm: float, size: int, nearest=False, center=None):
    """A ``crop_mm`` square of (Z, H, W) slices around ``center`` (row, col; default the image centre),
    padded with air/0 beyond the image, resized to ``size``.

    Linear with anti-aliasing for images, nearest for labels. Returns ``(volume (Z, size, size),
    (row0, col0, pixels_per_cache_pixel_y, _x))`` to map source pixels to cache pixels.
    """
    from skimage.transform import resize  # noqa: PLC0415

    n, rows, cols = volume.shape
    side = [max(1, round(crop_mm / s)) for s in spacing_yx]
    cy, cx = ((rows - 1) / 2, (cols - 1) / 2) if center is None else center
    r0, c0 = int(round(cy - (side[0] - 1) / 2)), int(round(cx - (side[1] - 1) / 2))
    fill = 0 if nearest else dicom.AIR_HU
    crop = np.full((n, *side), fill, dtype=volume.dtype)
    src_r = slice(min(max(r0, 0), rows), max(min(r0 + side[0], rows), 0))
    src_c = slice(min(max(c0, 0), cols), max(min(c0 + side[1], cols), 0))
    if src_r.stop > src_r.start and src_c.stop > src_c.start:
        crop[:, src_r.start - r0 : src_r.stop - r0, src_c.start - c0 : src_c.stop - c0] = volume[:, src_r, src_c]
    out = resize(
        crop, (n, size, size), order=0 if nearest else 1, anti_aliasing=not nearest, preserve_range=True
    ).astype(volume.dtype)
    return out, (r0, c0, side[0] / size, side[1] / size)


def _box_arrays(study: Study, boxes: np.ndarray, z_new: np.ndarray, geometry, spacing_mm: float):
    """Source boxes (K, 5: slice_number, x, y, width, height) → cache boxes (K, 5: z index, x, y, w, h) and (Z,) flags."""
    flags = np.zeros(len(z_new), dtype=np.uint8)
    if not len(boxes):
        return np.zeros((0, 5), dtype=np.float32), flags
    r0, c0, sy, sx = geometry
    index = {int(n): i for i, n in enumerate(study.slice_numbers)}
    source = np.array([index[int(n)] for n in boxes[:, 0]])
    k = np.clip(np.rint((z_new[0] - study.z_mm[source]) / spacing_mm), 0, len(z_new) - 1).astype(int)
    flags[k] = 1  # the cache slice nearest to each boxed slice, and each cache slice whose nearest slice is boxed
    nearest_source = np.rint(np.interp(-z_new, -study.z_mm, np.arange(len(study.z_mm)))).astype(int)
    flags[np.isin(nearest_source, source)] = 1
    cache = np.column_stack([k, (boxes[:, 1] - c0) / sx, (boxes[:, 2] - r0) / sy, boxes[:, 3] / sx, boxes[:, 4] / sy])
    return cache.astype(np.float32), flags


def _cache_arrays(study: Study, mask: np.ndarray | None, task: dict) -> dict:
    """The npz arrays of one study (resampled along z first, then cropped and resized in-plane)."""
    s = task["settings"]
    size, spacing, yx = s["size"], s["spacing_mm"], study.spacing_mm[1:]
    hu, z_new = resample_z(study.hu, study.z_mm, spacing)
    center = spine_center(hu)  # the crop follows the spine, wherever the patient lies in the field
    hu, geometry = crop_resize(hu, yx, s["crop_mm"], size, center=center)
    vertebrae, cache_mask = np.zeros((len(z_new), 7), dtype=np.uint8), np.zeros((0, size, size), dtype=np.uint8)
    if mask is not None:
        present = np.stack([(mask == v).any(axis=(1, 2)) for v in range(1, 8)], axis=1).astype(np.uint8)
        vertebrae = resample_z(present, study.z_mm, spacing, nearest=True)[0]
        labels = resample_z(mask, study.z_mm, spacing, True)[0]
        cache_mask = crop_resize(labels, yx, s["crop_mm"], size, True, center=center)[0]
    source_boxes = np.asarray(task["boxes"], dtype=np.float64).reshape(-1, 5)
    boxes, box_slices = _box_arrays(study, source_boxes, z_new, geometry, spacing)
    return {
        "windows": np.stack([window_to_uint8(hu, *wl) for wl in s["windows"].values()]),
        "z_mm": z_new,
        "spacing_mm": np.array([spacing, s["crop_mm"] / size, s["crop_mm"] / size], dtype=np.float32),
        "labels": np.asarray(task["labels"], dtype=np.float32),
        "vertebrae": vertebrae,
        "has_mask": np.array(mask is not None),
        "mask": cache_mask,
        "box_slices": box_slices,
        "has_boxes": np.array(len(boxes) > 0),
        "boxes": boxes,
    }


def _prepare_one(task: dict) -> dict:
    """Worker: read one study, write ``<uid>.npz`` then its sidecar; return a small summary (never the volume)."""
    t0, uid, folder = time.perf_counter(), task["uid"], Path(task["out"]) / "studies"
    try:
        study = read_study(task["folder"])
        arrays = _cache_arrays(study, read_segmentation(task["mask"], study) if task["mask"] else None, task)
        records.write_file_atomically(folder / f"{uid}.npz", lambda fh: np.savez_compressed(fh, **arrays))
    except (SeriesError, dicom.DicomError) as exc:
        return {"study": uid, "ok": False, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one broken study must not stop the batch
        return {"study": uid, "ok": False, "reason": f"{task['folder']}: {type(exc).__name__}: {exc}"}
    summary = {"study": uid, "ok": True, "n_slices": len(arrays["z_mm"]), "source_slices": len(study.z_mm)}
    summary |= {key: bool(arrays[key]) for key in ("has_mask", "has_boxes")}
    summary |= {"labels": task["labels"], "settings": task["settings"], "seconds": round(time.perf_counter() - t0, 3)}
    records.write_json(folder / f"{uid}.json", summary)
    return {k: summary[k] for k in ("study", "ok", "source_slices", "seconds")}


def _settings(size: int, crop_mm: float, spacing_mm: float, windows) -> dict:
    names = DEFAULT_WINDOWS if windows is None else tuple(windows)
    unknown = [n for n in names if n not in dicom.WINDOWS]
    if unknown or not names:
        raise ValueError(f"unknown window(s) {unknown or names}; choose from {', '.join(dicom.WINDOWS)}")
    if int(size) < 4 or crop_mm <= 0 or spacing_mm <= 0:
        raise ValueError(f"need size >= 4, crop_mm > 0 and spacing_mm > 0; got {size}, {crop_mm}, {spacing_mm}")
    wl = {n: list(dicom.WINDOWS[n]) for n in names}
    square = {"size": int(size), "crop_mm": float(crop_mm), "crop_center": "spine", "spacing_mm": float(spacing_mm)}
    return square | {"windows": wl}


def _open_cache(out: Path, settings: dict) -> None:
    """Create ``out`` or check that it was prepared with the same settings (never overwrite another cache)."""
    if (out / "prepare.json").is_file():
        before = records.read_json(out / "prepare.json").get("settings")
        if before != settings or list(before["windows"]) != list(settings["windows"]):  # window order = channels
            raise ValueError(f"{out}: prepared with other settings ({before}), not {settings}; choose another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out}: exists, is not empty and is not a prepared cache; choose another --out")
    (out / "studies").mkdir(parents=True, exist_ok=True)
    records.write_json(out / "prepare.json", {"settings": settings, "status": "running"})


def _tasks(src: Path, out: Path, uids: list[str], labels: pd.DataFrame, boxes: pd.DataFrame, settings: dict):
    """One small task dict per study: paths, its label row and its boxes (no pixels)."""
    by_study = dict(tuple(boxes.groupby("StudyInstanceUID"))) if len(boxes) else {}
    for uid in uids:
        nii = src / "segmentations" / f"{uid}.nii"
        rows = by_study.get(uid)
        box = [] if rows is None else rows[["slice_number", "x", "y", "width", "height"]].to_numpy(float).tolist()
        lab = labels.loc[uid, list(LABEL_COLUMNS)].tolist() if uid in labels.index else [float("nan")] * 8
        yield {
            "uid": uid,
            "folder": str(src / "train_images" / uid),
            "mask": str(nii) if nii.is_file() else None,
            "labels": lab,
            "boxes": box,
            "settings": settings,
            "out": str(out),
        }


def _run_tasks(tasks: list[dict], workers: int, progress: bool) -> list[dict]:
    """Run :func:`_prepare_one` over ``tasks`` (in this process for one worker, else a spawn pool)."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=len(tasks), disable=not progress, desc="prepare studies", unit="study")
    results = []
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(_prepare_one(task))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_prepare_one, t) for t in tasks]):
                results.append(future.result())
                bar.update()
    bar.close()
    return results


def _write_manifest(out: Path) -> pd.DataFrame:
    """``manifest.csv`` from every sidecar in ``out/studies`` (all shards that wrote there)."""
    rows = []
    for side in sorted((out / "studies").glob("*.json")):
        rec = records.read_json(side)
        labels = [np.nan if v is None else v for v in rec["labels"]]
        rows.append([rec["study"], rec["n_slices"], rec["has_mask"], rec["has_boxes"], *labels])
    manifest = pd.DataFrame(rows, columns=["StudyInstanceUID", "n_slices", "has_mask", "has_boxes", *LABEL_COLUMNS])
    manifest.to_csv(out / "manifest.csv", index=False)
    return manifest


def prepare(
    src, out, *, size: int, crop_mm: float, spacing_mm: float, windows=None, workers=None, shard=(1, 1), progress=True
) -> dict:
    """Convert every study of an RSNA-layout folder ``src`` once into the cache ``out``; the report.

    One study per task in a process pool (``workers``, default min(cores, 4)); each worker holds
    one study and writes ``studies/<uid>.npz`` then ``<uid>.json``. Studies with a sidecar are
    skipped (resume); a cache prepared with other settings raises ValueError. ``shard=(i, n)``
    takes the i-th (1-based) of every n studies sorted by UID. A bad study is skipped with its
    reason. The report (also ``prepare.json``): settings, source, shard, counts, ``skipped``
    [{study, reason}], ``label_problems``, seconds, slices_per_s, studies_per_min, versions.
    """
    src, out = Path(src), Path(out)
    i, n = (int(v) for v in shard)
    if not (1 <= i <= n):
        raise ValueError(f"shard must be (i, n) with 1 <= i <= n, got {shard}")
    if not is_rsna_dir(src):
        raise FileNotFoundError(f"{src}: not an RSNA-layout folder (needs train.csv and train_images/)")
    settings = _settings(size, crop_mm, spacing_mm, windows)
    _open_cache(out, settings)
    t0 = time.perf_counter()
    labels, boxes, problems = read_rsna_labels(src)
    uids = sorted(p.name for p in (src / "train_images").iterdir() if p.is_dir())[i - 1 :: n]
    todo = [u for u in uids if not (out / "studies" / f"{u}.json").is_file()]
    workers = min(os.cpu_count() or 1, 4) if workers is None else max(1, int(workers))
    results = _run_tasks(list(_tasks(src, out, todo, labels, boxes, settings)), workers, progress)
    seconds = time.perf_counter() - t0
    done = [r for r in results if r["ok"]]
    slices = sum(r["source_slices"] for r in done)
    report = {
        "settings": settings,
        "status": "finished",
        "source": records.shown_path(src),
        "shard": f"{i}/{n}",
        "workers": workers,
        "counts": {"studies": len(uids), "prepared": len(done), "already_done": len(uids) - len(todo)},
        "skipped": sorted(({"study": r["study"], "reason": r["reason"]} for r in results if not r["ok"]), key=str),
        "label_problems": problems,
        "seconds": round(seconds, 2),
        "slices_per_s": round(slices / seconds, 1) if done else None,
        "studies_per_min": round(60 * len(done) / seconds, 2) if done else None,
        "versions": records.package_versions(("numpy", "pydicom", "nibabel", "pylibjpeg", "cspine-utils")),
    }
    report["counts"]["failed"] = len(report["skipped"])
    report["counts"]["in_cache"] = len(_write_manifest(out))
    records.write_json(out / "prepare.json", report)
    return report


def load_manifest(cache: str | os.PathLike) -> pd.DataFrame:
    """``manifest.csv`` of a prepared cache: one row per study (StudyInstanceUID, n_slices, flags, labels)."""
    cache = Path(cache)
    if not is_cache(cache):
        raise FileNotFoundError(f"{cache}: not a prepared cache (run `cspine data prepare RSNA_DIR --out {cache}`)")
    return pd.read_csv(cache / "manifest.csv", dtype={"StudyInstanceUID": str})


def load_cached_study(cache: str | os.PathLike, uid: str, keys=None) -> dict:
    """The arrays of one prepared study (keys as in ``studies/<uid>.npz``; ``has_mask``/``has_boxes`` as bool).

    ``keys`` (e.g. ``("vertebrae", "box_slices")``) reads only those arrays: the npz decompresses each
    array on access, so labels come without decompressing the windowed slices.
    """
    path = Path(cache) / "studies" / f"{uid}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: study {uid} is not in the cache")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in (npz.files if keys is None else keys)}
    for flag in ("has_mask", "has_boxes"):
        if flag in arrays:
            arrays[flag] = bool(arrays[flag])
    return arrays
