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
    for name in ("PROFILE", "DATA_DIR", "SEED"):
        assert re.search(rf"^{name}\s*=", params[0].source, re.M), f"parameters cell defines {name}"
    assert "CSPINE_PROFILE" in params[0].source and "CSPINE_DATA_DIR" in params[0].source
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
    assert "set_seed" in setup_code.source
    assert headings[-2:] == ["## Summary", "## Exercises"], "ends with '## Summary' then '## Exercises'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    """nbstripout-clean: no execution counts, and outputs only where nbval checks them
    (cells marked ``# NBVAL_CHECK_OUTPUT`` with ``keep_output`` metadata, which nbstripout keeps)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        assert c.execution_count is None, f"cell {i} has an execution count: strip the notebook"
        checked = "# NBVAL_CHECK_OUTPUT" in c.source and c.metadata.get("keep_output") is True
        if not checked:
            assert c.outputs == [], f"cell {i} has outputs: strip them (nbstripout)"
        for o in c.outputs:
            assert o.get("output_type") in ("stream", "execute_result"), f"cell {i}: only text outputs are stored"
            assert "image/png" not in o.get("data", {}), f"cell {i}: no images in the stored notebook"
