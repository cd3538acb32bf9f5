"""Course orchestration: progress, one clear message on failure, partial output kept, --from resumes;
and the committed report stays in step with the notebooks."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cspine_utils import cli, config, report


def _notebook(path, *codes):
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# {path.stem[:2]} · test"),
            new_code_cell('PROFILE = "smoke"\nDATA_DIR = ""\nSEED = 0', metadata={"tags": ["parameters"]}),
            *[new_code_cell(c) for c in codes],
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def mini_course(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    flag = tmp_path / "fixed.txt"
    _notebook(nbdir / "01_first.ipynb", "print('first', PROFILE)")
    _notebook(
        nbdir / "02_second.ipynb",
        "x = 1",
        f"import pathlib\nif not pathlib.Path({str(flag)!r}).exists():\n    raise ValueError('the data are broken')",
        "print('second done')",
    )
    monkeypatch.setenv("CSPINE_ARTIFACTS", str(tmp_path / "artifacts"))
    return nbdir, tmp_path / "report", flag


def test_failure_stops_with_one_message_keeps_partial_and_from_resumes(mini_course):
    nbdir, rep, flag = mini_course
    lines = []
    with pytest.raises(report.NotebookFailed) as info:
        report.run_course("smoke", notebooks_dir=nbdir, report_dir=rep, render=False, log=lines.append)
    msg = str(info.value)
    assert "02_second.ipynb" in msg and "cell 4" in msg and "ValueError: the data are broken" in msg
    assert "--from 02" in msg
    partial = rep / "executed" / "02_second.ipynb"
    assert partial.is_file() and info.value.partial == partial
    assert any("[1/2] 01_first" in line for line in lines) and any("[2/2] 02_second" in line for line in lines)
    assert (rep / "executed" / "01_first.ipynb").is_file()
    # the source notebooks are never overwritten
    assert all(
        c.get("outputs", []) == [] for c in nbformat.read(nbdir / "02_second.ipynb", 4).cells if c.cell_type == "code"
    )

    flag.write_text("ok")
    lines.clear()
    runs = report.run_course(
        "smoke", notebooks_dir=nbdir, report_dir=rep, render=False, start_from="02", log=lines.append
    )
    assert [r.name for r in runs] == ["02_second"]
    lines.clear()
    report.run_course("smoke", notebooks_dir=nbdir, report_dir=rep, render=False, log=lines.append)
    assert "ETA" in lines[0], "a later run shows an ETA from the previous run's timings"
    timings = json.loads((rep / "timings.json").read_text())
    assert set(timings) == {"01_first", "02_second"}


def test_cli_run_reports_failure_in_one_line(mini_course, capsys, monkeypatch):
    nbdir, rep, _ = mini_course
    monkeypatch.setattr(report, "course_notebooks", lambda d=None: sorted(nbdir.glob("*.ipynb")))
    monkeypatch.setenv("CSPINE_REPORT_DIR", str(rep))
    assert cli.main(["run", "--profile", "smoke", "--no-render"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "02_second.ipynb failed in cell 4" in err[0]


def test_selecting_notebooks(tmp_path):
    names = [tmp_path / f"{n}.ipynb" for n in ("01_a", "02_b", "03_c", "04_d")]
    assert [p.stem for p in report.select_notebooks(names, only="03,1")] == ["01_a", "03_c"]
    assert [p.stem for p in report.select_notebooks(names, start_from="03")] == ["03_c", "04_d"]
    with pytest.raises(ValueError, match="no notebook matches 07"):
        report.select_notebooks(names, only="07")
    with pytest.raises(ValueError, match="either"):
        report.select_notebooks(names, only="01", start_from="02")


def test_committed_report_lists_exactly_the_course_notebooks():
    run = json.loads((config.repo_root() / "report" / "run.json").read_text())
    listed = [nb["name"] for nb in run["notebooks"]]
    on_disk = [p.stem for p in report.course_notebooks()]
    assert listed == on_disk, f"report lists {listed}, notebooks/ has {on_disk}: rerun `make run`"
    assert len(run["notebooks_commit"]) == 40
    for nb in run["notebooks"]:
        assert (config.repo_root() / "report" / nb["html"]).is_file()
    for fig in run["figures"]:
        assert (config.repo_root() / "report" / fig).is_file()
