"""Shared fixtures: small datasets written to disk in the layouts the course reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage


def toy_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; label 1 ones carry a bright square. (n, size, size, 1) in [0, 1], (n,)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, size=(n, size, size, 1)).astype(np.float32)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(2, size - 10, size=2)
        x[i, r : r + 8, c : c + 8, 0] = 0.9
    return x, y.astype(np.float32)


def smooth_random_image(seed: int, size: int = 512) -> Image.Image:
    """A grayscale ('L') image of smooth random blobs; different seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(48, 48)), sigma=3.0)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    small = Image.fromarray((field * 255).astype(np.uint8), mode="L")
    return small.resize((size, size), Image.Resampling.BILINEAR)


def kaggle_variants(base: Image.Image) -> dict[str, Image.Image]:
    """Pre-augmented copies as in the Kaggle set: 512x512 'L' and 224x224 'RGB' files."""
    sharp = base.filter(ImageFilter.SHARPEN)
    return {
        "": base,
        "-sharpened": sharp,
        "-rotated3": base.rotate(3, resample=Image.Resampling.BILINEAR).convert("RGB").resize((224, 224)),
        "-sharpened-rotated3": (sharp.rotate(3, resample=Image.Resampling.BILINEAR).convert("RGB").resize((224, 224))),
    }


# Sources per class. Those in LEAKY also have one variant in val (as the real Kaggle set does);
# those in VAL_ONLY are in val only.
KAGGLE_SOURCES = {
    "fracture": ["CSFDV1B10 (18)", "CSFDV1B10 (19)", "CSFDV1B2 (3)", "CSFDV1B7 (1)", "CSFDV1B7 (2)", "CSFDV1B8 (11)"],
    "normal": ["NCSV1B1 (4)", "NCSV1B1 (5)", "NCSV1B3 (20)", "NCSV1B4 (7)", "NCSV1B9 (2)", "NCSV1B9 (3)"],
}
KAGGLE_LEAKY = {"CSFDV1B10 (18)", "NCSV1B1 (4)"}
KAGGLE_VAL_ONLY = {"CSFDV1B8 (11)", "NCSV1B9 (3)"}


def write_kaggle_dataset(parent: Path) -> Path:
    """Write ``<parent>/cervical fracture/{train,val}/{fracture,normal}/*.png``; return ``parent``."""
    root = parent / "cervical fracture"
    seed = 0
    for label, stems in KAGGLE_SOURCES.items():
        for stem in stems:
            seed += 1
            variants = kaggle_variants(smooth_random_image(seed))
            for i, (suffix, img) in enumerate(variants.items()):
                if stem in KAGGLE_VAL_ONLY:
                    split = "val"
                elif stem in KAGGLE_LEAKY and i == len(variants) - 1:
                    split = "val"
                else:
                    split = "train"
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{stem}{suffix}.png")
    return parent


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A 40-slice synthetic dataset (phantom layout with manifest.csv and masks); do not modify."""
    from cspine_utils import phantom

    out = tmp_path_factory.mktemp("synthetic") / "ds"
    phantom.generate_dataset(out, phantom.SynthConfig(n=40, seed=1), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def kaggle_dataset(tmp_path_factory) -> Path:
    """The folder *above* ``cervical fracture`` of a small Kaggle-layout dataset; do not modify."""
    return write_kaggle_dataset(tmp_path_factory.mktemp("kaggle") / "archive")


@pytest.fixture()
def kaggle_copy(tmp_path) -> Path:
    """A fresh Kaggle-layout dataset under ``tmp_path`` that a test may change."""
    return write_kaggle_dataset(tmp_path / "archive")
