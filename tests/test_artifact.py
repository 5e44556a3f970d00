"""model.yaml validation, hashing and atomic writes (services/serving/artifact.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from services.serving.artifact import (
    MODEL_YAML,
    ArtifactError,
    Datatype,
    TensorSpec,
    file_sha256,
    load_spec,
    read_spec,
    tree_sha256,
    write_spec,
)
from tests.conftest import make_torch_mlp_artifact

VALID = """\
name: mlp
version: "2"
framework: pytorch
files: [{path: model.pt, sha256: SHA}]
signature:
  inputs: [{name: input, datatype: FP32, shape: [-1, 8]}]
  outputs: [{name: output, datatype: FP32, shape: [-1, 3]}]
"""


def write_yaml(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / MODEL_YAML).write_text(text)
    return d


def test_hand_written_yaml_is_read_with_defaults(tmp_path: Path) -> None:
    spec = read_spec(write_yaml(tmp_path, VALID))
    assert (spec.name, spec.version, spec.framework.value) == ("mlp", "2", "pytorch")
    assert spec.signature.inputs[0] == TensorSpec(name="input", datatype=Datatype.FP32, shape=(-1, 8))
    assert spec.serving.keras_backend == "torch"
    assert spec.serving.max_batch_size is None and spec.max_batch_size == 8  # unset = auto: variable batch dim


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("name: mlp", "name: My_Model"), "name: 'My_Model' is not a DNS-1123 label"),
        (("framework: pytorch", "framework: caffe"), "framework: Input should be 'pytorch', 'keras', 'tensorflow'"),
        (("shape: [-1, 8]", "shape: [-1, 0]"), r"signature.inputs\[0\].shape: .*dims must be positive or -1"),
        (("datatype: FP32, shape: [-1, 8]", "datatype: FLOAT, shape: [-1, 8]"), r"signature.inputs\[0\].datatype"),
        (("name: output", "name: o"), None),  # valid edit: control case
        (('version: "2"', 'version: "2"\nmodel_dir: x'), "model_dir: Extra inputs are not permitted"),
        (
            ("outputs: [{name: output", "outputs: [{name: output, datatype: FP32, shape: [1]}, {name: output"),
            r"signature: .*duplicate names: \['output'\]",
        ),
        (("outputs: [{name: output, datatype: FP32, shape: [-1, 3]}]", "outputs: []"), "must list at least one"),
    ],
    ids=["name", "framework", "zero-dim", "dtype", "control", "unknown-key", "duplicate", "no-outputs"],
)
def test_invalid_model_yaml_names_the_field(tmp_path: Path, edit: tuple[str, str], message: str | None) -> None:
    assert edit[0] in VALID
    d = write_yaml(tmp_path, VALID.replace(*edit))
    if message is None:
        read_spec(d)
        return
    with pytest.raises(ArtifactError, match=message) as err:
        read_spec(d)
    assert str(d / MODEL_YAML) in str(err.value)


def test_missing_or_broken_model_yaml(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no model.yaml; create the artifact with `dlstack package"):
        read_spec(tmp_path)
    write_yaml(tmp_path, "name: [unclosed")
    with pytest.raises(ArtifactError, match="not valid YAML"):
        read_spec(tmp_path)
    write_yaml(tmp_path, "- a list")
    with pytest.raises(ArtifactError, match="expected a mapping"):
        read_spec(tmp_path)


def test_load_spec_names_the_corrupted_or_missing_file(tmp_path: Path) -> None:
    d = make_torch_mlp_artifact(tmp_path / "a")
    load_spec(d)  # intact: verifies
    original = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArtifactError, match=r"file 'model.pt' is corrupted or was changed: sha256 [0-9a-f]{64} !="):
        load_spec(d)
    (d / "model.pt").unlink()
    with pytest.raises(ArtifactError, match=r"file 'model.pt' listed in model.yaml is missing"):
        load_spec(d)


def test_tree_sha256_covers_names_and_contents(tmp_path: Path) -> None:
    d = tmp_path / "sm"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph")
    (d / "variables" / "v.data").write_bytes(b"weights")
    first = tree_sha256(d)
    assert first != file_sha256(d / "saved_model.pb")
    (d / "variables" / "v.data").write_bytes(b"weightz")
    second = tree_sha256(d)
    assert second != first
    (d / "variables" / "v.data").rename(d / "variables" / "w.data")  # same bytes, other name
    assert tree_sha256(d) not in (first, second)


def test_write_spec_round_trips_atomically_and_readably(tmp_path: Path) -> None:
    d = make_torch_mlp_artifact(tmp_path / "a", max_batch_size=8)
    spec = read_spec(d)
    mode = stat.S_IMODE((d / MODEL_YAML).stat().st_mode)
    assert mode == 0o644, oct(mode)  # the image's non-root server user must read it
    text = (d / MODEL_YAML).read_text()
    assert spec.files[0].sha256 in text.splitlines()[1]  # the digest stays on its entry's line
    write_spec(d, spec.model_copy(update={"version": "9"}))
    assert read_spec(d).version == "9" and read_spec(d).serving.max_batch_size == 8
    assert sorted(os.listdir(d)) == ["model.pt", "model.yaml"]  # no temp file left


def test_model_sha256_follows_file_digests(tmp_path: Path) -> None:
    a = read_spec(make_torch_mlp_artifact(tmp_path / "a", seed=0))
    b = read_spec(make_torch_mlp_artifact(tmp_path / "b", seed=0))
    c = read_spec(make_torch_mlp_artifact(tmp_path / "c", seed=1))
    assert a.sha256 == b.sha256 != c.sha256
    assert len(a.sha256) == 64


@pytest.mark.parametrize("dt", list(Datatype))
def test_datatype_numpy_round_trip(dt: Datatype) -> None:
    assert Datatype.from_numpy(dt.numpy) is dt
    assert Datatype.from_numpy(np.zeros(1, dtype=dt.numpy).dtype) is dt


def test_datatype_rejects_unmapped_numpy_types() -> None:
    assert Datatype.from_numpy(np.dtype("<U3")) is Datatype.BYTES
    with pytest.raises(ArtifactError, match="complex64 has no V2 datatype"):
        Datatype.from_numpy(np.complex64)


def test_tensor_spec_matches_variable_dims() -> None:
    t = TensorSpec(name="x", datatype=Datatype.FP32, shape=(-1, 3))
    assert t.matches((5, 3)) and t.matches((1, 3))
    assert not t.matches((5, 4)) and not t.matches((5, 3, 1))


def test_serve_refuses_a_tampered_artifact_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dlstack serve` re-hashes before starting gunicorn: a changed file is exit 2 with its name, not a 500 later."""
    from stacks.cli import main

    d = make_torch_mlp_artifact(tmp_path / "a")
    with (d / "model.pt").open("ab") as fh:
        fh.write(b"\0")
    assert main(["serve", str(d), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlstack serve: error: ") and "file 'model.pt' is corrupted or was changed" in err
