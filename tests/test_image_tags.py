"""Only the serving code is in the image: a tooling change keeps every image tag, a server change moves them all.

Each case renders the dev stack from its own copy of the working tree (a subprocess, so the copy's
files are the ones hashed), then compares the image tag of every model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, git, stack_models_registry

pytestmark = pytest.mark.xdist_group("stack-render")

TOOLING_FILES = [
    "services/registry/cli.py",
    "services/datasets.py",
    "services/packaging.py",
    "services/example.py",
    "stacks/cli.py",
]
SERVING_FILES = ["services/serving/server/app.py", "services/serving/runtimes/base.py"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return stack_models_registry(tmp_path_factory.mktemp("tags-registry"))


def _copy_tree(dest: Path) -> Path:
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _tags(tree: Path, registry: Any) -> dict[str, str]:
    out = tree / "render-out"
    env = {**os.environ, "DLSTACK_REGISTRY": str(registry.root), "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "stacks.cli", "render", "--stack", "dev", "--out", str(out)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    models = json.loads((out / "index.json").read_text())["outputs"]["models"]
    tags = {name: m["image"] for name, m in models.items()}
    assert set(tags) == {"mnist-mlp", "tiny-cnn"}
    return tags


def _touch(tree: Path, rel: str) -> None:
    f = tree / rel
    assert f.is_file(), rel  # a renamed file must not make this test pass vacuously
    f.write_text(f.read_text() + "\n# an edit that changes the file's bytes\n")


def test_tooling_change_keeps_every_tag_and_server_change_moves_every_tag(tmp_path: Path, registry: Any) -> None:
    base_tree = _copy_tree(tmp_path / "base")
    base = _tags(base_tree, registry)

    tooling_tree = shutil.copytree(base_tree, tmp_path / "tooling", ignore=shutil.ignore_patterns("render-out"))
    for rel in TOOLING_FILES:
        _touch(tooling_tree, rel)
    assert _tags(tooling_tree, registry) == base

    for i, rel in enumerate(SERVING_FILES):
        tree = shutil.copytree(base_tree, tmp_path / f"serving{i}", ignore=shutil.ignore_patterns("render-out"))
        _touch(tree, rel)
        moved = _tags(tree, registry)
        assert all(moved[name] != base[name] for name in base), (rel, base, moved)
