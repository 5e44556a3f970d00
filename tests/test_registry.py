"""Model registry: versions, immutability, dedupe, corruption, real concurrent processes, crash safety.

Every test runs twice: on a local directory and on a real S3 API server on loopback (``tests/s3.py``),
through the same ``--registry`` / ``$DLSTACK_REGISTRY`` location a user would give.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.registry import Registry, RegistryError
from services.registry.store import PAUSE_ENV, PAUSE_MARKER
from services.serving.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, read_spec, write_spec
from stacks.cli import main
from tests.conftest import make_torch_mlp_artifact
from tests.s3 import S3Server, point_at

DLSTACK = [sys.executable, "-m", "stacks.cli"]


@dataclass
class Backend:
    """One registry under test, as a location string, plus direct access to its storage."""

    kind: str  # "local" | "s3"
    location: str  # what --registry and $DLSTACK_REGISTRY take
    env: dict[str, str]  # the environment a `dlstack` subprocess needs to reach it
    server: S3Server | None = None
    bucket: str = ""
    prefix: str = ""

    def registry(self) -> Registry:
        return Registry(self.location)

    def index_bytes(self) -> bytes | None:
        if self.server is None:
            p = Path(self.location) / "index.json"
            return p.read_bytes() if p.exists() else None
        try:
            body = self.server.client().get_object(Bucket=self.bucket, Key=f"{self.prefix}/index.json")["Body"]
            return bytes(body.read())
        except Exception:
            return None

    def overwrite_blob(self, sha: str, data: bytes) -> None:
        """Damage a stored blob behind the registry's back (bit rot, a stray tool)."""
        if self.server is None:
            blob = Path(self.location) / "blobs" / "sha256" / sha[:2] / sha
            blob.chmod(0o644)
            blob.write_bytes(data)
        else:  # straight through the S3 API: an unconditional PUT over the object
            key = f"{self.prefix}/blobs/sha256/{sha[:2]}/{sha}"
            self.server.client().put_object(Bucket=self.bucket, Key=key, Body=data)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DLSTACK_CACHE", str(cache))
    if request.param == "local":
        root = str(tmp_path / "reg")
        return Backend("local", root, {**os.environ, "DLSTACK_REGISTRY": root, "DLSTACK_CACHE": str(cache)})
    server: S3Server = request.getfixturevalue("s3_server")
    point_at(server, monkeypatch, cache)
    bucket = server.bucket()
    location = f"s3://{bucket}/team/models"
    env = {**os.environ, "DLSTACK_REGISTRY": location}
    return Backend("s3", location, env, server, bucket, "team/models")


@pytest.fixture(scope="module")
def torch_artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real TorchScript artifacts with different weights (built once for the module)."""
    base = tmp_path_factory.mktemp("artifacts")
    return make_torch_mlp_artifact(base / "a", seed=0), make_torch_mlp_artifact(base / "b", seed=1)


def byte_artifact(d: Path, payload: bytes, name: str = "m") -> Path:
    """An ONNX-framework artifact whose file is arbitrary bytes: the registry stores, it never loads."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(payload)
    tensor = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))  # type: ignore[arg-type]
    write_spec(
        d,
        ModelSpec(
            name=name,
            framework="onnx",  # type: ignore[arg-type]
            files=(FileEntry(path="model.onnx", sha256=file_sha256(d / "model.onnx")),),
            signature=Signature(inputs=(tensor,), outputs=(tensor,)),
        ),
    )
    return d


def test_register_assigns_versions_dedupes_and_exports(
    backend: Backend, tmp_path: Path, torch_artifacts: tuple[Path, Path]
) -> None:
    a, b = torch_artifacts
    reg = backend.registry()
    first = reg.register(a, "mnist-mlp", "pytorch", metrics={"accuracy": 0.97}, note="baseline")
    assert (first.created, first.version.version) == (True, "1")
    again = reg.register(a, "mnist-mlp", "pytorch")
    assert (again.created, again.version.version) == (False, "1")
    second = reg.register(b, "mnist-mlp", "pytorch")
    assert (second.created, second.version.version) == (True, "2")

    mv = reg.resolve("mnist-mlp:1")
    assert mv.sha256 == read_spec(a).sha256
    assert mv.framework_version == f"torch=={importlib.metadata.version('torch')}"
    assert mv.metrics == {"accuracy": 0.97} and mv.note == "baseline"
    assert read_spec(mv.path).version == "1"  # the model.yaml the server reads carries the assigned version
    out = mv.export(tmp_path / "export")
    assert (out / "model.pt").read_bytes() == (a / "model.pt").read_bytes()
    assert read_spec(out) == mv.spec
    assert reg.resolve("mnist-mlp@latest").version == "2"
    assert reg.verify() == []


def test_a_changed_artifact_never_overwrites_a_version(backend: Backend, tmp_path: Path) -> None:
    reg = backend.registry()
    art = byte_artifact(tmp_path / "art", b"weights-v1")
    v1 = reg.register(art, "m", "onnx").version
    byte_artifact(art, b"weights-v2")  # same directory, new content
    v2 = reg.register(art, "m", "onnx").version
    assert (v1.version, v2.version) == ("1", "2")
    assert (reg.resolve("m:1").path / "model.onnx").read_bytes() == b"weights-v1"
    assert (reg.resolve("m:2").path / "model.onnx").read_bytes() == b"weights-v2"
    # Stored files are read-only so an editor can't change them by accident (verify catches the rest).
    assert (reg.resolve("m:1").path / "model.onnx").stat().st_mode & 0o222 == 0


def test_verify_names_each_corrupted_file_and_exits_1(
    backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loc = backend.location
    reg = backend.registry()
    reg.register(byte_artifact(tmp_path / "a", b"aaaa"), "m", "onnx")
    reg.register(byte_artifact(tmp_path / "b", b"bbbb"), "m", "onnx")
    assert main(["models", "verify", "--registry", loc]) == 0
    assert "ok: 2 version(s) verified" in capsys.readouterr().out

    backend.overwrite_blob(hashlib.sha256(b"bbbb").hexdigest(), b"bit rot")
    checkout = reg.resolve("m:1").path / "model.onnx"
    checkout.chmod(0o644)
    checkout.write_bytes(b"edited")
    assert main(["models", "verify", "--registry", loc]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT m:2: model.onnx: blob is corrupted (sha256 {hashlib.sha256(b'bit rot').hexdigest()}" in err
    assert "CORRUPT m:1: " in err and "file 'model.onnx' is corrupted or was changed" in err
    assert "2 problem(s)" in err
    # A corrupted blob is never served: exporting it fails in one line (on a machine whose cache
    # doesn't hold the good copy, which the uploader's does).
    monkeypatch.setenv("DLSTACK_CACHE", str(tmp_path / "other-machine-cache"))
    assert main(["models", "export", "--registry", loc, "m:2", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is corrupted" in err and "dlstack models verify" in err


def test_checkout_is_rebuilt_from_blobs(backend: Backend, tmp_path: Path) -> None:
    reg = backend.registry()
    mv = reg.register(byte_artifact(tmp_path / "a", b"content"), "m", "onnx").version
    (mv.path / "model.onnx").chmod(0o644)
    reg.repair_checkout("m:1")
    assert (reg.resolve("m:1").path / "model.onnx").read_bytes() == b"content"
    assert reg.verify() == []


def test_references_aliases_and_their_errors(
    backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = backend.location
    reg = backend.registry()
    reg.register(byte_artifact(tmp_path / "a", b"1"), "m", "onnx")
    reg.register(byte_artifact(tmp_path / "b", b"2"), "m", "onnx")
    assert main(["models", "alias", "set", "--registry", root, "m", "champion", "1"]) == 0
    assert capsys.readouterr().out == "m@champion -> m:1\n"
    assert reg.resolve("m@champion").version == "1"
    assert reg.resolve("m@latest").version == "2"
    assert reg.resolve("m:2").aliases == ()

    cases = {
        "nope:1": f"model 'nope' is not in the registry {reg.url}",
        "m:9": "model 'm' has no version '9' (versions: 1, 2); list them with `dlstack models show m`",
        "m@canary": "model 'm' has no alias 'canary' (aliases: champion); "
        "set it with `dlstack models alias set m canary VERSION`",
        "M:1": "'M:1' is not a model reference; use NAME:VERSION",
    }
    for ref, message in cases.items():
        assert main(["models", "show", "--registry", root, ref]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(RegistryError, match="no version '7'"):
        reg.set_alias("m", "champion", "7")


def test_show_and_list_json(backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = backend.location
    art = byte_artifact(tmp_path / "a", b"x")
    assert main(["models", "register", str(art), "--registry", root, "--name", "m", "--framework", "onnx",
                 "--metric", "accuracy=0.5", "--metric", "split=test", "--dataset", "a" * 64]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith(f"registered m:1 (sha256 {read_spec(art).sha256[:12]}) in {root}")
    assert main(["models", "show", "--registry", root, "m:1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"] == {"accuracy": 0.5, "split": "test"}
    assert shown["datasets"] == [{"oid": "a" * 64, "path": None}]
    assert main(["models", "list", "--registry", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ALIASES", "FRAMEWORK", "SHA256", "CREATED", "AUTHOR", "DATASETS"]
    assert lines[1].split()[:3] == ["m", "1", "onnx"]
    assert main(["models", "register", str(art), "--registry", root, "--name", "m", "--framework", "keras"]) == 2
    assert "model.yaml says framework 'onnx', not 'keras'" in capsys.readouterr().err


def _communicate_all(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.xdist_group("registry-processes")
def test_concurrent_writers_in_real_processes_never_share_a_version_or_lose_an_alias(
    backend: Backend, tmp_path: Path
) -> None:
    reg = backend.registry()
    reg.register(byte_artifact(tmp_path / "base", b"base"), "m", "onnx")  # m:1, for the aliases
    arts = [byte_artifact(tmp_path / f"a{i}", f"model-{i}".encode()) for i in range(5)]
    same = byte_artifact(tmp_path / "same", b"identical")
    # Each writer sleeps 0.3 s with its new index ready but not yet in place: without the lock
    # (directory) or the compare-and-swap (S3) they would overwrite each other's versions and aliases.
    env = {**backend.env, PAUSE_ENV: "0.3"}
    register = [*DLSTACK, "models", "register", "--name", "m", "--framework", "onnx", "--json"]
    cmds = [[*register, str(a)] for a in arts] + [[*register, str(same)]] * 2
    aliases = [f"team{i}" for i in range(3)]
    cmds += [[*DLSTACK, "models", "alias", "set", "m", alias, "1"] for alias in aliases]
    assert len(cmds) >= 10
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = _communicate_all(procs, timeout=240)
    assert [p.returncode for p in procs] == [0] * len(cmds), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs[: len(arts) + 2]]
    distinct = [r["version"] for r in results[: len(arts)]]
    same_versions = {r["version"] for r in results[len(arts) :]}
    assert len(same_versions) == 1, "identical content must map to one version"
    assert sorted([*distinct, *same_versions], key=int) == [str(i) for i in range(2, 2 + len(arts) + 1)]
    assert sum(r["created"] for r in results[len(arts) :]) == 1
    reg = backend.registry()
    assert [mv.version for mv in reg.versions("m")] == [str(i) for i in range(1, 2 + len(arts) + 1)]
    assert reg.resolve("m:1").aliases == tuple(aliases), "every concurrent alias survives"
    assert reg.verify() == []
    if backend.kind == "local":
        assert not list(Path(backend.location).glob(".index.json.*")), "no temp index left behind"


def _wait_for_line(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> None:
    """Read ``proc``'s stderr until ``marker`` (the writer is paused with its new index ready)."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"writer never reached the pause: {seen.decode(errors='replace')[-2000:]}"
        if sel.select(min(left, 1.0)):
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk or proc.poll() is None, f"writer exited: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk


@pytest.mark.xdist_group("registry-processes")
def test_index_survives_a_writer_killed_mid_write(backend: Backend, tmp_path: Path) -> None:
    Registry(backend.location).register(byte_artifact(tmp_path / "a", b"one"), "m", "onnx")
    before = backend.index_bytes()
    assert before is not None
    cmd = [
        *DLSTACK,
        "models",
        "register",
        str(byte_artifact(tmp_path / "b", b"two")),
        "--name",
        "m",
        "--framework",
        "onnx",
    ]
    env = {**backend.env, PAUSE_ENV: "60"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_line(proc, PAUSE_MARKER, timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert backend.index_bytes() == before
    reg = backend.registry()
    assert [mv.version for mv in reg.versions("m")] == ["1"]
    assert reg.verify() == []
    # Nothing of the dead writer blocks the next one (no lock file on S3; a dead flock on disk): version 2.
    again = subprocess.run(cmd, env=backend.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert [mv.version for mv in backend.registry().versions("m")] == ["1", "2"]


def test_register_a_bare_model_file_packages_it(
    backend: Backend, torch_artifacts: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = torch_artifacts
    root = backend.location
    base = ["models", "register", "--registry", root, "--name", "mlp", "--framework", "pytorch"]
    assert main([*base, str(a / "model.pt")]) == 2  # TorchScript has no recorded signature
    assert "give one --input NAME:DTYPE:SHAPE per forward() argument" in capsys.readouterr().err
    assert main([*base, str(a / "model.pt"), "--input", "input:FP32:-1x8"]) == 0
    assert capsys.readouterr().out.startswith("registered mlp:1 ")
    mv = Registry(root).resolve("mlp:1")
    assert [(t.name, t.shape) for t in mv.spec.signature.outputs] == [("output", (-1, 3))]  # inferred by a real run
    # The same weights registered as a ready artifact are the same content: no new version.
    assert main([*base, str(a)]) == 0
    assert capsys.readouterr().out == "identical content is already registered as mlp:1; nothing stored\n"


def test_directory_entries_like_a_savedmodel_round_trip(backend: Backend, tmp_path: Path) -> None:
    from services.serving.artifact import tree_sha256

    art = tmp_path / "art"
    for rel, body in {"saved/saved_model.pb": b"graph", "saved/variables/v.data": b"w", "saved/a-c": b"x"}.items():
        (art / rel).parent.mkdir(parents=True, exist_ok=True)
        (art / rel).write_bytes(body)
    t = TensorSpec(name="x", datatype="FP32", shape=(-1, 2))  # type: ignore[arg-type]
    files = (FileEntry(path="saved", sha256=tree_sha256(art / "saved")),)
    sig = Signature(inputs=(t,), outputs=(t,))
    write_spec(art, ModelSpec(name="tf", framework="tensorflow", files=files, signature=sig))  # type: ignore[arg-type]
    reg = backend.registry()
    mv = reg.register(art, "tf", "tensorflow").version
    assert reg.verify() == []  # "a-c" sorts before "variables/..." as paths, not as strings
    out = mv.export(tmp_path / "export")
    assert tree_sha256(out / "saved") == files[0].sha256
    (mv.path / "saved" / "variables" / "v.data").chmod(0o644)
    (mv.path / "saved" / "variables" / "v.data").write_bytes(b"changed")
    assert [p.split(": ", 1)[0] for p in reg.verify()] == ["tf:1"]


def test_export_streams_through_a_verified_cache(backend: Backend, tmp_path: Path) -> None:
    """An object store's blobs are downloaded once, re-hashed on every cache hit, and fetched again when bad."""
    reg = backend.registry()
    payload = os.urandom(3 * (1 << 20) + 17)  # several streaming chunks
    reg.register(byte_artifact(tmp_path / "a", payload), "m", "onnx")
    sha = hashlib.sha256(payload).hexdigest()
    fresh = Registry(backend.location)  # another process's view: nothing materialized yet
    assert (fresh.resolve("m:1").export(tmp_path / "e1") / "model.onnx").read_bytes() == payload
    if backend.kind == "s3":
        cached = Path(os.environ["DLSTACK_CACHE"]) / "blobs" / "sha256" / sha[:2] / sha
        assert cached.read_bytes() == payload and cached.stat().st_mode & 0o222 == 0
        cached.chmod(0o644)
        cached.write_bytes(b"tampered")  # a bad cache entry is never served: dropped and fetched again
    assert (fresh.resolve("m:1").export(tmp_path / "e2") / "model.onnx").read_bytes() == payload


def test_register_with_reference_data_stores_a_verified_drift_reference(
    backend: Backend, tmp_path: Path, torch_artifacts: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from services.serving.server.drift import REFERENCE_FILE, read_reference

    a, _ = torch_artifacts
    root = backend.location
    data = tmp_path / "ref.npz"
    np.savez(data, input=np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    base = ["models", "register", "--registry", root, "--name", "mlp", "--framework", "pytorch"]
    before = sorted(p.name for p in a.iterdir())
    assert main([*base, str(a), "--reference-data", str(data)]) == 0
    assert capsys.readouterr().out.startswith("registered mlp:1 ")
    assert sorted(p.name for p in a.iterdir()) == before  # the source artifact is never written
    mv = Registry(root).resolve("mlp:1")
    assert [f.path for f in mv.spec.files] == ["model.pt", REFERENCE_FILE]
    out = mv.export(tmp_path / "export")  # what the image build copies into /model
    assert read_reference(out / REFERENCE_FILE).data_sha256 == file_sha256(data)
    assert main(["models", "verify", "--registry", root]) == 0
    capsys.readouterr()
    # The reference is part of the content: the model without it is another version.
    assert main([*base, str(a)]) == 0
    assert capsys.readouterr().out.startswith("registered mlp:2 ")
    # A bad file is one line naming the flag and the fix, and stores nothing.
    np.savez(data, input=np.zeros((300, 8), np.float64))
    assert main([*base, str(a), "--reference-data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference-data" in err and "astype(np.float32)" in err and "\n" not in err
    assert [v.version for v in Registry(root).versions("mlp")] == ["1", "2"]
