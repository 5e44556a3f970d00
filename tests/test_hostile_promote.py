"""Promote and rollback under careless and hostile input, and under SIGKILL: real `dlstack` subprocesses.

Each refusal is one line and exit code 2, with no traceback, and no file outside the expected
outputs changes (the whole tmp tree is compared before and after, .git aside). A killed promotion
leaves (old stack file, old history) or (new, new) once the next command has run its recovery,
and no temp file anywhere.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stacks.promote import history
from stacks.yamledit import PAUSE_ENV, PAUSE_MARKER
from tests.conftest import ROOT, git
from tests.test_promote import DIGEST1, DIGEST2, DIGEST3, PROD, make_env, write_outputs

PYTHON = ROOT / ".venv" / "bin" / "python"
PY = str(PYTHON if PYTHON.exists() else sys.executable)
NEW_PROD = PROD.replace("model: mnist-mlp:1 ", "model: mnist-mlp:2 ").replace("1" * 64, "2" * 64)
STEPS = ["temps-written", "journal-written", "replaced Pulumi.prod.yaml", "replaced promotions.yaml", "journal-removed"]

Env = dict[str, Path]


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if ".git" in rel.parts or not p.is_file() or p.is_symlink():
            continue
        out[str(rel)] = p.read_bytes()
    return out


def changed(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def args(env: Env, *extra: str, cmd: str = "promote", model: str = "mnist-mlp") -> list[str]:
    base = [PY, "-m", "stacks.cli", cmd, "--stack-dir", str(env["repo"]), "--no-render", "--model", model]
    if cmd == "promote":
        base += ["--registry", str(env["registry"]), "--outputs", str(env["outputs"])]
    else:
        base += ["--env", "prod"]
    return [*base, *extra]


def run(env: Env, *extra: str, cmd: str = "promote", model: str = "mnist-mlp") -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    return subprocess.run(
        args(env, *extra, cmd=cmd, model=model), cwd=ROOT, capture_output=True, text=True, timeout=120, env=e
    )


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".dlstack-tmp-" in p.name or p.name.startswith(".dlstack-journal")]


def state(env: Env) -> str:
    """'old' (prod untouched, no record) or 'new' (prod promoted, one record); anything else fails."""
    prod = (env["repo"] / "Pulumi.prod.yaml").read_text()
    records = history(env["history"]) if env["history"].exists() else []
    if prod == PROD and not records:
        return "old"
    if prod == NEW_PROD and [(r["old"], r["new"]) for r in records] == [("mnist-mlp:1", "mnist-mlp:2")]:
        return "new"
    raise AssertionError(f"a mix: prod pins {'v2' if 'mnist-mlp:2' in prod else 'v1'}, history {records}")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = make_env(tmp_path)
    write_outputs(e["outputs"], {"mnist-mlp": ("2", DIGEST2), "other": ("1", DIGEST1)})
    return e


# ---- refusals: one line, exit 2, nothing changed ---------------------------------------------------------

HIST = "repo/stacks/promotions.yaml"
HEADER = "# Promotion history\npromotions:\n"
GOOD = (
    "  - action: promote\n    from: dev\n    to: prod\n    model: mnist-mlp\n    old: mnist-mlp:1\n"
    "    new: mnist-mlp:2\n    old_digest:\n    digest:\n"
)


def put(rel: str, data: str | bytes, commit: bool = False) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        p = env["repo"].parent / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        if commit:
            git(env["repo"], "commit", "-qam", "edit")

    return setup


def outputs(data: str | bytes) -> Callable[[Env], None]:
    return put("dev-outputs.json", data)


def huge_outputs(env: Env) -> None:
    with env["outputs"].open("r+b") as fh:  # sparse: 17 MiB on paper, nothing on disk
        fh.truncate(17 * 2**20)


def prod_missing(env: Env) -> None:
    (env["repo"] / "Pulumi.prod.yaml").unlink()


def escaping_journal(env: Env) -> None:
    bad = {"target": str(env["repo"] / "Pulumi.prod.yaml"), "temp": "/etc/passwd", "sha256": "00"}
    (env["repo"] / ".dlstack-journal").write_text(json.dumps({"dlstack_journal": 1, "files": [bad]}))


ANCHORED = PROD.replace("model: mnist-mlp:1          # promoted from dev", "model: &pin mnist-mlp:1").replace(
    "model: other:1", "model: *pin"
)
MERGED = PROD.replace("    - name: mnist-mlp\n", "    - &base\n      name: mnist-mlp\n").replace(
    "    - name: other\n      model: other:1\n      framework: pytorch\n",
    "    - <<: *base\n      name: other\n",
)
HISTORY_FIX = "restore it from git, or fix the record by hand"

CASES: dict[str, tuple[Callable[[Env], None], str, str]] = {
    # name: (setup, command, the one line after "dlstack CMD: error: ")
    "history-not-yaml": (
        put(HIST, "promotions: [\n  - {a: 1\n"),
        "promote",
        "{repo}/stacks/promotions.yaml: not valid YAML at line 2, column 3: expected the node content, but found "
        "'-'; fix the file (or restore it from git)",
    ),
    "history-not-a-mapping": (
        put(HIST, "- just\n- a list\n"),
        "promote",
        f"{{repo}}/stacks/promotions.yaml: expected a mapping with a `promotions:` list; {HISTORY_FIX}",
    ),
    "history-record-wrong-type": (
        put(HIST, HEADER + "  - 42\n"),
        "promote",
        f"{{repo}}/stacks/promotions.yaml: promotions[0] is not a mapping; {HISTORY_FIX}",
    ),
    "history-old-with-newline": (
        put(HIST, HEADER + GOOD.replace("old: mnist-mlp:1", 'old: "mnist-mlp:1\\nevil: 1"')),
        "promote",
        f"{{repo}}/stacks/promotions.yaml: promotions[0].old 'mnist-mlp:1\\nevil: 1' is not a pinned "
        f"NAME:VERSION; {HISTORY_FIX}",
    ),
    "history-undoes-not-int": (
        put(HIST, HEADER + GOOD + GOOD.replace("promote", "rollback") + "    undoes: first\n"),
        "rollback",
        f"{{repo}}/stacks/promotions.yaml: promotions[1].undoes is 'first', expected the index of an earlier "
        f"promotion (0..0); {HISTORY_FIX}",
    ),
    "history-digest-not-digest": (
        put(HIST, HEADER + GOOD.replace("    digest:\n", "    digest: [1, 2]\n")),
        "rollback",
        f"{{repo}}/stacks/promotions.yaml: promotions[0].digest [1, 2] is not sha256: and 64 hex digits; {HISTORY_FIX}",
    ),
    "history-not-utf8": (
        put(HIST, b"promotions: []\n# caf\xe9\n"),
        "rollback",
        "{repo}/stacks/promotions.yaml: not UTF-8 (byte 20 is 0xe9); save it as UTF-8",
    ),
    "history-alias-bomb": (
        put(
            HIST,
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
            + "promotions: []\n",
        ),
        "promote",
        "{repo}/stacks/promotions.yaml: its aliases expand to more than 100000 nodes (an alias bomb?); "
        "write the values out",
    ),
    "history-is-a-directory": (
        lambda env: (env["repo"] / "stacks" / "promotions.yaml").mkdir(parents=True),
        "promote",
        "{repo}/stacks/promotions.yaml: not a regular file; pass the promotion history file as --history",
    ),
    "outputs-not-json": (
        outputs("{not json"),
        "promote",
        "--outputs {tmp}/dev-outputs.json: unreadable (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); write it with `pulumi stack output --json -s dev`",
    ),
    "outputs-models-a-list": (
        outputs('{"models": ["mnist-mlp"]}'),
        "promote",
        "stack outputs of dev: `models` is a JSON array, expected an object of model name -> {version, image, ...}; "
        "write it with `pulumi stack output --json -s dev`",
    ),
    "outputs-version-wrong-type": (
        outputs('{"models": {"mnist-mlp": {"version": true}}}'),
        "promote",
        "stack outputs of dev: models.mnist-mlp.version is a JSON boolean, expected a string; "
        "write them with `pulumi stack output --json -s dev`",
    ),
    "outputs-digest-injection": (
        outputs('{"models": {"mnist-mlp": {"version": "2", "digest": "sha256:' + "2" * 64 + '\\nevil: 1"}}}'),
        "promote",
        f"stack outputs of dev: models.mnist-mlp.digest 'sha256:{'2' * 64}\\nevil: 1' is not sha256: and 64 "
        "lowercase hex digits; write them with `pulumi stack output --json -s dev`",
    ),
    "outputs-huge": (
        huge_outputs,
        "promote",
        "--outputs {tmp}/dev-outputs.json: 17825792 bytes, more than the 16 MiB stack outputs can be; "
        "write it with `pulumi stack output --json -s dev`",
    ),
    "outputs-deeply-nested": (
        outputs("[" * 100_000 + "]" * 100_000),
        "promote",
        "--outputs {tmp}/dev-outputs.json: unreadable (nested too deeply); "
        "write it with `pulumi stack output --json -s dev`",
    ),
    "outputs-not-utf8": (
        outputs(b'{"models": "\xff"}'),
        "promote",
        "--outputs {tmp}/dev-outputs.json: unreadable ('utf-8' codec can't decode byte 0xff in position 12: "
        "invalid start byte); write it with `pulumi stack output --json -s dev`",
    ),
    "anchor-shared-by-two-entries": (
        put("repo/Pulumi.prod.yaml", ANCHORED, commit=True),
        "promote",
        "Pulumi.prod.yaml: config.dlstack:models[0].model is inside the YAML anchor &pin (line 18), which an "
        "alias also uses: editing it would change that place too; write the value out without the anchor, "
        "commit, then retry",
    ),
    "merge-key-base-entry": (
        put("repo/Pulumi.prod.yaml", MERGED, commit=True),
        "promote",
        "Pulumi.prod.yaml: config.dlstack:models[0].model is inside the YAML anchor &base (line 17), which an "
        "alias also uses: editing it would change that place too; write the value out without the anchor, "
        "commit, then retry",
    ),
    "uncommitted-prod": (
        put("repo/Pulumi.prod.yaml", PROD + "# local edit\n"),
        "promote",
        "Pulumi.prod.yaml has uncommitted changes; commit or stash them first (promotion must be reviewable on its "
        "own), or pass --force",
    ),
    "prod-missing": (
        prod_missing,
        "promote",
        "{repo}/Pulumi.prod.yaml does not exist; run from the repo root or pass --stack-dir",
    ),
    "prod-not-utf8": (
        put("repo/Pulumi.prod.yaml", PROD.encode().replace(b"# the main model", b"# the main mod\xc3l"), True),
        "promote",
        # stacks.config reads the stack file first and says it its way
        "Pulumi.prod.yaml:16: byte 0xc3 at offset 377 is not UTF-8; save the file as UTF-8",
    ),
    "corrupt-journal": (
        put("repo/.dlstack-journal", "{half a jour"),
        "promote",
        "{repo}/.dlstack-journal: an interrupted promotion's journal is unreadable (JSONDecodeError); compare the "
        "stack file and the history with git, fix them, then delete the journal",
    ),
    "journal-escaping-its-directory": (
        escaping_journal,
        "rollback",
        "{repo}/.dlstack-journal: an interrupted promotion's journal names /etc/passwd, which is not a temp file of "
        "{repo}/Pulumi.prod.yaml; delete the journal",
    ),
    "rollback-nothing-to-undo": (
        lambda env: None,
        "rollback",
        "promotions.yaml has no promotion of 'mnist-mlp' to prod left to roll back",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_in_one_line_and_changes_nothing(env: Env, case: str) -> None:
    setup, cmd, message = CASES[case]
    tmp = env["repo"].parent
    setup(env)
    before = snapshot(tmp)
    res = run(env, cmd=cmd)
    assert "Traceback" not in res.stdout + res.stderr
    assert (res.returncode, res.stderr) == (
        2,
        f"dlstack {cmd}: error: {message.replace('{repo}', str(env['repo'])).replace('{tmp}', str(tmp))}\n",
    )
    assert changed(before, snapshot(tmp)) == set()


# ---- anchors: the edited entry is un-aliased, the other keeps its pin --------------------------------------


def test_an_anchor_shared_by_two_entries_changes_neither_other_pin(tmp_path: Path) -> None:
    # mnist-mlp's digest is the anchor &d; other's digest is the alias *d.
    pin = '"sha256:' + "1" * 64 + '"'
    prod = PROD.replace(f"digest: {pin}", f"digest: &d {pin}").replace(
        "      replicas: {min: 2, max: 2}\n", "      replicas: {min: 2, max: 2}\n      image: {digest: *d}\n"
    )
    env = make_env(tmp_path, prod)
    write_outputs(env["outputs"], {"mnist-mlp": ("2", DIGEST2), "other": ("1", DIGEST3)})
    before = snapshot(tmp_path)
    # Promoting the anchor holder would change other's pin through the alias: refused, nothing written.
    res = run(env)
    assert (res.returncode, res.stderr) == (
        2,
        "dlstack promote: error: Pulumi.prod.yaml: config.dlstack:models[0].image.digest is inside the YAML "
        "anchor &d (line 23), which an alias also uses: editing it would change that place too; write the value "
        "out without the anchor, commit, then retry\n",
    )
    assert changed(before, snapshot(tmp_path)) == set()
    # Promoting the alias user un-aliases its own pin only: the anchor holder keeps its bytes and its pin.
    res = run(env, model="other")
    assert res.returncode == 0, res.stderr
    after = (env["repo"] / "Pulumi.prod.yaml").read_text()
    assert after == prod.replace("{digest: *d}", f"{{digest: {DIGEST3}}}")
    assert f"digest: &d {pin}" in after
    assert changed(before, snapshot(tmp_path)) == {"repo/Pulumi.prod.yaml", "repo/stacks/promotions.yaml"}
    (record,) = history(env["history"])
    assert (record["model"], record["old_digest"], record["digest"]) == ("other", DIGEST1, DIGEST3)


# ---- byte form -------------------------------------------------------------------------------------------------

FANCY = (
    "\ufeff%YAML 1.2\n---\n# prod stack: reviewed by humans\nconfig:\n"
    "  dlstack:environment: 'prod'\n"
    '  dlstack:kubernetes: {context: "kind-dlstack", version: "1.31"}\n'
    "  dlstack:images:\n      registry: localhost:5001/dlstack   # odd indentation, kept\n"
    "  dlstack:ingress:\n    domain: >-\n      dlstack.localtest.me\n    replicas: 2\n"
    "  dlstack:logging:\n    elasticsearch: {nodes: 3}\n"
    "  dlstack:models:\n"
    "  # the main model\n"
    "  - name: mnist-mlp\n"
    "    model: 'mnist-mlp:1'    # single-quoted, kept\n"
    "    framework: pytorch\n"
    "    replicas:\n      min: 2\n      max: 4\n"
    "    slo: {error_ratio: 0.001, p99_ms: 100}\n"
    '    image: {digest: "sha256:' + "1" * 64 + '"}  # flow, kept\n'
    "  - name: other\n"
    '    model: "other:1"\n'
    "    framework: pytorch\n"
    "    replicas: {min: 2, max: 2}\n"
    "    slo: {error_ratio: 0.001, p99_ms: 100}\n"
    "...\n"
)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_byte_form_survives_only_the_pinned_scalars_change(tmp_path: Path, eol: str) -> None:
    data = FANCY.replace("\n", eol).encode()
    env = make_env(tmp_path, data)
    write_outputs(env["outputs"], {"mnist-mlp": ("2", DIGEST2)})
    res = run(env)
    assert res.returncode == 0, res.stderr
    expected = data.replace(b"'mnist-mlp:1'", b"'mnist-mlp:2'").replace(b"1" * 64, b"2" * 64)
    assert (env["repo"] / "Pulumi.prod.yaml").read_bytes() == expected
    # rollback restores the very bytes, BOM, CRLF, directive, markers, comments and all
    git(env["repo"], "commit", "-qam", "promote")
    res = run(env, cmd="rollback")
    assert res.returncode == 0, res.stderr
    assert (env["repo"] / "Pulumi.prod.yaml").read_bytes() == data
    assert leftovers(tmp_path) == []


# ---- SIGKILL -------------------------------------------------------------------------------------------------


def kill_at(env: Env, step: str) -> None:
    e = {**os.environ, PAUSE_ENV: "30"}
    proc = subprocess.Popen(args(env), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=e)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == PAUSE_MARKER + step:
            break
    proc.kill()
    proc.wait()
    assert seen and seen[-1].strip() == PAUSE_MARKER + step, "".join(seen)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_leaves_both_old_or_both_new(env: Env, step: str) -> None:
    tmp = env["repo"].parent
    before = snapshot(tmp)
    kill_at(env, step)
    res = run(env, "--dry-run")  # the next command recovers first, whatever it then decides
    assert "Traceback" not in res.stdout + res.stderr
    assert state(env) == ("old" if step == "temps-written" else "new")
    assert leftovers(tmp) == []
    allowed = {"repo/Pulumi.prod.yaml", "repo/stacks/promotions.yaml"}
    assert changed(before, snapshot(tmp)) == (set() if step == "temps-written" else allowed)
    if state(env) == "new":  # and the recovered state is a real one: rollback undoes it
        git(env["repo"], "commit", "-qam", "promote")
        assert run(env, cmd="rollback").returncode == 0
        assert (env["repo"] / "Pulumi.prod.yaml").read_text() == PROD


def test_render_finishes_a_promotion_killed_after_its_commit_point(env: Env) -> None:
    kill_at(env, "replaced Pulumi.prod.yaml")  # prod is new, its history record not yet in place
    repo = env["repo"]
    res = subprocess.run(
        [PY, "-m", "stacks.cli", "render", "--stack", "prod", "--config-file", str(repo / "Pulumi.prod.yaml"),
         "--registry", str(env["registry"]), "--out", str(repo.parent / "render")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "Traceback" not in res.stdout + res.stderr
    assert state(env) == "new", "render completed the promotion before reading prod"
    assert leftovers(repo.parent) == []


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment(env: Env, seed: int) -> None:
    tmp = env["repo"].parent
    proc = subprocess.Popen(args(env), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(random.Random(seed).uniform(0.3, 2.0))
    proc.kill()
    proc.wait()
    res = run(env, "--dry-run")
    assert "Traceback" not in res.stdout + res.stderr
    assert state(env) in ("old", "new")
    assert leftovers(tmp) == []


def test_stale_temp_files_of_a_killed_promotion_are_removed(env: Env) -> None:
    stale = [
        env["repo"] / ".Pulumi.prod.yaml.dlstack-tmp-abc",
        env["repo"] / "stacks" / ".promotions.yaml.dlstack-tmp-x",
    ]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_text("half")
    res = run(env)
    assert res.returncode == 0, res.stderr
    assert state(env) == "new" and leftovers(env["repo"].parent) == []


def test_a_concurrent_promotion_is_refused_while_one_writes(env: Env) -> None:
    e = {**os.environ, PAUSE_ENV: "30"}
    first = subprocess.Popen(args(env), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=e)
    assert first.stderr is not None
    try:
        assert first.stderr.readline().strip() == PAUSE_MARKER + "temps-written"
        second = run(env)
        assert "Traceback" not in second.stdout + second.stderr
        assert (second.returncode, second.stderr) == (
            2,
            f"dlstack promote: error: another dlstack promote, rollback or capacity --write-config is writing in "
            f"{env['repo']}; wait for it to finish, then retry\n",
        )
        roll = run(env, cmd="rollback")
        assert roll.returncode == 2 and "is writing in" in roll.stderr
    finally:
        first.kill()
        first.wait()
    run(env, "--dry-run")
    assert state(env) == "old" and leftovers(env["repo"].parent) == []


# ---- capacity --write-config shares the editor ---------------------------------------------------------


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_capacity_write_config_keeps_the_byte_form(tmp_path: Path, eol: str) -> None:
    from stacks.capacity import Recommendation, write_config

    stack = tmp_path / "Pulumi.prod.yaml"
    data = FANCY.replace("\n", eol).encode()
    stack.write_bytes(data)
    rec = Recommendation(100.0, 0.3, 50.0, 3, 6, 76, "1", "320Mi")
    write_config("prod", "mnist-mlp", rec, stack)
    nl = eol.encode()
    expected = data.replace(
        b"      min: 2" + nl + b"      max: 4" + nl,
        b"      min: 3" + nl + b"      max: 6" + nl + b"      target_cpu_percent: 76" + nl,
    )
    digest_line = b'    image: {digest: "sha256:' + b"1" * 64 + b'"}  # flow, kept' + nl
    expected = expected.replace(digest_line, digest_line + b"    resources: {cpu: '1', memory: 320Mi}" + nl)
    assert stack.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Pulumi.prod.yaml"]  # no temp file, no journal


def test_an_anchor_outside_the_pins_does_not_stop_a_promotion(tmp_path: Path) -> None:
    # Both entries share one SLO through an anchor; promotion edits pins only, so it goes ahead.
    slo = "slo: {error_ratio: 0.001, p99_ms: 100}"
    prod = PROD.replace(f"{slo}  # 99.9 %", "slo: &slo {error_ratio: 0.001, p99_ms: 100}  # 99.9 %").replace(
        f"      {slo}\n", "      slo: *slo\n"
    )
    assert "&slo" in prod and "*slo" in prod
    env = make_env(tmp_path, prod)
    res = run(env)
    assert res.returncode == 0, res.stderr
    after = (env["repo"] / "Pulumi.prod.yaml").read_text()
    assert after == prod.replace("model: mnist-mlp:1 ", "model: mnist-mlp:2 ").replace("1" * 64, "2" * 64)
