"""The README's registry walkthrough, run as written in a fresh clone (the block between the
``walkthrough:begin``/``walkthrough:end`` markers), after ``make example`` as the README says."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import ROOT, git

pytestmark = [pytest.mark.tool("git-lfs"), pytest.mark.timeout(900)]

BLOCK = re.compile(r"<!-- walkthrough:begin -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", re.S)


def walkthrough() -> str:
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md must hold exactly one walkthrough block"
    return str(found[0])


def test_readme_walkthrough_runs_top_to_bottom_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone), env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    git(clone, "lfs", "install", "--local")
    (clone / ".venv").symlink_to(ROOT / ".venv")  # the set-up line's .venv; -o below keeps make from rebuilding it
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSTACK_")}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"  # what `. .venv/bin/activate` does
    env["VIRTUAL_ENV"] = str(ROOT / ".venv")
    env["PYTHONPATH"] = str(clone)  # the clone's code and stack files, not the editable install's checkout

    def run(cmd: list[str]) -> str:
        res = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=800, check=False)
        assert res.returncode == 0, f"{cmd[:3]} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        return res.stdout

    run(["make", "-o", ".venv/bin/.installed", "example"])
    out = run(["bash", "-c", walkthrough()])

    yaml = YAML(typ="safe")
    prod = {m["name"]: m for m in yaml.load((clone / "Pulumi.prod.yaml").read_text())["config"]["dlstack:models"]}
    dev = {m["name"]: m for m in yaml.load((clone / "Pulumi.dev.yaml").read_text())["config"]["dlstack:models"]}
    assert dev["mnist-mlp"]["model"] == "mnist-mlp:2"
    assert prod["mnist-mlp"]["model"] == "mnist-mlp:1", "the rollback restores what prod ran before the promotion"
    records = yaml.load((clone / "stacks" / "promotions.yaml").read_text())
    assert [(r["action"], r["model"]) for r in records["promotions"]] == [
        ("promote", "mnist-mlp"),
        ("rollback", "mnist-mlp"),
    ], records
    assert "| field | old | new |" in out, "render-diff printed its markdown"
    champion = json.loads(run(["dlstack", "models", "show", "mnist-mlp@champion", "--json"]))
    assert str(champion["version"]) == "2" and champion["metrics"] == {"accuracy": 0.981}, champion
