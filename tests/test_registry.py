"""Model registry: versions, immutability, dedupe, corruption, real concurrent processes, crash safety."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, read_spec, write_spec
from services.registry import Registry, RegistryError
from services.registry.store import PAUSE_ENV
from stacks.cli import main
from tests.conftest import make_torch_mlp_artifact

DLSTACK = [sys.executable, "-m", "stacks.cli"]


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


def test_register_assigns_versions_dedupes_and_exports(tmp_path: Path, torch_artifacts: tuple[Path, Path]) -> None:
    a, b = torch_artifacts
    reg = Registry(tmp_path / "reg")
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


def test_a_changed_artifact_never_overwrites_a_version(tmp_path: Path, torch_artifacts: tuple[Path, Path]) -> None:
    reg = Registry(tmp_path / "reg")
    art = byte_artifact(tmp_path / "art", b"weights-v1")
    v1 = reg.register(art, "m", "onnx").version
    byte_artifact(art, b"weights-v2")  # same directory, new content
    v2 = reg.register(art, "m", "onnx").version
    assert (v1.version, v2.version) == ("1", "2")
    assert (reg.resolve("m:1").path / "model.onnx").read_bytes() == b"weights-v1"
    assert (reg.resolve("m:2").path / "model.onnx").read_bytes() == b"weights-v2"
    # Stored files are read-only so an editor can't change them by accident (verify catches the rest).
    assert (reg.resolve("m:1").path / "model.onnx").stat().st_mode & 0o222 == 0


def test_verify_names_each_corrupted_file_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.register(byte_artifact(tmp_path / "a", b"aaaa"), "m", "onnx")
    reg.register(byte_artifact(tmp_path / "b", b"bbbb"), "m", "onnx")
    assert main(["models", "verify", "--registry", str(root)]) == 0
    assert "ok: 2 version(s) verified" in capsys.readouterr().out

    blob = root / "blobs" / "sha256" / hashlib.sha256(b"bbbb").hexdigest()[:2] / hashlib.sha256(b"bbbb").hexdigest()
    blob.chmod(0o644)
    blob.write_bytes(b"bit rot")
    checkout = root / "models" / "m" / "1" / "model.onnx"
    checkout.chmod(0o644)
    checkout.write_bytes(b"edited")
    assert main(["models", "verify", "--registry", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT m:2: model.onnx: blob is corrupted (sha256 {hashlib.sha256(b'bit rot').hexdigest()}" in err
    assert "CORRUPT m:1: " in err and "file 'model.onnx' is corrupted or was changed" in err
    assert "2 problem(s)" in err


def test_checkout_is_rebuilt_from_blobs(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    mv = reg.register(byte_artifact(tmp_path / "a", b"content"), "m", "onnx").version
    (mv.path / "model.onnx").chmod(0o644)
    reg.repair_checkout("m:1")
    assert (reg.resolve("m:1").path / "model.onnx").read_bytes() == b"content"
    assert reg.verify() == []


def test_references_aliases_and_their_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")
    reg = Registry(root)
    reg.register(byte_artifact(tmp_path / "a", b"1"), "m", "onnx")
    reg.register(byte_artifact(tmp_path / "b", b"2"), "m", "onnx")
    assert main(["models", "alias", "set", "--registry", root, "m", "champion", "1"]) == 0
    assert capsys.readouterr().out == "m@champion -> m:1\n"
    assert reg.resolve("m@champion").version == "1"
    assert reg.resolve("m@latest").version == "2"
    assert reg.resolve("m:2").aliases == ()

    cases = {
        "nope:1": "model 'nope' is not in the registry",
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


def test_show_and_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")
    art = byte_artifact(tmp_path / "a", b"x")
    assert main(["models", "register", str(art), "--registry", root, "--name", "m", "--framework", "onnx",
                 "--metric", "accuracy=0.5", "--metric", "split=test", "--dataset", "a" * 64]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("registered m:1 (sha256 ")
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


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DLSTACK_REGISTRY": str(root), **extra}


@pytest.mark.xdist_group("registry-processes")
def test_concurrent_registers_in_real_processes_never_share_a_version(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    arts = [byte_artifact(tmp_path / f"a{i}", f"model-{i}".encode()) for i in range(4)]
    same = byte_artifact(tmp_path / "same", b"identical")
    # Each writer holds the lock 0.3 s in the middle of its index write: without the lock they'd collide.
    env = _env(root, **{PAUSE_ENV: "0.3"})
    cmds = [[*DLSTACK, "models", "register", str(a), "--name", "m", "--framework", "onnx", "--json"] for a in arts]
    cmds += [[*DLSTACK, "models", "register", str(same), "--name", "m", "--framework", "onnx", "--json"]] * 2
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * len(cmds), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    distinct = [r["version"] for r in results[:4]]
    same_versions = {r["version"] for r in results[4:]}
    assert len(same_versions) == 1, "identical content must map to one version"
    assert sorted([*distinct, *same_versions], key=int) == [str(i) for i in range(1, 6)]
    assert sum(r["created"] for r in results[4:]) == 1
    reg = Registry(root)
    assert [mv.version for mv in reg.versions("m")] == [str(i) for i in range(1, 6)]
    assert reg.verify() == []


@pytest.mark.xdist_group("registry-processes")
def test_index_survives_a_writer_killed_mid_write(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry(root).register(byte_artifact(tmp_path / "a", b"one"), "m", "onnx")
    before = (root / "index.json").read_bytes()
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
    proc = subprocess.Popen(cmd, env=_env(root, **{PAUSE_ENV: "60"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob(".index.json.*")):  # the new index is written and fsynced, not yet renamed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "writer never reached the pause"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert (root / "index.json").read_bytes() == before
    reg = Registry(root)
    assert [mv.version for mv in reg.versions("m")] == ["1"]
    assert reg.verify() == []
    # The dead writer's lock died with it: the next register proceeds and gets version 2.
    again = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert [mv.version for mv in Registry(root).versions("m")] == ["1", "2"]


def test_register_a_bare_model_file_packages_it(
    tmp_path: Path, torch_artifacts: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = torch_artifacts
    root = str(tmp_path / "reg")
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


def test_directory_entries_like_a_savedmodel_round_trip(tmp_path: Path) -> None:
    from services.artifact import tree_sha256

    art = tmp_path / "art"
    for rel, body in {"saved/saved_model.pb": b"graph", "saved/variables/v.data": b"w", "saved/a-c": b"x"}.items():
        (art / rel).parent.mkdir(parents=True, exist_ok=True)
        (art / rel).write_bytes(body)
    t = TensorSpec(name="x", datatype="FP32", shape=(-1, 2))  # type: ignore[arg-type]
    files = (FileEntry(path="saved", sha256=tree_sha256(art / "saved")),)
    sig = Signature(inputs=(t,), outputs=(t,))
    write_spec(art, ModelSpec(name="tf", framework="tensorflow", files=files, signature=sig))  # type: ignore[arg-type]
    reg = Registry(tmp_path / "reg")
    mv = reg.register(art, "tf", "tensorflow").version
    assert reg.verify() == []  # "a-c" sorts before "variables/..." as paths, not as strings
    out = mv.export(tmp_path / "export")
    assert tree_sha256(out / "saved") == files[0].sha256
    (reg.root / "models" / "tf" / "1" / "saved" / "variables" / "v.data").chmod(0o644)
    (reg.root / "models" / "tf" / "1" / "saved" / "variables" / "v.data").write_bytes(b"changed")
    assert [p.split(": ", 1)[0] for p in reg.verify()] == ["tf:1"]
