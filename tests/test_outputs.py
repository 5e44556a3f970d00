"""``dlstack outputs``: the offline stand-in for `pulumi stack output --json`, fed to `dlstack promote --outputs`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import stacks.render
from services.registry import Registry
from stacks.cli import main
from stacks.mocks import DOCKER_IMAGE
from stacks.promote import history
from tests.conftest import ROOT, git, make_torch_mlp_artifact

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
PINNED = "sha256:" + "a" * 64


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny real TorchScript models: mnist-mlp 1 and 2 (champion -> 2), tiny-cnn 1."""
    tmp = tmp_path_factory.mktemp("outputs-registry")
    reg = Registry(tmp / "registry")
    for v in (1, 2):
        art = make_torch_mlp_artifact(tmp / f"mnist-{v}", name="mnist-mlp", seed=v)
        reg.register(art, "mnist-mlp", "pytorch")
    reg.register(make_torch_mlp_artifact(tmp / "cnn", name="tiny-cnn", sizes=(4, 3)), "tiny-cnn", "pytorch")
    reg.set_alias("mnist-mlp", "champion", "2")
    return reg.root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repo with copies of the project's stack files; dev follows mnist-mlp@champion."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    dev = (ROOT / "Pulumi.dev.yaml").read_text()
    dev_ref = re.search(r"model: (mnist-mlp\S*)", dev)
    assert dev_ref, "Pulumi.dev.yaml has no mnist-mlp entry"
    (repo / "Pulumi.dev.yaml").write_text(dev.replace(dev_ref.group(0), "model: mnist-mlp@champion", 1))
    prod = (ROOT / "Pulumi.prod.yaml").read_text()
    prod_ref = re.search(r"model: mnist-mlp\S*", prod)
    assert prod_ref, "Pulumi.prod.yaml has no mnist-mlp entry"
    (repo / "Pulumi.prod.yaml").write_text(prod.replace(prod_ref.group(0), "model: mnist-mlp:1", 1))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stacks")
    return repo


def _outputs(
    stack: str, repo: Path, registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], Any, dict[str, Any], str]:
    """Run `dlstack outputs` to stdout; also return the very evaluation it made (mocks, program outputs)."""
    seen: dict[str, Any] = {}
    real = stacks.render.evaluate

    def spy(*args: Any, **kw: Any) -> Any:
        seen["mocks"], seen["outputs"] = real(*args, **kw)
        return seen["mocks"], seen["outputs"]

    # The image tag hashes the server code, so the expected values must come from the same evaluation.
    monkeypatch.setattr(stacks.render, "evaluate", spy)
    capsys.readouterr()
    config = repo / f"Pulumi.{stack}.yaml"
    assert main(["outputs", "--stack", stack, "--config-file", str(config), "--registry", str(registry)]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), seen["mocks"], seen["outputs"], cap.err


def test_outputs_are_what_the_program_exports_without_made_up_digests(
    repo: Path, registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    printed, mocks, program, err = _outputs("dev", repo, registry, monkeypatch, capsys)
    tags = {r.inputs["tags"][0].split("/")[-1].split(":")[0]: r.inputs["tags"][0] for r in mocks.of_type(DOCKER_IMAGE)}
    assert set(tags) == {"mnist-mlp", "tiny-cnn"}
    # Everything as exported, except that a built image is its pushed tag: its digest exists only after `pulumi up`.
    expected = json.loads(json.dumps(program))
    for name, entry in expected["models"].items():
        assert DIGEST_RE.search(entry["image"]), "the mocks give built images a digest; this test expects one"
        entry["image"] = tags[name]
    assert printed == expected
    assert not DIGEST_RE.search(json.dumps(printed))
    assert printed["models"]["mnist-mlp"]["version"] == "2"  # the alias resolved through the registry
    assert printed["models"]["mnist-mlp"]["image"].startswith("localhost:5001/dlstack/mnist-mlp:v2-")
    assert printed["models"]["mnist-mlp"]["sha256"] == Registry(registry).resolve("mnist-mlp:2").sha256
    assert "2 image(s) are built by `pulumi up`" in err


def test_a_pinned_digest_is_real_and_kept(
    repo: Path, registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prod = repo / "Pulumi.prod.yaml"
    text = prod.read_text()
    prod.write_text(
        re.sub(r"\n( +)model: mnist-mlp:1[^\n]*\n", f"\\g<0>\\1image: {{digest: '{PINNED}'}}\n", text, count=1)
    )
    assert prod.read_text() != text
    printed, _, program, err = _outputs("prod", repo, registry, monkeypatch, capsys)
    assert printed["models"]["mnist-mlp"]["image"] == program["models"]["mnist-mlp"]["image"]
    assert printed["models"]["mnist-mlp"]["image"].endswith(f"/mnist-mlp@{PINNED}")
    assert not DIGEST_RE.search(printed["models"]["tiny-cnn"]["image"])  # built: by tag
    assert "1 image(s) are built" in err


def test_outputs_feed_promote(
    repo: Path, registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's offline step 3: `dlstack outputs --stack dev > dev-outputs.json`, then promote with it."""
    printed, *_ = _outputs("dev", repo, registry, monkeypatch, capsys)
    outputs = tmp_path / "dev-outputs.json"
    args = ["outputs", "--stack", "dev", "--config-file", str(repo / "Pulumi.dev.yaml"), "--registry", str(registry)]
    assert main([*args, "--out", str(outputs)]) == 0
    assert json.loads(outputs.read_text()) == printed  # --out writes what stdout shows
    capsys.readouterr()

    assert main(
        ["promote", "--from", "dev", "--to", "prod", "--model", "mnist-mlp", "--outputs", str(outputs),
         "--registry", str(registry), "--stack-dir", str(repo), "--no-render"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "promoted mnist-mlp: mnist-mlp:1 -> mnist-mlp:2 (no image digest known" in out
    before = git(repo, "show", "HEAD:Pulumi.prod.yaml")
    assert (repo / "Pulumi.prod.yaml").read_text() == before.replace("model: mnist-mlp:1", "model: mnist-mlp:2", 1)
    (record,) = history(repo / "stacks" / "promotions.yaml")
    assert (record["new"], record["digest"]) == ("mnist-mlp:2", None)


def test_outputs_errors_are_one_line_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outputs", "--stack", "dev", "--config-file", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"dlstack outputs: error: --config-file {tmp_path / 'nope.yaml'}: no such file; "
        "pass an existing Pulumi.<stack>.yaml\n"
    )
    empty = Registry(tmp_path / "empty")
    assert main(["outputs", "--stack", "dev", "--config-file", str(ROOT / "Pulumi.dev.yaml"),
                 "--registry", str(empty.root)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("dlstack outputs: error: model references could not be resolved")
    assert "`dlstack models register`" in err


def test_outputs_out_replaces_only_a_previous_outputs_file(
    repo: Path, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out writes a new file or over a previous outputs file; a user's file there is never replaced."""
    config = repo / "Pulumi.dev.yaml"
    argv = ["outputs", "--stack", "dev", "--config-file", str(config), "--registry", str(registry), "--out"]
    target = repo / "dev-outputs.json"
    assert main([*argv, str(target)]) == 0
    first = json.loads(target.read_text())
    assert first["models"]["mnist-mlp"]["version"] == "2"
    assert main([*argv, str(target)]) == 0, "a previous outputs file is replaced"
    assert json.loads(target.read_text()) == first
    capsys.readouterr()
    for name, content in (("notes.json", '{"mine": true}\n'), ("notes.txt", "keep me\n")):
        user = repo / name
        user.write_text(content)
        assert main([*argv, str(user)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"dlstack outputs: error: --out {user} exists and is not a previous outputs file; choose a new file name\n"
        )
        assert user.read_text() == content
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith(".")) == [".git"], "no temp file left"
