"""From a manifest to batches the model can eat: preprocessing, augmentation and ``tf.data``.

Data flows one way: manifest (path, label, group, split) -> :func:`load_and_preprocess` (read,
optional spine crop, resize with zero padding) -> :func:`make_dataset` (tf.data: parallel decode ->
cache -> shuffle -> batch -> augment with Keras layers, training only -> prefetch) -> ``model.fit``.
Training, evaluation and inference (GUI, Grad-CAM, the command line) see the same pixels: the
dataset decodes PNGs with TensorFlow, to exactly :func:`load_and_preprocess`'s values. An image is
float32 in [0, 1] (bone-window grey, 0 = black); a model input ``(S, S, 1)``, ``S`` = ``image_size``
pixels; labels 0 = normal, 1 = fracture. TensorFlow and Keras are imported only where needed.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from . import records

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import pandas as pd
    import tensorflow as tf

#: Class names in label order: ``CLASS_NAMES[1] == "fracture"`` is the positive class.
CLASS_NAMES: tuple[str, str] = ("normal", "fracture")

#: Grey level (bone window, [0, 1]) above which a smoothed pixel is dense bone: about 490 HU in the
#: phantom's window (level 400, width 1800), 600 HU in the DICOM bone window (level 500, width 2000):
#: cortical bone (> 1000 HU), not muscle (~50 HU) nor cancellous bone (~250 HU).
BONE_THRESHOLD: float = 0.55

# Augmentation ranges at strength 1 (see augmentation_layers).
_MAX_ROTATION_DEG, _MAX_TRANSLATION, _MAX_ZOOM = 8.0, 0.06, 0.08  # degrees, fraction of the side, fraction
_MAX_CONTRAST, _MAX_BRIGHTNESS = 0.10, 0.05  # contrast factor 1 +- this; added grey level


def label_to_int(labels: Sequence[str] | pd.Series) -> np.ndarray:
    """Label names to int64 labels (N,): ``"normal"`` -> 0, ``"fracture"`` -> 1 (case and spaces ignored);
    ``ValueError`` naming the first label that is not one of :data:`CLASS_NAMES`."""
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        key = str(label).strip().lower()
        if key not in index:
            raise ValueError(f"unknown label {label!r} in row {i}; expected one of {', '.join(CLASS_NAMES)}")
        out[i] = index[key]
    return out


def _check_size(value: object, name: str) -> int:
    """``value`` as an int; ``ValueError`` unless it is a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_image(img: np.ndarray, name: str = "img") -> np.ndarray:
    """``img`` as a 2-D float32 array; accepts ``(H, W)`` or ``(H, W, 1)``."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (H, W) or (H, W, 1) array, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _largest_region(bone: np.ndarray) -> np.ndarray:
    """The largest region of a boolean bone mask (H, W), found on a ~128-cell grid (as at full resolution
    for a vertebra, ~20x faster); a dilation by 2 % of the side joins the pieces of one vertebra (body,
    pedicles, laminae, fragments), filling holes takes in the canal."""
    from scipy import ndimage  # noqa: PLC0415 - keep import time low

    h, w = bone.shape
    f = max(1, min(h, w) // 128)
    padded = np.pad(bone, ((0, -h % f), (0, -w % f)))
    coarse = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).any(axis=(1, 3))
    radius = max(1, int(round(0.02 * min(h, w) / f)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    regions = ndimage.binary_fill_holes(ndimage.binary_dilation(coarse, structure=(yy**2 + xx**2) <= radius**2))
    labels, _ = ndimage.label(regions)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    largest = labels == int(np.argmax(sizes))
    return np.repeat(np.repeat(largest, f, axis=0), f, axis=1)[:h, :w]


def roi_bbox(
    img: np.ndarray, margin: float = 0.08, threshold: float = BONE_THRESHOLD, smooth_sigma: float | None = None
) -> tuple[int, int, int, int]:
    """Bounding box ``(top, left, bottom, right)`` of the spine: the largest dense-bone region plus a margin.

    ``img`` (H, W) in [0, 1], lightly smoothed (``smooth_sigma`` pixels, default ``max(0.5, min(H, W) / 512)``),
    is bone above ``threshold``; the largest region (on an axial neck slice the vertebra and its canal, not
    the mandible arc nor noise) boxed, widened by ``margin`` of the height/width on each side, clipped;
    ``bottom``/``right`` exclusive. No bone: ``(0, 0, H, W)``. ``ValueError`` for a non-image or margin < 0.
    """
    from scipy import ndimage  # noqa: PLC0415

    arr = _check_image(img)
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a non-negative fraction of the image size, got {margin!r}")
    h, w = arr.shape
    sigma = max(0.5, min(h, w) / 512.0) if smooth_sigma is None else float(smooth_sigma)
    bone = (ndimage.gaussian_filter(arr, sigma=sigma) if sigma > 0 else arr) > threshold
    if not bone.any():
        return 0, 0, h, w
    rows, cols = np.nonzero(_largest_region(bone) & bone)
    dy, dx = int(round(margin * h)), int(round(margin * w))
    top, left = max(0, int(rows.min()) - dy), max(0, int(cols.min()) - dx)
    return top, left, min(h, int(rows.max()) + 1 + dy), min(w, int(cols.max()) + 1 + dx)


def crop_to_roi(img: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """``img`` (H, W) cropped to :func:`roi_bbox` (the spine plus ``margin``): float32 (h, w)."""
    arr = _check_image(img)
    top, left, bottom, right = roi_bbox(arr, margin=margin)
    return arr[top:bottom, left:right]


def resize_with_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Fit ``img`` (H, W) in [0, 1] into a ``size`` x ``size`` float32 square, keeping its aspect ratio.

    The longer side becomes ``size`` pixels, the image is centred on black (0) padding, so anatomy is
    never stretched. Bilinear, anti-aliased when shrinking (Pillow); clipped to [0, 1].
    """
    from PIL import Image  # noqa: PLC0415

    size = _check_size(size, "size")
    arr = _check_image(img)
    h, w = arr.shape
    scale = size / max(h, w)
    new_h, new_w = min(size, max(1, int(round(h * scale)))), min(size, max(1, int(round(w * scale))))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(np.ascontiguousarray(arr), mode="F")
        arr = np.asarray(pil.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.clip(arr, 0.0, 1.0)
    return out


def _crop_and_resize(img: np.ndarray, image_size: int, crop_roi: bool) -> np.ndarray:
    """A decoded slice (H, W) to a model input (S, S, 1): optional spine crop, then :func:`resize_with_pad`."""
    return resize_with_pad(crop_to_roi(img) if crop_roi else img, image_size)[..., np.newaxis]


def load_and_preprocess(
    path: str | os.PathLike, image_size: int, crop_roi: bool = False, max_pixels: int | None = None
) -> np.ndarray:
    """Read one image file as a model input ``(S, S, 1)`` float32 in [0, 1].

    :func:`cspine_utils.data.read_image` (any format the course reads; ``max_pixels`` guards against
    decompression bombs), the optional spine crop (:func:`crop_to_roi`), :func:`resize_with_pad`. Raises
    ``FileNotFoundError`` or ``data.ImageReadError`` naming the path, ``ValueError`` for a bad size.
    """
    from . import data  # noqa: PLC0415 - lazy: data.py pulls in pandas and pydicom

    image_size = _check_size(image_size, "image_size")
    img = data.read_image(path) if max_pixels is None else data.read_image(path, max_pixels=max_pixels)
    return _crop_and_resize(_check_image(img, name=str(path)), image_size, crop_roi)


# -- Augmentation (Keras preprocessing layers) ----------------------------------------------
def _affine_transforms(ops, angle, tx, ty, scale, flip, h, w):
    """(N, 8) projective transforms for ``ops.image.affine_transform``: flip, rotate, scale, shift.

    Each output pixel p reads the input at ``M (p - c - t) + c`` with ``M = Flip Rotation(-angle) / scale``,
    ``c`` the image centre and ``t = (tx, ty)`` the shift in pixels.
    """
    cos, sin = ops.cos(angle) / scale, ops.sin(angle) / scale
    m00, m01, m10, m11 = flip * cos, flip * sin, -sin, cos
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    ox, oy = cx + tx, cy + ty
    zeros = ops.zeros_like(angle)
    return ops.stack([m00, m01, cx - m00 * ox - m01 * oy, m10, m11, cy - m10 * ox - m11 * oy, zeros, zeros], axis=1)


@functools.cache
def _random_affine_class() -> type:
    """Build and register the :class:`RandomAffine` layer on first use (importing this module loads no Keras)."""
    import keras  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    @keras.saving.register_keras_serializable(package="cspine_utils")
    class RandomAffine(keras.layers.Layer):
        """Random rotation, shift, zoom and left-right flip as **one** warp: one interpolation, where chained
        Keras layers resample three times (three times the compute, a blur of hairline fractures). Per image:
        rotation +-``rotation`` degrees, shift +-``translation`` of the side, scale ``1 +- zoom``, left-right
        flip with probability 0.5 (never up-down); bilinear, ``fill_value`` outside (0 = air). Random only
        with ``training=True``; ``(B, H, W, C)`` or ``(H, W, C)``.
        """

        def __init__(
            self, rotation=8.0, translation=0.06, zoom=0.08, horizontal_flip=True, fill_value=0.0, seed=None, **kw
        ):
            super().__init__(**kw)
            for name, value, upper in zip(
                ("rotation", "translation", "zoom"), (rotation, translation, zoom), (180, 1, 0.9)
            ):
                if not np.isfinite(value) or not 0.0 <= float(value) <= upper:
                    raise ValueError(f"{name} must be in [0, {float(upper)}], got {value!r}")
            self.rotation, self.translation, self.zoom = float(rotation), float(translation), float(zoom)
            self.horizontal_flip, self.fill_value, self.seed = bool(horizontal_flip), float(fill_value), seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def _uniform(self, n, low: float, high: float):
            return keras.random.uniform((n,), minval=low, maxval=high, seed=self.seed_generator)

        def call(self, images, training: bool = True):
            if not training:
                return images
            unbatched = len(images.shape) == 3
            images = ops.expand_dims(images, 0) if unbatched else images
            shape = ops.shape(images)
            n, h, w = shape[0], ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
            angle = self._uniform(n, -self.rotation, self.rotation) * (np.pi / 180.0)
            tx = self._uniform(n, -self.translation, self.translation) * w
            ty = self._uniform(n, -self.translation, self.translation) * h
            scale = self._uniform(n, 1.0 - self.zoom, 1.0 + self.zoom)
            flip = ops.where(self._uniform(n, 0.0, 1.0) < 0.5, -1.0, 1.0) if self.horizontal_flip else ops.ones((n,))
            transform = _affine_transforms(ops, angle, tx, ty, scale, flip, h, w)
            out = ops.image.affine_transform(images, transform, fill_value=self.fill_value, data_format="channels_last")
            return out[0] if unbatched else out

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self) -> dict:
            names = ("rotation", "translation", "zoom", "horizontal_flip", "fill_value", "seed")
            return {**super().get_config(), **{name: getattr(self, name) for name in names}}

    return RandomAffine


def __getattr__(name: str):
    """Create :class:`RandomAffine` on first access (keeps ``import`` free of Keras)."""
    if name == "RandomAffine":
        return _random_affine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def augmentation_layers(strength: float = 1.0, seed: int | None = None) -> keras.Sequential:
    """Random augmentations for axial CT slices, as a ``keras.Sequential`` (``(B, S, S, 1)`` in [0, 1]).

    At ``strength=1``: one :class:`RandomAffine` warp (rotation +-8 degrees, shift +-6 %, zoom +-8 %,
    left-right flip with probability 0.5; no vertical flip, anterior and posterior differ), then
    ``RandomContrast`` (x(1 +- 0.10) around the mean) and ``RandomBrightness`` (+-0.05). Ranges scale
    with ``strength`` in [0, 2] (``ValueError`` outside); 0 gives an identity model. Random only with
    ``training=True``. Layer ``i`` is seeded ``seed + i``. Outputs stay in [0, 1].
    """
    import keras  # noqa: PLC0415

    strength = float(strength)
    if not np.isfinite(strength) or not 0.0 <= strength <= 2.0:
        raise ValueError(f"strength must be in [0, 2], got {strength!r}")
    if strength == 0.0:
        return keras.Sequential([keras.layers.Identity()], name="augmentation_identity")
    seeds, unit = [None if seed is None else int(seed) + i for i in range(3)], (0.0, 1.0)
    ranges = {"rotation": _MAX_ROTATION_DEG, "translation": _MAX_TRANSLATION, "zoom": _MAX_ZOOM}
    affine = _random_affine_class()(**{k: strength * v for k, v in ranges.items()}, seed=seeds[0], name="random_affine")
    contrast = keras.layers.RandomContrast(strength * _MAX_CONTRAST, unit, seed=seeds[1], name="random_contrast")
    bright = keras.layers.RandomBrightness(strength * _MAX_BRIGHTNESS, unit, seed=seeds[2], name="random_brightness")
    return keras.Sequential([affine, contrast, bright], name="augmentation")


# -- Datasets --------------------------------------------------------------------------------
# PNG (bit depth, colour type) that TensorFlow decodes to exactly data.read_image's values: 8-bit and
# 16-bit grey, 8-bit RGB and RGBA (luminance times alpha). Everything else (JPEG, DICOM, palette,
# grey + alpha, transparency chunks, damaged files) goes to data.read_image, reader 0.
_TF_PNG = {(8, 0): 1, (16, 0): 2, (8, 2): 3, (8, 6): 3}


def _png_reader(path: str) -> int:
    """Which reader decodes ``path``: 1-3 (TensorFlow, ``_TF_PNG``) for a sound PNG, else 0 (PIL). Each chunk's
    CRC and the final IEND are checked: a damaged file goes to ``data.read_image``, whose error names it."""
    from . import data  # noqa: PLC0415

    if Path(path).suffix.lower() in data.DICOM_EXTENSIONS:
        return 0
    try:
        with open(path, "rb") as f:  # a non-PNG (JPEG, DICOM, ...) is not read past its first 8 bytes
            blob = f.read(8)
            blob += f.read() if blob == b"\x89PNG\r\n\x1a\n" else b""
    except OSError:
        return 0
    if not blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return 0
    pos, reader = 8, 0
    while pos + 12 <= len(blob):
        length, kind = struct.unpack(">I4s", blob[pos : pos + 8])
        end = pos + 12 + length
        if end > len(blob) or zlib.crc32(blob[pos + 4 : end - 4]) != struct.unpack(">I", blob[end - 4 : end])[0]:
            return 0
        if kind == b"IHDR" and length == 13:
            width, height, depth, colour = struct.unpack(">IIBB", blob[pos + 8 : pos + 18])
            reader = _TF_PNG.get((depth, colour), 0) if 0 < width * height <= data.DEFAULT_MAX_PIXELS else 0
        elif kind == b"tRNS" or pos == 8:  # transparency, or a first chunk that is not IHDR
            return 0
        elif kind == b"IEND":
            return reader
        pos = end
    return 0  # no IEND: truncated


def _decoder(image_size: int, crop_roi: bool):
    """The ``tf.data`` map function ``(path, reader, label) -> ((S, S, 1) image, label)``.

    Readers 1-3 decode with ``tf.io.decode_png`` (parallel, outside Python's lock) and scale exactly as
    ``data.read_image``; reader 0 is :func:`load_and_preprocess` itself. The crop and resize are the
    NumPy/Pillow ones of :func:`load_and_preprocess`, so the pixels are identical.
    """
    import tensorflow as tf  # noqa: PLC0415

    from . import data  # noqa: PLC0415

    luma = [float(v) for v in data._LUMA]

    def finish(img: np.ndarray) -> np.ndarray:
        return _crop_and_resize(img, image_size, crop_roi)

    def pil(path: bytes) -> np.ndarray:
        return load_and_preprocess(path.decode("utf-8"), image_size, crop_roi=crop_roi)

    def png(path: tf.Tensor, channels: int, dtype: tf.DType, full_scale: float) -> tf.Tensor:
        x = tf.cast(tf.io.decode_png(tf.io.read_file(path), channels=channels, dtype=dtype), tf.float32) / full_scale
        if channels == 4:  # BT.601 luminance times alpha, clipped, as data.read_image
            x = tf.clip_by_value((x[..., 0] * luma[0] + x[..., 1] * luma[1] + x[..., 2] * luma[2]) * x[..., 3], 0, 1)
        else:
            x = x[..., 0]
        return tf.numpy_function(finish, [x], tf.float32, stateful=False, name="crop_and_resize")

    def decode(path: tf.Tensor, reader: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        branches = [
            lambda: tf.numpy_function(pil, [path], tf.float32, stateful=False, name="load_and_preprocess"),
            lambda: png(path, 1, tf.uint8, 255.0),
            lambda: png(path, 1, tf.uint16, 65535.0),
            lambda: png(path, 4, tf.uint8, 255.0),
        ]
        image = tf.switch_case(reader, branches)
        return tf.ensure_shape(image, (image_size, image_size, 1)), label

    return decode


def _manifest_paths_labels(manifest: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Validate a manifest; return its paths (str) and integer labels (0/1)."""
    missing = [c for c in ("path", "label") if c not in getattr(manifest, "columns", ())]
    if missing:
        raise ValueError(f"manifest must be a DataFrame with columns 'path' and 'label'; missing {missing}")
    if len(manifest) == 0:
        raise ValueError("manifest is empty: no images to load")
    return [str(p) for p in manifest["path"]], label_to_int(manifest["label"].tolist())


def _cache_file(cache_dir: Path, paths: Sequence[str], image_size: int, crop_roi: bool) -> Path:
    """A cache file in ``cache_dir`` (created) keyed on the settings and each file's path, size and
    modification time: TensorFlow silently reuses a cache file whose name exists."""
    stamps = []
    for p in paths:
        try:
            st = os.stat(p)
            stamps.append(f"|{p}|{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            stamps.append(f"|{p}|missing")
    key = records.sha256_text(f"v2|{image_size}|{int(crop_roi)}", *stamps)[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"cspine_S{image_size}_{'roi' if crop_roi else 'full'}_{key}"


def make_dataset(
    manifest: pd.DataFrame,
    image_size: int,
    batch_size: int,
    training: bool,
    augment_strength: float = 1.0,
    crop_roi: bool = False,
    cache: bool | str | os.PathLike = True,
    seed: int = 0,
    shuffle: bool | None = None,
) -> tf.data.Dataset:
    """A ``tf.data`` pipeline over a manifest: decode -> cache -> shuffle -> batch -> augment -> prefetch.

    1. decode in parallel (``AUTOTUNE``, order kept): PNGs with ``tf.io.decode_png``, other formats with
       :func:`load_and_preprocess`; the same pixels either way;
    2. cache in memory (``cache=True``), in a file in the folder ``cache``, or not (``False``);
    3-6. :func:`shuffle_batch_augment`: shuffle (default: when ``training``), batch, augment (when
       ``training``, at ``augment_strength``), prefetch.

    ``manifest`` needs ``path`` and ``label``. Elements: images float32 ``(B, S, S, 1)`` in [0, 1],
    labels float32 ``(B,)``. The same ``seed`` gives the same batches, augmented ones too, in every run.
    ``ValueError`` for a bad manifest, label or size; an unreadable file stops iteration naming it.
    """
    import tensorflow as tf  # noqa: PLC0415

    image_size, batch_size = _check_size(image_size, "image_size"), _check_size(batch_size, "batch_size")
    paths, labels = _manifest_paths_labels(manifest)
    augment_strength = float(augment_strength)
    if not np.isfinite(augment_strength) or not 0.0 <= augment_strength <= 2.0:
        raise ValueError(f"augment_strength must be in [0, 2], got {augment_strength!r}")
    readers = np.array([_png_reader(p) for p in paths], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, readers, labels.astype(np.float32)))
    ds = ds.map(_decoder(image_size, crop_roi), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache not in (False, None):
        ds = ds.cache() if cache is True else ds.cache(str(_cache_file(Path(cache), paths, image_size, crop_roi)))
    do_shuffle = bool(training) if shuffle is None else bool(shuffle)
    strength = augment_strength if training else 0.0
    return shuffle_batch_augment(ds, len(paths), batch_size, shuffle=do_shuffle, augment_strength=strength, seed=seed)


def shuffle_batch_augment(
    ds: tf.data.Dataset, n: int, batch_size: int, *, shuffle: bool, augment_strength: float = 0.0, seed: int = 0
) -> tf.data.Dataset:
    """Steps 3-6 of :func:`make_dataset` on single ``(image, label)`` pairs: shuffle (a buffer of ``n``,
    reshuffled each epoch, seeded), batch (last batch kept), augment (:func:`augmentation_layers`; none at
    0) one batch at a time, so the seeded draws meet the batches in the same order in every run; prefetch.
    """
    import tensorflow as tf  # noqa: PLC0415

    if shuffle:
        ds = ds.shuffle(int(n), seed=int(seed), reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size), drop_remainder=False)
    if augment_strength > 0:
        augment = augmentation_layers(augment_strength, seed=int(seed))
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=None)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_arrays(
    manifest: pd.DataFrame,
    image_size: int,
    crop_roi: bool = False,
    errors: Literal["warn", "raise"] = "warn",
    return_skipped: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """A small manifest as NumPy arrays ``X`` (N, S, S, 1) float32 and ``y`` (N,) int64, as :func:`make_dataset`.

    Unreadable files (``data.ImageReadError``, ``FileNotFoundError``) are skipped, kept rows stay in
    manifest order, and with ``errors="warn"`` one ``UserWarning`` names every skipped path and why;
    ``errors="raise"`` re-raises the first. ``return_skipped=True`` also returns ``[(path, reason), ...]``.
    """
    from . import data  # noqa: PLC0415

    if errors not in ("warn", "raise"):
        raise ValueError(f"errors must be 'warn' or 'raise', got {errors!r}")
    paths, labels = _manifest_paths_labels(manifest)
    size = _check_size(image_size, "image_size")
    images, kept, skipped = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_and_preprocess(path, size, crop_roi=crop_roi))
            kept.append(i)
        except (data.ImageReadError, FileNotFoundError) as exc:
            if errors == "raise":
                raise
            skipped.append((path, str(exc)))
    if skipped and errors == "warn":
        lines = "\n".join(f"  {why}" if p in why else f"  {p}: {why}" for p, why in skipped)
        warnings.warn(f"load_arrays skipped {len(skipped)} unreadable file(s):\n{lines}", UserWarning, stacklevel=2)
    X = np.stack(images) if images else np.zeros((0, size, size, 1), dtype=np.float32)
    return (X, labels[kept], skipped) if return_skipped else (X, labels[kept])
