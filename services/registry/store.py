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

from services.artifact import file_sha256
from services.errors import UserError

INDEX_FORMAT = 1
# Test hook: seconds to sleep once the new index is ready (written and fsynced locally, serialized
# for an object store) but before it replaces the old one, so a test can kill a writer at the worst
# moment. The writer says so on stderr (PAUSE_MARKER) when it starts sleeping.
PAUSE_ENV = "DLSTACK_REGISTRY_TEST_PAUSE_S"
PAUSE_MARKER = "dlstack-registry-test: paused before replacing the index"
T = TypeVar("T")


class RegistryError(UserError):
    """The registry is missing, corrupted, unreachable or was asked for something it doesn't hold."""


def empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "models": {}}


def dump_index(index: dict[str, Any]) -> bytes:
    """The one serialization of an index (sorted keys: equal content gives equal bytes)."""
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


def load_index(data: bytes, where: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{where}: unreadable index ({exc}); restore it from a backup") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise RegistryError(f"{where}: not a dlstack registry index (format {INDEX_FORMAT})")
    return index


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
