"""The ``cspine`` command line.

    cspine data synth --out DIR --n N --seed S [--difficulty D]   generate a synthetic dataset
    cspine data synth --format rsna --studies N --out DIR        synthetic CT studies (RSNA 2022 layout)
    cspine data default [--profile P]                            the profile's default dataset
    cspine data montage --out PNG                                figure of the phantom
    cspine data prepare RSNA_DIR --out CACHE [--shard i/n]       CT studies → windowed cache
    cspine run [--profile P] [--data-dir D] [--only 03,04] [--from 04] [--app-screenshot PNG]
                                                                the whole course + report
    cspine audit DATA_DIR [--json] [--seed S]                   dataset checks before training
    cspine predict PATH... [--model DIR] [--threshold T] [--json] [--gradcam OUT_DIR]
                                                                fracture probabilities (teaching only)

Errors are printed as one line naming the problem (exit code 1); usage errors exit with 2.
TensorFlow is started as quietly as in the notebooks (:func:`config.quiet_tensorflow_start`): its
benign native start-up notices are held back, genuine errors still reach stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import config


def positive_int(text: str) -> int:
    """``argparse`` type for a count that must be at least 1 (used by the benchmark scripts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_synth(args: argparse.Namespace) -> int:
    from . import phantom  # noqa: PLC0415

    if args.format == "rsna":
        opts = {"seed": args.seed, "matrix": args.matrix, "slice_mm": args.slice_mm, "difficulty": args.difficulty}
        return _generate_studies(Path(args.out), args.studies, opts, args.workers, args.force, args.quiet)
    if args.n is None:
        raise ValueError("--n (number of slices) is required for --format kaggle")
    fields = ("n", "seed", "difficulty", "fracture_fraction", "slices_per_subject", "val_fraction", "ct_model")
    cfg = phantom.SynthConfig(**{name: getattr(args, name) for name in fields})
    return _generate(Path(args.out), cfg, args.workers, args.force, quiet=args.quiet)


def _generate(out: Path, cfg, workers, force: bool, quiet: bool = False) -> int:
    from . import phantom  # noqa: PLC0415

    cfg.validate()
    if not force and phantom.is_up_to_date(out, cfg):
        print(f"synthetic dataset up to date: {out.resolve()} ({cfg.n} slices, seed {cfg.seed})")
        return 0
    t0 = time.perf_counter()
    manifest = phantom.generate_dataset(out, cfg, workers=workers, progress=not quiet, force=True)
    n_frac = int((manifest["label"] == "fracture").sum())
    print(
        f"wrote {len(manifest)} slices ({n_frac} fracture, {len(manifest) - n_frac} normal, "
        f"{manifest['subject_id'].nunique()} subjects) to {out.resolve()} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_default(args: argparse.Namespace) -> int:
    from . import phantom  # noqa: PLC0415

    prof = config.get_profile(args.profile)
    rc = _generate(
        config.synthetic_data_dir(prof),
        phantom.SynthConfig(n=prof.n_synthetic, seed=0),
        None,
        args.force,
        quiet=args.quiet,
    )
    opts = {"seed": 0, "matrix": prof.study_matrix, "slice_mm": prof.study_slice_mm}
    return rc or _generate_studies(
        config.synthetic_studies_dir(prof), prof.n_studies, opts, None, args.force, args.quiet
    )


def _generate_studies(out: Path, n_studies: int, opts: dict, workers, force: bool, quiet: bool) -> int:
    """Write (or reuse, when up to date) a synthetic CT study set in the RSNA 2022 layout."""
    from . import phantom3d  # noqa: PLC0415

    params = {"n_studies": n_studies, "difficulty": 0.5} | opts
    if not force and phantom3d.is_up_to_date(out, **params):
        print(f"synthetic CT studies up to date: {out.resolve()} ({n_studies} studies, seed {params['seed']})")
        return 0
    t0 = time.perf_counter()
    info = phantom3d.write_rsna_dataset(out, workers=workers, progress=not quiet, force=True, **params)
    print(
        f"wrote {info['studies']} CT studies ({info['fractured']} fractured, {info['slices']} slices, "
        f"{info['j2k_studies']} in JPEG 2000) to {out.resolve()} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def shard_arg(text: str) -> tuple[int, int]:
    """``argparse`` type for ``--shard i/n`` (1 <= i <= n)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 1/4, got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"needs 1 <= i <= n, got {text!r}")
    return i, n


def _cmd_prepare(args: argparse.Namespace) -> int:
    """``cspine data prepare``: 0 = every study prepared (or already done), 1 = some skipped."""
    from . import series  # noqa: PLC0415

    prof = config.get_profile(args.profile)
    rep = series.prepare(
        args.rsna_dir,
        args.out,
        size=args.size or prof.cache_size,
        crop_mm=args.crop_mm or prof.cache_crop_mm,
        spacing_mm=args.spacing_mm or prof.cache_spacing_mm,
        workers=args.workers,
        shard=args.shard,
        progress=not args.quiet,
    )
    c = rep["counts"]
    print(
        f"prepared {c['prepared']} of {c['studies']} studies (shard {rep['shard']}; {c['already_done']} already done, "
        f"{c['failed']} skipped) into {Path(args.out).resolve()} in {rep['seconds']:.1f} s "
        f"({rep['slices_per_s'] or 0:.0f} slices/s, {rep['workers']} workers); {c['in_cache']} studies in the cache"
    )
    for item in rep["skipped"]:
        print(f"skipped {item['study']}: {item['reason']}")
    for problem in rep["label_problems"]:
        print(f"label problem: {problem}")
    return 1 if rep["skipped"] else 0


def _cmd_montage(args: argparse.Namespace) -> int:
    from . import plots  # noqa: PLC0415

    out = Path(args.out)
    print(f"wrote {plots.save_figure(plots.phantom_montage(), out.name, folder=out.parent)}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from . import audit  # noqa: PLC0415

    report = audit.audit_dataset(
        Path(args.data_dir), seed=args.seed, max_files=args.max_files, group_method=args.group_method
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import appshot, report  # noqa: PLC0415

    before = appshot.course_hook(args.app_screenshot) if args.app_screenshot else None
    try:
        runs = report.run_course(
            args.profile,
            args.data_dir,
            studies_dir=args.studies_dir,
            only=args.only,
            start_from=args.start_from,
            render=not args.no_render,
            before=before,
        )
    except report.NotebookFailed as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 1
    print(f"ran {len(runs)} notebooks in {sum(r.seconds for r in runs) / 60:.1f} min")
    return 0


def _usage_error(message: str) -> int:
    print(f"cspine predict: error: {message}", file=sys.stderr)
    return 2


def _cmd_predict(args: argparse.Namespace) -> int:
    """``cspine predict``: 0 = every file predicted, 1 = some failed, 2 = usage error."""
    from . import modelbundle, predict  # noqa: PLC0415

    print(f"cspine predict: note: {predict.NOT_FOR_DIAGNOSIS}", file=sys.stderr)
    if not args.paths:
        return _usage_error("give at least one image file, folder or glob (e.g. cspine predict scans/ 'more/*.png')")
    try:
        threshold = predict.check_threshold(args.threshold)
    except ValueError as exc:
        return _usage_error(str(exc))
    bundle_dir = Path(args.model) if args.model else predict.default_bundle_dir()
    if bundle_dir is None:
        return _usage_error(predict.no_model_message())
    config.quiet_tensorflow_start()
    try:
        bundle = modelbundle.load_bundle(bundle_dir)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _usage_error(f"cannot use the model bundle {bundle_dir}: {exc}")
    results = predict.predict_paths(args.paths, bundle, threshold=threshold, gradcam_dir=args.gradcam)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.ok:
                extra = f"  Grad-CAM: {r.gradcam_file}" if r.gradcam_file else ""
                extra += f"  ({r.gradcam_error})" if r.gradcam_error else ""
                extra += "".join(f"  WARNING: {flag}" for flag in r.flags)
                print(f"{r.file}\t{r.probability:.4f}\t{r.label}{extra}")
            else:
                print(f"{r.file}\terror: {r.error}")
    failed = sum(not r.ok for r in results)
    thr = results[0].threshold if results else bundle.threshold
    print(
        f"cspine predict: {len(results) - failed} of {len(results)} file(s) predicted with "
        f"{bundle.path} (threshold {thr:.3f})" + (f"; {failed} could not be used" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def _add_data_parsers(sub) -> None:
    dsub = sub.add_parser("data", help="datasets: generate the synthetic CT phantom").add_subparsers(
        dest="data_command", required=True
    )
    s = dsub.add_parser("synth", help="generate a synthetic dataset (Kaggle slices or RSNA 2022 CT studies)")
    s.add_argument("--out", required=True, help="output folder (new, empty, or an earlier synthetic dataset)")
    s.add_argument("--format", choices=["kaggle", "rsna"], default="kaggle", help="PNG slices or DICOM studies")
    s.add_argument("--n", type=int, default=None, help="number of slices (>= 1; --format kaggle)")
    s.add_argument("--studies", type=int, default=12, help="number of CT studies (--format rsna, default 12)")
    s.add_argument("--matrix", type=int, default=128, help="pixels per side of a slice (--format rsna, default 128)")
    s.add_argument("--slice-mm", type=float, default=2.5, help="slice spacing, mm (--format rsna, default 2.5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    s.add_argument("--difficulty", type=float, default=0.5, help="0 = obvious fractures ... 1 = hairline (default 0.5)")
    s.add_argument("--fracture-fraction", type=float, default=0.3, help="share of fracture slices (default 0.3)")
    s.add_argument("--slices-per-subject", type=int, default=5, help="adjacent levels per subject (default 5)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="share of subjects in val/ (default 0.2)")
    s.add_argument("--ct-model", choices=["nps", "fbp"], default="nps", help="noise model: fast 'nps' or exact 'fbp'")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--force", action="store_true", help="regenerate even if up to date")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_synth)
    df = dsub.add_parser("default", help="generate the default dataset of a profile (reused when up to date)")
    df.add_argument("--profile", default=None, help="smoke | cpu | gpu (default: $CSPINE_PROFILE or cpu)")
    df.add_argument("--force", action="store_true")
    df.add_argument("--quiet", action="store_true")
    df.set_defaults(func=_cmd_default)
    m = dsub.add_parser("montage", help="write the phantom montage figure")
    m.add_argument("--out", default=str(config.figures_dir() / "phantom_montage.png"))
    m.set_defaults(func=_cmd_montage)
    pp = dsub.add_parser("prepare", help="convert RSNA-layout CT studies once into a windowed cache (resumable)")
    pp.add_argument("rsna_dir", metavar="RSNA_DIR", help="folder with train.csv and train_images/<UID>/*.dcm")
    pp.add_argument("--out", required=True, metavar="CACHE", help="cache folder (new, or one to resume)")
    pp.add_argument("--profile", default=None, help="profile whose cache sizes are the defaults (smoke | cpu | gpu)")
    pp.add_argument("--size", type=positive_int, default=None, help="pixels of a cached slice side")
    pp.add_argument("--crop-mm", type=float, default=None, help="side of the in-plane square kept around the spine, mm")
    pp.add_argument("--spacing-mm", type=float, default=None, help="slice spacing of the cache, mm")
    pp.add_argument("--workers", type=positive_int, default=None, help="processes (default: min(cores, 4))")
    pp.add_argument("--shard", type=shard_arg, default=(1, 1), help="i/n: this job's share of the studies")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=_cmd_prepare)


def _add_predict_parser(sub) -> None:
    pr = sub.add_parser(
        "predict", help="fracture probability of images, folders or globs (teaching only, not for diagnosis)"
    )
    where = "PNG, JPEG, BMP, TIFF or DICOM files, folders (searched recursively) or glob patterns"
    pr.add_argument("paths", nargs="*", metavar="PATH", help=where)
    bundle_help = "model bundle folder (default: the best under artifacts/models/: vgg16, then cnn)"
    pr.add_argument("--model", default=None, metavar="BUNDLE_DIR", help=bundle_help)
    pr.add_argument(
        "--threshold", type=float, default=None, help="decision threshold in [0, 1] (default: the bundle's)"
    )
    pr.add_argument("--json", action="store_true", help="print a JSON list of {file, probability, label, error}")
    pr.add_argument(
        "--gradcam", default=None, metavar="OUT_DIR", help="also write a Grad-CAM overlay PNG per file into OUT_DIR"
    )
    pr.set_defaults(func=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The ``cspine`` argument parser: subcommands data (synth, default, montage), audit, run and predict."""
    p = argparse.ArgumentParser(
        prog="cspine", description="Cervical-spine CT fracture course tools (teaching only, not for diagnosis)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub)
    a = sub.add_parser("audit", help="check a dataset before training: counts, duplicates, leakage, shortcuts")
    a.add_argument("data_dir", help="dataset folder (Kaggle, synthetic, split/class folders) or labels CSV")
    a.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    a.add_argument("--seed", type=int, default=0, help="seed of the image sample and the folds (default 0)")
    a.add_argument("--max-files", type=int, default=None, help="images read for the shortcut model (default 4000)")
    a.add_argument("--group-method", default="auto", help="auto | name | subject | hash | name+hash | file")
    a.set_defaults(func=_cmd_audit)
    r = sub.add_parser("run", help="execute the course notebooks in order (papermill) and render the report")
    r.add_argument("--profile", default=None, help="smoke | cpu | gpu (default: $CSPINE_PROFILE or cpu)")
    r.add_argument("--data-dir", default=None, help="dataset folder (default: the profile's synthetic dataset)")
    r.add_argument(
        "--studies-dir",
        default=None,
        help="CT studies for notebook 07: an RSNA 2022-layout folder or a prepared cache (default: the "
        "profile's synthetic studies)",
    )
    r.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 03,04")
    r.add_argument("--from", dest="start_from", default=None, help="resume from this notebook, e.g. 04")
    r.add_argument("--no-render", action="store_true", help="execute only; do not render the report")
    r.add_argument(
        "--app-screenshot",
        default=None,
        metavar="PNG",
        help="before notebook 06, screenshot its app in headless Chromium (Voilà, the course's bundle, a test "
        "fracture slice, Grad-CAM on) into PNG, with PNG's .json beside it; make run: report/figures/gui.png",
    )
    r.set_defaults(func=_cmd_run)
    _add_predict_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``cspine`` with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
