"""Output paths under careless and hostile input: no command deletes or overwrites a file it did not create.

``render --out``, ``package --out``, ``models export DIR`` and ``capacity --plot`` are run through the
real CLI against the targets a careless user gives them: ``.``, a checkout, a directory with a file
of theirs, a symbolic link, a file, a previous output with a file added, a temp directory left by a
killed run, a read-only parent. Each case checks the exact one-line error and exit code 2 (or the
replacement, where the target is a previous output), that nothing printed a traceback, and that no
file outside the expected output changed: the whole tree is snapshotted (path, sha256, mode) before
and after.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stacks.cli import main
from tests.conftest import ROOT, make_torch_mlp_artifact

pytestmark = pytest.mark.xdist_group("hostile-outputs")

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root`` (links not followed): kind, content hash or link target, mode."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", stat.S_IMODE(st.st_mode))
    return out


def outside(snap: Snapshot, target: str | None) -> Snapshot:
    if target is None:
        return snap
    return {k: v for k, v in snap.items() if k != target and not k.startswith(target + "/")}


def files_under(snap: Snapshot, target: str) -> set[str]:
    return {k.removeprefix(target + "/") for k, v in snap.items() if k.startswith(target + "/") and v[0] == "file"}


def dead_pid() -> int:
    """The pid of a process that has exited (a run killed half-way)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# -------------------------------------------------------------------------------------------------
# the commands, and a previous output of each


@dataclass(frozen=True)
class Command:
    name: str  # the subcommand, as in "dlstack render: error: ..."
    label: str  # how messages name the target
    what: str  # the kind of output, as messages name it
    argv: Callable[[str], list[str]]
    previous: Path  # a previous output of this command, copied into place by the cases


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A registry holding the models the dev stack deploys, a model file, and one previous output of each command."""
    from services.registry import Registry
    from stacks.render import render

    tmp = tmp_path_factory.mktemp("hostile-outputs")
    reg = Registry(tmp / "registry")
    for name in ("mnist-mlp", "tiny-cnn"):
        reg.register(make_torch_mlp_artifact(tmp / "src" / name, name=name), name, "pytorch")
    model = tmp / "src" / "mnist-mlp" / "model.pt"
    render("dev", tmp / "prev" / "render", registry=reg)
    reg.resolve("mnist-mlp:1").export(tmp / "prev" / "export")
    assert main(["package", str(model), "--name", "mnist-mlp", "--framework", "pytorch",
                 "--input", "input:FP32:-1x8", "--out", str(tmp / "prev" / "package")]) == 0  # fmt: skip
    return {"registry": str(reg.root), "model": str(model), "prev": tmp / "prev"}


def commands(shared: dict[str, Any]) -> dict[str, Command]:
    reg, model, prev = shared["registry"], shared["model"], shared["prev"]
    return {
        "render": Command(
            "render", "--out", "render",
            lambda t: ["render", "--stack", "dev", "--registry", reg, "--out", t], prev / "render",
        ),
        "package": Command(
            "package", "--out", "artifact",
            lambda t: ["package", model, "--name", "mnist-mlp", "--framework", "pytorch",
                       "--input", "input:FP32:-1x8", "--out", t],
            prev / "package",
        ),
        "export": Command(
            "models", "export directory", "artifact",
            lambda t: ["models", "export", "--registry", reg, "mnist-mlp:1", t], prev / "export",
        ),
    }  # fmt: skip


DIR_COMMANDS = ("render", "package", "export")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The user's tree: unrelated files around the target, all of which must survive every case."""
    w = tmp_path / "work"
    (w / "elsewhere").mkdir(parents=True)
    (w / "elsewhere" / "keep.txt").write_text("not yours\n")
    (w / "notes.txt").write_text("my notes\n")
    return w


def refused(cmd: Command, shown: str, rest: str) -> str:
    return f"dlstack {cmd.name}: error: {cmd.label} {shown} {rest}\n"


NEW_OR_EMPTY = "choose a new or empty directory"


def expect_refusal(capsys: pytest.CaptureFixture[str], cmd: Command, work: Path, target: str, message: str) -> None:
    before = snapshot(work)
    code, out, err = cli(capsys, cmd.argv(target))
    assert (code, err) == (2, message)
    assert out == ""
    assert snapshot(work) == before  # nothing at all changed, the target included


# -------------------------------------------------------------------------------------------------
# refused targets


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_dot_in_a_checkout_is_refused(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    cmd = commands(shared)[command]
    repo = work / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "README.md").write_text("# mine\n")
    monkeypatch.chdir(repo)
    msg = refused(cmd, ".", f"is the current directory or holds it; {NEW_OR_EMPTY}, e.g. {cmd.label} {repo}/out")
    expect_refusal(capsys, cmd, work, ".", msg)
    # An empty current directory too: swapping it would pull the directory out from under the shell.
    empty = work / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    msg = refused(cmd, ".", f"is the current directory or holds it; {NEW_OR_EMPTY}, e.g. {cmd.label} {empty}/out")
    expect_refusal(capsys, cmd, work, ".", msg)
    # ... and a directory that holds it.
    monkeypatch.chdir(repo / ".git")
    msg = refused(cmd, "..", f"is the current directory or holds it; {NEW_OR_EMPTY}, e.g. {cmd.label} {repo}/out")
    expect_refusal(capsys, cmd, work, "..", msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_checkout_or_a_directory_with_a_users_file_is_refused(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    cmd = commands(shared)[command]
    monkeypatch.chdir(work)  # the repository root below is then a checkout like any other, not the cwd
    repo = work / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    msg = refused(cmd, str(repo), f"is not empty and holds no previous {cmd.what}; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(repo), msg)
    # The --out of the issue: the repository root itself, .git and all.
    msg = refused(cmd, str(ROOT), f"is not empty and holds no previous {cmd.what}; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(ROOT), msg)
    docs = work / "docs"
    docs.mkdir()
    (docs / "plan.md").write_text("mine\n")
    msg = refused(cmd, str(docs), f"is not empty and holds no previous {cmd.what}; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(docs), msg)
    # A previous output of the other kind is not this command's either.
    other = work / "other"
    shutil.copytree(commands(shared)["render" if command != "render" else "package"].previous, other)
    msg = refused(cmd, str(other), f"is not empty and holds no previous {cmd.what}; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(other), msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_home_and_root_are_refused(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    cmd = commands(shared)[command]
    home = work / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    expect_refusal(capsys, cmd, work, str(home), refused(cmd, str(home), f"is the home directory; {NEW_OR_EMPTY}"))
    msg = refused(cmd, "/", f"is the filesystem root; {NEW_OR_EMPTY}")
    if command == "package":  # said first: the model file is under it too
        msg = f"dlstack package: error: --out / contains the model file {shared['model']}; "
        msg += "write the artifact to another directory\n"
    expect_refusal(capsys, cmd, work, "/", msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
@pytest.mark.parametrize("points_at", ["a user's directory", "an empty directory", "a previous output"])
def test_a_symlink_is_never_followed(
    command: str, points_at: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)[command]
    dest = {
        "a user's directory": work / "elsewhere",
        "an empty directory": work / "vacant",
        "a previous output": work / "prev",
    }[points_at]
    if points_at == "an empty directory":
        dest.mkdir()
    elif points_at == "a previous output":
        shutil.copytree(cmd.previous, dest)
    link = work / "out"
    link.symlink_to(dest, target_is_directory=True)
    msg = refused(cmd, str(link), f"is a symbolic link, which is never written through; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(link), msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_file_or_a_file_in_the_path_is_refused(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)[command]
    target = work / "notes.txt"
    msg = refused(cmd, str(target), f"is a file, not a directory; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(target), msg)
    os.mkfifo(work / "pipe")  # a reader of a FIFO would block forever: never opened
    msg = refused(cmd, str(work / "pipe"), f"is a file, not a directory; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(work / "pipe"), msg)
    inner = target / "out"
    msg = f"dlstack {cmd.name}: error: {cmd.label} {inner}: Not a directory; {NEW_OR_EMPTY}\n"
    expect_refusal(capsys, cmd, work, str(inner), msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("NOTES.md", "NOTES.md"),  # a file of the user's beside the output's files
        ("sub/deeper/mine.txt", "sub/"),  # a folder of the user's
        ("LINK", "LINK"),  # a symlink (to a file outside): never ours, never removed
    ],
)
def test_a_previous_output_with_a_users_file_is_refused(
    command: str, extra: str, named: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)[command]
    target = work / "out"
    shutil.copytree(cmd.previous, target)
    if extra == "LINK":
        (target / "LINK").symlink_to(work / "notes.txt")
    else:
        (target / extra).parent.mkdir(parents=True, exist_ok=True)
        (target / extra).write_text("the user's\n")
    msg = refused(
        cmd,
        str(target),
        f"holds {named!r}, which the previous {cmd.what} there did not write; move it away or {NEW_OR_EMPTY}",
    )
    expect_refusal(capsys, cmd, work, str(target), msg)


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_tampered_index_claims_nothing_outside_the_output(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index that claims '../notes.txt' or '.git' is no previous output: nothing is replaced."""
    import json

    from ruamel.yaml import YAML

    cmd = commands(shared)[command]
    target = work / "out"
    shutil.copytree(cmd.previous, target)
    (target / "keep.txt").write_text("the user's\n")
    if command == "render":
        doc = json.loads((target / "index.json").read_text())
        doc["resources"].append({"type": "x", "name": "x", "parent": "", "file": "../notes.txt"})
        doc["resources"].append({"type": "x", "name": "y", "parent": "", "file": "keep.txt"})
        (target / "index.json").write_text(json.dumps(doc))
    else:
        yaml = YAML()
        doc = yaml.load((target / "model.yaml").read_text())
        doc["files"].append({"path": "../notes.txt", "sha256": "0" * 64})
        doc["files"].append({"path": "keep.txt", "sha256": "0" * 64})
        buf = io.StringIO()
        yaml.dump(doc, buf)
        (target / "model.yaml").write_text(buf.getvalue())
    msg = refused(cmd, str(target), f"is not empty and holds no previous {cmd.what}; {NEW_OR_EMPTY}")
    expect_refusal(capsys, cmd, work, str(target), msg)


def test_read_only_parent_is_refused(shared: dict[str, Any], work: Path) -> None:
    """Through a subprocess: as root, it runs without CAP_DAC_OVERRIDE, so permission bits apply."""
    parent = work / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores permission bits and setpriv (util-linux) is missing to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    argvs = {name: (cmd.name, cmd.label, cmd.argv) for name, cmd in commands(shared).items()}
    argvs["capacity --plot"] = ("capacity", "--plot", _capacity)  # refused before measuring, not after
    try:
        for command, (name, label, argv) in argvs.items():
            before = snapshot(work)
            target = parent / "out"
            res = subprocess.run(
                [*prefix, sys.executable, "-m", "stacks.cli", *argv(str(target))],
                cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert "Traceback" not in res.stdout + res.stderr, command
            assert (res.returncode, res.stderr) == (
                2,
                f"dlstack {name}: error: cannot write {label} {target}: Permission denied in {parent}; "
                "choose a directory you can write to\n",
            ), command
            assert snapshot(work) == before
    finally:
        parent.chmod(0o755)


# -------------------------------------------------------------------------------------------------
# accepted targets: absent, empty, a previous output (replaced as a whole)


@pytest.mark.parametrize("command", DIR_COMMANDS)
@pytest.mark.parametrize("state", ["absent", "empty", "a previous output", "a previous output, renamed files"])
def test_absent_empty_or_previous_output_is_written(
    command: str, state: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)[command]
    target = work / "out"
    if state == "empty":
        target.mkdir()
    elif state.startswith("a previous output"):
        shutil.copytree(cmd.previous, target)
        if state.endswith("renamed files"):
            # A previous output missing some of its files (the user deleted them) is still one.
            victim = sorted(p for p in target.rglob("*") if p.is_file() and p.name not in ("index.json", "model.yaml"))
            victim[0].unlink()
    before = snapshot(work)
    code, _, err = cli(capsys, cmd.argv(str(target)))
    assert (code, err) == (0, ""), err
    after = snapshot(work)
    assert outside(after, "out") == outside(before, "out")
    assert files_under(after, "out") == files_under(snapshot(cmd.previous.parent), cmd.previous.name)
    assert not [p for p in work.iterdir() if p.name.startswith(".out.")]  # no temp or old directory left


def test_package_force_replaces_another_models_artifact_but_never_a_users_file(
    shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)["package"]
    target = work / "out"
    shutil.copytree(cmd.previous, target)
    argv = ["package", shared["model"], "--name", "other", "--framework", "pytorch", "--input", "input:FP32:-1x8",
            "--out", str(target)]  # fmt: skip
    before = snapshot(work)
    code, _, err = cli(capsys, argv)
    assert (code, err) == (
        2,
        f"dlstack package: error: --out {target} holds the artifact 'mnist-mlp', not 'other'; "
        "choose another directory or pass --force\n",
    )
    assert snapshot(work) == before
    (target / "NOTES.md").write_text("the user's\n")
    before = snapshot(work)
    code, _, err = cli(capsys, [*argv, "--force"])
    assert (code, err) == (
        2,
        f"dlstack package: error: --out {target} holds 'NOTES.md', which the previous artifact there did not "
        f"write; move it away or {NEW_OR_EMPTY}\n",
    )
    assert snapshot(work) == before
    (target / "NOTES.md").unlink()
    code, _, err = cli(capsys, [*argv, "--force"])
    assert (code, err) == (0, "")
    from services.serving.artifact import read_spec

    assert read_spec(target).name == "other"


def test_export_over_another_models_artifact_is_refused(
    shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)["export"]
    target = work / "out"
    shutil.copytree(cmd.previous, target)
    (target / "model.yaml").write_text((target / "model.yaml").read_text().replace("name: mnist-mlp", "name: other"))
    msg = f"dlstack models: error: export directory {target} holds the artifact 'other', not 'mnist-mlp'; "
    expect_refusal(capsys, cmd, work, str(target), msg + "choose another directory\n")


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_temp_directories_of_a_killed_run_are_removed_and_a_live_runs_kept(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = commands(shared)[command]
    target = work / "out"
    shutil.copytree(cmd.previous, target)
    killed = work / f".out.dlstack-partial-{dead_pid()}-0bad"
    (killed / "manifests").mkdir(parents=True)
    (killed / "manifests" / "half.yaml").write_text("kind: Dep")
    aside = work / f".out.dlstack-old-{dead_pid()}-0bad"  # killed between moving the old one aside and the new in
    shutil.copytree(cmd.previous, aside)
    live = work / ".out.dlstack-partial-1-beef"  # pid 1 is alive: a concurrent run, left alone
    live.mkdir()
    (live / "writing.yaml").write_text("x")
    lookalike = work / ".out.dlstack-partial-notapid"  # not our name: not ours
    lookalike.write_text("the user's\n")
    before = snapshot(work)
    code, _, err = cli(capsys, cmd.argv(str(target)))
    assert (code, err) == (0, ""), err
    after = snapshot(work)
    assert not killed.exists() and not aside.exists()
    gone = {killed.name, aside.name}
    assert outside({k: v for k, v in before.items() if k.split("/")[0] not in gone}, "out") == outside(after, "out")


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_failed_write_leaves_the_previous_output_and_no_temp_directory(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    cmd = commands(shared)[command]
    target = work / "out"
    shutil.copytree(cmd.previous, target)

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    where = {
        "render": "stacks.render._write_tree",
        "package": "services.packaging.write_spec",
        "export": "services.registry.registry.write_spec",
    }
    monkeypatch.setattr(where[command], full)
    msg = f"dlstack {cmd.name}: error: writing {cmd.label} {target} failed: No space left on device; "
    expect_refusal(capsys, cmd, work, str(target), msg + "it was left as it was\n")


# -------------------------------------------------------------------------------------------------
# capacity --plot: a file, by the same rule


def _capacity(plot: str) -> list[str]:
    # The plot is checked before the artifact is even resolved: a refusal costs no load test.
    return ["capacity", "no-such-artifact", "--target-rps", "10", "--p99-ms", "100", "--plot", plot]


def _measurement() -> Any:
    from stacks.capacity import MI, Measurement, Step

    steps = tuple(Step(c, 100 * c, 0, 10.0, 10.0 * c, 1.0, 2.0 * c, 0.5) for c in (1, 2, 4))
    return Measurement("mnist-mlp", "1", 1.0, 100.0, "python", steps, 100 * MI, "test")


@pytest.mark.parametrize("case", ["a user's file", "a PNG not ours", "a symlink", "a directory", ".", "a FIFO"])
def test_capacity_plot_refuses_what_it_did_not_write(
    case: str, work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.chdir(work)
    target = {"a user's file": "notes.txt", "a directory": "elsewhere", ".": "."}.get(case, "plot.png")
    if case == "a PNG not ours":
        (work / target).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + b"\0" * 17)
    elif case == "a symlink":
        (work / target).symlink_to(work / "elsewhere" / "keep.txt")
    elif case == "a FIFO":
        os.mkfifo(work / target)
    rest = {
        "a symlink": "is a symbolic link, which is never written through",
        "a directory": "is a directory",
        ".": "is a directory",
    }.get(case, "exists and is not a previous capacity plot")
    before = snapshot(work)
    code, out, err = cli(capsys, _capacity(target))
    assert out == ""
    assert (code, err) == (2, f"dlstack capacity: error: --plot {target} {rest}; choose a new file name\n")
    assert snapshot(work) == before


def test_capacity_plot_replaces_only_its_own_plot_atomically(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.outdir import OutputError
    from stacks.capacity import is_plot, plot

    m = _measurement()
    target = work / "plot.png"
    plot(m, target)
    assert is_plot(target)
    first = target.read_bytes()
    # A previous plot passes the CLI's check (the error that follows is about the artifact, not the plot).
    code, _, err = cli(capsys, _capacity(str(target)))
    assert code == 2 and "--plot" not in err and "no-such-artifact" in err
    target.chmod(0o600)
    killed = work / f".plot.png.dlstack-partial-{dead_pid()}-x1"  # a killed run's temp file: removed
    killed.write_bytes(first[:100])
    live = work / ".plot.png.dlstack-partial-1-x2"  # a live run's: kept
    live.write_bytes(first[:100])
    before = outside(snapshot(work), "plot.png")
    plot(m, target)
    assert target.read_bytes() == first and is_plot(target)
    del before[killed.name]
    assert outside(snapshot(work), "plot.png") == before  # no temp file left, the live run's kept
    (work / "mine.png").write_bytes(first[:8] + b"\0\0\0\0IEND" + b"\0" * 4)
    with pytest.raises(OutputError, match=r"^--plot .*/mine.png exists and is not a previous capacity plot;"):
        plot(m, work / "mine.png")


# -------------------------------------------------------------------------------------------------
# render-diff --out: a file, by the same rule


@pytest.mark.parametrize("case", ["a user's file", "a symlink", "a directory"])
def test_render_diff_out_refuses_what_it_did_not_write(
    case: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    render = str(shared["prev"] / "render")
    target = {"a user's file": work / "notes.txt", "a directory": work / "elsewhere"}.get(case, work / "diff.md")
    if case == "a symlink":
        target.symlink_to(work / "notes.txt")
    rest = {"a symlink": "is a symbolic link, which is never written through", "a directory": "is a directory"}
    before = snapshot(work)
    code, out, err = cli(capsys, ["render-diff", render, render, "--out", str(target)])
    assert (code, out) == (2, "")
    assert err == (
        f"dlstack render-diff: error: --out {target} "
        f"{rest.get(case, 'exists and is not a previous render-diff')}; choose a new file name\n"
    )
    assert snapshot(work) == before


def test_render_diff_out_replaces_a_previous_diff(
    shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    render = str(shared["prev"] / "render")
    target = work / "diff.md"
    for _ in range(2):  # new, then over the previous one
        before = outside(snapshot(work), "diff.md")
        code, out, err = cli(capsys, ["render-diff", render, render, "--out", str(target)])
        assert (code, err) == (0, "")
        assert target.read_text() == out and out.startswith("# Render diff: `")
        assert outside(snapshot(work), "diff.md") == before


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_a_run_killed_mid_swap_leaves_the_previous_output_to_the_next(
    command: str, shared: dict[str, Any], work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Killed after moving the previous output aside, before moving the new one in: the next run puts it back."""
    cmd = commands(shared)[command]
    target = work / "out"
    aside = work / f".out.dlstack-old-{dead_pid()}-0bad"
    shutil.copytree(cmd.previous, aside)
    partial = work / f".out.dlstack-partial-{dead_pid()}-0bad"
    partial.mkdir()
    expected = {("out" + k[len(aside.name) :] if k.startswith(aside.name) else k): v for k, v in snapshot(work).items()}
    del expected[partial.name]

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    where = {
        "render": "stacks.render._write_tree",
        "package": "services.packaging.write_spec",
        "export": "services.registry.registry.write_spec",
    }
    with monkeypatch.context() as m:  # this run fails too: the previous output is back, the leftovers gone
        m.setattr(where[command], full)
        code, _, err = cli(capsys, cmd.argv(str(target)))
        assert code == 2 and err.endswith("No space left on device; it was left as it was\n")
    assert snapshot(work) == expected
    code, _, err = cli(capsys, cmd.argv(str(target)))  # and the next one replaces it
    assert (code, err) == (0, "")
    assert sorted(p.name for p in work.iterdir()) == ["elsewhere", "notes.txt", "out"]


def test_capacity_report_refuses_a_file_it_did_not_write(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """--report is checked before any load test, like --plot; only a previous report is replaced."""
    from services.outdir import json_with_keys, replace_file

    monkeypatch.chdir(work)
    argv = ["capacity", "no-such-artifact", "--target-rps", "10", "--p99-ms", "100", "--report"]
    (work / "results.json").write_text('{"mine": 1}\n')
    before = snapshot(work)
    code, out, err = cli(capsys, [*argv, "results.json"])
    assert (code, out) == (2, "")
    assert err == (
        "dlstack capacity: error: --report results.json exists and is not a previous capacity report; "
        "choose a new file name\n"
    )
    assert snapshot(work) == before
    ours = json_with_keys("measurement", "recommendation")
    previous = work / "report.json"
    replace_file(previous, b'{"measurement": {}, "recommendation": {}}\n', label="--report", what="r", recognise=ours)
    code, _, err = cli(capsys, [*argv, str(previous)])
    assert code == 2 and "--report" not in err and "no-such-artifact" in err, "a previous report passes the check"
