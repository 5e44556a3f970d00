"""Registry storage: content-addressed blobs, one JSON index, one lock.

``Store`` is the small interface the registry needs; ``LocalStore`` implements it on a
directory. An object-store implementation (S3, GCS) only has to provide the same five
operations: blobs are immutable and named by their sha256, so a conditional put on the
index object is enough to replace the file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from services.artifact import file_sha256
from services.errors import UserError

INDEX_FORMAT = 1
# Test hook: seconds to sleep after the new index is written and fsynced but before it is
# renamed into place, so a test can kill a writer at the worst moment.
PAUSE_ENV = "DLSTACK_REGISTRY_TEST_PAUSE_S"


class RegistryError(UserError):
    """The registry is missing, corrupted or was asked for something it doesn't hold."""


class Store(Protocol):
    """What the registry needs from storage."""

    def put_blob(self, src: Path) -> str:
        """Copy a file in; return its sha256. Idempotent."""
        ...

    def get_blob(self, sha256: str, dest: Path) -> None:
        """Copy the blob to ``dest``; raise ``RegistryError`` if it is missing."""
        ...

    def has_blob(self, sha256: str) -> bool: ...

    def blob_sha256(self, sha256: str) -> str:
        """Re-hash the stored blob (for ``verify``)."""
        ...

    def read_index(self) -> dict[str, Any]: ...

    def write_index(self, index: dict[str, Any]) -> None:
        """Replace the index atomically: readers see the old or the new one, never a mix."""
        ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive across processes; held for read-modify-write of the index."""
        ...


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
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)

    def has_blob(self, sha256: str) -> bool:
        return self._blob_path(sha256).is_file()

    def blob_sha256(self, sha256: str) -> str:
        return file_sha256(self._blob_path(sha256))

    def read_index(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"format": INDEX_FORMAT, "models": {}}
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.index_path}: unreadable index ({exc}); restore it from a backup") from exc
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise RegistryError(f"{self.index_path}: not a dlstack registry index (format {INDEX_FORMAT})")
        return data

    def write_index(self, index: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index.json.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(index, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            pause = os.environ.get(PAUSE_ENV)
            if pause:
                time.sleep(float(pause))
            os.replace(tmp, self.index_path)
            _fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        # flock is released by the kernel when the holder dies, so a crash never wedges the registry.
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
