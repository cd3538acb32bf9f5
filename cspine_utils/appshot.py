"""A real-browser screenshot of the notebook-06 app, for the report and the browser test.

Voilà serves ``notebooks/06_predict_gui.ipynb`` on a free loopback port, headless Chromium (driven by
Playwright) uploads one slice with Grad-CAM on, and the app as the browser drew it is saved as a PNG,
with a JSON beside it saying what it showed (model, weights, file, probability, decision), so a
caption can be computed. ``cspine run --app-screenshot PNG`` (``make run``) takes one just before
notebook 06 runs. Needs Chromium at ``/usr/bin/chromium`` (``make browser``); Playwright's own
browser download is not used.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config, records

CHROMIUM = Path("/usr/bin/chromium")
#: Set for the notebook Voilà serves here, so that notebook 06 does not show an older screenshot of itself.
ENV_FLAG = "CSPINE_APPSHOT"
SERVER_START_S = 60
PAGE_READY_MS = 240_000  # the kernel imports TensorFlow, loads the model and runs the notebook's demo
PREDICTION_MS = 60_000
HOW_TO = (
    "no screenshot of this app yet: `make run` takes one in a real browser before this notebook runs "
    "(or `cspine run --only 06 --app-screenshot report/figures/gui.png`)"
)


def notebook_path() -> Path:
    """The notebook that holds the app: ``<repo>/notebooks/06_predict_gui.ipynb``."""
    return config.repo_root() / "notebooks" / "06_predict_gui.ipynb"


def missing_requirement(chromium: str | os.PathLike = CHROMIUM) -> str | None:
    """Why no screenshot can be taken on this computer, in plain words; None when nothing is missing."""
    chromium = Path(chromium)
    if not (chromium.is_file() and os.access(chromium, os.X_OK)):
        return f"Chromium not found at {chromium}: run `make browser` (installs chromium with apt-get)"
    try:
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError:
        return "the Python package playwright is missing: run `make install` (pip install -e '.[dev]')"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM to its group, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serve(artifacts: str | os.PathLike, *, env: dict | None = None, log_path: str | os.PathLike | None = None):
    """Voilà serving notebook 06 with the bundles of ``<artifacts>/models``; yields its URL; always stopped.

    ``env`` adds environment variables (e.g. ``CSPINE_PROFILE``); ``log_path`` keeps Voilà's output
    (default: a temporary file). RuntimeError (with the log's end) when Voilà exits or does not listen.
    """
    port = free_port()
    full_env = {**os.environ, "CSPINE_ARTIFACTS": str(Path(artifacts).resolve()), ENV_FLAG: "1", **(env or {})}
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "voila", str(notebook_path()), "--no-browser", "--Voila.ip=127.0.0.1"]
    cmd += [f"--port={port}", "--Voila.show_tracebacks=False"]
    with contextlib.ExitStack() as stack:
        log = open(log_path, "w+") if log_path else stack.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115
        stack.callback(log.close)
        proc = subprocess.Popen(
            cmd, cwd=notebook_path().parent, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        stack.callback(_stop, proc)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"Voilà exited with code {proc.returncode}: {log.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Voilà did not listen on port {port} within {SERVER_START_S} s") from None
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"


@contextlib.contextmanager
def open_app(url: str, chromium: str | os.PathLike = CHROMIUM):
    """A headless Chromium page showing the app at ``url`` after the notebook's demo ran; the browser always closed."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(PREDICTION_MS)
            page.goto(url, timeout=PAGE_READY_MS, wait_until="domcontentloaded")
            page.wait_for_selector(".cspine-app .cspine-upload", timeout=PAGE_READY_MS)
            page.wait_for_selector(".cspine-result", timeout=PAGE_READY_MS)  # the notebook's demo ran
            yield page
        finally:
            browser.close()


def upload(page, path: str | os.PathLike) -> None:
    """Upload one file with the app's Upload button (ipywidgets 8 creates the file input on click)."""
    with page.expect_file_chooser(timeout=30_000) as chooser:
        page.click(".cspine-upload")
    chooser.value.set_files(str(path))


def show_one(page, image_path: str | os.PathLike, gradcam: bool = True) -> dict[str, Any]:
    """Clear the app's cards, set the Grad-CAM toggle, upload ``image_path``; what its card shows.

    Returns ``file``, ``card_text``, ``probability`` and ``threshold`` (floats as displayed, or None),
    ``decision``, ``gradcam``, ``bundle`` and ``model_label`` (the Model drop-down's choice). RuntimeError when the app
    refuses the file (its message included).
    """
    name = Path(image_path).name
    page.click("text=Clear results")
    page.locator(".cspine-result").first.wait_for(state="detached")
    toggle = page.locator("button", has_text="Grad-CAM overlay")
    if ("mod-active" in (toggle.get_attribute("class") or "")) != gradcam:
        toggle.click()
    upload(page, image_path)
    card = page.locator(".cspine-result, .cspine-error", has_text=name).first
    card.wait_for(timeout=PREDICTION_MS)
    text = card.inner_text()
    if "cspine-error" in (card.get_attribute("class") or ""):
        raise RuntimeError(f"the app could not use {name}: {text}")
    prob = re.search(r"Fracture probability:\s*([01]\.\d+)", text)
    decision = re.search(r"Decision at threshold ([01]\.\d+):\s*(\w+)", text)
    label = page.locator(".cspine-app select").first.evaluate("s => s.options[s.selectedIndex].text")
    label = " ".join(label.split())  # the browser shows spaces as no-break spaces
    return {
        "file": name,
        "bundle": label.split(" (")[0],  # the folder name; the label adds "(96 px, cpu profile)"
        "model_label": label,
        "probability": float(prob.group(1)) if prob else None,
        "threshold": float(decision.group(1)) if decision else None,
        "decision": decision.group(2) if decision else None,
        "gradcam": gradcam,
        "images_in_card": card.locator("img").count(),
        "card_text": text,
    }


def capture(
    artifacts: str | os.PathLike,
    image_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    gradcam: bool = True,
    url: str | None = None,
    about: dict | None = None,
    chromium: str | os.PathLike = CHROMIUM,
) -> dict[str, Any]:
    """Screenshot the app serving ``<artifacts>/models`` (its first bundle: vgg16, then cnn) on ``image_path``.

    Serves notebook 06 with Voilà unless ``url`` is given, uploads the file (:func:`show_one`), saves
    the app as ``out_png`` and writes ``out_png`` with suffix ``.json``: what :func:`show_one`
    returned, the bundle's weights description and ``about`` (e.g. the slice's split and label).
    Returns that dictionary.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(serve(artifacts))
        page = stack.enter_context(open_app(url, chromium))
        facts = show_one(page, image_path, gradcam)
        page.locator(".cspine-app").scroll_into_view_if_needed()
        page.locator(".cspine-app").screenshot(path=str(out_png), timeout=30_000)
    bundle_json = Path(artifacts) / "models" / facts["bundle"] / "bundle.json"
    meta = records.read_json(bundle_json) if bundle_json.is_file() else {}
    facts["weights"] = (meta.get("weights") or {}).get("description")
    facts["source"] = records.shown_path(image_path)
    facts.update(about or {})
    records.write_json(out_png.with_suffix(".json"), facts)
    return facts


def choose_fracture_slice(bundle_dir: str | os.PathLike, manifest=None, max_candidates: int = 16) -> tuple[Path, dict]:
    """A phantom fracture slice of the test split to show, and how it was chosen.

    The first of the test split's fracture slices (sorted by path; ``manifest`` defaults to
    :func:`data.load_course_manifest`) that the bundle calls fracture, among the first
    ``max_candidates``; the first one when it calls none of them (the JSON says which rule held).
    """
    from . import data, modelbundle  # noqa: PLC0415

    manifest = data.load_course_manifest() if manifest is None else manifest
    test = manifest[(manifest["split"] == "test") & (manifest["label"] == "fracture")].sort_values("path")
    if test.empty:
        raise ValueError("the course manifest has no fracture slice in its test split")
    test = test.head(max_candidates)
    config.quiet_tensorflow_start()
    bundle = modelbundle.load_bundle(bundle_dir)
    hits = [i for i, p in enumerate(bundle.predict_files(list(test["path"]))) if p >= bundle.threshold]
    row = test.iloc[hits[0] if hits else 0]
    rule = "that the model calls fracture" if hits else f"(the model calls none of the first {len(test)} fracture)"
    about = {"split": "test", "label": "fracture", "chosen": f"the first test-split fracture slice by name {rule}"}
    about.update({k: str(row[k]) for k in ("level", "fracture_type") if k in row.index and str(row[k])})
    return Path(row["path"]), about


def caption(facts: dict) -> str:
    """The plain-words caption of a screenshot from its JSON (see :func:`capture`)."""
    weights = f" ({facts['weights']})" if facts.get("weights") else ""
    kind = " ".join(str(facts[k]) for k in ("split", "label") if facts.get(k))
    shown = f"file {facts.get('file')}" + (f", a phantom {kind} slice" if kind else "")
    if facts.get("fracture_type"):
        shown += f" ({facts['fracture_type']} break at {facts.get('level', '?')})"
    said = ""
    if facts.get("probability") is not None:
        said = f"; the app showed probability {facts['probability']:.3f}, decision {facts.get('decision')}"
        said += f" at threshold {facts['threshold']:.3f}" if facts.get("threshold") is not None else ""
    cam = ", Grad-CAM on" if facts.get("gradcam") else ""
    return (
        "Screenshot of this app in a real browser (Voilà), taken by `make run` before this notebook ran: "
        f"model {facts.get('bundle')}{weights}, {shown}{cam}{said}. Teaching only, not a diagnosis."
    )


def show_screenshot(png: str | os.PathLike) -> None:
    """Display the saved screenshot of the app with its computed caption, or how to make one.

    Shows nothing when this notebook is itself being served for a screenshot (:data:`ENV_FLAG`).
    """
    from IPython.display import Image, Markdown, display  # noqa: PLC0415

    png = Path(png)
    if os.environ.get(ENV_FLAG):
        return
    meta = png.with_suffix(".json")
    if not (png.is_file() and meta.is_file()):
        print(HOW_TO)
        return
    display(Image(filename=str(png), width=800), Markdown(caption(records.read_json(meta))))


def course_hook(
    out_png: str | os.PathLike, warn: Callable[[str], None] | None = None, chromium: str | os.PathLike = CHROMIUM
) -> Callable[[Path], None]:
    """The ``before(notebook)`` hook of ``cspine run --app-screenshot``: before notebook 06 runs, screenshot
    the app serving the course's default bundle (vgg16, else cnn) on a test-split fracture slice.

    An older screenshot is removed first; without Chromium, a bundle or a manifest (or when the
    capture fails) ``warn`` gets one line (default: stderr) and the run goes on.
    """
    out_png = Path(out_png)
    warn = warn or (lambda line: print(line, file=sys.stderr))

    def before(notebook: Path) -> None:
        if not Path(notebook).name.startswith("06"):
            return
        from . import predict  # noqa: PLC0415

        for old in (out_png, out_png.with_suffix(".json")):
            old.unlink(missing_ok=True)
        bundle_dir = predict.default_bundle_dir()
        why = missing_requirement(chromium) or (None if bundle_dir else predict.no_model_message())
        try:
            if why is None:
                image, about = choose_fracture_slice(bundle_dir)
                facts = capture(config.artifacts_dir(), image, out_png, about=about, chromium=chromium)
                print(f"app screenshot: {records.shown_path(out_png)} ({caption(facts)})")
                return
        except Exception as exc:  # noqa: BLE001 - a missing screenshot must not stop the course
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warn(f"cspine run: warning: no app screenshot ({why}); the run goes on")

    return before
