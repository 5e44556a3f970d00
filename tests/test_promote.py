"""Promotion dev -> prod and rollback: exact resulting YAML, every refusal, history, on a real git repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.registry import Registry
from services.serving.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, write_spec
from stacks.cli import main
from stacks.promote import history
from tests.conftest import git

DIGEST1 = "sha256:" + "1" * 64
DIGEST2 = "sha256:" + "2" * 64
DIGEST3 = "sha256:" + "3" * 64

COMMON = """\
  dlstack:kubernetes:
    context: kind-dlstack
    version: "1.31"
  dlstack:images:
    registry: localhost:5001/dlstack
  dlstack:ingress:
    domain: dlstack.localtest.me
"""

DEV = (
    "# dev stack\nconfig:\n  dlstack:environment: dev\n"
    + COMMON
    + """\
  dlstack:models:
    - name: mnist-mlp
      model: mnist-mlp@champion   # dev follows the champion alias
      framework: pytorch
      slo: {error_ratio: 0.01, p99_ms: 250}
    - name: other
      model: other:1
      framework: pytorch
      slo: {error_ratio: 0.01, p99_ms: 250}
"""
)

PROD = (
    "# prod stack: reviewed by humans\nconfig:\n  dlstack:environment: prod\n"
    + COMMON
    + """\
    replicas: 2
  dlstack:logging:
    elasticsearch:
      nodes: 3                    # quorum
  dlstack:models:
    # the main model
    - name: mnist-mlp
      model: mnist-mlp:1          # promoted from dev
      framework: pytorch
      replicas: {min: 2, max: 10, target_cpu_percent: 60}
      slo: {error_ratio: 0.001, p99_ms: 100}  # 99.9 %
      image:
        digest: "sha256:1111111111111111111111111111111111111111111111111111111111111111"  # pinned
    - name: other
      model: other:1
      framework: pytorch
      replicas: {min: 2, max: 2}
      slo: {error_ratio: 0.001, p99_ms: 100}
"""
)


def artifact(d: Path, name: str, payload: bytes) -> Path:
    """A pytorch-framework artifact of arbitrary bytes: promotion reads the registry, it never loads models."""
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(payload)
    t = TensorSpec(name="input", datatype="FP32", shape=(-1, 8))  # type: ignore[arg-type]
    files = (FileEntry(path="model.pt", sha256=file_sha256(d / "model.pt")),)
    spec = ModelSpec(name=name, framework="pytorch", files=files, signature=Signature(inputs=(t,), outputs=(t,)))  # type: ignore[arg-type]
    write_spec(d, spec)
    return d


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    """A git repo with Pulumi.dev.yaml / Pulumi.prod.yaml and a registry holding mnist-mlp 1..3, other 1."""
    return make_env(tmp_path)


def make_env(tmp_path: Path, prod: str | bytes = PROD) -> dict[str, Path]:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Rita Reviewer")
    git(repo, "config", "user.email", "rita@example.com")
    (repo / "Pulumi.dev.yaml").write_text(DEV)
    (repo / "Pulumi.prod.yaml").write_bytes(prod.encode() if isinstance(prod, str) else prod)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stacks")
    reg = Registry(tmp_path / "registry")
    for v in (1, 2, 3):
        reg.register(artifact(tmp_path / f"a{v}", "mnist-mlp", f"weights {v}".encode()), "mnist-mlp", "pytorch")
    reg.register(artifact(tmp_path / "o1", "other", b"other"), "other", "pytorch")
    reg.set_alias("mnist-mlp", "champion", "2")
    outputs = tmp_path / "dev-outputs.json"
    write_outputs(outputs, {"mnist-mlp": ("2", DIGEST2), "other": ("1", DIGEST1)})
    return {"repo": repo, "registry": reg.root, "outputs": outputs, "history": repo / "stacks" / "promotions.yaml"}


def write_outputs(path: Path, models: dict[str, tuple[str, str | None]], sha256: str | None = None) -> None:
    """The dev stack's `pulumi stack output --json` as stacks/program.py exports it (sha256 optional)."""
    data = {
        "models": {
            n: {
                "model": n,
                "version": v,
                "image": f"localhost:5001/dlstack/{n}:{v}" + (f"@{d}" if d else ""),
                "url": f"http://{n}.dlstack.localtest.me",
                **({"sha256": sha256} if sha256 else {}),
            }
            for n, (v, d) in models.items()
        }
    }
    path.write_text(json.dumps(data))


def promote(env: dict[str, Path], *extra: str) -> int:
    return main(
        ["promote", "--from", "dev", "--to", "prod", "--registry", str(env["registry"]), "--stack-dir",
         str(env["repo"]), "--outputs", str(env["outputs"]), "--no-render", *extra]
    )  # fmt: skip


def test_promote_edits_only_the_pinned_keys(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sha = Registry(env["registry"]).resolve("mnist-mlp:2").sha256
    write_outputs(env["outputs"], {"mnist-mlp": ("2", DIGEST2)}, sha256=sha)
    assert promote(env, "--model", "mnist-mlp") == 0
    out = capsys.readouterr().out
    assert f"promoted mnist-mlp: mnist-mlp:1 -> mnist-mlp:2 (image {DIGEST2})" in out
    assert "-      model: mnist-mlp:1          # promoted from dev\n+      model: mnist-mlp:2" in out
    expected = PROD.replace("model: mnist-mlp:1 ", "model: mnist-mlp:2 ").replace(
        '"sha256:' + "1" * 64 + '"', '"sha256:' + "2" * 64 + '"'
    )
    assert expected != PROD
    assert (env["repo"] / "Pulumi.prod.yaml").read_text() == expected
    (record,) = history(env["history"])
    assert {k: record[k] for k in ("action", "from", "to", "model", "old", "new", "old_digest", "digest", "user")} == {
        "action": "promote",
        "from": "dev",
        "to": "prod",
        "model": "mnist-mlp",
        "old": "mnist-mlp:1",
        "new": "mnist-mlp:2",
        "old_digest": DIGEST1,
        "digest": DIGEST2,
        "user": "Rita Reviewer",
    }
    assert record["git_commit"] == git(env["repo"], "rev-parse", "HEAD").strip()
    assert record["gate"] is None
    assert env["history"].read_text().startswith("# Promotion history")


def test_promote_without_a_known_digest_drops_the_stale_pin(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    write_outputs(env["outputs"], {"mnist-mlp": ("2", None), "other": ("1", None)})
    assert promote(env, "--model", "mnist-mlp") == 0
    assert "no image digest known" in capsys.readouterr().out
    lines = PROD.replace("model: mnist-mlp:1 ", "model: mnist-mlp:2 ").splitlines(keepends=True)
    pin = next(i for i, line in enumerate(lines) if line.strip() == "image:")
    # The old digest belongs to version 1's image; keeping it would run v1 under a v2 label.
    assert (env["repo"] / "Pulumi.prod.yaml").read_text() == "".join(lines[:pin] + lines[pin + 2 :])


def test_dry_run_writes_nothing_and_noops_are_not_recorded(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert promote(env, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would promote mnist-mlp: mnist-mlp:1 -> mnist-mlp:2" in out
    assert f"would promote other: other:1 -> other:1 (image {DIGEST1})" in out  # the same version gets its pin
    assert "dry run: nothing written" in out
    assert (env["repo"] / "Pulumi.prod.yaml").read_text() == PROD
    assert not env["history"].exists()
    write_outputs(env["outputs"], {"mnist-mlp": ("2", DIGEST2), "other": ("1", None)})
    assert promote(env) == 0
    assert "unchanged other: other:1\n" in capsys.readouterr().out
    assert [r["model"] for r in history(env["history"])] == ["mnist-mlp"]  # no record for a no-op


CANARY = "      canary: {model: mnist-mlp:2, weight: 10}\n"
CANARY_AT = "      framework: pytorch\n      replicas: {min: 2, max: 10"


def _corrupt_v2(env: dict[str, Path]) -> None:
    reg = Registry(env["registry"])
    sha = reg.resolve("mnist-mlp:2").spec.files[0].sha256
    blob = env["registry"] / "blobs" / "sha256" / sha[:2] / sha
    blob.chmod(0o644)
    blob.write_bytes(b"rot")


REFUSALS = {
    "not-in-registry": (
        lambda e: (e["repo"] / "Pulumi.dev.yaml").write_text(DEV.replace("mnist-mlp@champion", "mnist-mlp:7")),
        "Pulumi.dev.yaml: mnist-mlp: model 'mnist-mlp' has no version '7' (versions: 1, 2, 3); "
        "list them with `dlstack models show mnist-mlp`",
    ),
    "fails-verification": (
        _corrupt_v2,
        "mnist-mlp:2 fails registry verification: mnist-mlp:2: model.pt: blob is corrupted",
    ),
    "dev-runs-another-version": (
        lambda e: write_outputs(e["outputs"], {"mnist-mlp": ("1", DIGEST1)}),
        "dev does not run mnist-mlp:2 (its outputs report version 1 for mnist-mlp); "
        "deploy it first (`pulumi up -s dev`), then promote",
    ),
    "another-registry": (
        lambda e: write_outputs(e["outputs"], {"mnist-mlp": ("2", DIGEST2)}, sha256="f" * 64),
        f"dev runs mnist-mlp version 2 with model sha256 {'f' * 64}, but the registry's mnist-mlp:2 is ",
    ),
    "result-invalid": (
        lambda e: (e["repo"] / "Pulumi.prod.yaml").write_text(PROD.replace(CANARY_AT, CANARY + CANARY_AT)),
        "the resulting Pulumi.prod.yaml would be invalid, nothing was written: Pulumi.prod.yaml: "
        'dlstack:models[0]: canary.model "mnist-mlp:2" is the main model',
    ),
    "uncommitted-target": (
        lambda e: (e["repo"] / "Pulumi.prod.yaml").write_text(PROD + "# local edit\n"),
        "Pulumi.prod.yaml has uncommitted changes; commit or stash them first (promotion must be reviewable "
        "on its own), or pass --force",
    ),
    "not-in-prod": (
        lambda e: (e["repo"] / "Pulumi.prod.yaml").write_text(PROD.split("    - name: other")[0]),
        "model 'other' is not in Pulumi.prod.yaml; add an entry for it there first "
        "(name, model, framework, replicas, resources, slo), commit it, then promote",
    ),
    "no-outputs": (
        lambda e: e["outputs"].write_text("{not json"),
        "dev-outputs.json: unreadable (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
        "write it with `pulumi stack output --json -s dev`",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_reason_and_write_nothing(
    env: dict[str, Path], case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, message = REFUSALS[case]
    setup(env)
    if case in ("result-invalid", "not-in-prod"):
        git(env["repo"], "commit", "-qam", "edit prod")
    before = (env["repo"] / "Pulumi.prod.yaml").read_text()
    assert promote(env) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlstack promote: error: ")
    assert message in err, err
    assert (env["repo"] / "Pulumi.prod.yaml").read_text() == before
    assert not env["history"].exists()


def test_without_outputs_or_pulumi_cli_it_refuses_unless_forced(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no pulumi CLI on this PATH
    base = ["promote", "--registry", str(env["registry"]), "--stack-dir", str(env["repo"]), "--no-render"]
    assert main([*base, "--model", "mnist-mlp"]) == 2
    assert capsys.readouterr().err == (
        "dlstack promote: error: cannot tell which versions dev runs: no `pulumi` CLI and no --outputs FILE; "
        "pass --outputs with the JSON of `pulumi stack output --json -s dev`, or --force to promote what "
        "Pulumi.dev.yaml pins\n"
    )
    assert main([*base, "--model", "mnist-mlp", "--force"]) == 0
    assert "model: mnist-mlp:2 " in (env["repo"] / "Pulumi.prod.yaml").read_text()


def test_rollback_walks_back_through_history(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    prod = env["repo"] / "Pulumi.prod.yaml"
    assert promote(env, "--model", "mnist-mlp") == 0
    after_v2 = prod.read_text()
    git(env["repo"], "commit", "-qam", "promote v2")
    Registry(env["registry"]).set_alias("mnist-mlp", "champion", "3")
    write_outputs(env["outputs"], {"mnist-mlp": ("3", DIGEST3)})
    assert promote(env, "--model", "mnist-mlp") == 0
    git(env["repo"], "commit", "-qam", "promote v3")
    capsys.readouterr()

    base = ["rollback", "--env", "prod", "--model", "mnist-mlp", "--stack-dir", str(env["repo"]), "--no-render"]
    assert main(base) == 0
    assert f"rolled back mnist-mlp: mnist-mlp:3 -> mnist-mlp:2 (image {DIGEST2})" in capsys.readouterr().out
    assert prod.read_text() == after_v2
    git(env["repo"], "commit", "-qam", "rollback")
    assert main(base) == 0
    assert prod.read_text() == PROD  # back to where we started, comments and all
    git(env["repo"], "commit", "-qam", "rollback again")
    assert main(base) == 2
    assert "promotions.yaml has no promotion of 'mnist-mlp' to prod left to roll back" in capsys.readouterr().err
    actions = [(r["action"], r["old"], r["new"], r.get("undoes")) for r in history(env["history"])]
    assert actions == [
        ("promote", "mnist-mlp:1", "mnist-mlp:2", None),
        ("promote", "mnist-mlp:2", "mnist-mlp:3", None),
        ("rollback", "mnist-mlp:3", "mnist-mlp:2", 1),
        ("rollback", "mnist-mlp:2", "mnist-mlp:1", 0),
    ]


def test_rollback_refuses_a_hand_edited_pin(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert promote(env, "--model", "mnist-mlp") == 0
    prod = env["repo"] / "Pulumi.prod.yaml"
    prod.write_text(prod.read_text().replace("model: mnist-mlp:2 ", "model: mnist-mlp:3 "))
    git(env["repo"], "commit", "-qam", "hand edit")
    capsys.readouterr()
    assert main(["rollback", "--env", "prod", "--model", "mnist-mlp", "--stack-dir", str(env["repo"])]) == 2
    assert capsys.readouterr().err == (
        "dlstack rollback: error: Pulumi.prod.yaml pins mnist-mlp:3 but the latest promotion set mnist-mlp:2; "
        "it was edited by hand, so rollback would not restore a known state; fix it by hand or pass --force\n"
    )


def test_promote_on_the_projects_own_stack_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Pulumi.dev.yaml/Pulumi.prod.yaml: only the model line changes and the pin is appended."""
    from stacks.images import ImageCopy
    from tests.conftest import ROOT

    # Their image registries differ, so promotion copies the image; the real copy is tests/test_promote_images.py.
    copies: list[ImageCopy] = []

    def fake_copy(copy: ImageCopy, insecure: object) -> list[str]:
        copies.append(copy)
        return [copy.digest]

    monkeypatch.setattr("stacks.promote.copy_image", fake_copy)

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    dev, prod = (ROOT / "Pulumi.dev.yaml").read_text(), (ROOT / "Pulumi.prod.yaml").read_text()
    dev_entry = next(m for m in load_models(dev) if m["name"] == "mnist-mlp")
    prod_entry = next(m for m in load_models(prod) if m["name"] == "mnist-mlp")
    assert "image" not in prod_entry, "this test expects prod to build mnist-mlp from the registry today"
    (repo / "Pulumi.dev.yaml").write_text(dev.replace(f"model: {dev_entry['model']}", "model: mnist-mlp@champion"))
    (repo / "Pulumi.prod.yaml").write_text(prod)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@example.com", "commit", "-qm", "stacks")
    reg = Registry(tmp_path / "registry")
    for v in (1, 2, 3):
        reg.register(artifact(tmp_path / f"a{v}", "mnist-mlp", f"w{v}".encode()), "mnist-mlp", "pytorch")
    reg.set_alias("mnist-mlp", "champion", "3")
    outputs = tmp_path / "outputs.json"
    write_outputs(outputs, {"mnist-mlp": ("3", DIGEST3)})
    args = ["promote", "--model", "mnist-mlp", "--registry", str(reg.root), "--stack-dir", str(repo)]
    assert main([*args, "--outputs", str(outputs), "--no-render"]) == 0
    lines = prod.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == "- name: mnist-mlp")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("- ") or not lines[i].strip())
    entry = "".join(lines[start:end]).replace(f"model: {prod_entry['model']}", "model: mnist-mlp:3", 1)
    entry += f"      image:\n        digest: {DIGEST3}\n"
    assert (repo / "Pulumi.prod.yaml").read_text() == "".join(lines[:start]) + entry + "".join(lines[end:])
    assert [(c.source_ref, c.target_ref) for c in copies] == [
        (
            f"localhost:5001/dlstack/mnist-mlp@{DIGEST3}",
            f"ghcr.io/acme/dlstack/mnist-mlp:v3-promoted-333333333333@{DIGEST3}",
        )
    ]


def load_models(text: str) -> list[dict[str, object]]:
    from ruamel.yaml import YAML

    models: list[dict[str, object]] = YAML(typ="safe").load(text)["config"]["dlstack:models"]
    return models


def test_promotion_prints_the_offline_render_diff_of_prod(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["promote", "--model", "mnist-mlp", "--registry", str(env["registry"]), "--stack-dir", str(env["repo"])]
    assert main([*args, "--outputs", str(env["outputs"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    diff = out.split("--- offline render diff of Pulumi.prod.yaml (before -> after) ---\n", 1)[1]
    assert "### `manifests/models/deployment-mnist-mlp.yaml`" in diff
    image_row = next(line for line in diff.splitlines() if "containers[model-server].image" in line)
    assert "mnist-mlp@sha256:1111" in image_row.split("|")[2] and "mnist-mlp@sha256:2222" in image_row.split("|")[3]
    assert "deployment-other" not in diff  # only the promoted model changes


def test_a_failing_render_is_reported_not_hidden(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    prod = env["repo"] / "Pulumi.prod.yaml"
    prod.write_text(PROD.replace("model: other:1", "model: other:5"))  # a version the registry lacks
    git(env["repo"], "commit", "-qam", "prod pins a missing version")
    args = ["promote", "--model", "mnist-mlp", "--registry", str(env["registry"]), "--stack-dir", str(env["repo"])]
    assert main([*args, "--outputs", str(env["outputs"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: render failed, so there is no render diff: model references could not be resolved" in out
    assert "other:5: model 'other' has no version '5'" in out
