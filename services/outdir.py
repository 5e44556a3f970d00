"""Output directories and files: a command replaces only what it wrote itself.

``dlstack render --out``, ``dlstack package --out`` and ``dlstack models export`` write a whole
directory. Each builds it in a fresh temporary sibling and swaps it in with renames, so a reader sees
the old output or the new one, never half of one. The swap happens only when the target is absent,
an empty directory, or a previous output of the same command, recognised by its own index file
(``index.json`` of a render, ``model.yaml`` of an artifact) that accounts for every file in it.
Anything else (the current directory, a checkout, a home directory, a directory holding one file of
the user's, a symbolic link, a file) is refused in one line before any work is done.

``dlstack capacity --plot`` and ``dlstack render-diff --out`` write one file by the same rule: a new
path, or a previous file of their own (recognised by its content), replaced atomically.

A run killed half-way leaves ``.NAME.dlstack-*-PID-*`` beside the target; the next run removes those
whose process is gone (the name is ours, the pid says nobody is still writing it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from services.serving.errors import UserError
from services.serving.paths import relative_problem

DIR_MODE = 0o755  # mkdtemp makes 0700; served artifacts must be readable by the image's non-root user
_WRITABLE = "choose a directory you can write to"
_TAG = "dlstack"  # in temp names: `.NAME.dlstack-partial-PID-RAND`, `.NAME.dlstack-old-PID-RAND`


class OutputError(UserError):
    """An output path that a command must not write: it would replace something it did not create."""


@dataclass(frozen=True)
class Claim:
    """What a previous output says it wrote: relative POSIX paths, each a file or a whole subtree."""

    paths: frozenset[str]

    def covers(self, rel: str) -> bool:
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self.paths for i in range(1, len(parts) + 1))

    def holds_dir(self, rel: str) -> bool:
        """A directory is ours when it is claimed or leads to something claimed."""
        return self.covers(rel) or rel in self._ancestors

    @functools.cached_property
    def _ancestors(self) -> frozenset[str]:
        # Computed once per claim: a render claims thousands of files in a few dozen directories.
        return frozenset("/".join(p.split("/")[:i]) for p in self.paths for i in range(1, p.count("/") + 1))


# A recogniser reads a directory's index file: its Claim, or None when the directory is no output of
# this command. It may raise OutputError itself (e.g. "holds the artifact 'a', not 'b'").
Recognise = Callable[[Path], Claim | None]


def clean_relpath(rel: object) -> bool:
    """A plain relative path (no '..', '.', absolute or odd parts): safe to claim inside a directory."""
    return relative_problem(rel, "the output") is None


def _show(label: str, shown: Path | str) -> str:
    return f"{label} {shown}"


def _probe_writable(t: Path, shown: str) -> None:
    """Refuse now, not after minutes of work, when the directory that will receive ``t`` is not writable.

    The probe is an unnamed file (O_TMPFILE where the system has it): nothing appears in the directory.
    """
    d = t.parent
    while not d.exists() and d.parent != d:
        d = d.parent  # created later with parents=True: the nearest existing one must be writable
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror} in {d}; {_WRITABLE}") from None


def check_dir(target: Path | str, *, label: str, what: str, recognise: Recognise) -> Path:
    """Refuse (OutputError) unless ``target`` may be replaced; return its absolute path (links not resolved).

    ``label`` names the argument in messages (``--out``), ``what`` the kind of output (``render``).
    """
    shown = _show(label, target)
    t = Path(os.path.abspath(target))  # abspath, not resolve: a symlinked target is refused, never followed
    fix = "choose a new or empty directory"
    if t.parent == t:
        raise OutputError(f"{shown} is the filesystem root; {fix}")
    with contextlib.suppress(OSError):  # a deleted working directory has no path
        cwd = Path(os.path.abspath(os.getcwd()))
        if t == cwd or t in cwd.parents:
            # Swapping it would pull the directory out from under the shell that runs the command.
            raise OutputError(f"{shown} is the current directory or holds it; {fix}, e.g. {label} {t / 'out'}")
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory known
        if t == Path.home().absolute():
            raise OutputError(f"{shown} is the home directory; {fix}")
    try:
        st = os.lstat(t)
    except FileNotFoundError:
        _probe_writable(t, shown)
        return t
    except OSError as exc:
        raise OutputError(f"{shown}: {exc.strerror}; {fix}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{shown} is a symbolic link, which is never written through; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{shown} is a file, not a directory; {fix}")
    try:
        empty = not os.listdir(t)
    except OSError as exc:
        raise OutputError(f"{shown}: {exc.strerror}; {fix}") from None
    if empty:
        _probe_writable(t, shown)
        return t
    claim = recognise(t)
    if claim is None:
        raise OutputError(f"{shown} is not empty and holds no previous {what}; {fix}")
    stray = _stray(t, claim)
    if stray is not None:
        raise OutputError(
            f"{shown} holds {stray!r}, which the previous {what} there did not write; move it away or {fix}"
        )
    _probe_writable(t, shown)
    return t


def _stray(root: Path, claim: Claim) -> str | None:
    """The first entry under ``root`` that ``claim`` does not account for (links and special files never are)."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir) if rel_dir else os.scandir(root), key=lambda e: e.name)
        except OSError:
            return rel_dir or "."
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_symlink():
                return rel  # we never write links: a link here was put by someone else
            if e.is_dir(follow_symlinks=False):
                if not claim.holds_dir(rel):
                    return rel + "/"
                stack.append(rel)
            elif not (e.is_file(follow_symlinks=False) and claim.covers(rel)):
                return rel
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _sweep(parent: Path, name: str) -> None:
    """Remove ``.NAME.dlstack-{partial,old}-PID-RAND`` directories (and partial files) of killed runs.

    A run killed between moving the previous output aside and moving the new one in left NAME absent
    and the previous output under ``old``: that one is put back first, so a failure of this run
    still leaves the user their previous output.
    """
    prefix = f".{name}.{_TAG}-"
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(prefix) or e.is_symlink():
            continue
        kind, _, rest = e.name[len(prefix) :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # best effort: a leftover we cannot remove harms no one
            if kind == "old" and e.is_dir(follow_symlinks=False) and not os.path.lexists(parent / name):
                os.rename(e.path, parent / name)
            elif e.is_dir(follow_symlinks=False):
                _rmtree(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                os.unlink(e.path)


def _rmtree(d: Path) -> None:
    def writable(func: Callable[..., object], path: str, _exc: object) -> None:  # onerror (3.11 has no onexc)
        # Read-only folders inside our own tree (an export's): make them writable and retry once.
        # Never the folder holding ``d``: that one is the user's.
        parent = os.path.dirname(path)
        if parent == str(d) or parent.startswith(str(d) + os.sep):
            with contextlib.suppress(OSError):
                os.chmod(parent, 0o700)
                func(path)

    shutil.rmtree(d, onerror=writable)


def _temp_name(t: Path, kind: str) -> Path:
    return t.with_name(f".{t.name}.{_TAG}-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def replace_dir(target: Path | str, *, label: str, what: str, recognise: Recognise) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``target`` to fill; on success swap it in for ``target``.

    The target is checked again here (``check_dir``), so callers may check early, before slow work,
    and still be safe. On any failure the temporary directory is removed and ``target`` is untouched.
    """
    t = check_dir(target, label=label, what=what, recognise=recognise)
    shown = _show(label, target)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        _sweep(t.parent, t.name)
        tmp = _temp_name(t, "partial")
        tmp.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror} in {t.parent}; {_WRITABLE}") from None
    try:
        try:
            yield tmp
        except OSError as exc:  # a full disk, a quota: one line, and the old output is still there
            raise OutputError(f"writing {shown} failed: {exc.strerror or exc}; it was left as it was") from None
        os.chmod(tmp, DIR_MODE)
        _swap_in(tmp, t, shown, what, recognise)
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _swap_in(tmp: Path, t: Path, shown: str, what: str, recognise: Recognise) -> None:
    try:
        # An absent target, or an empty directory (rename replaces one atomically, and fails if a
        # file appeared in it since the check: nothing of the user's is ever replaced).
        os.rename(tmp, t)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"cannot write {shown}: {exc.strerror}; {_WRITABLE}") from None
    # A previous output: move it aside under a name nobody else uses, look again (something may have
    # been added since the check), then move the new one in and delete the old.
    if os.path.islink(t):
        raise OutputError(f"{shown} became a symbolic link while writing; choose a new or empty directory")
    old = _temp_name(t, "old")
    os.rename(t, old)
    try:
        claim = recognise(old)
        stray = _stray(old, claim) if claim is not None else "."
    except BaseException:
        os.rename(old, t)
        raise
    if stray is not None:
        os.rename(old, t)
        raise OutputError(f"{shown} changed while writing (it now holds {stray!r}); choose a new or empty directory")
    try:
        os.rename(tmp, t)
    except BaseException:
        os.rename(old, t)
        raise
    _rmtree(old)


# -------------------------------------------------------------------------------------------------
# single files


def check_file(target: Path | str, *, label: str, what: str, recognise: Callable[[Path], bool]) -> Path:
    """Refuse (OutputError) unless ``target`` is a new path or a regular file that ``recognise`` calls ours."""
    shown = _show(label, target)
    t = Path(os.path.abspath(target))
    fix = "choose a new file name"
    try:
        st = os.lstat(t)
    except FileNotFoundError:
        _probe_writable(t, shown)
        return t
    except OSError as exc:
        raise OutputError(f"{shown}: {exc.strerror}; {fix}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{shown} is a symbolic link, which is never written through; {fix}")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{shown} is a directory; {fix}")
    if not stat.S_ISREG(st.st_mode) or not recognise(t):
        raise OutputError(f"{shown} exists and is not a previous {what}; {fix}")
    _probe_writable(t, shown)
    return t


def replace_file(target: Path | str, data: bytes, *, label: str, what: str, recognise: Callable[[Path], bool]) -> Path:
    """Write ``data`` to ``target`` atomically (temp file, fsync, rename) under the ``check_file`` rule."""
    t = check_file(target, label=label, what=what, recognise=recognise)
    shown = _show(label, target)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        _sweep(t.parent, t.name)
        fd, name = tempfile.mkstemp(dir=t.parent, prefix=f".{t.name}.{_TAG}-partial-{os.getpid()}-")
    except OSError as exc:
        raise OutputError(f"cannot write {shown}: {exc.strerror} in {t.parent}; {_WRITABLE}") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, t)  # a new path: link fails if anything appeared there since the check
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A previous file of ours (or a filesystem without hard links): look again, then replace.
            check_file(target, label=label, what=what, recognise=recognise)
            os.replace(tmp, t)
    except OSError as exc:
        raise OutputError(f"writing {shown} failed: {exc.strerror or exc}; it was left as it was") from None
    finally:
        tmp.unlink(missing_ok=True)
    return t


def json_with_keys(*keys: str, limit: int = 16 << 20) -> Callable[[Path], bool]:
    """A previous JSON document of ours: an object holding every one of ``keys`` (a file over ``limit``
    bytes, or anything else, is not ours)."""

    def recognise(path: Path) -> bool:
        import json

        try:
            if path.stat().st_size > limit:
                return False
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)

    return recognise


# -------------------------------------------------------------------------------------------------
# recognisers shared by package and export


def artifact(name: str, *, label: str, force: bool = False, force_hint: bool = True) -> Recognise:
    """A previous artifact of model ``name`` (any name with ``force``): model.yaml plus the files it lists."""

    def recognise(d: Path) -> Claim | None:
        from services.serving.artifact import MODEL_YAML, read_spec

        try:
            if not stat.S_ISREG(os.lstat(d / MODEL_YAML).st_mode):
                return None
            spec = read_spec(d)
        except Exception:  # no model.yaml, or one that is not ours to trust: not a previous artifact
            return None
        paths = [f.path for f in spec.files]
        if not all(clean_relpath(p) for p in paths):
            return None
        if spec.name != name and not force:
            hint = "choose another directory or pass --force" if force_hint else "choose another directory"
            raise OutputError(f"{label} {d} holds the artifact {spec.name!r}, not {name!r}; {hint}")
        return Claim(frozenset([MODEL_YAML, *paths]))

    return recognise
