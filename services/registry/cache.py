"""The local read-through cache of an object-store registry: blobs by sha256, verified on every hit.

A blob's name is its sha256, so one cache serves every registry (a laptop's and the team's bucket
share the bytes of a copied version) and can never serve a stale file: a hit is re-hashed, and a
file that no longer matches its name is dropped and fetched again. Nothing is ever evicted; delete
the directory to reclaim the space.

Location: ``$DLSTACK_CACHE``, else ``$XDG_CACHE_HOME/dlstack``, else ``~/.cache/dlstack``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from services.registry.store import RegistryError
from services.serving.artifact import file_sha256

CACHE_ENV = "DLSTACK_CACHE"
CHUNK = 1 << 20  # streaming unit: memory stays at one chunk whatever the blob size


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dlstack"


class BlobCache:
    """``<root>/blobs/sha256/ab/<sha256>``: read-only files, written by rename once verified."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_cache_dir()

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def lookup(self, sha256: str) -> Path | None:
        """The cached file if it is there and still hashes to its name; a damaged one is removed."""
        p = self.path(sha256)
        if not p.is_file():
            return None
        if file_sha256(p) == sha256:
            return p
        p.unlink(missing_ok=True)  # bit rot or an edit through a hard link: fetch it again
        return None

    def fill(self, sha256: str, chunks: Iterable[bytes | memoryview], source: str) -> Path:
        """Write a streamed blob, hashing as it arrives; only a matching one is kept (``source`` names it)."""
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != sha256:
                raise RegistryError(
                    f"{source} is corrupted: its sha256 is {h.hexdigest()}; "
                    "run `dlstack models verify` on the registry and restore or re-register that version"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def add(self, sha256: str, data: bytes, source: str) -> None:
        """Seed the cache with bytes just uploaded (so the uploader never downloads them back)."""
        if not self.path(sha256).is_file():
            self.fill(sha256, [memoryview(data)], source)


__all__ = ["CACHE_ENV", "CHUNK", "BlobCache", "default_cache_dir"]
