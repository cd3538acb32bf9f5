"""From a manifest to batches the model can eat: preprocessing, augmentation and ``tf.data``.

Data flows one way (see the course conventions)::

    manifest (path, label, group, split)
        -> load_and_preprocess   read, optional spine crop, resize with zero padding
        -> make_dataset          tf.data: parallel decode -> cache -> shuffle -> batch
                                 -> augment (Keras layers, training only) -> prefetch
        -> model.fit(...)

Training, evaluation and inference (the GUI, Grad-CAM, a single file on the command line) all
go through :func:`load_and_preprocess`, so an image is preprocessed the same way wherever it is
seen. :func:`load_arrays` is the small-set NumPy version of the same thing.

Conventions used throughout:

* an image is a ``float32`` array in ``[0, 1]`` (the bone-window grey level, 0 = black);
* a model input is ``(S, S, 1)`` with ``S`` the profile's ``image_size`` in pixels;
* labels are ``0`` = normal, ``1`` = fracture (:data:`CLASS_NAMES` maps them back).

TensorFlow and Keras are imported inside the functions that need them, so importing this
module costs nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import pandas as pd
    import tensorflow as tf

__all__ = [
    "CLASS_NAMES",
    "BONE_THRESHOLD",
    "label_to_int",
    "roi_bbox",
    "crop_to_roi",
    "resize_with_pad",
    "load_and_preprocess",
    "RandomAffine",  # noqa: F822 (created lazily by __getattr__)
    "augmentation_layers",
    "make_dataset",
    "shuffle_batch_augment",
    "load_arrays",
]

#: Class names in label order: ``CLASS_NAMES[1] == "fracture"`` is the positive class.
CLASS_NAMES: tuple[str, str] = ("normal", "fracture")

#: Grey level (bone window, ``[0, 1]``) above which a smoothed pixel counts as dense bone.
#: In the phantom's window (level 400, width 1800 HU) 0.55 is about 490 HU, in the DICOM bone
#: window of :func:`cspine_utils.data.read_image` (level 500, width 2000 HU) about 600 HU:
#: cortical bone (> 1000 HU), not muscle (~50 HU) nor cancellous bone (~250 HU).
BONE_THRESHOLD: float = 0.55

# Augmentation ranges at strength 1 (see :func:`augmentation_layers`).
_MAX_ROTATION_DEG = 8.0
_MAX_TRANSLATION = 0.06  # fraction of the image side
_MAX_ZOOM = 0.08  # fraction of the image side
_MAX_CONTRAST = 0.10  # contrast factor range 1 +- this
_MAX_BRIGHTNESS = 0.05  # added grey level, fraction of the [0, 1] range


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def label_to_int(labels: Sequence[str] | pd.Series) -> np.ndarray:
    """Map label names to integers: ``"normal"`` -> 0, ``"fracture"`` -> 1.

    Parameters
    ----------
    labels : sequence of str, length N
        Label names as in a manifest's ``label`` column (case and surrounding spaces ignored).

    Returns
    -------
    numpy.ndarray, shape (N,), int64

    Raises
    ------
    ValueError
        If a label is not one of :data:`CLASS_NAMES` (the first offending value is named).
    """
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        key = str(label).strip().lower()
        if key not in index:
            raise ValueError(f"unknown label {label!r} in row {i}; expected one of {', '.join(CLASS_NAMES)}")
        out[i] = index[key]
    return out


# --------------------------------------------------------------------------------------------
# Single images (NumPy)
# --------------------------------------------------------------------------------------------
def _check_image(img: np.ndarray, name: str = "img") -> np.ndarray:
    """Return ``img`` as a 2-D float32 array; accept ``(H, W)`` or ``(H, W, 1)``."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (H, W) or (H, W, 1) array, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def roi_bbox(
    img: np.ndarray,
    margin: float = 0.08,
    threshold: float = BONE_THRESHOLD,
    smooth_sigma: float | None = None,
) -> tuple[int, int, int, int]:
    """Bounding box of the spine: the largest dense-bone region, plus a margin.

    1. Light Gaussian smoothing (removes quantum noise without erasing the thin cortex).
    2. Threshold at ``threshold``: dense (cortical) bone.
    3. Bridge small gaps - a dilation by 2 % of the image side, on a coarse grid of about
       128 x 128 cells for speed - so the pieces of one vertebra (body, pedicles, laminae,
       spinous process, fracture fragments) form one region, then fill its holes (spinal
       canal, cancellous body).
    4. Keep the largest connected region. On an axial slice of the neck that is the vertebra
       with its enclosed canal, not the hole-free mandible arc nor noise specks.
    5. The box of the bone pixels in that region, widened by ``margin`` on every side and
       clipped to the image.

    Parameters
    ----------
    img : numpy.ndarray, shape (H, W) or (H, W, 1), float in [0, 1]
        A bone-window slice.
    margin : float, default 0.08
        Added on each side, as a fraction of the image height (rows) and width (columns).
    threshold : float, default :data:`BONE_THRESHOLD`
        Grey level above which a smoothed pixel is bone.
    smooth_sigma : float, optional
        Gaussian smoothing in pixels; default ``max(0.5, min(H, W) / 512)``.

    Returns
    -------
    (top, left, bottom, right) : tuple of int
        Pixel indices, ``bottom`` and ``right`` exclusive, so ``img[top:bottom, left:right]`` is
        the region. If no pixel passes the threshold, the full image ``(0, 0, H, W)``.

    Raises
    ------
    ValueError
        If ``img`` is not a 2-D image or ``margin`` is negative.
    """
    from scipy import ndimage  # noqa: PLC0415 - keep import time low

    arr = _check_image(img)
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a non-negative fraction of the image size, got {margin!r}")
    h, w = arr.shape
    side = min(h, w)
    sigma = max(0.5, side / 512.0) if smooth_sigma is None else float(smooth_sigma)
    smooth = ndimage.gaussian_filter(arr, sigma=sigma) if sigma > 0 else arr
    bone = smooth > threshold
    if not bone.any():
        return 0, 0, h, w
    # Find the regions on a grid of ~128 cells per side (any bone in a cell marks it): the
    # same answer as at full resolution for a structure the size of a vertebra, ~20x faster.
    f = max(1, side // 128)
    padded = np.pad(bone, ((0, -h % f), (0, -w % f)))
    coarse = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f).any(axis=(1, 3))
    radius = max(1, int(round(0.02 * side / f)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    regions = ndimage.binary_fill_holes(ndimage.binary_dilation(coarse, structure=(yy**2 + xx**2) <= radius**2))
    labels, _ = ndimage.label(regions)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    largest = labels == int(np.argmax(sizes))
    largest = np.repeat(np.repeat(largest, f, axis=0), f, axis=1)[:h, :w]
    rows, cols = np.nonzero(largest & bone)
    dy, dx = int(round(margin * h)), int(round(margin * w))
    top = max(0, int(rows.min()) - dy)
    left = max(0, int(cols.min()) - dx)
    bottom = min(h, int(rows.max()) + 1 + dy)
    right = min(w, int(cols.max()) + 1 + dx)
    return top, left, bottom, right


def crop_to_roi(img: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """Crop a slice to :func:`roi_bbox` (the spine plus ``margin``).

    Parameters
    ----------
    img : numpy.ndarray, shape (H, W), float in [0, 1]

    Returns
    -------
    numpy.ndarray, shape (h, w), float32
        The region; the full image when no bone is found.
    """
    arr = _check_image(img)
    top, left, bottom, right = roi_bbox(arr, margin=margin)
    return arr[top:bottom, left:right]


def resize_with_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to fit a ``size`` x ``size`` square, keeping the aspect ratio; pad with zeros.

    The longer side becomes ``size`` pixels; the shorter one is scaled by the same factor and
    the image is centred with black (0) borders, so anatomy is never stretched. Resampling is
    bilinear with anti-aliasing when shrinking (Pillow), and the result is clipped to [0, 1].

    Parameters
    ----------
    img : numpy.ndarray, shape (H, W) or (H, W, 1), float in [0, 1]
    size : int
        Side of the output square, pixels (>= 1).

    Returns
    -------
    numpy.ndarray, shape (size, size), float32 in [0, 1]

    Raises
    ------
    ValueError
        If ``size`` is not a positive integer or ``img`` is not a 2-D image.
    """
    from PIL import Image  # noqa: PLC0415

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer (pixels), got {size!r}")
    size = int(size)
    arr = _check_image(img)
    h, w = arr.shape
    scale = size / max(h, w)
    new_h = min(size, max(1, int(round(h * scale))))
    new_w = min(size, max(1, int(round(w * scale))))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(np.ascontiguousarray(arr), mode="F")
        arr = np.asarray(pil.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.clip(arr, 0.0, 1.0)
    return out


def load_and_preprocess(
    path: str | os.PathLike,
    image_size: int,
    crop_roi: bool = False,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read one image file and turn it into a model input.

    Reading (any format the course supports: PNG, JPEG, BMP, TIFF, 16-bit, RGBA, DICOM) is done
    by :func:`cspine_utils.data.read_image`; then the optional spine crop
    (:func:`crop_to_roi`) and :func:`resize_with_pad`. Every path into a model - training,
    evaluation, the GUI, Grad-CAM - uses this function.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    image_size : int
        Side ``S`` of the square output, pixels.
    crop_roi : bool, default False
        Crop to the spine (largest dense-bone region, 8 % margin) before resizing.
    max_pixels : int, optional
        Refuse larger images (decompression-bomb guard); default that of
        :func:`cspine_utils.data.read_image`.

    Returns
    -------
    numpy.ndarray, shape (S, S, 1), float32 in [0, 1]

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    cspine_utils.data.ImageReadError
        (a ``ValueError``) if the file is empty, truncated, not an image or too large; the
        message names the path.
    ValueError
        If ``image_size`` is not a positive integer.
    """
    from . import data  # noqa: PLC0415 - lazy: data.py pulls in pandas and pydicom

    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    img = data.read_image(path) if max_pixels is None else data.read_image(path, max_pixels=max_pixels)
    img = _check_image(img, name=str(path))
    if crop_roi:
        img = crop_to_roi(img)
    return resize_with_pad(img, int(image_size))[..., np.newaxis]


# --------------------------------------------------------------------------------------------
# Augmentation (Keras preprocessing layers)
# --------------------------------------------------------------------------------------------
@functools.cache
def _random_affine_class() -> type:
    """Build (once) and register the :class:`RandomAffine` layer class.

    The class is created on first use so that importing this module does not import Keras.
    """
    import keras  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    @keras.saving.register_keras_serializable(package="cspine_utils")
    class RandomAffine(keras.layers.Layer):
        """Random rotation, translation, zoom and left-right flip as **one** affine warp.

        Keras' ``RandomRotation``, ``RandomTranslation`` and ``RandomZoom`` each resample the
        image; chained, that is three interpolations - three times the compute and a visible
        blur of thin structures such as a hairline fracture. This layer draws rotation, shift,
        zoom and flip per image, composes them into a single matrix and resamples once
        (``keras.ops.image.affine_transform``, bilinear, black fill). Flips are left-right
        only: anterior and posterior are never swapped.

        Parameters
        ----------
        rotation : float
            Maximum rotation, degrees (uniform in ``[-rotation, rotation]``).
        translation : float
            Maximum shift, fraction of the image width (x) and height (y).
        zoom : float
            Maximum zoom in or out, fraction (scale uniform in ``[1 - zoom, 1 + zoom]``).
        horizontal_flip : bool
            Flip left-right with probability 0.5.
        fill_value : float
            Grey level of pixels moved in from outside the image (0 = air).
        seed : int, optional
            Seed of the layer's random generator.

        Input and output: ``(B, H, W, C)`` or ``(H, W, C)`` float images (channels last).
        Random only with ``training=True``; otherwise the input is returned unchanged.
        """

        def __init__(
            self,
            rotation: float = 8.0,
            translation: float = 0.06,
            zoom: float = 0.08,
            horizontal_flip: bool = True,
            fill_value: float = 0.0,
            seed: int | None = None,
            **kwargs,
        ):
            super().__init__(**kwargs)
            for name, value, upper in (
                ("rotation", rotation, 180.0),
                ("translation", translation, 1.0),
                ("zoom", zoom, 0.9),
            ):
                if not np.isfinite(value) or not 0.0 <= float(value) <= upper:
                    raise ValueError(f"{name} must be in [0, {upper}], got {value!r}")
            self.rotation = float(rotation)
            self.translation = float(translation)
            self.zoom = float(zoom)
            self.horizontal_flip = bool(horizontal_flip)
            self.fill_value = float(fill_value)
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)
            self.supports_masking = False

        def _uniform(self, n, low: float, high: float):
            return keras.random.uniform((n,), minval=low, maxval=high, seed=self.seed_generator)

        def call(self, images, training: bool = True):
            if not training:
                return images
            unbatched = len(images.shape) == 3
            if unbatched:
                images = ops.expand_dims(images, 0)
            shape = ops.shape(images)
            n = shape[0]
            h = ops.cast(shape[1], "float32")
            w = ops.cast(shape[2], "float32")
            angle = self._uniform(n, -self.rotation, self.rotation) * (np.pi / 180.0)
            tx = self._uniform(n, -self.translation, self.translation) * w
            ty = self._uniform(n, -self.translation, self.translation) * h
            scale = self._uniform(n, 1.0 - self.zoom, 1.0 + self.zoom)
            if self.horizontal_flip:
                flip = ops.where(self._uniform(n, 0.0, 1.0) < 0.5, -1.0, 1.0)
            else:
                flip = ops.ones((n,), dtype="float32")
            # The warp maps each *output* pixel p to an input position:
            #   p_in = M (p - c - t) + c,  M = (1 / scale) * Flip * Rotation(-angle),
            # with c the image centre and t the shift, i.e. the content is flipped, rotated,
            # scaled by `scale` and moved by t.
            cos, sin = ops.cos(angle) / scale, ops.sin(angle) / scale
            m00, m01, m10, m11 = flip * cos, flip * sin, -sin, cos
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            ox, oy = cx + tx, cy + ty
            zeros = ops.zeros_like(angle)
            transform = ops.stack(
                [m00, m01, cx - m00 * ox - m01 * oy, m10, m11, cy - m10 * ox - m11 * oy, zeros, zeros], axis=1
            )
            out = ops.image.affine_transform(
                images,
                transform,
                interpolation="bilinear",
                fill_mode="constant",
                fill_value=self.fill_value,
                data_format="channels_last",
            )
            return out[0] if unbatched else out

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self) -> dict:
            config = super().get_config()
            config.update(
                rotation=self.rotation,
                translation=self.translation,
                zoom=self.zoom,
                horizontal_flip=self.horizontal_flip,
                fill_value=self.fill_value,
                seed=self.seed,
            )
            return config

    return RandomAffine


def __getattr__(name: str):
    """Create :class:`RandomAffine` on first access (keeps ``import`` free of Keras)."""
    if name == "RandomAffine":
        return _random_affine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def augmentation_layers(strength: float = 1.0, seed: int | None = None) -> keras.Sequential:
    """Random augmentations suited to axial CT slices, as a ``keras.Sequential``.

    At ``strength=1``:

    ==================  =========================================  ===================
    transform           range                                      layer
    ==================  =========================================  ===================
    rotation            +-8 degrees                                :class:`RandomAffine`
    translation         +-6 % of the width / height                :class:`RandomAffine`
    zoom                in or out by up to 8 %                     :class:`RandomAffine`
    left-right flip     probability 0.5                            :class:`RandomAffine`
    contrast            x(1 +- 0.10) around the image mean         ``keras.layers.RandomContrast``
    brightness          +-0.05 grey level                          ``keras.layers.RandomBrightness``
    ==================  =========================================  ===================

    There is deliberately **no vertical flip**: anterior (airway) and posterior (spinous
    process) are not interchangeable, while the neck is close to left-right symmetric. The
    geometric part is a single warp (:class:`RandomAffine`, black fill = air) rather than
    Keras' ``RandomRotation`` + ``RandomTranslation`` + ``RandomZoom`` + ``RandomFlip``: one
    interpolation instead of three, so thin fracture lines stay sharp and it runs ~3x faster.
    All ranges scale linearly with ``strength`` (the flip stays at probability 0.5 for any
    ``strength > 0``); ``strength=0`` gives an identity model. Output values stay in [0, 1].

    The layers are random only when called with ``training=True`` (``model.fit`` does this;
    :func:`make_dataset` calls them so). Use them in a ``tf.data`` map (TensorFlow backend) or
    as the first block of a model. Input and output: ``(B, S, S, 1)`` or ``(S, S, 1)`` float32
    in [0, 1]. To load a saved model that contains them, access ``pipeline.RandomAffine`` (or
    call this function) first, which registers the layer with Keras.

    Parameters
    ----------
    strength : float, default 1.0
        Scale of all ranges, in [0, 2].
    seed : int, optional
        Base seed; layer ``i`` gets ``seed + i`` so their draws are independent.

    Returns
    -------
    keras.Sequential

    Raises
    ------
    ValueError
        If ``strength`` is outside [0, 2].
    """
    import keras  # noqa: PLC0415

    strength = float(strength)
    if not np.isfinite(strength) or not 0.0 <= strength <= 2.0:
        raise ValueError(f"strength must be in [0, 2], got {strength!r}")
    if strength == 0.0:
        return keras.Sequential([keras.layers.Identity()], name="augmentation_identity")

    def layer_seed(i: int) -> int | None:
        return None if seed is None else int(seed) + i

    random_affine = _random_affine_class()
    layers = [
        random_affine(
            rotation=strength * _MAX_ROTATION_DEG,
            translation=strength * _MAX_TRANSLATION,
            zoom=strength * _MAX_ZOOM,
            horizontal_flip=True,
            fill_value=0.0,
            seed=layer_seed(0),
            name="random_affine",
        ),
        keras.layers.RandomContrast(
            strength * _MAX_CONTRAST, value_range=(0.0, 1.0), seed=layer_seed(1), name="random_contrast"
        ),
        keras.layers.RandomBrightness(
            strength * _MAX_BRIGHTNESS, value_range=(0.0, 1.0), seed=layer_seed(2), name="random_brightness"
        ),
    ]
    return keras.Sequential(layers, name="augmentation")


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def _manifest_paths_labels(manifest: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Validate a manifest; return its paths (str) and integer labels (0/1)."""
    missing = [c for c in ("path", "label") if c not in getattr(manifest, "columns", ())]
    if missing:
        raise ValueError(f"manifest must be a DataFrame with columns 'path' and 'label'; missing {missing}")
    if len(manifest) == 0:
        raise ValueError("manifest is empty: no images to load")
    paths = [str(p) for p in manifest["path"]]
    return paths, label_to_int(manifest["label"].tolist())


def _cache_file(cache_dir: Path, paths: Sequence[str], image_size: int, crop_roi: bool) -> Path:
    """A cache file name that changes whenever the files, their contents' stamps or settings do.

    TensorFlow's file cache is silently reused if its name exists; keying it on the inputs
    avoids training on stale images after the data (or ``image_size``) changed.
    """
    h = hashlib.sha1(f"v1|{image_size}|{int(crop_roi)}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"|{p}|{stamp}".encode())
    return cache_dir / f"cspine_S{image_size}_{'roi' if crop_roi else 'full'}_{h.hexdigest()[:16]}"


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
    """A ``tf.data`` pipeline over a manifest: decode -> cache -> shuffle -> batch -> augment.

    Steps:

    1. **decode** - :func:`load_and_preprocess` on each file, in parallel
       (``tf.numpy_function``, ``num_parallel_calls=AUTOTUNE``, order kept), so every file format
       is handled exactly as at inference time;
    2. **cache** - the preprocessed images, in memory (``cache=True``) or in a file under the
       folder ``cache`` (its name is keyed on the files and settings); the first epoch pays for
       decoding, later epochs read the cache;
    3. **shuffle** (``shuffle``, default: when ``training``) - a full-size buffer, reshuffled
       every epoch, seeded by ``seed``;
    4. **batch**; the last, smaller batch is kept;
    5. **augment** (``training`` and ``augment_strength > 0`` only) - the Keras layers of
       :func:`augmentation_layers` on whole batches (one vectorised call per batch, each image
       gets its own random transform), one batch at a time;
    6. **prefetch**.

    With ``training=False`` the dataset is deterministic and in manifest order. With the same
    ``seed`` the training stream is reproducible too: the same shuffle order and the same
    augmented images, epoch after epoch, in every run. That is why step 5 is not parallel: its
    seeded generator advances with each call, and parallel calls would take the draws in a
    different order in every run. It still runs ahead of training (prefetch) at several
    thousand images/s on 2 cores, far more than any model here consumes
    (``benchmarks/bench_input_pipeline.py``).

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``path`` (image file) and ``label`` (``"normal"`` / ``"fracture"``); other columns
        are ignored. Filter by ``split`` before calling.
    image_size : int
        Side ``S`` of the square images, pixels.
    batch_size : int
        Images per batch ``B``.
    training : bool
        Augment (and by default shuffle) when True.
    augment_strength : float, default 1.0
        Passed to :func:`augmentation_layers`; 0 disables augmentation.
    crop_roi : bool, default False
        Crop each slice to the spine first (:func:`roi_bbox`).
    cache : bool or path, default True
        ``True``: cache in memory; ``False``: decode every epoch; a folder: cache to a file in
        it (created if needed).
    seed : int, default 0
        Seed for the shuffle and the augmentation.
    shuffle : bool, optional
        Shuffle the order; default ``training``.

    Returns
    -------
    tf.data.Dataset
        Elements ``(images, labels)``: ``images`` float32 ``(B, S, S, 1)`` in [0, 1], ``labels``
        float32 ``(B,)`` with 1.0 = fracture.

    Raises
    ------
    ValueError
        If the manifest lacks ``path``/``label``, is empty or has an unknown label, or a size is
        not a positive integer. A file that cannot be read stops the iteration with a
        TensorFlow error that names the path (check a dataset first with ``load_arrays`` or the
        data audit).
    """
    import tensorflow as tf  # noqa: PLC0415

    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    image_size, batch_size, seed = int(image_size), int(batch_size), int(seed)
    paths, labels = _manifest_paths_labels(manifest)
    do_shuffle = bool(training) if shuffle is None else bool(shuffle)
    augment_strength = float(augment_strength)
    if not np.isfinite(augment_strength) or not 0.0 <= augment_strength <= 2.0:
        raise ValueError(f"augment_strength must be in [0, 2], got {augment_strength!r}")
    do_augment = bool(training) and augment_strength > 0.0

    def _load(path: bytes) -> np.ndarray:
        return load_and_preprocess(path.decode("utf-8"), image_size, crop_roi=crop_roi)

    def decode(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.numpy_function(_load, [path], tf.float32, stateful=False, name="load_and_preprocess")
        image = tf.ensure_shape(image, (image_size, image_size, 1))
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels.astype(np.float32)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is True:
        ds = ds.cache()
    elif cache not in (False, None):
        cache_dir = Path(cache)
        cache_dir.mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(_cache_file(cache_dir, paths, image_size, crop_roi)))
    return shuffle_batch_augment(
        ds,
        len(paths),
        batch_size,
        shuffle=do_shuffle,
        augment_strength=augment_strength if do_augment else 0.0,
        seed=seed,
    )


def shuffle_batch_augment(
    ds: tf.data.Dataset, n: int, batch_size: int, *, shuffle: bool, augment_strength: float = 0.0, seed: int = 0
) -> tf.data.Dataset:
    """Steps 3-6 of :func:`make_dataset` on a dataset of single ``(image, label)`` pairs:
    shuffle (a full buffer of ``n``, reshuffled each epoch, seeded), batch (the last, smaller
    batch kept), augment (:func:`augmentation_layers` at ``augment_strength``; none at 0) and
    prefetch. Also used for images already in memory (the tuner's fine-tuning trials).

    The augmentation runs one batch at a time, so that its seeded draws meet the batches in the
    same order in every run; prefetch still overlaps it with training.
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
    """Load a small manifest into NumPy arrays (same preprocessing as :func:`make_dataset`).

    Files that cannot be read (:class:`cspine_utils.data.ImageReadError`, or
    ``FileNotFoundError`` for a file that has gone) are **skipped**, and with ``errors="warn"``
    one ``UserWarning`` names every skipped path and the reason; the kept rows stay in manifest
    order. Use ``return_skipped=True`` to get the list too.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``path`` and ``label`` (``"normal"`` / ``"fracture"``).
    image_size : int
        Side ``S`` of the square images, pixels.
    crop_roi : bool, default False
        Crop each slice to the spine first.
    errors : {"warn", "raise"}, default "warn"
        ``"warn"``: skip unreadable files and warn; ``"raise"``: re-raise the first error.
    return_skipped : bool, default False
        Also return the skipped files as ``[(path, reason), ...]``.

    Returns
    -------
    X : numpy.ndarray, shape (N, S, S, 1), float32 in [0, 1]
        N = number of readable files.
    y : numpy.ndarray, shape (N,), int64
        0 = normal, 1 = fracture.
    skipped : list of (str, str), only if ``return_skipped``

    Raises
    ------
    ValueError
        If the manifest is malformed or ``errors`` is not "warn"/"raise";
        ``ImageReadError`` / ``FileNotFoundError`` with ``errors="raise"``.
    """
    from . import data  # noqa: PLC0415

    if errors not in ("warn", "raise"):
        raise ValueError(f"errors must be 'warn' or 'raise', got {errors!r}")
    paths, labels = _manifest_paths_labels(manifest)
    images: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            images.append(load_and_preprocess(path, image_size, crop_roi=crop_roi))
        except (data.ImageReadError, FileNotFoundError) as exc:
            if errors == "raise":
                raise
            skipped.append((path, str(exc)))
            continue
        kept.append(i)
    if skipped and errors == "warn":
        lines = "\n".join(f"  {why}" if p in why else f"  {p}: {why}" for p, why in skipped)
        warnings.warn(f"load_arrays skipped {len(skipped)} unreadable file(s):\n{lines}", UserWarning, stacklevel=2)
    size = int(image_size)
    X = np.stack(images) if images else np.zeros((0, size, size, 1), dtype=np.float32)
    y = labels[kept]
    return (X, y, skipped) if return_skipped else (X, y)
