"""Figures shared by notebooks and commands; every saved figure goes through :func:`save_figure`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import config


def save_figure(fig, name: str, folder: str | Path | None = None, dpi: int = 110) -> Path:
    """Save a Matplotlib figure as PNG under ``report/figures/`` (or ``folder``) and return the path."""
    folder = Path(folder) if folder is not None else config.figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


def phantom_montage(difficulties=(0.0, 0.5, 1.0), seed: int = 7, crop_mm: float = 70.0):
    """Normal and fracture slices of the phantom at several difficulties, fracture masks outlined.

    Row 1 shows normal slices at several levels; each further row one difficulty, with the three
    fracture types and a zoom on the spine. Returns the Matplotlib figure.
    """
    from . import phantom  # noqa: PLC0415

    plt = pyplot()

    rng = np.random.default_rng(seed)
    levels = ("C1", "C2", "C4", "C7")
    rows = [("normal", [("none", lvl) for lvl in levels])]
    for d in difficulties:
        rows.append((f"difficulty {d:g}", [("linear", "C5"), ("posterior", "C4"), ("burst", "C6"), ("burst", "C1")]))
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.3 * len(rows)))
    for r, (title, cells) in enumerate(rows):
        diff = 0.0 if title == "normal" else difficulties[r - 1]
        for c, (ftype, level) in enumerate(cells):
            subject = phantom.sample_subject(rng, f"M{r}{c}")
            spec = phantom.SliceSpec(
                subject=subject, level=level, fracture_type=ftype, difficulty=diff, seed=int(rng.integers(2**31))
            )
            res = phantom.render_slice(spec)
            ax = axes[r, c]
            img, mask = res.image, res.mask
            if c > 0:  # zoom on the spine so the fracture can be judged at full resolution
                half = int(crop_mm / 2 / res.pixel_mm)
                centre = mask if mask.any() else res.tissue == phantom.TISSUE["csf"]  # fracture, or the canal
                ys, xs = np.nonzero(centre)
                cy, cx = (int(np.median(ys)), int(np.median(xs))) if len(ys) else (img.shape[0] // 2,) * 2
                sl = (slice(max(cy - half, 0), cy + half), slice(max(cx - half, 0), cx + half))
                img, mask = img[sl], mask[sl]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="#ff3b30", linewidths=0.7, alpha=0.8)
            label = "normal" if ftype == "none" else ftype
            ax.set_title(f"{level} · {label} · {res.image.shape[0]} px" + ("" if c == 0 else " (zoom)"), fontsize=9)
            ax.axis("off")
        label_style = {"rotation": 90, "va": "center", "ha": "right", "fontsize": 11, "weight": "bold"}
        axes[r, 0].text(-0.08, 0.5, title, transform=axes[r, 0].transAxes, **label_style)
    title = "Synthetic cervical-spine CT (bone window); red: fracture mask. Teaching data, not patients."
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def pyplot():
    """``matplotlib.pyplot``, switched to the file-only Agg backend when there is no screen and no
    notebook (scripts, tests, CI); in Jupyter the inline backend is kept."""
    import matplotlib  # noqa: PLC0415

    backend = matplotlib.get_backend().lower()
    if "inline" not in backend and backend != "agg" and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


# Structures to point at in the labelled slice: tissue label, text, which component to pick.
_ANATOMY_LABELS = (
    ("cortical", "cortical bone"),
    ("cancellous", "cancellous bone (vertebral body)"),
    ("cord", "spinal cord"),
    ("csf", "CSF in the canal"),
    ("airway", "airway (air)"),
    ("muscle", "muscle"),
    ("fat", "subcutaneous fat"),
    ("vessel", "carotid / jugular vessels"),
)


def labelled_slice(level: str = "C5", seed: int = 3):
    """One synthetic slice in the bone and soft-tissue windows, structures labelled with their HU.

    The HU shown are medians of each structure's true (pre-noise) values. Returns the figure.
    """
    from scipy import ndimage  # noqa: PLC0415

    from . import phantom  # noqa: PLC0415

    plt = pyplot()
    rng = np.random.default_rng(seed)
    subject = phantom.sample_subject(rng, "demo")
    import dataclasses  # noqa: PLC0415

    subject = dataclasses.replace(subject, matrix=512, fov_mm=170.0, rotation_deg=0.0, shift_mm=(0.0, 0.0))
    res = phantom.render_slice(phantom.SliceSpec(subject, level, "none", 0.0, seed))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, (name, (w, lvl)) in zip(
        axes, (("bone window 2000/500", (2000, 500)), ("soft-tissue window 400/40", (400, 40)))
    ):
        ax.imshow(phantom.window_to_uint8(res.hu, w, lvl), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"synthetic {level}, {name}")
        ax.axis("off")
    ax = axes[0]
    n = res.hu.shape[0]
    for k, (tissue, text) in enumerate(_ANATOMY_LABELS):
        region = res.tissue == phantom.TISSUE[tissue]
        if not region.any():
            continue
        hu = float(np.median(res.hu_true[region]))
        comps, count = ndimage.label(region)
        largest = comps == (1 + int(np.argmax(ndimage.sum(region, comps, range(1, count + 1)))))
        depth = ndimage.distance_transform_edt(largest)  # point at the deepest pixel of the structure
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        side = -1 if k % 2 == 0 else 1
        tx = n * (0.5 + side * 0.47)
        ty = n * (0.08 + 0.11 * k)
        arrow = {"arrowstyle": "->", "color": "yellow", "lw": 0.8}
        style = {"color": "yellow", "fontsize": 8, "ha": "left" if side < 0 else "right", "arrowprops": arrow}
        ax.annotate(f"{text}\n{hu:+.0f} HU", xy=(x, y), xytext=(tx, ty), **style)
    title = (
        "What an axial cervical CT slice shows (synthetic phantom; anterior at the top, patient's left on the right)"
    )
    fig.suptitle(title, fontsize=11, y=1.01)
    fig.tight_layout()
    return fig


def sample_grid(manifest, n_per_class: int = 6, seed: int = 0, title: str = ""):
    """A grid of random images per class (rows: classes) from a manifest with ``path`` and ``label``."""
    from . import data  # noqa: PLC0415

    plt = pyplot()
    classes = sorted(manifest["label"].unique())
    fig, axes = plt.subplots(len(classes), n_per_class, figsize=(2.2 * n_per_class, 2.4 * len(classes)), squeeze=False)
    for r, cls in enumerate(classes):
        rows = manifest[manifest["label"] == cls]
        pick = rows.sample(min(n_per_class, len(rows)), random_state=seed)
        for c in range(n_per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(pick):
                row = pick.iloc[c]
                ax.imshow(data.read_image(row["path"]), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{cls}\n{Path(row['path']).name[:22]}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def class_mean_images(manifest, size: int = 128, max_per_class: int = 300, seed: int = 0):
    """Per-class mean image (resized to ``size``²) and their difference.

    A visible structure in the difference image means the classes differ in coarse appearance
    (level, position, scanner) — a shortcut a network can learn instead of the fracture.
    """
    from PIL import Image  # noqa: PLC0415

    from . import data  # noqa: PLC0415

    plt = pyplot()
    means = {}
    for cls, rows in manifest.groupby("label"):
        rows = rows.sample(min(max_per_class, len(rows)), random_state=seed)
        acc = np.zeros((size, size), np.float64)
        for p in rows["path"]:
            img = data.read_image(p)
            acc += np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), np.float64)
        means[cls] = acc / len(rows)
    classes = sorted(means)
    fig, axes = plt.subplots(1, len(classes) + 1, figsize=(4 * (len(classes) + 1), 4))
    for ax, cls in zip(axes, classes):
        ax.imshow(means[cls], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"mean {cls} image")
        ax.axis("off")
    if len(classes) == 2:
        diff = means[classes[0]] - means[classes[1]]
        lim = max(float(np.abs(diff).max()), 1e-3)
        im = axes[-1].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[-1].set_title(f"{classes[0]} − {classes[1]}")
        fig.colorbar(im, ax=axes[-1], fraction=0.046)
    axes[-1].axis("off")
    fig.tight_layout()
    return fig, means


def intensity_histograms(manifest, max_per_class: int = 200, seed: int = 0, pixels_per_class: int = 200_000):
    """Pixel-value distributions per class inside the body (pixels > 0.02): ``seaborn.histplot`` with
    ``hue="class"``, each class normalised on its own, log density; ``pixels_per_class`` drawn at random."""
    import pandas as pd  # noqa: PLC0415
    import seaborn as sns  # noqa: PLC0415

    from . import data  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    parts = []
    for cls, rows in sorted(manifest.groupby("label")):
        rows = rows.sample(min(max_per_class, len(rows)), random_state=seed)
        values = np.concatenate([data.read_image(p)[::2, ::2].ravel() for p in rows["path"]])
        values = values[values > 0.02]
        values = rng.choice(values, min(pixels_per_class, values.size), replace=False) if values.size else values
        parts.append(pd.DataFrame({"pixel value": values, "class": cls}))
    fig, ax = pyplot().subplots(figsize=(7, 3.5))
    style = {"stat": "density", "common_norm": False, "element": "step", "fill": False, "bins": 100, "binrange": (0, 1)}
    sns.histplot(pd.concat(parts), x="pixel value", hue="class", ax=ax, **style)
    ax.set(xlabel="pixel value (bone window, 0 = −500 HU … 1 = +1500 HU for the phantom)", yscale="log")
    fig.tight_layout()
    return fig


def learning_curves(history: dict, title: str = "", phase_boundary: int | None = None):
    """Training vs validation curves of a Keras history dict: loss, accuracy and AUC per epoch.

    ``phase_boundary`` (epoch index) draws a line where fine-tuning started (two-phase training).
    """
    plt = pyplot()
    metrics = [m for m in ("loss", "accuracy", "auc") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[m]) + 1)
        ax.plot(epochs, history[m], "o-", ms=3, label="training")
        if f"val_{m}" in history:
            ax.plot(epochs, history[f"val_{m}"], "o-", ms=3, label="validation")
        if phase_boundary:
            ax.axvline(phase_boundary + 0.5, color="grey", ls="--", lw=1)
            ax.text(phase_boundary + 0.6, ax.get_ylim()[1], "fine-tuning", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_title(f"model {m}")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def model_diagram(model, max_layers: int = 40):
    """A simple top-to-bottom diagram of a Keras model: one box per layer with its output shape.

    (``keras.utils.plot_model`` needs Graphviz, which a student's machine may not have.)
    """
    plt = pyplot()
    layers = [layer for layer in model.layers][:max_layers]
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(layers) + 0.6))
    colours = dict(
        pair.split(":")
        for pair in "Conv2D:#8ecae6 BatchNormalization:#ffb703 Activation:#fb8500 ReLU:#fb8500 MaxPooling2D:#90be6d "
        "GlobalAveragePooling2D:#90be6d Dropout:#cdb4db Dense:#f28482 InputLayer:#dddddd".split()
    )
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        try:
            shape = tuple(layer.output.shape[1:])
        except (AttributeError, ValueError):
            shape = ()
        y = len(layers) - i
        ax.add_patch(plt.Rectangle((0, y - 0.4), 1, 0.8, color=colours.get(kind, "#eeeeee"), ec="black", lw=0.5))
        ax.text(0.03, y, f"{layer.name}  ({kind})", va="center", fontsize=8)
        ax.text(0.97, y, "×".join(str(s) for s in shape), va="center", ha="right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0.3, len(layers) + 0.7)
    ax.axis("off")
    ax.set_title(f"{model.name}: {model.count_params():,} parameters", fontsize=10)
    fig.tight_layout()
    return fig


def study_views(volume, mask=None, boxes=(), spacing_mm=(1.0, 1.0, 1.0), title: str = ""):
    """Axial, sagittal and coronal views of a CT study with its vertebra mask and fracture boxes.

    ``volume`` (Z, H, W), superior slice first: windowed grey values, uint8 0-255 or floats in [0, 1];
    ``mask`` (Z, H, W) labels 0..7 (C1..C7, drawn in colour) or None; ``boxes`` rows (z index, x, y,
    width, height) in pixels; ``spacing_mm`` (dz, dy, dx) sets the aspect. The planes cross at the centre
    of the middle box (else of the volume). Returns the Matplotlib figure.
    """
    plt = pyplot()
    vol = np.asarray(volume, dtype=np.float32)
    vol = vol / 255.0 if vol.max(initial=0.0) > 1.0 else vol
    if vol.ndim != 3 or min(vol.shape) == 0 or (mask is not None and np.shape(mask) != vol.shape):
        raise ValueError(f"need a volume (Z, H, W) and a mask of the same shape, got {vol.shape}, {np.shape(mask)}")
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 5)
    labels = np.zeros(vol.shape, np.uint8) if mask is None else np.asarray(mask)
    dz, dy, dx = (float(s) for s in spacing_mm)
    z0, y0, x0 = (vol.shape[0] // 2, vol.shape[1] // 2, vol.shape[2] // 2)
    if len(boxes):
        z, x, y, w, h = boxes[np.argsort(boxes[:, 0])[len(boxes) // 2]]
        z0, y0, x0 = int(z), int(min(y + h / 2, vol.shape[1] - 1)), int(min(x + w / 2, vol.shape[2] - 1))
    views = (  # name, image, labels, aspect, boxes as (left, bottom, width, height) rectangles
        ("axial", vol[z0], labels[z0], dy / dx, [(b[1], b[2], b[3], b[4]) for b in boxes if int(b[0]) == z0]),
        (
            "sagittal",
            vol[:, :, x0],
            labels[:, :, x0],
            dz / dy,
            [(b[2], b[0] - 0.5, b[4], 1) for b in boxes if b[1] <= x0 <= b[1] + b[3]],
        ),
        (
            "coronal",
            vol[:, y0, :],
            labels[:, y0, :],
            dz / dx,
            [(b[1], b[0] - 0.5, b[3], 1) for b in boxes if b[2] <= y0 <= b[2] + b[4]],
        ),
    )
    colours = plt.get_cmap("tab10", 10)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, image, lab, aspect, rects) in zip(axes, views):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        overlay = np.zeros((*lab.shape, 4), np.float32)
        for v in range(1, 8):
            overlay[lab == v] = (*colours(v - 1)[:3], 0.35)
        ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        for left, bottom, width, height in rects:
            ax.add_patch(plt.Rectangle((left, bottom), width, height, fill=False, ec="#ff3b30", lw=1.2))
        where = {"axial": f"slice {z0}", "sagittal": f"column {x0}", "coronal": f"row {y0}"}[name]
        ax.set_title(f"{name} ({where}; {len(rects)} box{'es' if len(rects) != 1 else ''})", fontsize=9)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(v - 1)) for v in range(1, 8) if (labels == v).any()]
    names = [f"C{v}" for v in range(1, 8) if (labels == v).any()]
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title or "a CT study in three planes (bone window)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
