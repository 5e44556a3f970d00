"""Atomic file replacement: readers see the old file or the new one, never a torn write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: Path,
    data: str | bytes,
    *,
    mode: int | None = None,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, optionally ``validate`` it, then rename.

    ``mode`` defaults to the replaced file's mode, else 0644: mkstemp's 0600 would hide files from
    the non-root server in the image. A failing ``validate`` leaves ``path`` untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
