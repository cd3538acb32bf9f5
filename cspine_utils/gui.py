"""An upload-and-predict app (ipywidgets 8) for notebooks and Voilà. Teaching only.

>>> from cspine_utils import gui
>>> app = gui.build_app()          # doctest: +SKIP
>>> app.widget                     # display it (last line of a cell)   # doctest: +SKIP

What the user sees, top to bottom:

* a note: teaching tool, not for diagnosis;
* an **Upload** button (PNG, JPEG, BMP, TIFF, DICOM; several files at once), a **Model**
  drop-down listing the bundles in ``artifacts/models/`` (vgg16 first, then cnn) and a
  **Refresh models** button;
* a **Threshold** slider that starts at the bundle's threshold (chosen on validation data) and
  jumps back to it when another model is picked, and a **Grad-CAM** toggle;
* one card per file: the image *as the model sees it* (after the bundle's preprocessing; DICOM
  in the bone window), the Grad-CAM overlay, the fracture probability and the decision at the
  threshold - or, for a file that cannot be used, why, in plain words;
* for several files a table (file, probability, decision) and a button that saves it as CSV
  under ``artifacts/predictions/``.

Every file goes through :func:`cspine_utils.predict.predict_bytes`, the same code path as
``cspine predict``. Uploaded bytes live in memory only (a temporary file is deleted right after
reading) and the upload widget is emptied after each upload, so a saved notebook never holds the
images.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config, predict

if TYPE_CHECKING:  # pragma: no cover - typing only
    import ipywidgets

    from .modelbundle import Bundle

__all__ = ["ACCEPT", "DEFAULT_MAX_UPLOAD_BYTES", "App", "build_app", "png_bytes"]

ACCEPT = ".png,.jpg,.jpeg,.bmp,.tif,.tiff,.dcm"
"""File types the upload button offers."""

DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024
"""Largest uploaded file, bytes (64 MiB); larger ones are refused with a message."""

MAX_KEPT_RESULTS = 50
"""Results kept on screen (and their uploads in memory, to re-predict with another model)."""

DISPLAY_PX = 192  # model inputs are enlarged (nearest neighbour) to at least this many pixels

_NOTE_STYLE = (
    "background:#fff4ce;border:1px solid #e0b400;border-radius:4px;padding:6px 10px;margin:4px 0;color:#3b2f00"
)
_ERROR_STYLE = "color:#a4262c"


def png_bytes(image: np.ndarray, min_size: int = DISPLAY_PX) -> bytes:
    """PNG bytes of a grey ``(H, W)`` image in [0, 1] or uint8 RGB ``(H, W, 3)``, enlarged by
    an integer factor (nearest neighbour) to at least ``min_size`` pixels per side."""
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


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _strip_tags(text: str) -> str:
    text = re.sub(r"<br\s*/?>|</(?:div|p|tr|li|table)>", "\n", text)
    text = re.sub(r"</t[dh]>", " ", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


class App:
    """The upload-and-predict app; display :attr:`widget`.

    Parameters
    ----------
    models_dir : str or PathLike, optional
        Where the bundles are (default ``config.artifacts_dir() / "models"``).
    predictions_dir : str or PathLike, optional
        Where "Save table as CSV" writes (default ``config.artifacts_dir() / "predictions"``).
    max_pixels : int, optional
        Refuse images with more pixels (width x height); default ``data.DEFAULT_MAX_PIXELS``.
    max_upload_bytes : int, default :data:`DEFAULT_MAX_UPLOAD_BYTES`
        Refuse larger uploads.

    Attributes
    ----------
    widget : ipywidgets.VBox
        The whole app.
    upload, model_dropdown, refresh_button, threshold, gradcam, clear_button, save_button
        The controls.
    note, model_info, status, results_box, table, save_status
        What is shown (HTML widgets and a box of result cards).
    bundle : cspine_utils.modelbundle.Bundle or None
        The model in use; None when there is none (``status`` says what to run).
    results : list of cspine_utils.predict.PredictionResult
        The results on screen, oldest first.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike | None = None,
        *,
        predictions_dir: str | os.PathLike | None = None,
        max_pixels: int | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        import ipywidgets as w  # noqa: PLC0415

        from . import data  # noqa: PLC0415

        self.models_dir = Path(models_dir) if models_dir is not None else config.artifacts_dir() / "models"
        self._predictions_dir = Path(predictions_dir) if predictions_dir is not None else None
        self.max_pixels = int(max_pixels or data.DEFAULT_MAX_PIXELS)
        self.max_upload_bytes = int(max_upload_bytes)
        self.bundle: Bundle | None = None
        self.bundle_error: str | None = None
        self.results: list[predict.PredictionResult] = []
        self.last_csv: Path | None = None
        self._uploads: list[tuple[str, bytes]] = []  # in memory only, parallel to results
        self._cache: dict[tuple[str, int], Bundle] = {}
        self._quiet = False

        self.note = w.HTML(
            f'<div style="{_NOTE_STYLE}"><b>&#9888; Teaching tool, not for diagnosis.</b> '
            f"{_e(_sentence(predict.NOT_FOR_DIAGNOSIS.split(': ', 1)[-1]))}<br>"
            f"Accepted: {_e(predict.SUPPORTED_TYPES_TEXT)}, up to {self.max_pixels:,} pixels "
            f"and {self.max_upload_bytes / 2**20:.0f} MB per file. Uploads are processed in "
            "memory and not stored.</div>"
        )
        self.upload = w.FileUpload(
            accept=ACCEPT, multiple=True, description="Upload", tooltip="PNG, JPEG, BMP, TIFF or DICOM slices"
        )
        self.model_dropdown = w.Dropdown(description="Model", options=[], layout=w.Layout(width="340px"))
        self.refresh_button = w.Button(
            description="Refresh models", icon="refresh", tooltip="look again for bundles in " + str(self.models_dir)
        )
        self.threshold = w.FloatSlider(
            value=0.5,
            min=0.0,
            max=1.0,
            step=0.001,
            description="Threshold",
            readout_format=".3f",
            continuous_update=False,
            layout=w.Layout(width="340px"),
        )
        self.gradcam = w.ToggleButton(
            value=True, description="Grad-CAM overlay", icon="fire", tooltip="show where the model looked (Grad-CAM)"
        )
        self.clear_button = w.Button(description="Clear results", icon="trash")
        self.model_info = w.HTML()
        self.status = w.HTML()
        self.results_box = w.VBox()
        self.table = w.HTML()
        self.save_button = w.Button(description="Save table as CSV", icon="save")
        self.save_status = w.HTML()
        self.table_box = w.VBox([self.table, self.save_button, self.save_status], layout=w.Layout(display="none"))
        self.widget = w.VBox(
            [
                self.note,
                w.HBox([self.upload, self.model_dropdown, self.refresh_button]),
                w.HBox([self.threshold, self.gradcam, self.clear_button]),
                self.model_info,
                self.status,
                self.results_box,
                self.table_box,
            ]
        )

        self.widget.add_class("cspine-app")
        self.upload.add_class("cspine-upload")
        self.status.add_class("cspine-status")
        self.upload.observe(self._guarded(self._on_upload), names="value")
        self.model_dropdown.observe(self._guarded(self._on_model), names="value")
        self.threshold.observe(self._guarded(self._on_threshold), names="value")
        self.gradcam.observe(self._guarded(self._on_gradcam), names="value")
        self.refresh_button.on_click(self._guarded(lambda _b: self.refresh_models()))
        self.clear_button.on_click(self._guarded(lambda _b: self.clear()))
        self.save_button.on_click(self._guarded(lambda _b: self.save_csv()))
        self.refresh_models()

    # ----------------------------------------------------------------------------------------
    # Models
    # ----------------------------------------------------------------------------------------
    @property
    def predictions_dir(self) -> Path:
        """Where CSV tables go: ``artifacts/predictions/`` unless given."""
        return self._predictions_dir or config.artifacts_dir() / "predictions"

    def refresh_models(self) -> None:
        """Look for bundles again (e.g. after running notebook 03 or 04) and fill the drop-down."""
        bundles = predict.find_bundles(self.models_dir)
        current = self.model_dropdown.value
        options = []
        for name, folder in bundles.items():
            options.append((self._bundle_label(name, folder), name))
        self._bundle_dirs = bundles
        self._quiet = True
        try:
            self.model_dropdown.options = options
            self.model_dropdown.disabled = not options
            keep = current if current in bundles else (options[0][1] if options else None)
            self.model_dropdown.value = keep
        finally:
            self._quiet = False
        self.select_model(self.model_dropdown.value)

    @staticmethod
    def _bundle_label(name: str, folder: Path) -> str:
        import json  # noqa: PLC0415

        try:
            rec = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
            return f"{name} ({int(rec['image_size'])} px, {rec.get('profile') or '?'} profile)"
        except (OSError, ValueError, KeyError, TypeError):
            return name

    def select_model(self, name: str | None) -> None:
        """Load the bundle ``name`` (cached), set the threshold to its own, re-predict."""
        from . import modelbundle  # noqa: PLC0415

        self.bundle, self.bundle_error = None, None
        if not name:
            self.bundle_error = predict.no_model_message(self.models_dir)
            self.model_info.value = ""
            self._set_status(
                f"<b>No trained model yet.</b> {_e(self.bundle_error)}. Then press <i>Refresh models</i>.", error=True
            )
        else:
            folder = self._bundle_dirs[name]
            try:
                stamp = (folder / modelbundle.BUNDLE_FILE).stat().st_mtime_ns
                key = (str(folder), stamp)
                if key not in self._cache:
                    self._set_status(f"Loading model {_e(name)} &hellip;")
                    bundle = modelbundle.load_bundle(folder)
                    predict.probabilities(
                        bundle,
                        np.zeros(  # warm-up: the first call traces
                            (1, bundle.image_size, bundle.image_size, bundle.channels), np.float32
                        ),
                        1,
                    )
                    self._cache[key] = bundle
                self.bundle = self._cache[key]
            except Exception as exc:  # noqa: BLE001 - shown in plain words
                self.bundle_error = (
                    f"the model '{name}' could not be loaded ({exc}); run "
                    "notebooks/03_cnn_training.ipynb (or 04) again to save it"
                )
                self.model_info.value = ""
                self._set_status(_e(self.bundle_error), error=True)
        if self.bundle is not None:
            b = self.bundle
            metrics = b.config.get("val_metrics") or {}
            auc = metrics.get("auc")
            auc_text = f", validation AUC {auc:.3f}" if isinstance(auc, (int, float)) and np.isfinite(auc) else ""
            self.model_info.value = (
                f"Model <b>{_e(b.config.get('name', name))}</b> from {_e(b.path)}: input "
                f"{b.image_size}&times;{b.image_size} px, crop to spine: "
                f"{'yes' if b.preprocessing.get('crop_roi') else 'no'}, threshold "
                f"{b.threshold:.3f} (chosen on validation data{auc_text})."
            )
            self._quiet = True
            try:
                self.threshold.value = b.threshold
            finally:
                self._quiet = False
            self._set_status("Ready: upload one or more slices.")
        self._repredict()

    # ----------------------------------------------------------------------------------------
    # Predictions
    # ----------------------------------------------------------------------------------------
    def _predict(self, name: str, content: bytes) -> predict.PredictionResult:
        shown = Path(str(name)).name or "upload"
        if self.bundle is None:
            return predict.PredictionResult(
                file=shown, error=self.bundle_error or predict.no_model_message(self.models_dir)
            )
        if len(content) > self.max_upload_bytes:
            return predict.PredictionResult(
                file=shown,
                error=(
                    f"file too large: {len(content) / 2**20:.1f} MB, the limit is "
                    f"{self.max_upload_bytes / 2**20:.0f} MB"
                ),
            )
        try:
            return predict.predict_bytes(
                shown,
                content,
                self.bundle,
                self.threshold.value,
                gradcam=self.gradcam.value,
                max_pixels=self.max_pixels,
            )
        except Exception as exc:  # noqa: BLE001 - never a traceback in the app
            return predict.PredictionResult(file=shown, error=predict.explain_error(exc, shown))

    def predict_bytes(
        self, name: str, content: bytes | bytearray | memoryview, *, render: bool = True
    ) -> predict.PredictionResult:
        """Predict one file given as bytes, show its card and return the result.

        Used by the upload button (one call per uploaded file) and directly by notebooks and
        tests. ``content`` is copied into memory; nothing is written to disk except a
        temporary file that is deleted at once. ``render=False`` defers redrawing the cards
        (the upload handler redraws once for a batch of files).
        """
        data = bytes(content)
        result = self._predict(name, data)
        self._remember(name, data, result)
        if render:
            self._render()
        return result

    def _remember(self, name: str, data: bytes, result: predict.PredictionResult) -> None:
        self.results.append(result)
        self._uploads.append((name, data))
        del self.results[:-MAX_KEPT_RESULTS]
        del self._uploads[:-MAX_KEPT_RESULTS]

    def _repredict(self) -> None:
        """Predict the uploads on screen again (after the model changed)."""
        if self._uploads:
            self.results = [self._predict(n, c) for n, c in self._uploads]
        self._render()

    def clear(self) -> None:
        """Remove all results (and the uploads kept in memory)."""
        self.results, self._uploads = [], []
        self.save_status.value = ""
        self._render()
        if self.bundle is not None:
            self._set_status("Ready: upload one or more slices.")

    def _on_upload(self, change: dict) -> None:
        files = change["new"]
        if not files:
            return
        items = [(str(f["name"]), bytes(f["content"])) for f in files]
        # Empty the widget at once: the images must not stay in its state (nor in a saved notebook).
        self.upload.value = ()
        self._set_status(f"Predicting {len(items)} file(s) &hellip;")
        for name, data in items:
            self.predict_bytes(name, data, render=False)
        self._render()
        failed = sum(not r.ok for r in self.results[-len(items) :])
        msg = f"Done: {len(items) - failed} of {len(items)} uploaded file(s) predicted"
        self._set_status(msg + (f"; {failed} could not be used (see below)." if failed else "."), error=bool(failed))

    def _on_model(self, change: dict) -> None:
        if not self._quiet:
            self.select_model(change["new"])

    def _on_threshold(self, change: dict) -> None:
        if self._quiet:
            return
        thr = float(change["new"])
        for r in self.results:
            if r.ok and self.bundle is not None:
                r.threshold = thr
                r.label = self.bundle.class_names[1] if r.probability >= thr else self.bundle.class_names[0]
        self._render()

    def _on_gradcam(self, change: dict) -> None:
        if change["new"] and self.bundle is not None:
            todo = [
                r
                for r in self.results
                if r.ok and r.heatmap is None and r.image is not None and r.image.shape == (self.bundle.image_size,) * 2
            ]
            if todo:
                try:
                    maps = predict.gradcam_heatmaps(self.bundle, np.stack([r.image for r in todo])[..., None])
                    for r, m in zip(todo, maps):
                        r.heatmap = m
                except Exception as exc:  # noqa: BLE001
                    for r in todo:
                        r.gradcam_error = f"Grad-CAM could not be computed ({type(exc).__name__}: {exc})"
        self._render()

    # ----------------------------------------------------------------------------------------
    # Rendering
    # ----------------------------------------------------------------------------------------
    def _set_status(self, text_html: str, error: bool = False) -> None:
        style = f' style="{_ERROR_STYLE}"' if error else ""
        self.status.value = f"<div{style}>{text_html}</div>"

    def _card(self, r: predict.PredictionResult) -> ipywidgets.Widget:
        import ipywidgets as w  # noqa: PLC0415

        box = w.Layout(border="1px solid #ccc", padding="6px", margin="4px 0")
        if not r.ok:
            text = w.HTML(
                f'<div style="{_ERROR_STYLE}"><b>{_e(r.file)}</b>: could not be used &mdash; {_e(r.error)}</div>'
            )
            card = w.VBox([text], layout=box)
            card.add_class("cspine-card")
            card.add_class("cspine-error")
            return card
        is_pos = self.bundle is not None and r.label == self.bundle.class_names[1]
        colour = "#a4262c" if is_pos else "#107c10"
        lines = [
            f"<b>{_e(r.file)}</b>",
            f"Fracture probability: <b>{r.probability:.3f}</b>",
            f'Decision at threshold {r.threshold:.3f}: <b style="color:{colour}">{_e(r.label)}</b>',
        ]
        images = []
        if r.image is not None:
            images.append(
                w.VBox([w.HTML("<small>as the model sees it</small>"), w.Image(value=png_bytes(r.image), format="png")])
            )
        if self.gradcam.value:
            if r.heatmap is not None and r.image is not None:
                try:
                    rgb = predict.overlay_rgb(r.image, r.heatmap)
                    images.append(
                        w.VBox(
                            [
                                w.HTML("<small>Grad-CAM: where the model looked</small>"),
                                w.Image(value=png_bytes(rgb), format="png"),
                            ]
                        )
                    )
                except Exception as exc:  # noqa: BLE001
                    lines.append(f"<small>Grad-CAM overlay unavailable ({_e(exc)})</small>")
            elif r.gradcam_error:
                lines.append(f"<small>{_e(r.gradcam_error)}</small>")
        text = w.HTML("<br>".join(lines), layout=w.Layout(margin="0 0 0 12px"))
        card = w.HBox(images + [text], layout=box)
        card.add_class("cspine-card")
        card.add_class("cspine-result")
        return card

    def _render(self) -> None:
        self.results_box.children = [self._card(r) for r in reversed(self.results)]
        several = len(self.results) > 1
        self.table_box.layout.display = "flex" if several else "none"
        if not several:
            self.table.value = ""
            return
        rows = []
        for r in self.results:
            if r.ok:
                rows.append(f"<tr><td>{_e(r.file)}</td><td>{r.probability:.3f}</td><td>{_e(r.label)}</td></tr>")
            else:
                rows.append(
                    f"<tr><td>{_e(r.file)}</td><td>&ndash;</td>"
                    f'<td style="{_ERROR_STYLE}">error: {_e(r.error)}</td></tr>'
                )
        self.table.value = (
            '<table style="border-collapse:collapse" border="1" cellpadding="4">'
            "<tr><th>file</th><th>probability</th><th>decision</th></tr>" + "".join(rows) + "</table>"
        )

    def save_csv(self) -> Path:
        """Save the table (file, probability, decision, threshold, model, error) as CSV.

        Returns
        -------
        pathlib.Path
            ``artifacts/predictions/predictions_<UTC time>.csv``; :attr:`save_status` says where.
        """
        frame = predict.results_to_frame(self.results).rename(columns={"label": "decision"})
        frame.insert(4, "model", str(self.bundle.path) if self.bundle is not None else "")
        folder = self.predictions_dir
        folder.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        path = folder / f"predictions_{stamp}.csv"
        frame.to_csv(path, index=False)
        self.last_csv = path
        self.save_status.value = f"Saved {len(frame)} row(s) to <code>{_e(path)}</code>"
        return path

    # ----------------------------------------------------------------------------------------
    # Safety net and helpers for tests
    # ----------------------------------------------------------------------------------------
    def _guarded(self, handler):
        """Wrap a callback: any exception becomes a message in the app, never a traceback."""

        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self._set_status(
                    f"Something went wrong ({_e(type(exc).__name__)}: {_e(exc)}). The app is "
                    "still ready: try another file.",
                    error=True,
                )
                return None

        return run

    def rendered_text(self) -> str:
        """All text the app shows now (HTML stripped), for tests and quick checks."""
        parts: list[str] = []

        def walk(widget: Any) -> None:
            value = getattr(widget, "value", None)
            if widget.__class__.__name__ in ("HTML", "Label") and isinstance(value, str):
                parts.append(_strip_tags(value))
            layout = getattr(widget, "layout", None)
            if layout is not None and getattr(layout, "display", None) == "none":
                return
            for child in getattr(widget, "children", ()):
                walk(child)

        walk(self.widget)
        return re.sub(r"[ \t]+", " ", "\n".join(p.strip() for p in parts if p.strip()))


def build_app(models_dir: str | os.PathLike | None = None, **kwargs: Any) -> App:
    """Build the upload-and-predict app; display ``app.widget``.

    Parameters
    ----------
    models_dir : str or PathLike, optional
        Where the bundles are; default ``artifacts/models`` (``CSPINE_ARTIFACTS`` honoured).
    **kwargs
        ``predictions_dir``, ``max_pixels``, ``max_upload_bytes`` (see :class:`App`).

    Returns
    -------
    App
    """
    return App(models_dir, **kwargs)
