"""VGG16 throughput on this machine in float32 and in 16-bit mixed precision, and what the course chooses.

Measures, at the ``cpu`` profile's 96 px with random weights (weights do not change the speed):

* fine-tuning throughput (images/s) with blocks 3-5 trainable, as notebook 04 fine-tunes;
* prediction throughput (images/s; median of 5 passes), as the tuner's feature cache and
  evaluation predict;

once per policy, each in a fresh process (Keras' global policy and TensorFlow's kernels are per
process): ``float32`` and ``mixed_bfloat16`` on a CPU, ``mixed_float16`` on a GPU. Prints the
speed-ups, then the course's own decision (:func:`cspine_utils.hardware.precision_choice`: on a
CPU, bfloat16 only where its short measurement finds a fine-tuning step >= 1.2x faster), so the
two can be compared. A CPU without bfloat16 instructions has nothing to compare.

    .venv/bin/python benchmarks/bench_vgg_precision.py [--batches 8] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = 96  # the cpu profile's image size
UNFROZEN_BLOCKS = 3  # notebook 04's cpu fine-tuning: blocks 3, 4 and 5


def measure(policy: str, batches: int, batch_size: int) -> dict:
    """Images/s of fine-tuning and of prediction under ``policy`` (in this process)."""
    import keras
    import numpy as np

    from cspine_utils import course

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model, _ = course.build_vgg16_classifier(SIZE, weights=None)
    course.unfreeze_top_blocks(model, UNFROZEN_BLOCKS)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    n = batches * batch_size
    x = rng.uniform(0, 1, (n, SIZE, SIZE, 1)).astype("float32")
    y = (rng.uniform(0, 1, n) > 0.5).astype("float32")
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)  # warm-up: tracing, oneDNN plans
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0)
    train = 2 * n / (time.perf_counter() - t0)
    model.predict(x, batch_size=64, verbose=0)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.predict(x, batch_size=64, verbose=0)
        times.append(time.perf_counter() - t0)
    predict = n / statistics.median(times)
    return {"policy": policy, "train_img_s": train, "predict_img_s": predict}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="batches per timed epoch (>= 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches < 2 or args.batch_size < 1:
        parser.error("--batches must be >= 2 and --batch-size >= 1")
    if args.child:
        print(json.dumps(measure(args.child, args.batches, args.batch_size)))
        return 0

    from cspine_utils import hardware

    print(f"device: {hardware.describe_device()}")
    gpu = bool(hardware._gpu_devices())
    if not gpu and not hardware.cpu_has_native_bfloat16():
        print("this CPU has no bfloat16 instructions (emulated bfloat16 is slower): nothing to compare")
        return 0
    mixed = "mixed_float16" if gpu else "mixed_bfloat16"
    results = {}
    for policy in ("float32", mixed):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                policy,
                "--batches",
                str(args.batches),
                "--batch-size",
                str(args.batch_size),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results[policy] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[policy]
        print(
            f"{policy:>15}: fine-tuning blocks 3-5 {r['train_img_s']:6.1f} img/s, "
            f"predict {r['predict_img_s']:6.1f} img/s ({SIZE} px)"
        )
    base, fast = results["float32"], results[mixed]
    print(
        f"speed-up with {mixed}: fine-tuning {fast['train_img_s'] / base['train_img_s']:.2f}x, "
        f"prediction {fast['predict_img_s'] / base['predict_img_s']:.2f}x"
    )
    policy, why = hardware.precision_choice()
    print(f"the course trains in: {policy} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
