"""The VGG16 search of notebook 04 in the ``gpu`` profile, timed on whatever accelerator is there.

    KERAS_BACKEND=jax python benchmarks/bench_gpu_search.py [--profile gpu] [--n N] [--trials T]

Written for the lent GPU machine, which has JAX but no TensorFlow: it runs the steps of
notebook 04 that need no ``tf.data`` — generate the profile's synthetic dataset, split it by
subject, compute the frozen VGG16 base's features once (``tuning.FeatureCache``), run the
KerasTuner search over heads on those features — and then times fine-tuning throughput of the
full classifier (block 5 unfrozen) on image arrays. Prints images/s and seconds per step.

VGG16 weights: ``--weights`` (default ``None``, random init, since the HED weights package is
not carried to that machine); the quality of a random-weights search says nothing about the
course's models, only the throughput figures matter here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--n", type=int, default=None, help="slices to generate (default: the profile's)")
    ap.add_argument("--trials", type=int, default=None, help="tuner trials (default: the profile's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the profile's)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--finetune-images", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    ap.add_argument("--throughput-only", action="store_true", help="skip the dataset and the search")
    args = ap.parse_args(argv)

    from cspine_utils import config, data, phantom

    prof = config.get_profile(args.profile)
    size = args.image_size or prof.image_size
    n = args.n or prof.n_synthetic
    work = Path(tempfile.mkdtemp(prefix="gpu_search_"))
    # the phantom forks worker processes: do it before JAX (multithreaded) is imported
    generate_s = None
    if not args.throughput_only:
        t0 = time.perf_counter()
        phantom.generate_dataset(work / "data", phantom.SynthConfig(n=n, seed=0), progress=False)
        generate_s = round(time.perf_counter() - t0, 1)
        manifest, message = data.choose_split(data.discover(work / "data"), seed=0)
        print(f"{n} slices generated in {generate_s} s on {os.cpu_count()} cores; {message}", flush=True)

    import keras
    import numpy as np

    from cspine_utils import course, hardware, tuning

    figures: dict = {
        "backend": keras.backend.backend(),
        "device": hardware.describe_device(),
        "profile": prof.name,
        "image_size": size,
        "n_slices": n,
        "generate_s": generate_s,
    }
    print(figures["device"], flush=True)

    policy = hardware.enable_mixed_precision()  # mixed_float16 on a GPU
    figures["mixed_precision"] = policy != "float32"
    figures["dtype_policy"] = policy
    if not args.throughput_only:
        _search(args, prof, size, manifest, work, figures, tuning)
    _throughput(args, size, figures, course, keras, np)
    print(json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


def _search(args, prof, size, manifest, work, figures, tuning) -> None:
    t0 = time.perf_counter()
    table = tuning.run_search(
        manifest,
        prof,
        project_dir=work / "tuner",
        mode="fresh",
        kind="hyperband",
        max_trials=args.trials or prof.tuner_trials,
        epochs=args.epochs or prof.tuner_epochs,
        image_size=size,
        seed=0,
        weights=args.weights,
        crop_roi=True,
        copies=2,
        cache_dir=work / "cache",
        distribution_strategy=None,
        hypermodel_options={"unfreeze_blocks": (0,)},
    )
    figures["search_s"] = round(time.perf_counter() - t0, 1)
    done = table[table["status"] == "COMPLETED"]
    figures["trials"] = int(len(table))
    figures["completed"] = int(len(done))
    figures["median_trial_s"] = round(float(done["seconds"].median()), 2) if len(done) else None
    figures["best_val_auc_random_weights" if args.weights is None else "best_val_auc"] = (
        round(float(done["score"].max()), 3) if len(done) else None
    )
    n_train = int((manifest["split"] == "train").sum())
    n_val = int((manifest["split"] == "val").sum())
    print(
        f"search: {len(table)} trials ({len(done)} completed) in {figures['search_s']} s "
        f"(includes loading images and caching features of {n_train} train x 3 + {n_val} val images); "
        f"median trial {figures['median_trial_s']} s",
        flush=True,
    )


def _throughput(args, size, figures, course, keras, np) -> None:
    """Images/s of the frozen base (forward) and of fine-tuning block 5 (forward + backward)."""
    model, _ = course.build_vgg16_classifier(size, args.weights)
    rng = np.random.default_rng(0)
    x = rng.random((args.finetune_images, size, size, 1), dtype=np.float32)
    y = (rng.random(args.finetune_images) < 0.3).astype(np.float32)
    model.predict(x[:128], batch_size=64, verbose=0)  # compile for the measured batch size first
    t0 = time.perf_counter()
    model.predict(x, batch_size=64, verbose=0)
    figures["forward_img_per_s"] = round(len(x) / (time.perf_counter() - t0), 1)
    course.unfreeze_top_blocks(model, 1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5), loss="binary_crossentropy", metrics=course.classifier_metrics()
    )
    model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0)  # compile first
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    figures["finetune_img_per_s"] = round(len(x) / (time.perf_counter() - t0), 1)
    print(
        f"VGG16 at {size} px: forward {figures['forward_img_per_s']} img/s, fine-tuning (block 5 + head) "
        f"{figures['finetune_img_per_s']} img/s; mixed precision: {figures['mixed_precision']}",
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
