"""Synthetic CT studies of the cervical spine in the RSNA 2022 layout (notebook 07).

A study is one axial series through C1-C7, continuous along z. Subject, scan and each vertebra's
geometry are drawn once per study (:func:`plan_study`); along z (``depth``, mm below the top of C1)
the level changes C1 -> C7 with heights as in adults: C1 ring ~10 mm with the dens of C2 behind its
anterior arch, C2 ~35 mm including the dens, C3-C7 bodies ~14-15 mm, discs ~5 mm, posterior elements
from 20 % below each body's top over the disc into the next body (they overlap it, as spinous processes
do), all scaled with the subject, on a cervical lordosis. Shapes change smoothly (end-plate flare, the
spinous process growing inferiorly, transverse processes widest mid-body); partial volume through the
slice thickness softens each structure's first and last slice and gives cortical end plates. A
fracture is planned once per fractured vertebra (:mod:`.phantom`'s break geometry) and spans a z-range
inside it (several slices), its gap tapering at both ends; the per-slice fracture mask gives the boxes.
In-plane anatomy, fractures, texture and CT formation are :mod:`.phantom`'s; texture and noise are
drawn per slice. Not modelled: the occiput and T1, the airway's and mandible's gradual transitions
(they switch at a level boundary), partial volume of fine in-plane detail across slices.

Written (:func:`write_rsna_dataset`)::

    train.csv                 StudyInstanceUID, patient_overall, C1..C7
    train_bounding_boxes.csv  StudyInstanceUID, x, y, width, height, slice_number (every fractured slice)
    segmentations/<UID>.nii   vertebra labels 1..7 (every study; the real set has them for 87 of 2,019)
    train_images/<UID>/<slice_number>.dcm   CT, int16, ~25 % of studies JPEG 2000 Lossless
    phantom.json              settings and the generator's fingerprint ("up to date")

DICOM geometry: LPS, ImageOrientationPatient [1,0,0,0,1,0], z superior +; some studies number their
slices inferior -> superior, so only ImagePositionPatient z orders them. NIfTI: array axes (column,
row, slice) with rows and slices flipped (``nii[c, H-1-r, Z-1-s] = vol[s, r, c]`` for ``vol`` sorted
superior -> inferior), a RAS affine that maps voxels to the same patient coordinates as the DICOM: a
naive transpose does not match, the affine does. Labels: ~50 % of studies fractured, 1 (70 %) or 2
vertebrae, levels as in RSNA 2022; scan and subject parameters are drawn from a stream that never sees
the label. Teaching data: a model trained on it knows nothing of real CT.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import phantom as ph
from .records import read_json, replace_folder, write_json

GENERATOR = "cspine_utils.phantom3d"
VERSION = "1.0"
MARKER_NAME = "phantom.json"
LEVELS = ph.LEVELS
LEVEL_SHARES = np.array([0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.19]) / 0.71  # RSNA 2022 fractures per level
TYPE_SHARES = {"C1": (0.3, 0.3, 0.4), "other": (0.45, 0.3, 0.25)}  # linear, posterior, burst (C1: Jefferson)
J2K_SHARE = 0.25
DISC_HU = 85.0
BOX_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number")


# Plan: labels (stream 1) and, independently, subject, scan and geometry (stream 2)
def plan_labels(n_studies: int, seed: int) -> list[dict[str, str]]:
    """Per study ``{level: fracture_type}`` ({} = normal): half the studies fractured, 1 vertebra (70 %)
    or 2, levels by the RSNA 2022 shares, types plausible per level."""
    if n_studies < 1:
        raise ValueError(f"--studies must be a positive number of studies, got {n_studies}")
    rng = np.random.default_rng([seed, 1])
    fractured = set(rng.permutation(n_studies)[: int(round(0.5 * n_studies))].tolist())
    plans = []
    for i in range(n_studies):
        k = (1 if rng.random() < 0.7 else 2) if i in fractured else 0
        levels = rng.choice(len(LEVELS), size=k, replace=False, p=LEVEL_SHARES)
        types = [str(rng.choice(ph.FRACTURE_TYPES, p=TYPE_SHARES.get(LEVELS[j], TYPE_SHARES["other"]))) for j in levels]
        plans.append({LEVELS[j]: t for j, t in zip(sorted(levels), types)})
    return plans


def _layout(rng: np.random.Generator, s: float) -> dict:
    """Depth ranges (mm below the top of C1) of each vertebra's body, posterior elements and (C2) dens."""
    j = lambda lo, hi: float(rng.uniform(lo, hi)) * s  # noqa: E731
    ring = j(9.0, 11.0)
    c2_top = ring + j(4.0, 6.0)
    c2_bot = c2_top + j(19.0, 22.0)
    lay = {"C1": {"body": (0.0, ring), "arch": (0.0, ring), "dens": (j(0.5, 1.5), c2_top)}}
    lay["C2"] = {"body": (c2_top, c2_bot)}
    discs = [j(4.5, 5.5) for _ in LEVELS[1:]]  # below C2 ... C7 (the last: C7-T1)
    lay["C2"]["arch"] = (c2_top - 2.0, c2_bot + discs[0] + 3.5)  # with its lateral masses under C1
    top = c2_bot
    for k, level in enumerate(LEVELS[2:], start=1):  # posterior elements reach over the disc to the next body
        top += discs[k - 1]
        h = j(13.5, 15.5)
        lay[level] = {"body": (top, top + h), "arch": (top + 0.2 * h, top + h + discs[k] + 3.5)}
        top += h
    return lay


def plan_study(index: int, seed: int, matrix: int, slice_mm: float, fractures: dict, difficulty: float) -> dict:
    """Everything drawn once for one study: subject and scan, layout, vertebrae, fractures, slices, UIDs."""
    rng = np.random.default_rng([seed, 2, index])  # never sees the label
    sub = replace(ph.sample_subject(rng, f"P{index:05d}"), matrix=matrix)
    lay = _layout(rng, sub.scale)
    geom = {lv: ph._vertebra_geometry(lv, sub.scale, rng) for lv in LEVELS}
    rot = {lv: float(rng.normal(0, 3)) for lv in LEVELS}
    first, last = -float(rng.uniform(2, 10)), lay["C7"]["body"][1] + float(rng.uniform(0, 6))
    depths = first + slice_mm * np.arange(int(np.floor((last - first) / slice_mm)) + 1)
    scan = {"lordosis": float(rng.uniform(2, 8)), "length": last, "z_top": float(rng.uniform(-120, 40))}
    scan |= {"intercept": float(rng.choice([-1024.0, 0.0])), "j2k": bool(rng.random() < J2K_SHARE)}
    scan |= {"ascending": bool(rng.random() < 0.5), "kvp": float(rng.choice([100.0, 120.0, 140.0]))}
    study = {"index": index, "subject": sub, "layout": lay, "geom": geom, "rot": rot, "depths": depths}
    study |= {"scan": scan, "slice_mm": slice_mm, "seed": seed, "uid": _uid(seed, index, "study")}
    frac_rng = np.random.default_rng([seed, 3, index])
    study["fractures"] = {
        lv: _plan_fracture(lv, t, geom[lv], lay[lv], depths, difficulty, frac_rng) for lv, t in fractures.items()
    }
    return study


def _plan_fracture(level, ftype, g, lay, depths, difficulty, rng) -> dict:
    """The break geometry (once) and the depth range it spans, inside its structure and on >= 1 slice."""
    plan = ph._fracture_plan(g, ftype, difficulty, rng)
    lo, hi = lay["arch"] if ftype == "posterior" or level == "C1" else lay["body"]
    lo, hi = lo + 1.0, hi - 1.0
    span = (hi - lo) * float(rng.uniform(0.45, 0.8))
    start = lo + float(rng.uniform(0, hi - lo - span))
    inside = depths[(depths >= lo) & (depths <= hi)]
    if not ((depths >= start) & (depths <= start + span)).any():  # thin slab between two slice centres
        d = inside[np.argmin(np.abs(inside - start - span / 2))] if inside.size else (lo + hi) / 2
        start, span = min(start, d - 0.5), max(span, d - start + 0.5)
    return {"type": ftype, "plan": plan, "range": (start, start + span)}


def _uid(seed: int, index: int, kind: str, k: int = 0) -> str:
    """A deterministic DICOM UID under pydicom's root, from the seed, study and kind."""
    from pydicom.uid import generate_uid  # noqa: PLC0415

    return str(generate_uid(entropy_srcs=[GENERATOR, str(seed), str(index), kind, str(k)]))


# Rendering one slice at a depth
def _slab(depth: float, rng: tuple[float, float]) -> float:
    """Signed distance (mm) along z from ``depth`` to a depth range: negative inside."""
    return max(rng[0] - depth, depth - rng[1])


def _shape_at(level: str, g: dict, lay: dict, depth: float) -> dict:
    """The vertebra's in-plane shape at ``depth``: end plates flare, the spinous process grows inferiorly,
    transverse processes and (C1) lateral masses are largest mid-height."""
    lo, hi = lay["body"]
    t = float(np.clip((depth - lo) / (hi - lo), 0, 1))
    g = dict(g)
    g["tp_len"] *= 0.4 + 0.6 * np.sin(np.pi * t)
    if level == "C1":
        g["mass_b"] *= 1.0 - 0.25 * (2 * t - 1) ** 2
        return g
    flare = 1.0 + 0.08 * (2 * t - 1) ** 2
    g["bw"], g["bd"] = g["bw"] * flare, g["bd"] * flare
    a0, a1 = lay["arch"]
    g["sp_len"] *= 0.35 + 0.65 * float(np.clip((depth - a0) / (a1 - a0), 0, 1))
    return g


def _components(level: str, parts: dict, lay: dict, depth: float, zscale: float) -> list[tuple]:
    """Bone distance fields ``(gated, in_plane, label)`` of a vertebra's parts on this slice. ``gated`` keeps
    a part within its depth range (the z-distance, scaled by pixel / slice thickness, gives partial volume at
    its first and last slice); ``in_plane`` is its cross-section (where the cortex runs)."""
    k = LEVELS.index(level) + 1
    if level == "C1":
        ring = np.maximum(parts["bone"], -parts["dens"])
        dens = parts["dens"] + max(0.0, 4.0 - (depth - lay["dens"][0])) * 0.8  # a rounded dens tip
        gated = [np.maximum(sd, _slab(depth, lay[key]) * zscale) for sd, key in ((ring, "arch"), (dens, "dens"))]
        return [(gated[0], ring, 1), (gated[1], dens, 2)]
    arch = np.maximum(parts["bone"], -parts["body"])
    body_g = np.maximum(parts["body"], _slab(depth, lay["body"]) * zscale)
    gated = np.minimum(body_g, np.maximum(arch, _slab(depth, lay["arch"]) * zscale))
    return [(gated, np.minimum(parts["body"], arch), k)]


def _nearest(study: dict, depth: float) -> str:
    """The level whose body (C1: ring) is nearest to ``depth``: its canal, cord and disc are drawn."""
    dist = [max(_slab(depth, study["layout"][lv]["body"]), 0.0) for lv in LEVELS]
    return LEVELS[int(np.argmin(dist))]


def _neck_at(study: dict, depth: float):
    """Level index and a subject whose neck size, as :func:`.phantom._paint_soft_tissue` scales it per level,
    changes smoothly with depth (wider and deeper at C1-C2, slowly widening towards C7)."""
    sub, lay = study["subject"], study["layout"]
    lvl = LEVELS.index(_nearest(study, depth))
    centres = [sum(lay[lv]["body"]) / 2 for lv in LEVELS]
    lvl_f = float(np.interp(depth, centres, np.arange(len(LEVELS))))
    upper = float(np.clip((lay["C3"]["body"][0] + 5.0 - depth) / 10.0, 0, 1))  # 1 above C2/3, 0 below C3
    step_a = (1.08 if lvl <= 1 else 1.0) * (1 + 0.05 * (lvl - 3) / 3)
    a = sub.neck_a * (1 + 0.08 * upper) * (1 + 0.05 * (lvl_f - 3) / 3) / step_a
    b = sub.neck_b_front * (1 + 0.15 * upper) / (1.15 if lvl <= 1 else 1.0)
    return lvl, replace(sub, neck_a=a, neck_b_front=b)


def _spine_fields(study: dict, depth: float, xc, yc, px: float) -> dict:
    """Every vertebra present at ``depth`` in the crop: bone (fractured), segmentation, gap, fracture mask."""
    sub, lay, thk = study["subject"], study["layout"], study["slice_mm"]
    vc = -study["scan"]["lordosis"] * np.sin(np.pi * np.clip(depth / study["scan"]["length"], 0, 1))
    near = _nearest(study, depth)
    bone, seg, gaps, planes, near_parts = [], [], [], [], None
    mask, plate = np.zeros(xc.shape, bool), np.zeros(xc.shape)
    for lv in LEVELS:
        if lv != near and min(_slab(depth, r) for r in lay[lv].values()) > thk:
            continue  # no part of this vertebra within a slice thickness
        g = _shape_at(lv, study["geom"][lv], lay[lv], depth)
        # the dens (centred as phantom._atlas_sdf places it in C1's frame) stands on C2's body
        off = 1.0 - (g["ring_cy"] - g["ring_b"] + g["ring_t"] / 2 + 1.5 + g["dens_r"]) if lv == "C1" else 0.0
        u, v = ph._rot(xc, yc, 0.0, sub.spine_y_mm + vc + off, study["rot"][lv])
        frac = study["fractures"].get(lv)
        if frac is not None and frac["range"][0] <= depth <= frac["range"][1]:
            after, gap, m, parts = _fracture_at(u, v, g, frac, depth, thk, px)
        else:
            parts = ph._vertebra_sdf(u, v, g)
            after, gap, m = None, None, None
        comps = _components(lv, parts, lay[lv], depth, px / thk)
        for sd, plane, label in comps:
            seg.append((sd, label))
            bone.append(sd if after is None else np.maximum(after, sd))
            planes.append(plane)
        if m is not None:
            bone_sd = np.min([c[0] for c in comps], axis=0)
            mask |= ndimage.binary_dilation(m & (bone_sd < 0.3) | _thin_break(gap, bone_sd < px / 2), iterations=1)
            gaps.append((gap, comps, frac["plan"]["fill"]))
        near_parts = parts if lv == near else near_parts
        if lv != "C1":
            plate = np.maximum(
                plate, _endplate_share(lay[lv]["body"], depth, thk, sub.cortical_mm) * (parts["body"] < 0)
            )
    fields = {"bone": bone, "seg": seg, "gaps": gaps, "plane": np.min(planes, axis=0), "mask": mask, "plate": plate}
    return fields | {"near": near_parts}


def _thin_break(gap: np.ndarray, on_bone: np.ndarray) -> np.ndarray:
    """Pixels of a break narrower than a pixel (coarse matrices): the most covered ones on or at the bone."""
    g = gap * on_bone
    return g >= max(0.5 * g.max(), 0.1)


def _endplate_share(body: tuple[float, float], depth: float, thk: float, plate_mm: float) -> float:
    """Share of the body within the slice ``depth`` ± ``thk``/2 that is cortical end plate (``plate_mm`` thick)."""
    lo, hi = depth - thk / 2, depth + thk / 2
    overlap = lambda a, b: max(0.0, min(hi, b) - max(lo, a))  # noqa: E731
    inside = overlap(*body)
    plates = overlap(body[0], body[0] + plate_mm) + overlap(body[1] - plate_mm, body[1])
    return plates / inside if inside > 0 else 0.0


def _fracture_at(u, v, g: dict, frac: dict, depth: float, thk: float, px: float):
    """The planned break at ``depth``: its gap narrows and its displacement fades towards both ends."""
    lo, hi = frac["range"]
    half = (hi - lo) / 2 + thk / 2
    w = float(np.sqrt(max(0.0, 1.0 - ((depth - (lo + hi) / 2) / half) ** 2)))
    plan = dict(frac["plan"], width=frac["plan"]["width"] * (0.4 + 0.6 * w), disp=frac["plan"]["disp"] * w)
    _, after, gap, m, parts = ph._apply_fracture(u, v, g, plan, px)
    return after, gap, m, parts


def render_study_slice(study: dict, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice ``s`` (superior -> inferior) of a planned study: true HU float32 (N, N), fracture mask bool
    (N, N) and vertebra labels uint8 (N, N, 0 = none, 1..7 = C1..C7)."""
    sub, depth = study["subject"], float(study["depths"][s])
    n, px = sub.matrix, sub.fov_mm / sub.matrix
    coords = ((np.arange(n) - (n - 1) / 2) * px).astype(np.float32)
    X, Y = np.meshgrid(coords, coords)
    x, y = ph._rot(X, Y, sub.shift_mm[0], sub.shift_mm[1], sub.rotation_deg)
    hu = np.full((n, n), ph.HU["air"], dtype=np.float32)

    def paint(d, value, _label):  # phantom's painter without the tissue labels
        cov = ph._coverage(d, px)
        hu[...] += cov * (value - hu)
        return cov

    lvl, neck = _neck_at(study, depth)
    ph._paint_soft_tissue(paint, X, Y, x, y, neck, lvl, np.random.default_rng([study["seed"], 5, study["index"]]))
    U0, V0 = ph._rot(x, y, 0.0, sub.spine_y_mm, 0.0)
    box = (np.abs(U0) < 45) & (V0 > -32) & (V0 < 62)
    rows, cols = np.where(box.any(axis=1))[0], np.where(box.any(axis=0))[0]
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    f = _spine_fields(study, depth, x[crop], y[crop], px)
    rng = np.random.default_rng([study["seed"], 4, study["index"], s])
    sub_hu = hu[crop]
    _paint_spine(sub_hu, f, study, depth, px, rng)
    hu[crop] = sub_hu
    mask, seg = np.zeros((n, n), bool), np.zeros((n, n), np.uint8)
    mask[crop] = f["mask"]
    sds = np.stack([sd for sd, _ in f["seg"]])
    best = np.argmin(sds, axis=0)
    seg[crop] = np.where(np.take_along_axis(sds, best[None], 0)[0] < 0, np.array([k for _, k in f["seg"]])[best], 0)
    return hu, mask, seg


def _paint_spine(hu: np.ndarray, f: dict, study: dict, depth: float, px: float, rng: np.random.Generator) -> None:
    """Canal, cord, vertebral arteries, disc, then bone (cortical shell, textured cancellous), haematoma."""
    sub, parts, lay = study["subject"], f["near"], study["layout"]

    def blend(d, value):
        cov = ph._coverage(d, px)
        hu[...] += cov * (value - hu)

    blend(parts["canal"], ph.HU["csf"])
    blend(parts["cord"], ph.HU["cord"])
    blend(parts["foramina"] + 0.3, ph.HU["vessel"])
    if lay["C2"]["body"][1] < depth < lay["C7"]["body"][0] and all(_slab(depth, r["body"]) > 0 for r in lay.values()):
        blend(parts["body"] + 0.3, DISC_HU)  # between two bodies
    bone_sd = np.min(f["bone"], axis=0)
    tex = ndimage.gaussian_filter(rng.standard_normal(hu.shape), 0.55 / px)
    tex /= tex.std() + 1e-9
    coarse = ndimage.gaussian_filter(rng.standard_normal(hu.shape), 2.5 / px)
    canc = sub.cancellous_hu + 90.0 * tex + 25.0 * coarse * (2.5 / px)
    inner = ph._coverage(f["plane"] + sub.cortical_mm, px) * (1.0 - f["plate"])
    bone_hu = sub.cortical_hu * (1 - inner) + canc * inner
    alpha = ph._coverage(bone_sd, px)
    for gap, comps, fill in f["gaps"]:  # haematoma in the gap, partly filled at high difficulty
        seg_sd = np.min([c[0] for c in comps], axis=0)
        gap_bone = gap * ph._coverage(seg_sd, px)
        hu += gap_bone * (ph.HU["haematoma"] - hu)
        alpha = np.maximum(alpha, gap_bone * fill)
        bone_hu = np.where(gap_bone > 0, bone_hu * (1 - gap_bone) + canc * gap_bone, bone_hu)
    hu += alpha * (bone_hu - hu)


def render_study(study: dict) -> dict:
    """All slices of a planned study: ``hu`` (reconstructed), ``hu_true``, ``mask``, ``seg`` (Z, N, N),
    superior -> inferior."""
    sub, out = study["subject"], {"hu": [], "hu_true": [], "mask": [], "seg": []}
    px = sub.fov_mm / sub.matrix
    for s in range(len(study["depths"])):
        hu_true, mask, seg = render_study_slice(study, s)
        rng = np.random.default_rng([study["seed"], 6, study["index"], s])
        for key, arr in zip(out, (ph.simulate_ct(hu_true, px, sub, rng), hu_true, mask, seg)):
            out[key].append(arr)
    return {key: np.stack(val) for key, val in out.items()}


# Files: DICOM series, NIfTI mask, labels
def geometry(study: dict) -> dict:
    """DICOM geometry of a study, slices superior -> inferior: ``x0, y0`` (mm, LPS, centre of the top-left
    pixel), ``z`` per slice, ``pixel_mm``, ``numbers`` (file name / InstanceNumber: some studies count
    upwards) and the RAS ``affine`` of the stored mask ``nii[c, H-1-r, Z-1-s]`` (see the module doc)."""
    sub, z_n = study["subject"], len(study["depths"])
    px = sub.fov_mm / sub.matrix
    x0 = y0 = -(sub.matrix - 1) / 2 * px
    z = study["scan"]["z_top"] - (study["depths"] - study["depths"][0])
    rows = [[-px, 0, 0, -x0], [0, px, 0, -(y0 + (sub.matrix - 1) * px)], [0, 0, study["slice_mm"], z[-1]]]
    numbers = np.arange(z_n, 0, -1) if study["scan"]["ascending"] else np.arange(1, z_n + 1)
    affine = np.array([*rows, [0, 0, 0, 1]], dtype=float)
    return {"x0": x0, "y0": y0, "z": z, "pixel_mm": px, "numbers": numbers, "affine": affine}


def _dicom_slice(study: dict, geo: dict, s: int, number: int, hu: np.ndarray):
    """One CT slice as a pydicom Dataset (int16 stored values, rescale to HU), compressed for J2K studies."""
    from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless  # noqa: PLC0415

    sub, scan, idx = study["subject"], study["scan"], study["index"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(study["seed"], idx, "sop", s)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["uid"], _uid(study["seed"], idx, "series")
    ds.FrameOfReferenceUID = _uid(study["seed"], idx, "frame")
    ds.PatientID, ds.PatientName, ds.Modality = sub.subject_id, f"Phantom^{sub.subject_id}", "CT"
    ds.BodyPartExamined, ds.ImageType, ds.KVP = "CSPINE", ["ORIGINAL", "PRIMARY", "AXIAL"], scan["kvp"]
    ds.SeriesNumber, ds.InstanceNumber = 1, int(number)
    ds.ImagePositionPatient = [round(geo["x0"], 4), round(geo["y0"], 4), round(float(geo["z"][s]), 4)]
    ds.ImageOrientationPatient, ds.SliceLocation = [1, 0, 0, 0, 1, 0], round(float(geo["z"][s]), 4)
    ds.PixelSpacing, ds.SliceThickness = [round(geo["pixel_mm"], 6)] * 2, study["slice_mm"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = scan["intercept"], 1.0, "HU"
    ds.WindowWidth, ds.WindowCenter = sub.window
    ds.ConvolutionKernel = "BONE" if sub.kernel_boost > 0.4 else "STANDARD"
    stored = np.clip(np.round(hu - scan["intercept"]), -32768, 32767).astype(np.int16)
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    if scan["j2k"]:
        ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    return ds


def write_study(root: Path, study: dict) -> tuple[dict, list[dict]]:
    """Render a planned study and write its DICOM series and NIfTI mask under ``root``; its label row and
    boxes (one per fractured slice: pixel bbox of the fracture mask)."""
    import nibabel as nib  # noqa: PLC0415

    vol, geo = render_study(study), geometry(study)
    numbers = geo["numbers"]
    folder = root / "train_images" / study["uid"]
    folder.mkdir(parents=True)
    for s, number in enumerate(numbers):
        _dicom_slice(study, geo, s, number, vol["hu"][s]).save_as(folder / f"{number}.dcm", enforce_file_format=True)
    nii = np.ascontiguousarray(vol["seg"].transpose(2, 1, 0)[:, ::-1, ::-1])
    img = nib.Nifti1Image(nii, geo["affine"])
    img.header.set_xyzt_units("mm")
    nib.save(img, root / "segmentations" / f"{study['uid']}.nii")
    row = {"StudyInstanceUID": study["uid"], "patient_overall": int(bool(study["fractures"]))}
    row |= {lv: int(lv in study["fractures"]) for lv in LEVELS}
    boxes = []
    for s in np.where(vol["mask"].any(axis=(1, 2)))[0]:
        r, c = np.where(vol["mask"][s])
        x, y, w, h = float(c.min()), float(r.min()), float(np.ptp(c) + 1), float(np.ptp(r) + 1)
        boxes.append(dict(zip(BOX_COLUMNS, (study["uid"], x, y, w, h, int(numbers[s])))))
    return row, boxes


# The dataset
def fingerprint() -> str:
    """Hash of this module and :mod:`.phantom`: a study set is stale when the generator code changes."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(ph.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def marker(n_studies: int, seed: int, matrix: int, slice_mm: float, difficulty: float) -> dict:
    """What identifies a generated study set (written to ``phantom.json``)."""
    params = {"n_studies": n_studies, "seed": seed, "matrix": matrix, "slice_mm": slice_mm, "difficulty": difficulty}
    return {"generator": GENERATOR, "version": VERSION, "fingerprint": fingerprint(), "params": params}


def is_up_to_date(out: str | os.PathLike, **params) -> bool:
    """True when ``out`` holds a study set made by this generator code with these parameters."""
    return ph.marker_is_current(Path(out) / MARKER_NAME, marker(**params))


def _write_one(args) -> tuple[dict, list[dict], int, bool]:
    """Worker: plan, render and write one study; its label row, boxes, slice count and J2K flag."""
    root, index, seed, matrix, slice_mm, fractures, difficulty = args
    study = plan_study(index, seed, matrix, slice_mm, fractures, difficulty)
    row, boxes = write_study(Path(root), study)
    return row, boxes, len(study["depths"]), study["scan"]["j2k"]


def write_rsna_dataset(
    out: str | os.PathLike,
    n_studies: int,
    *,
    seed: int = 0,
    matrix: int = 128,
    slice_mm: float = 2.5,
    difficulty: float = 0.5,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Write ``n_studies`` phantom CT studies in the RSNA 2022 layout to ``out`` and return ``phantom.json``.

    Same arguments -> identical files. Written into a temporary folder beside ``out`` and renamed at the
    end (an interrupted run leaves no half dataset); a set of ours with the same parameters and code is
    reused unless ``force``; a folder with other files is never touched. ``workers`` processes (default
    ``min(2, cpu count)``).
    """
    params = {"n_studies": n_studies, "seed": seed, "matrix": matrix, "slice_mm": slice_mm, "difficulty": difficulty}
    if matrix < 64 or not 0.5 <= slice_mm <= 5 or not 0 <= difficulty <= 1 or seed < 0:  # coarser: breaks vanish
        msg = "need --matrix >= 64, 0.5 <= --slice-mm <= 5, difficulty in [0, 1], seed >= 0"
        raise ValueError(f"bad study settings {params}: {msg}")
    plans = plan_labels(n_studies, seed)
    out = Path(out).expanduser().resolve()
    if not force and is_up_to_date(out, **params):
        return read_json(out / MARKER_NAME)
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not ph.stored_marker(out / MARKER_NAME, GENERATOR)):
        raise FileExistsError(f"{out} is a file or a folder without our {MARKER_NAME}; choose an empty or new folder")
    return replace_folder(out, lambda tmp: _write_all(tmp, plans, params, workers, progress), "studies")


def _write_all(tmp: Path, plans: list[dict], params: dict, workers: int | None, progress: bool) -> dict:
    """Write every study into ``tmp`` (``workers`` processes), then the CSVs and ``phantom.json``."""
    import pandas as pd  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    (tmp / "segmentations").mkdir()
    p = params
    jobs = [(str(tmp), i, p["seed"], p["matrix"], p["slice_mm"], fr, p["difficulty"]) for i, fr in enumerate(plans)]
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(jobs)))
    bar = {"total": len(jobs), "disable": not progress, "desc": "synthetic CT studies", "unit": "study"}
    if workers > 1:
        import multiprocessing as mp  # noqa: PLC0415

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ctx.Pool(workers) as pool:
            results = list(tqdm(pool.imap(_write_one, jobs), **bar))
    else:
        results = list(tqdm(map(_write_one, jobs), **bar))
    pd.DataFrame([r[0] for r in results]).to_csv(tmp / "train.csv", index=False)
    pd.DataFrame([b for r in results for b in r[1]], columns=list(BOX_COLUMNS)).to_csv(
        tmp / "train_bounding_boxes.csv", index=False
    )
    info = marker(**params) | {"studies": len(plans), "fractured": sum(bool(f) for f in plans)}
    info |= {"slices": sum(r[2] for r in results), "boxes": sum(len(r[1]) for r in results)}
    info["j2k_studies"] = sum(r[3] for r in results)
    write_json(tmp / MARKER_NAME, info, sort_keys=True)
    return info
