"""Dataset audit: the report to read *before* training a model on a folder of CT slices.

A network learns whatever separates the two folders. :func:`audit_dataset` checks for the flaws
of the public Kaggle sets: class imbalance; image sizes or modes found in one class only (a label
shortcut); rejected files; exact duplicates, also across labels; near-duplicate clusters; source
groups and copies per group (the Kaggle set ships ~21 rotated/sharpened/resized copies of each
source slice); cross-split leakage (named groups); how each label is spread over **patients**
(:func:`patient_table`: slices of one scan share anatomy, level, scanner and noise, so they are not
independent, and a class drawn from a few scans lets a model learn the scan); and the **shortcut
alarm** (:func:`shortcut_auc`).

The shortcut alarm: a standardised, L1-penalised logistic regression on a 16 x 16 area-averaged
thumbnail (32 x 32-pixel blocks of a 512-pixel slice, 1-1.5 cm of neck) plus intensity statistics,
scored as out-of-fold ROC AUC by grouped cross-validation (all copies of a source on one side), mean
of three shuffles. A fracture changes a few hundred pixels of bone, a fraction of a grey level per
block, far below the differences between patients, levels and scanners: where only the fracture
differs the AUC stays well below the alarm (0.44-0.68 on our synthetic sets of 100-1200 slices;
large displaced or burst fractures leave a little coarse signal). **>= 0.9** means the labels are
predictable from coarse appearance: anatomical level (fractures from C1-C2 against normals from
C6-C7 score 0.95-0.99), scanner, window, padding or resolution. Chance AUC has a standard
deviation of about sqrt((n1 + n2 + 1) / (12 n1 n2)) in *groups* (0.13 with 10 groups per class,
0.05 with 60): 0.9 is 3-8 SD above 0.5; 0.75-0.9 is noted as partial. Under the alarm a deep
model's accuracy does not measure fracture detection: match levels, sizes and sources between
the classes, or report the trivial model's AUC beside the network's.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .records import jsonable, sha256_file, shown_path

SHORTCUT_AUC_THRESHOLD = 0.9  # out-of-fold AUC of the trivial model that raises the alarm
PARTIAL_SHORTCUT_AUC = 0.75  # noted in the report, no warning
DEFAULT_MAX_FILES = 4000  # images read for the shortcut model (stratified sample)
THUMBNAIL_SIZE = 16  # pixels per side of the thumbnail the trivial model sees
SHORTCUT_C = 0.5  # inverse L1 penalty: a shortcut needs few features, so the model is kept sparse
MIN_MINORITY_SHARE = 0.2  # below this share of the smaller class (1:4): imbalance warning
FEW_PATIENTS = 3  # a class from at most this many patients: labels confounded with patients
TOP_TWO_SHARE = 0.8  # ... or at least this share of a class's slices from its two largest patients
MANY_COPIES_PER_GROUP = 3.0  # median files per source group from which the set looks pre-augmented
BRIGHT_LEVEL = 0.6  # grey level (0-1) above which a pixel counts as bright (bone in a bone window)
DARK_LEVEL = 0.02  # grey level below which a pixel counts as padding/air
_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
STAT_FEATURES = ["mean", "std", *(f"p{q:02d}" for q in _PERCENTILES)]
STAT_FEATURES += ["bright_fraction", "dark_fraction", "width", "height", "aspect", "colour_mode"]
_GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F", "1"}
_LIST_LIMIT = 10  # names listed in one warning line
_AUGMENT_WORDS = re.compile(r"rotat|sharpen|flip|mirror|bright|contrast|zoom|shear|crop|noise|blur|augment", re.I)


@dataclass
class AuditReport:
    """What :func:`audit_dataset` found; ``print(report)`` shows :meth:`to_text`.

    ``shortcut_auc`` is ``None`` when it cannot be computed (one class, too few images) and
    ``shortcut_method`` then says why. ``warnings`` has one sentence per problem (empty when
    clean). ``tables`` (DataFrames): ``counts`` (label x split), ``sizes`` (size/mode x label),
    ``duplicates`` (exact duplicate sets), ``near_duplicates`` (clusters of more than one file),
    ``groups`` (files per source group), ``leakage`` (leaking groups), ``rejected`` (path, reason),
    ``shortcut_features`` (AUC of each intensity statistic alone), ``patients`` (:func:`patient_table`).
    Groups here are sources (copies of one slice); ``n_patients`` counts scans where names or a
    column give one, ``leaking_patients`` those with slices in more than one split.
    """

    root: str
    layout: str  # as recognised by cspine_utils.data.discover
    seed: int
    n_files: int  # usable images
    n_rejected: int
    n_groups: int  # distinct source groups
    labels: list[str]
    leaking_groups: list[str]  # groups with files in more than one split, sorted
    shortcut_auc: float | None
    shortcut_method: str
    shortcut_n_images: int
    shortcut_threshold: float
    copies_per_group: dict
    n_exact_duplicates: int
    n_near_duplicate_clusters: int
    warnings: list[str]
    n_patients: int = 0  # distinct patients (scans); 0 when nothing names one
    leaking_patients: list[str] = field(default_factory=list)
    labels_confounded_with_patients: bool = False  # the rule of patient_warnings holds
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def shortcut_alarm(self) -> bool:
        """True when the trivial model separates the classes at or above the threshold."""
        return self.shortcut_auc is not None and self.shortcut_auc >= self.shortcut_threshold

    def to_dict(self) -> dict:
        """Everything as plain JSON types (tables as lists of records, NaN as ``None``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tables"}
        out["shortcut_alarm"] = self.shortcut_alarm
        out.update({name: _records(table) for name, table in self.tables.items()})
        return jsonable(out)

    def to_text(self) -> str:
        """A readable multi-line report for the terminal or a notebook."""
        cpg, t = self.copies_per_group, self.tables
        rejected = t["rejected"].assign(path=[os.path.relpath(p, self.root or ".") for p in t["rejected"]["path"]])
        summary = (
            f"Dataset audit: {shown_path(self.root) if self.root else '(no folder)'}\n  layout: {self.layout}\n"
            f"  {self.n_files} images, {self.n_rejected} rejected, classes: {', '.join(self.labels) or 'none'}, "
            f"{self.n_groups} source groups (files per group: median {cpg.get('median', 0):g}, max {cpg.get('max', 0):g})"
        )
        sections = [
            [summary],
            ["Counts (label x split)", _indent(t["counts"].to_string())],
            ["Image sizes and modes (files per class)", *_head(t["sizes"], 15, "sizes")],
            [f"Rejected files: {self.n_rejected}", *(_head(rejected, 10) if self.n_rejected else [])],
            self._duplicates_text(),
            [f"Cross-split leakage: {len(self.leaking_groups)} groups in more than one split"]
            + (_head(t["leakage"], 10) if self.leaking_groups else []),
            self._patients_text(),
            self._shortcut_text(),
            [f"Warnings: {len(self.warnings)}", *([f"  ! {w}" for w in self.warnings] or ["  none"])],
        ]
        return "\n\n".join("\n".join(lines) for lines in sections)

    def _duplicates_text(self) -> list[str]:
        lines = [f"Exact duplicates (same file bytes): {self.n_exact_duplicates} sets"]
        dup = self.tables["duplicates"]
        if len(dup):
            lines.append(_indent(dup[["n_files", "labels", "splits", "example"]].head(5).to_string(index=False)))
        lines.append(f"Near-duplicate clusters (perceptual hash): {self.n_near_duplicate_clusters}")
        near = self.tables.get("near_duplicates")
        if near is not None and len(near):
            lines += [
                f"    {int(near['n_files'].sum())} files, largest {int(near['n_files'].max())} ({near.iloc[0]['example']}, ...)",
                "    not a flaw by itself: 64-bit hashes of axial neck CT slices are alike, so clusters join",
                "    unrelated slices too; copies also show as exact duplicates or augmented names (warnings).",
            ]
        return lines

    def _patients_text(self) -> list[str]:
        table = self.tables.get("patients")
        if table is None or table.empty:
            return ["Patients (scans): none named (no patient column, no 'scan (slice)' file names)"]
        rule = (
            f"confounded when a class comes from <= {FEW_PATIENTS} patients or >= {TOP_TWO_SHARE:.0%} of it from <= 2"
        )
        verdict = "LABELS CONFOUNDED WITH PATIENTS" if self.labels_confounded_with_patients else "ok"
        return [
            f"Patients (scans): {self.n_patients}, {len(self.leaking_patients)} with slices in more than one split",
            _indent(table.to_string(index=False)),
            f"  {rule}: {verdict}",
        ]

    def _shortcut_text(self) -> list[str]:
        lines = ["Shortcut check (trivial model: 16x16 thumbnail + intensity statistics)"]
        if self.shortcut_auc is None:
            return lines + [f"  not computed: {self.shortcut_method}"]
        auc, alarm_at = self.shortcut_auc, self.shortcut_threshold
        verdict = "ALARM" if auc >= alarm_at else "partial shortcut" if auc >= PARTIAL_SHORTCUT_AUC else "ok"
        lines.append(f"  out-of-fold ROC AUC = {auc:.3f} (alarm at >= {alarm_at:.2f}): {verdict}")
        lines.append(f"  {self.shortcut_method}")
        feats = self.tables.get("shortcut_features")
        if feats is not None and len(feats):
            top = ", ".join(f"{r.feature} {r.auc:.2f}" for r in feats.head(4).itertuples())
            lines.append(f"  strongest single statistics (AUC): {top}")
        return lines

    __str__ = to_text


# The audit: a list of named steps
def audit_dataset(
    data_dir_or_discovery,
    seed: int = 0,
    max_files: int | None = None,
    *,
    threshold: float = SHORTCUT_AUC_THRESHOLD,
    group_method: str = "auto",
    workers: int | None = None,
) -> AuditReport:
    """Audit a dataset folder (any layout :func:`cspine_utils.data.discover` reads) or its ``Discovery``.

    ``seed`` fixes the image sample and the folds. At most ``max_files`` images (default
    :data:`DEFAULT_MAX_FILES`, stratified by class) feed the shortcut model; every file is hashed.
    ``group_method`` goes to ``discover``; ``workers``: reading threads (default up to 4). Problems
    become warnings; ``FileNotFoundError``/``NotADirectoryError`` for a missing folder or a file,
    ``ValueError`` for ``seed``/``max_files``/``threshold`` out of range or no usable image.
    """
    from . import data  # noqa: PLC0415 - keep the package import light

    max_files = DEFAULT_MAX_FILES if max_files is None else max_files
    _check_arguments(seed, max_files, threshold)
    manifest, rejected, root, layout = _load_manifest(data, data_dir_or_discovery, group_method)
    labels = sorted(manifest["label"].unique())
    counts, sizes = count_table(manifest), size_table(manifest)
    manifest["sha256"] = _map_threads(sha256_file, manifest["path"].tolist(), workers)
    duplicates = duplicate_table(manifest)
    warnings = _class_warnings(manifest, labels) + _size_warnings(sizes) + _file_warnings(rejected, duplicates)
    features, read_ok = _read_sample(data, manifest, max_files, seed, workers)
    near_table = near_duplicate_table(manifest)
    leaking = sorted(str(g) for g in data.cross_split_leakage(manifest))
    group_table, leak_table, cpg, group_warnings = _group_summary(manifest, near_table, leaking)
    patients = patient_table(manifest)
    leaking_patients = data.cross_split_leakage(manifest.assign(group=manifest["patient"]).query("group != ''"))
    warnings += group_warnings + patient_warnings(patients, leaking_patients)
    auc, method, feat_table = _shortcut_check(data, manifest, labels, features, read_ok, seed)
    warnings += _alarm_warnings(auc, threshold, feat_table)
    tables = {"counts": counts, "sizes": sizes, "duplicates": duplicates, "near_duplicates": near_table}
    tables |= {"groups": group_table, "leakage": leak_table, "rejected": rejected, "shortcut_features": feat_table}
    return AuditReport(
        root=root,
        layout=layout,
        seed=int(seed),
        n_files=len(manifest),
        n_rejected=len(rejected),
        n_groups=len(group_table),
        labels=labels,
        leaking_groups=leaking,
        shortcut_auc=auc,
        shortcut_method=method,
        shortcut_n_images=len(read_ok) if len(labels) >= 2 else 0,
        shortcut_threshold=float(threshold),
        copies_per_group=cpg,
        n_exact_duplicates=len(duplicates),
        n_near_duplicate_clusters=near_table["cluster"].nunique() if len(near_table) else 0,
        warnings=warnings,
        n_patients=int(manifest.loc[manifest["patient"] != "", "patient"].nunique()),
        leaking_patients=leaking_patients,
        labels_confounded_with_patients=any(w.startswith("labels confounded") for w in warnings),
        tables=tables | {"patients": patients},
    )


def _check_arguments(seed, max_files, threshold) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(max_files, (int, np.integer)) or max_files < 2:
        raise ValueError(f"max_files must be an integer >= 2, got {max_files!r}")
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0.5, 1], got {threshold!r}")


def _load_manifest(data_module, source, group_method: str) -> tuple[pd.DataFrame, pd.DataFrame, str, str]:
    """(manifest with label/split/group/width/height/mode, rejected table, root, layout) of a folder or Discovery."""
    if not hasattr(source, "manifest"):
        root = Path(source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data folder not found: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        source = data_module.discover(root, require_two_classes=False, group_method=group_method)
    manifest = source.manifest.reset_index(drop=True).copy()
    rejected = getattr(source, "rejected", None)
    rejected = rejected if rejected is not None and len(rejected) else pd.DataFrame(columns=["path", "reason"])
    root = str(getattr(source, "root", "") or "")
    if len(manifest) == 0:
        raise ValueError(f"no usable images in {root or 'the dataset'} ({len(rejected)} files rejected)")
    for col in ("label", "split", "group"):
        manifest[col] = manifest[col].fillna("").astype(str)
    # groups here are sources (copies of one slice); patients are looked at on their own
    manifest["group"] = manifest["source"].fillna("").astype(str) if "source" in manifest else manifest["group"]
    manifest["patient"] = data_module.patient_keys(manifest)
    return manifest, rejected.reset_index(drop=True), root, str(getattr(source, "layout", "") or "unknown")


def _read_sample(data_module, manifest: pd.DataFrame, max_files: int, seed: int, workers: int | None):
    """Read the sampled images once: (features (n_read, d), indices read); adds ``phash``, ``near_cluster``."""
    sample = _stratified_sample(manifest.index.to_numpy(), manifest["label"].to_numpy(), max_files, seed)
    jobs = [(manifest.at[i, "path"], str(manifest.at[i, "mode"])) for i in sample]
    read = _map_threads(partial(_features_and_hash, data_module), jobs, workers)
    read_ok = [i for i, r in zip(sample, read) if r is not None]
    has_hash = "phash" in manifest and (manifest["phash"].fillna("").astype(str) != "").all()
    if not has_hash and len(read_ok) == len(manifest):
        manifest["phash"] = pd.Series([r[1] for r in read], index=sample).reindex(manifest.index)
    clusters = pd.Series(data_module.near_duplicate_clusters(manifest))
    if len(clusters) != len(manifest):
        raise ValueError(f"near_duplicate_clusters returned {len(clusters)} ids for {len(manifest)} files")
    manifest["near_cluster"] = clusters.to_numpy()
    features = np.vstack([r[0] for r in read if r is not None]) if read_ok else None
    return features, read_ok


def _features_and_hash(data_module, job: tuple[str, str]) -> tuple[np.ndarray, str] | None:
    """``(path, mode)`` → (thumbnail features, dHash in hex) or ``None``; the image itself is not kept."""
    try:
        img = data_module.read_image(job[0])
    except (OSError, ValueError):
        return None
    return thumbnail_features(img, mode=job[1]), f"{data_module.perceptual_hash(img):016x}"


def _map_threads(func, items: list, workers: int | None) -> list:
    """``[func(x) for x in items]`` on a few threads (file reading and PNG decoding release the GIL)."""
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    if workers <= 1 or len(items) < 16:
        return [func(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, items, chunksize=16))


def _group_summary(manifest: pd.DataFrame, near_table: pd.DataFrame, leaking: list[str]):
    """Files per source group, the leaking groups' rows, copies per group (with the evidence of
    augmentation) and the warnings about groups: over-merged, pre-augmented, leaking."""
    group_table = _grouped_files(manifest, "group")[["group", "n_files", "labels", "splits"]]
    leak_table = group_table[group_table["group"].isin(leaking)].reset_index(drop=True)
    sizes = group_table["n_files"]
    cpg = {"median": float(sizes.median()), "mean": round(float(sizes.mean()), 2), "max": int(sizes.max())}
    cpg |= _augmentation_evidence(manifest, near_table)
    warnings = []
    if len(manifest) >= 20 and cpg["max"] > 0.5 * len(manifest):
        warnings.append(
            f"one source group ('{group_table['group'].iloc[0]}') holds {cpg['max']} of {len(manifest)} files: "
            "the grouping looks over-merged (perceptual hashes of CT slices are alike and chain unrelated "
            "images). Leakage and grouped splits are unreliable; try group_method='name' (CLI: --group-method name)."
        )
    if cpg["median"] >= MANY_COPIES_PER_GROUP and max(cpg["augmented_name_share"], cpg["exact_duplicate_share"]) >= 0.2:
        warnings.append(
            f"{len(manifest)} files come from only {len(group_table)} source groups (median {cpg['median']:g} "
            f"files each, up to {cpg['max']}; {cpg['augmented_name_share']:.0%} of the names say "
            f"rotated/sharpened/..., {cpg['exact_duplicate_share']:.0%} of the files are exact "
            "copies): the set looks pre-augmented. Split and cross-validate by group, never by file, and "
            "count groups - not files - as your sample size."
        )
    if leaking:
        warnings.append(
            f"cross-split leakage: {len(leaking)} source groups ({int(leak_table['n_files'].sum())} files) appear "
            f"in more than one split: {_listed(leaking)}. Validation scores on these splits are inflated; re-split by group "
            "(data.assign_groups + a grouped split)."
        )
    return group_table, leak_table, cpg, warnings


def patient_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per label: ``slices`` and ``patients``, the share of its slices held by its ``top1``-``top3``
    patients, its ``largest`` patient and ``shared`` (patients holding both labels). Rows whose
    ``patient`` is '' are left out; no row when no slice names a patient."""
    cols = ["label", "slices", "patients", "top1", "top2", "top3", "largest", "shared"]
    m = manifest[manifest["patient"].astype(str) != ""]
    shared = int((m.groupby("patient")["label"].nunique() > 1).sum())
    rows = []
    for label, part in m.groupby("label"):
        counts = part["patient"].value_counts()
        top = [round(float(counts.iloc[:k].sum() / len(part)), 4) for k in (1, 2, 3)]
        rows.append([label, len(part), len(counts), *top, counts.index[0], shared])
    return pd.DataFrame(rows, columns=cols)


def patient_warnings(table: pd.DataFrame, leaking_patients: list[str] = ()) -> list[str]:
    """ "labels confounded with patients" when a class comes from <= FEW_PATIENTS patients or
    >= TOP_TWO_SHARE of it from its two largest; patients with slices in more than one split."""
    out = []
    few = (
        table[(table["patients"] <= FEW_PATIENTS) | (table["top2"] >= TOP_TWO_SHARE)] if len(table) >= 2 else table[:0]
    )
    if len(few):
        detail = "; ".join(
            f"{r.label}: {r.slices} slices from {r.patients} patient(s), {r.top2:.0%} from the largest two "
            f"({r.largest}: {r.top1:.0%})"
            for r in few.itertuples()
        )
        out.append(
            f"labels confounded with patients: {detail} (rule: a class from <= {FEW_PATIENTS} patients, or >= "
            f"{TOP_TWO_SHARE:.0%} of its slices from <= 2 patients). Slices of one scan share anatomy, level, scanner "
            "and noise: a model can learn which scan a slice comes from instead of the fracture, and a score over "
            "slices counts one patient many times. Count patients, not slices, as the sample size."
        )
    if leaking_patients:
        out.append(
            f"patient leakage: {len(leaking_patients)} patients (scans) have slices in more than one split: "
            f"{_listed(leaking_patients)}. "
            "Neighbouring slices of one scan are near copies; split by patient (data.choose_split does)."
        )
    return out


def _augmentation_evidence(manifest: pd.DataFrame, near_table: pd.DataFrame) -> dict:
    """Shares of files named as augmented copies, of exact copies and of near duplicates.

    Several files per group are no flaw (a subject gives several levels); copies are. Near
    duplicates are no evidence on their own: hashes of axial neck CT slices are alike.
    """
    named = float(manifest["path"].map(lambda p: Path(p).stem).str.contains(_AUGMENT_WORDS).mean())
    exact = float(manifest.duplicated("sha256", keep=False).mean())
    near = float(near_table["n_files"].sum() / len(manifest)) if len(near_table) else 0.0
    shares = ("augmented_name_share", "exact_duplicate_share", "near_duplicate_share")
    return {k: round(v, 4) for k, v in zip(shares, (named, exact, near))}


# Warnings
def _class_warnings(manifest: pd.DataFrame, labels: list[str]) -> list[str]:
    if len(labels) < 2:
        only = labels[0] if labels else "none"
        return [f"only one class present ({only}): nothing to classify; the shortcut check is skipped."]
    out = []
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


def _size_warnings(sizes: pd.DataFrame) -> list[str]:
    """Warn when image size/mode is associated with the class (chi-square p < 0.01, Cramér's V >= 0.3)."""
    from scipy.stats import chi2_contingency  # noqa: PLC0415

    labels = [c for c in sizes.columns if c not in ("size", "mode", "total", "only_in")]
    if len(labels) < 2 or len(sizes) < 2:
        return []
    table = sizes[labels].to_numpy()
    table = table[table.sum(axis=1) > 0]
    chi2, p, _, _ = chi2_contingency(table)
    v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    if p >= 0.01 or v < 0.3:
        return []
    exclusive = sizes[sizes["only_in"] != ""].head(4)
    detail = "; ".join(f"{r.size} {r.mode} only in {r.only_in} ({r.total} files)" for r in exclusive.itertuples())
    return [
        f"image size/mode depends on the class (Cramér's V {v:.2f}, chi-square p = {p:.1g})"
        + (f": {detail}" if detail else "")
        + ". A network can read the label from size, padding or colour mode; resize and convert all "
        "images the same way and check the classes match."
    ]


def _file_warnings(rejected: pd.DataFrame, duplicates: pd.DataFrame) -> list[str]:
    """Rejected files (with the commonest reasons) and exact duplicates (across labels, across splits)."""
    out = []
    if len(rejected):
        reasons = rejected["reason"].astype(str).str.split(":").str[0].value_counts()
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.head(3).items())
        out.append(f"{len(rejected)} files were rejected and will not be used ({summary}); see the 'rejected' table.")
    if not len(duplicates):
        return out
    redundant = int(duplicates["n_files"].sum() - len(duplicates))
    msg = f"{len(duplicates)} sets of exact duplicates ({redundant} redundant files): identical bytes under"
    msg += " several names"
    conflicting, cross = (duplicates[c].str.contains(",").sum() for c in ("labels", "splits"))
    msg += f"; {conflicting} sets are filed under both labels (contradictory labels)" if conflicting else ""
    return out + [msg + (f"; {cross} sets span several splits" if cross else "") + "."]


def _alarm_warnings(auc: float | None, threshold: float, feat_table: pd.DataFrame) -> list[str]:
    if auc is None or auc < threshold:
        return []
    cues = ", ".join(feat_table.loc[feat_table["auc"] >= 0.8, "feature"].head(4))
    return [
        f"SHORTCUT ALARM: a trivial model on 16x16 thumbnails and intensity statistics separates the "
        f"classes with out-of-fold AUC {auc:.2f} (>= {threshold:.2f}). It cannot see a fracture, so the "
        "labels are predictable from coarse appearance (anatomical level, scanner, window, padding, "
        "resolution)" + (f"; strongest cues: {cues}" if cues else "") + ". A deep model's accuracy on "
        "this dataset will not measure fracture detection."
    ]


# Tables
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
    labels = list(table.columns)
    table["total"] = table.sum(axis=1)
    present = table[labels].to_numpy() > 0
    table["only_in"] = [labels[int(np.argmax(r))] if r.sum() == 1 and len(labels) > 1 else "" for r in present]
    table = table.sort_values("total", ascending=False).reset_index()
    table.columns.name = None
    return table


def _grouped_files(manifest: pd.DataFrame, key: str, **more) -> pd.DataFrame:
    """Files grouped by ``key``: ``n_files``, ``labels``, ``splits``, ``example`` (+ ``more``), largest first."""
    agg = dict(n_files=("path", "size"), labels=("label", _joined), splits=("split", _joined))
    agg["example"] = ("path", lambda s: Path(sorted(s)[0]).name)
    return manifest.groupby(key).agg(**agg, **more).sort_values("n_files", ascending=False).reset_index()


def duplicate_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Sets of files with identical bytes: ``sha256``, ``n_files``, ``labels``, ``splits``, ``example``, ``paths``."""
    cols = ["sha256", "n_files", "labels", "splits", "example", "paths"]
    dup = manifest[manifest.duplicated("sha256", keep=False)]
    return pd.DataFrame(columns=cols) if dup.empty else _grouped_files(dup, "sha256", paths=("path", sorted))[cols]


def near_duplicate_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Near-duplicate clusters of more than one file: ``cluster``, ``n_files``, ``n_groups``, labels, splits, example."""
    cols = ["cluster", "n_files", "n_groups", "labels", "splits", "example"]
    m = manifest.dropna(subset=["near_cluster"]) if "near_cluster" in manifest else manifest.iloc[:0]
    m = m[m.duplicated("near_cluster", keep=False)]
    if m.empty:
        return pd.DataFrame(columns=cols)
    table = _grouped_files(m, "near_cluster", n_groups=("group", "nunique"))
    return table.rename(columns={"near_cluster": "cluster"})[cols]


# The shortcut model
def thumbnail_features(image: np.ndarray, size: int = THUMBNAIL_SIZE, mode: str = "L") -> np.ndarray:
    """Features a model that cannot see a fracture would use: float64 (size*size + len(STAT_FEATURES),).

    ``image``: float (H, W) grey levels in [0, 1]; ``mode``: the file's PIL mode (RGB etc. = colour).
    The area-averaged thumbnail row by row, then :data:`STAT_FEATURES` (grey statistics in [0, 1],
    width/height in pixels, aspect w/h, colour 0/1).
    """
    from PIL import Image  # noqa: PLC0415

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"expected a 2-D grey image, got shape {img.shape}")
    thumb = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    step = max(1, int(math.sqrt(img.size / 65536)))  # statistics on <= ~65k pixels: fast, unbiased
    sub = img[::step, ::step].ravel()
    h, w = img.shape
    stats = [float(sub.mean()), float(sub.std()), *np.percentile(sub, _PERCENTILES).tolist()]
    stats += [float((sub > BRIGHT_LEVEL).mean()), float((sub < DARK_LEVEL).mean()), float(w), float(h), float(w / h)]
    stats.append(float(mode not in _GREY_MODES))
    return np.concatenate([thumb.ravel(), np.asarray(stats, dtype=np.float64)])


def _shortcut_check(data_module, manifest, labels, features, read_ok, seed: int):
    """(AUC rounded to 4 places or None, method in words, per-statistic AUC table) for the images read."""
    feat_table = pd.DataFrame(columns=["feature", "auc"])
    if len(labels) < 2:
        return None, "only one class present", feat_table
    if not read_ok:
        return None, "no image could be read", feat_table
    positive = "fracture" if "fracture" in labels else labels[-1]
    y = (manifest.loc[read_ok, "label"].to_numpy() == positive).astype(int)
    auc, method = shortcut_auc(features, y, _cv_groups(data_module, manifest)[read_ok], seed=seed)
    feat_table = _single_feature_aucs(features[:, -len(STAT_FEATURES) :], y)
    return (None if auc is None else round(float(auc), 4)), method, feat_table


def shortcut_auc(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, n_splits: int = 5, n_repeats: int = 3
) -> tuple[float | None, str]:
    """Out-of-fold ROC AUC of a standardised, L1-penalised logistic regression, cross-validated by group.

    ``X``: float (n, d) features; ``y``: int (n,), 1 = positive; ``groups``: (n,) source ids, never
    on both sides of a fold. ``n_splits`` folds (fewer with fewer groups), reshuffled ``n_repeats``
    times (seeds ``seed + r``) and averaged: with few groups one assignment moves the AUC by
    several hundredths. Returns ``(auc, method)``; ``auc`` is ``None`` with < 2 images per class.
    With < 2 groups holding each class the folds fall back to StratifiedKFold over files
    (optimistic when copies exist; ``method`` says so). A training fold lacking a class predicts
    its test fold at the training prevalence, which can only lower the AUC.
    """
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    X, y, groups = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int), np.asarray(groups)
    per_class = np.bincount(y, minlength=2)
    if per_class.min() < 2:
        return None, f"too few images per class ({per_class[0]} vs {per_class[1]}) for cross-validation"
    n_groups = len(np.unique(groups))
    grouped = min(len(np.unique(groups[y == c])) for c in (0, 1)) >= 2
    k = max(2, int(min(n_splits, n_groups))) if grouped else int(min(n_splits, per_class.min()))
    model = make_pipeline(StandardScaler(), _sparse_logistic_regression(SHORTCUT_C))
    aucs = []
    for r in range(max(1, int(n_repeats))):
        folds = (StratifiedGroupKFold if grouped else StratifiedKFold)(k, shuffle=True, random_state=seed + r)
        oof = np.empty(len(y), dtype=np.float64)
        for train, test in folds.split(X, y, groups):  # StratifiedKFold ignores the groups
            one_class = len(np.unique(y[train])) < 2
            oof[test] = y[train].mean() if one_class else model.fit(X[train], y[train]).predict_proba(X[test])[:, 1]
        aucs.append(float(roc_auc_score(y, oof)))
    repeats = f"{len(y)} images, mean of {len(aucs)} repeats (seed {seed}; range {min(aucs):.3f}-{max(aucs):.3f})"
    if grouped:
        return float(np.mean(aucs)), f"{k}-fold StratifiedGroupKFold over {n_groups} source groups, {repeats}"
    method = f"{k}-fold StratifiedKFold over files, {repeats} - NOT grouped: a class has fewer than 2 source groups, "
    return float(np.mean(aucs)), method + "so copies may sit on both sides and the AUC is optimistic"


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

    aucs = [0.5 if np.ptp(col) == 0 else float(roc_auc_score(y, col)) for col in stats.T]
    table = pd.DataFrame({"feature": STAT_FEATURES, "auc": [round(max(a, 1.0 - a), 4) for a in aucs]})
    return table.sort_values("auc", ascending=False, kind="stable").reset_index(drop=True)


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
    """The manifest's groups joined with exact duplicates; file-name sources when that leaves a
    class in fewer than two groups (hash clustering merged everything)."""
    patient = manifest["patient"].replace("", np.nan)  # slices of one scan stay on one side of a fold
    linked = _linked_groups(manifest.assign(patient_key=patient), ["group", "sha256", "patient_key"])
    per_class = pd.Series(linked).groupby(manifest["label"].to_numpy()).nunique()
    if per_class.min() >= 2:
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
    for col in (c for c in columns if c in manifest):
        keep = manifest[col].notna().to_numpy()
        codes, uniques = pd.factorize(manifest[col][keep].astype(str))
        rows.append(np.flatnonzero(keep))
        cols.append(codes + offset)
        offset += len(uniques)
    r, c = np.concatenate(rows), np.concatenate(cols)
    _, comp = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(offset, offset)), directed=False)
    return comp[:n]


# Text helpers
def _listed(names: list[str]) -> str:
    """The first :data:`_LIST_LIMIT` names, comma-separated, with ", ..." when there are more."""
    return ", ".join(names[:_LIST_LIMIT]) + (", ..." if len(names) > _LIST_LIMIT else "")


def _joined(values: pd.Series) -> str:
    return ",".join(sorted({str(v) if str(v) else "(none)" for v in values}))


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def _head(table: pd.DataFrame, n: int, what: str = "") -> list[str]:
    """The first ``n`` rows of a table, indented, and how many more there are."""
    lines = [_indent(table.head(n).to_string(index=False) if len(table) else "(none)")]
    return lines + ([f"    ... {len(table) - n} more {what}".rstrip()] if len(table) > n else [])


def _records(table: pd.DataFrame) -> list[dict]:
    if table.index.name is not None or isinstance(table.index, pd.MultiIndex):
        table = table.reset_index()
    return table.astype(object).where(pd.notna(table), None).to_dict(orient="records")
