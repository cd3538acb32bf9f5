"""Seconds per frozen-base tuner trial: a head on cached VGG16 features vs the full model.

    .venv/bin/python benchmarks/bench_tuner.py [--data DIR] [--n 200] [--image-size 64]
                                                [--trials 3] [--epochs 3] [--copies 2]
                                                [--weights auto] [--seed 0]

Both sides run the same trials - the same hyperparameter values (head width, dropout,
optimizer, learning rate, augmentation strength, batch size; base frozen, i.e.
``unfreeze_blocks = 0``), the same training and validation images (by default a synthetic set of
``--n`` slices made with ``cspine data synth`` in a temporary folder, split with
``data.choose_split``), ``--epochs`` epochs each, in one process (trial 1 cached, trial 1
naive, trial 2 cached, ..., so that changes in the load of a shared machine hit both sides):

* **naive** (notebook 04's plain search): the classifier of ``course.build_vgg16_classifier``, base frozen, fed
  images already decoded in memory (shuffled, batched and augmented at the trial's strength with
  ``pipeline.augmentation_layers``), so VGG16 runs again over every training and validation
  image in every epoch;
* **cached**: ``tuning.VGGHyperModel.build`` + ``fit``, which trains the head alone on the
  1024 pooled features per image that ``tuning.FeatureCache`` computed once: the images as they
  are, and ``--copies`` augmented copies per augmentation strength used (epoch ``e`` uses copy
  ``e mod copies``).

A trial is timed from building its model to the end of ``fit`` (both sides pay for building,
compiling and tracing). The one-off cache build - one pass over the training and validation
images plus ``copies`` passes over the training images per strength used - is timed on its own.
Printed: seconds per trial for both, the cache build, and two ratios:

* ``ratio (naive / cached)``: mean naive trial / mean cached trial, **excluding** the cache build
  (the cost of each further trial once the cache exists: what a long search converges to);
* ``amortised ratio``: total naive time / (total cached time + cache build), **including** the
  build spread over the ``--trials`` trials run here.

The ``cpu`` profile uses 96 px images (try ``--image-size 96``) and ~840 training slices; the
naive cost grows with pixels x images x epochs while a cached trial hardly grows, so both ratios
rise with the profile. Target: ratio (naive / cached) at least 10x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out

import keras_tuner  # noqa: E402

from cspine_utils import cli, course, data, hardware, pretrained, tuning  # noqa: E402

TARGET_RATIO = 10.0

#: The trials both sides run (cycled when --trials > 3). All keep the base frozen.
TRIALS = (
    {
        "head_units": 128,
        "dropout": 0.4,
        "optimizer": "adam",
        "lr_head": 1e-3,
        "augment_strength": 0.0,
        "batch_size": 32,
    },
    {
        "head_units": 64,
        "dropout": 0.3,
        "optimizer": "rmsprop",
        "lr_head": 5e-4,
        "augment_strength": 0.5,
        "batch_size": 16,
    },
    {"head_units": 256, "dropout": 0.5, "optimizer": "sgd", "lr_head": 2e-3, "augment_strength": 1.0, "batch_size": 32},
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="dataset folder (default: generate one)")
    ap.add_argument("--n", type=cli.positive_int, default=200, help="slices to generate (default 200)")
    ap.add_argument(
        "--image-size", type=cli.positive_int, default=64, help="side in pixels (default 64; the cpu profile uses 96)"
    )
    ap.add_argument("--trials", type=cli.positive_int, default=3, help="trials per side (default 3)")
    ap.add_argument("--epochs", type=cli.positive_int, default=3, help="epochs per trial (default 3)")
    ap.add_argument(
        "--copies",
        type=cli.positive_int,
        default=tuning.DEFAULT_COPIES,
        help=f"augmented copies cached per strength (default {tuning.DEFAULT_COPIES})",
    )
    ap.add_argument(
        "--weights", default="auto", help="VGG16 weights: auto, imagenet, hed-bsds500, none (timing is the same)"
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def naive_trial(values: dict, arrays, image_size: int, info: pretrained.WeightsInfo, epochs: int, seed: int) -> float:
    """Full classifier, base frozen, trained on images; returns the best validation AUC."""
    import keras  # noqa: PLC0415

    x_train, y_train, x_val, y_val = arrays
    model, _ = course.build_vgg16_classifier(image_size, info, values["head_units"], values["dropout"])
    tuning.compile_for_search(model, values["lr_head"], values["optimizer"])
    strength = values["augment_strength"]
    train = tuning.image_dataset(x_train, y_train, values["batch_size"], training=True, strength=strength, seed=seed)
    val = tuning.image_dataset(x_val, y_val, values["batch_size"], training=False)
    history = model.fit(
        train,
        validation_data=val,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        class_weight=course.balanced_class_weights(y_train),
    )
    del model
    keras.backend.clear_session()
    return max(history.history["val_auc"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.image_size
    weights = None if args.weights.strip().lower() in ("none", "random") else args.weights
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench_tuner_") as tmp:
        if args.data is None:
            root = Path(tmp) / "synthetic"
            rc = cli.main(
                ["data", "synth", "--out", str(root), "--n", str(args.n), "--seed", str(args.seed), "--quiet"]
            )
            if rc:
                return rc
        else:
            root = args.data.expanduser()
        manifest, _ = data.choose_split(data.discover(root).manifest, seed=args.seed)
        tuning_data = tuning.TuningData(manifest, size)
        arrays = tuning_data.arrays()  # decoded once, for both sides; not timed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "auto" fallback is printed below
        info = pretrained.resolve_vgg16_weights(weights)
    config_seed = args.seed
    trials = [TRIALS[i % len(TRIALS)] for i in range(args.trials)]
    strengths = sorted({t["augment_strength"] for t in trials})
    n_train, n_val = len(arrays[1]), len(arrays[3])

    # -- cached: build the cache once -----------------------------------------------------------
    cache = tuning.FeatureCache(size, info, copies=args.copies, seed=config_seed)
    hypermodel = tuning.VGGHyperModel(
        size, info, feature_cache=cache, seed=config_seed, strengths=strengths, unfreeze_blocks=(0,)
    )
    keras.utils.set_random_seed(config_seed)
    t0 = time.perf_counter()
    for s in strengths:
        cache.get(arrays[0], s, fingerprint=tuning_data.train_fingerprint)
    cache.get(arrays[2], 0.0, fingerprint=tuning_data.val_fingerprint)
    cache.release()
    build = time.perf_counter() - t0
    passes_train = sum(1 if s == 0 else args.copies for s in strengths)

    # -- the trials, cached and naive in turn (so a change in machine load hits both) ----------
    cached_times, cached_auc, naive_times, naive_auc = [], [], [], []
    for values in trials:
        hp = keras_tuner.HyperParameters()
        hypermodel.hyperparameter_values(hp)  # declare the space, then set this trial's values
        hp.values.update({**values, "unfreeze_blocks": 0})
        keras.backend.clear_session()
        t0 = time.perf_counter()
        head = hypermodel.build(hp)
        result = hypermodel.fit(hp, head, tuning_data, epochs=args.epochs)
        cached_times.append(time.perf_counter() - t0)
        cached_auc.append(result["val_auc"])

        keras.backend.clear_session()
        t0 = time.perf_counter()
        naive_auc.append(naive_trial(values, arrays, size, info, args.epochs, config_seed))
        naive_times.append(time.perf_counter() - t0)

    # -- report ----------------------------------------------------------------------------------
    print(
        f"{n_train} training + {n_val} validation slices ({root.name}), {size}x{size}, "
        f"{len(trials)} frozen-base trial(s) x {args.epochs} epoch(s), {os.cpu_count()} CPU cores, "
        f"{hardware.describe_device().split(';')[0]}, TensorFlow {tf.__version__}"
    )
    print(f"weights: {info.description}")
    print(
        f"cache build (one-off): {build:.1f} s = {passes_train} pass(es) over the training set "
        f"(strengths {', '.join(f'{s:g}' for s in strengths)}; {args.copies} augmented copies each) "
        f"+ 1 over the validation set, including building the extractor"
    )
    print(
        f"{'trial':>5}  {'strength':>8}  {'batch':>5}  {'naive s':>8}  {'cached s':>8}  {'ratio':>6}"
        f"  {'val_auc naive / cached':>22}"
    )
    for i, (values, tn, tc, an, ac) in enumerate(
        zip(trials, naive_times, cached_times, naive_auc, cached_auc), start=1
    ):
        print(
            f"{i:>5}  {values['augment_strength']:>8g}  {values['batch_size']:>5}  {tn:>8.2f}  "
            f"{tc:>8.2f}  {tn / tc:>5.1f}x  {an:>10.3f} / {ac:.3f}"
        )
    mean_naive = sum(naive_times) / len(trials)
    mean_cached = sum(cached_times) / len(trials)
    ratio = mean_naive / mean_cached
    amortised = sum(naive_times) / (sum(cached_times) + build)
    print(
        f"seconds per trial: naive {mean_naive:.2f} s, cached {mean_cached:.2f} s "
        f"(+ {build / len(trials):.2f} s of cache build per trial when amortised over {len(trials)})"
    )
    print(f"ratio (naive / cached): {ratio:.1f}x   [excluding the one-off cache build]")
    print(
        f"amortised ratio (naive / (cached + build)): {amortised:.1f}x   "
        f"[including the cache build, spread over {len(trials)} trial(s)]"
    )
    saved = mean_naive - mean_cached
    if saved > 0:
        print(
            f"the cache pays for itself after {build / saved:.1f} trial(s); with more trials "
            f"the amortised ratio approaches {ratio:.1f}x"
        )
    print(f"target >= {TARGET_RATIO:.0f}x (excluding the build): {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
