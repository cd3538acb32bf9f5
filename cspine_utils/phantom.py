"""A synthetic axial CT of the cervical spine, with ground-truth fracture masks.

The course must run offline, and Grad-CAM can only be *checked* where the fracture is known. Each
slice is built in three physical steps. 1. **Anatomy in HU** (:func:`render_anatomy`): signed-
distance fields in mm (negative inside), so cortical shells have a true thickness and edges are
anti-aliased by the pixel size; neck tissues, airway, thyroid, mandible and the vertebra of the
level (C1 ring with the dens, C2, C3-C6, C7) with cortical shell, cancellous bone, pedicles,
pillars with facet joints, foramina, laminae, spinous process and the canal with cord and CSF.
2. **Fractures** (:func:`_apply_fracture`): linear body break, posterior-element break or burst
with retropulsion (C1: arch and Jefferson-type ring breaks). Fragments move by warping the bone's
distance field, the gap fills with haematoma, the removed bone is the **pixel mask**;
``difficulty`` in [0, 1] narrows the gap, reduces displacement and partly fills it. 3. **CT
formation** (:func:`simulate_ct`): blur, sharp bone kernel and quantum noise, either by filtered
back-projection of Poisson counts (``"fbp"``, slow) or by noise with the same power spectrum
(``"nps"``, default; validated against ``"fbp"`` in the tests), then a bone window to 8-bit PNG.

Subjects give several adjacent levels (split by ``subject_id``); normal and fracture slices share
one distribution of anatomy, level, size, dose and resolution. Not modelled: beam hardening,
metal, motion, partial volume across the slice, degeneration, healed fractures, ligaments.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .records import read_json, replace_folder, sha256_file, write_json

GENERATOR_VERSION = "1.0"
LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
FRACTURE_TYPES = ("linear", "posterior", "burst")
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = "dataset.json"
GENERATOR = "cspine_utils.phantom"  # names this generator in MARKER_NAME
# Tissue labels of the label map returned with the true HU image.
_TISSUES = "outside air skin fat muscle vessel thyroid airway csf cord cancellous cortical table haematoma cartilage"
TISSUE = {name: label for label, name in enumerate(_TISSUES.split())}
# Central HU values (typical clinical CT ranges); subjects jitter around them.
HU = {"air": -1000.0, "fat": -100.0, "skin": 40.0, "muscle": 45.0, "vessel": 40.0, "thyroid": 100.0, "csf": 8.0}
HU |= {"cord": 35.0, "haematoma": 60.0, "table": 100.0, "cartilage": 120.0, "padding": -3024.0}


# Signed-distance primitives (all lengths in mm, negative inside)
def _sd_ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (first-order, accurate near the edge)."""
    k = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    g = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (k - 1.0) * k / g
    return np.where(g > 1e-9, d, -np.minimum(a, b))


def _sd_segment(x, y, p0, p1, r0: float, r1: float | None = None) -> np.ndarray:
    """Signed distance to a capsule from ``p0`` to ``p1`` with radius tapering ``r0`` → ``r1``."""
    r1 = r0 if r1 is None else r1
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    h = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - p0[0] - h * dx, y - p0[1] - h * dy) - (r0 + (r1 - r0) * h)


def _sd_box(x, y, hw: float, hh: float, r: float) -> np.ndarray:
    """Signed distance to a rounded rectangle of half-sizes ``hw`` x ``hh``, corner radius ``r``."""
    qx = np.abs(x) - hw + r
    qy = np.abs(y) - hh + r
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two distance fields (fillet of size ``k`` mm), like bone junctions."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _rot(x, y, cx: float, cy: float, angle_deg: float):
    """Coordinates relative to ``(cx, cy)``, rotated by ``-angle_deg`` (into a shape's frame)."""
    t = np.deg2rad(angle_deg)
    c, s = float(np.cos(t)), float(np.sin(t))
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Fraction of a pixel of size ``px`` mm inside a shape with distance field ``d`` (anti-aliasing)."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


# Subjects and slices
@dataclass(frozen=True)
class SubjectParams:
    """One synthetic patient and scan: anatomy scale, pose, bone density, scanner settings."""

    subject_id: str
    scale: float  # overall size factor of the anatomy
    neck_a: float  # half-width of the neck, mm
    neck_b_front: float  # half-depth in front of the centre, mm
    neck_b_back: float  # half-depth behind the centre, mm
    fat_mm: float  # subcutaneous fat thickness, mm
    rotation_deg: float  # in-plane rotation of the patient
    shift_mm: tuple[float, float]  # patient position in the field, mm
    spine_y_mm: float  # vertebral body centre, posterior of the neck centre, mm
    cancellous_hu: float
    cortical_hu: float
    cortical_mm: float
    muscle_hu: float
    fat_hu: float
    fov_mm: float  # reconstruction field of view
    matrix: int  # pixels per side
    dose: float  # relative dose (noise sd scales with 1/sqrt(dose))
    kernel_sigma_mm: float  # scanner blur (Gaussian PSF sd)
    kernel_boost: float  # sharp-kernel edge enhancement
    window: tuple[float, float]  # (width, level) used to write the PNG
    table_gap_mm: float


@dataclass(frozen=True)
class SliceSpec:
    """What to draw: a subject, a level, and (for fracture slices) a fracture type and difficulty."""

    subject: SubjectParams
    level: str
    fracture_type: str  # "none" or one of FRACTURE_TYPES
    difficulty: float
    seed: int


@dataclass
class SliceResult:
    """A generated slice. ``image`` is the 8-bit PNG content; HU arrays are float32, mm geometry."""

    image: np.ndarray  # uint8 (H, W), bone window
    hu: np.ndarray  # float32 (H, W), reconstructed HU (after CT formation)
    hu_true: np.ndarray  # float32 (H, W), anatomy before CT formation
    tissue: np.ndarray  # uint8 (H, W), dominant tissue label (see TISSUE)
    mask: np.ndarray  # bool (H, W), fracture pixels (empty for normal slices)
    pixel_mm: float
    meta: dict = field(default_factory=dict)


def sample_subject(rng: np.random.Generator, subject_id: str) -> SubjectParams:
    """Draw one synthetic subject and scan protocol. Independent of any fracture label."""
    scale = float(rng.uniform(0.9, 1.1))
    osteoporotic = rng.random() < 0.15
    matrix = int(rng.choice([256, 320, 384, 448, 512]))
    neck = [float(rng.uniform(lo, hi) * scale) for lo, hi in ((58, 70), (44, 52), (58, 66))]  # a, front, back
    fat_mm, rotation_deg = float(rng.uniform(3, 12)), float(rng.normal(0, 4))
    shift_mm, spine_y_mm = (float(rng.normal(0, 4)), float(rng.normal(-2, 4))), float(rng.uniform(2, 8) * scale)
    cancellous_hu = float(rng.uniform(70, 110) if osteoporotic else rng.uniform(160, 340))
    bone = [cancellous_hu, float(rng.uniform(1000, 1700)), float(rng.uniform(0.6, 1.3))]  # + cortical HU, mm
    soft = [float(rng.uniform(38, 55)), float(rng.uniform(-115, -85))]  # muscle, fat HU
    fov_mm, dose = float(rng.uniform(160, 240)), float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    kernel = [float(rng.uniform(0.3, 0.45)), float(rng.uniform(0.2, 0.6))]  # sigma mm, boost
    window = ((2000.0, 500.0), (1800.0, 400.0))[int(rng.integers(2))]
    table_gap_mm = float(rng.uniform(3, 15))
    # in SubjectParams' field order
    head = [subject_id, scale, *neck, fat_mm, rotation_deg, shift_mm, spine_y_mm, *bone, *soft, fov_mm, matrix, dose]
    return SubjectParams(*head, *kernel, window, table_gap_mm)


# Vertebrae
_BODY_HALF_WIDTH = {"C2": 9.0, "C3": 8.0, "C4": 8.3, "C5": 8.7, "C6": 9.3, "C7": 10.0}
_SPINOUS_LENGTH = {"C2": 16.0, "C3": 11.0, "C4": 11.0, "C5": 12.0, "C6": 14.0, "C7": 21.0}


def _vertebra_geometry(level: str, s: float, rng: np.random.Generator) -> dict:
    """Dimensions (mm) of one vertebra, scaled by ``s`` with small per-slice variation."""
    j = lambda lo, hi: float(rng.uniform(lo, hi)) * s  # noqa: E731
    g = {"level": level, "facet_joint": bool(rng.random() < 0.6), "facet_angle": float(rng.uniform(-30, 30))}
    g["facet_offset"] = float(rng.uniform(-1.5, 1.5))
    if level == "C1":  # ring (half-axes, thickness, centre), lateral masses, transverse process, dens
        g["ring_a"], g["ring_b"], g["ring_t"], g["ring_cy"] = j(15, 17), j(14, 16), j(3.5, 4.5), j(9, 10.5)
        g["mass_a"], g["mass_b"], g["tp_len"], g["foramen_r"] = j(5.5, 7), j(7.5, 9), j(9, 12), j(2.8, 3.4)
        g["dens_r"], g["canal_w"], g["canal_d"] = j(4.5, 5.5), j(24, 28) / 2, j(17, 20) / 2
        return g
    c2 = level == "C2"  # C2 (the axis) has a deeper body, stouter pedicles and a massive spinous process
    g["bw"] = _BODY_HALF_WIDTH[level] * s * float(rng.uniform(0.95, 1.05))  # body half-width and half-depth
    g["bd"], g["body_r"] = j(7.2, 8.4) * (1.05 if c2 else 1.0), j(3, 4.2)
    g["canal_w"], g["canal_d"], g["ped_r"] = j(22, 26) / 2, j(14, 17.5) / 2, j(2.4, 3.0) * (1.2 if c2 else 1.0)
    g["lam_r"], g["pillar_a"], g["pillar_b"] = j(1.8, 2.3), j(4.5, 5.5), j(5.5, 6.5)
    g["sp_len"] = _SPINOUS_LENGTH[level] * s * float(rng.uniform(0.9, 1.1))
    g["sp_r"] = j(2.3, 2.9) * (1.3 if c2 else 1.0)
    g["bifid"] = level in ("C2", "C3", "C4", "C5", "C6") and rng.random() < 0.85
    g["foramen_r"], g["tp_len"] = j(2.5, 3.1) * (0.6 if level == "C7" else 1.0), j(6, 9)
    return g


def _vertebra_sdf(u: np.ndarray, v: np.ndarray, g: dict) -> dict[str, np.ndarray]:
    """Distance fields of one vertebra in its frame (u to the image right, v posterior, origin at the
    body centre): ``bone``, ``body`` (what a body fracture cuts; C1: anterior arch), ``canal``, ``cord``,
    ``foramina``, ``arch``."""
    if g["level"] == "C1":
        return _atlas_sdf(u, v, g)
    bw, bd, cw, cd = g["bw"], g["bd"], g["canal_w"], g["canal_d"]
    # rounded box, its anterior surface made convex by an ellipse centred further back
    body = np.maximum(_sd_box(u, v, bw, bd, g["body_r"]), _sd_ellipse(u, v - 0.5 * bd, 1.2 * bw, 1.5 * bd))
    canal_cy = bd + 0.8 + cd
    canal = _canal_sdf(u, v - canal_cy, cw, cd)
    ua = np.abs(u)  # posterior elements are left-right symmetric
    pillar_c = (cw + 0.6 * g["pillar_a"], canal_cy - 0.25 * cd)
    pedicle = _sd_segment(ua, v, (bw - 2.0, bd - 2.5), (pillar_c[0] - 1.0, pillar_c[1] - 1.0), g["ped_r"])
    pillar = _sd_ellipse(*_rot(ua, v, *pillar_c, -15), g["pillar_a"], g["pillar_b"])
    sp_base = (0.0, canal_cy + cd + 0.5)
    lamina = _sd_segment(ua, v, (pillar_c[0] - 1.5, pillar_c[1] + 3.0), sp_base, g["lam_r"], g["lam_r"] * 0.9)
    sp_tip = (0.0, sp_base[1] + g["sp_len"])
    if g["bifid"]:
        fork = (0.0, sp_base[1] + 0.65 * g["sp_len"])
        spinous = np.minimum(
            _sd_segment(u, v, sp_base, fork, g["sp_r"], g["sp_r"] * 0.85),
            _sd_segment(ua, v, fork, (2.6, sp_tip[1]), g["sp_r"] * 0.75, g["sp_r"] * 0.7),
        )
    else:
        spinous = _sd_segment(u, v, sp_base, sp_tip, g["sp_r"], g["sp_r"] * 1.15)
    fc = (bw + g["foramen_r"] + 1.2, bd - 2.0)
    fr = g["foramen_r"]
    transverse = np.minimum(
        _sd_ellipse(ua - fc[0], v - fc[1], fr + 2.2, fr + 1.8),
        _sd_segment(ua, v, fc, (fc[0] + g["tp_len"], fc[1] - 1.5), 2.3, 1.7),
    )
    foramina = np.hypot(ua - fc[0], v - fc[1]) - fr
    arch = _smin(_smin(_smin(pedicle, pillar, 1.5), lamina, 1.5), spinous, 1.2)
    bone = _smin(_smin(body, arch, 1.2), transverse, 1.5)
    bone = np.maximum(bone, -foramina)
    bone = np.maximum(bone, -canal)
    if g["facet_joint"]:  # the facet joint: a thin oblique cleft through each pillar (normal anatomy)
        pu, pv = _rot(ua, v, pillar_c[0], pillar_c[1] + g["facet_offset"], g["facet_angle"] + 60)
        cleft = np.maximum(np.abs(pv) - 0.45, np.abs(pu) - g["pillar_b"] - 1.5)
        bone = np.maximum(bone, -cleft)
    cord = _sd_ellipse(u, v - canal_cy + 0.5, min(6.0, cw * 0.5), min(4.2, cd * 0.55))
    return {"bone": bone, "body": body, "canal": canal, "cord": cord, "foramina": foramina, "arch": arch}


def _canal_sdf(u, v, cw: float, cd: float) -> np.ndarray:
    """A rounded-triangular spinal canal: widest in front, narrowing posteriorly."""
    width = cw * (1.0 - 0.35 * np.clip((v + cd) / (2 * cd), 0, 1))
    return _sd_ellipse(u * cw / np.maximum(width, 1e-3), v, cw, cd)


def _atlas_sdf(u, v, g: dict) -> dict[str, np.ndarray]:
    """C1: a ring (anterior arch, lateral masses, posterior arch) with the dens of C2 inside."""
    cy = g["ring_cy"]
    ring_d = np.abs(_sd_ellipse(u, v - cy, g["ring_a"], g["ring_b"])) - g["ring_t"] / 2
    ua = np.abs(u)
    mass = _sd_ellipse(*_rot(ua, v, g["ring_a"] - 2.5, cy - 2.0, 20), g["mass_a"], g["mass_b"])
    fc = (g["ring_a"] + g["mass_a"] + 1.0, cy - 1.5)
    transverse = np.minimum(
        _sd_ellipse(ua - fc[0], v - fc[1], g["foramen_r"] + 2.3, g["foramen_r"] + 2.0),
        _sd_segment(ua, v, fc, (fc[0] + g["tp_len"], fc[1] - 1.0), 2.8, 2.2),
    )
    foramina = np.hypot(ua - fc[0], v - fc[1]) - g["foramen_r"]
    tubercle = _sd_ellipse(u, v - (cy + g["ring_b"] + 0.5), 3.0, 2.5)
    ring = _smin(_smin(ring_d, mass, 1.5), tubercle, 1.0)
    bone = np.maximum(_smin(ring, transverse, 1.5), -foramina)
    dens_c = cy - g["ring_b"] + g["ring_t"] / 2 + 1.5 + g["dens_r"]
    dens = np.hypot(u, v - dens_c) - g["dens_r"]
    bone = np.minimum(bone, dens)
    anterior_arch = np.maximum(ring_d, v - (cy - g["ring_b"] + 4.0))
    canal = _sd_ellipse(u, v - (dens_c + g["dens_r"] + g["canal_d"] - 1.0), g["canal_w"] * 0.75, g["canal_d"])
    cord = _sd_ellipse(u, v - (dens_c + g["dens_r"] + g["canal_d"] - 0.5), 6.5, 4.8)
    parts = {"bone": bone, "body": anterior_arch, "canal": canal, "cord": cord, "foramina": foramina}
    return parts | {"arch": ring, "dens": dens}


# Fractures
def _fracture_plan(g: dict, ftype: str, difficulty: float, rng: np.random.Generator) -> dict:
    """Where the fracture lines run and how fragments move (all in the vertebra frame, mm)."""
    d = float(difficulty)
    width = (2.2 - 1.8 * d) * float(rng.uniform(0.8, 1.2))
    disp = 2.5 * (1.0 - d) * float(rng.uniform(0.5, 1.0))
    fill = 0.65 * d  # fraction of bone contrast left in the gap (partial volume / impaction)
    side = float(rng.choice([-1.0, 1.0]))
    plan = {"type": ftype, "width": width, "disp": disp, "fill": fill, "cuts": []}
    c1 = g["level"] == "C1"
    if ftype == "linear" and not c1:
        # a line through the body at any angle, passing near its centre
        ang = float(rng.uniform(0, 180))
        p0 = (float(rng.uniform(-0.4, 0.4) * g["bw"]), float(rng.uniform(-0.4, 0.4) * g["bd"]))
        plan["cuts"].append({"p0": p0, "angle": ang, "region": "body", "move": 1.0, "radius": 40.0})
    elif ftype == "burst" and not c1:
        c = (float(rng.uniform(-0.25, 0.25) * g["bw"]), float(rng.uniform(-0.2, 0.3) * g["bd"]))
        k = int(rng.integers(3, 6))
        base = float(rng.uniform(0, 360))
        angles = np.sort((base + np.arange(k) * 360.0 / k + rng.uniform(-20, 20, k)) % 360)
        plan.update(center=c, ray_angles=angles.tolist(), retropulsion=1.0 + 2.0 * (1 - d))
    elif ftype in ("posterior", "linear", "burst"):
        # posterior elements (or, at C1, the ring): break bars at 1-4 places. The bars are only
        # 3-5 mm thick, so a break shows as a gap *and* a step: wider gap, larger displacement
        # than in the body (at difficulty 1 both still shrink to a hairline).
        plan["width"] *= 1.4
        plan["disp"] *= 1.6
        n_breaks = {"posterior": 1, "linear": 1, "burst": int(rng.integers(2, 5))}[ftype]
        sites = _break_sites(g, ftype, n_breaks, rng)
        for px, py, bar_angle in sites:
            angle = bar_angle + 90 + float(rng.uniform(-25, 25))
            plan["cuts"].append({"p0": (px, py), "angle": angle, "region": "local", "move": side, "radius": 9.0})
    else:
        raise ValueError(f"unknown fracture type {ftype!r}; choose one of {FRACTURE_TYPES}")
    plan["jitter"] = (float(rng.uniform(0.15, 0.4)), float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 6.28)))
    return plan


def _break_sites(g: dict, ftype: str, n: int, rng) -> list[tuple[float, float, float]]:
    """Points on bars of bone (x, y, direction of the bar in degrees) where a break can cross."""
    if g["level"] == "C1":
        cy, a, b = g["ring_cy"], g["ring_a"], g["ring_b"]
        # around the ring: anterior arch (~ -90°) and posterior arch (~ +90°), off the lateral masses
        anterior = [ftype != "posterior" and i % 2 == 0 for i in range(n)]
        ts = [-90 + rng.uniform(-35, 35) if front else 90 + rng.uniform(-40, 40) for front in anterior]
        return [(a * np.cos(np.deg2rad(t)), cy + b * np.sin(np.deg2rad(t)), float(t + 90)) for t in ts]
    bw, bd, cw, cd = g["bw"], g["bd"], g["canal_w"], g["canal_d"]
    canal_cy = bd + 0.8 + cd
    pillar = (cw + 0.6 * g["pillar_a"], canal_cy - 0.25 * cd)
    lam0, lam1 = (pillar[0] - 1.5, pillar[1] + 3.0), (0.0, canal_cy + cd + 0.5)
    ped0, ped1 = (bw - 2.0, bd - 2.5), (pillar[0] - 1.0, pillar[1] - 1.0)
    sites = []
    for _ in range(n):
        sgn = float(rng.choice([-1.0, 1.0]))
        a0, a1 = (lam0, lam1) if rng.random() < 0.75 else (ped0, ped1)
        t = float(rng.uniform(0.35, 0.65))
        x, y = a0[0] + t * (a1[0] - a0[0]), a0[1] + t * (a1[1] - a0[1])
        ang = float(np.degrees(np.arctan2(a1[1] - a0[1], (a1[0] - a0[0]))))
        sites.append((sgn * x, y, ang if sgn > 0 else 180 - ang))
    return sites


def _apply_fracture(u, v, g: dict, plan: dict, px: float):
    """Warp and cut the vertebra's distance field. Returns (bone sdf, gap coverage, mask)."""
    base = _vertebra_sdf(u, v, g)
    body_zone = base["body"] if g["level"] != "C1" else base["arch"]
    du = np.zeros_like(u)
    dv = np.zeros_like(v)
    removed = np.full(u.shape, np.inf, dtype=np.float64)
    amp, freq, phase = plan["jitter"]
    w = plan["width"]
    if "center" in plan:  # burst: rays from a centre, sectors pushed outwards, posterior one backwards
        cx, cy = plan["center"]
        ang = (np.degrees(np.arctan2(v - cy, u - cx)) + 360) % 360
        rays = plan["ray_angles"]
        sector = np.searchsorted(rays, ang) % len(rays)
        near_body = _coverage(body_zone - 3.0, 3.0)
        for i, a0 in enumerate(rays):
            a1 = rays[(i + 1) % len(rays)]
            mid = np.deg2rad((a0 + ((a1 - a0) % 360) / 2) % 360)
            push = plan["disp"] * (1.0 + 0.3 * i % 2)
            if np.sin(mid) > 0.5:  # the fragment facing the canal is retropulsed
                push += plan["retropulsion"]
            sel = (sector == i) * near_body
            du += sel * push * np.cos(mid)
            dv += sel * push * np.sin(mid)
            t = np.deg2rad(a0)
            along = (u - cx) * np.cos(t) + (v - cy) * np.sin(t)
            across = -(u - cx) * np.sin(t) + (v - cy) * np.cos(t)
            band = np.abs(across + amp * np.sin(freq * along + phase + i)) - w / 2
            band = np.maximum(band, -along)  # a ray, not a full line
            removed = np.minimum(removed, band)
        removed = np.maximum(removed, body_zone - 0.3)
    for cut in plan["cuts"]:
        t = np.deg2rad(cut["angle"])
        nx, ny = -np.sin(t), np.cos(t)
        along = (u - cut["p0"][0]) * np.cos(t) + (v - cut["p0"][1]) * np.sin(t)
        across = (u - cut["p0"][0]) * nx + (v - cut["p0"][1]) * ny
        across_j = across + amp * np.sin(freq * along + phase)
        band = np.abs(across_j) - w / 2
        if cut["region"] == "body":
            zone = body_zone - 0.3
            falloff = _coverage(body_zone - 2.5, 4.0)
        else:
            zone = np.hypot(u - cut["p0"][0], v - cut["p0"][1]) - 4.5
            falloff = np.clip(1.0 - np.hypot(u - cut["p0"][0], v - cut["p0"][1]) / cut["radius"], 0, 1)
        removed = np.minimum(removed, np.maximum(band, zone))
        # the fragment on the positive side moves along the line and slightly apart
        frag = (across_j > 0) * falloff * cut["move"]
        shift_along = plan["disp"] * 0.8
        shift_apart = plan["disp"] * 0.5
        du += frag * (shift_along * np.cos(t) + shift_apart * nx)
        dv += frag * (shift_along * np.sin(t) + shift_apart * ny)
    warped = _vertebra_sdf(u - du, v - dv, g)
    bone_w = warped["bone"]
    gap = _coverage(removed, px)
    bone_after = np.maximum(bone_w, -removed)
    mask = (gap > 0.5) & ((bone_w < 0.3) | (base["bone"] < 0.3))
    return bone_w, bone_after, gap, mask, warped


# Anatomy → HU
def render_anatomy(spec: SliceSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The true HU image of one slice: ``hu`` float32 (N, N) before CT formation, ``tissue`` uint8
    (N, N) labels (:data:`TISSUE`), ``mask`` bool (N, N) fracture pixels, ``pixel_mm``."""
    sp = spec.subject
    if spec.level not in LEVELS:
        raise ValueError(f"unknown level {spec.level!r}; choose one of {LEVELS}")
    if spec.fracture_type != "none" and spec.fracture_type not in FRACTURE_TYPES:
        raise ValueError(f"unknown fracture type {spec.fracture_type!r}; choose one of {FRACTURE_TYPES}")
    rng = np.random.default_rng(spec.seed)
    n, px = sp.matrix, sp.fov_mm / sp.matrix
    coords = ((np.arange(n) - (n - 1) / 2) * px).astype(np.float32)
    X, Y = np.meshgrid(coords, coords)
    # patient frame: x to the image right (patient left), y posterior
    x, y = _rot(X, Y, sp.shift_mm[0], sp.shift_mm[1], sp.rotation_deg)
    hu = np.full((n, n), HU["air"], dtype=np.float32)
    tissue = np.full((n, n), TISSUE["air"], dtype=np.uint8)

    def paint(d, value, label, hu_img=hu, tis_img=tissue):
        """Blend ``value`` (HU) into the image by the coverage of shape ``d``; label its pixels."""
        cov = _coverage(d, px)
        hu_img += cov * (value - hu_img)
        tis_img[cov > 0.5] = TISSUE[label]
        return cov

    _paint_soft_tissue(paint, X, Y, x, y, sp, LEVELS.index(spec.level), rng)
    mask = _paint_vertebra(paint, hu, tissue, x, y, spec, px, rng)
    return hu.astype(np.float32), tissue, mask, px


def _paint_soft_tissue(paint, X, Y, x, y, sp: SubjectParams, lvl: int, rng: np.random.Generator) -> None:
    """Head-rest, neck (skin, fat, muscle, fat planes), sternocleidomastoids, vessels, thyroid, airway, mandible."""
    # head-rest (not attached to the patient: image frame)
    R = 160.0
    table_cy = sp.shift_mm[1] + sp.neck_b_back + sp.table_gap_mm + 4.0 - R
    table = np.abs(np.hypot(X - sp.shift_mm[0], Y - table_cy) - R) - 2.0
    paint(np.maximum(table, np.abs(X - sp.shift_mm[0]) - 85), HU["table"], "table")
    b_front = sp.neck_b_front * (1.15 if lvl <= 1 else 1.0)
    b = np.where(y < 0, np.float32(b_front), np.float32(sp.neck_b_back))
    a = sp.neck_a * (1.08 if lvl <= 1 else 1.0) * (1 + 0.05 * (lvl - 3) / 3)
    neck = _sd_ellipse(x, y, a, b)
    paint(neck, HU["skin"], "skin")
    fat_t = sp.fat_mm * (1.0 + 0.6 * np.clip(y / sp.neck_b_back, 0, 1))  # thicker at the back
    paint(neck + 1.5, sp.fat_hu, "fat")
    paint(neck + 1.5 + fat_t, sp.muscle_hu, "muscle")
    # fat planes between muscle groups (paraspinal septa, nuchal ligament line)
    sy, back = sp.spine_y_mm, sp.neck_b_back
    for sgn in (-1, 1):
        for cx, cy, ea, eb, cut in ((16, 0.55, 11, 0.28, 0.0), (27, 0.35, 14, 0.4, -6.0)):
            arc = np.abs(_sd_ellipse(*_rot(x, y, sgn * cx, sy + cy * back, sgn * 15), ea, eb * back)) - 0.45
            paint(np.maximum(arc, -(y - (sy + cut))), sp.fat_hu, "fat")
    paint(_sd_segment(x, y, (0, sy + 42), (0, back - 4), 0.6), sp.fat_hu, "fat")
    # sternocleidomastoid muscles with a fat rim, carotid sheaths
    for sgn in (-1, 1):
        scm = _sd_ellipse(*_rot(x, y, sgn * a * 0.62, -b_front * 0.25, sgn * 40), 10.0, 5.0)
        paint(scm - 1.5, sp.fat_hu, "fat")
        paint(scm, sp.muscle_hu + 3, "muscle")
        paint(np.hypot(x - sgn * 22, y - (sy - 12)) - 5.5, sp.fat_hu, "fat")
        paint(np.hypot(x - sgn * 20, y - (sy - 13)) - 3.2, HU["vessel"], "vessel")
        paint(_sd_ellipse(x - sgn * 26.5, y - (sy - 11), 4.5, 3.5), HU["vessel"] - 5, "vessel")
    if lvl >= 5:  # thyroid lobes at C6-C7
        for sgn in (-1, 1):
            paint(_sd_ellipse(*_rot(x, y, sgn * 13, sy - 27, sgn * 30), 7.0, 10.0), HU["thyroid"], "thyroid")
    # airway by level: pharynx (C1-C3), larynx (C4-C5), trachea (C6-C7); oesophagus behind it
    if lvl <= 2:
        aw = _sd_ellipse(x, y - (sy - 21), 13.0 + 2 * rng.random(), 5.0 + 2 * rng.random())
    elif lvl <= 4:
        aw = _sd_ellipse(x, y - (sy - 30), 8.0, 9.0)
        cart = np.maximum(np.abs(_sd_ellipse(x, y - (sy - 30), 15.0, 14.0)) - 1.2, y - (sy - 26))
        paint(cart, HU["cartilage"] + 150 * rng.random(), "cartilage")
    else:
        aw = np.hypot(x, y - (sy - 32)) - 8.5
    paint(aw - 2.0, sp.muscle_hu, "muscle")
    paint(aw, HU["air"], "airway")
    if lvl >= 3:
        paint(_sd_ellipse(x - 4, y - (sy - 14.5), 7.0, 3.5), sp.muscle_hu, "muscle")
        if rng.random() < 0.5:
            paint(_sd_ellipse(x - 4, y - (sy - 14.5), 2.5, 1.0), HU["air"], "airway")
    if lvl <= 1 and rng.random() < 0.6:  # mandible at C1-C2, depending on head flexion
        mand = np.maximum(np.abs(_sd_ellipse(x, y - (sy - 20), a * 0.55, b_front + sy - 24)) - 4.0, y - (sy - 34))
        paint(mand, sp.cortical_hu * 0.8, "cortical")
        paint(mand + 1.2, sp.cancellous_hu + 100, "cancellous")


def _paint_vertebra(paint, hu, tissue, x, y, spec: SliceSpec, px: float, rng: np.random.Generator) -> np.ndarray:
    """The vertebra (evaluated in a box around the spine only, for speed), fractured if asked; its mask."""
    sp, n = spec.subject, hu.shape[0]
    g = _vertebra_geometry(spec.level, sp.scale, rng)
    U, V = _rot(x, y, 0.0, sp.spine_y_mm, float(rng.normal(0, 3)))
    box = (np.abs(U) < 42) & (V > -25) & (V < 55)
    rows, cols = np.where(box.any(axis=1))[0], np.where(box.any(axis=0))[0]
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    u, v = U[crop], V[crop]
    mask = np.zeros((n, n), dtype=bool)
    plan = None
    if spec.fracture_type == "none":
        parts = _vertebra_sdf(u, v, g)
        bone_sd, gap = parts["bone"], None
    else:
        # a separate stream, so a fracture slice equals its normal twin everywhere but the fracture
        plan = _fracture_plan(g, spec.fracture_type, spec.difficulty, np.random.default_rng([spec.seed, 11]))
        _, bone_sd, gap, m, parts = _apply_fracture(u, v, g, plan, px)
        mask[crop] = ndimage.binary_dilation(m, iterations=1)
    sub_hu, sub_t = hu[crop], tissue[crop]
    # canal contents and the vertebral arteries in the foramina
    paint(parts["canal"], HU["csf"], "csf", sub_hu, sub_t)
    paint(parts["cord"], HU["cord"], "cord", sub_hu, sub_t)
    paint(parts["foramina"] + 0.3, HU["vessel"], "vessel", sub_hu, sub_t)
    # bone: cortical shell around trabecular cancellous bone
    tex = ndimage.gaussian_filter(rng.standard_normal(u.shape), 0.55 / px)
    tex /= tex.std() + 1e-9
    coarse = ndimage.gaussian_filter(rng.standard_normal(u.shape), 2.5 / px)
    canc = sp.cancellous_hu + 90.0 * tex + 25.0 * coarse * (2.5 / px)
    inner = _coverage(bone_sd + sp.cortical_mm, px)
    bone_hu = sp.cortical_hu * (1 - inner) + canc * inner
    alpha = _coverage(bone_sd, px)
    if gap is not None:  # haematoma in the fracture gap, partly filled at high difficulty
        gap_bone = gap * _coverage(np.minimum(parts["bone"], bone_sd), px)
        sub_hu += gap_bone * (HU["haematoma"] - sub_hu)
        alpha = np.maximum(alpha, gap_bone * plan["fill"] * _coverage(parts["bone"], px))
        bone_hu = np.where(gap_bone > 0, bone_hu * (1 - gap_bone) + canc * gap_bone, bone_hu)
    sub_hu += alpha * (bone_hu - sub_hu)
    sub_t[(alpha > 0.5) & (inner > 0.5)] = TISSUE["cancellous"]
    sub_t[(alpha > 0.5) & (inner <= 0.5)] = TISSUE["cortical"]
    if gap is not None:
        sub_t[(gap > 0.5) & (alpha <= 0.5) & mask[crop]] = TISSUE["haematoma"]
    hu[crop], tissue[crop] = sub_hu, sub_t
    return mask


# CT formation
MU_WATER_PER_MM = 0.019  # linear attenuation of water at ~70 keV, 1/mm


def _freq_radius(n: int, px: float) -> np.ndarray:
    """Radial spatial frequency (cycles/mm) of an rfft2 grid of an (n, n) image."""
    fy = np.fft.fftfreq(n, d=px)[:, None]
    fx = np.fft.rfftfreq(n, d=px)[None, :]
    return np.hypot(fx, fy)


def kernel_mtf(n: int, px: float, sigma_mm: float, boost: float) -> np.ndarray:
    """Modulation transfer of the scanner + sharp reconstruction kernel on an rfft2 grid."""
    f = _freq_radius(n, px)
    f_nyq = 0.5 / px
    return np.exp(-2 * (np.pi * sigma_mm * f) ** 2) * (1.0 + boost * (f / f_nyq) ** 2)


def nps_noise(
    shape: tuple[int, int], px: float, sd_hu: float, sigma_mm: float, boost: float, rng: np.random.Generator
) -> np.ndarray:
    """Stationary FBP-like noise of standard deviation ``sd_hu``: white noise filtered to |f| · MTF(f)².

    The ramp |f| is what back-projection does to detector noise; its linear interpolation rolls it
    off towards Nyquist (sinc², partly refilled by aliasing: power ∝ sinc³ fits ``iradon``, see tests).
    """
    n = shape[0]
    f = _freq_radius(n, px)
    amp = np.sqrt(f) * np.sinc(f * px) ** 1.5 * kernel_mtf(n, px, sigma_mm, boost)
    noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * amp, s=shape)
    return noise * (sd_hu / (noise.std() + 1e-12))


def _fov_circle(n: int) -> np.ndarray:
    """The circular reconstruction field of an (n, n) image: bool (n, n)."""
    c = np.arange(n) - (n - 1) / 2
    return np.hypot(c[None, :], c[:, None]) <= n / 2 - 0.5


def simulate_ct(
    hu_true: np.ndarray, px: float, subject: SubjectParams, rng: np.random.Generator, model: str = "nps"
) -> np.ndarray:
    """A true HU image reconstructed as CT: float32 HU, padding outside the circular field.

    ``"fbp"``: radon → Poisson counts at the subject's dose → ramp-filtered back-projection → kernel
    blur. ``"nps"``: kernel blur plus noise of the FBP power spectrum, growing with X-ray path length.
    """
    n = hu_true.shape[0]
    inside = _fov_circle(n)
    mtf = kernel_mtf(n, px, subject.kernel_sigma_mm, subject.kernel_boost)
    if model == "fbp":
        from skimage.transform import iradon, radon  # noqa: PLC0415 - slow path only

        mu = np.clip(MU_WATER_PER_MM * (1.0 + hu_true.astype(np.float64) / 1000.0), 0, None) * inside
        theta = np.linspace(0.0, 180.0, max(180, int(n * 0.8)), endpoint=False)
        sino = radon(mu * px, theta=theta, circle=True)  # line integrals (dimensionless)
        i0 = 2.0e5 * subject.dose
        counts = rng.poisson(i0 * np.exp(-sino)).astype(np.float64)
        sino_noisy = -np.log(np.maximum(counts, 1.0) / i0)
        mu_rec = iradon(sino_noisy, theta=theta, filter_name="ramp", circle=True) / px
        hu = (mu_rec / MU_WATER_PER_MM - 1.0) * 1000.0
        hu = np.fft.irfft2(np.fft.rfft2(hu) * mtf, s=hu.shape)
    elif model == "nps":
        hu = np.fft.irfft2(np.fft.rfft2(hu_true.astype(np.float64)) * mtf, s=hu_true.shape)
        # attenuation along the lateral and antero-posterior rays → noise grows with path length
        mu = np.clip(1.0 + hu_true / 1000.0, 0, None) * MU_WATER_PER_MM * px
        path = 0.5 * (np.exp(0.5 * mu.sum(axis=1))[:, None] + np.exp(0.5 * mu.sum(axis=0))[None, :])
        path /= np.median(path[hu_true > -500]) if (hu_true > -500).any() else 1.0
        sd = 22.0 * 2.2 / np.sqrt(subject.dose)  # soft tissue ~20 HU, x2.2 for the bone kernel
        noise = nps_noise(hu_true.shape, px, sd, subject.kernel_sigma_mm, subject.kernel_boost, rng)
        hu = hu + noise * np.sqrt(path)
    else:
        raise ValueError(f"unknown CT model {model!r}; choose 'nps' or 'fbp'")
    return np.where(inside, hu, HU["padding"]).astype(np.float32)


def window_to_uint8(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to 0-255 with a display window (``level`` ± ``width``/2), as radiologists view CT."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    return np.clip(np.round((hu - lo) / width * 255.0), 0, 255).astype(np.uint8)


def render_slice(spec: SliceSpec, ct_model: str = "nps") -> SliceResult:
    """Anatomy → fracture → CT formation → bone-window 8-bit image, for one :class:`SliceSpec`."""
    hu_true, tissue, mask, px = render_anatomy(spec)
    rng = np.random.default_rng([spec.seed, 7])
    hu = simulate_ct(hu_true, px, spec.subject, rng, model=ct_model)
    width, level = spec.subject.window
    image = window_to_uint8(hu, width, level)
    meta = {"level": spec.level, "fracture_type": spec.fracture_type, "difficulty": spec.difficulty}
    return SliceResult(image=image, hu=hu, hu_true=hu_true, tissue=tissue, mask=mask, pixel_mm=px, meta=meta)


# Datasets
@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a generated dataset; all of them are recorded in its manifest."""

    n: int = 1200
    seed: int = 0
    difficulty: float = 0.5
    fracture_fraction: float = 0.3
    slices_per_subject: int = 5
    val_fraction: float = 0.2
    ct_model: str = "nps"

    def validate(self) -> None:
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"--n must be a positive number of slices, got {self.n!r}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"--difficulty must lie in [0, 1] (0 = obvious, 1 = hairline), got {self.difficulty}")
        if not 0.0 < self.fracture_fraction < 1.0:
            raise ValueError(f"fracture fraction must lie in (0, 1), got {self.fracture_fraction}")
        if not 1 <= self.slices_per_subject <= len(LEVELS):
            raise ValueError(f"slices per subject must lie in [1, {len(LEVELS)}], got {self.slices_per_subject}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val fraction must lie in [0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")
        if self.ct_model not in ("nps", "fbp"):
            raise ValueError(f"ct model must be 'nps' or 'fbp', got {self.ct_model!r}")


def generator_fingerprint() -> str:
    """Hash of this module's source: a dataset is stale when the generator code changes."""
    return sha256_file(__file__)[:16]


def plan_dataset(cfg: SynthConfig) -> list[dict]:
    """Decide every slice (subject, level, label, split) without drawing anything: subjects get
    adjacent levels; fractures go on 1-2 adjacent levels of random subjects until the fraction is
    reached, so fracture slices share the level, size, dose and resolution distribution of normals."""
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, 1])
    k = cfg.slices_per_subject
    n_subjects = -(-cfg.n // k)
    rows: list[dict] = []
    for s in range(n_subjects):
        count = min(k, cfg.n - s * k)
        start = int(rng.integers(0, len(LEVELS) - count + 1))
        rows += [{"subject_index": s, "level": LEVELS[start + j], "slot": j, "n_slots": count} for j in range(count)]
    target = int(round(cfg.fracture_fraction * cfg.n))
    by_subject: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_subject.setdefault(r["subject_index"], []).append(i)
    fractured = 0
    for s in rng.permutation(n_subjects):
        if fractured >= target:
            break
        idx = by_subject[int(s)]
        m = min(int(rng.integers(1, 3)), len(idx), target - fractured)
        first = int(rng.integers(0, len(idx) - m + 1))
        for i in idx[first : first + m]:
            rows[i]["label"] = "fracture"
            fractured += 1
    while fractured < target:  # not enough subjects for the fraction: extend injuries to a neighbouring level
        cand = [i for i, r in enumerate(rows) if "label" not in r and _next_to_fracture(rows, i)]
        cand = cand or [i for i, r in enumerate(rows) if "label" not in r]
        rows[int(rng.choice(cand))]["label"] = "fracture"
        fractured += 1
    val_subjects = set(rng.permutation(n_subjects)[: int(round(cfg.val_fraction * n_subjects))].tolist())
    for i, r in enumerate(rows):
        r.setdefault("label", "normal")
        is_fracture = r["label"] == "fracture"
        r["fracture_type"] = str(rng.choice(FRACTURE_TYPES, p=[0.45, 0.3, 0.25])) if is_fracture else "none"
        r["split"] = "val" if r["subject_index"] in val_subjects else "train"
        r["index"] = i
    return rows


def _next_to_fracture(rows: list[dict], i: int) -> bool:
    """Whether row ``i`` has a fractured neighbouring level of the same subject."""
    same = [j for j in (i - 1, i + 1) if 0 <= j < len(rows) and rows[j]["subject_index"] == rows[i]["subject_index"]]
    return any(rows[j].get("label") == "fracture" for j in same)


def _render_row(args) -> tuple[dict, bytes, bytes | None]:
    """Worker: draw one planned slice and return its manifest row and PNG bytes (image, mask)."""
    cfg, row = args
    sub_rng = np.random.default_rng([cfg.seed, 2, row["subject_index"]])
    subject = sample_subject(sub_rng, f"S{row['subject_index']:05d}")
    fracture = row["label"] == "fracture"
    seed = int(np.random.SeedSequence([cfg.seed, 3, row["index"]]).generate_state(1)[0])
    spec = SliceSpec(subject, row["level"], row["fracture_type"], cfg.difficulty if fracture else 0.0, seed)
    res = render_slice(spec, ct_model=cfg.ct_model)
    mask_bytes = _png_bytes(res.mask.astype(np.uint8) * 255) if fracture else None
    out = {k: row[k] for k in ("level", "label", "fracture_type", "split")}
    out |= {"subject_id": subject.subject_id, "difficulty": spec.difficulty if fracture else ""}
    out |= {"width": res.image.shape[1], "height": res.image.shape[0], "pixel_mm": round(res.pixel_mm, 4)}
    out |= {"dose": round(subject.dose, 3), "window_width": subject.window[0], "window_level": subject.window[1]}
    return out | {"mask_pixels": int(res.mask.sum()), "index": row["index"]}, _png_bytes(res.image), mask_bytes


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def stored_marker(marker_file: Path, generator: str) -> dict | None:
    """The JSON record ``marker_file`` when ``generator`` wrote it (a generated dataset of ours), else ``None``."""
    try:
        stored = read_json(marker_file)
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("generator") == generator else None


def marker_is_current(marker_file: Path, want: dict) -> bool:
    """True when ``marker_file`` records the same generator, version, code fingerprint and parameters as ``want``."""
    stored = stored_marker(marker_file, want["generator"])
    return stored is not None and all(stored.get(k) == want[k] for k in ("version", "fingerprint", "params"))


def dataset_marker(cfg: SynthConfig) -> dict:
    """What identifies a generated dataset: generator, version, source hash and parameters."""
    marker = {"generator": GENERATOR, "version": GENERATOR_VERSION}
    return marker | {"fingerprint": generator_fingerprint(), "params": asdict(cfg)}


def is_up_to_date(out: str | os.PathLike, cfg: SynthConfig) -> bool:
    """True when ``out`` holds a dataset made by this generator code with these parameters."""
    return (Path(out) / MANIFEST_NAME).is_file() and marker_is_current(Path(out) / MARKER_NAME, dataset_marker(cfg))


def generate_dataset(
    out: str | os.PathLike, cfg: SynthConfig, workers: int | None = None, progress: bool = True, force: bool = False
):
    """Write a synthetic dataset in the Kaggle layout and return its manifest (a DataFrame).

    ``<out>/{train,val}/{fracture,normal}/*.png``, ``masks/*.png``, ``manifest.csv``, ``dataset.json``;
    same config → byte-identical files. A folder with other files is never touched; a dataset of
    ours with the same parameters and code is reused unless ``force``. Written beside ``out`` and
    moved in at the end, so a failure leaves the previous one intact.
    """
    import pandas as pd  # noqa: PLC0415

    cfg.validate()
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and stored_marker(out / MARKER_NAME, GENERATOR) is None:
        msg = f"output folder {out} is not empty and is not a synthetic dataset made by cspine (no {MARKER_NAME})"
        raise FileExistsError(msg + "; refusing to overwrite it. Choose an empty or new folder.")
    if not force and is_up_to_date(out, cfg):
        return pd.read_csv(out / MANIFEST_NAME, keep_default_na=False)
    return replace_folder(out, lambda tmp: _write_dataset(tmp, cfg, workers, progress), "dataset")


def _write_dataset(tmp: Path, cfg: SynthConfig, workers: int | None, progress: bool):
    """Draw every planned slice (on ``workers`` processes) into ``tmp``; write the manifest and marker."""
    import pandas as pd  # noqa: PLC0415

    rows = plan_dataset(cfg)
    for folder in ("train/fracture", "train/normal", "val/fracture", "val/normal", "masks"):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, len(rows)))
    jobs = [(cfg, r) for r in rows]
    if workers > 1:
        import multiprocessing as mp  # noqa: PLC0415

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ctx.Pool(workers) as pool:
            records = _write_all(tmp, pool.imap(_render_row, jobs, chunksize=4), len(jobs), progress)
    else:
        records = _write_all(tmp, map(_render_row, jobs), len(jobs), progress)
    manifest = pd.DataFrame(records).sort_values("index").drop(columns="index")
    manifest["seed"] = cfg.seed
    manifest["generator_version"] = GENERATOR_VERSION
    manifest["generator_params"] = json.dumps(asdict(cfg), sort_keys=True)
    manifest.to_csv(tmp / MANIFEST_NAME, index=False)
    write_json(tmp / MARKER_NAME, dataset_marker(cfg), sort_keys=True)
    return manifest.reset_index(drop=True)


def _write_all(tmp: Path, results, total: int, progress: bool) -> list[dict]:
    """Write each slice's PNG (and mask) as it arrives; its manifest row, file columns first."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    records = []
    for rec, img, mask in tqdm(results, total=total, disable=not progress, desc="synthetic CT", unit="slice"):
        stem = f"{rec['subject_id']}_{rec['level']}"
        rel = Path(rec["split"]) / rec["label"] / f"{stem}.png"
        (tmp / rel).write_bytes(img)
        rec["file"], rec["mask_file"] = rel.as_posix(), ""
        if mask is not None:
            (tmp / "masks" / f"{stem}_mask.png").write_bytes(mask)
            rec["mask_file"] = f"masks/{stem}_mask.png"
        records.append(rec)
    cols = ["file", "label", "split", "subject_id", "level", "fracture_type", "difficulty", "mask_file"]
    return [{**{c: r[c] for c in cols}, **{k: v for k, v in r.items() if k not in cols}} for r in records]


def kaggle_like_dataset(
    out: str | os.PathLike, n_sources: int = 12, copies: int = 6, seed: int = 0, val_share: float = 0.3
) -> Path:
    """Write a small dataset with the *flaws* of the public Kaggle set, for teaching the audit.

    Returns ``<out>/cervical fracture`` ({train,val}/{fracture,normal}/, Kaggle-style names). Like the
    public set: pre-augmented (a 512×512 grey original plus ``copies`` rotated/sharpened 224×224 RGB
    copies of each source), val shares sources with train, and the classes differ by level
    (fractures C1-C2, normals C5-C7): separable without seeing any fracture.
    """
    from PIL import ImageFilter  # noqa: PLC0415

    if n_sources < 2 or copies < 1:
        raise ValueError(f"need n_sources >= 2 and copies >= 1, got {n_sources}, {copies}")
    root = Path(out).expanduser() / "cervical fracture"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose a new folder")
    rng = np.random.default_rng([seed, 99])
    for folder in ("train/fracture", "train/normal", "val/fracture", "val/normal"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k in range(n_sources):
        label = "fracture" if k % 2 == 0 else "normal"
        level = str(rng.choice(["C1", "C2"] if label == "fracture" else ["C5", "C6", "C7"]))
        subject = replace(sample_subject(rng, f"K{k}"), matrix=512)
        ftype = str(rng.choice(FRACTURE_TYPES)) if label == "fracture" else "none"
        original = Image.fromarray(render_slice(SliceSpec(subject, level, ftype, 0.3, int(rng.integers(2**31)))).image)
        stem = f"SYN{'F' if label == 'fracture' else 'N'}{k} ({int(rng.integers(1, 40))})"
        original.save(root / "train" / label / f"{stem}.png")
        for c in range(copies):
            copy = original.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
            copy = copy.filter(ImageFilter.SHARPEN) if c % 2 else copy
            copy = copy.resize((224, 224), Image.Resampling.BILINEAR).convert("RGB")
            split = "val" if rng.random() < val_share else "train"  # copies of one source in both folders
            copy.save(root / split / label / f"{stem}-{'sharpened-rotated' if c % 2 else 'rotated'}{c + 1}.png")
    return root
