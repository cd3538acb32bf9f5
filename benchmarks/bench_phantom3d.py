"""How fast the synthetic CT studies (RSNA 2022 layout) of a profile generate (target: cpu set <= 90 s).

    .venv/bin/python benchmarks/bench_phantom3d.py [--profile cpu] [--workers N] [--studies N] [--single K]

Times ``--single`` studies on one process (plan, render, write DICOM and NIfTI; seconds per study and
per slice, the J2K studies among them), then generates the profile's whole set (or ``--studies``) into a
temporary folder with the default worker count (never touches data/) and prints studies/min, slices/s,
the wall time and whether the target is met. ``--single-only`` skips the whole set and extrapolates.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cspine_utils import config, phantom3d


def _single(prof, k: int) -> tuple[float, int]:
    """Seconds and slices for ``k`` studies written one after the other in this process."""
    plans = phantom3d.plan_labels(max(k, 2), 0)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "segmentations").mkdir()
        t0, slices = time.perf_counter(), 0
        for i in range(k):
            study = phantom3d.plan_study(i, 0, prof.study_matrix, prof.study_slice_mm, plans[i], 0.5)
            phantom3d.write_study(Path(tmp), study)
            slices += len(study["depths"])
        return time.perf_counter() - t0, slices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cores))")
    ap.add_argument("--studies", type=int, default=None, help="studies in the set (default: the profile's)")
    ap.add_argument("--single", type=int, default=8, help="studies timed on one process first")
    ap.add_argument("--single-only", action="store_true", help="only the single-process timing")
    ap.add_argument("--target-s", type=float, default=90.0)
    args = ap.parse_args()
    prof = config.get_profile(args.profile)
    n = args.studies or prof.n_studies
    workers = args.workers or min(2, os.cpu_count() or 1)
    sec, slices = _single(prof, args.single)
    per_study = sec / args.single
    print(f"profile {prof.name}: {prof.study_matrix} px, {prof.study_slice_mm} mm slices, {n} studies")
    print(
        f"one process: {per_study:.2f} s/study, {slices / sec:.0f} slices/s ({slices / args.single:.0f} slices/study)"
    )
    print(f"extrapolated set on {workers} workers: {per_study * n / workers:.0f} s")
    if args.single_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        info = phantom3d.write_rsna_dataset(
            Path(tmp) / "studies",
            n,
            matrix=prof.study_matrix,
            slice_mm=prof.study_slice_mm,
            workers=workers,
            progress=False,
        )
        wall = time.perf_counter() - t0
    print(
        f"whole set: {info['studies']} studies ({info['fractured']} fractured, {info['j2k_studies']} J2K), {info['slices']} slices"
    )
    print(
        f"wall time: {wall:.1f} s ({60 * n / wall:.1f} studies/min, {info['slices'] / wall:.0f} slices/s, {workers} workers)"
    )
    print(f"target <= {args.target_s:.0f} s: {'met' if wall <= args.target_s else 'NOT met'}")


if __name__ == "__main__":
    main()
