"""Output paths of the commands: checked before any work starts, written atomically.

A run that can only fail at its end (a read-only folder, a file where a folder is
expected) is refused before the model loads, so no minutes of streaming are lost to it.
``--json -`` means standard output, as is the convention.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from hermes_policy.errors import OutputError
from hermes_policy.fileio.atomic import json_default, write_json_atomic

STDOUT = "-"


def _probe_write(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder`` (os.access lies for root and for
    read-only mounts, a real write does not)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hermes-write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {what} in {folder}: {exc.strerror or exc}") from None


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """``folder`` exists (created if needed) as a writable folder, or an OutputError."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the {option} folder {folder}: {exc.strerror or exc}") from None
    _probe_write(folder, f"the {option} files")


def is_stdout(path: Path | None) -> bool:
    return path is not None and str(path) == STDOUT


def check_output_file(path: Path | None, option: str = "--json") -> None:
    """``path`` can be written later (its folder exists or can be made, and takes files)."""
    if path is None or is_stdout(path):
        return
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name (or - for standard output)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder of {option} {path}: {exc.strerror or exc}") from None
    _probe_write(parent, f"{option} {path.name}")


def write_json_output(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically, or to standard output for ``-``."""
    if is_stdout(path):
        sys.stdout.write(json.dumps(data, indent=2, default=json_default) + "\n")
        sys.stdout.flush()
        return
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
