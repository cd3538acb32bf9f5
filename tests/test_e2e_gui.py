"""End to end: notebook 06 served by Voilà, driven in headless Chromium through Playwright.

Needs Chromium at /usr/bin/chromium (``make browser`` installs it with apt-get); Playwright's own
browser download is not used. The screenshot it takes goes to a temporary folder: a test writes no
tracked file (``report/figures/gui.png`` is the rendered report's copy).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_gui import slice_png
from test_predict import make_tiny_bundle

from cspine_utils import config

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = config.repo_root() / "notebooks" / "06_predict_gui.ipynb"
SERVER_START_S = 60
PAGE_READY_MS = 240_000  # the kernel imports TensorFlow, loads the model and runs the demo
PREDICTION_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium(path: Path = CHROMIUM) -> str:
    """The Chromium executable, or a test failure (never a skip) that says to run `make browser`."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"Chromium not found at {path}: run `make browser` (installs chromium and "
            "chromium-driver with apt-get), then run the tests again",
            pytrace=False,
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "the Python package playwright is missing: run `make install` (pip install -e '.[dev]')", pytrace=False
        )
    return str(path)


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory, chromium):
    """Voilà serving notebook 06 on a free loopback port, with a tiny bundle; always stopped."""
    root = tmp_path_factory.mktemp("e2e")
    make_tiny_bundle(root / "artifacts" / "models", "cnn")
    port = free_port()
    env = dict(
        os.environ,
        CSPINE_ARTIFACTS=str(root / "artifacts"),
        CSPINE_PROFILE="smoke",
        CSPINE_REPORT_DIR=str(root / "report"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    log = open(root / "voila.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voila",
            str(NOTEBOOK),
            "--no-browser",
            "--Voila.ip=127.0.0.1",
            f"--port={port}",
            "--Voila.show_tracebacks=False",
        ],
        cwd=NOTEBOOK.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Voilà exited with {proc.returncode}: {(root / 'voila.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Voilà did not listen on port {port} within {SERVER_START_S} s")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        log.close()


def upload_file(page, path: Path) -> None:
    # ipywidgets 8 creates the <input type=file> only when the button is clicked
    with page.expect_file_chooser(timeout=30_000) as chooser:
        page.click(".cspine-upload")
    chooser.value.set_files(str(path))


def test_upload_a_slice_and_a_text_file_in_the_browser(voila_url, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    slice_path = tmp_path / "e2e_fracture.png"
    slice_path.write_bytes(slice_png(11, fracture=True))
    text_path = tmp_path / "e2e_notes.png"
    text_path.write_text("these are notes, not a CT slice")
    screenshot = tmp_path / "gui.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(PREDICTION_MS)
            page.goto(voila_url, timeout=PAGE_READY_MS, wait_until="domcontentloaded")
            page.wait_for_selector(".cspine-app .cspine-upload", timeout=PAGE_READY_MS)
            page.wait_for_selector(".cspine-result", timeout=PAGE_READY_MS)  # the notebook's demo ran
            assert "Teaching tool, not for diagnosis" in page.inner_text(".cspine-app")

            upload_file(page, slice_path)
            card = page.locator(".cspine-result", has_text="e2e_fracture.png")
            card.wait_for(timeout=PREDICTION_MS)
            text = card.inner_text()
            match = re.search(r"Fracture probability:\s*([01]\.\d{3})", text)
            assert match, text
            assert 0.0 <= float(match.group(1)) <= 1.0
            assert re.search(r"Decision at threshold 0\.500:\s*(fracture|normal)", text), text
            assert card.locator("img").count() == 2  # model input and Grad-CAM overlay

            upload_file(page, text_path)
            error = page.locator(".cspine-error", has_text="e2e_notes.png")
            error.wait_for(timeout=PREDICTION_MS)
            assert "it is a text file, not an image" in error.inner_text()
            assert "Traceback" not in page.inner_text("body")

            page.click("text=Clear results")  # keep the figure to the two uploads, not the demo
            page.locator(".cspine-result").first.wait_for(state="detached", timeout=PREDICTION_MS)
            upload_file(page, slice_path)
            card.wait_for(timeout=PREDICTION_MS)
            upload_file(page, text_path)
            error.wait_for(timeout=PREDICTION_MS)
            page.locator(".cspine-app").scroll_into_view_if_needed()
            page.locator(".cspine-app").screenshot(path=str(screenshot), timeout=30_000)
        finally:
            browser.close()
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000


def test_chromium_missing_fails_with_make_browser_hint(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="run `make browser`"):
        require_chromium(tmp_path / "no-chromium")
