"""Every notebook opens the house way (shared CONVENTIONS.md) and is stored without outputs."""

from __future__ import annotations

import re

import nbformat
import pytest

from cspine_utils import config

NOTEBOOKS = sorted((config.repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_course_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_data_exploration",
        "02_preprocessing_augmentation",
        "03_cnn_training",
        "04_vgg_finetuning_tuner",
        "05_evaluation",
        "06_predict_gui",
        "07_studies_2p5d",
    ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_opening_parameters_setup_summary_exercises(path):
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    first = cells[0]
    assert first.cell_type == "markdown"
    number = path.stem[:2]
    assert re.match(rf"^# {number} · \S", first.source), "first cell: '# NN · Title'"
    assert len(first.source.split("\n", 1)[-1].strip()) > 80, "first cell: a paragraph on what you learn and need"
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code", "exactly one code cell tagged 'parameters'"
    for name in ("PROFILE", "SEED"):
        assert re.search(rf"^{name}\s*=", params[0].source, re.M), f"parameters cell defines {name}"
    assert "CSPINE_PROFILE" in params[0].source
    if re.search(r"^DATA_DIR\s*=", params[0].source, re.M):
        assert "CSPINE_DATA_DIR" in params[0].source, "DATA_DIR defaults to CSPINE_DATA_DIR"
    assert cells.index(params[0]) <= 2, "parameters right after the opening"
    headings = [
        line.strip()
        for c in cells
        if c.cell_type == "markdown"
        for line in c.source.splitlines()
        if line.startswith("## ")
    ]
    assert "## Setup" in headings
    setup_at = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Setup"))
    setup_code = cells[setup_at + 1]
    assert setup_code.cell_type == "code" and "from cspine_utils import" in setup_code.source
    assert setup_code.source.startswith("from cspine_utils import config\n\nprofile = config.setup(PROFILE, SEED"), (
        "Setup starts with the one setup call (quiet TensorFlow start, seed, versions, device)"
    )
    assert headings[-2:] == ["## Summary", "## Exercises"], "ends with '## Summary' then '## Exercises'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    """nbstripout-clean, except the cells nbval checks: those marked ``# NBVAL_CHECK_OUTPUT`` keep
    their output (``keep_output`` metadata, which nbstripout honours) and an execution count (nbval
    fails a cell stored with outputs but no count: "Unrun reference cell has outputs")."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        checked = "# NBVAL_CHECK_OUTPUT" in c.source
        if checked:
            assert c.metadata.get("keep_output") is True, f"cell {i}: a checked cell needs keep_output metadata"
            assert c.outputs and isinstance(c.execution_count, int), f"cell {i}: store its output and execution count"
        else:
            assert c.execution_count is None, f"cell {i} has an execution count: strip the notebook"
            assert c.outputs == [], f"cell {i} has outputs: strip them (nbstripout)"
        for o in c.outputs:
            assert o.get("output_type") in ("stream", "execute_result"), f"cell {i}: only text outputs are stored"
            assert "image/png" not in o.get("data", {}), f"cell {i}: no images in the stored notebook"


def _assigned_names(source: str) -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", source, re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_parameter_is_used_and_every_import_is_in_setup(path):
    """No parameter the notebook does not use; imports only in Parameters, Setup and `#@save` cells
    (an exported cell carries its own imports, so the generated module stands alone)."""
    cells = nbformat.read(path, as_version=4).cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    setup_at = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Setup"))
    code = [c for c in cells if c.cell_type == "code"]
    elsewhere = "\n".join(c.source for c in code if c is not params)
    unused = [name for name in _assigned_names(params.source) if not re.search(rf"\b{name}\b", elsewhere)]
    assert not unused, f"parameters the notebook never uses: {unused}"
    for i, c in enumerate(cells):
        if c.cell_type != "code" or c is params or i == setup_at + 1 or re.match(r"#\s?@save\b", c.source):
            continue
        imports = re.findall(r"^\s*(?:import \w|from [\w.]+ import )", c.source, re.M)
        assert not imports, f"cell {i} imports outside Setup:\n{c.source}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_one_markdown_cell_per_heading(path):
    for i, c in enumerate(nbformat.read(path, as_version=4).cells):
        if c.cell_type != "markdown":
            continue
        headings = [line for line in c.source.splitlines() if re.match(r"#{1,6} ", line)]
        assert len(headings) <= 1, f"cell {i} holds {len(headings)} headings: {headings}"
        assert not headings or c.source.startswith(headings[0]), f"cell {i}: its heading is not its first line"
