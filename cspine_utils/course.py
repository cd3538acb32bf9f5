"""The course's code, GENERATED from the notebooks' ``#@save`` cells by ``python -m cspine_utils.export``.

Do not edit: edit the cell in its notebook and re-run the export (tests/test_export.py fails when this is stale).
"""
