"""Dataset audit: the report to read *before* training a model on a folder of CT slices.

A deep network will happily learn whatever separates the two folders. On a well-made dataset
that is the fracture; on a flawed one it is something else, and the accuracy you measure then
says nothing about fracture detection. :func:`audit_dataset` looks for the flaws known from the
public Kaggle cervical-fracture sets:

* **counts** per class and split, and **class imbalance**;
* **image sizes and modes** per class (a size or colour mode found in one class only is a label
  shortcut: the network can read the class from the padding or resolution);
* **rejected files** (unreadable, too small, not an image) with the reason;
* **exact duplicates** (same SHA-256 of the file bytes), including duplicates filed under both
  labels;
* **near-duplicate clusters** (perceptual hash, see :func:`cspine_utils.data.near_duplicate_clusters`);
* **source groups**: how many distinct source slices (or subjects) lie behind the files, and how
  many copies each has - the Kaggle set ships about 21 augmented copies (rotated, sharpened,
  resized) of every source slice;
* **cross-split leakage**: groups found in more than one split, listed by name;
* the **shortcut alarm** (:func:`shortcut_auc`): a deliberately trivial model must *not* be able to
  tell the classes apart.

Why the shortcut alarm works, and why its threshold is 0.9
----------------------------------------------------------
The trivial model is a standardised, L1-penalised (sparse: a shortcut needs few features) logistic
regression on a 16 x 16 thumbnail of each image (area-averaged, so a 512-pixel slice becomes blocks
of 32 x 32 pixels, 1-1.5 cm of neck each) plus a few intensity statistics (mean, standard
deviation, percentiles, fraction of bright bone pixels, fraction of dark padding, image size,
colour mode). It is scored by grouped cross-validation - every copy of a source slice stays on
one side - as an out-of-fold ROC AUC, averaged over three shuffles of the folds.

A hairline or a displaced fracture changes a few hundred pixels of bone; averaged into 32 x 32
blocks it moves a thumbnail value by a fraction of a grey level, far below the differences
between patients, levels and scanners. So on a dataset where only the fracture differs between
classes this model scores well below the alarm: 0.44-0.68 on our synthetic sets of 100-1000
slices (several seeds; large displaced or burst fractures leave a little coarse signal). An AUC
of **0.9 or more** means the labels are predictable from *coarse appearance*: the anatomical
level (mandible and dens at C1-C2, thyroid at C6-C7), the scanner, the window, padding or
resolution (a fixture with fracture slices from C1-C2 and normals from C6-C7 scores
0.95-0.99). 0.9 is also far outside chance even for small sets: the chance AUC has a standard
deviation of about sqrt((n1 + n2 + 1) / (12 n1 n2)) counted in *groups*, 0.13 with 10 source
groups per class and 0.05 with 60, so 0.9 lies three to eight standard deviations above 0.5.
Between 0.75 and 0.9 the report notes a partial shortcut without raising the alarm.

When the alarm sounds, a deep model's accuracy on this dataset does **not** measure fracture
detection: it will learn the shortcut first. Fix the data (match levels, sizes and sources between
classes) or at least report the trivial model's AUC beside the network's.

Example
-------
>>> from cspine_utils import audit                                   # doctest: +SKIP
>>> report = audit.audit_dataset("data/synthetic/cpu")                 # doctest: +SKIP
>>> print(report.to_text())                                            # doctest: +SKIP
>>> report.tables["counts"]                                            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "AuditReport",
    "audit_dataset",
    "shortcut_auc",
    "thumbnail_features",
    "file_sha256",
    "SHORTCUT_AUC_THRESHOLD",
    "PARTIAL_SHORTCUT_AUC",
    "DEFAULT_MAX_FILES",
    "THUMBNAIL_SIZE",
]

SHORTCUT_AUC_THRESHOLD = 0.9  # out-of-fold AUC of the trivial model that raises the alarm
PARTIAL_SHORTCUT_AUC = 0.75  # noted in the report, no warning
DEFAULT_MAX_FILES = 4000  # images read for the shortcut model (stratified sample)
THUMBNAIL_SIZE = 16  # pixels per side of the thumbnail the trivial model sees
SHORTCUT_C = 0.5  # inverse L1 penalty: a shortcut needs few features, so the model is kept sparse
MIN_MINORITY_SHARE = 0.2  # below this share of the smaller class (1:4): imbalance warning
MANY_COPIES_PER_GROUP = 3.0  # median files per source group from which the set looks pre-augmented
BRIGHT_LEVEL = 0.6  # grey level (0-1) above which a pixel counts as bright (bone in a bone window)
DARK_LEVEL = 0.02  # grey level below which a pixel counts as padding/air
_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
STAT_FEATURES = (
    ["mean", "std"]
    + [f"p{q:02d}" for q in _PERCENTILES]
    + ["bright_fraction", "dark_fraction", "width", "height", "aspect", "colour_mode"]
)
_GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F", "1"}
_LIST_LIMIT = 10  # names listed in one warning line


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class AuditReport:
    """What :func:`audit_dataset` found. ``tables`` holds DataFrames for notebooks.

    Attributes
    ----------
    root, layout
        The dataset folder and the layout :func:`cspine_utils.data.discover` recognised.
    n_files, n_rejected, n_groups
        Usable images, rejected files, distinct source groups.
    labels
        Classes present, sorted.
    leaking_groups
        Groups with files in more than one split (sorted names).
    shortcut_auc
        Out-of-fold ROC AUC of the trivial model, or ``None`` when it cannot be computed
        (one class, or too few images).
    shortcut_method
        How it was cross-validated, in words (or why it was not computed).
    warnings
        One sentence per problem found; empty for a clean dataset.
    tables
        ``counts`` (label x split), ``sizes`` (size/mode x label), ``duplicates`` (exact
        duplicate sets), ``near_duplicates`` (clusters of more than one file), ``groups`` (files
        per group), ``leakage`` (leaking groups and their splits), ``rejected`` (path, reason),
        ``shortcut_features`` (AUC of each intensity statistic on its own).
    """

    root: str
    layout: str
    seed: int
    n_files: int
    n_rejected: int
    n_groups: int
    labels: list[str]
    leaking_groups: list[str]
    shortcut_auc: float | None
    shortcut_method: str
    shortcut_n_images: int
    shortcut_threshold: float
    copies_per_group: dict
    n_exact_duplicates: int
    n_near_duplicate_clusters: int
    warnings: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def shortcut_alarm(self) -> bool:
        """True when the trivial model separates the classes at or above the threshold."""
        return self.shortcut_auc is not None and self.shortcut_auc >= self.shortcut_threshold

    def to_dict(self) -> dict:
        """Everything as plain JSON types (tables as lists of records, NaN as ``None``)."""
        out = {
            "root": self.root,
            "layout": self.layout,
            "seed": self.seed,
            "n_files": self.n_files,
            "n_rejected": self.n_rejected,
            "n_groups": self.n_groups,
            "labels": list(self.labels),
            "leaking_groups": list(self.leaking_groups),
            "shortcut_auc": self.shortcut_auc,
            "shortcut_alarm": self.shortcut_alarm,
            "shortcut_threshold": self.shortcut_threshold,
            "shortcut_method": self.shortcut_method,
            "shortcut_n_images": self.shortcut_n_images,
            "copies_per_group": self.copies_per_group,
            "n_exact_duplicates": self.n_exact_duplicates,
            "n_near_duplicate_clusters": self.n_near_duplicate_clusters,
            "warnings": list(self.warnings),
        }
        for name, table in self.tables.items():
            out[name] = _records(table)
        return _plain(out)

    def to_text(self) -> str:
        """A readable multi-line report for the terminal or a notebook (``print(report.to_text())``)."""
        lines = [f"Dataset audit: {self.root}", f"  layout: {self.layout}"]
        cpg = self.copies_per_group
        lines.append(
            f"  {self.n_files} images, {self.n_rejected} rejected, classes: {', '.join(self.labels) or 'none'}, "
            f"{self.n_groups} source groups (files per group: median {cpg.get('median', 0):g}, "
            f"max {cpg.get('max', 0):g})"
        )
        lines += ["", "Counts (label x split)", _indent(self.tables["counts"].to_string())]
        sizes = self.tables["sizes"]
        lines += [
            "",
            "Image sizes and modes (files per class)",
            _indent(sizes.head(15).to_string(index=False) if len(sizes) else "(none)"),
        ]
        if len(sizes) > 15:
            lines.append(f"    ... {len(sizes) - 15} more sizes")
        lines += ["", f"Rejected files: {self.n_rejected}"]
        if self.n_rejected:
            rej = self.tables["rejected"]
            lines.append(_indent(rej.head(10).to_string(index=False)))
            if len(rej) > 10:
                lines.append(f"    ... {len(rej) - 10} more")
        lines += ["", f"Exact duplicates (same file bytes): {self.n_exact_duplicates} sets"]
        dup = self.tables["duplicates"]
        if len(dup):
            lines.append(_indent(dup[["n_files", "labels", "splits", "example"]].head(5).to_string(index=False)))
        near = self.tables.get("near_duplicates")
        lines.append(f"Near-duplicate clusters (perceptual hash): {self.n_near_duplicate_clusters}")
        if near is not None and len(near):
            big = int(near["n_files"].max())
            lines.append(
                f"    largest: {big} files ({near.iloc[0]['example']}, ...)"
                + (
                    " - hashes of CT slices are alike, so large clusters also join unrelated slices"
                    if big > 0.2 * self.n_files
                    else ""
                )
            )
        lines += ["", f"Cross-split leakage: {len(self.leaking_groups)} groups in more than one split"]
        if self.leaking_groups:
            lines.append(_indent(self.tables["leakage"].head(10).to_string(index=False)))
            if len(self.leaking_groups) > 10:
                lines.append(f"    ... {len(self.leaking_groups) - 10} more")
        lines += ["", "Shortcut check (trivial model: 16x16 thumbnail + intensity statistics)"]
        if self.shortcut_auc is None:
            lines.append(f"  not computed: {self.shortcut_method}")
        else:
            verdict = (
                "ALARM"
                if self.shortcut_alarm
                else "partial shortcut"
                if self.shortcut_auc >= PARTIAL_SHORTCUT_AUC
                else "ok"
            )
            lines.append(
                f"  out-of-fold ROC AUC = {self.shortcut_auc:.3f} (alarm at >= {self.shortcut_threshold:.2f}): "
                f"{verdict}"
            )
            lines.append(f"  {self.shortcut_method}")
            feats = self.tables.get("shortcut_features")
            if feats is not None and len(feats):
                top = ", ".join(f"{r.feature} {r.auc:.2f}" for r in feats.head(4).itertuples())
                lines.append(f"  strongest single statistics (AUC): {top}")
        lines += ["", f"Warnings: {len(self.warnings)}"]
        lines += [f"  ! {w}" for w in self.warnings] or ["  none"]
        return "\n".join(lines)

    def __str__(self) -> str:  # print(report) shows the text report
        return self.to_text()


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------
def audit_dataset(
    data_dir_or_discovery,
    seed: int = 0,
    max_files: int | None = None,
    *,
    threshold: float = SHORTCUT_AUC_THRESHOLD,
    group_method: str = "auto",
    workers: int | None = None,
) -> AuditReport:
    """Audit a dataset folder (or the result of :func:`cspine_utils.data.discover`).

    Parameters
    ----------
    data_dir_or_discovery
        A folder in any layout :func:`cspine_utils.data.discover` understands, or its
        ``Discovery`` result.
    seed
        Seeds the sample of images and the cross-validation folds (same seed, same report).
    max_files
        At most this many images are read for the shortcut model, sampled stratified by class
        (``None``: :data:`DEFAULT_MAX_FILES`). Every file is still hashed.
    threshold
        Out-of-fold AUC of the trivial model that raises the shortcut alarm (see module docstring).
    group_method
        How :func:`cspine_utils.data.discover` groups files into sources when a folder is given
        (``'auto'``, ``'name'``, ``'subject'``, ``'hash'``, ``'name+hash'``, ``'file'``); ignored for a
        ``Discovery``.
    workers
        Threads reading images (default: up to 4).

    Returns
    -------
    AuditReport
        Warnings are collected, not raised: a single-class dataset gives a warning and
        ``shortcut_auc=None``.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        The folder does not exist or is a file.
    ValueError
        ``seed``/``max_files``/``threshold`` out of range, or no usable image at all.
    """
    from . import data  # noqa: PLC0415 - keep the package import light

    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if max_files is None:
        max_files = DEFAULT_MAX_FILES
    if not isinstance(max_files, (int, np.integer)) or max_files < 2:
        raise ValueError(f"max_files must be an integer >= 2, got {max_files!r}")
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0.5, 1], got {threshold!r}")

    if hasattr(data_dir_or_discovery, "manifest"):
        disc = data_dir_or_discovery
    else:
        root = Path(data_dir_or_discovery).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data folder not found: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        disc = data.discover(root, require_two_classes=False, group_method=group_method)

    manifest = disc.manifest.reset_index(drop=True).copy()
    rejected = _rejected_table(getattr(disc, "rejected", None))
    root_str = str(getattr(disc, "root", "") or "")
    layout = str(getattr(disc, "layout", "") or "unknown")
    if len(manifest) == 0:
        raise ValueError(f"no usable images in {root_str or 'the dataset'} ({len(rejected)} files rejected)")
    for col in ("label", "split", "group"):
        if col not in manifest:
            manifest[col] = "" if col != "group" else manifest["path"].astype(str)
    manifest["label"] = manifest["label"].astype(str)
    manifest["split"] = manifest["split"].fillna("").astype(str)
    manifest["group"] = manifest["group"].astype(str)
    _fill_sizes(manifest)

    warnings: list[str] = []
    labels = sorted(manifest["label"].unique())
    counts = count_table(manifest)
    warnings += _class_warnings(manifest, labels)

    sizes = size_table(manifest)
    warnings += _size_warnings(manifest, sizes)

    if len(rejected):
        reasons = rejected["reason"].astype(str).str.split(":").str[0].value_counts()
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.head(3).items())
        warnings.append(
            f"{len(rejected)} files were rejected and will not be used ({summary}); see the 'rejected' table."
        )

    manifest["sha256"] = _map_threads(file_sha256, manifest["path"].tolist(), workers)
    duplicates = duplicate_table(manifest)
    n_dup_files = int(duplicates["n_files"].sum() - len(duplicates)) if len(duplicates) else 0
    if len(duplicates):
        msg = (
            f"{len(duplicates)} sets of exact duplicates ({n_dup_files} redundant files): identical "
            "bytes under several names"
        )
        conflicting = duplicates[duplicates["labels"].str.contains(",")]
        if len(conflicting):
            msg += f"; {len(conflicting)} sets are filed under both labels (contradictory labels)"
        cross = duplicates[duplicates["splits"].str.contains(",")]
        if len(cross):
            msg += f"; {len(cross)} sets span several splits"
        warnings.append(msg + ".")

    # One pass over the (sampled) images: thumbnail features, and perceptual hashes when missing.
    sample = _stratified_sample(manifest.index.to_numpy(), manifest["label"].to_numpy(), max_files, seed)
    jobs = [(manifest.at[i, "path"], str(manifest.at[i, "mode"])) for i in sample]
    read = _map_threads(_features_and_hash(data), jobs, workers)
    ok = [i for i, r in zip(sample, read) if r is not None]
    has_hash = "phash" in manifest and (manifest["phash"].fillna("").astype(str) != "").all()
    if not has_hash and len(ok) == len(manifest):
        manifest["phash"] = pd.Series([r[1] for r in read], index=sample).reindex(manifest.index)
    manifest["near_cluster"] = _near_duplicates(data, manifest)
    near_table = near_duplicate_table(manifest)

    groups = manifest.groupby("group").size()
    cpg = {"median": float(groups.median()), "mean": round(float(groups.mean()), 2), "max": int(groups.max())}
    group_table = (
        manifest.groupby("group")
        .agg(n_files=("path", "size"), labels=("label", _joined), splits=("split", _joined))
        .sort_values("n_files", ascending=False)
        .reset_index()
    )
    largest = groups.idxmax()
    if len(manifest) >= 20 and groups.max() > 0.5 * len(manifest):
        warnings.append(
            f"one source group ('{largest}') holds {groups.max()} of {len(manifest)} files: the grouping "
            "looks over-merged (perceptual hashes of CT slices are alike and chain unrelated images). "
            "Leakage and grouped splits are unreliable; try group_method='name' (CLI: --group-method name)."
        )
    evidence = _augmentation_evidence(manifest, near_table)
    cpg.update(evidence)
    if cpg["median"] >= MANY_COPIES_PER_GROUP and (
        evidence["augmented_name_share"] >= 0.2 or evidence["exact_duplicate_share"] >= 0.2
    ):
        warnings.append(
            f"{len(manifest)} files come from only {len(groups)} source groups (median {cpg['median']:g} "
            f"files each, up to {cpg['max']}; {evidence['augmented_name_share']:.0%} of the names say "
            f"rotated/sharpened/..., {evidence['exact_duplicate_share']:.0%} of the files are exact "
            "copies): the set looks pre-augmented. Split and cross-validate by group, never by file, and "
            "count groups - not files - as your sample size."
        )

    leaking = sorted(str(g) for g in data.cross_split_leakage(manifest))
    leak_table = group_table[group_table["group"].isin(leaking)].reset_index(drop=True)
    if leaking:
        names = ", ".join(leaking[:_LIST_LIMIT]) + (", ..." if len(leaking) > _LIST_LIMIT else "")
        n_files = int(leak_table["n_files"].sum())
        warnings.append(
            f"cross-split leakage: {len(leaking)} source groups ({n_files} files) appear in more than one "
            f"split: {names}. Validation scores on these splits are inflated; re-split by group "
            "(data.assign_groups + a grouped split)."
        )

    auc, method, n_used, feat_table = None, "", 0, pd.DataFrame(columns=["feature", "auc"])
    if len(labels) < 2:
        method = "only one class present"
    else:
        cv_groups = _cv_groups(data, manifest)
        if ok:
            X = np.vstack([r[0] for r in read if r is not None])
            y = (manifest.loc[ok, "label"].to_numpy() == _positive_label(labels)).astype(int)
            auc, method = shortcut_auc(X, y, cv_groups[ok], seed=seed)
            n_used = len(ok)
            feat_table = _single_feature_aucs(X[:, -len(STAT_FEATURES) :], y)
        else:
            method = "no image could be read"
    if auc is not None:
        auc = round(float(auc), 4)
    if auc is not None and auc >= threshold:
        cues = ", ".join(feat_table.loc[feat_table["auc"] >= 0.8, "feature"].head(4))
        warnings.append(
            f"SHORTCUT ALARM: a trivial model on 16x16 thumbnails and intensity statistics separates the "
            f"classes with out-of-fold AUC {auc:.2f} (>= {threshold:.2f}). It cannot see a fracture, so the "
            "labels are predictable from coarse appearance (anatomical level, scanner, window, padding, "
            "resolution)" + (f"; strongest cues: {cues}" if cues else "") + ". A deep model's accuracy on "
            "this dataset will not measure fracture detection."
        )

    tables = {
        "counts": counts,
        "sizes": sizes,
        "duplicates": duplicates,
        "near_duplicates": near_table,
        "groups": group_table,
        "leakage": leak_table,
        "rejected": rejected,
        "shortcut_features": feat_table,
    }
    return AuditReport(
        root=root_str,
        layout=layout,
        seed=int(seed),
        n_files=len(manifest),
        n_rejected=len(rejected),
        n_groups=int(len(groups)),
        labels=labels,
        leaking_groups=leaking,
        shortcut_auc=None if auc is None else round(float(auc), 4),
        shortcut_method=method,
        shortcut_n_images=n_used,
        shortcut_threshold=float(threshold),
        copies_per_group=cpg,
        n_exact_duplicates=len(duplicates),
        n_near_duplicate_clusters=len(near_table.drop_duplicates("cluster")) if len(near_table) else 0,
        warnings=warnings,
        tables=tables,
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Files per label (rows) and split (columns), with totals. An empty split shows as ``(none)``."""
    split = manifest["split"].replace("", "(none)")
    table = pd.crosstab(manifest["label"], split, margins=True, margins_name="total")
    table.index.name, table.columns.name = "label", "split"
    return table


def size_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Files per image size and mode, one column per label; ``only_in`` names a class-exclusive size."""
    key = manifest["width"].astype(str) + "x" + manifest["height"].astype(str)
    table = pd.crosstab([key.rename("size"), manifest["mode"].rename("mode")], manifest["label"])
    table["total"] = table.sum(axis=1)
    labels = [c for c in table.columns if c != "total"]
    present = table[labels] > 0
    table["only_in"] = [
        labels[int(np.argmax(row))] if row.sum() == 1 and len(labels) > 1 else "" for row in present.to_numpy()
    ]
    table = table.sort_values("total", ascending=False).reset_index()
    table.columns.name = None
    return table


def duplicate_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Sets of files with identical bytes: ``sha256``, ``n_files``, ``labels``, ``splits``, ``example``, ``paths``."""
    dup = manifest[manifest.duplicated("sha256", keep=False)]
    cols = ["sha256", "n_files", "labels", "splits", "example", "paths"]
    if dup.empty:
        return pd.DataFrame(columns=cols)
    table = (
        dup.groupby("sha256")
        .agg(
            n_files=("path", "size"),
            labels=("label", _joined),
            splits=("split", _joined),
            example=("path", lambda s: Path(sorted(s)[0]).name),
            paths=("path", lambda s: sorted(s)),
        )
        .sort_values("n_files", ascending=False)
        .reset_index()
    )
    return table[cols]


def near_duplicate_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Near-duplicate clusters with more than one file: ``cluster``, ``n_files``, ``groups``, ``labels``, ``splits``."""
    cols = ["cluster", "n_files", "n_groups", "labels", "splits", "example"]
    if "near_cluster" not in manifest or manifest["near_cluster"].isna().all():
        return pd.DataFrame(columns=cols)
    m = manifest.dropna(subset=["near_cluster"])
    m = m[m.duplicated("near_cluster", keep=False)]
    if m.empty:
        return pd.DataFrame(columns=cols)
    table = (
        m.groupby("near_cluster")
        .agg(
            n_files=("path", "size"),
            n_groups=("group", "nunique"),
            labels=("label", _joined),
            splits=("split", _joined),
            example=("path", lambda s: Path(sorted(s)[0]).name),
        )
        .sort_values("n_files", ascending=False)
        .reset_index()
        .rename(columns={"near_cluster": "cluster"})
    )
    return table[cols]


def _rejected_table(rejected) -> pd.DataFrame:
    if rejected is None or len(rejected) == 0:
        return pd.DataFrame(columns=["path", "reason"])
    return rejected.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The shortcut model
# --------------------------------------------------------------------------------------------
def thumbnail_features(image: np.ndarray, size: int = THUMBNAIL_SIZE, mode: str = "L") -> np.ndarray:
    """Features a model that cannot see a fracture would use.

    Parameters
    ----------
    image
        float (H, W) grey levels in [0, 1], as returned by :func:`cspine_utils.data.read_image`.
    size
        Side of the area-averaged thumbnail, pixels.
    mode
        PIL mode of the file (``"RGB"`` etc. count as colour).

    Returns
    -------
    numpy.ndarray
        float64 (size*size + len(STAT_FEATURES),): the thumbnail row by row, then
        :data:`STAT_FEATURES` (grey-level statistics in [0, 1], width/height in pixels,
        aspect = width/height, colour_mode 0/1).
    """
    from PIL import Image  # noqa: PLC0415

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"expected a 2-D grey image, got shape {img.shape}")
    thumb = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    step = max(1, int(math.sqrt(img.size / 65536)))  # statistics on <= ~65k pixels: fast, unbiased
    sub = img[::step, ::step].ravel()
    h, w = img.shape
    stats = [
        float(sub.mean()),
        float(sub.std()),
        *np.percentile(sub, _PERCENTILES).tolist(),
        float((sub > BRIGHT_LEVEL).mean()),
        float((sub < DARK_LEVEL).mean()),
        float(w),
        float(h),
        float(w / h),
        float(mode not in _GREY_MODES),
    ]
    return np.concatenate([thumb.ravel(), np.asarray(stats, dtype=np.float64)])


def shortcut_auc(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, n_splits: int = 5, n_repeats: int = 3
) -> tuple[float | None, str]:
    """Out-of-fold ROC AUC of a standardised, L1-penalised logistic regression, cross-validated by group.

    Parameters
    ----------
    X
        float (n, d) features (see :func:`thumbnail_features`).
    y
        int (n,) labels, 1 = positive class.
    groups
        (n,) source-group ids: files of one group never sit on both sides of a fold.
    seed
        Seeds the fold assignment (repeat ``r`` uses ``seed + r``).
    n_splits
        Folds wanted; fewer when there are fewer groups.
    n_repeats
        Cross-validation is repeated with differently shuffled folds and the AUCs averaged: with
        few groups a single fold assignment moves the AUC by several hundredths.

    Returns
    -------
    (auc, method)
        ``auc`` is ``None`` when it cannot be computed (one class, fewer than 2 images per class);
        ``method`` says how the folds were made, in words.

    Notes
    -----
    StratifiedGroupKFold needs at least two groups holding each class. With fewer, the folds
    fall back to StratifiedKFold over files - optimistic when copies of a slice exist, which the
    method string says. A training fold that lacks a class predicts its test fold at the
    training prevalence (no information), which can only lower the AUC.
    """
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups)
    per_class = np.bincount(y, minlength=2)
    if per_class.min() < 2:
        return None, f"too few images per class ({per_class[0]} vs {per_class[1]}) for cross-validation"
    groups_per_class = [len(np.unique(groups[y == c])) for c in (0, 1)]
    n_groups = len(np.unique(groups))
    grouped = min(groups_per_class) >= 2
    if grouped:
        k = max(2, int(min(n_splits, n_groups)))
        method = f"{k}-fold StratifiedGroupKFold over {n_groups} source groups"
    else:
        k = int(min(n_splits, per_class.min()))
        method = "StratifiedKFold over files"
    model = make_pipeline(StandardScaler(), _sparse_logistic_regression(SHORTCUT_C))
    aucs = []
    for r in range(max(1, int(n_repeats))):
        if grouped:
            folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r).split(X, y, groups)
        else:
            folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + r).split(X, y)
        oof = np.empty(len(y), dtype=np.float64)
        for train, test in folds:
            if len(np.unique(y[train])) < 2:
                oof[test] = y[train].mean()
                continue
            model.fit(X[train], y[train])
            oof[test] = model.predict_proba(X[test])[:, 1]
        aucs.append(float(roc_auc_score(y, oof)))
    method = (
        f"{method}, {len(y)} images, mean of {len(aucs)} repeats (seed {seed}; range {min(aucs):.3f}-{max(aucs):.3f})"
    )
    if not grouped:
        method = (
            f"{k}-fold " + method + " - NOT grouped: a class has fewer than 2 source groups, so copies "
            "may sit on both sides and the AUC is optimistic"
        )
    return float(np.mean(aucs)), method


def _sparse_logistic_regression(C: float):
    """L1-penalised logistic regression (liblinear), spelled for scikit-learn before and after 1.8."""
    import inspect  # noqa: PLC0415

    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=0)
    return LogisticRegression(C=C, penalty="l1", solver="liblinear", max_iter=1000, random_state=0)


def _single_feature_aucs(stats: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """AUC of each statistic alone, folded to >= 0.5 (direction does not matter for a shortcut)."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    rows = []
    for name, col in zip(STAT_FEATURES, stats.T):
        auc = 0.5 if np.ptp(col) == 0 else float(roc_auc_score(y, col))
        rows.append({"feature": name, "auc": round(max(auc, 1.0 - auc), 4)})
    return pd.DataFrame(rows).sort_values("auc", ascending=False, kind="stable").reset_index(drop=True)


def _positive_label(labels: list[str]) -> str:
    return "fracture" if "fracture" in labels else labels[-1]


def _stratified_sample(index: np.ndarray, labels: np.ndarray, max_files: int, seed: int) -> np.ndarray:
    """At most ``max_files`` of ``index``, each class in proportion (at least 2 per class), sorted."""
    if len(index) <= max_files:
        return index
    rng = np.random.default_rng([seed, 11])
    chosen = []
    for lab in sorted(set(labels)):
        members = index[labels == lab]
        k = max(min(2, len(members)), int(round(max_files * len(members) / len(index))))
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def _cv_groups(data_module, manifest: pd.DataFrame) -> np.ndarray:
    """Groups for cross-validation: the manifest's groups joined with exact duplicates.

    When that leaves a class in fewer than two groups (e.g. hash clustering merged everything),
    the file-name sources (:func:`cspine_utils.data.source_group_from_name`) are used instead,
    before :func:`shortcut_auc` would fall back to ungrouped folds.
    """
    linked = _linked_groups(manifest, ["group", "sha256"])
    per_class = pd.Series(linked).groupby(manifest["label"].to_numpy()).nunique()
    if per_class.min() >= 2 or not hasattr(data_module, "source_group_from_name"):
        return linked
    names = manifest[["path", "sha256"]].copy()
    names["name_group"] = manifest["path"].map(data_module.source_group_from_name)
    return _linked_groups(names, ["name_group", "sha256"])


def _linked_groups(manifest: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Connected components of files sharing any key in ``columns`` (group, hash, cluster): int (n,)."""
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    n = len(manifest)
    rows, cols, offset = [], [], n
    for col in columns:
        if col not in manifest:
            continue
        values = manifest[col]
        keep = values.notna().to_numpy()
        codes, uniques = pd.factorize(values[keep].astype(str))
        rows.append(np.flatnonzero(keep))
        cols.append(codes + offset)
        offset += len(uniques)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(offset, offset))
    _, comp = connected_components(graph, directed=False)
    return comp[:n]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex. Identical hashes = byte-identical files."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _features_and_hash(data_module):
    """Worker: ``(path, mode)`` → (thumbnail features, dHash as 16 hex digits), or ``None`` if unreadable.

    The image itself is dropped at once, so thousands of files never sit in memory together.
    """

    def work(job):
        path, mode = job
        try:
            img = data_module.read_image(path)
        except (OSError, ValueError):
            return None
        return thumbnail_features(img, mode=mode), f"{data_module.perceptual_hash(img):016x}"

    return work


def _map_threads(func, items: list, workers: int | None) -> list:
    """``[func(x) for x in items]`` on a few threads (file reading and PNG decoding release the GIL)."""
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    if workers <= 1 or len(items) < 16:
        return [func(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, items, chunksize=16))


def _near_duplicates(data_module, manifest: pd.DataFrame) -> pd.Series:
    """Cluster id per file from :func:`cspine_utils.data.near_duplicate_clusters`, aligned to ``manifest``."""
    clusters = data_module.near_duplicate_clusters(manifest)
    clusters = pd.Series(clusters)
    if len(clusters) != len(manifest):
        raise ValueError(f"near_duplicate_clusters returned {len(clusters)} ids for {len(manifest)} files")
    return pd.Series(clusters.to_numpy(), index=manifest.index)


_AUGMENT_WORDS = re.compile(
    r"rotat|sharpen|flip|mirror|bright|contrast|zoom|shear|crop|noise|blur|augment", re.IGNORECASE
)


def _augmentation_evidence(manifest: pd.DataFrame, near_table: pd.DataFrame) -> dict:
    """Shares of files whose name says they are augmented copies, of exact copies and of near duplicates.

    Several files per group alone is no flaw (a subject contributes several levels); copies are.
    Near duplicates are reported but are not evidence on their own: 64-bit perceptual hashes of
    axial neck CT slices are alike (dark field, one round neck), so unrelated slices cluster too.
    """
    names = manifest["path"].map(lambda p: Path(p).stem)
    named = float(names.str.contains(_AUGMENT_WORDS).mean())
    exact = float(manifest.duplicated("sha256", keep=False).mean())
    near = float(near_table["n_files"].sum() / len(manifest)) if len(near_table) else 0.0
    return {
        "augmented_name_share": round(named, 4),
        "exact_duplicate_share": round(exact, 4),
        "near_duplicate_share": round(near, 4),
    }


def _fill_sizes(manifest: pd.DataFrame) -> None:
    """Make sure ``width``, ``height`` and ``mode`` exist (read from the file headers if missing)."""
    if {"width", "height", "mode"} <= set(manifest.columns):
        return
    from PIL import Image  # noqa: PLC0415

    info = []
    for p in manifest["path"]:
        try:
            with Image.open(p) as im:
                info.append((im.width, im.height, im.mode))
        except OSError:
            info.append((0, 0, "?"))
    manifest["width"], manifest["height"], manifest["mode"] = zip(*info)


def _class_warnings(manifest: pd.DataFrame, labels: list[str]) -> list[str]:
    out = []
    if len(labels) < 2:
        out.append(
            f"only one class present ({labels[0] if labels else 'none'}): nothing to classify; "
            "the shortcut check is skipped."
        )
        return out
    counts = manifest["label"].value_counts()
    share = counts.min() / counts.sum()
    if share < MIN_MINORITY_SHARE:
        out.append(
            f"class imbalance: {counts.idxmin()} is {share:.0%} of the files ({counts.min()} of "
            f"{counts.sum()}); accuracy is misleading - report sensitivity, specificity and AUC."
        )
    for split, part in manifest[manifest["split"] != ""].groupby("split"):
        missing = sorted(set(labels) - set(part["label"]))
        if missing:
            out.append(f"split '{split}' has no {', '.join(missing)} images.")
    return out


def _size_warnings(manifest: pd.DataFrame, sizes: pd.DataFrame) -> list[str]:
    """Warn when image size/mode is associated with the class (chi-square, Cramér's V)."""
    from scipy.stats import chi2_contingency  # noqa: PLC0415

    labels = [c for c in sizes.columns if c not in ("size", "mode", "total", "only_in")]
    if len(labels) < 2 or len(sizes) < 2:
        return []
    table = sizes[labels].to_numpy()
    table = table[table.sum(axis=1) > 0]
    chi2, p, _, _ = chi2_contingency(table)
    v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    if p < 0.01 and v >= 0.3:
        exclusive = sizes[sizes["only_in"] != ""]
        detail = "; ".join(
            f"{r.size} {r.mode} only in {r.only_in} ({r.total} files)" for r in exclusive.head(4).itertuples()
        )
        return [
            f"image size/mode depends on the class (Cramér's V {v:.2f}, chi-square p = {p:.1g})"
            + (f": {detail}" if detail else "")
            + ". A network can read the label from size, padding or "
            "colour mode; resize and convert all images the same way and check the classes match."
        ]
    return []


def _joined(values: pd.Series) -> str:
    return ",".join(sorted({str(v) if str(v) else "(none)" for v in values}))


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def _records(table: pd.DataFrame) -> list[dict]:
    if table.index.name is not None or isinstance(table.index, pd.MultiIndex):
        table = table.reset_index()
    table = table.astype(object).where(pd.notna(table), None)
    return table.to_dict(orient="records")


def _plain(obj):
    """Convert NumPy scalars, tuples and NaN to plain JSON types, recursively."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)
