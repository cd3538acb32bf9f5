"""Refuse inputs that are not axial CT slices before a model sees them (one check for app, CLI and ``Bundle``).

A classifier answers whatever it is given: an MR image, a 1×1 icon or a holiday photograph all get a
"fracture probability". :func:`check_input` looks at the file first and returns an :class:`InputCheck`:

* ``refusal`` (the file is not predicted): a DICOM whose Modality is not CT ("MR image: this model
  reads CT"); a side under :data:`MIN_SIDE_PX`; an aspect ratio beyond :data:`MAX_ASPECT`; a colour
  image (more than :data:`COLOUR_SHARE` of its pixels have channels that differ by more than
  :data:`COLOUR_SPREAD` grey levels: real colour, not grey stored as RGB).
* ``flags`` (predicted, with a visible warning): an 8-bit image with none of the bright bone a
  bone-window CT slice shows (under :data:`BONE_SHARE` of pixels at :data:`BONE_LEVEL`/255 or above;
  every slice of the course's phantom has at least 0.24 %).

Files that cannot be read at all raise ``data.ImageReadError`` (as ``read_image`` does). Teaching tool,
not for diagnosis: passing these checks does not make an image one the model understands (see
``trust``'s "unlike the training data" flag).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_SIDE_PX = 64
"""Smallest accepted width or height in pixels (CT slices are usually 512 × 512)."""
MAX_ASPECT = 3.0
"""Largest accepted ratio of the longer to the shorter side (an axial slice is about square)."""
COLOUR_SPREAD = 16
"""A pixel is coloured when its R, G, B differ by more than this many grey levels (of 255)."""
COLOUR_SHARE = 0.05
"""An image is a colour image when more than this share of its pixels is coloured."""
BONE_LEVEL = 150
"""Grey level (of 255) that cortical bone reaches in a bone window (about 550 HU and above)."""
BONE_SHARE = 0.001
"""An 8-bit image with fewer pixels than this share at :data:`BONE_LEVEL` or above is flagged."""
NOT_BONE_WINDOW = "does not look like a bone-window CT slice"


@dataclass(frozen=True)
class InputCheck:
    """The verdict on one file: ``refusal`` (why it is not predicted) or None, and ``flags`` (warnings)."""

    refusal: str | None = None
    flags: tuple[str, ...] = ()


def _shape_refusal(width: int, height: int) -> str | None:
    short, long = sorted((int(width), int(height)))
    if short < MIN_SIDE_PX:
        return (
            f"image too small: {width}×{height} pixels; this model needs at least {MIN_SIDE_PX} pixels "
            "on each side (CT slices are usually 512×512)"
        )
    if long / short > MAX_ASPECT:
        return (
            f"not the shape of a CT slice: {width}×{height} pixels is an aspect ratio of {long / short:.0f}:1 "
            f"(at most {MAX_ASPECT:g}:1 is accepted; an axial slice is about square)"
        )
    return None


def _dicom_check(path: Path) -> InputCheck:
    from . import dicom  # noqa: PLC0415

    info = dicom.read_dicom_header(path)
    modality = info["modality"].strip().upper()
    if modality and modality != "CT":
        return InputCheck(f"{modality} image (DICOM Modality {modality}): this model reads CT")
    refusal = _shape_refusal(info["columns"], info["rows"])
    flags = () if modality else ("DICOM without a Modality: cannot confirm that it is a CT image",)
    return InputCheck(refusal, flags)


def _pixels_check(path: Path, mode: str) -> InputCheck:
    """Colour refusal (RGB-like modes) and the bone flag (8-bit images); reads a ≤ 256-px thumbnail."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        im.draft("RGB", (256, 256))  # JPEG: decode at reduced size
        im.thumbnail((256, 256), Image.Resampling.NEAREST)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    if mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        coloured = float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > COLOUR_SPREAD).mean())
        if coloured > COLOUR_SHARE:
            return InputCheck(
                f"colour image ({coloured:.0%} of its pixels are coloured): a CT slice is grey; "
                "this looks like a photograph or a coloured figure"
            )
    if mode in ("L", "LA", "P", "RGB", "RGBA"):  # 8-bit: a bone window shows bright cortical bone
        bright = float((rgb.max(axis=-1) >= BONE_LEVEL).mean())
        if bright < BONE_SHARE:
            return InputCheck(
                flags=(
                    f"{NOT_BONE_WINDOW}: no bright bone ({bright:.2%} of pixels at {BONE_LEVEL}/255 or above, "
                    f"a bone-window slice has at least {BONE_SHARE:.1%})",
                )
            )
    return InputCheck()


def check_input(path: str | os.PathLike, max_pixels: int | None = None) -> InputCheck:
    """Check one image file before prediction (rules in the module docstring).

    ``max_pixels`` as in ``data.read_image`` (checked before decoding). Raises ``FileNotFoundError`` or
    ``data.ImageReadError`` (naming the file) when it cannot be read at all.
    """
    from . import data  # noqa: PLC0415

    path = Path(path)
    probe = data.probe_image(path, max_pixels or data.DEFAULT_MAX_PIXELS)
    if probe["mode"] == "DICOM":
        return _dicom_check(path)
    refusal = _shape_refusal(probe["width"], probe["height"])
    return InputCheck(refusal) if refusal else _pixels_check(path, probe["mode"])
