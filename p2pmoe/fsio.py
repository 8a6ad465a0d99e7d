"""Atomic file writes: a reader (or a restart after kill -9) sees the old file or the new one,
never a torn mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file in the same folder, fsync it, then rename over `path`.

    `mode` is applied before the rename (mkstemp alone would leave every file owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON (indented, keys in insertion order) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
