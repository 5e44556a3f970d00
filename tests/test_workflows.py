"""GitHub workflows: schema-valid, clean under zizmor, wired for a fresh checkout, and their shell steps run.

GitHub Actions never runs here, so the workflows are judged three ways: check-jsonschema's vendored
workflow schema and zizmor (both offline), the structure delivery needs (asserted below), and the
bash of the steps that carry logic (the credential gates, the registry logins, the comment hand-off),
executed with the environment GitHub would give them and fakes of the tools they call.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent
CHECK_JSONSCHEMA = BIN / "check-jsonschema"
ZIZMOR = BIN / "zizmor"
NAMES = ["ci.yml", "pr-preview.yml", "deploy-dev.yml", "promote.yml", "deploy-prod.yml"]
# The workflows that need the team's model registry (everything but ci.yml).
DELIVERY = ["pr-preview.yml", "deploy-dev.yml", "promote.yml", "deploy-prod.yml"]
# Any attempt to reach the network fails fast: both linters must work offline, as in `make test`.
OFFLINE_ENV = {
    **{k: v for k, v in os.environ.items() if k not in {"GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN"}},
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


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


def expr(text: str) -> str:
    """A GitHub expression as written in a workflow, e.g. expr("vars.X") is ${{ vars.X }}."""
    return "${{ " + text + " }}"


def step(wf: dict[str, Any], job: str, name: str) -> dict[str, Any]:
    (found,) = [s for s in steps(wf, job) if s.get("name") == name]
    return found


def all_jobs() -> list[tuple[str, str, dict[str, Any]]]:
    return [(name, job_id, job) for name in NAMES for job_id, job in load(name)["jobs"].items()]


def run_step(
    script: str, env: dict[str, str], cwd: Path, tmp_path: Path, path_prefix: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Path]]:
    """Runs one `run:` script the way GitHub runs `shell: bash`, with the files a runner provides."""
    files = {k: tmp_path / k.lower() for k in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_STEP_SUMMARY")}
    for f in files.values():
        f.write_text("")
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir(exist_ok=True)
    path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}:{os.environ['PATH']}"
    base = {"PATH": path, "HOME": str(tmp_path), "RUNNER_TEMP": str(runner_temp)}
    res = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env={**base, **{k: str(v) for k, v in files.items()}, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res, files


def parse_github_file(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT / GITHUB_ENV syntax: `name=value` lines and `name<<DELIM` ... `DELIM` blocks."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1 : end])
            i = end + 1
            continue
        if "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        i += 1
    return out


# --- linters -------------------------------------------------------------------------------------


def test_every_workflow_is_valid_offline() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} == set(NAMES)
    # The builtin (vendored) schema: no download, so this passes with the network cut.
    res = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=OFFLINE_ENV,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\non: pull_request\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    step: []\n")
    res = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(bad)],
        capture_output=True,
        env=OFFLINE_ENV,
    )
    assert res.returncode == 1


ZIZMOR_ARGS = [
    "--offline",
    "--no-config",
    "--no-ignores",
    "--no-progress",
    "--format",
    "json",
    "--min-severity",
    "medium",
]


def zizmor(path: Path) -> list[dict[str, Any]]:
    # --no-config and --no-ignores: a config file or an inline `# zizmor: ignore[...]` cannot
    # quietly make this pass; the workflows themselves must be clean.
    res = subprocess.run(
        [str(ZIZMOR), *ZIZMOR_ARGS, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=OFFLINE_ENV,
    )
    # Exit codes 0 (clean) and 10-14 (findings, by severity) are answers; anything else is a crash.
    assert res.returncode == 0 or 10 <= res.returncode <= 14, res.stderr
    findings: list[dict[str, Any]] = json.loads(res.stdout)
    return findings


def test_zizmor_finds_nothing_at_medium_or_above() -> None:
    findings = zizmor(WORKFLOWS)
    summary = [
        f"{f['ident']} ({f['determinations']['severity']}): "
        f"{f['locations'][0]['symbolic']['key']['Local']['verbatim_path']} "
        f"line {f['locations'][0]['concrete']['location']['start_point']['row'] + 1}"
        for f in findings
    ]
    assert findings == [], "\n".join(summary)


def test_zizmor_catches_the_mistakes_it_guards_against(tmp_path: Path) -> None:
    # The shape of the workflows before they were hardened, so a silently broken lint cannot pass.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: {pull_request: {}}\n"
        "permissions: {pull-requests: write}\n"
        "jobs:\n"
        "  a:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        '      - run: echo "${{ github.event.pull_request.title }}"\n'
        "  b:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps: [{run: echo b}]\n"
    )
    idents = {f["ident"] for f in zizmor(bad)}
    assert {"unpinned-uses", "artipacked", "excessive-permissions", "template-injection"} <= idents


# --- hardening that zizmor also judges, stated so a failure says what to fix -----------------------

PIN = re.compile(r"^\s*(?:-\s+)?uses:\s+([\w.-]+/[\w./-]+)@([0-9a-f]{40}) # (v\d+\.\d+\.\d+)\s*$")


def test_every_action_is_pinned_by_commit_with_its_release_in_a_comment() -> None:
    pins: dict[str, set[tuple[str, str]]] = {}
    for name in NAMES:
        for line in (WORKFLOWS / name).read_text().splitlines():
            if re.match(r"^\s*(?:-\s+)?uses:", line):
                m = PIN.match(line)
                assert m, f"{name}: {line.strip()!r} is not `owner/repo@<40-hex sha> # vX.Y.Z`"
                pins.setdefault(m[1], set()).add((m[2], m[3]))
    # One version per action across all workflows, so an upgrade cannot leave an old pin behind.
    assert all(len(v) == 1 for v in pins.values()), pins
    assert {"actions/checkout", "actions/setup-python", "pulumi/actions"} <= set(pins)


def test_checkouts_never_persist_the_token() -> None:
    checkouts = [s for _, _, job in all_jobs() for s in job["steps"] if "actions/checkout@" in str(s.get("uses"))]
    assert len(checkouts) >= 7
    assert all(s["with"]["persist-credentials"] is False for s in checkouts)


def test_least_privilege_permissions() -> None:
    writes = set()
    for name, job_id, job in all_jobs():
        # Nothing inherited: the workflow grants nothing, and every job names what it needs.
        assert load(name)["permissions"] == {}, name
        perms = job["permissions"]
        assert isinstance(perms, dict) and perms, f"{name}:{job_id} has no explicit permissions"
        assert set(perms.values()) <= {"read", "write"}, f"{name}:{job_id}: {perms}"
        writes.update({(name, job_id, k) for k, v in perms.items() if v == "write"})
    assert writes == {
        ("pr-preview.yml", "comment", "pull-requests"),  # the render-diff comment
        ("pr-preview.yml", "pulumi-preview", "pull-requests"),  # pulumi/actions comment-on-pr
        ("promote.yml", "promote", "contents"),  # the promote/<run id> branch
        ("promote.yml", "promote", "pull-requests"),  # the promotion PR
    }


def test_secrets_reach_only_the_steps_that_use_them() -> None:
    for name in NAMES:
        wf = load(name)
        assert "secrets." not in str(wf.get("env", {})), f"{name}: workflow-level env holds a secret"
        for job_id, job in wf["jobs"].items():
            assert "secrets." not in str(job.get("env", {})), f"{name}:{job_id}: job-level env holds a secret"
            for s in job["steps"]:
                assert "secrets." not in str(s.get("run", "")), f"{name}:{job_id}: a secret expanded into a script"
                # Actions get secrets through `env:` too, visible in review; the job's own token is `github.token`.
                assert "secrets." not in str(s.get("with", "")), f"{name}:{job_id}: a secret as an action input"


def test_no_untrusted_expression_is_expanded_into_a_script() -> None:
    for name, job_id, job in all_jobs():
        for s in job["steps"]:
            script = str(s.get("run", "")) + str(s.get("with", {}).get("script", ""))
            # Everything a script needs comes through `env:`, as data; `${{ }}` would paste it as code.
            assert "${{" not in script, f"{name}:{job_id}: {script[:80]!r}"


def test_every_workflow_has_a_concurrency_group() -> None:
    for name in NAMES:
        assert load(name)["concurrency"]["group"], name
    # A deploy or a promotion is never cancelled half-way; superseded PR runs are.
    for name in ["deploy-dev.yml", "deploy-prod.yml", "promote.yml"]:
        assert load(name)["concurrency"]["cancel-in-progress"] is False, name


# --- a fresh checkout: the registry comes from settings, never from a build in CI -----------------


@pytest.mark.parametrize("name", NAMES)
def test_no_workflow_builds_the_example_models(name: str) -> None:
    text = (WORKFLOWS / name).read_text()
    for needle in ("services.example", "make example", "models register", ".example/", "make render"):
        assert needle not in text, f"{name} builds or registers example models ({needle!r})"
    # Nor does any workflow point the registry at a local folder it would have to fill itself.
    assert not re.search(r"(^|[\s/\"'=])\.registry\b", text, re.M) and "DLSTACK_REGISTRY=$RUNNER_TEMP" not in text


SECRET_OR_VAR = re.compile(r"\b(secrets|vars)\.([A-Za-z_][A-Za-z0-9_]*)")


def settings_read() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in NAMES:
        for kind, key in SECRET_OR_VAR.findall((WORKFLOWS / name).read_text()):
            assert found.setdefault(key, kind) == kind, f"{key} is read both as a secret and as a variable"
    found.pop("GITHUB_TOKEN", None)
    return found


def test_the_registry_url_and_credentials_come_from_repository_settings() -> None:
    read = settings_read()
    # The URL, region and endpoint are not secret (variables, visible in logs); the keys are.
    assert {k: read[k] for k in ("DLSTACK_REGISTRY", "AWS_REGION", "AWS_ENDPOINT_URL")} == dict.fromkeys(
        ("DLSTACK_REGISTRY", "AWS_REGION", "AWS_ENDPOINT_URL"), "vars"
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PULUMI_ACCESS_TOKEN", "KUBECONFIG_dev"):
        assert read[key] == "secrets", key
    for name in DELIVERY:
        text = (WORKFLOWS / name).read_text()
        for key in ("vars.DLSTACK_REGISTRY", "secrets.AWS_ACCESS_KEY_ID", "secrets.AWS_SECRET_ACCESS_KEY"):
            assert key in text, f"{name} does not read {key}"


def team_setup_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Team set-up")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else len(readme)]


def test_the_readme_lists_exactly_the_settings_the_workflows_read() -> None:
    rows = re.findall(r"^\| `([A-Za-z0-9_]+)` \| (secret|variable) \|", team_setup_section(), re.M)
    documented = {key: {"secret": "secrets", "variable": "vars"}[kind] for key, kind in rows}
    assert documented == settings_read()


# --- the credential gates: skip with a notice, never half-deploy ---------------------------------

REGISTRY_SETTINGS = {"DLSTACK_REGISTRY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# (workflow, job, stack, settings that must all be set, whether a half set-up is an error)
GATES = [
    ("deploy-dev.yml", "up", "", {"PULUMI_ACCESS_TOKEN", "KUBECONFIG_dev"} | REGISTRY_SETTINGS, True),
    ("deploy-prod.yml", "up", "", {"PULUMI_ACCESS_TOKEN", "KUBECONFIG_prod"} | REGISTRY_SETTINGS, True),
    ("promote.yml", "promote", "", {"PULUMI_ACCESS_TOKEN"} | REGISTRY_SETTINGS, True),
    # Pull requests from forks get no secrets: a PR check must skip, not fail.
    ("pr-preview.yml", "render-diff", "", REGISTRY_SETTINGS, False),
    ("pr-preview.yml", "pulumi-preview", "dev", {"PULUMI_ACCESS_TOKEN", "KUBECONFIG_dev"} | REGISTRY_SETTINGS, False),
    ("pr-preview.yml", "pulumi-preview", "prod", {"PULUMI_ACCESS_TOKEN", "KUBECONFIG_prod"} | REGISTRY_SETTINGS, False),
]
GATE_IDS = [f"{w}:{j}{':' + s if s else ''}" for w, j, s, _, _ in GATES]


def gate(name: str, job: str) -> dict[str, Any]:
    first = steps(load(name), job)[0]
    assert first["id"] == "creds"
    return first


@pytest.mark.parametrize(("name", "job", "stack", "required", "strict"), GATES, ids=GATE_IDS)
def test_gate_is_first_and_guards_every_later_step(
    name: str, job: str, stack: str, required: set[str], strict: bool
) -> None:
    g = gate(name, job)
    # The gate reads each setting under its own name, from the right place.
    for key in required - {"KUBECONFIG_dev", "KUBECONFIG_prod"}:
        kind = "vars" if key == "DLSTACK_REGISTRY" else "secrets"
        assert g["env"][key] == expr(f"{kind}.{key}")
    for later in steps(load(name), job)[1:]:
        assert later["if"] == "steps.creds.outputs.ok == 'true'", later


def run_gate(name: str, job: str, stack: str, values: dict[str, str], tmp_path: Path) -> Any:
    env = {"STACK": stack} if stack else {}
    res, files = run_step(gate(name, job)["run"], {**env, **values}, tmp_path, tmp_path)
    return (
        res,
        parse_github_file(files["GITHUB_OUTPUT"].read_text()),
        parse_github_file(files["GITHUB_ENV"].read_text()),
    )


@pytest.mark.parametrize(("name", "job", "stack", "required", "strict"), GATES, ids=GATE_IDS)
def test_gate_without_settings_skips_with_a_notice(
    name: str, job: str, stack: str, required: set[str], strict: bool, tmp_path: Path
) -> None:
    res, out, env = run_gate(name, job, stack, {}, tmp_path)
    assert res.returncode == 0 and out == {"ok": "false"} and env == {}
    assert res.stdout.startswith("::notice title=")
    assert all(key in res.stdout for key in required), res.stdout  # says exactly what to set


@pytest.mark.parametrize(("name", "job", "stack", "required", "strict"), GATES, ids=GATE_IDS)
def test_gate_with_every_setting_passes_only_the_plain_settings_on(
    name: str, job: str, stack: str, required: set[str], strict: bool, tmp_path: Path
) -> None:
    values = {key: f"value-of-{key}" for key in required}
    values["DLSTACK_REGISTRY"] = "s3://team-models/dlstack"
    values["AWS_REGION"] = "eu-west-1"  # AWS_ENDPOINT_URL unset: plain AWS
    res, out, env = run_gate(name, job, stack, values, tmp_path)
    assert res.returncode == 0 and out == {"ok": "true"}, res.stdout + res.stderr
    # Later steps see the URL and region; an unset endpoint stays unset; secrets never enter GITHUB_ENV.
    assert env == {"DLSTACK_REGISTRY": "s3://team-models/dlstack", "AWS_REGION": "eu-west-1"}


@pytest.mark.parametrize(("name", "job", "stack", "required", "strict"), GATES, ids=GATE_IDS)
def test_gate_with_half_the_settings_names_the_rest(
    name: str, job: str, stack: str, required: set[str], strict: bool, tmp_path: Path
) -> None:
    # E.g. the registry variable set but no keys yet, or a fork's PR (variables, no secrets).
    res, out, env = run_gate(name, job, stack, {"DLSTACK_REGISTRY": "s3://team-models/dlstack"}, tmp_path)
    missing = required - {"DLSTACK_REGISTRY"}
    assert env == {}
    if strict:
        # A deploy or promotion that is half set up fails red, instead of quietly never running.
        assert res.returncode != 0 and "::error title=" in res.stdout
    else:
        assert res.returncode == 0 and out == {"ok": "false"} and "::notice title=" in res.stdout
    assert all(key in res.stdout for key in missing) and "DLSTACK_REGISTRY" not in res.stdout


# --- the image registry logins: the auth file skopeo and pulumi's docker-build read ---------------


def fake_skopeo(tmp_path: Path) -> tuple[Path, Path]:
    """A `skopeo` that records its arguments and stdin, one JSON line per call."""
    bindir, log = tmp_path / "bin", tmp_path / "skopeo.log"
    bindir.mkdir()
    (bindir / "skopeo").write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}) + '\\n')\n"
    )
    (bindir / "skopeo").chmod(0o755)
    return bindir, log


def checkout(tmp_path: Path) -> Path:
    """What the login steps read: the stack files, and the venv's python at .venv/bin/python."""
    work = tmp_path / "checkout"
    (work / ".venv" / "bin").mkdir(parents=True)
    # A wrapper, not a symlink: a symlinked interpreter would not find this venv's packages.
    (work / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (work / ".venv" / "bin" / "python").chmod(0o755)
    for stack in ("dev", "prod"):
        (work / f"Pulumi.{stack}.yaml").write_text((ROOT / f"Pulumi.{stack}.yaml").read_text())
    return work


def image_host(stack: str) -> str:
    images = YAML(typ="safe").load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]["dlstack:images"]
    return str(images["registry"]).split("/")[0]


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(("name", "stack"), [("deploy-dev.yml", "dev"), ("deploy-prod.yml", "prod")])
def test_deploy_logs_in_to_its_image_registry_for_skopeo_and_docker_build(
    name: str, stack: str, tmp_path: Path
) -> None:
    login = step(load(name), "up", f"Log in to {stack}'s image registry")
    prefix = stack.upper()
    assert login["env"] == {
        "REGISTRY_USER": expr(f"secrets.{prefix}_REGISTRY_USER"),
        "REGISTRY_PASSWORD": expr(f"secrets.{prefix}_REGISTRY_PASSWORD"),
    }
    bindir, log = fake_skopeo(tmp_path)
    env = {"REGISTRY_USER": "robot", "REGISTRY_PASSWORD": "s3cr3t"}
    res, files = run_step(login["run"], env, checkout(tmp_path), tmp_path, bindir)
    assert res.returncode == 0, res.stdout + res.stderr
    (call,) = calls(log)
    auth = tmp_path / "runner-temp" / "containers" / "config.json"
    # The password goes on stdin, never on the command line (where `ps` and the log would show it).
    assert call == {
        "argv": ["login", "--authfile", str(auth), "--username", "robot", "--password-stdin", image_host(stack)],
        "stdin": "s3cr3t",
    }
    exported = parse_github_file(files["GITHUB_ENV"].read_text())
    assert exported == {"REGISTRY_AUTH_FILE": str(auth), "DOCKER_CONFIG": str(auth.parent)}
    assert "s3cr3t" not in res.stdout + res.stderr

    # Without the user secret: no login, a notice, and the runner's own credentials left alone.
    log.unlink()
    res, files = run_step(
        login["run"], {"REGISTRY_USER": "", "REGISTRY_PASSWORD": ""}, checkout(tmp_path / "x"), tmp_path, bindir
    )
    assert res.returncode == 0 and "::notice::" in res.stdout and calls(log) == []
    assert files["GITHUB_ENV"].read_text() == ""


def test_promote_logs_in_to_both_image_registries_before_promoting(tmp_path: Path) -> None:
    wf = load("promote.yml")
    login = step(wf, "promote", "Log in to dev's and prod's image registries")
    names = [s.get("name") for s in steps(wf, "promote")]
    assert names.index(login["name"]) < names.index("dlstack promote")
    bindir, log = fake_skopeo(tmp_path)
    env = {
        "DEV_REGISTRY_USER": "dev-robot",
        "DEV_REGISTRY_PASSWORD": "dev-pw",
        "PROD_REGISTRY_USER": "prod-robot",
        "PROD_REGISTRY_PASSWORD": "prod-pw",
    }
    res, files = run_step(login["run"], env, checkout(tmp_path), tmp_path, bindir)
    assert res.returncode == 0, res.stdout + res.stderr
    auth = str(tmp_path / "runner-temp" / "containers" / "auth.json")
    assert [(c["argv"][-1], c["argv"][4], c["stdin"]) for c in calls(log)] == [
        (image_host("dev"), "dev-robot", "dev-pw"),
        (image_host("prod"), "prod-robot", "prod-pw"),
    ]
    assert all(c["argv"][:3] == ["login", "--authfile", auth] for c in calls(log))
    # `dlstack promote` runs skopeo, which finds the logins through REGISTRY_AUTH_FILE.
    assert parse_github_file(files["GITHUB_ENV"].read_text()) == {"REGISTRY_AUTH_FILE": auth}

    log.unlink()
    env.update(DEV_REGISTRY_USER="", DEV_REGISTRY_PASSWORD="")
    res, _ = run_step(login["run"], env, checkout(tmp_path / "x"), tmp_path, bindir)
    assert res.returncode == 0 and "::notice::DEV_REGISTRY_USER is not set" in res.stdout
    assert [c["argv"][-1] for c in calls(log)] == [image_host("prod")]


# --- what each workflow does ---------------------------------------------------------------------


def test_ci_lints_and_tests_pull_requests() -> None:
    wf = load("ci.yml")
    assert {"pull_request", "push"} <= set(triggers(wf))
    assert any(s.get("run") == "make lint" for s in steps(wf, "lint"))
    assert any(s.get("run") == ".ci/run" for s in steps(wf, "test"))


def test_pr_preview_renders_with_the_team_registry_and_posts_one_comment(tmp_path: Path) -> None:
    wf = load("pr-preview.yml")
    assert set(triggers(wf)) == {"pull_request"}
    render = step(wf, "render-diff", "Render dev and prod offline, PR and base")
    assert "dlstack render --stack" in render["run"] and set(render["env"]) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    # The job that runs the PR's code has a read-only token; the one that posts runs no PR code.
    assert wf["jobs"]["render-diff"]["permissions"] == {"contents": "read"}
    poster = wf["jobs"]["comment"]
    assert poster["needs"] == "render-diff" and [s.get("uses", "").split("@")[0] for s in poster["steps"]] == [
        "actions/github-script"
    ]
    code = poster["steps"][0]["with"]["script"]
    # Updated in place: find our comment by the hidden marker, update it, else create it once.
    assert wf["env"]["MARKER"].startswith("<!--") and "process.env.MARKER" in code
    assert code.index("updateComment") < code.index("createComment")
    assert poster["steps"][0]["env"] == {"BODY": "${{ needs.render-diff.outputs.comment }}"}
    assert wf["jobs"]["render-diff"]["outputs"]["comment"] == "${{ steps.diff.outputs.comment }}"

    # The hand-off survives PR-controlled text, even a line that looks like a delimiter.
    diff = step(wf, "render-diff", "Diff the renders")
    work = tmp_path / "w"
    dlstack = work / "head" / ".venv" / "bin" / "dlstack"
    dlstack.parent.mkdir(parents=True)
    dlstack.write_text('#!/bin/sh\nprintf "| changed | %s |\\nEOF\\ncomment<<EOF\\nmalicious=1\\n" "$3"\n')
    dlstack.chmod(0o755)
    for side in ("base", "head"):
        for stack in ("dev", "prod"):
            (work / "out" / side / stack).mkdir(parents=True)
    res, files = run_step(diff["run"], {"MARKER": wf["env"]["MARKER"]}, work, tmp_path)
    assert res.returncode == 0, res.stderr
    out = parse_github_file(files["GITHUB_OUTPUT"].read_text())
    assert set(out) == {"comment"} and out["comment"] == (work / "comment.md").read_text().rstrip("\n")
    assert out["comment"].startswith(wf["env"]["MARKER"]) and "out/head/prod" in out["comment"]


def test_pulumi_preview_runs_only_with_credentials_and_says_so_otherwise() -> None:
    wf = load("pr-preview.yml")
    job = wf["jobs"]["pulumi-preview"]
    assert job["strategy"]["matrix"]["stack"] == ["dev", "prod"]
    (preview,) = uses(wf, "pulumi-preview", "pulumi/actions")
    assert preview["with"]["command"] == "preview"
    assert preview["with"]["comment-on-pr"] is True and preview["with"]["diff"] is True
    assert preview["if"] == "steps.creds.outputs.ok == 'true'"
    assert "::notice" in gate("pr-preview.yml", "pulumi-preview")["run"]
    # Each matrix leg sees only its own stack's kubeconfig.
    kube = step(wf, "pulumi-preview", "The kubeconfig")["env"]["KUBECONFIG_DATA"]
    assert "secrets[" not in kube and "secrets.KUBECONFIG_prod" in kube and "secrets.KUBECONFIG_dev" in kube


@pytest.mark.parametrize(("name", "stack"), [("deploy-dev.yml", "dev"), ("deploy-prod.yml", "prod")])
def test_deploys_run_pulumi_up_with_the_registry_keys(name: str, stack: str) -> None:
    wf = load(name)
    (up,) = uses(wf, "up", "pulumi/actions")
    assert (up["with"]["command"], up["with"]["stack-name"]) == ("up", stack)
    assert set(up["env"]) == {"PULUMI_ACCESS_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert step(wf, "up", "The kubeconfig")["env"] == {"KUBECONFIG_DATA": expr(f"secrets.KUBECONFIG_{stack}")}


def test_main_deploys_dev() -> None:
    wf = load("deploy-dev.yml")
    assert triggers(wf)["push"]["branches"] == ["main"]
    assert wf["jobs"]["up"]["environment"] == "dev"


def test_promotion_copies_the_image_opens_a_pr_and_prod_deploys_behind_the_production_environment() -> None:
    promote = load("promote.yml")
    assert "workflow_dispatch" in triggers(promote)
    run = " ".join(str(s.get("run", "")) for s in steps(promote, "promote"))
    assert "dlstack promote" in run and "pulumi stack output --json -s dev" in run
    # Free-text dispatch inputs reach the script through env only.
    assert set(step(promote, "promote", "dlstack promote")["env"]) >= {"MODELS", "PROMETHEUS_URL", "WINDOW"}
    (pr,) = uses(promote, "promote", "peter-evans/create-pull-request")
    assert "Pulumi.prod.yaml" in pr["with"]["add-paths"] and "stacks/promotions.yaml" in pr["with"]["add-paths"]

    prod = load("deploy-prod.yml")
    assert triggers(prod)["push"] == {"branches": ["main"], "paths": ["Pulumi.prod.yaml"]}
    assert prod["jobs"]["up"]["environment"] == "production"
