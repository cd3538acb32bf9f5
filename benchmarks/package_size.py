"""Print the size of the shared package: lines per module, the total, and its longest functions.

The course keeps `cspine_utils/` a small package of helpers (target: at most 10,500 lines since issue 13
added CT series (reading, preparation) and the 3-D phantom in the RSNA layout — it was 9,000 after
issue 12, 8,000 before —, no function or method over 60 lines, counted from its `def` line to its last
line, docstring included).

    python benchmarks/package_size.py [--top 5]
"""

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cspine_utils"


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(lines, "module.function") for every function and method defined in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.end_lineno - node.lineno + 1, f"{path.stem}.{node.name}")
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5, help="how many of the longest functions to list")
    args = parser.parse_args()
    modules = sorted(PACKAGE.glob("*.py"))
    total = 0
    for module in modules:
        lines = len(module.read_text(encoding="utf-8").splitlines())
        total += lines
        print(f"{lines:6d}  {module.name}")
    lengths = sorted((length for module in modules for length in function_lengths(module)), reverse=True)
    print(f"{total:6d}  total lines in {len(modules)} modules (target <= 10500)")
    print(f"{sum(n > 60 for n, _ in lengths)} of {len(lengths)} functions are longer than 60 lines; the longest:")
    for n, name in lengths[: args.top]:
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
