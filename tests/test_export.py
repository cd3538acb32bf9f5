"""The generated cspine_utils/course.py is the notebooks' ``#@save`` cells, current and complete."""

import subprocess
import sys

import nbformat
import pytest

from cspine_utils import export


def test_course_module_is_a_fresh_export_of_the_notebooks():
    fresh = export.render(sorted((export.ROOT / "notebooks").glob("0*.ipynb")))
    assert export.TARGET.read_text(encoding="utf-8") == fresh, (
        "cspine_utils/course.py is stale: run python -m cspine_utils.export"
    )


def test_check_flag_passes_on_the_committed_module():
    out = subprocess.run(
        [sys.executable, "-m", "cspine_utils.export", "--check"], cwd=export.ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook(cells=cells)
    nbformat.write(nb, path)
    return path


def test_export_takes_exactly_the_marked_code_cells(tmp_path):
    first = _notebook(
        tmp_path / "03_first.ipynb",
        [
            nbformat.v4.new_markdown_cell("#@save\nnot code"),
            nbformat.v4.new_code_cell("#@save\nimport math\n\n\ndef area(r):\n    return math.pi * r**2"),
            nbformat.v4.new_code_cell("def hidden():\n    return 1"),
            nbformat.v4.new_code_cell("# @save: not the mark\ndef spaced():\n    return 2"),
            nbformat.v4.new_code_cell("# @save\ndef formatted():\n    return 4"),  # as ruff format writes it
            nbformat.v4.new_code_cell("x = 1\n#@save\ndef late():\n    return 3"),
        ],
    )
    second = _notebook(
        tmp_path / "04_second.ipynb",
        [nbformat.v4.new_code_cell("#@save\nimport math\nimport json\n\nTAU = 2 * math.pi\nDUMP = json.dumps")],
    )
    text = export.render([first, second], root=tmp_path)

    assert "def area(r):" in text and "def formatted():" in text and "TAU = 2 * math.pi" in text
    for absent in ("not code", "hidden", "spaced", "late"):
        assert absent not in text
    assert text.count("@save") == export.HEADER.count("@save")  # the marks are dropped
    assert text.index("# 03_first.ipynb, cell 2") < text.index("def area") < text.index("# 04_second.ipynb, cell 1")
    assert text.count("import math") == 1  # hoisted and merged
    assert text.index("import json") < text.index("import math") < text.index("# 03_first.ipynb")

    namespace = {}
    exec(compile(text, "course.py", "exec"), namespace)
    assert namespace["area"](1.0) == pytest.approx(3.14159265)
    assert "hidden" not in namespace


def test_export_names_the_cell_that_is_not_python(tmp_path):
    bad = _notebook(tmp_path / "03_bad.ipynb", [nbformat.v4.new_code_cell("#@save\ndef broken(:\n    pass")])
    with pytest.raises(ValueError, match=r"03_bad.ipynb, cell 1: not valid Python"):
        export.render([bad], root=tmp_path)


def test_export_names_an_unreadable_notebook(tmp_path):
    bad = tmp_path / "03_bad.ipynb"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"03_bad.ipynb: not a readable notebook"):
        export.render([bad], root=tmp_path)


def test_check_flag_exits_1_naming_a_stale_module(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "course.py"
    stale.write_text('"""An old export."""\n', encoding="utf-8")
    monkeypatch.setattr(export, "TARGET", stale)
    assert export.main(["--check"]) == 1
    assert "cspine_utils/course.py is stale: run python -m cspine_utils.export" in capsys.readouterr().err
    assert export.main([]) == 0 and export.main(["--check"]) == 0  # a fresh export is current
