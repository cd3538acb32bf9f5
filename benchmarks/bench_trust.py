"""Print the issue-12 figures of a finished course run: calibration before/after, the share of phantom
test slices and of real CT slices flagged as unlike the training data, and the heatmap pointing games.

Reads the bundles, the split manifest and notebook 05's ``combined.json`` under ``artifacts/`` (run
``make run`` first); the real CT slices are the ones pydicom ships. Figures are on the test split.

    python benchmarks/bench_trust.py [--models cnn vgg16]
"""

import argparse
import warnings
from pathlib import Path

from cspine_utils import config

config.quiet_tensorflow_start()

from pydicom.data import get_testdata_file  # noqa: E402

from cspine_utils import data, evaluate, hardware, modelbundle, pipeline, predict, records  # noqa: E402

REAL_CT = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm")


def calibration_line(bundle, test_rows, y) -> str:
    x = pipeline.load_arrays(test_rows, bundle.image_size, crop_roi=bool(bundle.preprocessing.get("crop_roi")))[0]
    scores = bundle.assess(x)
    parts = []
    for stage, key in (("before", "uncalibrated"), ("after", "probability")):
        p = scores[key]
        ece, brier = evaluate.expected_calibration_error(y, p), evaluate.brier_score(y, p)
        parts.append(f"{stage}: ECE {ece:.3f}, Brier {brier:.3f}, AUC {evaluate.roc_auc(y, p):.3f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "vgg16"])
    args = parser.parse_args()
    print(f"machine: {hardware.describe_device()}")
    manifest = data.load_course_manifest()
    test_rows = manifest[manifest["split"] == "test"]
    y = pipeline.label_to_int(test_rows["label"])
    real = [get_testdata_file(name) for name in REAL_CT]
    for name in args.models:
        bundle = modelbundle.load_bundle(config.artifacts_dir() / "models" / name)
        print(f"{name}: calibration (T, b) = {bundle.calibration[0]:.2f}, {bundle.calibration[1]:+.2f}")
        print(f"  test {calibration_line(bundle, test_rows, y)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            phantom = predict.predict_paths(list(test_rows["path"]), bundle)
            real_results = predict.predict_paths(real, bundle)
        flagged = sum(bool(r.unlike_training) for r in phantom)
        print(
            f"  unlike the training data (cut-off {bundle.reference.cutoff:.1f}; validation {bundle.reference.val_flagged:.1%}): "
            f"phantom test {flagged}/{len(phantom)} = {flagged / len(phantom):.1%}; real CT "
            + ", ".join(
                f"{Path(r.file).name} {r.distance:.1f} {'flagged' if r.unlike_training else 'NOT flagged'}"
                for r in real_results
            )
        )
    combined = records.read_json(config.artifacts_dir() / "metrics" / "combined.json")
    for name, table in (combined.get("localisation_methods") or {}).items():
        print(f"{name}: pointing game on test fractures (exact 95 % CI)")
        for row in table:
            print(
                f"  {row['method']:<30} {row['fracture_type']:<10} {row['pointing_game']:.2f} "
                f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] ({row['hits']}/{row['n']})"
            )


if __name__ == "__main__":
    main()
