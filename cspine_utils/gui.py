"""An upload-and-predict app (ipywidgets 8) for notebooks and Voilà: ``gui.build_app().widget``.

Every file goes through :func:`cspine_utils.predict.predict_bytes`, the code path of ``cspine predict``;
uploads live in memory only and the upload widget is emptied at once, so a saved notebook never
holds images. Teaching only, not for diagnosis.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import html
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config, modelbundle, predict, records

if TYPE_CHECKING:  # pragma: no cover - typing only
    import ipywidgets

    from .modelbundle import Bundle

ACCEPT = ".png,.jpg,.jpeg,.bmp,.tif,.tiff,.dcm"  # file types the upload button offers
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # larger uploads are refused with a message
MAX_KEPT_RESULTS = 50  # results on screen (their uploads kept in memory, to re-predict with another model)
DISPLAY_PX = 192  # model inputs are enlarged (nearest neighbour) to at least this many pixels

_NOTE_STYLE = (
    "background:#fff4ce;border:1px solid #e0b400;border-radius:4px;padding:6px 10px;margin:4px 0;color:#3b2f00"
)
_ERROR_STYLE = "color:#a4262c"
_READY = "Ready: upload one or more slices."


def png_bytes(image: np.ndarray, min_size: int = DISPLAY_PX) -> bytes:
    """PNG of a grey ``(H, W)`` image in [0, 1] or uint8 RGB ``(H, W, 3)``, enlarged by an integer
    factor (nearest neighbour) to at least ``min_size`` pixels per side."""
    from PIL import Image  # noqa: PLC0415

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    factor = max(1, math.ceil(min_size / max(1, min(im.size))))
    if factor > 1:
        im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _note_html(max_pixels: int, max_upload_bytes: int) -> str:
    why = predict.NOT_FOR_DIAGNOSIS.split(": ", 1)[-1]
    return (
        f'<div style="{_NOTE_STYLE}"><b>&#9888; Teaching tool, not for diagnosis.</b> '
        f"{_e(why[:1].upper() + why[1:])}<br>Accepted: {_e(predict.SUPPORTED_TYPES_TEXT)}, up to "
        f"{max_pixels:,} pixels and {max_upload_bytes / 2**20:.0f} MB per file. Uploads are processed in "
        "memory and not stored.</div>"
    )


def _bundle_label(name: str, folder: Path) -> str:
    try:
        rec = records.read_json(folder / "bundle.json")
        return f"{name} ({int(rec['image_size'])} px, {rec.get('profile') or '?'} profile)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return name


def _load_warm(folder: Path) -> Bundle:
    """Load a bundle and predict one blank image (the first call traces the model)."""
    bundle = modelbundle.load_bundle(folder)
    blank = np.zeros((1, bundle.image_size, bundle.image_size, bundle.channels), np.float32)
    bundle.assess(blank, 1)
    return bundle


def _model_info_html(bundle: Bundle, name: str) -> str:
    auc = (bundle.config.get("val_metrics") or {}).get("auc")
    auc_text = f", validation AUC {auc:.3f}" if isinstance(auc, (int, float)) and np.isfinite(auc) else ""
    crop = "yes" if bundle.preprocessing.get("crop_roi") else "no"
    ref = bundle.reference
    unlike = f"; flags images beyond distance {ref.cutoff:.1f} as unlike its training data" if ref else ""
    return (
        f"Model <b>{_e(bundle.config.get('name', name))}</b> from {_e(records.shown_path(bundle.path))}: input "
        f"{bundle.image_size}&times;{bundle.image_size} px, crop to spine: {crop}, probabilities calibrated "
        f"(temperature {bundle.calibration[0]:.2f}, bias {bundle.calibration[1]:+.2f}), threshold {bundle.threshold:.3f} (chosen on validation "
        f"data{auc_text}){unlike}."
    )


def _captioned(caption: str, image: np.ndarray) -> ipywidgets.Widget:
    import ipywidgets as w  # noqa: PLC0415

    return w.VBox([w.HTML(f"<small>{caption}</small>"), w.Image(value=png_bytes(image), format="png")])


def _card(r: predict.PredictionResult, positive: bool, show_gradcam: bool) -> ipywidgets.Widget:
    """One result card: model input, Grad-CAM overlay, probability and decision (or the error)."""
    import ipywidgets as w  # noqa: PLC0415

    box = w.Layout(border="1px solid #ccc", padding="6px", margin="4px 0")
    if not r.ok:
        text = f'<div style="{_ERROR_STYLE}"><b>{_e(r.file)}</b>: could not be used &mdash; {_e(r.error)}</div>'
        card = w.VBox([w.HTML(text)], layout=box)
        card.add_class("cspine-error")
        return card
    colour = "#a4262c" if positive else "#107c10"
    lines = [
        f"<b>{_e(r.file)}</b>",
        f"Fracture probability: <b>{r.probability:.3f}</b>",
        f'Decision at threshold {r.threshold:.3f}: <b style="color:{colour}">{_e(r.label)}</b>',
        *(f'<span class="cspine-flag" style="{_ERROR_STYLE}">&#9888; {_e(flag)}</span>' for flag in r.flags),
    ]
    images = [] if r.image is None else [_captioned("as the model sees it", r.image)]
    if show_gradcam and r.heatmap is not None and r.image is not None:
        try:
            images.append(
                _captioned(f"{r.heatmap_name}: where the model looked", predict.overlay_rgb(r.image, r.heatmap))
            )
        except Exception as exc:  # noqa: BLE001
            lines.append(f"<small>Grad-CAM overlay unavailable ({_e(exc)})</small>")
    elif show_gradcam and r.gradcam_error:
        lines.append(f"<small>{_e(r.gradcam_error)}</small>")
    card = w.HBox([*images, w.HTML("<br>".join(lines), layout=w.Layout(margin="0 0 0 12px"))], layout=box)
    card.add_class("cspine-result")
    return card


def _controls(models_dir: Path, note_html: str) -> dict[str, Any]:
    """The app's widgets by attribute name; ``widget`` holds them all, top to bottom."""
    import ipywidgets as w  # noqa: PLC0415

    wide, c = w.Layout(width="340px"), {"note": w.HTML(note_html)}
    c["upload"] = w.FileUpload(accept=ACCEPT, multiple=True, description="Upload")
    c["model_dropdown"] = w.Dropdown(description="Model", options=[], layout=wide)
    c["refresh_button"] = w.Button(
        description="Refresh models", icon="refresh", tooltip=f"look again for bundles in {models_dir}"
    )
    c["threshold"] = w.FloatSlider(
        value=0.5, min=0.0, max=1.0, step=0.001, description="Threshold", readout_format=".3f",
        continuous_update=False, layout=wide,
    )  # fmt: skip
    c["gradcam"] = w.ToggleButton(
        value=True, description="Grad-CAM overlay", icon="fire", tooltip="show where the model looked (Grad-CAM)"
    )
    c["clear_button"] = w.Button(description="Clear results", icon="trash")
    c["save_button"] = w.Button(description="Save table as CSV", icon="save")
    c.update({name: w.HTML() for name in ("model_info", "status", "table", "save_status")})
    c["results_box"] = w.VBox()
    c["table_box"] = w.VBox([c["table"], c["save_button"], c["save_status"]], layout=w.Layout(display="none"))
    c["widget"] = w.VBox([
        c["note"],
        w.HBox([c["upload"], c["model_dropdown"], c["refresh_button"]]),
        w.HBox([c["threshold"], c["gradcam"], c["clear_button"]]),
        c["model_info"], c["status"], c["results_box"], c["table_box"],
    ])  # fmt: skip
    for name, css in (("widget", "app"), ("upload", "upload"), ("status", "status")):
        c[name].add_class(f"cspine-{css}")
    return c


def _table_html(results: list[predict.PredictionResult]) -> str:
    rows = [
        f"<tr><td>{_e(r.file)}</td><td>{r.probability:.3f}</td><td>{_e(r.label)}</td>"
        f"<td>{_e('; '.join(r.flags))}</td></tr>"
        if r.ok
        else f'<tr><td>{_e(r.file)}</td><td>&ndash;</td><td style="{_ERROR_STYLE}" colspan="2">error: {_e(r.error)}</td></tr>'
        for r in results
    ]
    return (
        '<table style="border-collapse:collapse" border="1" cellpadding="4">'
        "<tr><th>file</th><th>probability</th><th>decision</th><th>warnings</th></tr>" + "".join(rows) + "</table>"
    )


class _ModelChoice:
    """App part: the Model drop-down, the bundle in use (loaded once per version) and its threshold."""

    def refresh_models(self) -> None:
        """Look for bundles again (e.g. after running notebook 03 or 04) and fill the drop-down."""
        current = self.model_dropdown.value
        self._bundle_dirs = predict.find_bundles(self.models_dir)
        options = [(_bundle_label(name, folder), name) for name, folder in self._bundle_dirs.items()]
        with self._quietly():
            self.model_dropdown.options = options
            self.model_dropdown.disabled = not options
            self.model_dropdown.value = current if current in self._bundle_dirs else next(iter(self._bundle_dirs), None)
        self.select_model(self.model_dropdown.value)

    def _load(self, name: str) -> Bundle:
        folder = self._bundle_dirs[name]
        key = (str(folder), (folder / modelbundle.BUNDLE_FILE).stat().st_mtime_ns)
        if key not in self._cache:
            self._set_status(f"Loading model {_e(name)} &hellip;")
            self._cache[key] = _load_warm(folder)
        return self._cache[key]

    def select_model(self, name: str | None) -> None:
        """Load the bundle ``name`` (cached), set the threshold to its own, re-predict."""
        self.bundle, self.bundle_error, self.model_info.value = None, None, ""
        if not name:
            self.bundle_error = predict.no_model_message(self.models_dir)
            no_model = f"<b>No trained model yet.</b> {_e(self.bundle_error)}. Then press <i>Refresh models</i>."
            self._set_status(no_model, error=True)
        else:
            try:
                self.bundle = self._load(name)
            except Exception as exc:  # noqa: BLE001 - shown in plain words
                again = "run notebooks/03_cnn_training.ipynb (or 04) again to save it"
                self.bundle_error = f"the model '{name}' could not be loaded ({exc}); {again}"
                self._set_status(_e(self.bundle_error), error=True)
        if self.bundle is not None:
            self.model_info.value = _model_info_html(self.bundle, name)
            with self._quietly():
                self.threshold.value = self.bundle.threshold
            self._set_status(_READY)
        self._repredict()

    def _on_model(self, change: dict) -> None:
        if not self._quiet:
            self.select_model(change["new"])

    @contextlib.contextmanager
    def _quietly(self):
        """Change controls without running their handlers."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False


class _Uploads:
    """App part: uploads predicted one by one and kept in memory (to re-predict) until cleared."""

    def _predict(self, name: str, content: bytes) -> predict.PredictionResult:
        shown = Path(str(name)).name or "upload"
        if self.bundle is None:
            return predict.PredictionResult(shown, error=self.bundle_error or predict.no_model_message(self.models_dir))
        if len(content) > self.max_upload_bytes:
            limit = f"{len(content) / 2**20:.1f} MB, the limit is {self.max_upload_bytes / 2**20:.0f} MB"
            return predict.PredictionResult(shown, error=f"file too large: {limit}")
        try:
            thr, cam = self.threshold.value, self.gradcam.value
            return predict.predict_bytes(shown, content, self.bundle, thr, gradcam=cam, max_pixels=self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - never a traceback in the app
            return predict.PredictionResult(shown, error=predict.explain_error(exc, shown))

    def predict_bytes(self, name: str, content: bytes, *, render: bool = True) -> predict.PredictionResult:
        """Predict one file given as bytes (what the upload button does per file), show its card, return it.

        ``render=False`` defers redrawing (the upload handler redraws once per batch of files).
        """
        content = bytes(content)
        result = self._predict(name, content)
        self.results.append(result)
        self._uploads.append((name, content))
        del self.results[:-MAX_KEPT_RESULTS], self._uploads[:-MAX_KEPT_RESULTS]
        if render:
            self._render()
        return result

    def _repredict(self) -> None:
        """Predict the uploads on screen again (after the model changed)."""
        if self._uploads:
            self.results = [self._predict(n, c) for n, c in self._uploads]
        self._render()

    def clear(self) -> None:
        """Remove all results (and the uploads kept in memory)."""
        self.results, self._uploads, self.save_status.value = [], [], ""
        self._render()
        if self.bundle is not None:
            self._set_status(_READY)

    def _on_upload(self, change: dict) -> None:
        items = [(str(f["name"]), bytes(f["content"])) for f in change["new"]]
        if not items:
            return
        self.upload.value = ()  # at once: the images must not stay in the widget (nor in a saved notebook)
        self._set_status(f"Predicting {len(items)} file(s) &hellip;")
        for name, content in items:
            self.predict_bytes(name, content, render=False)
        self._render()
        failed = sum(not r.ok for r in self.results[-len(items) :])
        msg = f"Done: {len(items) - failed} of {len(items)} uploaded file(s) predicted"
        self._set_status(msg + (f"; {failed} could not be used (see below)." if failed else "."), error=bool(failed))


class _Display:
    """App part: what is shown (status, cards, table, CSV) and the threshold and Grad-CAM controls."""

    def _on_threshold(self, change: dict) -> None:
        if self._quiet or self.bundle is None:
            return
        negative, positive = self.bundle.class_names[:2]
        for r in self.results:
            if r.ok:
                r.threshold = float(change["new"])
                r.label = positive if r.probability >= r.threshold else negative
        self._render()

    def _on_gradcam(self, change: dict) -> None:
        size = None if self.bundle is None else (self.bundle.image_size,) * 2
        todo = [r for r in self.results if r.ok and r.heatmap is None and r.image is not None and r.image.shape == size]
        if change["new"] and todo:
            try:
                heatmaps = predict.gradcam_heatmaps(self.bundle, np.stack([r.image for r in todo])[..., None])
                name = predict.heatmap_name(self.bundle)
                for r, heatmap in zip(todo, heatmaps):
                    r.heatmap, r.heatmap_name = heatmap, name
            except Exception as exc:  # noqa: BLE001
                for r in todo:
                    r.gradcam_error = f"Grad-CAM could not be computed ({type(exc).__name__}: {exc})"
        self._render()

    def _set_status(self, text_html: str, error: bool = False) -> None:
        style = f' style="{_ERROR_STYLE}"' if error else ""
        self.status.value = f"<div{style}>{text_html}</div>"

    def _render(self) -> None:
        positive = None if self.bundle is None else self.bundle.class_names[1]
        cards = [_card(r, r.label == positive, self.gradcam.value) for r in reversed(self.results)]
        self.results_box.children = cards
        several = len(self.results) > 1
        self.table_box.layout.display = "flex" if several else "none"
        self.table.value = _table_html(self.results) if several else ""

    def save_csv(self) -> Path:
        """Save the table as ``<predictions_dir>/predictions_<UTC time>.csv``; return its path."""
        frame = predict.results_to_frame(self.results).rename(columns={"label": "decision"})
        frame.insert(4, "model", str(self.bundle.path) if self.bundle is not None else "")
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        path = self.predictions_dir / f"predictions_{stamp}.csv"
        frame.to_csv(path, index=False)
        self.save_status.value = f"Saved {len(frame)} row(s) to <code>{_e(path)}</code>"
        return path


class App(_ModelChoice, _Uploads, _Display):
    """The upload-and-predict app; display :attr:`widget`.

    ``models_dir`` and ``predictions_dir`` (for "Save table as CSV") default to ``models`` and
    ``predictions`` under ``config.artifacts_dir()``; images over ``max_pixels`` pixels (default
    ``data.DEFAULT_MAX_PIXELS``) or uploads over ``max_upload_bytes`` are refused. The widgets are
    attributes (``upload``, ``model_dropdown``, ``threshold``, ``gradcam``, ``status``, ``results_box``,
    ``table``, ... see :func:`_controls`); :attr:`bundle` is the model in use (None: ``status`` says
    what to run), :attr:`results` the :class:`~cspine_utils.predict.PredictionResult` on screen.
    """

    def __init__(
        self, models_dir: str | os.PathLike | None = None, *, predictions_dir: str | os.PathLike | None = None,
        max_pixels: int | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:  # fmt: skip
        from . import data  # noqa: PLC0415

        self.models_dir = Path(models_dir) if models_dir is not None else config.artifacts_dir() / "models"
        self.predictions_dir = Path(predictions_dir) if predictions_dir else config.artifacts_dir() / "predictions"
        self.max_pixels = int(max_pixels or data.DEFAULT_MAX_PIXELS)
        self.max_upload_bytes = int(max_upload_bytes)
        self.bundle: Bundle | None = None
        self.bundle_error: str | None = None  # why there is no bundle, in plain words
        self.results: list[predict.PredictionResult] = []
        self._uploads: list[tuple[str, bytes]] = []  # in memory only, parallel to results
        self._cache: dict[tuple[str, int], Bundle] = {}
        self._quiet = False
        for name, widget in _controls(self.models_dir, _note_html(self.max_pixels, self.max_upload_bytes)).items():
            setattr(self, name, widget)
        self._connect()
        self.refresh_models()

    def _connect(self) -> None:
        self.upload.observe(self._guarded(self._on_upload), names="value")
        self.model_dropdown.observe(self._guarded(self._on_model), names="value")
        self.threshold.observe(self._guarded(self._on_threshold), names="value")
        self.gradcam.observe(self._guarded(self._on_gradcam), names="value")
        self.refresh_button.on_click(self._guarded(lambda _b: self.refresh_models()))
        self.clear_button.on_click(self._guarded(lambda _b: self.clear()))
        self.save_button.on_click(self._guarded(lambda _b: self.save_csv()))

    def _guarded(self, handler):
        """Wrap a callback: any exception becomes a message in the app, never a traceback."""

        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                what = f"Something went wrong ({_e(type(exc).__name__)}: {_e(exc)})"
                self._set_status(f"{what}. The app is still ready: try another file.", error=True)
                return None

        return run


def build_app(models_dir: str | os.PathLike | None = None, **kwargs: Any) -> App:
    """Build the upload-and-predict app (display ``app.widget``); ``kwargs`` as in :class:`App`."""
    return App(models_dir, **kwargs)
