"""The suite and the set-up stand on their own: system packages via script/sysdeps (sudo only when not
root, one line with the exact command when neither works), no silent skips under CI=true, and nothing
in the default suite or CI reads ../shared. (The full fresh-container run is `make fresh-check`.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

SYSDEPS = ROOT / "script" / "sysdeps"


@pytest.fixture
def box() -> Iterator[Path]:
    """A world-readable folder (tmp_path is not), so that ``nobody`` can run what it holds."""
    d = Path(tempfile.mkdtemp(prefix="dlstack-sysdeps-"))
    d.chmod(0o755)
    shutil.copy(SYSDEPS, d / "sysdeps")
    yield d
    shutil.rmtree(d)


def bare_path(box: Path, *tools: str) -> Path:
    """A PATH folder holding only ``tools``: a machine missing everything else. ``python3`` is a stand-in
    that has venv (the real interpreter may live where ``nobody`` cannot read)."""
    bin_dir = box / f"bin{len(list(box.glob('bin*')))}"
    bin_dir.mkdir()
    for tool in ("bash", "id", "sort", *tools):
        if tool == "python3":
            fake(bin_dir, "python3", "exit 0")
            continue
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    return bin_dir


def fake(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


def sysdeps(bin_dir: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(bin_dir / "bash"), str(bin_dir.parent / "sysdeps"), *args]
    if user:
        cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", user, "--", *cmd]
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_sysdeps_without_root_or_sudo_prints_the_exact_command_and_stops(box: Path) -> None:
    res = sysdeps(bare_path(box, "python3"), "test", user="nobody")
    assert res.returncode == 1
    assert res.stdout == ""
    pkgs = "curl docker-registry git git-lfs make prometheus skopeo wrk"
    assert res.stderr == (
        f"dlstack: missing system packages ({pkgs}); as root run: apt-get update && apt-get install -y {pkgs}\n"
    )


def test_sysdeps_uses_sudo_only_when_not_root(box: Path) -> None:
    bin_dir = bare_path(box, "python3", "make", "git")
    log = box / "calls.log"  # beside sysdeps
    # Stand-ins for sudo and apt-get record how they were called: apt-get goes through sudo for a
    # user, never for root.
    for name in ("sudo", "apt-get"):
        fake(bin_dir, name, f'echo "{name} $*" >> {log}')
    log.touch()
    log.chmod(0o666)
    assert sysdeps(bin_dir, "serve", user="nobody").returncode == 0
    assert log.read_text() == "", "nothing is missing for serve: no apt-get, no sudo"

    res = sysdeps(bin_dir, "test", user="nobody")
    assert res.returncode == 0, res.stderr
    install = "apt-get install -y --no-install-recommends curl docker-registry git-lfs prometheus skopeo wrk"
    assert log.read_text().splitlines() == ["sudo apt-get update", f"sudo {install}"]
    log.write_text("")
    res = sysdeps(bin_dir, "test")  # as root
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == ["apt-get update", install]


def test_sysdeps_says_so_where_there_is_no_apt_get(box: Path) -> None:
    res = sysdeps(bare_path(box, "python3", "make", "git"), "serve")
    assert res.returncode == 0  # nothing missing: apt-get is never needed
    res = sysdeps(bare_path(box), "serve")
    assert (res.returncode, res.stderr) == (
        1,
        "dlstack: missing system packages (git make python3) and no apt-get; install them with your package manager\n",
    )


def test_sysdeps_rejects_an_unknown_target(box: Path) -> None:
    res = sysdeps(bare_path(box), "deploy")
    assert res.returncode == 2 and "unknown target 'deploy'" in res.stderr


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(box: Path, ci: str, outcome: str) -> None:
    env = {**os.environ, "CI": ci, "PATH": str(bare_path(box))}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly",
         "tests/test_dashboards.py::test_every_query_is_valid_promql"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert outcome in res.stdout, res.stdout + res.stderr
    assert (res.returncode != 0) == bool(ci)
    assert "promtool is not installed: run `make sysdeps`" in res.stdout


def test_nothing_in_the_default_suite_or_ci_reads_shared() -> None:
    """Only the opt-in container checks (make image-test, make fresh-check) may use ../shared/tools/oci."""
    allowed = {"tests/test_image.py", "script/fresh-check", "tests/test_fresh_machine.py"}
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    scanned = [f for f in files if re.match(r"(tests/|\.ci/|\.github/|script/|Makefile|pyproject)", f)]
    offenders = [
        f"{f}: {line.strip()}"
        for f in scanned
        if f not in allowed and not f.endswith(".json")
        for line in (ROOT / f).read_text(errors="replace").splitlines()
        if not line.lstrip().startswith("#") and re.search(r"\.\./shared|parent / \"shared\"", line)
    ]
    assert len(scanned) > 20 and offenders == []


def test_readme_states_the_bind_address_the_server_really_uses() -> None:
    from stacks.cli import build_parser

    serve = build_parser().parse_args(["serve", "artifact"])
    readme = (ROOT / "README.md").read_text()
    assert f"{serve.host}:{serve.port}" == "0.0.0.0:8080"
    assert "0.0.0.0:8080" in readme
    # Clients may well connect to 127.0.0.1; no sentence may claim the server listens only there.
    claims = [
        line for line in readme.splitlines() if re.search(r"(serves?|serving|server) (it )?on .*127\.0\.0\.1", line)
    ]
    assert claims == []
