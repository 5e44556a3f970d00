"""The registry on object storage (S3 and S3-compatible endpoints; GCS and Azure through the same library).

Same layout as a local registry, under the URL's prefix: ``index.json`` and ``blobs/sha256/ab/<sha256>``.
obstore (the Rust ``object_store`` crate) does the HTTP, signing, retries and conditional requests:

- A blob is written once, with ``If-None-Match: *``; one already there under its sha256 is success.
- The index is replaced by compare-and-swap: ``If-Match`` on the ETag it was read with (``If-None-Match: *``
  for the first one). Losing the race means re-read, re-apply the change, try again; so two writers
  never assign one version, never lose an alias, and no lock file can be left behind by a crash.
- Reads of blobs go through ``BlobCache``: streamed in 1 MiB chunks, hashed while they arrive.

Credentials, region and endpoint come from the standard variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ...); without keys in
the environment, boto3 reads ``~/.aws/config`` and ``~/.aws/credentials`` (profiles, SSO, assumed roles).
Every failure of the service is one ``RegistryError`` line naming the URL and what to do.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from services.registry.cache import CHUNK, BlobCache
from services.registry.location import RegistryLocation
from services.registry.store import (
    RegistryError,
    dump_index,
    empty_index,
    load_index,
    pause_for_tests,
)
from services.serving import names

INDEX_KEY = "index.json"
CAS_ATTEMPTS = 50  # conflicts before giving up; each retry re-reads, so only a storm of writers gets here
T = TypeVar("T")
# Fail within seconds on a dead endpoint instead of obstore's default 10 retries over 3 minutes, but
# never cut a large download short: the overall timeout only bounds a stalled transfer.
_CLIENT_OPTIONS: dict[str, Any] = {"connect_timeout": "5s", "timeout": "3600s"}
_RETRY: dict[str, Any] = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=20),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2},
}
_ENDPOINT_ENV = {
    "s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "gs": ("GOOGLE_SERVICE_ENDPOINT",),
    "az": ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"),
}
_CREDENTIAL_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that may read and write it",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service account that may read and write it",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a service principal) for it",
}
_CREATE_HINT = {
    "s3": "create it (`aws s3 mb s3://{bucket}`, add --endpoint-url for MinIO/Ceph/R2)",
    "gs": "create it (`gcloud storage buckets create gs://{bucket}`)",
    "az": "create it (`az storage container create --name {bucket}`)",
}


def endpoint_of(loc: RegistryLocation) -> str:
    """The endpoint requests go to, for messages (the service default unless an env var overrides it)."""
    for var in _ENDPOINT_ENV[loc.scheme]:
        if os.environ.get(var):
            return os.environ[var]
    if loc.scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return f"https://s3.{region}.amazonaws.com"
    return {"gs": "https://storage.googleapis.com", "az": "https://<account>.blob.core.windows.net"}[loc.scheme]


def _aws_credential_provider(loc: RegistryLocation) -> Any:
    """boto3's resolution of config files and profiles, used only when the environment holds no keys.

    obstore itself reads the AWS_* variables, web identity and instance metadata, but not
    ``~/.aws/config``/``credentials``; boto3 does (profiles, SSO, credential_process, assumed roles).
    """
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_SKIP_SIGNATURE", "").lower() == "true":
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # no boto3: obstore's own chain (env, web identity, instance metadata) still applies
        return None
    session = boto3.Session()
    if session.get_credentials() is None:
        raise RegistryError(
            f"{loc.url}: no AWS credentials in the environment or ~/.aws; {_CREDENTIAL_HINT['s3']} "
            f"(source: {loc.source})"
        )
    return Boto3CredentialProvider(session)


def _open(loc: RegistryLocation) -> Any:
    from obstore.store import AzureStore, GCSStore, S3Store

    client: dict[str, Any] = dict(_CLIENT_OPTIONS)
    if endpoint_of(loc).startswith("http://"):
        client["allow_http"] = True  # a local MinIO or test server: the user chose plain HTTP explicitly
    prefix = loc.prefix or None
    try:
        if loc.scheme == "s3":
            provider = _aws_credential_provider(loc)
            return S3Store(
                loc.bucket,
                prefix=prefix,
                client_options=client,  # type: ignore[arg-type]
                retry_config=_RETRY,  # type: ignore[arg-type]
                credential_provider=provider,
            )
        if loc.scheme == "gs":
            return GCSStore(loc.bucket, prefix=prefix, client_options=client, retry_config=_RETRY)  # type: ignore[arg-type]
        return AzureStore(loc.bucket, prefix=prefix, client_options=client, retry_config=_RETRY)  # type: ignore[arg-type]
    except RegistryError:
        raise
    except Exception as exc:  # a bad AWS_* / GOOGLE_* / AZURE_* value: obstore says which
        raise RegistryError(
            f"{loc.url}: cannot configure the client ({_first_line(exc)}); {_CREDENTIAL_HINT[loc.scheme]}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_not_found(exc: BaseException) -> bool:
    from obstore.exceptions import NotFoundError

    return isinstance(exc, NotFoundError | FileNotFoundError) and "NoSuchBucket" not in str(exc)


_BUCKET_MISSING = ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist")
_REFUSED = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "AuthenticationFailed",
    "AuthorizationFailure",
    "403 Forbidden",
    "401 Unauthorized",
)
_UNREACHABLE = (
    "error sending request",
    "Connection refused",
    "connect error",
    "dns error",
    "timed out",
    "operation timed out",
    "tcp connect",
)


class ObjectStore:
    """``Store`` on an object-store URL; blobs are read through a local ``BlobCache``."""

    def __init__(self, location: RegistryLocation, cache: BlobCache | None = None) -> None:
        if location.local:
            raise RegistryError(f"{location.url} is a directory: use LocalStore")
        self.location = location
        self.url = location.url
        self.cache = cache if cache is not None else BlobCache()
        self.index_reads = 0  # GETs of the index by this object (a render must need exactly one)
        self._client: Any = None

    # ---- plumbing --------------------------------------------------------------------------

    @property
    def _store(self) -> Any:
        if self._client is None:  # built on first use: constructing a Registry costs nothing
            self._client = _open(self.location)
        return self._client

    def _fail(self, exc: BaseException, doing: str) -> NoReturn:
        """Turn any failure of the service into one line naming the URL and the fix."""
        if isinstance(exc, RegistryError):  # already one line (e.g. from building the client)
            raise exc
        loc, text = self.location, str(exc)
        where = f"{loc.url} (endpoint {endpoint_of(loc)}, from {loc.source})"
        if any(m in text for m in _BUCKET_MISSING):
            fix = _CREATE_HINT[loc.scheme].format(bucket=loc.bucket)
            raise RegistryError(f"{where}: the bucket {loc.bucket!r} does not exist; {fix}") from None
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or any(m in text for m in _REFUSED):
            code = next((m for m in _REFUSED if m in text), "access denied")
            raise RegistryError(
                f"{where}: the credentials were refused while {doing} ({code}); {_CREDENTIAL_HINT[loc.scheme]}"
            ) from None
        if loc.scheme == "s3" and ("PermanentRedirect" in text or "301 Moved Permanently" in text):
            raise RegistryError(
                f"{where}: the bucket is in another region than {os.environ.get('AWS_REGION') or 'us-east-1'}; "
                "set AWS_REGION to the bucket's region"
            ) from None
        if any(m.lower() in text.lower() for m in _UNREACHABLE):
            why = next((m for m in ("Connection refused", "dns error", "timed out") if m.lower() in text.lower()), "")
            setting = "AWS_ENDPOINT_URL" if loc.scheme == "s3" else "the endpoint settings"
            raise RegistryError(
                f"{where}: cannot reach the endpoint while {doing}"
                + (f" ({why})" if why else "")
                + f"; check {setting} and the network"
            ) from None
        raise RegistryError(f"{where}: {doing} failed: {_first_line(exc)}") from None

    def _call(self, doing: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RegistryError:
            raise
        except Exception as exc:
            self._fail(exc, doing)

    def _blob_key(self, sha256: str) -> str:
        # The index is checked when read; this guards every other caller: a blob name is a key here.
        if not names.matches(names.SHA256, sha256):
            raise RegistryError(f"{self.url}: {sha256!r} is not a blob sha256 (64 lowercase hex digits)")
        return f"blobs/sha256/{sha256[:2]}/{sha256}"

    # ---- blobs -----------------------------------------------------------------------------

    def put_blob(self, src: Path) -> str:
        import hashlib

        import obstore as obs
        from obstore.exceptions import AlreadyExistsError

        # A conditional PUT is one request with the whole body (S3 has no conditional multipart
        # upload in obstore), so read the file once and hash exactly the bytes that are sent: a file
        # edited meanwhile can never be stored under a wrong name.
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        key = self._blob_key(sha)
        size = self._size(sha)  # skip re-uploading what is already there (re-registering, copies)
        if size is None:
            try:
                obs.put(self._store, key, data, mode="create")
            except AlreadyExistsError:
                size = self._size(sha)  # a concurrent writer stored it first: content-addressed, so equal
            except Exception as exc:
                self._fail(exc, f"storing blob {sha[:12]}")
        if size is not None and size != len(data):
            raise RegistryError(
                f"{self.url}: blob {sha} exists with {size} bytes, not {len(data)}: the bucket is damaged; "
                "run `dlstack models verify` and delete the bad object"
            )
        self.cache.add(sha, data, str(src))  # the uploader never downloads its own files back
        return sha

    def _stream(self, sha256: str, doing: str) -> Iterator[memoryview]:
        import obstore as obs

        try:
            result = obs.get(self._store, self._blob_key(sha256))
        except Exception as exc:
            if _is_not_found(exc):
                raise RegistryError(
                    f"{self.url}: blob {sha256} is missing; the registry is damaged: re-register or copy that version"
                ) from None
            self._fail(exc, doing)
        try:
            for chunk in result.stream(min_chunk_size=CHUNK):
                yield memoryview(chunk)  # obstore's buffer as it is: no copy per chunk
        except RegistryError:
            raise
        except Exception as exc:
            self._fail(exc, doing)

    def cached_blob(self, sha256: str) -> Path:
        """The verified local copy of a blob, downloaded (streamed, hashed) on a miss."""
        hit = self.cache.lookup(sha256)
        if hit is not None:
            return hit
        doing = f"downloading blob {sha256[:12]}"
        return self.cache.fill(sha256, self._stream(sha256, doing), f"{self.url}: blob {sha256}")

    def get_blob(self, sha256: str, dest: Path) -> None:
        import shutil

        cached = self.cached_blob(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dest)

    def _size(self, sha256: str) -> int | None:
        """The stored blob's size, or None when there is no such object."""
        import obstore as obs

        try:
            meta = obs.head(self._store, self._blob_key(sha256))
        except Exception as exc:
            if _is_not_found(exc):
                return None
            self._fail(exc, f"checking blob {sha256[:12]}")
        return int(meta["size"])

    def has_blob(self, sha256: str) -> bool:
        return self._size(sha256) is not None

    def blob_sha256(self, sha256: str) -> str:
        import hashlib

        h = hashlib.sha256()
        for chunk in self._stream(sha256, f"re-hashing blob {sha256[:12]}"):
            h.update(chunk)
        return h.hexdigest()

    # ---- index -----------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any], dict[str, str | None] | None]:
        """The index and the version to compare-and-swap against (None: there is no index yet)."""
        import obstore as obs

        self.index_reads += 1
        try:
            result = obs.get(self._store, INDEX_KEY)
            data = bytes(result.bytes())
        except Exception as exc:
            if _is_not_found(exc):
                self._check_bucket()
                return empty_index(), None
            self._fail(exc, "reading the index")
        meta = result.meta
        return load_index(data, f"{self.url}/{INDEX_KEY}"), {"e_tag": meta["e_tag"], "version": meta["version"]}

    def _check_bucket(self) -> None:
        """No index: a new registry, or a bucket that isn't there (S3 says NoSuchKey or NoSuchBucket)."""
        import obstore as obs

        self._call("listing the bucket", lambda: next(iter(obs.list(self._store, chunk_size=1)), None))

    def read_index(self) -> dict[str, Any]:
        return self._read()[0]

    def update_index(self, change: Callable[[dict[str, Any]], T]) -> T:
        import obstore as obs
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        for attempt in range(CAS_ATTEMPTS):
            index, version = self._read()
            before = dump_index(index)
            result = change(index)
            after = dump_index(index)
            if after == before:
                return result
            mode: Any = "create" if version is None else {k: v for k, v in version.items() if v is not None}
            pause_for_tests()
            try:
                obs.put(self._store, INDEX_KEY, after, mode=mode)
                return result
            except (AlreadyExistsError, PreconditionError):
                # Another writer replaced the index since we read it: start over from its version.
                time.sleep(random.uniform(0, min(0.05 * 2**attempt, 1.0)))
            except Exception as exc:
                self._fail(exc, "writing the index")
        raise RegistryError(
            f"{self.url}: the index changed {CAS_ATTEMPTS} times while this change was retried; try again"
        )


__all__ = ["INDEX_KEY", "ObjectStore", "endpoint_of"]
