"""Run the course notebooks in order with papermill and render the report for readers.

:func:`run_course` (``cspine run``, ``make run``) executes ``notebooks/NN_*.ipynb`` in order into
``report/executed/`` (never over the source), with progress and an ETA. A failing notebook stops the
run with one message (notebook, cell, error); its partial copy is kept and ``--from NN`` resumes.
:func:`render_report` writes ``report/html/``, ``README.md`` (the same text as ``index.html``) and
``run.json`` (the facts, for tools). The report shows paths relative to the repository only, and
says what it ran on: its note, data source and captions are computed from the run (phantom or your
data, the audit's alarms, what notebook 01 measured), and an audit alarm stands above the metrics.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import config
from .records import COURSE_PACKAGES, package_versions, read_json, shown_path, write_json

# Figures shown inline in the report index, in this order, when they exist; the captions of the
# first two are computed by _captions (the montage only for the phantom, the class means as measured).
KEY_FIGURES = (
    ("phantom_montage", "The synthetic CT phantom: normal and fracture slices, fracture masks in red"),
    ("01_class_means", "Mean image per class"),
    ("02_augmentation_gallery", "Augmentation for axial CT"),
    ("03_cnn_learning_curves", "CNN learning curves"),
    ("04_vgg_learning_curves", "VGG16 learning curves (head, then fine-tuning)"),
    ("05_roc_pr", "ROC and PR curves of both models on the test split"),
    ("05_calibration", "Calibration"),
    ("05_localisation_methods", "Heatmap methods compared: pointing game on test fractures, per type"),
    ("05_gradcam_true_positives", "The heatmap chosen on validation, on true positives (fracture mask outlined)"),
    ("05_error_gallery", "Errors: false negatives first"),
    ("gui", "The upload-and-predict app (Voilà, real browser)"),
    ("07_study_views", "A CT study as a volume: axial, coronal and sagittal planes, fracture boxes and vertebra masks"),
    (
        "07_slice_scores",
        "Slice scores along test studies (fracture-box slices in red): what max, top-k and the GRU aggregate",
    ),
)
TITLE = "Cervical spine fracture detection on CT — the rendered course"
NOTE = "Teaching project, not a medical device."
#: Largest difference (0-1 grey scale) of the two class-mean images (notebook 01) from which the
#: classes are said to differ in coarse appearance (the cpu phantom measures below 0.1).
CLASS_MEANS_VISIBLE = 0.15
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
#: Notebooks whose ``DATA_DIR`` is a folder of CT studies (RSNA layout or a prepared cache), not slices.
STUDY_NOTEBOOKS = ("07_studies_2p5d",)
_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}
_METRIC_PREFIXES = ("model", "weights", "n", "ROC AUC", "PR AUC", "sensitivity (", "specificity (")


class NotebookFailed(RuntimeError):
    """A notebook raised: which one, in which cell, what error, and where the partial copy is."""

    def __init__(self, notebook: str, cell: int | None, error: str, partial: Path):
        self.notebook, self.cell, self.error, self.partial = notebook, cell, error, partial
        where = f"cell {cell}" if cell is not None else "an unknown cell"
        super().__init__(
            f"notebook {notebook} failed in {where}: {error}. The partially executed notebook is "
            f"kept at {partial}. Fix the problem and resume with: cspine run --from {notebook[:2]}"
        )


@dataclass
class NotebookRun:
    """One executed notebook: name, wall time in seconds, path of the executed copy."""

    name: str
    seconds: float
    output: str


def course_notebooks(notebooks_dir: str | os.PathLike | None = None) -> list[Path]:
    """The course notebooks ``NN_*.ipynb`` in order."""
    folder = Path(notebooks_dir) if notebooks_dir else config.repo_root() / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder not found: {folder}")
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not found:
        raise FileNotFoundError(f"no course notebooks (NN_name.ipynb) in {folder}")
    return found


def select_notebooks(notebooks: list[Path], only: str | None = None, start_from: str | None = None) -> list[Path]:
    """Filter by ``only`` ("03,04") or ``start_from`` ("04"): numbers or name prefixes."""
    key = lambda t: t.strip().zfill(2) if t.strip().isdigit() else t.strip()  # noqa: E731 - "3" means "03"
    have = ", ".join(n.stem for n in notebooks)
    if only and start_from:
        raise ValueError("use either --only or --from, not both")
    if only:
        wanted = [key(t) for t in only.split(",") if t.strip()]
        missing = [w for w in wanted if not any(nb.stem.startswith(w) for nb in notebooks)]
        if missing:
            raise ValueError(f"no notebook matches {', '.join(missing)}; have {have}")
        return [nb for nb in notebooks if any(nb.stem.startswith(w) for w in wanted)]
    if start_from:
        idx = next((i for i, nb in enumerate(notebooks) if nb.stem.startswith(key(start_from))), None)
        if idx is None:
            raise ValueError(f"no notebook matches {start_from!r}; have {have}")
        return notebooks[idx:]
    return list(notebooks)


def _failing_cell(nb_path: Path) -> int | None:
    """1-based number of the cell that raised, counted in the *source* notebook (papermill's cells skipped)."""
    import nbformat  # noqa: PLC0415

    try:
        nb = nbformat.read(nb_path, as_version=4)
    except (OSError, ValueError):
        return None
    cells = enumerate(_source_cells(nb), 1)
    return next((n for n, c in cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)


def _source_cells(nb) -> list:
    """The cells of an executed notebook that are in its source (papermill's own cells left out)."""
    return [c for c in nb.cells if not _PAPERMILL_TAGS & set(c.get("metadata", {}).get("tags", []))]


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}" if seconds >= 60 else f"{seconds:.0f}s"


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the notebooks' kernels; restore the old environment afterwards."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def _execute(nb: Path, out: Path, parameters: dict) -> float:
    """Run one notebook into ``out`` with papermill (passing only the ``parameters`` it declares); its
    wall time in seconds, or :class:`NotebookFailed`."""
    import papermill  # noqa: PLC0415

    parameters = {k: v for k, v in parameters.items() if k in papermill.inspect_notebook(str(nb))}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(nb), str(out), parameters=parameters, kernel_name="python3", progress_bar=False, cwd=str(nb.parent)
        )
    except papermill.PapermillExecutionError as exc:
        raise NotebookFailed(nb.name, _failing_cell(out), f"{exc.ename}: {exc.evalue}", out) from None
    return time.perf_counter() - start


def run_course(
    profile: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    studies_dir: str | os.PathLike | None = None,
    only: str | None = None,
    start_from: str | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    render: bool = True,
    log: Callable[[str], None] = print,
    before: Callable[[Path], None] | None = None,
) -> list[NotebookRun]:
    """Execute the course notebooks with papermill, then render the report.

    ``profile``: ``smoke``, ``cpu`` or ``gpu`` (default ``CSPINE_PROFILE`` or ``cpu``); ``data_dir``:
    dataset folder (default: the profile's synthetic set); ``studies_dir``: CT studies for notebook 07
    (an RSNA-layout folder or a prepared cache; default: the profile's synthetic studies); ``only="03,04"`` or ``start_from="04"``
    select notebooks; ``report_dir`` receives ``executed/``, ``timings.json`` and the report.
    ``before(notebook)`` runs before each notebook is executed, in the notebooks' environment.
    Raises :class:`NotebookFailed` when a notebook raises (the run stops there).
    """
    prof = config.get_profile(profile)
    report = Path(report_dir) if report_dir else config.report_dir()
    (report / "executed").mkdir(parents=True, exist_ok=True)
    chosen = select_notebooks(course_notebooks(notebooks_dir), only, start_from)
    env = {"CSPINE_PROFILE": prof.name, "CSPINE_REPORT_DIR": str(report.resolve())}
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    for name, folder in (("CSPINE_DATA_DIR", data_dir), ("CSPINE_STUDIES_DIR", studies_dir)):
        if folder:
            if not Path(folder).expanduser().exists():
                raise FileNotFoundError(f"data folder not found: {Path(folder).expanduser()}")
            env[name] = str(Path(folder).expanduser().resolve())
    timings = _read_optional(report / "timings.json")
    runs: list[NotebookRun] = []
    total_start = time.perf_counter()
    with _environ(env):
        for i, nb in enumerate(chosen, 1):
            remaining = sum(timings.get(n.stem, 0.0) for n in chosen[i - 1 :])
            eta = f", ETA {_fmt(remaining)} for the rest (previous run)" if remaining else ""
            log(f"[{i}/{len(chosen)}] {nb.stem} (profile {prof.name}{eta}) ...")
            out = report / "executed" / nb.name
            if before is not None:
                before(nb)
            study = nb.stem in STUDY_NOTEBOOKS
            data = env.get("CSPINE_STUDIES_DIR" if study else "CSPINE_DATA_DIR", "")
            seconds = _execute(nb, out, {"PROFILE": prof.name, "DATA_DIR": data})
            timings[nb.stem] = round(seconds, 1)
            write_json(report / "timings.json", timings, sort_keys=True)
            runs.append(NotebookRun(nb.stem, round(seconds, 1), str(out)))
            log(f"      done in {_fmt(seconds)} (elapsed {_fmt(time.perf_counter() - total_start)})")
    if render:
        data = env.get("CSPINE_DATA_DIR")
        index = render_report(report_dir=report, notebooks_dir=notebooks_dir, profile=prof.name, data_dir=data)
        log(f"report: {shown_path(index)}")
    return runs


def _git_commit(path: Path) -> str:
    try:
        cmd = ["git", "log", "-1", "--format=%H", "--", "."]
        out = subprocess.run(cmd, cwd=path, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_optional(path: Path) -> dict:
    """A JSON record written by a notebook, or ``{}`` when that notebook has not run."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _bundle_facts(art: Path) -> dict[str, dict]:
    """Per saved bundle: where its weights came from, threshold, image size, validation metrics."""
    bundles = {}
    for path in sorted((art / "models").glob("*/bundle.json")):
        b = _read_optional(path)
        w = b.get("weights")
        weights = w.get("description", "random init (trained from scratch)") if w else "none: trained from scratch"
        kept = {k: b.get(k) for k in ("threshold", "image_size", "val_metrics")}
        bundles[path.parent.name] = {"weights": weights, **kept}
    return bundles


def _data_source(audit: dict, data_dir: str | None, profile: str) -> tuple[bool, str]:
    """(whether the data are the phantom, the data folder without a machine path and its layout)."""
    layout = audit.get("layout") or ("" if data_dir else "synthetic")
    if layout == "synthetic" and not data_dir:
        return True, f"synthetic phantom (default dataset of the {profile} profile)"
    where = data_dir or audit.get("root")
    shown = shown_path(where) if where else "unknown data"
    return layout == "synthetic", shown + (f" ({layout} layout)" if layout not in ("", "synthetic") else "")


def _alarms(audit: dict) -> list[str]:
    """The audit's alarms that make a test score no evidence of fracture detection, in words."""
    from . import data  # noqa: PLC0415 - pandas only when rendering

    alarms = []
    if audit.get("shortcut_alarm"):
        alarms.append(f"shortcut AUC {audit['shortcut_auc']:.2f}")
    if audit.get("labels_confounded_with_patients"):
        alarms.append("labels confounded with patients")
    try:
        leaking = data.cross_split_leakage(data.load_manifest(data.artifacts_manifest_path()))
    except (OSError, ValueError):
        leaking = []
    return alarms + ([f"{len(leaking)} group(s) with slices in two splits"] if leaking else [])


def _collect_facts(report: Path, notebooks: list[Path], profile: str, data_dir: str | None) -> dict:
    art = config.artifacts_dir()
    timings = _read_optional(report / "timings.json")
    audit = _read_optional(art / "data" / "audit.json")
    audit_keys = ("layout", "n_files", "n_rejected", "n_groups", "n_patients", "leaking_groups", "leaking_patients")
    audit_keys += ("shortcut_auc", "shortcut_alarm", "labels_confounded_with_patients", "warnings")
    versions = package_versions((*COURSE_PACKAGES, "papermill"))
    phantom, source = _data_source(audit, data_dir, profile)
    return {
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notebooks_commit": _git_commit(notebooks[0].parent) if notebooks else "unknown",
        "profile": profile,
        "data_source": source,
        "phantom": phantom,
        "alarms": _alarms(audit),
        "class_means": _read_optional(art / "data" / "class_means.json") or None,
        "app_screenshot": _read_optional(report / "figures" / "gui.json") or None,
        "notebooks": [
            {"name": nb.stem, "html": f"html/{nb.stem}.html", "seconds": timings.get(nb.stem)} for nb in notebooks
        ],
        "total_seconds": round(sum(timings.get(nb.stem, 0.0) for nb in notebooks), 1),
        "audit": {k: audit[k] for k in audit_keys if k in audit},
        "bundles": _bundle_facts(art),
        "metrics": _read_optional(art / "metrics" / "combined.json") or None,
        "studies": _read_optional(art / "studies" / "metrics.json") or None,
        "versions": {k: v for k, v in versions.items() if v is not None},
    }


def render_report(
    report_dir: str | os.PathLike | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    profile: str | None = None,
    data_dir: str | None = None,
) -> Path:
    """Render executed notebooks to HTML and write ``index.html``, ``README.md`` and ``run.json``."""
    import nbformat  # noqa: PLC0415
    from nbconvert import HTMLExporter  # noqa: PLC0415

    report = Path(report_dir) if report_dir else config.report_dir()
    notebooks = course_notebooks(notebooks_dir)
    (report / "html").mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    for nb in notebooks:
        executed = report / "executed" / nb.name
        if not executed.is_file():
            raise FileNotFoundError(f"{executed} not found: run the course first (cspine run)")
        body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
        (report / "html" / f"{nb.stem}.html").write_text(body, encoding="utf-8")
    facts = _collect_facts(report, notebooks, config.get_profile(profile).name, data_dir)
    figures = [(name, caption) for name, caption in _captions(facts) if (report / "figures" / f"{name}.png").is_file()]
    facts["figures"] = [f"figures/{name}.png" for name, _ in figures]
    write_json(report / "run.json", facts)
    markdown = _markdown(facts, figures)
    (report / "README.md").write_text(markdown, encoding="utf-8")
    (report / "index.html").write_text(_html(markdown), encoding="utf-8")
    return report / "index.html"


# The report's content is written once, in Markdown (README.md); index.html is that text rendered.
def _captions(facts: dict) -> list[tuple[str, str]]:
    """:data:`KEY_FIGURES` as this run allows: the phantom montage only for phantom data, the
    class-means caption from the difference notebook 01 measured (``class_means.json``)."""
    means = facts.get("class_means") or {}
    out = []
    for name, caption in KEY_FIGURES:
        if name == "phantom_montage" and not facts["phantom"]:
            continue
        if name == "01_class_means" and isinstance(means.get("max_abs_difference"), (int, float)):
            diff = means["max_abs_difference"]
            verdict = (
                "no coarse difference between the classes"
                if diff < CLASS_MEANS_VISIBLE
                else "the classes differ in coarse appearance, a shortcut a network can learn"
            )
            caption = f"{caption}: largest difference {diff:.2f} of the grey range, {verdict}"
        out.append((name, caption))
    return out


def _note(facts: dict) -> str:
    if facts["phantom"]:
        return f"{NOTE} Results are on the course's synthetic phantom: they say nothing about real CT."
    return f"{NOTE} Results are on {facts['data_source']}, not the phantom; read the dataset audit before any figure."


def _metrics_markdown(facts: dict) -> list[str]:
    """Notebook 05's combined test-set table (model, weights, n, AUCs, sensitivity/specificity)."""
    metrics = facts.get("metrics") or {}
    records = metrics.get("table") or []
    if not records:
        return []
    # model, weights, n in this order; then the AUCs, sensitivities and specificities in table order
    header = [c for c in _METRIC_PREFIXES[:3] if c in records[0]]
    header += [c for c in records[0] if c.startswith(_METRIC_PREFIXES[3:])]
    lines = ["## Test-set metrics (95 % CIs by grouped bootstrap)", ""]
    if facts.get("alarms"):
        lines += [f"**Not evidence of fracture detection: {', '.join(facts['alarms'])}** (dataset audit below).", ""]
    lines += [_row(header), "|" + "---|" * len(header)]
    lines += [_row(str(r.get(c, "")) for c in header) for r in records] + [""]
    if metrics.get("paired_test"):
        lines += [f"Paired bootstrap test of the AUC difference: {metrics['paired_test']}", ""]
    return lines + _calibration_and_localisation(metrics)


def _ci(entry: dict) -> str:
    """A recorded interval (``value``, ``ci_low``, ``ci_high``) as "0.123 [0.100, 0.150]"."""
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _calibration_and_localisation(metrics: dict) -> list[str]:
    """One line per model: ECE and Brier before/after calibration, and the chosen heatmap's pointing game."""
    lines = []
    for name, cal in (metrics.get("calibration") or {}).items():
        if {"before", "after"} <= set(cal):
            b, a = cal["before"], cal["after"]
            lines.append(
                f"- **{name}** calibration (T = {cal['temperature']:.2f}, b = {cal['bias']:+.2f}, fitted on validation): "
                f"test ECE {_ci(b['ece'])} → {_ci(a['ece'])}, Brier {_ci(b['brier'])} → {_ci(a['brier'])}"
            )
    lines += [
        f"- **{name}** heatmap chosen on validation: {text}"
        for name, text in (metrics.get("localisation") or {}).items()
    ]
    return lines + [""] if lines else []


def _studies_markdown(facts: dict) -> list[str]:
    """Notebook 07's study-level table (RSNA 2022 format) and whether its targets were met."""
    studies = facts.get("studies") or {}
    records, targets = studies.get("table") or [], studies.get("targets") or {}
    if not records:
        return []
    n = studies.get("n_studies") or {}
    lines = [
        "## Study-level results (notebook 07, RSNA 2022 format; CIs by study bootstrap)",
        "",
        f"{n.get('test', '?')} test studies ({n.get('test_fractured', '?')} fractured) of {n.get('labelled', '?')}; "
        f"slice input: {studies.get('channel_mode')}; VGG16: {studies.get('weights')}; {studies.get('strategy')}.",
        "",
        _row(records[0]),
        "|" + "---|" * len(records[0]),
    ]
    lines += [_row(str(r.get(c, "")) for c in records[0]) for r in records] + [""]
    if {"study_auc", "minus_baseline"} <= set(targets):
        met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
        lines += [
            f"Targets ({targets.get('aggregation')}, chosen on validation): study AUC {_ci(targets['study_auc'])} "
            f"(≥ 0.95: {met(targets.get('study_auc_met'))}); weighted log loss minus the prevalence-only baseline "
            f"{_ci(targets['minus_baseline'])} (CI below 0: {met(targets.get('log_loss_met'))}).",
            "",
        ]
    return lines


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown(facts: dict, figures: list[tuple[str, str]]) -> str:
    byline = (
        f"Profile **{facts['profile']}** · data: {facts['data_source']} · rendered {facts['rendered']} · "
        f"notebooks at commit `{facts['notebooks_commit'][:12]}`"
    )
    lines = [f"# {TITLE}", "", f"> {_note(facts)}", "", byline, "", "## Notebooks", "", _row(["notebook", "wall time"])]
    lines.append("|---|---|")
    for nb in facts["notebooks"]:
        secs = "not run" if nb["seconds"] is None else f"{nb['seconds']:.0f} s"
        lines.append(_row([f"[{nb['name']}]({nb['html']})", secs]))
    lines += ["", f"Total: {facts['total_seconds']:.0f} s", ""] + _metrics_markdown(facts) + _studies_markdown(facts)
    if facts["bundles"]:
        lines += ["## Models and weights", ""]
        for name, b in facts["bundles"].items():
            threshold = f"{b['threshold']:.3f}" if isinstance(b["threshold"], float) else b["threshold"]
            lines.append(f"- **{name}**: {b['weights']}; threshold {threshold}, {b['image_size']} px")
        lines.append("")
    audit = facts.get("audit") or {}
    if audit:
        summary = (
            f"{audit.get('n_files')} files, {audit.get('n_groups')} source groups, {audit.get('n_patients', 0)} "
            f"patients, {audit.get('n_rejected')} rejected, leaking groups: {len(audit.get('leaking_groups') or [])}, "
            f"shortcut AUC: {audit.get('shortcut_auc')}"
        )
        lines += ["## Dataset audit", "", summary, ""] + [f"- {w}" for w in audit.get("warnings") or []] + [""]
    lines += ["## Key figures", ""] if figures else []
    for name, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}](figures/{name}.png)", ""]
        if name == "gui" and facts.get("app_screenshot"):
            from .appshot import caption as screenshot_caption  # noqa: PLC0415

            lines += [screenshot_caption(facts["app_screenshot"]), ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in facts["versions"].items()), ""]
    return "\n".join(lines)


def _html(markdown: str) -> str:
    """The Markdown report as a standalone page (rendered by mistune, nbconvert's Markdown library)."""
    import mistune  # noqa: PLC0415

    body = mistune.create_markdown(escape=True, plugins=["table"])(markdown)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}blockquote{background:#fff3cd;margin:0;padding:.1em 1em;border-radius:6px}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{TITLE}</title>\n'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def refresh_checked_outputs(notebook: str | os.PathLike, executed: str | os.PathLike) -> int:
    """Copy the text outputs of ``# NBVAL_CHECK_OUTPUT`` cells from an executed copy into the source.

    nbval compares a fresh run of those deterministic cells with the stored output, so the source
    keeps exactly these outputs (``keep_output``, for nbstripout) with their execution counts
    (nbval ignores the outputs of a cell stored without one) and no others. Returns the number of
    cells updated. Run it after editing such a cell and running the course (``cspine run --only NN``).
    """
    import nbformat  # noqa: PLC0415

    src = nbformat.read(notebook, as_version=4)
    run_cells = _source_cells(nbformat.read(executed, as_version=4))
    if len(run_cells) != len(src.cells):
        raise ValueError(f"{executed} does not match {notebook} cell for cell (was the source edited since?)")
    code = [(s, r) for s, r in zip(src.cells, run_cells) if s.cell_type == "code"]
    for s, r in code:
        checked = CHECK_MARK in s.source
        s.execution_count = r.get("execution_count") if checked else None
        s.outputs = [o for o in r.outputs if o.get("output_type") in ("stream", "execute_result")] if checked else []
        for o in s.outputs:
            if o.get("output_type") == "execute_result":
                o["data"] = {k: v for k, v in o.get("data", {}).items() if k == "text/plain"}
        s.metadata.pop("keep_output", None)
        s.metadata.update({"keep_output": True} if checked else {})
    nbformat.write(src, notebook)
    return sum(CHECK_MARK in s.source for s, _ in code)
