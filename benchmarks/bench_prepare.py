"""Throughput of `cspine data prepare`: slices/s and studies/min (target: cpu profile set in ≤ 30 s on 2 cores).

    .venv/bin/python benchmarks/bench_prepare.py [--profile cpu] [--workers N] [--src RSNA_DIR]

Prepares the profile's synthetic RSNA-layout studies (generated first into a temporary folder when
data/synthetic/rsna_<profile> is absent; generation is not timed), or any RSNA-layout folder given
with --src, into a temporary cache with the profile's cache settings, and prints the measured
throughput, the workers and the machine. A real-data estimate: 2,019 studies of about 300 slices
each take (2019 × 300) / (slices/s) seconds at the printed rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cspine_utils import config, hardware, phantom3d, series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: min(cores, 4))")
    ap.add_argument("--src", default=None, help="an RSNA-layout folder (default: the profile's synthetic set)")
    ap.add_argument("--target-s", type=float, default=30.0)
    args = ap.parse_args()
    prof = config.get_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.src) if args.src else config.synthetic_studies_dir(prof)
        if not series.is_rsna_dir(src):
            src = Path(tmp) / "rsna"
            t0 = time.perf_counter()
            phantom3d.write_rsna_dataset(
                src, prof.n_studies, seed=0, matrix=prof.study_matrix, slice_mm=prof.study_slice_mm, progress=False
            )
            print(f"generated {prof.n_studies} synthetic studies in {time.perf_counter() - t0:.1f} s (not timed below)")
        rep = series.prepare(
            src,
            Path(tmp) / "cache",
            size=prof.cache_size,
            crop_mm=prof.cache_crop_mm,
            spacing_mm=prof.cache_spacing_mm,
            workers=args.workers,
            progress=False,
        )
    c = rep["counts"]
    print(f"profile {prof.name}: {c['prepared']} studies prepared, {c['failed']} skipped, {rep['workers']} workers")
    config.quiet_tensorflow_start()  # describe_device starts TensorFlow; hold back its start-up notices
    print(f"machine: {hardware.describe_device()}")
    print(
        f"wall time: {rep['seconds']:.1f} s  ({rep['slices_per_s']} source slices/s, {rep['studies_per_min']} studies/min)"
    )
    print(f"target ≤ {args.target_s:.0f} s: {'met' if rep['seconds'] <= args.target_s else 'NOT met'}")


if __name__ == "__main__":
    main()
