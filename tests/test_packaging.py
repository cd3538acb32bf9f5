"""The two dependency lists (pyproject.toml for pip, environment.yml for conda) stay in step,
and the repository keeps generated things out of git."""

from __future__ import annotations

import re
import subprocess

import tomllib

from cspine_utils import config

ROOT = config.repo_root()


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + list(meta["optional-dependencies"]["dev"])
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_yml() -> dict[str, str]:
    pins = {}
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if stripped.strip() == "- pip:":
            in_pip = True
            continue
        if in_pip and stripped.strip().startswith("- ") and not stripped.strip().startswith("- -e"):
            req = stripped.strip()[2:]
            pins[_name(req)] = req.replace(" ", "")
    return pins


def test_environment_yml_matches_pyproject():
    py, env = _pyproject(), _environment_yml()
    assert set(py) == set(env), (
        f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"
    )
    for name in py:
        assert py[name] == env[name], f"{name}: pyproject {py[name]!r} vs environment.yml {env[name]!r}"


def test_console_script_and_gpu_extra():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["cspine"] == "cspine_utils.cli:main"
    assert any("and-cuda" in r for r in meta["optional-dependencies"]["gpu"])


def test_generated_paths_are_ignored_by_git():
    paths = [".venv/x", "artifacts/models/m.keras", "data/synthetic/cpu/manifest.csv", "report/executed/01.ipynb"]
    res = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(paths)
