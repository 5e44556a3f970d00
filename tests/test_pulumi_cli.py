"""``python -m stacks.pulumi_cli``: fail-fast messages and the exact pulumi command lines.

The pulumi CLI and a cluster cannot exist here, so ``pulumi`` and ``kubectl`` are fake scripts on
PATH that record how they were called (a legitimate fake of binaries, not of our code).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HINT = "to see what would be deployed without it, run `make render ENV=dev`"


def _fake(bin_dir: Path, name: str, rc_var: str) -> None:
    script = bin_dir / name
    script.write_text(
        f'#!/bin/sh\necho "{name} $* | backend=$PULUMI_BACKEND_URL" >> "$FAKE_LOG"\nexit "${{{rc_var}:-0}}"\n'
    )
    script.chmod(0o755)


def _run(tmp_path: Path, *args: str, tools: tuple[str, ...] = ("pulumi", "kubectl"), **env: str):  # type: ignore[no-untyped-def]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        _fake(bin_dir, tool, f"{tool.upper()}_RC")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    # Only the fakes on PATH: a real kubectl/pulumi installed on the machine must not be found.
    full = {**base, "PATH": str(bin_dir), "FAKE_LOG": str(tmp_path / "log"), **env}
    res = subprocess.run(
        [sys.executable, "-m", "stacks.pulumi_cli", *args],
        cwd=ROOT,
        env=full,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return res, log


def test_no_pulumi_cli_fails_fast_with_install_hint(tmp_path: Path) -> None:
    res, log = _run(tmp_path, "up", "--stack", "dev", tools=("kubectl",))
    assert res.returncode == 2
    assert res.stderr == (
        "dlstack up: error: the pulumi CLI is not installed: install it with `curl -fsSL https://get.pulumi.com | sh` "
        f"(https://www.pulumi.com/docs/iac/download-install/); {HINT}\n"
    )
    assert log == []


def test_missing_passphrase_for_the_local_backend(tmp_path: Path) -> None:
    res, log = _run(tmp_path, "up", "--stack", "dev")
    assert res.returncode == 2
    assert "export PULUMI_CONFIG_PASSPHRASE" in res.stderr and HINT in res.stderr
    assert log == []


def test_no_kubectl_and_unreachable_cluster(tmp_path: Path) -> None:
    res, _ = _run(tmp_path, "preview", "--stack", "dev", tools=("pulumi",), PULUMI_CONFIG_PASSPHRASE="x")
    assert res.returncode == 2
    assert res.stderr.startswith("dlstack preview: error: kubectl is not installed")
    res, log = _run(tmp_path, "preview", "--stack", "dev", PULUMI_CONFIG_PASSPHRASE="x", KUBECTL_RC="1")
    assert res.returncode == 2
    assert res.stderr == (
        "dlstack preview: error: the cluster of kube context 'kind-dlstack' is unreachable (no answer): "
        f"start it with `make cluster` (kind); {HINT}\n"
    )
    assert [line.split(" | ")[0] for line in log] == [
        "kubectl --context kind-dlstack --request-timeout=5s get --raw /readyz"
    ]


@pytest.mark.parametrize(
    ("args", "last"),
    [
        (("up", "--stack", "dev"), f"pulumi up --stack dev --cwd {ROOT}"),
        (("up", "--stack", "dev", "--yes"), f"pulumi up --stack dev --cwd {ROOT} --yes"),
        (("preview", "--stack", "dev"), f"pulumi preview --stack dev --cwd {ROOT} --diff"),
        (("destroy", "--stack", "dev", "--yes"), f"pulumi destroy --stack dev --cwd {ROOT} --yes"),
    ],
)
def test_command_lines_select_the_stack_then_run(tmp_path: Path, args: tuple[str, ...], last: str) -> None:
    res, log = _run(tmp_path, *args, PULUMI_CONFIG_PASSPHRASE="x")
    assert res.returncode == 0, res.stderr
    backend = f"file://{ROOT}/.pulumi-state"
    assert log == [
        f"kubectl --context kind-dlstack --request-timeout=5s get --raw /readyz | backend={backend}",
        f"pulumi stack select --create dev --non-interactive --cwd {ROOT} | backend={backend}",
        f"{last} | backend={backend}",
    ]


def test_user_backend_is_kept_and_failures_stop_the_sequence(tmp_path: Path) -> None:
    res, log = _run(tmp_path, "up", "--stack", "prod", PULUMI_BACKEND_URL="s3://acme-state", PULUMI_RC="7",
                    KUBECTL_RC="0")  # fmt: skip
    assert res.returncode == 7  # pulumi's own exit status, and `up` never ran after the failed select
    assert log == [
        "kubectl --context prod-cluster --request-timeout=5s get --raw /readyz | backend=s3://acme-state",
        f"pulumi stack select --create prod --non-interactive --cwd {ROOT} | backend=s3://acme-state",
    ]


def test_kind_cluster_script_follows_the_local_registry_pattern(tmp_path: Path) -> None:
    """create-cluster.sh against fake docker/kind/kubectl: registry, cluster, hosts.toml, network, ConfigMap."""
    from ruamel.yaml import YAML

    kind_dir = ROOT / "stacks" / "kind"
    cfg = YAML(typ="safe").load((kind_dir / "kind-config.yaml").read_text())
    assert 'config_path = "/etc/containerd/certs.d"' in cfg["containerdConfigPatches"][0]
    cp = cfg["nodes"][0]
    assert cp["role"] == "control-plane"
    assert {(m["containerPort"], m["hostPort"]) for m in cp["extraPortMappings"]} == {(80, 80), (443, 443)}
    assert 'node-labels: "ingress-ready=true"' in cp["kubeadmConfigPatches"][0]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    fakes = {
        # docker: the registry is not running yet and not on the kind network; stdin of exec/cp is logged.
        "docker": 'echo "docker $*" >> "$LOG"\n'
        'case "$1" in inspect) case "$3" in *Running*) echo false;; *) echo null;; esac;;\n'
        '  exec) [ "$2" = "-i" ] && cat >> "$LOG";; esac\nexit 0\n',
        "kind": 'echo "kind $*" >> "$LOG"\n[ "$2" = "nodes" ] && printf "dlstack-control-plane\\ndlstack-worker\\n"\n'
        "exit 0\n",
        "kubectl": 'echo "kubectl $*" >> "$LOG"\ncat >> "$LOG"\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(log), "HOME": str(tmp_path)}
    res = subprocess.run(["bash", str(kind_dir / "create-cluster.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = log.read_text().splitlines()
    hosts = "/etc/containerd/certs.d/localhost:5001"
    assert lines[:2] == [
        "docker inspect -f {{.State.Running}} kind-registry",
        "docker run -d --restart=always -p 127.0.0.1:5001:5000 --network bridge --name kind-registry registry:2",
    ]
    assert f"kind create cluster --name dlstack --config {kind_dir}/kind-config.yaml" in lines
    for node in ("dlstack-control-plane", "dlstack-worker"):
        assert f"docker exec {node} mkdir -p {hosts}" in lines
        assert f"docker exec -i {node} cp /dev/stdin {hosts}/hosts.toml" in lines
    assert lines.count('[host."http://kind-registry:5000"]') == 2
    assert "docker network connect kind kind-registry" in lines
    assert "kubectl --context kind-dlstack apply -f -" in lines
    assert "  name: local-registry-hosting" in lines and '    host: "localhost:5001"' in lines
