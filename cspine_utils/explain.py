"""Grad-CAM heatmaps, overlays, and a check of where they point against true fracture masks.

Overview
--------
:func:`gradcam`
    Gradient-weighted class activation maps (Selvaraju et al., 2017) for the class "fracture"
    of a Keras 3 model on the TensorFlow backend: the feature maps ``A_k`` of a convolutional
    layer are weighted by the spatial mean of the gradient of the fracture score,
    ``heat = ReLU(sum_k w_k A_k)``, upsampled to the input size and scaled to [0, 1].
:func:`gradcam_layer_name`
    Which layer to use: ``"block4_conv3"`` for the course's VGG16 classifier
    (:func:`cspine_utils.vggnet.build_vgg16_classifier`, whose head also reads block 4),
    ``"block5_conv3"`` for a plain VGG16 (flat or nested), ``"last_conv_relu"`` for
    :func:`cspine_utils.models.build_cnn`, else the last layer with a 4-D (image-like) output.
:func:`overlay`, :func:`plot_gradcam_gallery`
    Pictures: heatmap over the slice, the true fracture mask outlined.
:func:`pointing_game`, :func:`heat_in_mask`, :func:`localisation_scores`
    Does the heatmap point at the fracture? On the synthetic data the fracture mask is known,
    so this can be measured, with grouped-bootstrap CIs and the chance level beside it.
:func:`load_mask_like_input`
    The fracture mask transformed exactly like the image
    (:func:`cspine_utils.pipeline.load_and_preprocess`), so mask and heatmap align pixel for
    pixel.

A heatmap that looks plausible is not evidence that the model uses the fracture: always report
the localisation scores against their chance levels.

Keras and TensorFlow are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    from matplotlib.figure import Figure

__all__ = [
    "VGG_LAYER",
    "VGG_SKIP_LAYER",
    "CNN_LAYERS",
    "gradcam_layer_name",
    "gradcam",
    "overlay",
    "plot_gradcam_gallery",
    "default_pointing_tolerance",
    "pointing_game",
    "heat_in_mask",
    "localisation_scores",
    "load_mask_like_input",
]

#: Grad-CAM layer of a plain VGG16 (its last convolution, 1/16 of the input size).
VGG_LAYER = "block5_conv3"
#: Grad-CAM layer of the course's VGG16 classifier (1/8 of the input size). Its head pools block 4
#: (layer ``"block4_gap"``) as well as block 5, so part of the evidence never reaches
#: ``block5_conv3``: Grad-CAM there sees only the block-5 half. Everything the head uses flows
#: through ``block4_conv3`` (block 5 is computed from it), so that is the deepest honest choice.
VGG_SKIP_LAYER = "block4_conv3"
VGG_SKIP_TAP = "block4_gap"
#: Grad-CAM layers of :func:`cspine_utils.models.build_cnn`, in order of preference.
CNN_LAYERS: tuple[str, ...] = ("last_conv_relu", "last_conv")


# --------------------------------------------------------------------------------------------
# Which layer
# --------------------------------------------------------------------------------------------
def _is_model(layer: Any) -> bool:
    import keras  # noqa: PLC0415

    return isinstance(layer, keras.Model)


def _nested_with(model: keras.Model, name: str):
    """The nested model (direct child of ``model``) that holds a layer called ``name``, or None."""
    for layer in model.layers:
        if _is_model(layer) and name in {sub.name for sub in layer.layers}:
            return layer
    return None


def gradcam_layer_name(model: keras.Model) -> str:
    """The name of the layer whose feature maps Grad-CAM should use.

    In order: ``"block4_conv3"`` when the head also reads block 4 (a ``"block4_gap"`` layer, as
    in :func:`cspine_utils.vggnet.build_vgg16_classifier`; see :data:`VGG_SKIP_LAYER`),
    ``"block5_conv3"`` (a plain VGG16's last convolution; also found inside a nested VGG16
    model), ``"last_conv_relu"`` then ``"last_conv"`` (:func:`cspine_utils.models.build_cnn`),
    else the last top-level layer with a 4-D output ``(B, h, w, C)`` and ``h, w > 1``.

    Parameters
    ----------
    model : keras.Model

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If the model has no layer with image-like output.
    """
    names = {layer.name for layer in model.layers}
    if VGG_SKIP_TAP in names and VGG_SKIP_LAYER in names:
        return VGG_SKIP_LAYER
    if VGG_LAYER in names or _nested_with(model, VGG_LAYER) is not None:
        return VGG_LAYER
    for candidate in CNN_LAYERS:
        if candidate in names:
            return candidate
    import keras  # noqa: PLC0415

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer) or _is_model(layer):
            continue
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] or 2) > 1 and (shape[2] or 2) > 1:
            return layer.name
    raise ValueError(f"model {model.name!r} has no layer with a 4-D (image-like) output for Grad-CAM; pass layer_name=")


# --------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------
def _sigmoid_head(model: keras.Model):
    """The output ``Dense(..., activation="sigmoid")`` layer, if the model ends with one."""
    import keras  # noqa: PLC0415

    if len(model.outputs) != 1 or not model.layers:
        return None
    last = model.layers[-1]
    if (
        isinstance(last, keras.layers.Dense)
        and getattr(last.activation, "__name__", "") == "sigmoid"
        and last.output is model.outputs[0]
    ):
        return last
    return None


def _logit(head, h, class_index: int):
    """Pre-sigmoid score of ``head`` for features ``h``: ``h @ kernel + bias``."""
    import keras  # noqa: PLC0415

    z = keras.ops.matmul(keras.ops.cast(h, "float32"), keras.ops.cast(head.kernel, "float32"))
    if head.use_bias:
        z = z + keras.ops.cast(head.bias, "float32")
    return z[:, class_index]


def _output_score(y, class_index: int):
    import keras  # noqa: PLC0415

    y = keras.ops.reshape(keras.ops.cast(y, "float32"), (keras.ops.shape(y)[0], -1))
    return y[:, class_index]


def _gradcam_forward(model: keras.Model, layer_name: str, class_index: int):
    """A function ``x -> (feature maps, score)`` for one batch, differentiable with a tape."""
    import keras  # noqa: PLC0415

    head = _sigmoid_head(model)
    names = {layer.name for layer in model.layers}
    if layer_name in names:
        target = model.get_layer(layer_name).output
        last = head.input if head is not None else model.outputs[0]
        grad_model = keras.Model(model.inputs, [target, last], name=f"{model.name}_gradcam")

        def forward(x):
            conv, out = grad_model(x, training=False)
            score = _logit(head, out, class_index) if head is not None else _output_score(out, class_index)
            return conv, score

        return forward

    nested = _nested_with(model, layer_name)
    if nested is None:
        raise ValueError(
            f"model {model.name!r} has no layer {layer_name!r} (nor a nested model "
            f"holding one); layers: {[layer.name for layer in model.layers]}"
        )
    # Keras 3 cannot wire a nested model's inner layer to the outer inputs, so the outer model is
    # run layer by layer (a chain), with the nested model replaced by one that also returns the
    # inner feature maps.
    inner = keras.Model(
        nested.inputs, [nested.get_layer(layer_name).output, nested.outputs[0]], name=f"{nested.name}_gradcam"
    )
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]

    def forward(x):
        conv = None
        h = x
        for layer in chain:
            if layer is nested:
                conv, h = inner(h, training=False)
            elif layer is head:
                return conv, _logit(head, h, class_index)
            else:
                h = layer(h, training=False)
        return conv, _output_score(h, class_index)

    forward.chain_of = model  # marks that the chain must be checked against the model
    return forward


def _check_images(images: Any, model: keras.Model) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[np.newaxis]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (N, S, S, C) or (S, S, C), got {np.shape(images)}")
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) == 3 and any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(f"images have shape {x.shape[1:]} per image but the model expects {expected}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    return x


def gradcam(
    model: keras.Model,
    images: np.ndarray,
    layer_name: str | None = None,
    *,
    batch_size: int = 32,
    class_index: int = 0,
) -> np.ndarray:
    """Grad-CAM heatmaps of the fracture score, one per image, at the input resolution.

    For each image: the score ``s`` is the model's pre-sigmoid logit when it ends with
    ``Dense(..., activation="sigmoid")`` (both course models do; the logit's gradient does not
    vanish for confident predictions), else its output. With ``A_k`` the feature maps of
    ``layer_name``, ``w_k = mean_{i,j} ds/dA_k[i, j]`` and ``heat = ReLU(sum_k w_k A_k)``,
    resized bilinearly to ``(S, S)`` and divided by its maximum. An image with no positive
    evidence gets an all-zero heatmap.

    Works with the TensorFlow backend (``tf.GradientTape``); the model is run with
    ``training=False`` (dropout off, batch-norm statistics frozen).

    Parameters
    ----------
    model : keras.Model
        Input ``(B, S, S, C)``, output ``(B, 1)`` fracture probability.
    images : numpy.ndarray, shape (N, S, S, C) or (S, S, C), float in [0, 1]
        Preprocessed as for the model (``pipeline.load_and_preprocess``).
    layer_name : str, optional
        Default :func:`gradcam_layer_name`. A layer inside a nested model is reached by running
        the outer model as a chain of layers.
    batch_size : int, default 32
    class_index : int, default 0
        Output unit to explain.

    Returns
    -------
    numpy.ndarray, shape (N, S, S), float32 in [0, 1]

    Raises
    ------
    ValueError
        On an image shape that does not fit the model, or an unknown layer.
    RuntimeError
        If Keras does not run on the TensorFlow backend.
    """
    import keras  # noqa: PLC0415

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"gradcam needs the TensorFlow backend (tf.GradientTape); Keras uses "
            f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow"
        )
    import tensorflow as tf  # noqa: PLC0415

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = _check_images(images, model)
    name = layer_name or gradcam_layer_name(model)
    height, width = x.shape[1:3]
    forward, step = _cam_step(model, name, int(class_index), int(height), int(width))
    out = []
    for start in range(0, x.shape[0], int(batch_size)):
        xb = tf.convert_to_tensor(x[start : start + int(batch_size)])
        if getattr(forward, "chain_of", None) is not None and start == 0:
            _check_chain(forward, model, xb, class_index)
        cam = step(xb)
        out.append(np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32))
    return np.concatenate(out, axis=0)


# Compiled Grad-CAM steps per model (weak keys: a model that is deleted frees its entry). Building
# the gradient model and tracing the step costs far more than one image, so an app that explains
# one upload at a time reuses them.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cam_step(model: keras.Model, name: str, class_index: int, height: int, width: int):
    """``(forward, step)``: ``step(x) -> (B, height, width)`` heatmaps, built once per model/layer."""
    import tensorflow as tf  # noqa: PLC0415

    per_model = _STEPS.setdefault(model, {})
    key = (name, class_index, height, width)
    if key in per_model:
        return per_model[key]
    forward = _gradcam_forward(model, name, class_index)

    def cam_of(xb):
        with tf.GradientTape() as tape:
            conv, score = forward(xb)
            total = tf.reduce_sum(score)  # samples are independent: d total / d A_i = d s_i / d A_i
        grads = tape.gradient(total, conv)
        if grads is None:
            raise ValueError(
                f"the score does not depend on layer {name!r}; choose a layer on the path from the input to the output"
            )
        if len(conv.shape) != 4:
            raise ValueError(
                f"layer {name!r} has output shape {tuple(conv.shape)}; Grad-CAM needs feature maps (B, h, w, C)"
            )
        conv = tf.cast(conv, tf.float32)
        grads = tf.cast(grads, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1, keepdims=True))  # (B, h, w, 1)
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.where(peak > 0, cam / tf.where(peak > 0, peak, 1.0), 0.0)

    # the flat path compiles to one graph; the layer-by-layer chain (nested models) stays eager
    step = cam_of if getattr(forward, "chain_of", None) is not None else tf.function(cam_of, reduce_retracing=True)
    per_model[key] = (forward, step)
    return per_model[key]


def _check_chain(forward, model, xb, class_index: int) -> None:
    """A nested-model Grad-CAM runs the outer model as a chain; it must reproduce the model."""
    import keras  # noqa: PLC0415

    try:
        _, score = forward(xb)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a chain
        raise ValueError(
            f"model {model.name!r} is not a simple chain of layers, so Grad-CAM cannot "
            "reach inside its nested model; build the model flat (as "
            "vggnet.build_vgg16_classifier does)"
        ) from exc
    head = _sigmoid_head(model)
    y = model(xb, training=False)
    expected = _output_score(y, class_index)
    got = keras.ops.sigmoid(score) if head is not None else score
    if not np.allclose(np.asarray(got), np.asarray(expected), atol=1e-4):
        raise ValueError(
            f"running model {model.name!r} layer by layer does not reproduce its "
            "output (it is not a simple chain); build the model flat"
        )


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def _as_2d(arr: Any, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) or (H, W, 1) array, got shape {np.shape(arr)}")
    return a


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Colour a grayscale slice by its heatmap.

    Each pixel is ``(1 - alpha * h) * grey + alpha * h * colour(h)``: the colour is blended in
    proportion to the heat ``h``, so cold regions show the plain slice.

    Parameters
    ----------
    image : numpy.ndarray, shape (S, S) or (S, S, 1), float in [0, 1]
    heatmap : numpy.ndarray, shape (S, S), float in [0, 1]
    alpha : float, default 0.5
        Opacity of the colour at full heat, in [0, 1].
    cmap : str, default "jet"
        A Matplotlib colour map.

    Returns
    -------
    numpy.ndarray, shape (S, S, 3), float32 RGB in [0, 1]

    Raises
    ------
    ValueError
        If the shapes differ or ``alpha`` is outside [0, 1].
    """
    import matplotlib  # noqa: PLC0415

    img = np.clip(_as_2d(image, "image").astype(np.float32), 0.0, 1.0)
    heat = np.clip(_as_2d(heatmap, "heatmap").astype(np.float32), 0.0, 1.0)
    if img.shape != heat.shape:
        raise ValueError(f"image {img.shape} and heatmap {heat.shape} must have the same shape")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    colour = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    weight = (float(alpha) * heat)[..., np.newaxis]
    return np.clip((1.0 - weight) * img[..., np.newaxis] + weight * colour, 0.0, 1.0).astype(np.float32)


def _pyplot():
    from .plots import pyplot  # noqa: PLC0415 - one backend rule for every figure

    return pyplot()


def plot_gradcam_gallery(
    images: np.ndarray,
    heatmaps: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    titles: Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
    ncols: int = 4,
) -> Figure:
    """A grid of Grad-CAM overlays; the true fracture mask outlined, the heatmap peak marked.

    Parameters
    ----------
    images : numpy.ndarray, shape (N, S, S) or (N, S, S, 1), float in [0, 1]
    heatmaps : numpy.ndarray, shape (N, S, S), float in [0, 1]
    masks : array of shape (N, S, S) or list of (S, S) arrays / None, optional
        Fracture masks aligned with the images (:func:`load_mask_like_input`); drawn as a
        white outline where given and non-empty.
    titles : sequence of str, optional
    alpha : float, default 0.5
    ncols : int, default 4

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    imgs = np.asarray(images)
    heats = np.asarray(heatmaps)
    n = len(imgs)
    if n == 0 or len(heats) != n:
        raise ValueError(f"need as many heatmaps as images (at least one), got {len(heats)} and {n}")
    if masks is not None and len(masks) != n:
        raise ValueError(f"masks has {len(masks)} entries but there are {n} images")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries but there are {n} images")
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.8 * ncols, 2.9 * nrows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        heat = _as_2d(heats[k], "heatmap")
        ax.imshow(overlay(imgs[k], heat, alpha=alpha), interpolation="nearest")
        if masks is not None and masks[k] is not None:
            mask = _as_2d(masks[k], "mask").astype(bool)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="white", linewidths=1.0)
        if heat.max() > heat.min():
            r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
            ax.plot(c, r, marker="+", color="white", markersize=10, mew=1.5)
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
    fig.suptitle("Grad-CAM (fracture score); white outline: true fracture, +: heatmap peak", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Localisation against ground truth
# --------------------------------------------------------------------------------------------
def default_pointing_tolerance(size: int) -> int:
    """Pointing-game tolerance in pixels: 15 px at 224 px, scaled to ``size``.

    Zhang et al. (2018, "Top-down neural attention by excitation backprop") count a hit when
    the peak lies within 15 pixels of the object on 224-pixel images.
    """
    return max(0, int(round(15.0 * int(size) / 224.0)))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius**2


def _check_pair(heatmap: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    heat = _as_2d(heatmap, "heatmap").astype(np.float64)
    m = _as_2d(mask, "mask")
    if heat.shape != m.shape:
        raise ValueError(
            f"heatmap {heat.shape} and mask {m.shape} must have the same shape; load the mask with load_mask_like_input"
        )
    if not np.isfinite(heat).all() or heat.min() < 0:
        raise ValueError("heatmap must hold finite, non-negative values (Grad-CAM output)")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask is empty: localisation is only defined for fracture cases with a mask")
    return heat, m


def _dilate(mask: np.ndarray, dilate_px: int | None) -> np.ndarray:
    from scipy import ndimage  # noqa: PLC0415

    r = default_pointing_tolerance(max(mask.shape)) if dilate_px is None else dilate_px
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"dilate_px must be a non-negative integer (pixels) or None, got {dilate_px!r}")
    return ndimage.binary_dilation(mask, structure=_disk(int(r))) if r > 0 else mask


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, dilate_px: int | None = None) -> bool:
    """Is the heatmap's maximum inside the (dilated) fracture mask?

    The peak is the first maximum in row-major order. A flat heatmap (all values equal, e.g.
    all zero: no evidence anywhere) points nowhere and counts as a miss.

    Parameters
    ----------
    heatmap : numpy.ndarray, shape (S, S), non-negative
    mask : numpy.ndarray, shape (S, S), bool or 0/1
        True fracture pixels, aligned with the model input; must not be empty.
    dilate_px : int, optional
        Tolerance: the mask is dilated by a disk of this radius (pixels). Default
        :func:`default_pointing_tolerance` of the image size (15 px at 224 px, 4 px at 64 px).

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        On mismatched shapes, an empty mask, negative heat or a bad tolerance.
    """
    heat, m = _check_pair(heatmap, mask)
    if heat.max() <= heat.min():
        return False
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(_dilate(m, dilate_px)[r, c])


def heat_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the total heat that lies inside the fracture mask.

    ``sum(heat * mask) / sum(heat)``; a uniform heatmap scores the mask's area fraction (the
    chance level), a perfect one 1. ``NaN`` for an all-zero heatmap.

    Parameters
    ----------
    heatmap : numpy.ndarray, shape (S, S), non-negative
    mask : numpy.ndarray, shape (S, S), bool or 0/1, not empty

    Returns
    -------
    float
        In [0, 1], or NaN.
    """
    heat, m = _check_pair(heatmap, mask)
    total = float(heat.sum())
    return float(heat[m].sum() / total) if total > 0 else math.nan


def localisation_scores(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    groups: Iterable | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    alpha: float = 0.05,
    dilate_px: int | None = None,
) -> dict[str, Any]:
    """Pointing-game hit rate and mean heat-in-mask, with grouped-bootstrap CIs and chance levels.

    Use fracture cases only (every mask non-empty). Chance levels: a random peak hits with
    probability equal to the dilated mask's area fraction; a uniform heatmap puts the mask's
    area fraction of its heat inside the mask. Heatmaps that are all zero have no heat-in-mask
    value; they are left out of that mean (their count is ``n_no_heat``) but count as misses
    in the pointing game.

    Parameters
    ----------
    heatmaps : array of shape (N, S, S) or list of (S, S)
    masks : array of shape (N, S, S) or list of (S, S), bool
        From :func:`load_mask_like_input`.
    groups : array-like, shape (N,), optional
        Source groups (patients) for the cluster bootstrap; None: cases are independent.
    n_resamples : int, default 1000
    seed : int, default 0
    alpha : float, default 0.05
    dilate_px : int, optional
        Pointing-game tolerance (see :func:`pointing_game`).

    Returns
    -------
    dict
        ``n``, ``n_no_heat``, ``dilate_px``; ``pointing_game`` and ``heat_in_mask`` as
        ``{"value", "ci_low", "ci_high", "n_resamples", "n_skipped"}``; ``chance``
        (``pointing_game``, ``heat_in_mask``: mean area fractions); ``per_image``
        (``pointing_game``: list of bool, ``heat_in_mask``: list of float or None).
    """
    from . import evaluate  # noqa: PLC0415

    n = len(heatmaps)
    if n == 0 or len(masks) != n:
        raise ValueError(f"need as many masks as heatmaps (at least one), got {len(masks)} and {n}")
    g = None if groups is None else np.asarray(list(groups), dtype=object)
    if g is not None and g.size != n:
        raise ValueError(f"groups has {g.size} values but there are {n} heatmaps")
    hits, fractions, chance_hit, chance_heat = [], [], [], []
    tolerance = None
    for heat, mask in zip(heatmaps, masks):
        h, m = _check_pair(heat, mask)
        tolerance = default_pointing_tolerance(max(m.shape)) if dilate_px is None else dilate_px
        hits.append(pointing_game(h, m, tolerance))
        fractions.append(heat_in_mask(h, m))
        chance_hit.append(float(_dilate(m, tolerance).mean()))
        chance_heat.append(float(m.mean()))
    hits_arr = np.asarray(hits, dtype=float)
    frac_arr = np.asarray(fractions, dtype=float)
    has_heat = np.isfinite(frac_arr)
    pg = evaluate.bootstrap_mean_ci(hits_arr, g, n_resamples, seed, alpha)
    if has_heat.any():
        hm = evaluate.bootstrap_mean_ci(
            frac_arr[has_heat], None if g is None else g[has_heat], n_resamples, seed, alpha
        ).as_dict()
    else:
        hm = {
            "value": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "n_resamples": int(n_resamples),
            "n_skipped": int(n_resamples),
        }
    return {
        "n": n,
        "n_no_heat": int((~has_heat).sum()),
        "dilate_px": int(tolerance),
        "pointing_game": pg.as_dict(),
        "heat_in_mask": hm,
        "chance": {"pointing_game": float(np.mean(chance_hit)), "heat_in_mask": float(np.mean(chance_heat))},
        "per_image": {
            "pointing_game": [bool(v) for v in hits],
            "heat_in_mask": [None if not math.isfinite(v) else float(v) for v in fractions],
        },
    }


# --------------------------------------------------------------------------------------------
# Masks aligned with the model input
# --------------------------------------------------------------------------------------------
def load_mask_like_input(
    mask_path: str | os.PathLike,
    image_path: str | os.PathLike,
    image_size: int,
    crop_roi: bool = False,
    min_coverage: float = 0.5,
) -> np.ndarray:
    """A fracture mask transformed exactly like its image by ``pipeline.load_and_preprocess``.

    1. Read the mask (white = fracture) and the image at their original resolution; they must
       have the same shape.
    2. With ``crop_roi``: the crop box is computed **on the image**
       (:func:`cspine_utils.pipeline.roi_bbox`, the box :func:`cspine_utils.pipeline.crop_to_roi`
       uses) and applied to the mask.
    3. :func:`cspine_utils.pipeline.resize_with_pad` on the mask as a 0/1 float image: the same
       scale, offset and zero padding as the image. The result is the fraction of each output
       pixel covered by fracture; pixels with ``coverage >= min_coverage`` are the mask. A thin
       fracture line can cover less than ``min_coverage`` of every output pixel when the image
       is shrunk a lot; then the pixels it touches at all (``coverage > 0``) are returned, so a
       fracture never vanishes.

    Parameters
    ----------
    mask_path : str or PathLike
        The mask PNG (the manifest's ``mask_path``), same size as the image.
    image_path : str or PathLike
        The slice (the manifest's ``path``); needed for the crop box.
    image_size : int
        Side ``S`` of the model input, pixels.
    crop_roi : bool, default False
        As used for the model (``bundle.preprocessing["crop_roi"]``).
    min_coverage : float, default 0.5
        In (0, 1].

    Returns
    -------
    numpy.ndarray, shape (S, S), bool

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    ValueError
        If mask and image sizes differ, or an argument is invalid.
    """
    from . import data, pipeline  # noqa: PLC0415

    for label, path in (("mask", mask_path), ("image", image_path)):
        if path is None or str(path).strip() == "":
            raise ValueError(f"{label} path is empty (normal slices have no mask)")
    if not 0.0 < float(min_coverage) <= 1.0:
        raise ValueError(f"min_coverage must lie in (0, 1], got {min_coverage!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
    image = data.read_image(image_path)
    mask = data.read_image(mask_path) >= 0.5
    if mask.shape != image.shape:
        raise ValueError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} px but image "
            f"{image_path} is {image.shape[1]}x{image.shape[0]} px"
        )
    if crop_roi:
        top, left, bottom, right = pipeline.roi_bbox(image)
        mask = mask[top:bottom, left:right]
    coverage = pipeline.resize_with_pad(mask.astype(np.float32), int(image_size))
    out = coverage >= float(min_coverage) - 1e-6
    if not out.any() and mask.any():
        out = coverage > 0
    return out
