"""Offline render and render-diff: determinism, layout, --config-file, outputs, reviews of changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from services.serving.errors import UserError
from stacks.render import diff_renders, iter_files, load_render, render, render_git_ref, to_markdown
from tests.conftest import ROOT, stack_models_registry

pytestmark = pytest.mark.xdist_group("stack-render")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return stack_models_registry(tmp_path_factory.mktemp("render-registry"))


@pytest.fixture(scope="module")
def renders(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("renders")
    # Three renders in one process: the runtime must reset between evaluations.
    return {
        "dev": render("dev", tmp / "dev", registry=registry).out,
        "prod": render("prod", tmp / "prod", registry=registry).out,
        "dev2": render("dev", tmp / "dev2", registry=registry).out,
    }


def _cli(*args: str, registry: Any, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DLSTACK_REGISTRY": str(registry.root)}
    return subprocess.run(
        [sys.executable, "-m", "stacks.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_rendering_twice_is_byte_identical(renders: dict[str, Path]) -> None:
    a, b = renders["dev"], renders["dev2"]
    files_a = [p.relative_to(a) for p in iter_files(a)]
    assert files_a == [p.relative_to(b) for p in iter_files(b)]
    assert len(files_a) > 50
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_layout_index_and_outputs(renders: dict[str, Path]) -> None:
    d = renders["dev"]
    index = json.loads((d / "index.json").read_text())
    listed = sorted(e["file"] for e in index["resources"] if "file" in e)
    on_disk = sorted(
        rel
        for rel in (p.relative_to(d).as_posix() for p in iter_files(d))
        if rel != "index.json" and not rel.startswith("rules/")
    )
    assert listed == on_disk  # every file comes from a recorded resource, every k8s object has a file
    assert index["files"] == len(on_disk) + len(list((d / "rules").rglob("*.yaml")))
    out = index["outputs"]
    assert out["models"]["mnist-mlp"]["version"] == "1"
    assert out["models"]["mnist-mlp"]["url"] == "http://dlstack.localtest.me/models/mnist-mlp/"
    assert out["models"]["tiny-cnn"]["image"].startswith("localhost:5001/dlstack/tiny-cnn@sha256:")
    assert (out["kibana_url"], out["grafana_url"]) == (
        "http://kibana.dlstack.localtest.me/",
        "http://grafana.dlstack.localtest.me/",
    )
    deploy = YAML(typ="safe").load((d / "manifests/models/deployment-mnist-mlp.yaml").read_text())
    assert (deploy["apiVersion"], deploy["kind"], deploy["metadata"]["name"]) == ("apps/v1", "Deployment", "mnist-mlp")
    ns = YAML(typ="safe").load((d / "manifests/_cluster/namespace-models.yaml").read_text())
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    helm = YAML(typ="safe").load((d / "helm/ingress/ingress-nginx.yaml").read_text())
    assert (helm["chart"], helm["repo"]) == ("ingress-nginx", "https://kubernetes.github.io/ingress-nginx")
    assert helm["version"] and helm["values"]["controller"]["replicaCount"] == 1
    image = YAML(typ="safe").load((d / "images/mnist-mlp-v1.yaml").read_text())
    assert image["context"].startswith("build/images/mnist-mlp-v1-")  # repo-relative: renders compare across checkouts
    assert image["dockerfile"] == image["context"] + "/services/serving/Dockerfile"
    assert image["build_args"] == {"FRAMEWORK": "pytorch", "MODEL_DIR": "model"}


def test_secrets_are_masked(renders: dict[str, Path]) -> None:
    secrets = list((renders["dev"] / "manifests").rglob("secret-*.yaml"))
    assert secrets
    for f in secrets:
        doc = YAML(typ="safe").load(f.read_text())
        values = {**doc.get("data", {}), **doc.get("stringData", {})}
        assert values and set(values.values()) == {"<masked: secret>"}, f


@pytest.mark.tool("promtool")
def test_rule_files_are_plain_prometheus_rules_promtool_accepts(renders: dict[str, Path]) -> None:
    files = sorted((renders["dev"] / "rules").rglob("*.yaml"))
    assert files
    doc = YAML(typ="safe").load(files[0].read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    promtool = shutil.which("promtool")
    assert promtool
    res = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_render_diff_dev_to_prod_shows_field_changes_and_added_objects(renders: dict[str, Path]) -> None:
    d = diff_renders(renders["dev"], renders["prod"])
    assert "manifests/models/poddisruptionbudget-mnist-mlp.yaml" in d.added
    hpa = {c.path: (c.old, c.new) for c in d.changed["manifests/models/horizontalpodautoscaler-mnist-mlp.yaml"]}
    assert hpa["spec.minReplicas"] == (1, 2)
    assert hpa["spec.maxReplicas"] == (2, 10)
    deploy = {c.path: (c.old, c.new) for c in d.changed["manifests/models/deployment-mnist-mlp.yaml"]}
    # list items keyed by their name, not their position
    assert deploy["spec.template.spec.containers[model-server].resources.requests.cpu"] == ("500m", "1")
    md = to_markdown(d, "dev", "prod")
    assert "| `spec.minReplicas` | `1` | `2` |" in md
    assert "- `manifests/models/poddisruptionbudget-mnist-mlp.yaml`" in md
    assert to_markdown(diff_renders(renders["dev"], renders["dev2"]), "a", "b").endswith("No differences.\n")


def test_cli_config_file_and_removed_resources(renders: dict[str, Path], registry: Any, tmp_path: Path) -> None:
    doc = YAML().load((ROOT / "Pulumi.dev.yaml").read_text())
    del doc["config"]["dlstack:models"][1]  # drop tiny-cnn
    cfg = tmp_path / "one-model.yaml"
    with cfg.open("w") as fh:
        YAML().dump(doc, fh)
    res = _cli("render", "--stack", "dev", "--config-file", str(cfg), "--out", str(tmp_path / "one"), registry=registry)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("rendered dev: ")
    out = tmp_path / "diff.md"
    res = _cli("render-diff", str(renders["dev"]), str(tmp_path / "one"), "--out", str(out), registry=registry)
    assert res.returncode == 0, res.stderr
    assert res.stdout == out.read_text()
    assert "- `manifests/models/deployment-tiny-cnn.yaml`" in res.stdout.split("## Removed")[1].split("##")[0]
    assert (
        "manifests/models/deployment-mnist-mlp.yaml"
        not in load_render(tmp_path / "one").keys() - load_render(renders["dev"]).keys()
    )


def test_cli_errors_are_one_line_and_exit_2(registry: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  dlstack:environment: dev\n  dlstack:modelz: []\n")
    res = _cli("render", "--stack", "dev", "--config-file", str(bad), "--out", str(tmp_path / "o"), registry=registry)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "dlstack render: error: bad.yaml: dlstack:kubernetes: is required; add it",
        "bad.yaml: dlstack:images: is required; add it",
        "bad.yaml: dlstack:ingress: is required; add it",
        'bad.yaml: dlstack:modelz: unknown key; did you mean "dlstack:models"?',
    ]
    assert not (tmp_path / "o").exists()  # nothing half-written
    res = _cli("render-diff", str(tmp_path), str(tmp_path), registry=registry)
    assert res.returncode == 2
    assert "is not a render (no index.json)" in res.stderr


def test_render_diff_against_a_git_ref(registry: Any, tmp_path: Path) -> None:
    """A commit that set tiny-cnn's max replicas to 5, rendered from its own code, versus the working tree."""
    repo = tmp_path / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("services", "infra", "stacks"):
        shutil.copytree(ROOT / sub, repo / sub, ignore=ignore)
    for f in ("Pulumi.yaml", "Pulumi.dev.yaml", "Pulumi.prod.yaml"):
        shutil.copy(ROOT / f, repo / f)
    doc = YAML().load((repo / "Pulumi.dev.yaml").read_text())
    doc["config"]["dlstack:models"][1]["replicas"]["max"] = 5
    with (repo / "Pulumi.dev.yaml").open("w") as fh:
        YAML().dump(doc, fh)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "max 5"], check=True)
    old = tmp_path / "old"
    env_before = os.environ.get("DLSTACK_REGISTRY")
    os.environ["DLSTACK_REGISTRY"] = str(registry.root)
    try:
        render_git_ref("HEAD", "dev", old, repo=repo)
        new = render("dev", tmp_path / "new", registry=registry).out
    finally:
        if env_before is None:
            os.environ.pop("DLSTACK_REGISTRY")
        else:
            os.environ["DLSTACK_REGISTRY"] = env_before
    d = diff_renders(old, new)
    hpa = {c.path: (c.old, c.new) for c in d.changed["manifests/models/horizontalpodautoscaler-tiny-cnn.yaml"]}
    assert hpa == {"spec.maxReplicas": (5, 2)}
    with pytest.raises(UserError, match="git ref 'no-such-ref' cannot be read"):
        render_git_ref("no-such-ref", "dev", tmp_path / "x", repo=repo)


def test_fast_yaml_and_json_writers_match_the_stock_ones() -> None:
    """The render's fast writers must produce exactly what PyYAML's safe dumper and json.dumps write."""
    import json

    import yaml

    from stacks.render import _json_dump, _yaml_dump

    shared = {"a": 1}
    docs: list[object] = [
        {"k": "v", "n": None, "b": True, "i": 3, "f": 1.5, "e": 1e17, "nan": float("nan"), "l": [], "m": {}},
        {"s": shared, "t": shared},  # one object twice: the stock dumper writes an anchor and an alias
        {"quoted": ["yes", "0o12", "null", "", "a: b", "line1\nline2", "é"], 1: "int key"},
        [("tuple",), {"nested": [{"x": -0.0}]}],
    ]
    for doc in docs:
        stock = yaml.dump(
            doc, Dumper=yaml.CSafeDumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=120
        )
        assert _yaml_dump(doc) == stock
    for jdoc in [{"é": "ü", "x": [None, True, 0, -3, [], {}], "y": {"z": '"\\\n'}}, {"a": 1.5}, {1: 2}, [(1, 2)]]:
        assert _json_dump(jdoc) == json.dumps(jdoc, indent=1, sort_keys=True)
