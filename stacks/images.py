"""Copy a model image between OCI registries by digest, with skopeo, and prove it arrived.

Promotion pins prod to the digest dev runs, and prod's Deployments pull ``<prod registry>/<model>@<digest>``.
That manifest exists only in dev's registry until something copies it. ``skopeo copy --all
--preserve-digests`` copies it as is: a multi-arch index whole, with every platform manifest, and refuses
instead of re-encoding (which would change the digest prod pins). The copy is then read back from prod's
registry and hashed, because a pin to a digest the registry does not serve is an outage waiting for the
next pod restart.

skopeo reads credentials from the standard container auth file, in its own order: ``$REGISTRY_AUTH_FILE``,
``${XDG_RUNTIME_DIR}/containers/auth.json``, then ``~/.docker/config.json`` (``skopeo login`` and
``docker login`` write them). TLS is always verified, except for loopback registries the caller names as
plain HTTP (a kind-local or test registry); any other host's TLS settings belong in registries.conf.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from services.serving import names
from services.serving.errors import UserError

# skopeo (logrus) ends with: time="..." level=fatal msg="what failed: why"; the msg is the useful part.
_FATAL_RE = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
# Index media types whose `manifests` are copied by --all and must all be present on the target too.
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
COPY_TIMEOUT_S = 1800  # a multi-GB serving image over a slow link; a hung copy still ends
INSPECT_TIMEOUT_S = 300
_AUTH_FILES = "$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json or ~/.docker/config.json"


class ImageCopyError(UserError):
    """The image could not be copied or verified; the message names the image, the cause and the fix."""


@dataclass(frozen=True)
class ImageCopy:
    source: str  # repository the image is copied from, e.g. localhost:5001/dlstack/mnist-mlp
    target: str  # repository it is copied to, e.g. ghcr.io/acme/dlstack/mnist-mlp
    digest: str  # sha256:<64 hex>, identical on both sides
    tag: str  # tag written on the target, so registries that prune untagged manifests keep it

    @property
    def source_ref(self) -> str:
        return f"{self.source}@{self.digest}"

    @property
    def target_ref(self) -> str:
        return f"{self.target}:{self.tag}@{self.digest}"

    @property
    def needed(self) -> bool:
        return self.source != self.target


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``host[:port]/path[:tag][@digest]`` -> (repository, tag, digest); the port colon is not a tag."""
    rest, _, digest = ref.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :] or None, digest or None
    return rest, None, digest or None


def registry_host(repository: str) -> str:
    """The ``host[:port]`` part of a repository, as skopeo and registries.conf name a registry."""
    return repository.split("/", 1)[0]


def promoted_tag(version: str, digest: str) -> str:
    """``v2-promoted-<12 hex of the digest>``: says what it is, and one tag per (version, image)."""
    return f"v{version}-promoted-{digest.removeprefix('sha256:')[:12]}"


def _is_loopback(host: str) -> bool:
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_insecure(hosts: Iterable[str]) -> frozenset[str]:
    """The ``--insecure-registry`` hosts, refused unless loopback: plain HTTP elsewhere leaks credentials."""
    out = set()
    for host in hosts:
        host = host.strip().removeprefix("http://").rstrip("/")
        if not host or "/" in host or not _is_loopback(host):
            raise ImageCopyError(
                f"--insecure-registry {host!r}: only a loopback registry (localhost[:PORT], 127.0.0.1[:PORT], "
                "[::1][:PORT]) may be plain HTTP; for another host set `insecure = true` for it in "
                "registries.conf (see containers-registries.conf(5))"
            )
        out.add(host)
    return frozenset(out)


def _skopeo() -> str:
    exe = shutil.which("skopeo")
    if exe is None:
        raise ImageCopyError(
            "skopeo is not installed, so the image cannot be copied to the target registry: install it "
            "(apt-get install skopeo; GitHub's Ubuntu runners have it) and run the promotion again"
        )
    return exe


def _one_line(stderr: str) -> str:
    fatal = _FATAL_RE.findall(stderr)
    text = fatal[-1].replace('\\"', '"') if fatal else (stderr.strip().splitlines() or ["no error output"])[-1]
    return " ".join(text.split())


def _hint(message: str, copy: ImageCopy) -> str:
    """What to do about a skopeo failure, for the registry the message names."""
    # skopeo nests "context: context: cause"; the host nearest the cause is the one that failed.
    found = {h: message.rfind(h) for h in (registry_host(copy.source), registry_host(copy.target))}
    host = max(found, key=lambda h: found[h]) if max(found.values()) >= 0 else " / ".join(found)
    low = message.lower()
    if "unauthorized" in low or "authentication required" in low or "denied" in low or "forbidden" in low:
        return (
            f"log in to {host} (`skopeo login {host}` or `docker login {host}`); "
            f"credentials are read from {_AUTH_FILES}"
        )
    if "server gave http response to https client" in low:
        return f"{host} serves plain HTTP: if it is a loopback test registry, pass --insecure-registry {host}"
    if "x509" in low or "certificate" in low:
        return f"{host}'s TLS certificate is not trusted: add its CA to /etc/containers/certs.d/{host}/ca.crt"
    if "manifest unknown" in low and copy.source in message:
        return (
            f"{copy.source} has no image {copy.digest}: are the outputs those of the deployed stack "
            "(`pulumi stack output --json`)? An image built by another run has another digest"
        )
    if any(s in low for s in ("connection refused", "no such host", "i/o timeout", "network is unreachable")):
        return f"{host} is unreachable from here: check the registry address in the stack file and that it is up"
    return "check both registries and the credentials in the container auth file"


def _tls_flags(flag: str, repository: str, insecure: frozenset[str]) -> list[str]:
    return [f"{flag}=false"] if registry_host(repository) in insecure else []


def _run(cmd: list[str], timeout: int, what: str, copy: ImageCopy) -> bytes:
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageCopyError(
            f"{what} timed out after {timeout} s: check that both registries are reachable and run it again"
        ) from exc
    except OSError as exc:
        raise ImageCopyError(f"{what}: cannot run skopeo ({exc}); reinstall it (apt-get install skopeo)") from exc
    if res.returncode != 0:
        msg = _one_line(res.stderr.decode(errors="replace"))
        raise ImageCopyError(f"{what} failed: {msg}; {_hint(msg, copy)}")
    return res.stdout


def _manifest(skopeo: str, ref: str, digest: str, copy: ImageCopy, insecure: frozenset[str]) -> bytes:
    """The raw manifest at ``ref``; refused unless its sha256 is ``digest`` (what a pull by digest checks)."""
    raw = _run(
        [skopeo, "inspect", "--raw", *_tls_flags("--tls-verify", copy.target, insecure), f"docker://{ref}"],
        INSPECT_TIMEOUT_S,
        f"reading {ref} back",
        copy,
    )
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != digest:
        raise ImageCopyError(
            f"{ref} serves digest {got} after the copy, not {digest}: prod would run another image than the "
            "source; check that the target registry stores manifests unchanged (and not per platform)"
        )
    return raw


def verify(copy: ImageCopy, insecure: frozenset[str] = frozenset()) -> list[str]:
    """Read the copy back from the target: the tag serves exactly ``digest``, and an index's every manifest."""
    skopeo = _skopeo()
    raw = _manifest(skopeo, f"{copy.target}:{copy.tag}", copy.digest, copy, insecure)
    seen = [copy.digest]
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    if isinstance(doc, dict) and (doc.get("mediaType") in _INDEX_TYPES or "manifests" in doc):
        for m in doc.get("manifests") or []:
            child = str(m.get("digest", ""))
            if names.matches(names.DIGEST, child):
                _manifest(skopeo, f"{copy.target}@{child}", child, copy, insecure)
                seen.append(child)
    return seen


def copy_image(copy: ImageCopy, insecure: frozenset[str] = frozenset()) -> list[str]:
    """Copy ``source@digest`` to ``target:tag`` unchanged, then verify; returns the digests read back."""
    if not names.matches(names.DIGEST, copy.digest):
        raise ImageCopyError(f'"{copy.digest}" is not an image digest (expected "sha256:" and 64 hex digits)')
    skopeo = _skopeo()
    _run(
        [
            skopeo,
            "copy",
            "--quiet",
            "--all",  # an index with every platform manifest, not just this machine's platform
            "--preserve-digests",  # fail rather than re-encode: prod pins this exact digest
            *_tls_flags("--src-tls-verify", copy.source, insecure),
            *_tls_flags("--dest-tls-verify", copy.target, insecure),
            f"docker://{copy.source_ref}",
            f"docker://{copy.target}:{copy.tag}",
        ],
        COPY_TIMEOUT_S,
        f"copying image {copy.source_ref} to {copy.target}:{copy.tag}",
        copy,
    )
    return verify(copy, insecure)
