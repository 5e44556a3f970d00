"""Where the registry is: a local directory or an object-store URL, and which setting wins.

One grammar for every place a location is written (``--registry``, ``$DLSTACK_REGISTRY``, the
``dlstack:registry`` key of a stack file):

- a directory: ``.registry``, ``/srv/registry``, ``~/registry``, ``file:///srv/registry``
- ``s3://BUCKET[/PREFIX]``: AWS S3 or any S3-compatible endpoint (MinIO, Ceph, R2), configured by the
  standard AWS variables and files (``AWS_ENDPOINT_URL`` for a non-AWS endpoint)
- ``gs://BUCKET[/PREFIX]`` (Google Cloud Storage) and ``az://CONTAINER[/PREFIX]`` (Azure Blob Storage),
  which obstore provides with the same conditional writes, configured by their own standard variables

Precedence, highest first: ``--registry`` > ``$DLSTACK_REGISTRY`` > the stack file's ``dlstack:registry``
> ``.registry`` at the git top level of the working directory (else in it), the default for one machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

from services.serving.errors import UserError

REGISTRY_ENV = "DLSTACK_REGISTRY"
Scheme = Literal["file", "s3", "gs", "az"]
OBJECT_SCHEMES: tuple[Scheme, ...] = ("s3", "gs", "az")
GRAMMAR = "a directory, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"

# Bucket rules of each service: catching "s3://My Models" here beats a 400 from the endpoint later.
_BUCKET = {
    "s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"),
    "az": re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$"),
}
_BUCKET_HINT = {
    "s3": "3-63 lower-case letters, digits, '.' and '-'",
    "gs": "3-63 lower-case letters, digits, '.', '_' and '-'",
    "az": "3-63 lower-case letters, digits and single '-'",
}
# Key characters that need no escaping on any of the three services.
_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()=+@,-]+$")
# Used with fullmatch (DOTALL): "$" would let "s3://bucket\n" through, and "." would stop at a newline.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
# pathlib collapses "//": Path("s3://b/p") is "s3:/b/p". A caller whose --registry is still typed
# as a Path hands us that; undo it rather than silently make a local directory named "s3:".
_COLLAPSED = re.compile(r"(?P<scheme>s3|gs|az):/(?P<rest>[^/].*)", re.DOTALL)


@dataclass(frozen=True)
class RegistryLocation:
    """A parsed registry location. ``url`` is canonical: an absolute path or ``scheme://bucket[/prefix]``."""

    url: str
    scheme: Scheme
    bucket: str = ""  # object stores only: bucket (or Azure container)
    prefix: str = ""  # object stores only: key prefix, no leading or trailing "/"
    source: str = "default"  # which setting chose it, for messages: "--registry", "$DLSTACK_REGISTRY", ...

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The directory of a local registry."""
        if not self.local:
            raise UserError(f"{self.url} is an object-store registry, not a directory")
        return Path(self.url)

    def __str__(self) -> str:
        return self.url


def parse_location(value: str | PurePath, source: str = "--registry", base: Path | None = None) -> RegistryLocation:
    """Validate one location; relative directories are taken from ``base`` (default: the working directory).

    ``source`` names the setting in the one-line error, e.g. ``$DLSTACK_REGISTRY: "s3://A": ...``.
    """
    try:
        return _parse(value, source, base)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


def check_location(value: str) -> str:
    """The grammar check alone (for the stack config schema): ``ValueError`` with the fix, else ``value``."""
    _parse(value, "", Path("/"))
    return value


def _parse(value: str | PurePath, source: str, base: Path | None) -> RegistryLocation:
    raw = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        # Refused, not stripped: a location that ends in "\n" came from a broken file or script, and every
        # later message would break across lines.
        raise ValueError(f"{json.dumps(raw)} has a control character; remove it")
    text = raw.strip()
    if isinstance(value, PurePath) and (m := _COLLAPSED.fullmatch(text)):
        text = f"{m['scheme']}://{m['rest']}"
    if not text:
        raise ValueError(f"the registry location is empty; write {GRAMMAR}")
    m = _URL.fullmatch(text)
    if m is None:
        return _local(Path(text), source, base)
    scheme, rest = m["scheme"].lower(), m["rest"]
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f'"{text}" is not a file URL; write file:///absolute/path or just the path')
        return _local(Path(rest), source, base)
    if scheme not in OBJECT_SCHEMES:
        raise ValueError(f'"{text}" has an unsupported scheme "{scheme}://"; write {GRAMMAR}')
    if any(c in rest for c in "?#@\\ "):
        # Credentials and options come from the environment, never from a URL that ends up in logs.
        raise ValueError(
            f'"{text}" may hold only {scheme}://BUCKET/PREFIX (no credentials, query, spaces or backslash); '
            "credentials and the endpoint come from the environment"
        )
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET[scheme].fullmatch(bucket):
        raise ValueError(f'"{text}": "{bucket}" is not a valid bucket name ({_BUCKET_HINT[scheme]})')
    for part in prefix.split("/") if prefix else []:
        if part in ("", ".", "..") or not _SEGMENT.fullmatch(part):
            raise ValueError(
                f'"{text}": prefix segment "{part}" is invalid; use letters, digits and !_.*\'()=+@,- '
                'separated by single "/"'
            )
    canonical = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    return RegistryLocation(url=canonical, scheme=scheme, bucket=bucket, prefix=prefix, source=source)  # type: ignore[arg-type]


def _local(path: Path, source: str, base: Path | None) -> RegistryLocation:
    path = path.expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return RegistryLocation(url=str(Path(os.path.normpath(path))), scheme="file", source=source)


def default_root() -> Path:
    """The default local registry: ``.registry`` at the git top level of the working directory, else in it."""
    top: str | None = None
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=30, check=False
        )
        top = res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        top = None
    return Path(top or Path.cwd()) / ".registry"


def registry_location(
    flag: str | PurePath | None = None,
    stack_value: str | None = None,
    stack_source: str = "dlstack:registry",
    stack_base: Path | None = None,
) -> RegistryLocation:
    """The location in force: ``--registry`` > ``$DLSTACK_REGISTRY`` > the stack file's key > the local default.

    ``stack_base`` is the directory a relative ``dlstack:registry`` path is taken from (the stack file's).
    """
    if flag is not None and str(flag).strip():
        return parse_location(flag, "--registry")
    env = os.environ.get(REGISTRY_ENV, "").strip()
    if env:
        return parse_location(env, f"${REGISTRY_ENV}")
    if stack_value:
        return parse_location(stack_value, stack_source, stack_base)
    return parse_location(default_root(), "default")


__all__ = [
    "GRAMMAR",
    "OBJECT_SCHEMES",
    "REGISTRY_ENV",
    "RegistryLocation",
    "check_location",
    "default_root",
    "parse_location",
    "registry_location",
]
