"""checkov (Bridgecrew's Kubernetes policy scanner) over the whole render of dev and prod: 0 failed checks.

Skips live in one file, tests/checkov-skips.yaml, each with its reason. checkov is slow, so it runs
once per stack (module-scoped fixture) and the heavy runs share an xdist group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.k8s_checks import load_manifests, rendered_manifests

HERE = Path(__file__).resolve().parent
CHECKOV = Path(sys.executable).with_name("checkov")
SKIPS_FILE = HERE / "checkov-skips.yaml"

pytestmark = pytest.mark.xdist_group("render")  # shares the dev/prod render with the other judges


def skips(stack: str) -> list[str]:
    doc = YAML(typ="safe", pure=True).load(SKIPS_FILE.read_text()) or {}
    return sorted({s["id"] for s in doc.get("skips") or [] if stack in s["stacks"]})


def checkov(directory: Path, skip: list[str]) -> dict[str, Any]:
    cmd = [str(CHECKOV), "--framework", "kubernetes", "-d", str(directory), "-o", "json", "--skip-download"]
    if skip:
        cmd += ["--skip-check", ",".join(skip)]
    # Exit code 1 = some check failed; the JSON report lists passed and failed checks either way.
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    )
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == "kubernetes"]
    return dict(report)


@pytest.fixture(scope="module", params=["dev", "prod"])
def stack_report(request: pytest.FixtureRequest) -> tuple[str, list[dict], dict]:
    stack = request.param
    manifests_dir = rendered_manifests(stack)
    return stack, load_manifests(manifests_dir), checkov(manifests_dir, skips(stack))


def test_skips_file_gives_a_reason_for_every_skip() -> None:
    doc = YAML(typ="safe", pure=True).load(SKIPS_FILE.read_text())
    for entry in doc["skips"] or []:
        assert set(entry) == {"id", "stacks", "reason"}, entry
        assert entry["id"].startswith(("CKV_K8S_", "CKV2_K8S_")) and len(entry["reason"]) > 20, entry
        assert set(entry["stacks"]) <= {"dev", "prod"}, entry


def test_render_has_no_failed_checks(stack_report: tuple[str, list[dict], dict]) -> None:
    stack, objs, report = stack_report
    failed = [
        f"{f['check_id']} {f['check_name']}: {f['resource']} ({f['file_path']})"
        for f in report["results"]["failed_checks"]
    ]
    assert not failed, f"checkov on the {stack} render:\n" + "\n".join(failed)
    # A scan that parsed nothing would also have no failures: make sure every manifest was checked.
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= len(objs)
    checked = {p["resource"] for p in report["results"]["passed_checks"]}
    workloads = [o for o in objs if o["kind"] in ("Deployment", "Job")]
    assert len(workloads) >= 4
    for o in workloads:
        assert f"{o['kind']}.{o['metadata']['namespace']}.{o['metadata']['name']}" in checked


def test_checkov_fails_a_broken_deployment(tmp_path: Path) -> None:
    broken = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bad", "namespace": "models"},
        "spec": {
            "selector": {"matchLabels": {"app": "bad"}},
            "template": {
                "metadata": {"labels": {"app": "bad"}},
                "spec": {
                    "containers": [{"name": "c", "image": "nginx:latest", "securityContext": {"privileged": True}}]
                },
            },
        },
    }
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    failed = {f["check_id"] for f in checkov(tmp_path, [])["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_14", "CKV_K8S_10", "CKV_K8S_8"} <= failed  # privileged, :latest, no CPU, no probe
