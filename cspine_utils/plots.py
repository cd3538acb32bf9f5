"""Figures shared by notebooks and commands; every saved figure goes through :func:`save_figure`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import config

__all__ = ["save_figure", "phantom_montage"]


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
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from . import phantom  # noqa: PLC0415

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
            spec = phantom.SliceSpec(subject=subject, level=level, fracture_type=ftype, difficulty=diff,
                                     seed=int(rng.integers(2**31)))
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
        axes[r, 0].text(-0.08, 0.5, title, transform=axes[r, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=11, weight="bold")
    fig.suptitle("Synthetic cervical-spine CT (bone window); red: fracture mask. Teaching data, not patients.",
                 fontsize=12)
    fig.tight_layout()
    return fig
