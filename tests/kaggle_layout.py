"""Kaggle-layout datasets on disk whose slices come from a few scans (patients), for the patient checks.

Names as in the public set: ``cervical fracture/{train,val}/{fracture,normal}/<scan> (<slice>)<copy>.png``,
with spaces and parentheses. ``CONFOUNDED`` follows the 1,400-file part of the public set tried in
issue 12: every normal comes from one scan, the fractures mostly from two others. ``BALANCED`` has
five scans per class, two slices each.
"""

from __future__ import annotations

from pathlib import Path

from conftest import smooth_random_image
from PIL import Image, ImageFilter

#: label -> {scan: slice numbers}
CONFOUNDED = {
    "normal": {"NCSV1B4": list(range(10, 19))},
    "fracture": {"CSFDV1B10": [14, 15, 16, 17, 18], "CSFDV1B7": [1, 2, 3], "CSFDV1B2": [3]},
}
BALANCED = {
    "normal": {f"NCSV2B{k}": [4, 5] for k in range(5)},
    "fracture": {f"CSFDV2B{k}": [7, 8] for k in range(5)},
}
#: the copies of each slice: the original and two augmented copies, as in the public set
COPIES = ("", "-rotated1", "-sharpened-rotated3")


def write_scans(parent: Path, plan: dict[str, dict[str, list[int]]], size: int = 96) -> Path:
    """Write ``plan`` as real PNGs under ``<parent>/cervical fracture``; return that folder.

    The last slice of each scan goes to ``val`` (so a scan has slices in both folders when it has
    more than one); every copy of a slice stays with it.
    """
    root = parent / "cervical fracture"
    seed = 0
    for label, scans in plan.items():
        for scan, slices in scans.items():
            for n in slices:
                seed += 1
                image = smooth_random_image(seed, size)
                split = "val" if n == slices[-1] and len(slices) > 1 else "train"
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for copy in COPIES:
                    shown = image.filter(ImageFilter.SHARPEN) if "sharpened" in copy else image
                    shown = shown.rotate(int(copy[-1]) if copy else 0, resample=Image.Resampling.BILINEAR)
                    shown.save(folder / f"{scan} ({n}){copy}.png")
    return root
