"""services.serving.atomic: the one temp-file + fsync + rename writer every command uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.serving.atomic import atomic_write
from services.serving.errors import UserError


def test_new_file_is_world_readable_and_complete(tmp_path: Path) -> None:
    p = atomic_write(tmp_path / "sub" / "a.yaml", "x: 1\n")
    assert p.read_text() == "x: 1\n"
    assert p.stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(p.parent)) == ["a.yaml"]  # no temp file left behind


def test_replacing_keeps_the_old_mode_unless_told(tmp_path: Path) -> None:
    p = tmp_path / "secret.yaml"
    p.write_text("old")
    p.chmod(0o600)
    atomic_write(p, b"new")
    assert (p.read_bytes(), p.stat().st_mode & 0o777) == (b"new", 0o600)
    atomic_write(p, "newer", mode=0o640)
    assert p.stat().st_mode & 0o777 == 0o640


def test_failed_validation_leaves_the_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "Pulumi.dev.yaml"
    p.write_text("# keep me\nconfig: {}\n")
    seen: list[str] = []

    def reject(tmp: Path) -> None:
        seen.append(tmp.read_text())
        raise UserError("does not validate")

    with pytest.raises(UserError, match="does not validate"):
        atomic_write(p, "broken", validate=reject)
    assert seen == ["broken"]  # the validator saw the new content, in a temp file
    assert p.read_text() == "# keep me\nconfig: {}\n"
    assert sorted(os.listdir(tmp_path)) == ["Pulumi.dev.yaml"]
