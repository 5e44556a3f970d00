"""Hostile artifacts and registry indexes, driven through the real ``dlstack`` CLI.

Every case is a file someone else could have made: a model.yaml whose ``files`` leave the artifact
(``..``, absolute paths, symlinks, FIFOs, devices), names with a trailing newline, an index.json with
wrong types, missing keys or keys that are paths (``../x``, ``1/../../``). Each asserts the exact
one-line message, the exit code (2; ``models verify`` reports a damaged index with 1, as documented),
no traceback, and that nothing outside the expected output changed: the whole tmp tree (paths, types,
sha256, link targets) is snapshotted before and after, with a canary file next to it and /etc/passwd.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.registry import Registry
from stacks.cli import main

WEIGHTS = b"not really weights, never loaded: register and verify only hash them"
SHA = hashlib.sha256(WEIGHTS).hexdigest()
SECRET = b"outside the artifact: must never be read into the registry or overwritten\n"
SIGNATURE = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}],
}
FIX = "paths must be relative and inside it"
RESTORE = "restore the index from a backup"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` without following links or opening special files: path -> what it is."""
    out: dict[str, str] = {}
    for cur, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            p = Path(cur) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link -> {os.readlink(p)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"file {_sha(p)} {stat.S_IMODE(st.st_mode):o}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = f"special {stat.S_IFMT(st.st_mode):o}"
    return out


@dataclass
class World:
    """tmp_path/work holds the artifact, the registry and the cache; tmp_path/outside what must stay untouched."""

    tmp: Path
    work: Path
    outside: Path
    art: Path
    reg: Path

    @property
    def yaml(self) -> str:
        return str(self.art / "model.yaml")

    @property
    def index(self) -> Path:
        return self.reg / "index.json"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (outside / "dir").mkdir()
    (outside / "dir" / "secret").write_bytes(SECRET)
    monkeypatch.setenv("DLSTACK_REGISTRY", str(work / "reg"))
    monkeypatch.setenv("DLSTACK_CACHE", str(work / "cache"))
    monkeypatch.chdir(work)
    # Something next to tmp_path, outside every tree a command is given.
    canary = tmp_path.parent / f"{tmp_path.name}.canary"
    canary.write_bytes(SECRET)
    passwd = _sha(Path("/etc/passwd"))
    yield World(tmp_path, work, outside, work / "art", work / "reg")
    assert canary.read_bytes() == SECRET, "a file next to the test's tmp dir was changed"
    canary.unlink()
    assert _sha(Path("/etc/passwd")) == passwd


def write_artifact(art: Path, files: Any = None, **over: Any) -> None:
    """model.yaml (written as JSON, which is YAML) + model.pt; ``over`` replaces top-level keys as given."""
    art.mkdir(exist_ok=True)
    (art / "model.pt").write_bytes(WEIGHTS)
    spec: dict[str, Any] = {
        "name": "mlp",
        "version": "1",
        "framework": "pytorch",
        "files": files if files is not None else [{"path": "model.pt", "sha256": SHA}],
        "signature": SIGNATURE,
    }
    spec.update(over)
    (art / "model.yaml").write_text(json.dumps(spec))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


# ---- hostile artifacts: model.yaml and the files it lists -----------------------------------------------


def _link(target: Callable[[World], str | Path], name: str = "model.pt") -> Callable[[World], None]:
    def build(w: World) -> None:
        write_artifact(w.art)
        (w.art / name).unlink(missing_ok=True)
        (w.art / name).symlink_to(target(w))

    return build


def _files(*paths: str) -> Callable[[World], None]:
    return lambda w: write_artifact(w.art, [{"path": p, "sha256": SHA} for p in paths])


def _fifo(w: World) -> None:
    write_artifact(w.art)
    (w.art / "model.pt").unlink()
    os.mkfifo(w.art / "model.pt")


def _saved_model(extra: Callable[[Path, World], None]) -> Callable[[World], None]:
    def build(w: World) -> None:
        write_artifact(w.art, [{"path": "saved", "sha256": SHA}], framework="tensorflow")
        (w.art / "saved").mkdir()
        (w.art / "saved" / "saved_model.pb").write_bytes(WEIGHTS)
        extra(w.art / "saved", w)

    return build


def _symlinked_dir(w: World) -> None:
    write_artifact(w.art, [{"path": "saved", "sha256": SHA}], framework="tensorflow")
    (w.art / "saved").symlink_to(w.outside / "dir", target_is_directory=True)


LEAVES = "leaves the artifact directory"
THROUGH_LINK = f"leaves the artifact directory through a symlink; {FIX} (copy the file in, don't link it)"
NOT_VALID = "is not a valid path; write a relative path with '/' inside the artifact directory"
ONLY_REGULAR = "only regular files (or directories of them) are allowed"

# id -> (how to build the artifact, the message after "<artifact>/model.yaml: ")
ARTIFACTS: dict[str, tuple[Callable[[World], None], str]] = {
    "dotdot": (_files("../outside/secret"), f"files[0].path: '../outside/secret' {LEAVES}; {FIX}"),
    "dotdot-deep": (
        _files("../../../../../../etc/passwd"),
        f"files[0].path: '../../../../../../etc/passwd' {LEAVES}; {FIX}",
    ),
    "dotdot-inner": (_files("sub/../../outside/secret"), f"files[0].path: 'sub/../../outside/secret' {LEAVES}; {FIX}"),
    "absolute": (_files("/etc/passwd"), f"files[0].path: '/etc/passwd' {LEAVES}; {FIX}"),
    "second-entry": (
        _files("model.pt", "/dev/zero"),
        f"files[1].path: '/dev/zero' {LEAVES}; {FIX}",
    ),
    "home": (_files("~/.ssh/id_rsa"), f"files[0].path: '~/.ssh/id_rsa' {LEAVES}; {FIX}"),
    "backslash": (
        _files("..\\..\\secret"),
        f"files[0].path: '..\\\\..\\\\secret' {NOT_VALID}",
    ),
    "newline-path": (
        _files("model.pt\n"),
        f"files[0].path: 'model.pt\\n' {NOT_VALID}",
    ),
    "empty-path": (
        _files(""),
        f"files[0].path: '' {NOT_VALID}",
    ),
    "dot-path": (
        _files("./model.pt"),
        "files[0].path: './model.pt' is not a normalized path; write it without '.', '//' or a trailing '/'",
    ),
    "path-not-string": (
        lambda w: write_artifact(w.art, [{"path": ["model.pt"], "sha256": SHA}]),
        "files[0].path: Input should be a valid string",
    ),
    "name-newline": (lambda w: write_artifact(w.art, name="mlp\n"), "name: 'mlp\\n' is not a DNS-1123 label"),
    "version-newline": (lambda w: write_artifact(w.art, version="1\n"), "version: '1\\n' is not a version"),
    "version-path": (lambda w: write_artifact(w.art, version="1/../../x"), "version: '1/../../x' is not a version"),
    "files-not-a-list": (lambda w: write_artifact(w.art, files={"model.pt": SHA}), "files: Input should be a valid"),
    "sha-not-hex": (
        lambda w: write_artifact(w.art, [{"path": "model.pt", "sha256": "../../../etc"}]),
        "files[0].sha256 '../../../etc' is not a sha256 (64 lowercase hex digits); re-package the model",
    ),
    "sha-upper": (
        lambda w: write_artifact(w.art, [{"path": "model.pt", "sha256": SHA.upper()}]),
        f"files[0].sha256 '{SHA.upper()}' is not a sha256 (64 lowercase hex digits); re-package the model",
    ),
    "symlink-outside": (_link(lambda w: w.outside / "secret"), f"files[0].path 'model.pt' {THROUGH_LINK}"),
    "symlink-relative": (_link(lambda w: "../../outside/secret"), f"files[0].path 'model.pt' {THROUGH_LINK}"),
    "symlink-etc-passwd": (_link(lambda w: "/etc/passwd"), f"files[0].path 'model.pt' {THROUGH_LINK}"),
    "symlink-dev-null": (_link(lambda w: "/dev/null"), f"files[0].path 'model.pt' {THROUGH_LINK}"),
    "symlink-dev-zero": (_link(lambda w: "/dev/zero"), f"files[0].path 'model.pt' {THROUGH_LINK}"),
    "symlink-loop": (
        _link(lambda w: "model.pt"),
        "files[0].path 'model.pt' cannot be resolved (RuntimeError); replace the symlink",
    ),
    "symlinked-dir": (_symlinked_dir, f"files[0].path 'saved' {THROUGH_LINK}"),
    "fifo": (_fifo, f"files[0].path 'model.pt' is a FIFO; {ONLY_REGULAR}"),
    "fifo-in-savedmodel": (
        _saved_model(lambda d, w: os.mkfifo(d / "variables.data")),
        f"files[0].path: 'variables.data' is a FIFO; {ONLY_REGULAR}",
    ),
    "link-out-of-savedmodel": (
        _saved_model(lambda d, w: (d / "variables.data").symlink_to(w.outside / "secret")),
        f"files[0].path: 'variables.data' {THROUGH_LINK}",
    ),
    "dir-link-in-savedmodel": (
        _saved_model(lambda d, w: (d / "variables").symlink_to(d, target_is_directory=True)),
        "files[0].path: 'variables' is a symlink to a directory; copy the directory in instead",
    ),
}


def _artifact_message(w: World, case: str) -> str:
    build, message = ARTIFACTS[case]
    build(w)
    return f"{w.yaml}: {message}"


@pytest.mark.parametrize("case", sorted(ARTIFACTS))
def test_register_refuses_a_hostile_artifact(world: World, capsys: pytest.CaptureFixture[str], case: str) -> None:
    message = _artifact_message(world, case)
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "register", str(world.art), "--name", "mlp", "--framework", _fw(world))
    assert (rc, out) == (2, "")
    assert err.startswith(f"dlstack models: error: {message}"), err
    assert err.count("\n") == 1
    assert snapshot(world.tmp) == before  # no registry, no blob, no cache: nothing was written


@pytest.mark.parametrize("case", sorted(ARTIFACTS))
def test_serve_refuses_a_hostile_artifact_before_gunicorn(
    world: World, capsys: pytest.CaptureFixture[str], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _artifact_message(world, case)

    def no_server(*a: object) -> None:
        raise AssertionError("gunicorn was started for a hostile artifact")

    monkeypatch.setattr(os, "execve", no_server)
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "serve", str(world.art), "--host", "127.0.0.1", "--port", "0")
    assert (rc, out) == (2, "")
    assert err.startswith(f"dlstack serve: error: {message}"), err
    assert err.count("\n") == 1
    assert snapshot(world.tmp) == before


def _fw(w: World) -> str:
    try:
        return str(json.loads((w.art / "model.yaml").read_text())["framework"])
    except (OSError, ValueError, KeyError):
        return "pytorch"


def test_register_refuses_a_name_with_a_trailing_newline(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    write_artifact(world.art)
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "register", str(world.art), "--name", "mlp\n", "--framework", "pytorch")
    assert (rc, out) == (2, "")
    assert err.startswith("dlstack models: error: --name 'mlp\\n': name: 'mlp\\n' is not a DNS-1123 label"), err
    assert err.count("\n") == 1
    assert snapshot(world.tmp) == before


# ---- the registry index ----------------------------------------------------------------------------------


def _registered(w: World) -> dict[str, Any]:
    """A registry holding mlp:1 (registered in-process), and its index as a dict to tamper with."""
    write_artifact(w.art)
    Registry(str(w.reg)).register(w.art, "mlp", "pytorch")
    return dict(json.loads(w.index.read_text()))


def _v1(index: dict[str, Any]) -> dict[str, Any]:
    return dict(index["models"]["mlp"]["versions"]["1"])


def _move(index: dict[str, Any], path: list[str], new_key: str) -> dict[str, Any]:
    d = index
    for k in path[:-1]:
        d = d[k]
    d[new_key] = d.pop(path[-1])
    return index


def _set(index: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    d = index
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return index


V1 = ["models", "mlp", "versions", "1"]
AT = "models['mlp'].versions['1']"
# id -> (the tampered index: a dict to dump, or raw bytes; the problem after "<index>: ")
INDEXES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "list": (lambda i: [i], "<root>: expected a mapping, got list; not a dlstack registry index"),
    "string": (lambda i: "index", "<root>: expected a mapping, got str; not a dlstack registry index"),
    "no-models": (lambda i: {"format": 1}, f"models: missing; {RESTORE}"),
    "models-list": (lambda i: {"format": 1, "models": []}, f"models: list, not a mapping; {RESTORE}"),
    "unknown-format": (lambda i: {**i, "format": 2}, "format: 2 is not a known index format (expected 1)"),
    "format-string": (lambda i: {**i, "format": "1"}, "format: '1' is not a known index format (expected 1)"),
    "format-true": (lambda i: {**i, "format": True}, "format: True is not a known index format (expected 1)"),
    "unknown-top-key": (lambda i: {**i, "extra": {}}, "'extra': unknown key; an index holds only format and models"),
    "name-dotdot": (
        lambda i: _move(i, ["models", "mlp"], "../x"),
        f"models['../x']: '../x' is not a model name (a DNS-1123 label); {RESTORE}",
    ),
    "name-newline": (
        lambda i: _move(i, ["models", "mlp"], "mlp\n"),
        f"models['mlp\\n']: 'mlp\\n' is not a model name (a DNS-1123 label); {RESTORE}",
    ),
    "version-dotdot": (
        lambda i: _move(i, V1, "../../x"),
        f"models['mlp'].versions['../../x']: '../../x' is not a version (an integer such as 1); {RESTORE}",
    ),
    "version-slash": (
        lambda i: _move(i, V1, "1/../../"),
        f"models['mlp'].versions['1/../../']: '1/../../' is not a version (an integer such as 1); {RESTORE}",
    ),
    "version-newline": (
        lambda i: _move(i, V1, "1\n"),
        f"models['mlp'].versions['1\\n']: '1\\n' is not a version (an integer such as 1); {RESTORE}",
    ),
    "no-versions": (
        lambda i: _set(i, ["models", "mlp"], {"aliases": {}, "versions": {}}),
        f"models['mlp'].versions: empty; a model holds at least one version; {RESTORE}",
    ),
    "entry-string": (lambda i: _set(i, V1, "1"), f"{AT}: expected a mapping, got str; {RESTORE}"),
    "model-list": (
        lambda i: _set(i, ["models", "mlp"], []),
        f"models['mlp']: expected a mapping with exactly aliases and versions; {RESTORE}",
    ),
    "no-blobs": (
        lambda i: _set(i, V1, {k: v for k, v in _v1(i).items() if k != "blobs"}),
        f"{AT}.blobs: missing; {RESTORE}",
    ),
    "blob-sha-dotdot": (
        lambda i: _set(i, [*V1, "blobs", "model.pt"], "../../../etc"),
        f"{AT}.blobs['model.pt']: '../../../etc' is not a sha256 (64 lowercase hex digits); {RESTORE}",
    ),
    "blob-path-dotdot": (
        lambda i: _move(i, [*V1, "blobs", "model.pt"], "../../outside/secret"),
        f"{AT}.blobs['../../outside/secret']: '../../outside/secret' leaves the model directory; {FIX}",
    ),
    "blob-path-absolute": (
        lambda i: _move(i, [*V1, "blobs", "model.pt"], "/etc/cron.d/x"),
        f"{AT}.blobs['/etc/cron.d/x']: '/etc/cron.d/x' leaves the model directory; {FIX}",
    ),
    "blob-file-and-dir": (
        lambda i: _set(i, [*V1, "blobs", "model.pt/x"], SHA),
        f"{AT}.blobs['model.pt/x']: 'model.pt' is both a file and a directory; {RESTORE}",
    ),
    "spec-path-dotdot": (
        lambda i: _set(i, [*V1, "spec", "files"], [{"path": "../../outside/secret", "sha256": SHA}]),
        f"{AT}.spec: files[0].path: '../../outside/secret' leaves the artifact directory; {FIX}",
    ),
    "spec-other-model": (
        lambda i: _set(i, [*V1, "spec", "name"], "other"),
        f"{AT}.spec: says other:1, not mlp:1; {RESTORE}",
    ),
    "alias-newline": (
        lambda i: _set(i, ["models", "mlp", "aliases", "x\n"], "1"),
        f"models['mlp'].aliases['x\\n']: 'x\\n' is not an alias name; {RESTORE}",
    ),
    "alias-dangling": (
        lambda i: _set(i, ["models", "mlp", "aliases", "champion"], "7"),
        f"models['mlp'].aliases['champion']: '7' is not a version of 'mlp'; {RESTORE}",
    ),
    "metrics-list": (lambda i: _set(i, [*V1, "metrics"], [1]), f"{AT}.metrics: list is not a mapping; {RESTORE}"),
    "nested-too-deep": (
        lambda i: b"[" * 200_000 + b"]" * 200_000,
        "unreadable index (nested too deeply); restore it from a backup",
    ),
    "not-utf8": (
        lambda i: b"\x80\x81 not json",
        "unreadable index ('utf-8' codec can't decode byte 0x80 in position 0: invalid start byte); "
        "restore it from a backup",
    ),
    "not-json": (
        lambda i: b"models: {}\n",
        "unreadable index (Expecting value: line 1 column 1 (char 0)); restore it from a backup",
    ),
    "huge-number": (
        lambda i: b'{"format": ' + b"1" * 5000 + b', "models": {}}',
        "unreadable index (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
        "use sys.set_int_max_str_digits() to increase the limit); restore it from a backup",
    ),
}


def _tamper(w: World, case: str) -> str:
    make, problem = INDEXES[case]
    tampered = make(_registered(w))
    w.index.write_bytes(tampered if isinstance(tampered, bytes) else json.dumps(tampered).encode())
    return f"{w.index}: {problem}"


@pytest.mark.parametrize("case", sorted(INDEXES))
def test_verify_reports_a_damaged_index_one_line_exit_1(
    world: World, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    line = _tamper(world, case)
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "verify")
    assert (rc, out) == (1, "")
    assert err == f"CORRUPT {line}\n1 problem(s) in {world.reg}; restore the named files or re-register\n"
    assert snapshot(world.tmp) == before


@pytest.mark.parametrize("case", sorted(INDEXES))
@pytest.mark.parametrize("command", ["show", "export", "list", "alias"])
def test_every_reader_refuses_a_damaged_index_in_one_line(
    world: World, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    line = _tamper(world, case)
    argv = {
        "show": ["models", "show", "mlp:1"],
        "export": ["models", "export", "mlp:1", str(world.work / "out")],
        "list": ["models", "list"],
        "alias": ["models", "alias", "set", "mlp", "champion", "1"],
    }[command]
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (2, "")
    assert err == f"dlstack models: error: {line}\n"
    after = snapshot(world.tmp)
    # export may make its (empty) output directory; nothing else may change, and nothing lands in it
    assert {k: v for k, v in after.items() if k != "work/out"} == before


def test_a_ref_or_alias_with_a_newline_is_refused(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    _registered(world)
    before = snapshot(world.tmp)
    rc, _, err = run(capsys, "models", "show", "mlp:1\n")
    assert rc == 2
    assert err.startswith("dlstack models: error: 'mlp:1\\n' is not a model reference;"), err
    rc, _, err = run(capsys, "models", "alias", "set", "mlp", "x\n", "1")
    assert rc == 2
    assert err.startswith("dlstack models: error: alias 'x\\n' is invalid:"), err
    assert snapshot(world.tmp) == before


# ---- the same index checks on an object store -------------------------------------------------------------


@pytest.mark.parametrize("case", ["list", "version-slash", "blob-sha-dotdot", "blob-path-dotdot", "not-json"])
def test_an_object_store_index_is_checked_the_same_way(
    world: World,
    capsys: pytest.CaptureFixture[str],
    case: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from tests.s3 import S3Server, point_at

    server: S3Server = request.getfixturevalue("s3_server")
    point_at(server, monkeypatch, world.work / "cache")
    bucket = server.bucket()
    url = f"s3://{bucket}/models"
    monkeypatch.setenv("DLSTACK_REGISTRY", url)
    write_artifact(world.art)
    Registry(url).register(world.art, "mlp", "pytorch")
    client = server.client()
    index = json.loads(client.get_object(Bucket=bucket, Key="models/index.json")["Body"].read())
    make, problem = INDEXES[case]
    tampered = make(index)
    body = tampered if isinstance(tampered, bytes) else json.dumps(tampered).encode()
    client.put_object(Bucket=bucket, Key="models/index.json", Body=body)
    line = f"{url}/index.json: {problem}"
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "verify")
    assert (rc, out, err) == (1, "", f"CORRUPT {line}\n1 problem(s) in {url}; restore the named files or re-register\n")
    rc, out, err = run(capsys, "models", "export", "mlp:1", str(world.work / "out"))
    assert (rc, out, err) == (2, "", f"dlstack models: error: {line}\n")
    assert {k: v for k, v in snapshot(world.tmp).items() if k != "work/out"} == before


# ---- CLI locations and the dataset manifest ---------------------------------------------------------------


@pytest.mark.parametrize("location", ["s3://bucket\n", "s3://buc\nket/models", "/srv/registry\t"])
def test_a_registry_location_with_a_control_character_is_refused(
    world: World, capsys: pytest.CaptureFixture[str], location: str
) -> None:
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "list", "--registry", location)
    assert (rc, out) == (2, "")
    assert err == f"dlstack models: error: --registry: {json.dumps(location)} has a control character; remove it\n"
    assert snapshot(world.tmp) == before


SHA_A = "a" * 64
MANIFESTS: dict[str, tuple[str, str]] = {
    "dotdot": (
        f"datasets:\n- {{path: ../../outside/secret, oid: {SHA_A}, size: 1}}\n",
        f"datasets[0].path '../../outside/secret' leaves the repository; {FIX}",
    ),
    "absolute": (
        f"datasets:\n- {{path: /etc/passwd, oid: {SHA_A}, size: 1}}\n",
        f"datasets[0].path '/etc/passwd' leaves the repository; {FIX}",
    ),
    "newline": (
        f'datasets:\n- {{path: "data.csv\\n", oid: {SHA_A}, size: 1}}\n',
        "datasets[0].path 'data.csv\\n' is not a valid path; write a relative path with '/' inside the repository",
    ),
    "oid-not-hex": (
        "datasets:\n- {path: data.csv, oid: ../../x, size: 1}\n",
        "datasets[0].oid '../../x' is not a sha256 (64 lowercase hex digits); re-add it with `dlstack datasets add`",
    ),
    "size-negative": (
        f"datasets:\n- {{path: data.csv, oid: {SHA_A}, size: -1}}\n",
        "datasets[0].size -1 is not a byte count; re-add it with `dlstack datasets add`",
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
@pytest.mark.parametrize("command", ["list", "verify"])
def test_a_hostile_dataset_manifest_is_refused(
    world: World, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    from tests.conftest import git

    text, problem = MANIFESTS[case]
    git(world.work, "init", "-q")  # verify works in a repository; the manifest is refused before git is asked
    manifest = world.work / "datasets.yaml"
    manifest.write_text(text)
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "datasets", command, "--manifest", str(manifest))
    assert (rc, out) == (2, "")
    assert err == f"dlstack datasets: error: {manifest}: {problem}\n"
    assert snapshot(world.tmp) == before


def test_datasets_verify_never_reads_a_symlink_out_of_the_repo_or_a_fifo(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import git

    repo = world.work / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "leak.csv").symlink_to(world.outside / "secret")
    os.mkfifo(repo / "pipe.csv")
    manifest = repo / "datasets.yaml"
    manifest.write_text(
        f"datasets:\n- {{path: leak.csv, oid: {SHA_A}, size: 1}}\n- {{path: pipe.csv, oid: {SHA_A}, size: 1}}\n"
    )
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "datasets", "verify", "--manifest", str(manifest))
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"PROBLEM {manifest}: datasets[0].path 'leak.csv' leaves the repository through a symlink; {FIX} "
        "(copy the file in, don't link it)",
        f"PROBLEM {manifest}: datasets[1].path 'pipe.csv' is a FIFO; {ONLY_REGULAR}",
    ]
    assert snapshot(world.tmp) == before


@pytest.mark.parametrize("kind", ["symlink-out", "fifo", "dev-null"])
def test_datasets_add_refuses_what_is_not_a_file_of_the_repo(
    world: World, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from tests.conftest import git

    repo = world.work / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    data = repo / "data.csv"
    if kind == "symlink-out":
        data.symlink_to(world.outside / "secret")
        message = f"{data} is a symlink; add the file it points to, inside the repo"
    elif kind == "fifo":
        os.mkfifo(data)
        message = f"{data} is not a file; give the path of a dataset file inside the repo"
    else:
        data.symlink_to("/dev/null")
        message = f"{data} is not a file; give the path of a dataset file inside the repo"
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "datasets", "add", str(data), "--manifest", str(repo / "datasets.yaml"))
    assert (rc, out, err) == (2, "", f"dlstack datasets: error: {message}\n")
    assert snapshot(world.tmp) == before  # no .gitattributes, no manifest


def test_a_checkout_tampered_with_a_symlink_is_found_by_verify_and_refused_by_serve(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _registered(world)
    checkout = world.reg / "models" / "mlp" / "1"
    (checkout / "model.pt").unlink()
    (checkout / "model.pt").symlink_to(world.outside / "secret")
    message = f"{checkout}/model.yaml: files[0].path 'model.pt' {THROUGH_LINK}"
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("gunicorn was started"))
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "verify")
    assert (rc, out) == (1, "")
    assert err == f"CORRUPT mlp:1: {message}\n1 problem(s) in {world.reg}; restore the named files or re-register\n"
    rc, out, err = run(capsys, "serve", str(checkout), "--host", "127.0.0.1", "--port", "0")
    assert (rc, out, err) == (2, "", f"dlstack serve: error: {message}\n")
    assert snapshot(world.tmp) == before


# ---- infra: the same full-match names -------------------------------------------------------------------


def test_infra_components_refuse_names_versions_and_digests_with_a_trailing_newline() -> None:
    """Their last line of defence ("$" let these through); users meet the stack config's one-line check first."""
    from infra.model_image import ModelImageArgs
    from infra.model_service import ModelServiceArgs
    from infra.monitoring import MonitoringArgs
    from services.serving.errors import UserError

    with pytest.raises(UserError) as err:
        ModelServiceArgs(image="r/m:1", model_version="1\n", namespace="models\n").validate("mlp\n")
    assert str(err.value).startswith('ModelService mlp\n: name "mlp\n" is not a DNS-1123 label')
    assert 'model_version "1\n" is not a valid label value' in str(err.value)
    assert 'namespace "models\n" is not a DNS-1123 label' in str(err.value)
    with pytest.raises(UserError, match='namespace "monitoring\n" is not a DNS-1123 label'):
        MonitoringArgs(namespace="monitoring\n").validate("m")
    digest = "sha256:" + "c" * 64 + "\n"
    args = ModelImageArgs("mlp\n", "1", "pytorch", SHA, "ghcr.io/acme/dlstack", image_digest=digest)
    with pytest.raises(UserError) as err:
        args.validate("x")
    assert f'image_digest "{digest}" is not "sha256:" + 64 hex digits' in str(err.value)
    assert 'model_name "mlp\n" is not a valid image repository name' in str(err.value)


@pytest.mark.parametrize("kind", ["file", "dir-without-model-yaml"])
def test_something_in_the_way_of_a_checkout_is_one_line(
    world: World, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    import shutil

    _registered(world)
    checkout = world.reg / "models" / "mlp" / "1"
    for p in [checkout, *checkout.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(checkout)
    if kind == "file":
        checkout.write_bytes(SECRET)
        why = "Not a directory"
    else:
        checkout.mkdir()
        (checkout / "notes.txt").write_bytes(SECRET)
        why = "Directory not empty"
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "show", "mlp:1")
    assert (rc, out) == (2, "")
    assert err == (
        f"dlstack models: error: {checkout}: cannot put the checkout of mlp:1 there ({why}); "
        "move that path away and retry\n"
    )
    assert snapshot(world.tmp) == before  # the temp checkout beside it was removed


@pytest.mark.parametrize("kind", ["fifo", "link-out", "directory"])
def test_an_index_that_is_not_a_regular_file_is_reported(
    world: World, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    _registered(world)
    world.index.unlink()
    if kind == "fifo":
        os.mkfifo(world.index)
        problem = f"'index.json' is a FIFO; {ONLY_REGULAR}"
    elif kind == "link-out":
        world.index.symlink_to(world.outside / "secret")
        problem = (
            f"'index.json' leaves the registry directory through a symlink; {FIX} (copy the file in, don't link it)"
        )
    else:
        world.index.mkdir()
        problem = "'index.json' is a directory; give a regular file"
    before = snapshot(world.tmp)
    rc, out, err = run(capsys, "models", "verify")
    assert (rc, out) == (1, "")
    assert (
        err == f"CORRUPT {world.reg}: {problem}\n1 problem(s) in {world.reg}; restore the named files or re-register\n"
    )
    rc, out, err = run(capsys, "models", "show", "mlp:1")
    assert (rc, out, err) == (2, "", f"dlstack models: error: {world.reg}: {problem}\n")
    assert snapshot(world.tmp) == before
