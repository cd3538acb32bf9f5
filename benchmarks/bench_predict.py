"""How fast the GUI and `cspine predict` answer on the CPU: model load and per-image prediction.

Budgets (VGG16 bundle of the ``cpu`` profile, 96 px, on a CPU):
    model load (load_bundle: sha256 check + keras.saving.load_model)   <= 3 s
    prediction per image after the model is loaded                     <= 200 ms

Uses ``artifacts/models/vgg16`` when it exists; otherwise builds an *untrained* VGG16 classifier
(``course.build_vgg16_classifier(96, weights=None)``; weights do not change the speed) and saves
it as a bundle in a temporary folder, and says so. Each figure is the median of ``--runs``
(default 20) runs after one warm-up.

    .venv/bin/python benchmarks/bench_predict.py [--runs 20] [--load-runs 20] [--model DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cspine_utils import config, phantom  # noqa: E402

LOAD_BUDGET_S = 3.0
PREDICT_BUDGET_MS = 200.0
SIZE = 96  # the cpu profile's image size


def timed(fn, runs: int) -> tuple[float, list[float]]:
    """Median and all times (seconds) of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def slice_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    spec = phantom.SliceSpec(phantom.sample_subject(rng, f"b{seed}"), "C5", "linear", 0.3, seed)
    buf = io.BytesIO()
    Image.fromarray(phantom.render_slice(spec).image).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per prediction figure (>= 20)")
    parser.add_argument("--load-runs", type=int, default=20, help="timed runs of load_bundle")
    parser.add_argument("--model", default=None, help="bundle folder (default artifacts/models/vgg16)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from cspine_utils import course, gui, hardware, modelbundle, predict  # noqa: PLC0415

    t_import = time.perf_counter() - t0
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {hardware.describe_device()}")
    print(f"import TensorFlow + Keras: {t_import:.2f} s (once per process, not part of the budget)")

    tmp = tempfile.TemporaryDirectory(prefix="bench_predict_")
    bundle_dir = Path(args.model) if args.model else config.artifacts_dir() / "models" / "vgg16"
    if (bundle_dir / "bundle.json").is_file():
        print(f"bundle: {bundle_dir} (trained, from notebook 04)")
    else:
        print(
            f"bundle: no trained VGG16 bundle at {bundle_dir}; building an UNTRAINED VGG16 "
            f"classifier ({SIZE} px, weights=None) - same architecture, so the same speed"
        )
        model, info = course.build_vgg16_classifier(SIZE, weights=None)
        bundle_dir = modelbundle.save_bundle(
            model,
            Path(tmp.name) / "models" / "vgg16",
            image_size=SIZE,
            threshold=0.5,
            preprocessing={"crop_roi": False},
            weights_info=info,
            profile="cpu",
            name="vgg16",
        )
        del model
    size_mb = (bundle_dir / "model.keras").stat().st_size / 2**20

    # A cold load: a fresh process that has imported Keras but never built or loaded a model.
    import subprocess  # noqa: PLC0415

    code = (
        "import time, keras; from cspine_utils import course, hardware, modelbundle; t = time.perf_counter(); "
        f"modelbundle.load_bundle({str(bundle_dir)!r}); print(time.perf_counter() - t)"
    )
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    cold_load = float(cold.stdout.strip().splitlines()[-1]) if cold.returncode == 0 else float("nan")

    t0 = time.perf_counter()
    bundle = modelbundle.load_bundle(bundle_dir)
    first_load = time.perf_counter() - t0
    load_med, _ = timed(lambda: modelbundle.load_bundle(bundle_dir), args.load_runs)
    bundle = modelbundle.load_bundle(bundle_dir)
    t0 = time.perf_counter()
    bundle.assess(np.zeros((1, bundle.image_size, bundle.image_size, 1), np.float32), 1)
    first_predict = time.perf_counter() - t0

    from cspine_utils import pipeline  # noqa: PLC0415

    png = slice_png(0)
    path = Path(tmp.name) / "slice.png"
    path.write_bytes(png)
    x = pipeline.load_and_preprocess(path, bundle.image_size)[None]

    rows = []
    rows.append(
        (
            "model only: Bundle.predict_proba (model.predict), 1 image",
            timed(lambda: bundle.predict_proba(x), args.runs)[0],
        )
    )
    rows.append(
        (
            "model only: Bundle.assess (predict_on_batch), 1 image",
            timed(lambda: bundle.assess(x, 1), args.runs)[0],
        )
    )
    rows.append(
        (
            "file -> probability: predict.predict_bytes",
            timed(lambda: predict.predict_bytes("slice.png", png, bundle), args.runs)[0],
        )
    )
    rows.append(
        (
            "file -> probability + Grad-CAM (predict_bytes, gradcam=True)",
            timed(lambda: predict.predict_bytes("slice.png", png, bundle, gradcam=True), args.runs)[0],
        )
    )

    app = gui.build_app(Path(bundle_dir).parent)
    app.model_dropdown.value = Path(bundle_dir).name

    def gui_once(gradcam: bool) -> None:
        app.gradcam.value = gradcam
        app.clear()
        app.predict_bytes("slice.png", png)

    rows.append(("GUI: App.predict_bytes, cards rendered, no Grad-CAM", timed(lambda: gui_once(False), args.runs)[0]))
    rows.append(("GUI: App.predict_bytes, cards rendered, with Grad-CAM", timed(lambda: gui_once(True), args.runs)[0]))

    print(f"\nmodel.keras {size_mb:.1f} MB, input {bundle.image_size} px, {bundle.model.count_params():,} parameters")
    worst = max(cold_load, first_load, load_med)
    print(
        f"{'model load (load_bundle)':30s} cold (fresh process) {cold_load:5.2f} s, first here "
        f"{first_load:5.2f} s, median of {args.load_runs}: {load_med:5.2f} s  budget "
        f"{LOAD_BUDGET_S:.0f} s  {'OK' if worst <= LOAD_BUDGET_S else 'OVER'}"
    )
    print(f"{'first prediction after load (graph tracing, once)':60s} {first_predict * 1000:7.0f} ms")
    print(f"\nper image, median of {args.runs} runs (budget {PREDICT_BUDGET_MS:.0f} ms):")
    for label, seconds in rows:
        ms = seconds * 1000
        print(f"  {label:62s} {ms:7.1f} ms  {'OK' if ms <= PREDICT_BUDGET_MS else 'OVER'}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
