"""``dlstack package``: signature inference per framework, CLI errors, overwrite rules, and the example models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.packaging import package_model, parse_datatype, parse_shape, parse_tensor
from services.serving.artifact import Datatype, TensorSpec, load_spec, read_spec
from services.serving.errors import UserError
from stacks.cli import main
from tests.conftest import ROOT, make_torch_mlp_artifact
from tests.test_runtimes import TF_GROUP, load, rand, save_keras, save_onnx, save_savedmodel, save_torch_export


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["package", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def sig(spec: Any, side: str) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype.value, list(t.shape)) for t in getattr(spec.signature, side)]


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript MLP 8 -> 16 -> 3 (the file only; its model.yaml is ignored)."""
    return make_torch_mlp_artifact(tmp_path_factory.mktemp("ts"), sizes=(8, 16, 3)) / "model.pt"


# -- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dims"),
    [("-1x784", (-1, 784)), ("-1,3,64,64", (-1, 3, 64, 64)), ("[-1, 10]", (-1, 10)), ("5", (5,))],
)
def test_parse_shape(text: str, dims: tuple[int, ...]) -> None:
    assert parse_shape(text) == dims


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1xabc", "'abc' is not an integer dim"),
        ("-1x0", "dim 0 is invalid"),
        ("-2,4", "dim -2 is invalid"),
        ("", "empty"),
    ],
)
def test_parse_shape_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_shape(text)


def test_parse_tensor_and_datatypes() -> None:
    assert parse_tensor("serving_default_x:0:int64:-1x2") == TensorSpec(
        name="serving_default_x:0",
        datatype=Datatype.INT64,
        shape=(-1, 2),  # the name keeps its own ':'
    )
    assert parse_datatype("fp16") is Datatype.FP16
    assert parse_datatype("float32") is Datatype.FP32  # numpy names are accepted too
    with pytest.raises(UserError, match="expected NAME:DTYPE:SHAPE"):
        parse_tensor("input-1x8")


# -- CLI error messages (exit 2, one line, no traceback) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "input:FP32:-1by8"], r"--input 'input:FP32:-1by8': shape '-1by8': '-1by8' is not an integer dim"),
        (["--input", "input:FLOAT42:-1x8"], r"datatype 'FLOAT42' is not a datatype; use one of BOOL, .*FP32, .*BYTES"),
        (["--framework", "caffe"], r"framework 'caffe' is unknown; use one of pytorch, keras, tensorflow, onnx"),
        (["--name", "Bad_Name"], r"--name 'Bad_Name' is not a DNS-1123 label"),
        ([], r"TorchScript does not record input dtypes or shapes; give one --input NAME:DTYPE:SHAPE"),
        (["--input", "input:FP32:-1x9"], r"a trial forward pass .* failed .* check the --input dtypes and shapes"),
        (["--max-batch-size", "0"], r"serving: max_batch_size: Input should be greater than or equal to 1"),
    ],
    ids=[
        "bad-shape",
        "unknown-dtype",
        "unknown-framework",
        "bad-name",
        "torchscript-no-input",
        "wrong-input",
        "serving",
    ],
)
def test_cli_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, torchscript: Path, args: list[str], message: str
) -> None:
    defaults = [f for flag, v in (("--name", "mlp"), ("--framework", "pytorch")) if flag not in args for f in (flag, v)]
    code, _, err = cli(capsys, str(torchscript), *defaults, *args, "--out", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("dlstack package: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(
        capsys, str(tmp_path / "nope.onnx"), "--name", "m", "--framework", "onnx", "--out", str(tmp_path)
    )
    assert code == 2
    assert f"model file '{tmp_path / 'nope.onnx'}' does not exist" in err


def test_cli_wrong_kind_of_file_for_framework(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, torchscript: Path
) -> None:
    code, _, err = cli(
        capsys, str(torchscript), "--name", "m", "--framework", "tensorflow", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "must be a SavedModel directory holding saved_model.pb" in err
    code, _, err = cli(capsys, str(torchscript), "--name", "m", "--framework", "keras", "--out", str(tmp_path / "o"))
    assert code == 2 and "a Keras 3 model must be a .keras file" in err


# -- packaging per framework --------------------------------------------------------------------------------------


def test_torchscript_outputs_are_measured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, torchscript: Path
) -> None:
    out = tmp_path / "art"
    code, stdout, _ = cli(
        capsys, str(torchscript), "--name", "mlp", "--framework", "pytorch", "--version", "3",
        "--input", "input:FP32:-1x8", "--max-batch-size", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stdout
    spec = load_spec(out)  # hashes verified
    assert (spec.name, spec.version, spec.framework.value) == ("mlp", "3", "pytorch")
    assert [f.path for f in spec.files] == ["model.pt"]
    assert (out / "model.pt").read_bytes() == torchscript.read_bytes()
    assert sig(spec, "inputs") == [("input", "FP32", [-1, 8])]
    assert sig(spec, "outputs") == [("output", "FP32", [-1, 3])]  # batch dim follows the input, width is the model's
    assert spec.serving.max_batch_size == 4
    assert spec.sha256 in stdout
    assert oct((out / "model.yaml").stat().st_mode & 0o777) == "0o644"  # readable by a non-root server
    assert oct(out.stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize(("shape", "rows"), [("-1x8", 8), ("1x8", 1)])
def test_no_serving_flags_leave_batching_to_the_signature(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, torchscript: Path, shape: str, rows: int
) -> None:
    """Without --max-batch-size model.yaml leaves it unset: auto = 8 rows for a variable batch dim, else 1 (off)."""
    out = tmp_path / "art"
    code, stdout, _ = cli(
        capsys, str(torchscript), "--name", "mlp", "--framework", "pytorch",
        "--input", f"input:FP32:{shape}", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stdout
    spec = load_spec(out)
    assert spec.serving.max_batch_size is None and "max_batch_size" not in (out / "model.yaml").read_text()
    assert spec.max_batch_size == rows


def test_torch_export_signature_is_inferred(tmp_path: Path) -> None:
    save_torch_export(tmp_path / "m.pt2")
    spec = package_model(tmp_path / "m.pt2", name="heads", framework="pytorch", out=tmp_path / "a")
    assert [f.path for f in spec.files] == ["model.pt2"]
    assert sig(spec, "inputs") == [("features", "FP32", [-1, 4]), ("scale", "FP32", [-1, 1])]  # forward arg names
    assert sig(spec, "outputs") == [("logits", "FP32", [-1, 3]), ("total", "FP32", [-1, 1])]  # the dict's keys


def test_fixed_batch_dim_is_kept_and_warned(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save_torch_export(tmp_path / "m.pt2", dynamic=False)
    code, _, err = cli(
        capsys, str(tmp_path / "m.pt2"), "--name", "h", "--framework", "pytorch", "--out", str(tmp_path / "a")
    )
    assert code == 0
    assert sig(read_spec(tmp_path / "a"), "inputs")[0] == ("features", "FP32", [2, 4])
    assert "warning: input 'features' has a fixed batch dim 2" in err


def test_onnx_signature_is_inferred_and_served_by_its_runtime(tmp_path: Path) -> None:
    save_onnx(tmp_path / "exported.onnx")
    spec = package_model(tmp_path / "exported.onnx", name="tiny", framework="onnx", out=tmp_path / "a")
    assert sig(spec, "inputs") == [("x", "FP32", [-1, 6])]  # dim_param "batch" -> -1
    assert sig(spec, "outputs") == [("y", "FP32", [-1, 2])]
    assert load(tmp_path / "a").predict({"x": rand(3, 6)})["y"].shape == (3, 2)


@TF_GROUP
def test_keras_signature_is_inferred(tmp_path: Path) -> None:
    save_keras(tmp_path / "k.keras")
    spec = package_model(tmp_path / "k.keras", name="k", framework="keras", out=tmp_path / "a")
    assert [f.path for f in spec.files] == ["model.keras"]
    assert spec.serving.keras_backend == "torch"
    assert sig(spec, "inputs") == [("a", "FP32", [-1, 5]), ("b", "FP32", [-1, 2])]
    assert sig(spec, "outputs") == [("p", "FP32", [-1, 3]), ("q", "FP32", [-1, 1])]


@TF_GROUP
def test_savedmodel_directory_is_copied_hashed_and_inferred(tmp_path: Path) -> None:
    save_savedmodel(tmp_path / "sm")
    spec = package_model(tmp_path / "sm", name="tf", framework="tensorflow", out=tmp_path / "a")
    assert [f.path for f in spec.files] == ["saved_model"]
    assert (tmp_path / "a" / "saved_model" / "saved_model.pb").is_file()
    assert sig(spec, "inputs") == [("x", "FP32", [-1, 3])]
    assert sig(spec, "outputs") == [("n", "FP32", [-1, 1]), ("y", "FP32", [-1, 2])]  # sorted by name
    # a changed variable file deep inside the directory is caught by the tree hash
    var = next((tmp_path / "a" / "saved_model" / "variables").glob("variables.data-*"))
    data = bytearray(var.read_bytes())
    data[-1] ^= 0xFF
    var.write_bytes(bytes(data))
    with pytest.raises(UserError, match="file 'saved_model' is corrupted or was changed"):
        load_spec(tmp_path / "a")


def test_given_output_overrides_and_is_verified_against_the_model(tmp_path: Path, torchscript: Path) -> None:
    ins = [parse_tensor("input:FP32:-1x8")]
    with pytest.raises(UserError, match=r"output 'scores' has shape \[1, 3\] on a warm-up batch but model.yaml"):
        package_model(torchscript, name="m", framework="pytorch", out=tmp_path / "a", inputs=ins,
                      outputs=[parse_tensor("scores:FP32:-1x4")])  # fmt: skip
    assert not (tmp_path / "a").exists()
    spec = package_model(torchscript, name="m", framework="pytorch", out=tmp_path / "a", inputs=ins,
                         outputs=[parse_tensor("scores:FP32:-1x3")])  # fmt: skip
    assert sig(spec, "outputs") == [("scores", "FP32", [-1, 3])]


# -- overwrite rules ----------------------------------------------------------------------------------------------


def test_overwrite_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path, torchscript: Path) -> None:
    def pkg(name: str, out: Path, *extra: str) -> tuple[int, str]:
        code, _, err = cli(capsys, str(torchscript), "--name", name, "--framework", "pytorch",
                           "--input", "input:FP32:-1x8", "--out", str(out), *extra)  # fmt: skip
        return code, err

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    for force in ((), ("--force",)):  # --force replaces a previous artifact's files, never a user's
        code, err = pkg("mlp", other, *force)
        assert code == 2 and err == (
            f"dlstack package: error: --out {other} is not empty and holds no previous artifact; "
            "choose a new or empty directory\n"
        )
        assert (other / "todo.txt").read_text() == "keep me"

    art = tmp_path / "art"
    assert pkg("mlp", art)[0] == 0
    first = read_spec(art)
    assert pkg("mlp", art, "--version", "2")[0] == 0  # same name: re-packaging replaces it
    assert read_spec(art).version == "2" and read_spec(art).files == first.files
    code, err = pkg("other", art)
    assert code == 2 and "holds the artifact 'mlp', not 'other'" in err
    assert read_spec(art).name == "mlp"
    assert pkg("other", art, "--force")[0] == 0
    assert read_spec(art).name == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "notes"]  # no temp dirs left behind


def test_out_containing_the_model_is_refused(tmp_path: Path, torchscript: Path) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(torchscript.read_bytes())
    with pytest.raises(UserError, match="contains the model file"):
        package_model(src, name="m", framework="pytorch", out=tmp_path, inputs=[parse_tensor("input:FP32:-1x8")],
                      force=True)  # fmt: skip
    assert src.is_file()


# -- example models -------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("example")
def test_example_models_are_deterministic_and_match_the_contract(tmp_path: Path) -> None:
    """`python -m services.example` and build() from a process that already used TorchScript, with other hash
    seeds, must write byte-identical models."""
    from services.example import build

    make_torch_mlp_artifact(tmp_path / "scripted-before")  # bumps this process's TorchScript class numbering
    cnn = build(tmp_path / "cnn-here", "tiny-cnn")
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    subprocess.run(
        [sys.executable, "-m", "services.example", "--out", str(tmp_path / "cnn-there"), "--model", "tiny-cnn"],
        cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    assert load_spec(tmp_path / "cnn-there").sha256 == cnn.sha256
    assert (cnn.name, sig(cnn, "inputs"), sig(cnn, "outputs")) == (
        "tiny-cnn",
        [("input", "FP32", [-1, 3, 64, 64])],
        [("output", "FP32", [-1, 10])],
    )

    mlp = build(tmp_path / "mlp", "mnist-mlp")
    assert (mlp.name, sig(mlp, "inputs"), sig(mlp, "outputs")) == (
        "mnist-mlp",
        [("input", "FP32", [-1, 784])],
        [("output", "FP32", [-1, 10])],
    )
    x = rand(2, 784)
    y = load(tmp_path / "mlp").predict({"input": x})["output"]
    # the file really is 784-512-512-10 with the seeded weights
    import torch

    from services.example import mnist_mlp

    with torch.inference_mode():
        np.testing.assert_allclose(y, mnist_mlp().eval()(torch.from_numpy(x)).numpy(), atol=1e-5)
