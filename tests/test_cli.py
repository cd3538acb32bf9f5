"""The ``cspine`` command as a user runs it: a quiet TensorFlow start, genuine errors on stderr, and
the ``cspine run --app-screenshot`` hook (its browser part is in test_e2e_gui.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_predict import make_tiny_bundle, phantom_png

from cspine_utils import appshot, cli

CSPINE = Path(sys.executable).with_name("cspine")
#: What TensorFlow's native code prints at start-up when nothing holds it back (seen before the fix).
NATIVE_NOISE = (
    "absl::InitializeLog",
    "oneDNN",
    "cuda",
    "cuInit",
    "This TensorFlow binary is optimized",
    "I0000",
    "E0000",
    "W0000",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with ``models/cnn`` (a real tiny bundle) and ``fracture.png`` (a phantom slice)."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny_bundle(root / "models", "cnn")
    phantom_png(root / "fracture.png", 3)
    return root


def cspine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process, without TF_CPP_MIN_LOG_LEVEL set by the caller."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([str(CSPINE), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_predict_starts_tensorflow_quietly(tiny):
    proc = cspine("predict", "--model", str(tiny / "models" / "cnn"), str(tiny / "fracture.png"), cwd=tiny)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(tiny / "fracture.png") + "\t")
    assert [n for n in NATIVE_NOISE if n.lower() in proc.stderr.lower()] == [], proc.stderr
    assert "1 of 1 file(s) predicted" in proc.stderr


@pytest.mark.slow
def test_genuine_errors_still_reach_stderr(tiny, tmp_path):
    missing = cspine("predict", "--model", str(tmp_path / "no-bundle"), str(tiny / "fracture.png"), cwd=tmp_path)
    assert missing.returncode == 2 and "cannot use the model bundle" in missing.stderr
    assert str(tmp_path / "no-bundle") in missing.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny / "models" / "cnn", corrupt)
    (corrupt / "model.keras").write_bytes(b"not a Keras file")
    broken = cspine("predict", "--model", str(corrupt), str(tiny / "fracture.png"), cwd=tmp_path)
    assert broken.returncode == 2 and f"cannot use the model bundle {corrupt}" in broken.stderr

    gone = cspine("predict", "--model", str(tiny / "models" / "cnn"), str(tmp_path / "gone.png"), cwd=tmp_path)
    assert gone.returncode == 1
    assert "1 could not be used" in gone.stderr and "gone.png" in gone.stdout + gone.stderr


def test_run_accepts_app_screenshot():
    args = cli.build_parser().parse_args(["run", "--only", "06", "--app-screenshot", "out/gui.png"])
    assert args.app_screenshot == "out/gui.png" and args.func is cli._cmd_run


def test_hook_without_chromium_warns_once_removes_the_old_shot_and_goes_on(tmp_path):
    out = tmp_path / "figures" / "gui.png"
    out.parent.mkdir()
    out.write_bytes(b"old")
    out.with_suffix(".json").write_text("{}")
    warnings: list[str] = []
    hook = appshot.course_hook(out, warn=warnings.append, chromium=tmp_path / "no-chromium")
    hook(Path("notebooks/05_evaluation.ipynb"))
    assert warnings == [] and out.is_file()
    hook(Path("notebooks/06_predict_gui.ipynb"))  # returns: the run goes on
    assert len(warnings) == 1 and "no app screenshot" in warnings[0] and "make browser" in warnings[0]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_hook_without_a_bundle_says_which_notebook_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "empty"))
    monkeypatch.setattr(appshot, "missing_requirement", lambda chromium: None)
    warnings: list[str] = []
    appshot.course_hook(tmp_path / "gui.png", warn=warnings.append)(Path("06_predict_gui.ipynb"))
    assert len(warnings) == 1 and "no trained model found" in warnings[0]


FACTS = {
    "bundle": "vgg16",
    "weights": "ImageNet VGG16",
    "file": "S00012_C5.png",
    "split": "test",
    "label": "fracture",
    "level": "C5",
    "fracture_type": "linear",
    "probability": 0.912,
    "threshold": 0.4,
    "decision": "fracture",
    "gradcam": True,
}


def test_caption_is_computed_from_the_screenshot_facts():
    assert appshot.caption(FACTS) == (
        "Screenshot of this app in a real browser (Voilà), taken by `make run` before this notebook ran: model "
        "vgg16 (ImageNet VGG16), file S00012_C5.png, a phantom test fracture slice (linear break at C5), "
        "Grad-CAM on; the app showed probability 0.912, decision fracture at threshold 0.400. "
        "Teaching only, not a diagnosis."
    )


def test_notebook_shows_the_screenshot_or_how_to_make_one(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.delenv(appshot.ENV_FLAG, raising=False)
    png = tmp_path / "gui.png"
    appshot.show_screenshot(png)
    assert capsys.readouterr().out.strip() == appshot.HOW_TO
    Image.new("RGB", (8, 8)).save(png)
    png.with_suffix(".json").write_text(json.dumps(FACTS))
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs: shown.extend(objs))
    appshot.show_screenshot(png)
    assert [type(o).__name__ for o in shown] == ["Image", "Markdown"] and shown[1].data == appshot.caption(FACTS)
    shown.clear()
    monkeypatch.setenv(appshot.ENV_FLAG, "1")  # the notebook served for the screenshot shows no older one
    appshot.show_screenshot(png)
    assert shown == [] and capsys.readouterr().out == ""


@pytest.mark.slow
def test_the_screenshot_shows_a_test_fracture_the_model_gets_right_when_there_is_one(tmp_path):
    import pandas as pd

    rows = [("b_test.png", "test", "fracture"), ("a_train.png", "train", "fracture"), ("c_test.png", "test", "normal")]
    rows += [("d_test.png", "test", "fracture")]
    manifest = pd.DataFrame(
        [{"path": str(phantom_png(tmp_path / n, i)), "split": s, "label": lab} for i, (n, s, lab) in enumerate(rows)]
    )
    always = make_tiny_bundle(tmp_path / "models", "always", threshold=0.0)
    path, about = appshot.choose_fracture_slice(always, manifest)
    assert path.name == "b_test.png" and about["chosen"].endswith("that the model calls fracture")
    never = make_tiny_bundle(tmp_path / "models", "never", threshold=1.0)
    path, about = appshot.choose_fracture_slice(never, manifest)
    assert path.name == "b_test.png" and "the model calls none of the first 2 fracture" in about["chosen"]
    with pytest.raises(ValueError, match="no fracture slice in its test split"):
        appshot.choose_fracture_slice(never, manifest[manifest["split"] == "train"])
