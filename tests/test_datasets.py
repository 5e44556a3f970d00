"""Datasets in Git LFS: add, verify, lineage; against real temporary git repos with real git-lfs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from services import datasets
from services.serving.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, write_spec
from stacks.cli import main
from tests.conftest import ROOT, git

pytestmark = pytest.mark.tool("git-lfs")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "user.name", "Dana Tester")
    git(r, "config", "user.email", "dana@example.com")
    git(r, "lfs", "install", "--local")
    (r / "stacks").mkdir()
    (r / ".gitattributes").write_text("*.npz filter=lfs diff=lfs merge=lfs -text\n")
    (r / "README.md").write_text("x\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "init")
    monkeypatch.chdir(r)
    monkeypatch.setenv("DLSTACK_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.delenv("DLSTACK_DATASETS", raising=False)
    return r


def test_add_tracks_with_lfs_and_records_the_oid(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = repo / "stacks" / "datasets.yaml"
    manifest.write_text("# our datasets; keep this comment\ndatasets: []\n")
    data = repo / "data" / "train.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(5000))
    covered = repo / "data" / "labels.npz"
    covered.write_bytes(b"npz-bytes" * 10)
    assert main(["datasets", "add", "data/train.bin", "--description", "training split"]) == 0
    oid = hashlib.sha256(data.read_bytes()).hexdigest()
    assert f"tracked data/train.bin (oid {oid}, 5000 bytes)" in capsys.readouterr().out
    # A person annotates the manifest; the next add must keep that.
    manifest.write_text(manifest.read_text().replace("size: 5000\n", "size: 5000  # bytes\n"))
    assert main(["datasets", "add", str(covered)]) == 0
    # Only the uncovered file got its own pattern; *.npz already covered labels.npz.
    assert (repo / ".gitattributes").read_text() == (
        "*.npz filter=lfs diff=lfs merge=lfs -text\ndata/train.bin filter=lfs diff=lfs merge=lfs -text\n"
    )
    assert manifest.read_text() == (
        "# our datasets; keep this comment\n"
        "datasets:\n"
        "  - path: data/train.bin\n"
        f"    oid: {oid}\n"
        "    size: 5000  # bytes\n"
        "    description: training split\n"
        "  - path: data/labels.npz\n"
        f"    oid: {hashlib.sha256(covered.read_bytes()).hexdigest()}\n"
        "    size: 90\n"
        "    description: ''\n"
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data")
    lfs = git(repo, "lfs", "ls-files", "--long")
    assert f"{oid} * data/train.bin" in lfs
    assert main(["datasets", "verify"]) == 0
    assert "ok: 2 dataset(s) match" in capsys.readouterr().out


def test_verify_flags_changed_content_and_large_blobs_without_lfs(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = repo / "train.npz"
    data.write_bytes(b"a" * 3000)
    datasets.add(data, "x")
    big = repo / "weights.bin"
    big.write_bytes(os.urandom(4096))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data")
    assert main(["datasets", "verify", "--threshold", "2048"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "PROBLEM weights.bin: 4096 bytes committed without Git LFS; "
        "run `dlstack datasets add weights.bin` (or `git lfs track`) and `git lfs migrate import`\n"
    )
    data.write_bytes(b"b" * 3000)
    assert datasets.verify(threshold=1 << 20) == [
        f"train.npz: content sha256 {hashlib.sha256(b'b' * 3000).hexdigest()} (3000 bytes) does not match the "
        f"manifest ({hashlib.sha256(b'a' * 3000).hexdigest()}, 3000 bytes); the file changed: "
        "re-add it with `dlstack datasets add train.npz`"
    ]
    git(repo, "add", "train.npz")  # now the staged pointer disagrees too
    assert any("committed LFS pointer oid" in p for p in datasets.verify(threshold=1 << 20))


def test_verify_accepts_a_clone_without_lfs_content(repo: Path, tmp_path: Path) -> None:
    data = repo / "train.npz"
    data.write_bytes(b"c" * 2000)
    datasets.add(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data")
    clone = tmp_path / "clone"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    git(tmp_path, "clone", "-q", str(repo), str(clone), env=env)
    assert (clone / "train.npz").read_bytes().startswith(b"version https://git-lfs.github.com/spec/v1")
    assert datasets.verify(clone / "stacks" / "datasets.yaml") == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_lineage_links_models_and_datasets(
    repo: Path,
    backend: str,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if backend == "s3":  # the same commands against a bucket on the test S3 server
        from tests.s3 import point_at

        server = request.getfixturevalue("s3_server")
        point_at(server, monkeypatch, repo.parent / "cache")
        monkeypatch.setenv("DLSTACK_REGISTRY", f"s3://{server.bucket()}/models")
    data = repo / "train.npz"
    data.write_bytes(b"d" * 100)
    datasets.add(data, "digits")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data")
    art = repo / "artifact"
    art.mkdir()
    (art / "model.onnx").write_bytes(b"model")
    t = TensorSpec(name="x", datatype="FP32", shape=(-1, 2))  # type: ignore[arg-type]
    files = (FileEntry(path="model.onnx", sha256=file_sha256(art / "model.onnx")),)
    sig = Signature(inputs=(t,), outputs=(t,))
    write_spec(art, ModelSpec(name="m", framework="onnx", files=files, signature=sig))  # type: ignore[arg-type]
    oid = hashlib.sha256(b"d" * 100).hexdigest()
    assert main(["models", "register", "artifact", "--name", "m", "--framework", "onnx", "--dataset", "train.npz"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "m:1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["datasets"] == [{"oid": oid, "path": "train.npz"}]
    assert shown["git_commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert shown["git_dirty"] is False  # the artifact dir is untracked, tracked files are clean
    assert shown["author"] == "Dana Tester"
    assert main(["models", "show", "m:1"]) == 0
    assert f"  {oid}  train.npz" in capsys.readouterr().out
    assert main(["datasets", "show", "train.npz", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == ["m:1"]
    assert main(["datasets", "show", oid[:12]]) == 0
    assert "models:      m:1" in capsys.readouterr().out
    assert main(["datasets", "show", "unknown.npz"]) == 2
    assert "dataset 'unknown.npz' is not in" in capsys.readouterr().err


def test_project_gitattributes_track_binaries_but_nothing_committed_today() -> None:
    probe = ["model.pt", "m/model.onnx", "x.keras", "w.h5", "d.parquet", "a.npz", "stacks/datasets/train.csv"]
    out = git(ROOT, "check-attr", "filter", "--", *probe)
    assert out.count(": filter: lfs") == len(probe), out
    files = git(ROOT, "ls-files").splitlines() + git(ROOT, "ls-files", "--others", "--exclude-standard").splitlines()
    res = subprocess.run(
        ["git", "check-attr", "--stdin", "filter"], cwd=ROOT, input="\n".join(files), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stdout.splitlines() if line.endswith(": lfs")] == []
