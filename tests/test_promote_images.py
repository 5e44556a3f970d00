"""Promotion copies dev's image into prod's registry: two real OCI registries on loopback, real skopeo.

"dev" and "prod" are two ``docker-registry`` (CNCF distribution) processes started per test. The images are
built here in milliseconds as OCI layouts (a config and one gzipped layer of a one-file rootfs, written with
tarfile and json) and pushed to dev with skopeo; then the real ``dlstack promote`` runs in a temporary git
repo and skopeo checks what prod serves.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.registry import Registry
from stacks.cli import main
from stacks.images import promoted_tag
from stacks.promote import history
from tests.conftest import ROOT, free_port, git
from tests.test_promote import DEV, PROD, artifact

pytestmark = pytest.mark.tool("skopeo", "docker-registry")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# bcrypt of "promote-secret" (cost 4: fast); distribution's htpasswd auth accepts only bcrypt.
HTPASSWD = "promoter:$2b$04$XS.CPXql4lSXhU9flLVfDe8kfzafeSFTSruEjj.qu6QmKuyxd4EwO\n"


# ---- OCI registries -------------------------------------------------------------------------


@dataclass
class OciRegistry:
    host: str  # 127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log: Path


def _wait_up(reg: OciRegistry, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.proc.poll() is not None:
            raise AssertionError(f"docker-registry on {reg.host} exited:\n{reg.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # up, and asking for credentials
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"docker-registry on {reg.host} did not answer /v2/ in {timeout} s:\n{reg.log.read_text()}")


@pytest.fixture
def oci_registry(tmp_path: Path) -> Iterator[Callable[..., OciRegistry]]:
    """Factory: ``oci_registry("dev", auth=False)`` starts a distribution server on a free loopback port."""
    started: list[OciRegistry] = []

    def start(name: str, auth: bool = False) -> OciRegistry:
        d = tmp_path / f"oci-{name}"
        d.mkdir()
        host = f"127.0.0.1:{free_port()}"
        config = [
            "version: 0.1",
            "log: {level: warn}",
            f"storage: {{filesystem: {{rootdirectory: {d / 'data'}}}}}",
            f"http: {{addr: {host}, secret: dlstack-tests}}",
        ]
        if auth:
            (d / "htpasswd").write_text(HTPASSWD)
            config.append(f"auth: {{htpasswd: {{realm: {name}, path: {d / 'htpasswd'}}}}}")
        (d / "config.yml").write_text("\n".join(config) + "\n")
        log = d / "registry.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(["docker-registry", "serve", str(d / "config.yml")], stdout=out, stderr=out)
        reg = OciRegistry(host, proc, log)
        started.append(reg)
        _wait_up(reg)
        return reg

    yield start
    for reg in started:
        reg.proc.terminate()
        try:
            reg.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            reg.proc.kill()
            reg.proc.wait()


# ---- images, built without a daemon ------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _image(layout: Path, arch: str, text: str) -> dict[str, Any]:
    """One platform's manifest descriptor: a rootfs with /hello.txt, reproducible (mtime 0)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = text.encode()
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(data), 0
        tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, gzip.compress(tar, mtime=0))}
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(layout, _json(config))},
        "layers": [layer],
    }
    return {
        "mediaType": OCI_MANIFEST,
        **_blob(layout, _json(manifest)),
        "platform": {"architecture": arch, "os": "linux"},
    }


def oci_layout(layout: Path, text: str, arches: tuple[str, ...] = ("amd64",)) -> tuple[str, list[str]]:
    """An OCI layout tagged ``latest``: one manifest, or an index of one per arch; (top digest, platform digests)."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = [_image(layout, arch, f"{text} on {arch}\n") for arch in arches]
    if len(manifests) == 1:
        top = {k: v for k, v in manifests[0].items() if k != "platform"}
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        top = {"mediaType": OCI_INDEX, **_blob(layout, _json(index))}
    top["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return str(top["digest"]), [str(m["digest"]) for m in manifests]


def skopeo(*args: str, env: dict[str, str] | None = None) -> bytes:
    res = subprocess.run(["skopeo", *args], capture_output=True, check=False, env=env, timeout=120)
    assert res.returncode == 0, f"skopeo {' '.join(args)}: {res.stderr.decode()}"
    return res.stdout


def push(layout: Path, ref: str) -> None:
    skopeo("copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:latest", ref)


def served(ref: str, env: dict[str, str] | None = None) -> tuple[str, bytes]:
    """(sha256 of the manifest the registry serves for ``ref``, the manifest): what a pull by digest checks."""
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}", env=env)
    return "sha256:" + hashlib.sha256(raw).hexdigest(), raw


def catalog(host: str) -> list[str]:
    with urllib.request.urlopen(f"http://{host}/v2/_catalog", timeout=5) as r:
        repos: list[str] = json.load(r)["repositories"]
    return repos


# ---- the stacks ---------------------------------------------------------------------------------


@dataclass
class Promo:
    repo: Path  # git repo with Pulumi.dev.yaml / Pulumi.prod.yaml / stacks/promotions.yaml
    registry: Path  # the model registry (mnist-mlp 1..3, other 1; champion -> 2)
    outputs: Path  # dev's stack outputs
    dev: str  # dev's image registry host
    prod: str  # prod's image registry host
    tmp: Path

    @property
    def prod_file(self) -> Path:
        return self.repo / "Pulumi.prod.yaml"

    @property
    def history(self) -> Path:
        return self.repo / "stacks" / "promotions.yaml"

    def snapshot(self) -> tuple[str, str]:
        return self.prod_file.read_text(), self.history.read_text()

    def outputs_for(self, version: str, digest: str | None, host: str | None = None) -> None:
        """What `pulumi stack output --json -s dev` reports after `pulumi up` (a digest), or offline (a tag)."""
        repo = f"{host or self.dev}/dlstack/mnist-mlp"
        image = f"{repo}@{digest}" if digest else f"{repo}:v{version}-0123456789ab"
        sha = Registry(self.registry).resolve(f"mnist-mlp:{version}").sha256
        self.outputs.write_text(
            json.dumps(
                {"models": {"mnist-mlp": {"model": "mnist-mlp", "version": version, "sha256": sha, "image": image}}}
            )
        )

    def set_image_registry(self, stack: str, host: str) -> None:
        path = self.repo / f"Pulumi.{stack}.yaml"
        text = path.read_text()
        old = next(line for line in text.splitlines() if line.strip().startswith("registry:"))
        path.write_text(text.replace(old, f"    registry: {host}/dlstack"))
        git(self.repo, "commit", "-qam", f"{stack} images in {host}")

    def promote(self, *extra: str, insecure: tuple[str, ...] | None = None) -> int:
        hosts = (self.dev, self.prod) if insecure is None else insecure
        flags = [a for h in hosts for a in ("--insecure-registry", h)]
        return main(
            ["promote", "--from", "dev", "--to", "prod", "--model", "mnist-mlp", "--registry", str(self.registry),
             "--stack-dir", str(self.repo), "--outputs", str(self.outputs), "--no-render", *flags, *extra]
        )  # fmt: skip


@pytest.fixture
def promo(tmp_path: Path, oci_registry: Callable[..., OciRegistry]) -> Promo:
    dev, prod = oci_registry("dev").host, oci_registry("prod").host
    repo = tmp_path / "repo"
    (repo / "stacks").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "Pulumi.dev.yaml").write_text(DEV.replace("localhost:5001/dlstack", f"{dev}/dlstack"))
    (repo / "Pulumi.prod.yaml").write_text(PROD.replace("localhost:5001/dlstack", f"{prod}/dlstack"))
    shutil.copy(ROOT / "stacks" / "promotions.yaml", repo / "stacks" / "promotions.yaml")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stacks")
    reg = Registry(tmp_path / "registry")
    for v in (1, 2, 3):
        reg.register(artifact(tmp_path / f"a{v}", "mnist-mlp", f"weights {v}".encode()), "mnist-mlp", "pytorch")
    reg.register(artifact(tmp_path / "o1", "other", b"other"), "other", "pytorch")
    reg.set_alias("mnist-mlp", "champion", "2")
    return Promo(repo, reg.root, tmp_path / "dev-outputs.json", dev, prod, tmp_path)


def rendered_image(promo: Promo, monkeypatch: pytest.MonkeyPatch, name: str = "mnist-mlp") -> str:
    """The model-server image of ``name``'s Deployment in `dlstack render --stack prod` (the `pulumi up` program)."""
    from ruamel.yaml import YAML

    monkeypatch.setenv("DLSTACK_REGISTRY", str(promo.registry))
    out = promo.tmp / "render-prod"
    assert main(["render", "--stack", "prod", "--config-file", str(promo.prod_file), "--out", str(out)]) == 0
    dep = YAML(typ="safe").load((out / "manifests" / "models" / f"deployment-{name}.yaml").read_text())
    containers = dep["spec"]["template"]["spec"]["containers"]
    return str(next(c for c in containers if c["name"] == "model-server")["image"])


# ---- tests --------------------------------------------------------------------------------------


def test_promote_copies_the_image_dev_runs_into_prods_registry_and_rollback_restores_the_previous_one(
    promo: Promo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v2, _ = oci_layout(promo.tmp / "img-v2", "mnist-mlp v2")
    push(promo.tmp / "img-v2", f"docker://{promo.dev}/dlstack/mnist-mlp:v2-build")
    assert catalog(promo.prod) == []
    promo.outputs_for("2", v2)

    assert promo.promote() == 0
    out = capsys.readouterr().out
    tag = promoted_tag("2", v2)
    assert tag == f"v2-promoted-{v2[7:19]}"
    copied = f"{promo.prod}/dlstack/mnist-mlp:{tag}@{v2}"
    assert f"copied image mnist-mlp: {promo.dev}/dlstack/mnist-mlp@{v2} -> {copied}" in out
    # prod serves the very manifest dev runs, by digest and under the promotion tag.
    assert served(f"{promo.prod}/dlstack/mnist-mlp@{v2}")[0] == v2
    assert served(f"{promo.prod}/dlstack/mnist-mlp:{tag}")[0] == v2
    assert served(f"{promo.dev}/dlstack/mnist-mlp@{v2}") == served(f"{promo.prod}/dlstack/mnist-mlp@{v2}")
    assert f'digest: "{v2}"' in promo.prod_file.read_text()
    (record,) = history(promo.history)
    assert (record["digest"], record["image_from"], record["image_to"]) == (
        v2,
        f"{promo.dev}/dlstack/mnist-mlp@{v2}",
        copied,
    )
    # What `pulumi up -s prod` deploys: prod's registry, pinned to the copied digest.
    assert rendered_image(promo, monkeypatch) == f"{promo.prod}/dlstack/mnist-mlp@{v2}"
    git(promo.repo, "commit", "-qam", "promote v2")

    v3, _ = oci_layout(promo.tmp / "img-v3", "mnist-mlp v3")
    push(promo.tmp / "img-v3", f"docker://{promo.dev}/dlstack/mnist-mlp:v3-build")
    Registry(promo.registry).set_alias("mnist-mlp", "champion", "3")
    promo.outputs_for("3", v3)
    assert promo.promote() == 0
    assert served(f"{promo.prod}/dlstack/mnist-mlp@{v3}")[0] == v3
    git(promo.repo, "commit", "-qam", "promote v3")
    capsys.readouterr()

    # Rollback copies nothing: v2's image is still in prod's registry from its own promotion.
    args = ["rollback", "--env", "prod", "--model", "mnist-mlp", "--stack-dir", str(promo.repo), "--no-render"]
    assert main(args) == 0
    assert f"rolled back mnist-mlp: mnist-mlp:3 -> mnist-mlp:2 (image {v2})" in capsys.readouterr().out
    assert served(f"{promo.prod}/dlstack/mnist-mlp@{v2}")[0] == v2
    assert rendered_image(promo, monkeypatch) == f"{promo.prod}/dlstack/mnist-mlp@{v2}"
    assert [(r["action"], r["new"], r["image_to"]) for r in history(promo.history)] == [
        ("promote", "mnist-mlp:2", copied),
        ("promote", "mnist-mlp:3", f"{promo.prod}/dlstack/mnist-mlp:{promoted_tag('3', v3)}@{v3}"),
        ("rollback", "mnist-mlp:2", None),
    ]


def test_a_multi_arch_index_is_copied_whole(promo: Promo, capsys: pytest.CaptureFixture[str]) -> None:
    index, platforms = oci_layout(promo.tmp / "img-multi", "mnist-mlp v2", arches=("amd64", "arm64"))
    push(promo.tmp / "img-multi", f"docker://{promo.dev}/dlstack/mnist-mlp:v2-build")
    promo.outputs_for("2", index)
    assert promo.promote() == 0
    digest, raw = served(f"{promo.prod}/dlstack/mnist-mlp@{index}")
    assert digest == index
    assert json.loads(raw)["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in json.loads(raw)["manifests"]] == platforms
    for child in platforms:  # every platform, not only this machine's
        assert served(f"{promo.prod}/dlstack/mnist-mlp@{child}")[0] == child
    assert f'digest: "{index}"' in promo.prod_file.read_text()


def test_credentials_come_from_the_container_auth_file(
    promo: Promo,
    oci_registry: Callable[..., OciRegistry],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secured = oci_registry("prod-auth", auth=True).host
    promo.prod = secured
    promo.set_image_registry("prod", secured)
    digest, _ = oci_layout(promo.tmp / "img", "mnist-mlp v2")
    push(promo.tmp / "img", f"docker://{promo.dev}/dlstack/mnist-mlp:v2-build")
    promo.outputs_for("2", digest)
    # No credentials anywhere skopeo looks: an isolated HOME and XDG_RUNTIME_DIR.
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("HOME", str(promo.tmp / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(promo.tmp / "run"))
    (promo.tmp / "run").mkdir(mode=0o700)
    before = promo.snapshot()
    assert promo.promote() == 2
    err = capsys.readouterr().err
    assert "unauthorized" in err and f"log in to {secured} (`skopeo login {secured}`" in err, err
    assert promo.snapshot() == before

    # skopeo's default auth file, as `skopeo login` writes it.
    token = base64.b64encode(b"promoter:promote-secret").decode()
    auth = promo.tmp / "run" / "containers" / "auth.json"
    auth.parent.mkdir()
    auth.write_text(json.dumps({"auths": {secured: {"auth": token}}}))
    assert promo.promote() == 0
    assert (
        served(f"{secured}/dlstack/mnist-mlp@{digest}", env={**os.environ, "REGISTRY_AUTH_FILE": str(auth)})[0]
        == digest
    )


def _fake_skopeo(promo: Promo, monkeypatch: pytest.MonkeyPatch) -> None:
    """A skopeo whose copy is real but whose target serves other bytes: the read-back must catch it."""
    real = shutil.which("skopeo")
    bin_dir = promo.tmp / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "skopeo"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" = inspect ]; then printf \'{{"schemaVersion":2,"tampered":true}}\'; exit 0; fi\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def _no_skopeo(promo: Promo, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = promo.tmp / "no-skopeo-bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    monkeypatch.setenv("PATH", str(bin_dir))


FAILURES: dict[str, tuple[Callable[[Promo, pytest.MonkeyPatch], Any], tuple[str, ...] | None, str]] = {
    "not-in-dev": (
        lambda p, m: p.outputs_for("2", "sha256:" + "e" * 64),
        None,
        "manifest unknown; {dev}/dlstack/mnist-mlp has no image sha256:eeee",
    ),
    "prod-unreachable": (
        lambda p, m: p.set_image_registry("prod", p.prod.rsplit(":", 1)[0] + ":1"),
        None,
        "connection refused; 127.0.0.1:1 is unreachable from here: check the registry address in the stack file",
    ),
    "plain-http-without-the-flag": (
        lambda p, m: None,
        (),
        "server gave HTTP response to HTTPS client; {dev} serves plain HTTP: if it is a loopback test registry, "
        "pass --insecure-registry {dev}",
    ),
    "digest-mismatch": (
        _fake_skopeo,
        None,
        "after the copy, not {digest}: prod would run another image than the source",
    ),
    "skopeo-missing": (
        _no_skopeo,
        None,
        "skopeo is not installed, so the image cannot be copied to the target registry: install it "
        "(apt-get install skopeo; GitHub's Ubuntu runners have it) and run the promotion again",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_copy_refuses_in_one_line_and_writes_nothing(
    promo: Promo, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, _ = oci_layout(promo.tmp / "img", "mnist-mlp v2")
    push(promo.tmp / "img", f"docker://{promo.dev}/dlstack/mnist-mlp:v2-build")
    promo.outputs_for("2", digest)
    setup, insecure, message = FAILURES[case]
    setup(promo, monkeypatch)
    before = promo.snapshot()
    assert promo.promote(insecure=insecure) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlstack promote: error: image copy failed, nothing was written: ")
    assert err.count("\n") == 1, err
    assert message.format(dev=promo.dev, digest=digest) in err, err
    assert promo.snapshot() == before
    git(promo.repo, "diff", "--exit-code")


def test_offline_outputs_pin_only_the_version_and_copy_nothing(
    promo: Promo, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dlstack outputs` gives built images by tag, without a digest: no digest, nothing to copy."""
    promo.outputs_for("2", None)
    assert promo.promote() == 0
    out = capsys.readouterr().out
    assert (
        "promoted mnist-mlp: mnist-mlp:1 -> mnist-mlp:2 "
        "(no image digest known: prod builds from the registry; no image to copy)" in out
    )
    assert "copied image" not in out
    assert catalog(promo.prod) == []
    assert "digest:" not in promo.prod_file.read_text().split("- name: other")[0]
    (record,) = history(promo.history)
    assert (record["digest"], record["image_from"], record["image_to"]) == (None, None, None)


def test_dry_run_copies_nothing(promo: Promo, capsys: pytest.CaptureFixture[str]) -> None:
    digest, _ = oci_layout(promo.tmp / "img", "mnist-mlp v2")
    push(promo.tmp / "img", f"docker://{promo.dev}/dlstack/mnist-mlp:v2-build")
    promo.outputs_for("2", digest)
    before = promo.snapshot()
    assert promo.promote("--dry-run") == 0
    out = capsys.readouterr().out
    target = f"{promo.prod}/dlstack/mnist-mlp:{promoted_tag('2', digest)}@{digest}"
    assert f"would copy image mnist-mlp: {promo.dev}/dlstack/mnist-mlp@{digest} -> {target}" in out
    assert catalog(promo.prod) == []
    assert promo.snapshot() == before


def test_insecure_registry_is_only_for_loopback(promo: Promo, capsys: pytest.CaptureFixture[str]) -> None:
    before = promo.snapshot()
    assert promo.promote(insecure=("ghcr.io",)) == 2
    assert capsys.readouterr().err == (
        "dlstack promote: error: --insecure-registry 'ghcr.io': only a loopback registry (localhost[:PORT], "
        "127.0.0.1[:PORT], [::1][:PORT]) may be plain HTTP; for another host set `insecure = true` for it in "
        "registries.conf (see containers-registries.conf(5))\n"
    )
    assert promo.snapshot() == before
