"""Export the notebook code cells whose first line is exactly ``# @save`` into ``cspine_utils/course.py``.

d2l's way (d2l writes ``#@save``; ``ruff format`` adds the space; both count): in notebook order, imports
hoisted and merged. ``--check`` exits 1 when ``course.py`` is stale.
"""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(__file__).with_name("course.py")
MARKS = ("#@save", "# @save")
HEADER = '"""GENERATED from the notebooks\' ``# @save`` cells by ``python -m cspine_utils.export``: do not edit."""\n'


def saved_cells(notebook: Path) -> list[tuple[int, str]]:
    """``(cell number from 1, source without the mark)`` of the code cells whose first line is a mark."""
    try:
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{notebook}: not a readable notebook ({exc})") from exc
    split = ["".join(c.get("source", "")).partition("\n") if c.get("cell_type") == "code" else () for c in cells]
    return [(n, src[2]) for n, src in enumerate(split, start=1) if src and src[0].rstrip() in MARKS]


def _ruff(text: str, *args: str) -> str:
    exe = shutil.which("ruff", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        raise RuntimeError("the export needs ruff (the [dev] extra: pip install -e '.[dev]')")
    cmd = [exe, *args, "--no-cache", "--stdin-filename", str(TARGET), "-"]
    out = subprocess.run(cmd, input=text, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise ValueError(f"ruff rejected the exported code: {out.stderr or out.stdout}")
    return out.stdout


def render(notebooks: list[Path], root: Path = ROOT) -> str:
    """The text of ``course.py`` for these notebooks (in the given order), ruff-sorted and formatted."""
    imports: dict[str, None] = {}
    parts = []
    for notebook in notebooks:
        for number, source in saved_cells(notebook):
            try:
                tree = ast.parse(source)
            except SyntaxError as exc:
                raise ValueError(f"{notebook}, cell {number}: not valid Python ({exc.msg}, line {exc.lineno})") from exc
            lines = source.splitlines()
            for node in reversed(tree.body):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    imports[ast.unparse(node)] = None
                    del lines[node.lineno - 1 : node.end_lineno]
            parts.append(
                f"# {notebook.relative_to(root).as_posix()}, cell {number}\n" + "\n".join(lines).strip() + "\n"
            )
    text = HEADER + "\n" + "\n".join(sorted(imports)) + "\n\n\n" + "\n\n\n".join(parts)
    return _ruff(_ruff(text, "check", "--fix", "--select", "I"), "format")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cspine_utils.export", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if course.py differs from a fresh export")
    args, text = parser.parse_args(argv), render(sorted((ROOT / "notebooks").glob("0*.ipynb")))
    current = TARGET.is_file() and TARGET.read_text(encoding="utf-8") == text
    if args.check and not current:
        print("cspine_utils/course.py is stale: run python -m cspine_utils.export", file=sys.stderr)
    elif not args.check:
        TARGET.write_text(text, encoding="utf-8")
        print("wrote cspine_utils/course.py")
    return int(args.check and not current)


if __name__ == "__main__":
    raise SystemExit(main())
