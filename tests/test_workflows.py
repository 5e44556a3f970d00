"""GitHub workflows: schema-valid (check-jsonschema's vendored schema) and wired the way delivery needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load((WORKFLOWS / name).read_text())
    return data


def triggers(wf: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 readers turn the key `on` into True; ruamel's safe loader (YAML 1.2) keeps "on".
    on: dict[str, Any] = wf["on"] if "on" in wf else wf[True]
    return on


def steps(wf: dict[str, Any], job: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = wf["jobs"][job]["steps"]
    return out


def uses(wf: dict[str, Any], job: str, action: str) -> list[dict[str, Any]]:
    return [s for s in steps(wf, job) if str(s.get("uses", "")).startswith(action + "@")]


def test_every_workflow_is_valid() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "pr-preview.yml", "deploy-dev.yml", "promote.yml", "deploy-prod.yml"}
    res = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\non: pull_request\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    step: []\n")
    res = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(bad)], capture_output=True
    )
    assert res.returncode == 1


def test_ci_lints_and_tests_pull_requests() -> None:
    wf = load("ci.yml")
    assert {"pull_request", "push"} <= set(triggers(wf))
    assert any(s.get("run") == "make lint" for s in steps(wf, "lint"))
    assert any(s.get("run") == ".ci/run" for s in steps(wf, "test"))


def test_pr_preview_posts_one_render_diff_comment_without_credentials() -> None:
    wf = load("pr-preview.yml")
    assert set(triggers(wf)) == {"pull_request"}
    job = wf["jobs"]["render-diff"]
    assert "env" not in job and "secrets." not in str(job), "the render diff must need no credentials"
    script = " ".join(str(s.get("run", "")) for s in job["steps"])
    assert "dlstack render --stack" in script and "dlstack render-diff" in script
    (post,) = uses(wf, "render-diff", "actions/github-script")
    code = post["with"]["script"]
    # Updated in place: find our comment by the hidden marker, update it, else create it once.
    assert wf["env"]["MARKER"].startswith("<!--") and "process.env.MARKER" in code
    assert code.index("updateComment") < code.index("createComment")
    assert wf["permissions"]["pull-requests"] == "write"


def test_pulumi_preview_runs_only_with_credentials_and_says_so_otherwise() -> None:
    wf = load("pr-preview.yml")
    job = wf["jobs"]["pulumi-preview"]
    assert job["strategy"]["matrix"]["stack"] == ["dev", "prod"]
    (preview,) = uses(wf, "pulumi-preview", "pulumi/actions")
    assert preview["with"]["command"] == "preview"
    assert preview["with"]["comment-on-pr"] is True and preview["with"]["diff"] is True
    assert preview["if"] == "steps.creds.outputs.ok == 'true'"
    gate = steps(wf, "pulumi-preview")[0]
    assert gate["id"] == "creds" and "::notice" in gate["run"]


def test_main_deploys_dev() -> None:
    wf = load("deploy-dev.yml")
    assert triggers(wf)["push"]["branches"] == ["main"]
    (up,) = uses(wf, "up", "pulumi/actions")
    assert (up["with"]["command"], up["with"]["stack-name"]) == ("up", "dev")


def test_promotion_opens_a_pr_and_prod_deploys_behind_the_production_environment() -> None:
    promote = load("promote.yml")
    assert "workflow_dispatch" in triggers(promote)
    run = " ".join(str(s.get("run", "")) for s in steps(promote, "promote"))
    assert "dlstack promote" in run and "pulumi stack output --json -s dev" in run
    (pr,) = uses(promote, "promote", "peter-evans/create-pull-request")
    assert "Pulumi.prod.yaml" in pr["with"]["add-paths"] and "stacks/promotions.yaml" in pr["with"]["add-paths"]

    prod = load("deploy-prod.yml")
    assert triggers(prod)["push"] == {"branches": ["main"], "paths": ["Pulumi.prod.yaml"]}
    assert prod["jobs"]["up"]["environment"] == "production"
    (up,) = uses(prod, "up", "pulumi/actions")
    assert (up["with"]["command"], up["with"]["stack-name"]) == ("up", "prod")


@pytest.mark.parametrize("name", ["ci.yml", "pr-preview.yml", "deploy-dev.yml", "promote.yml", "deploy-prod.yml"])
def test_least_privilege_permissions(name: str) -> None:
    perms = load(name)["permissions"]
    assert perms.get("contents") in ("read", "write")
    assert "write-all" not in str(perms)
