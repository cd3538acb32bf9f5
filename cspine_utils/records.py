"""Records on disk: the project's one JSON writer, one hash and one versions helper.

Every product that later stages read (bundles, metrics, tuner state, the report's run record) is
written through :func:`write_json`: strict JSON (NaN and infinity become ``null``), NumPy values
and paths converted, written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "jsonable",
    "write_json",
    "read_json",
    "replace_folder",
    "write_file_atomically",
    "sha256_file",
    "sha256_text",
    "package_versions",
    "shown_path",
]

#: The packages whose versions a record names by default.
COURSE_PACKAGES = ("tensorflow", "keras", "keras-tuner", "numpy", "pandas", "scikit-learn", "cspine-utils")


def jsonable(value: Any) -> Any:
    """``value`` with NumPy values, paths, dataclasses and objects with ``as_dict()`` made JSON-ready.

    Non-finite floats become ``None`` (strict JSON has no NaN). Raises ``ValueError`` naming the
    value when it cannot be written.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "as_dict"):
        return jsonable(value.as_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to JSON")


def write_json(path: str | os.PathLike, record: Any, *, sort_keys: bool = False) -> Path:
    """Write ``record`` as indented strict JSON, atomically; create the folder; return the path."""
    path = Path(path)
    text = json.dumps(jsonable(record), indent=2, sort_keys=sort_keys, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomically(path, lambda fh: fh.write((text + "\n").encode("utf-8")))


def write_file_atomically(path: Path, write: Callable[[Any], Any]) -> Path:
    """``write(fh)`` into a binary temporary file beside ``path``, then rename it to ``path``; the path.

    Readers never see half a file: ``path`` holds the old content or the new, never a mix.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        write(fh)
    os.replace(tmp, path)
    return path


def replace_folder(out: Path, write: Callable[[Path], Any], what: str) -> Any:
    """``write(tmp)`` into a new temporary folder beside ``out``, then put it in ``out``'s place; its result.

    A previous ``out`` is replaced only once ``write`` has finished; if anything fails the temporary
    folder is removed and ``out`` is as it was, so an interrupted run never leaves half a dataset.
    ``what`` names the product in the error raised when ``out``'s parent cannot be written.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise PermissionError(f"cannot write the {what} under {out.parent}: {exc.strerror or exc}") from exc
    try:
        result = write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; ``ValueError`` naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(*parts: str | bytes | np.ndarray) -> str:
    """Hex sha256 of strings, bytes and arrays (dtype and shape included), in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(part.tobytes())
        else:
            digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return digest.hexdigest()


def package_versions(names: Iterable[str] = COURSE_PACKAGES) -> dict[str, str | None]:
    """``{"python": ..., package: version or None}`` for the installed distributions named."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as printed output and reports show it: relative to the repository, else ``…/parent/name``.

    So that no absolute machine path (``/home/<user>/...``) reaches a rendered notebook or report.
    """
    from .config import repo_root  # noqa: PLC0415 - config imports more than records needs

    path = Path(path).expanduser().resolve()
    try:
        return path.relative_to(repo_root().resolve()).as_posix()
    except ValueError:
        return "…/" + "/".join(part for part in path.parts[-2:] if part != path.anchor)
