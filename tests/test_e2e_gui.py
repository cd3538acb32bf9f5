"""End to end: notebook 06 served by Voilà, driven in headless Chromium through Playwright.

Needs Chromium at /usr/bin/chromium (``make browser`` installs it with apt-get); Playwright's own
browser download is not used. Serving and driving the app is :mod:`cspine_utils.appshot`, the code
that takes the report's screenshot; here its screenshots go to a temporary folder: a test writes no
tracked file (``report/figures/gui.png`` is taken by ``make run``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_gui import slice_png
from test_predict import make_tiny_bundle

from cspine_utils import appshot, records

pytestmark = pytest.mark.e2e


def require_chromium(path: Path = appshot.CHROMIUM) -> str:
    """The Chromium executable, or a test failure (never a skip) that says to run `make browser`."""
    why = appshot.missing_requirement(path)
    if why:
        pytest.fail(f"{why}, then run the tests again", pytrace=False)
    return str(path)


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="module")
def served(tmp_path_factory, chromium):
    """Voilà serving notebook 06 (appshot.serve) with a tiny bundle; yields (url, artifacts); always stopped."""
    root = tmp_path_factory.mktemp("e2e")
    make_tiny_bundle(root / "artifacts" / "models", "cnn")
    env = {"CSPINE_PROFILE": "smoke", "CSPINE_REPORT_DIR": str(root / "report")}
    with appshot.serve(root / "artifacts", env=env, log_path=root / "voila.log") as url:
        yield url, root / "artifacts"


def test_upload_a_slice_and_a_text_file_in_the_browser(served, chromium, tmp_path):
    slice_path = tmp_path / "e2e_fracture.png"
    slice_path.write_bytes(slice_png(11, fracture=True))
    text_path = tmp_path / "e2e_notes.png"
    text_path.write_text("these are notes, not a CT slice")

    with appshot.open_app(served[0], chromium) as page:
        assert "Teaching tool, not for diagnosis" in page.inner_text(".cspine-app")
        appshot.upload(page, slice_path)
        card = page.locator(".cspine-result", has_text="e2e_fracture.png")
        card.wait_for(timeout=appshot.PREDICTION_MS)
        text = card.inner_text()
        match = re.search(r"Fracture probability:\s*([01]\.\d{3})", text)
        assert match, text
        assert 0.0 <= float(match.group(1)) <= 1.0
        assert re.search(r"Decision at threshold 0\.500:\s*(fracture|normal)", text), text
        assert card.locator("img").count() == 2  # model input and Grad-CAM overlay

        appshot.upload(page, text_path)
        error = page.locator(".cspine-error", has_text="e2e_notes.png")
        error.wait_for(timeout=appshot.PREDICTION_MS)
        assert "it is a text file, not an image" in error.inner_text()
        assert "Traceback" not in page.inner_text("body")
        with pytest.raises(RuntimeError, match="could not use e2e_notes.png"):
            appshot.show_one(page, text_path)
        without_cam = appshot.show_one(page, slice_path, gradcam=False)
        assert without_cam["images_in_card"] == 1 and f"{without_cam['probability']:.3f}" == match.group(1)


def test_capture_saves_the_app_and_what_it_showed(served, chromium, tmp_path):
    """The report's screenshot code on the tiny bundle; the PNG goes to a temporary folder, never report/."""
    slice_path = tmp_path / "e2e_capture.png"
    slice_path.write_bytes(slice_png(12, fracture=True))
    out = tmp_path / "shots" / "gui.png"
    facts = appshot.capture(served[1], slice_path, out, url=served[0], about={"label": "fracture"}, chromium=chromium)
    assert out.is_file() and out.stat().st_size > 10_000
    assert records.read_json(out.with_suffix(".json")) == facts
    assert facts["bundle"] == "cnn" and facts["file"] == "e2e_capture.png" and facts["gradcam"] is True
    assert facts["images_in_card"] == 2 and facts["threshold"] == 0.5
    assert 0.0 <= facts["probability"] <= 1.0 and facts["decision"] in ("fracture", "normal")
    assert f"probability {facts['probability']:.3f}, decision {facts['decision']}" in appshot.caption(facts)


def test_chromium_missing_fails_with_make_browser_hint(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="run `make browser`"):
        require_chromium(tmp_path / "no-chromium")
