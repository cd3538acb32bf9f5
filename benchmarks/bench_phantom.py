"""How long the default synthetic dataset of a profile takes to generate (target: cpu profile ≤ 60 s).

    .venv/bin/python benchmarks/bench_phantom.py [--profile cpu] [--workers N]

Generates into a temporary folder (never touches data/), using all cores by default, and prints
the wall time, slices per second and whether the 60-second target is met.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cspine_utils import config, phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--target-s", type=float, default=60.0)
    args = ap.parse_args()
    prof = config.get_profile(args.profile)
    cfg = phantom.SynthConfig(n=prof.n_synthetic, seed=0)
    workers = args.workers or os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = phantom.generate_dataset(Path(tmp) / "ds", cfg, workers=workers, progress=False)
        wall = time.perf_counter() - t0
    print(f"profile {prof.name}: {len(manifest)} slices, {workers} workers, {os.cpu_count()} cores")
    print(f"wall time: {wall:.1f} s  ({len(manifest) / wall:.1f} slices/s)")
    print(f"target ≤ {args.target_s:.0f} s: {'met' if wall <= args.target_s else 'NOT met'}")


if __name__ == "__main__":
    main()
