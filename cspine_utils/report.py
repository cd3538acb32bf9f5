"""Run the course notebooks in order with papermill and render the report for readers.

``cspine run`` (and ``make run``) call :func:`run_course`: every notebook ``NN_*.ipynb`` in
``notebooks/`` is executed in order into ``report/executed/`` (never over the source notebook),
with the profile and data folder passed as papermill parameters. Progress is printed per notebook
with an ETA from the previous run's timings. A failing notebook stops the run with one message
naming the notebook, the cell and the error; its partially executed copy is kept, and
``--from NN`` resumes from it.

:func:`render_report` turns the executed notebooks into HTML (nbconvert) and writes
``report/index.html`` and ``report/README.md``: links to each notebook, key figures, the metrics
of both models with confidence intervals, the audit summary, the weights source, profile, data
source, package versions, the git commit of the notebooks and the wall time of each notebook.
``report/run.json`` holds the same facts for tests and tools.
"""

from __future__ import annotations

import html
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import config

__all__ = [
    "NotebookFailed",
    "NotebookRun",
    "course_notebooks",
    "select_notebooks",
    "run_course",
    "refresh_checked_outputs",
    "render_report",
    "KEY_FIGURES",
]

# Figures shown inline in the report index, in this order, when they exist.
KEY_FIGURES = (
    ("phantom_montage", "The synthetic CT phantom: normal and fracture slices, fracture masks in red"),
    ("01_class_means", "Mean image per class: no coarse difference between the classes"),
    ("02_augmentation_gallery", "Augmentation for axial CT"),
    ("03_cnn_learning_curves", "CNN learning curves"),
    ("04_vgg_learning_curves", "VGG16 learning curves (head, then fine-tuning)"),
    ("05_roc_pr", "ROC and PR curves of both models on the test split"),
    ("05_calibration", "Calibration"),
    ("05_gradcam_true_positives", "Grad-CAM on true positives, fracture mask outlined"),
    ("05_error_gallery", "Errors: false negatives first"),
    ("gui", "The upload-and-predict app (Voilà, real browser)"),
)


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
    """One executed notebook."""

    name: str
    seconds: float
    output: str
    status: str = "ok"


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

    def key(token: str) -> str:
        token = token.strip()
        return token.zfill(2) if token.isdigit() else token

    if only and start_from:
        raise ValueError("use either --only or --from, not both")
    if only:
        wanted = [key(t) for t in only.split(",") if t.strip()]
        chosen = [nb for nb in notebooks if any(nb.stem.startswith(w) for w in wanted)]
        missing = [w for w in wanted if not any(nb.stem.startswith(w) for nb in notebooks)]
        if missing:
            raise ValueError(f"no notebook matches {', '.join(missing)}; have {', '.join(n.stem for n in notebooks)}")
        return chosen
    if start_from:
        start = key(start_from)
        idx = next((i for i, nb in enumerate(notebooks) if nb.stem.startswith(start)), None)
        if idx is None:
            raise ValueError(f"no notebook matches {start_from!r}; have {', '.join(n.stem for n in notebooks)}")
        return notebooks[idx:]
    return list(notebooks)


def _timings_path(report: Path) -> Path:
    return report / "timings.json"


def _load_timings(report: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(_timings_path(report).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def _failing_cell(nb_path: Path) -> int | None:
    """Number (1-based, counted in the *source* notebook from the top) of the cell that raised.

    Cells papermill adds to the executed copy (injected parameters, the error banner) are not
    counted, so the number matches what a student sees when opening the source notebook.
    """
    import nbformat  # noqa: PLC0415

    try:
        nb = nbformat.read(nb_path, as_version=4)
    except (OSError, ValueError):
        return None
    number = 0
    for cell in nb.cells:
        if _PAPERMILL_TAGS & set(cell.get("metadata", {}).get("tags", [])):
            continue
        number += 1
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return number
    return None


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}" if seconds >= 60 else f"{seconds:.0f}s"


def run_course(
    profile: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    only: str | None = None,
    start_from: str | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    render: bool = True,
    log: Callable[[str], None] = print,
) -> list[NotebookRun]:
    """Execute the course notebooks with papermill, then render the report.

    Parameters
    ----------
    profile
        ``smoke``, ``cpu`` or ``gpu`` (default: ``CSPINE_PROFILE`` or ``cpu``).
    data_dir
        Dataset folder (default: the profile's synthetic dataset).
    only, start_from
        Run only some notebooks (``"03,04"``) or resume from one (``"04"``).
    notebooks_dir, report_dir
        Where the notebooks are and where ``executed/`` and the report go.

    Raises
    ------
    NotebookFailed
        When a notebook raises; the run stops there.
    """
    import papermill  # noqa: PLC0415

    prof = config.get_profile(profile)
    report = Path(report_dir) if report_dir else config.report_dir()
    executed = report / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    all_notebooks = course_notebooks(notebooks_dir)
    chosen = select_notebooks(all_notebooks, only, start_from)
    env = {
        "CSPINE_PROFILE": prof.name,
        "CSPINE_REPORT_DIR": str(report.resolve()),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    if data_dir:
        data_path = Path(data_dir).expanduser()
        if not data_path.exists():
            raise FileNotFoundError(f"data folder not found: {data_path}")
        env["CSPINE_DATA_DIR"] = str(data_path.resolve())
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    timings = _load_timings(report)
    runs: list[NotebookRun] = []
    total_start = time.perf_counter()
    try:
        for i, nb in enumerate(chosen, 1):
            remaining = sum(timings.get(n.stem, 0.0) for n in chosen[i - 1 :])
            eta = f", ETA {_fmt(remaining)} for the rest (previous run)" if remaining else ""
            log(f"[{i}/{len(chosen)}] {nb.stem} (profile {prof.name}{eta}) ...")
            out = executed / nb.name
            start = time.perf_counter()
            params = {"PROFILE": prof.name, "DATA_DIR": env.get("CSPINE_DATA_DIR", "")}
            try:
                papermill.execute_notebook(
                    str(nb), str(out), parameters=params, kernel_name="python3", progress_bar=False, cwd=str(nb.parent)
                )
            except papermill.PapermillExecutionError as exc:
                raise NotebookFailed(nb.name, _failing_cell(out), f"{exc.ename}: {exc.evalue}", out) from None
            seconds = time.perf_counter() - start
            timings[nb.stem] = round(seconds, 1)
            _timings_path(report).write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
            runs.append(NotebookRun(nb.stem, round(seconds, 1), str(out)))
            log(f"      done in {_fmt(seconds)} (elapsed {_fmt(time.perf_counter() - total_start)})")
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if render:
        index = render_report(
            report_dir=report, notebooks_dir=notebooks_dir, profile=prof.name, data_dir=env.get("CSPINE_DATA_DIR")
        )
        log(f"report: {index}")
    return runs


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", "."],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib import metadata  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for pkg in ("tensorflow", "keras", "keras-tuner", "numpy", "pandas", "scikit-learn", "papermill", "cspine-utils"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _collect_facts(report: Path, notebooks: list[Path], profile: str, data_dir: str | None) -> dict:
    art = config.artifacts_dir()
    timings = _load_timings(report)
    audit = _read_json(art / "data" / "audit.json") or {}
    bundles = {}
    for bundle_json in sorted((art / "models").glob("*/bundle.json")):
        b = _read_json(bundle_json) or {}
        bundles[bundle_json.parent.name] = {
            "weights": (b.get("weights") or {}).get("description", "random init (trained from scratch)")
            if b.get("weights")
            else "none: trained from scratch",
            "threshold": b.get("threshold"),
            "image_size": b.get("image_size"),
            "val_metrics": b.get("val_metrics"),
        }
    metrics = _read_json(art / "metrics" / "combined.json")
    return {
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notebooks_commit": _git_commit(notebooks[0].parent) if notebooks else "unknown",
        "profile": profile,
        "data_source": data_dir or f"synthetic phantom (default dataset of the {profile} profile)",
        "notebooks": [
            {"name": nb.stem, "html": f"html/{nb.stem}.html", "seconds": timings.get(nb.stem)} for nb in notebooks
        ],
        "total_seconds": round(sum(v for k, v in timings.items() if any(k == nb.stem for nb in notebooks)), 1),
        "audit": {
            k: audit.get(k)
            for k in ("n_files", "n_rejected", "n_groups", "leaking_groups", "shortcut_auc", "warnings")
            if k in audit
        },
        "bundles": bundles,
        "metrics": metrics,
        "versions": _versions(),
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
    html_dir = report / "html"
    html_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    for nb in notebooks:
        executed = report / "executed" / nb.name
        if not executed.is_file():
            raise FileNotFoundError(f"{executed} not found: run the course first (cspine run)")
        body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
        (html_dir / f"{nb.stem}.html").write_text(body, encoding="utf-8")
    facts = _collect_facts(report, notebooks, config.get_profile(profile).name, data_dir)
    figures = [(name, caption) for name, caption in KEY_FIGURES if (report / "figures" / f"{name}.png").is_file()]
    facts["figures"] = [f"figures/{name}.png" for name, _ in figures]
    (report / "run.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    (report / "README.md").write_text(_markdown(facts, figures), encoding="utf-8")
    (report / "index.html").write_text(_html(facts, figures), encoding="utf-8")
    return report / "index.html"


_METRIC_COLUMNS = (
    "model",
    "weights",
    "n",
    "ROC AUC [95% CI]",
    "PR AUC [95% CI]",
    "sensitivity (youden)",
    "specificity (youden)",
    "sensitivity (sens95)",
    "specificity (sens95)",
)


def _metrics_table(facts: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the combined metrics table written by notebook 05 (``table`` records)."""
    records = (facts.get("metrics") or {}).get("table") or []
    if not records:
        return [], []
    header = [c for c in _METRIC_COLUMNS if c in records[0]]
    return header, [[str(r.get(c, "")) for c in header] for r in records]


def _num(value, digits: int = 3) -> str:
    """A probability or score for humans: 3 decimals; anything else as it is."""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(facts: dict, figures: list[tuple[str, str]]) -> str:
    lines = [
        "# Cervical spine fracture detection on CT — the rendered course",
        "",
        "> Teaching project, not a medical device. Results are on a synthetic phantom unless stated otherwise.",
        "",
        f"Profile **{facts['profile']}** · data: {facts['data_source']} · rendered {facts['rendered']} · "
        f"notebooks at commit `{facts['notebooks_commit'][:12]}`",
        "",
        "## Notebooks",
        "",
        "| notebook | wall time |",
        "|---|---|",
    ]
    for nb in facts["notebooks"]:
        secs = f"{nb['seconds']:.0f} s" if nb["seconds"] is not None else "not run"
        lines.append(f"| [{nb['name']}]({nb['html']}) | {secs} |")
    lines += ["", f"Total: {facts['total_seconds']:.0f} s", ""]
    header, rows = _metrics_table(facts)
    if rows:
        lines += (
            [
                "## Test-set metrics (95 % CIs by grouped bootstrap)",
                "",
                "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header),
            ]
            + ["| " + " | ".join(r) + " |" for r in rows]
            + [""]
        )
        paired = (facts.get("metrics") or {}).get("paired_test")
        if paired:
            lines += [f"Paired bootstrap test of the AUC difference: {paired}", ""]
    if facts["bundles"]:
        lines += (
            ["## Models and weights", ""]
            + [
                f"- **{k}**: {v['weights']}; threshold {_num(v['threshold'])}, {v['image_size']} px"
                for k, v in facts["bundles"].items()
            ]
            + [""]
        )
    audit = facts.get("audit") or {}
    if audit:
        lines += [
            "## Dataset audit",
            "",
            f"{audit.get('n_files')} files, {audit.get('n_groups')} source groups, "
            f"{audit.get('n_rejected')} rejected, leaking groups: {len(audit.get('leaking_groups') or [])}, "
            f"shortcut AUC: {audit.get('shortcut_auc')}",
            "",
        ]
        lines += [f"- {w}" for w in audit.get("warnings") or []] + [""]
    for name, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}](figures/{name}.png)", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in facts["versions"].items()), ""]
    return "\n".join(lines)


def _seconds_text(seconds: float | None) -> str:
    return "not run" if seconds is None else f"{seconds:.0f} s"


def _html(facts: dict, figures: list[tuple[str, str]]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td><a href='{e(nb['html'])}'>{e(nb['name'])}</a></td><td>{_seconds_text(nb['seconds'])}</td></tr>"
        for nb in facts["notebooks"]
    )
    header, metric_rows = _metrics_table(facts)
    metrics = ""
    if metric_rows:
        paired = (facts.get("metrics") or {}).get("paired_test")
        metrics = (
            "<h2>Test-set metrics (95 % CIs by grouped bootstrap)</h2><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in metric_rows)
            + "</table>"
            + (f"<p>Paired bootstrap test of the AUC difference: {e(str(paired))}</p>" if paired else "")
        )
    bundles = "".join(
        f"<li><b>{e(k)}</b>: {e(str(v['weights']))}; threshold {e(_num(v['threshold']))}, "
        f"{e(str(v['image_size']))} px</li>"
        for k, v in facts["bundles"].items()
    )
    audit = facts.get("audit") or {}
    audit_html = ""
    if audit:
        audit_html = (
            f"<h2>Dataset audit</h2><p>{e(str(audit.get('n_files')))} files, {e(str(audit.get('n_groups')))} "
            f"source groups, {e(str(audit.get('n_rejected')))} rejected, leaking groups: "
            f"{len(audit.get('leaking_groups') or [])}, shortcut AUC: {e(str(audit.get('shortcut_auc')))}</p>"
            + "<ul>"
            + "".join(f"<li>{e(w)}</li>" for w in audit.get("warnings") or [])
            + "</ul>"
        )
    figs = "".join(
        f"<figure><img src='figures/{e(n)}.png' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>"
        for n, c in figures
    )
    versions = ", ".join(f"{e(k)} {e(str(v))}" for k, v in facts["versions"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cervical spine fracture detection on CT - course report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{max-width:100%}}figure{{margin:1.5em 0}}.note{{background:#fff3cd;padding:.6em 1em;border-radius:6px}}</style>
</head><body>
<h1>Cervical spine fracture detection on CT — the rendered course</h1>
<p class="note">Teaching project, not a medical device. Results are on a synthetic phantom unless stated otherwise.</p>
<p>Profile <b>{e(facts["profile"])}</b> · data: {e(str(facts["data_source"]))} · rendered {e(facts["rendered"])} ·
notebooks at commit <code>{e(facts["notebooks_commit"][:12])}</code></p>
<h2>Notebooks</h2><table><tr><th>notebook</th><th>wall time</th></tr>{rows}</table>
<p>Total: {facts["total_seconds"]:.0f} s</p>
{metrics}
{"<h2>Models and weights</h2><ul>" + bundles + "</ul>" if bundles else ""}
{audit_html}
<h2>Key figures</h2>{figs}
<h2>Versions</h2><p>{versions}</p>
</body></html>
"""


CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def refresh_checked_outputs(notebook: str | os.PathLike, executed: str | os.PathLike) -> int:
    """Copy the text outputs of ``# NBVAL_CHECK_OUTPUT`` cells from an executed copy into the source.

    Those cells are deterministic teaching examples; nbval (and tests/test_notebooks.py) compare a
    fresh execution with the stored output, so the source notebook keeps exactly these outputs
    (marked ``keep_output`` so that nbstripout leaves them) and no others. Returns the number of
    cells updated. Run it after editing such a cell::

        python -c "from cspine_utils import report; report.refresh_checked_outputs(
            'notebooks/05_evaluation.ipynb', 'report/executed/05_evaluation.ipynb')"
    """
    import nbformat  # noqa: PLC0415

    src = nbformat.read(notebook, as_version=4)
    run = nbformat.read(executed, as_version=4)
    run_cells = [c for c in run.cells if not (_PAPERMILL_TAGS & set(c.get("metadata", {}).get("tags", [])))]
    if len(run_cells) != len(src.cells):
        raise ValueError(f"{executed} does not match {notebook} cell for cell (was the source edited since?)")
    updated = 0
    for s, r in zip(src.cells, run_cells):
        if s.cell_type != "code":
            continue
        if CHECK_MARK in s.source:
            s.outputs = [o for o in r.outputs if o.get("output_type") in ("stream", "execute_result")]
            for o in s.outputs:
                if o.get("output_type") == "execute_result":
                    o["execution_count"] = None
                    o["data"] = {k: v for k, v in o.get("data", {}).items() if k == "text/plain"}
            s.metadata["keep_output"] = True
            updated += 1
        else:
            s.outputs = []
            s.metadata.pop("keep_output", None)
        s.execution_count = None
    nbformat.write(src, notebook)
    return updated
