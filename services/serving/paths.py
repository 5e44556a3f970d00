"""Paths that must stay inside a root: the one check for model.yaml files, registry index entries,
dataset manifests and CLI paths meant to be inside a directory.

A path written in a file someone else may have made (a downloaded artifact, a tampered index, a
manifest in a pull request) is hostile until checked: ``../../etc/passwd``, ``/etc/passwd``, a
symlink to either, a FIFO that blocks a reader forever, or a device that never ends. Each is
refused with one line naming the entry; nothing is opened before the check passes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from services.serving.errors import UserError

FIX = "paths must be relative and inside it"


def relative_problem(rel: object, root_name: str) -> str | None:
    """Why ``rel`` is not a plain relative path inside ``root_name``, or None (syntax only, no filesystem).

    Checked without touching the disk, so an index or a model.yaml is refused as soon as it is read.
    """
    if not isinstance(rel, str):
        return f"{rel!r} is not a path; write a relative path inside {root_name}"
    if not rel or rel.strip() != rel or "\0" in rel or "\\" in rel or any(ord(c) < 32 for c in rel):
        # Backslashes and control characters are legal on Linux but never meant: they are how a
        # Windows-style "..\\" or a name with a newline slips past a reader of the file.
        return f"{rel!r} is not a valid path; write a relative path with '/' inside {root_name}"
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        return f"{rel!r} leaves {root_name}; {FIX}"
    if any(part in ("", ".") for part in rel.split("/")):
        return f"{rel!r} is not a normalized path; write it without '.', '//' or a trailing '/'"
    return None


def check_relative(rel: object, root_name: str) -> str:
    """``rel`` if it is a plain relative path, else ValueError (for pydantic validators)."""
    problem = relative_problem(rel, root_name)
    if problem is not None:
        raise ValueError(problem)
    return str(rel)


def _kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is, for the message; None for a regular file or directory."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "not a regular file"


def inside(
    root: Path,
    rel: object,
    what: str,
    root_name: str,
    error: type[UserError] = UserError,
    *,
    dirs: bool = True,
) -> Path:
    """``root / rel`` once it is known to stay inside ``root``; ``error`` (one line naming ``what``) otherwise.

    ``rel`` must be relative, without ``..``; resolved (following every symlink) it must still be inside
    ``root``. When it exists it must be a regular file or, with ``dirs``, a directory whose whole tree is
    regular files and directories inside ``root`` (a SavedModel). A missing path is returned as is: the
    caller says what is missing in its own words. The returned path is the unresolved ``root / rel``,
    so relative names (and digests built from them) stay the ones written in the file.
    """
    problem = relative_problem(rel, root_name)
    if problem is not None:
        raise error(f"{what} {problem}")
    assert isinstance(rel, str)
    real_root = root.resolve()
    p = root / rel
    try:
        target = p.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise error(f"{what} {rel!r} cannot be resolved ({exc.__class__.__name__}); replace the symlink") from None
    if not target.is_relative_to(real_root):
        raise error(f"{what} {rel!r} leaves {root_name} through a symlink; {FIX} (copy the file in, don't link it)")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return p
    except OSError as exc:
        raise error(f"{what} {rel!r} cannot be read ({exc.strerror})") from None
    kind = _kind(mode)
    if kind is not None:
        raise error(f"{what} {rel!r} is {kind}; only regular files (or directories of them) are allowed")
    if stat.S_ISDIR(mode):
        if not dirs:
            raise error(f"{what} {rel!r} is a directory; give a regular file")
        tree_files(p, real_root, what, root_name, error)
    return p


def tree_files(
    d: Path, root: Path | None = None, what: str = "", root_name: str = "", error: type[UserError] = UserError
) -> list[Path]:
    """The regular files under directory ``d`` (sorted, unresolved), after checking every entry.

    A FIFO, socket or device anywhere in the tree, a symlink to a directory (a loop, or a second way into
    the tree) and a symlink that resolves outside ``root`` (default ``d``) are errors naming the entry.
    """
    root = (root or d).resolve()
    label = what or str(d)
    out: list[Path] = []
    for cur, subdirs, names in os.walk(d, followlinks=False):
        base = Path(cur)
        for name in [*subdirs, *names]:
            q = base / name
            rel = q.relative_to(d).as_posix()
            try:
                st = q.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = q.resolve()
                    if not target.is_relative_to(root):
                        raise error(
                            f"{label}: {rel!r} leaves {root_name or 'the directory'} through a symlink; {FIX} "
                            "(copy the file in, don't link it)"
                        )
                    st = target.stat()
                    if stat.S_ISDIR(st.st_mode):
                        raise error(f"{label}: {rel!r} is a symlink to a directory; copy the directory in instead")
            except (OSError, RuntimeError) as exc:
                raise error(f"{label}: {rel!r} cannot be read ({exc.__class__.__name__})") from None
            kind = _kind(st.st_mode)
            if kind is not None:
                raise error(f"{label}: {rel!r} is {kind}; only regular files (or directories of them) are allowed")
            if stat.S_ISREG(st.st_mode):
                out.append(q)
    return sorted(out)


__all__ = ["FIX", "check_relative", "inside", "relative_problem", "tree_files"]
