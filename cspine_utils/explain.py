"""Grad-CAM heatmaps (and HiResCAM, LayerCAM), overlays, and a check of where they point against the masks.

:func:`gradcam` (Selvaraju et al., 2017) weights the feature maps ``A_k`` of a convolutional layer
(:func:`gradcam_layer_name`) by the mean gradient of the fracture score: ``heat = ReLU(sum_k w_k A_k)``;
``method="hirescam"`` (Draelos and Carin, 2020) and ``"layercam"`` (Jiang et al., 2021) keep the gradient
per position, which can point at a thin structure inside one coarse cell.
On the phantom the fracture mask is known (:func:`load_mask_like_input` aligns it with the model
input), so :func:`pointing_game`, :func:`heat_in_mask` and :func:`localisation_scores` measure whether
the heatmap points at the fracture, against chance. A plausible-looking heatmap is not evidence.
Keras and TensorFlow are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    from matplotlib.figure import Figure

#: Grad-CAM layer of a plain VGG16 (its last convolution, 1/16 of the input size).
VGG_LAYER = "block5_conv3"
#: Grad-CAM layer of the course's VGG16 classifier (1/8 of the input size): its head also pools block 4
#: (``"block4_gap"``), so only ``block4_conv3`` carries all the evidence (block 5 is computed from it).
VGG_SKIP_LAYER = "block4_conv3"
VGG_SKIP_TAP = "block4_gap"
#: Grad-CAM layers of the course CNN (``cspine_utils.course.build_cnn``), in order of preference.
CNN_LAYERS: tuple[str, ...] = ("last_conv_relu", "last_conv")
#: Class-activation methods of :func:`gradcam`.
CAM_METHODS: tuple[str, ...] = ("gradcam", "hirescam", "layercam")


# --- Which layer ---
def _is_model(layer: Any) -> bool:
    import keras  # noqa: PLC0415

    return isinstance(layer, keras.Model)


def _nested_with(model: keras.Model, name: str):
    """The nested model (direct child of ``model``) holding a layer called ``name``, or None."""
    return next((layer for layer in model.layers if _is_model(layer) and name in {s.name for s in layer.layers}), None)


def gradcam_layer_name(model: keras.Model) -> str:
    """The layer whose feature maps Grad-CAM uses.

    ``"block4_conv3"`` when the head also reads block 4 (a ``"block4_gap"`` layer; see
    :data:`VGG_SKIP_LAYER`), else ``"block5_conv3"`` (a plain VGG16, also nested), else
    ``"last_conv_relu"``/``"last_conv"`` (the course CNN), else the last layer with a 4-D output
    ``(B, h, w, C)``, ``h, w > 1``; ``ValueError`` if there is none.
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


# --- Grad-CAM ---
def _sigmoid_head(model: keras.Model):
    """The output ``Dense(..., activation="sigmoid")`` layer, if the model ends with one."""
    import keras  # noqa: PLC0415

    last = model.layers[-1] if len(model.outputs) == 1 and model.layers else None
    is_head = isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "sigmoid"
    return last if is_head and last.output is model.outputs[0] else None


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
        names = [layer.name for layer in model.layers]
        raise ValueError(f"model {model.name!r} has no layer {layer_name!r} (nor a nested model holding one): {names}")
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
    method: str = "gradcam",
    batch_size: int = 32,
    class_index: int = 0,
) -> np.ndarray:
    """Grad-CAM heatmaps of the fracture score, shape (N, S, S) float32 in [0, 1], one per image.

    The score is the pre-sigmoid logit when the model ends with ``Dense(..., activation="sigmoid")``
    (its gradient does not vanish for confident predictions), else the output. With ``A_k`` the feature
    maps of ``layer_name`` (default :func:`gradcam_layer_name`; a layer inside a nested model is reached
    by running the outer model layer by layer) and ``g_k = ds/dA_k``, ``method`` (:data:`CAM_METHODS`) gives
    ``"gradcam"``: ``ReLU(sum_k mean_ij(g_k) A_k)``; ``"hirescam"``: ``ReLU(sum_k g_k * A_k)`` (the same
    when ``g_k`` is constant over positions); ``"layercam"``: ``ReLU(sum_k ReLU(g_k) * A_k)``. The map is
    resized bilinearly to the input and divided by its maximum (all zero: no evidence). ``images`` are
    (N, S, S, C) or (S, S, C) in [0, 1], preprocessed for the model; it runs with ``training=False`` on
    the TensorFlow backend (``RuntimeError`` otherwise; ``ValueError`` on a shape, layer or method that
    does not fit).
    """
    import keras  # noqa: PLC0415

    if (backend := keras.backend.backend()) != "tensorflow":
        raise RuntimeError(
            f"gradcam needs the TensorFlow backend; Keras uses {backend!r}: set KERAS_BACKEND=tensorflow"
        )
    import tensorflow as tf  # noqa: PLC0415

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if method not in CAM_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    x = _check_images(images, model)
    name = layer_name or gradcam_layer_name(model)
    height, width = x.shape[1:3]
    forward, step = _cam_step(model, name, method, int(class_index), int(height), int(width))
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


def _cam_step(model: keras.Model, name: str, method: str, class_index: int, height: int, width: int):
    """``(forward, step)``: ``step(x) -> (B, height, width)`` heatmaps, built once per model, layer and method."""
    import tensorflow as tf  # noqa: PLC0415

    per_model = _STEPS.setdefault(model, {})
    key = (name, method, class_index, height, width)
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
        if method == "gradcam":
            grads = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, C): one weight per map
        elif method == "layercam":
            grads = tf.nn.relu(grads)
        cam = tf.nn.relu(tf.reduce_sum(grads * conv, axis=-1, keepdims=True))  # (B, h, w, 1)
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.where(peak > 0, cam / tf.where(peak > 0, peak, 1.0), 0.0)

    # the flat path compiles to one graph; the layer-by-layer chain (nested models) stays eager
    # traced once here for every batch size (no retracing for the last, smaller batch, and no retracing
    # warning when several layers or methods are compared)
    spec = tf.TensorSpec((None, height, width, None), tf.float32)
    nested = getattr(forward, "chain_of", None) is not None
    step = cam_of if nested else tf.function(cam_of).get_concrete_function(spec)
    per_model[key] = (forward, step)
    return per_model[key]


def _check_chain(forward, model, xb, class_index: int) -> None:
    """A nested-model Grad-CAM runs the outer model as a chain; it must reproduce the model."""
    import keras  # noqa: PLC0415

    try:
        _, score = forward(xb)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a chain
        raise ValueError(f"model {model.name!r} is not a simple chain of layers: build it flat for Grad-CAM") from exc
    expected = _output_score(model(xb, training=False), class_index)
    got = keras.ops.sigmoid(score) if _sigmoid_head(model) is not None else score
    if not np.allclose(np.asarray(got), np.asarray(expected), atol=1e-4):
        raise ValueError(f"running model {model.name!r} layer by layer does not reproduce its output: build it flat")


# --- Pictures ---
def _as_2d(arr: Any, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) or (H, W, 1) array, got shape {np.shape(arr)}")
    return a


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """A slice (S, S) in [0, 1] coloured by its heatmap (S, S): RGB (S, S, 3) float32 in [0, 1].

    Each pixel is ``(1 - alpha h) grey + alpha h colour(h)``: cold regions show the plain slice.
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
    images: np.ndarray, heatmaps: np.ndarray, masks=None, titles: Sequence[str] | None = None, *, alpha=0.5, ncols=4
) -> Figure:
    """A grid of Grad-CAM overlays (:func:`overlay`): true fracture mask outlined, heatmap peak marked.

    ``images`` (N, S, S[, 1]), ``heatmaps`` (N, S, S), ``masks`` aligned fracture masks or None per image
    (:func:`load_mask_like_input`), ``titles`` one per image.
    """
    imgs, heats, n = np.asarray(images), np.asarray(heatmaps), len(images)
    if n == 0:
        raise ValueError("images is empty: nothing to show")
    for what, entries in (("heatmaps", heats), ("masks", masks), ("titles", titles)):
        if entries is not None and len(entries) != n:
            raise ValueError(f"{what} has {len(entries)} entries but there are {n} images")
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    fig, axes = _pyplot().subplots(nrows, ncols, figsize=(2.8 * ncols, 2.9 * nrows), squeeze=False)
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


# --- Localisation against ground truth ---
def default_pointing_tolerance(size: int) -> int:
    """Pointing-game tolerance in pixels: 15 px at 224 px (Zhang et al., 2018), scaled to ``size``."""
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
    """Is the heatmap's maximum inside the fracture mask dilated by ``dilate_px`` pixels?

    ``dilate_px`` defaults to :func:`default_pointing_tolerance` of the image size. A flat heatmap (no
    evidence anywhere) points nowhere: a miss. ``ValueError`` on mismatched shapes or an empty mask.
    """
    heat, m = _check_pair(heatmap, mask)
    if heat.max() <= heat.min():
        return False
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(_dilate(m, dilate_px)[r, c])


def heat_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heat inside the (non-empty) mask, ``sum(heat * mask) / sum(heat)``; NaN if all zero.

    A uniform heatmap scores the mask's area share (chance), a perfect one 1.
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
    """Pointing-game hit rate and mean heat-in-mask with grouped-bootstrap CIs and chance levels.

    For fracture cases (non-empty masks from :func:`load_mask_like_input`). Chance: a random peak hits
    with the dilated mask's area share; a uniform heatmap puts the mask's area share of its heat in the
    mask. All-zero heatmaps count as pointing-game misses and are left out of heat-in-mask
    (``n_no_heat``). Returns ``n``, ``n_no_heat``, ``dilate_px``, ``pointing_game`` and ``heat_in_mask``
    as ``{"value", "ci_low", "ci_high", "n_resamples", "n_skipped"}``, ``chance`` and ``per_image``.
    """
    from . import evaluate  # noqa: PLC0415

    n = len(heatmaps)
    if n == 0 or len(masks) != n:
        raise ValueError(f"need as many masks as heatmaps (at least one), got {len(masks)} and {n}")
    g = None if groups is None else np.asarray(list(groups), dtype=object)
    if g is not None and g.size != n:
        raise ValueError(f"groups has {g.size} values but there are {n} heatmaps")
    (hits, shares, chance_hit, chance_heat), tolerance = _per_image_scores(heatmaps, masks, dilate_px)
    has_heat = np.isfinite(shares)
    heat = evaluate.BootstrapCI(math.nan, math.nan, math.nan, int(n_resamples), int(n_resamples), alpha)
    if has_heat.any():
        heat = evaluate.bootstrap_mean_ci(
            shares[has_heat], None if g is None else g[has_heat], n_resamples, seed, alpha
        )
    return {
        **{"n": n, "n_no_heat": int((~has_heat).sum()), "dilate_px": int(tolerance)},
        "pointing_game": evaluate.bootstrap_mean_ci(hits, g, n_resamples, seed, alpha).as_dict(),
        "heat_in_mask": heat.as_dict(),
        "chance": {"pointing_game": float(np.mean(chance_hit)), "heat_in_mask": float(np.mean(chance_heat))},
        "per_image": {
            "pointing_game": [bool(v) for v in hits],
            "heat_in_mask": [float(v) if math.isfinite(v) else None for v in shares],
        },
    }


def _per_image_scores(heatmaps, masks, dilate_px: int | None) -> tuple[np.ndarray, int]:
    """Rows hit, heat-in-mask, chance hit, chance heat (shape (4, N)) and the tolerance in pixels."""
    rows, tolerance = [], dilate_px
    for heat, mask in zip(heatmaps, masks):
        h, m = _check_pair(heat, mask)
        tolerance = default_pointing_tolerance(max(m.shape)) if dilate_px is None else dilate_px
        rows.append((pointing_game(h, m, tolerance), heat_in_mask(h, m), _dilate(m, tolerance).mean(), m.mean()))
    return np.array(rows, dtype=float).T, tolerance


# --- Masks aligned with the model input ---
def load_mask_like_input(
    mask_path: str | os.PathLike,
    image_path: str | os.PathLike,
    image_size: int,
    crop_roi: bool = False,
    min_coverage: float = 0.5,
) -> np.ndarray:
    """A fracture mask (S, S) bool transformed exactly like its image by ``pipeline.load_and_preprocess``.

    The mask and the image are read at full size (they must match); with ``crop_roi`` the crop box is
    computed on the image (:func:`cspine_utils.pipeline.roi_bbox`) and applied to the mask; then
    :func:`cspine_utils.pipeline.resize_with_pad` gives each output pixel's fracture coverage, and pixels
    with ``coverage >= min_coverage`` are the mask. A thin line that covers less than that everywhere
    keeps the pixels it touches, so a fracture never vanishes. ``FileNotFoundError`` for a missing file,
    ``ValueError`` for mismatched sizes or a bad argument.
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
        sizes = f"{mask.shape[1]}x{mask.shape[0]} px but image {image_path} is {image.shape[1]}x{image.shape[0]} px"
        raise ValueError(f"mask {mask_path} is {sizes}")
    if crop_roi:
        top, left, bottom, right = pipeline.roi_bbox(image)
        mask = mask[top:bottom, left:right]
    coverage = pipeline.resize_with_pad(mask.astype(np.float32), int(image_size))
    out = coverage >= float(min_coverage) - 1e-6
    if not out.any() and mask.any():
        out = coverage > 0
    return out


def pointing_game_table(hits: Mapping[str, Sequence[bool]], types: Sequence | None = None, alpha: float = 0.05):
    """Pointing-game hit rate per method, over all images and per fracture type, with exact intervals.

    ``hits`` maps a method name to one hit (bool) per image (:func:`pointing_game`), ``types`` gives each
    image's fracture type (None: overall only). Returns a DataFrame with columns ``method``,
    ``fracture_type`` (``"all"`` first), ``hits``, ``n``, ``pointing_game`` and ``ci_low``/``ci_high``,
    the exact binomial (Clopper-Pearson) ``1 - alpha`` interval (images treated as independent).
    """
    import pandas as pd  # noqa: PLC0415

    from . import evaluate  # noqa: PLC0415

    rows = []
    for method, values in hits.items():
        h = np.asarray(values, dtype=bool)
        kinds = np.asarray(["all"] * h.size if types is None else list(types), dtype=object)
        if kinds.size != h.size or h.size == 0:
            raise ValueError(f"method {method!r}: {h.size} hits but {kinds.size} fracture types (need >= 1 each)")
        for kind in ["all", *sorted(set(kinds) - {"all"})]:
            part = h if kind == "all" else h[kinds == kind]
            low, high = evaluate.exact_binomial_interval(int(part.sum()), int(part.size), alpha)
            rows.append((method, kind, int(part.sum()), int(part.size), float(part.mean()), low, high))
    return pd.DataFrame(rows, columns=["method", "fracture_type", "hits", "n", "pointing_game", "ci_low", "ci_high"])
