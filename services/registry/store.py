"""Registry storage: content-addressed blobs and one JSON index, changed only by ``update_index``.

``Store`` is the small interface the registry needs. ``LocalStore`` implements it on a directory
(an fcntl lock around read-modify-write); ``services.registry.objectstore.ObjectStore`` on S3, GCS or
Azure (no lock: the index is replaced by a compare-and-swap on its ETag, retried on conflict). The
registry has one code path for both: it hands ``update_index`` a function that edits the index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from services.serving import names
from services.serving.artifact import ModelSpec, file_sha256, format_validation_error
from services.serving.errors import UserError
from services.serving.paths import inside, relative_problem

INDEX_FORMAT = 1
# Test hook: seconds to sleep once the new index is ready (written and fsynced locally, serialized
# for an object store) but before it replaces the old one, so a test can kill a writer at the worst
# moment. The writer says so on stderr (PAUSE_MARKER) when it starts sleeping.
PAUSE_ENV = "DLSTACK_REGISTRY_TEST_PAUSE_S"
PAUSE_MARKER = "dlstack-registry-test: paused before replacing the index"
T = TypeVar("T")


class RegistryError(UserError):
    """The registry is missing, corrupted, unreachable or was asked for something it doesn't hold."""


class BadIndex(RegistryError):
    """The index is unreadable or structurally wrong; ``problems`` holds one line per problem (for ``verify``)."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s): run `dlstack models verify`)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)
        self.problems = problems


def empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "models": {}}


def dump_index(index: dict[str, Any]) -> bytes:
    """The one serialization of an index (sorted keys: equal content gives equal bytes)."""
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


def load_index(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check the index once, as it is read: every later lookup trusts its shape.

    A tampered key (a model named ``../x``, a version ``1/../../``, a blob ``../../etc``) would
    otherwise become a path under the registry, the cache or an export directory.
    """
    try:
        index = json.loads(data)
    except RecursionError:  # deep nesting: json gives up with a RecursionError, not a ValueError
        raise BadIndex([f"{where}: unreadable index (nested too deeply); restore it from a backup"]) from None
    except ValueError as exc:  # bad JSON, bad UTF-8, integers beyond Python's digit limit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadIndex([f"{where}: unreadable index ({first}); restore it from a backup"]) from None
    problems = index_problems(index)
    if problems:
        raise BadIndex([f"{where}: {p}" for p in problems])
    assert isinstance(index, dict)
    return index


_ENTRY_OPTIONAL: dict[str, tuple[type, ...]] = {
    "created": (str,),
    "author": (str,),
    "framework_version": (str, type(None)),
    "git_commit": (str, type(None)),
    "git_dirty": (bool,),
    "datasets": (list,),
    "metrics": (dict,),
    "note": (str, type(None)),
}
_TYPE_NAMES = {str: "a string", type(None): "null", bool: "true or false", list: "a list", dict: "a mapping"}


def _key(k: object) -> str:
    return f"[{k!r}]"  # repr: a key with a newline or quotes stays on one line and visible


def _want(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def index_problems(index: object) -> list[str]:
    """One line per structural problem, each naming the key path (e.g. ``models['x'].versions['1'].blobs``)."""
    fix = "restore the index from a backup"
    if not isinstance(index, dict):
        return [f"<root>: expected a mapping, got {type(index).__name__}; not a dlstack registry index"]
    out: list[str] = []
    if type(index.get("format")) is not int or index["format"] != INDEX_FORMAT:  # true and 1.0 equal 1 in Python
        out.append(f"format: {index.get('format')!r} is not a known index format (expected {INDEX_FORMAT})")
    for k in sorted(set(index) - {"format", "models"}, key=str):
        out.append(f"{k!r}: unknown key; an index holds only format and models")
    models = index.get("models")
    if not isinstance(models, dict):
        got = "missing" if "models" not in index else f"{type(models).__name__}, not a mapping"
        return [*out, f"models: {got}; {fix}"]
    for name, model in models.items():
        at = f"models{_key(name)}"
        if not names.matches(names.DNS_LABEL, name):
            out.append(f"{at}: {name!r} is not a model name (a DNS-1123 label); {fix}")
            continue
        if not isinstance(model, dict) or set(model) != {"aliases", "versions"}:
            out.append(f"{at}: expected a mapping with exactly aliases and versions; {fix}")
            continue
        versions, aliases = model["versions"], model["aliases"]
        if not isinstance(versions, dict) or not isinstance(aliases, dict):
            out.append(f"{at}: aliases and versions must be mappings; {fix}")
            continue
        if not versions:  # every writer adds a version with its model; "@latest" of none has no answer
            out.append(f"{at}.versions: empty; a model holds at least one version; {fix}")
        for v, entry in versions.items():
            if not names.matches(names.VERSION, v):
                out.append(f"{at}.versions{_key(v)}: {v!r} is not a version (an integer such as 1); {fix}")
                continue
            out += _entry_problems(f"{at}.versions{_key(v)}", name, v, entry)
        for alias, v in aliases.items():
            if not names.matches(names.ALIAS, alias):
                out.append(f"{at}.aliases{_key(alias)}: {alias!r} is not an alias name; {fix}")
            elif not isinstance(v, str) or v not in versions:
                out.append(f"{at}.aliases{_key(alias)}: {v!r} is not a version of {name!r}; {fix}")
    return out


def _entry_problems(at: str, name: str, version: str, entry: object) -> list[str]:
    fix = "restore the index from a backup"
    if not isinstance(entry, dict):
        return [f"{at}: expected a mapping, got {type(entry).__name__}; {fix}"]
    out: list[str] = []
    for k in ("content_key", "spec", "blobs"):
        if k not in entry:
            out.append(f"{at}.{k}: missing; {fix}")
    for k in sorted(set(entry) - {"content_key", "spec", "blobs", *_ENTRY_OPTIONAL}, key=str):
        out.append(f"{at}{_key(k)}: unknown key; {fix}")
    for k, types in _ENTRY_OPTIONAL.items():
        if k in entry and not isinstance(entry[k], types):
            out.append(f"{at}.{k}: {type(entry[k]).__name__} is not {_want(types)}; {fix}")
    if out:
        return out
    if not names.matches(names.SHA256, entry["content_key"]):
        out.append(f"{at}.content_key: {entry['content_key']!r} is not a sha256; {fix}")
    for i, d in enumerate(entry.get("datasets", ())):
        if not isinstance(d, dict) or not names.matches(names.SHA256, d.get("oid")) or not set(d) <= {"oid", "path"}:
            out.append(f"{at}.datasets[{i}]: expected {{oid: sha256, path: string or null}}; {fix}")
        elif not isinstance(d.get("path"), str | None):
            out.append(f"{at}.datasets[{i}].path: expected a string or null; {fix}")
    for k, m in entry.get("metrics", {}).items():
        if not isinstance(m, int | float | str) or isinstance(m, bool):
            out.append(f"{at}.metrics{_key(k)}: expected a number or a string; {fix}")
    blobs = entry["blobs"]
    if not isinstance(blobs, dict):
        return [*out, f"{at}.blobs: expected a mapping of path to sha256; {fix}"]
    good: list[str] = []  # blob paths that are plain relative paths, for the checks against the spec
    for rel, sha in blobs.items():
        problem = relative_problem(rel, "the model directory")
        if problem is not None:
            out.append(f"{at}.blobs{_key(rel)}: {problem}")
            continue
        good.append(rel)
        if not names.matches(names.SHA256, sha):
            out.append(f"{at}.blobs{_key(rel)}: {sha!r} is not a sha256 (64 lowercase hex digits); {fix}")
    # A blob that is also a parent directory of another ("a" and "a/b") cannot be written out.
    paths = set(good)
    for rel in sorted(good):
        parts = rel.split("/")
        clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in paths), None)
        if clash is not None:
            out.append(f"{at}.blobs{_key(rel)}: {clash!r} is both a file and a directory; {fix}")
    if not isinstance(entry["spec"], dict):
        return [*out, f"{at}.spec: expected a mapping (the model.yaml content); {fix}"]
    try:
        spec = ModelSpec.model_validate(entry["spec"])
    except ValidationError as exc:
        return [*out, f"{at}.spec: {format_validation_error(exc)}"]
    if (spec.name, spec.version) != (name, version):
        out.append(f"{at}.spec: says {spec.name}:{spec.version}, not {name}:{version}; {fix}")
    for rel in good:
        if not any(rel == f.path or rel.startswith(f.path + "/") for f in spec.files):
            out.append(f"{at}.blobs{_key(rel)}: not under any of the spec's files; {fix}")
    return out


def pause_for_tests() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        print(PAUSE_MARKER, file=sys.stderr, flush=True)
        time.sleep(float(pause))


class Store(Protocol):
    """What the registry needs from storage."""

    url: str  # where it is, as users write it (messages name it)

    def put_blob(self, src: Path) -> str:
        """Store a file under its sha256 (never overwriting one); return the sha256. Idempotent."""
        ...

    def get_blob(self, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest``, streamed and checked against ``sha256``; ``RegistryError`` if missing or bad."""
        ...

    def has_blob(self, sha256: str) -> bool: ...

    def blob_sha256(self, sha256: str) -> str:
        """Re-hash the stored blob itself, never a cached copy (for ``verify``)."""
        ...

    def read_index(self) -> dict[str, Any]:
        """The current index (an empty one for a new registry)."""
        ...

    def update_index(self, change: Callable[[dict[str, Any]], T]) -> T:
        """Apply ``change`` to the current index and store the result atomically; return what ``change`` returned.

        ``change`` edits the dict it is given and may run more than once (an object store re-reads and
        re-applies it after losing a race), so it must be a pure function of the index. When it leaves the
        index as it was, nothing is written.
        """
        ...


def copy_verified(src: Path, dest: Path, sha256: str, what: str) -> None:
    """Copy ``src`` to ``dest`` in chunks, hashing as it goes; a mismatch leaves no ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with src.open("rb") as inp, dest.open("wb") as out:
        for chunk in iter(lambda: inp.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise RegistryError(
            f"{what} is corrupted (sha256 {h.hexdigest()}); run `dlstack models verify` and restore or re-register it"
        )


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """A registry directory: ``index.json``, ``blobs/sha256/ab/<sha256>``, ``.lock``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def _blob_path(self, sha256: str) -> Path:
        # The index is checked when read; this guards every other caller: a blob name is a path here.
        if not names.matches(names.SHA256, sha256):
            raise RegistryError(f"{self.root}: {sha256!r} is not a blob sha256 (64 lowercase hex digits)")
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def put_blob(self, src: Path) -> str:
        sha = file_sha256(src)
        dest = self._blob_path(sha)
        if dest.exists():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            # Re-hash what landed on disk: the source may have changed while we copied.
            if file_sha256(Path(tmp)) != sha:
                raise RegistryError(f"{src} changed while it was being stored; register it again")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get_blob(self, sha256: str, dest: Path) -> None:
        p = self._blob_path(sha256)
        if not p.is_file():
            raise RegistryError(f"{self.root}: blob {sha256} is missing; the registry is damaged (restore it)")
        copy_verified(p, dest, sha256, f"{self.root}: blob {sha256}")

    def has_blob(self, sha256: str) -> bool:
        return self._blob_path(sha256).is_file()

    def blob_sha256(self, sha256: str) -> str:
        return file_sha256(self._blob_path(sha256))

    def read_index(self) -> dict[str, Any]:
        try:  # a FIFO would block the read forever, a link could read any file: neither is an index
            inside(
                self.root, self.index_path.name, f"{self.root}:", "the registry directory", RegistryError, dirs=False
            )
        except RegistryError as exc:
            raise BadIndex([exc.message]) from None
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return empty_index()
        except OSError as exc:
            raise RegistryError(f"{self.index_path}: unreadable index ({exc}); restore it from a backup") from exc
        return load_index(data, str(self.index_path))

    def update_index(self, change: Callable[[dict[str, Any]], T]) -> T:
        # One writer at a time (the lock), so the change runs exactly once.
        with self.lock():
            index = self.read_index()
            before = dump_index(index)
            result = change(index)
            if dump_index(index) != before:
                self.write_index(index)
        return result

    def write_index(self, index: dict[str, Any]) -> None:
        """Replace the index atomically (temp file, fsync, rename): readers see the old or the new one."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index.json.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(dump_index(index))
                fh.flush()
                os.fsync(fh.fileno())
            pause_for_tests()
            os.replace(tmp, self.index_path)
            _fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes; held for read-modify-write of the index."""
        self.root.mkdir(parents=True, exist_ok=True)
        # flock is released by the kernel when the holder dies, so a crash never wedges the registry.
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
