"""Each framework runtime loads a real tiny model saved in tmp_path and predicts what the framework itself predicts.

The ``save_*`` builders are shared with test_packaging.py and test_frameworks_served.py. TensorFlow and Keras
(which imports TensorFlow) tests share one xdist group so only one worker pays for the TF import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# `import tensorflow` imports keras too, fixing its backend for the process: a TF test that runs first in a
# worker would otherwise lock Keras models (whose serving.keras_backend defaults to torch) out
os.environ.setdefault("KERAS_BACKEND", "torch")

from services.serving.artifact import (
    ArtifactError,
    FileEntry,
    ModelSpec,
    Serving,
    Signature,
    TensorSpec,
    read_spec,
    tree_sha256,
    write_spec,
)
from services.serving.runtimes import create_runtime
from tests.conftest import make_torch_mlp_artifact

TF_GROUP = pytest.mark.xdist_group("tensorflow")
RNG = np.random.default_rng(7)


# -- model builders (real models, tiny) ---------------------------------------------------------------------------


def _two_input_torch() -> Any:
    import torch

    class TwoHeads(torch.nn.Module):
        """Two inputs (features FP32 [-1, 4], scale FP32 [-1, 1]) -> dict(logits [-1, 3], total [-1, 1])."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.fc(features) * scale
            return {"logits": logits, "total": logits.sum(dim=1, keepdim=True)}

    torch.manual_seed(1)
    return TwoHeads().eval()


def save_torch_export(path: Path, dynamic: bool = True) -> Any:
    """A torch.export program (.pt2) with two inputs and dict outputs; returns the eager module."""
    import torch

    module = _two_input_torch()
    batch = torch.export.Dim("batch")
    shapes = {"features": {0: batch}, "scale": {0: batch}} if dynamic else None
    program = torch.export.export(module, (torch.zeros(2, 4), torch.ones(2, 1)), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return module


def save_onnx(path: Path) -> Any:
    """torch.onnx.export of a small MLP with a dynamic batch dim: input "x" FP32 [-1, 6] -> "y" FP32 [-1, 2]."""
    import torch

    torch.manual_seed(2)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).eval()
    torch.onnx.export(
        module,
        (torch.zeros(1, 6),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,  # the dynamo exporter needs onnxscript, which the server does not ship
    )
    return module


def save_keras(path: Path) -> Any:
    """Keras 3 functional model on the torch backend: inputs a [-1,5], b [-1,2] -> dict(p [-1,3], q [-1,1])."""
    from services.serving.runtimes.keras import import_keras

    keras = import_keras("torch")
    keras.utils.set_random_seed(3)
    a, b = keras.Input((5,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], {"p": keras.layers.Dense(3, name="p")(h), "q": keras.layers.Dense(1, name="q")(h)})
    model.save(str(path))
    return model


def save_savedmodel(path: Path) -> Any:
    """A tf.Module SavedModel: serving_default(x FP32 [-1, 3]) -> {y FP32 [-1, 2], n FP32 [-1, 1]}."""
    import tensorflow as tf

    class Affine(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((3, 2), seed=(4, 5)))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"y": tf.matmul(x, self.w), "n": tf.reduce_sum(x, axis=1, keepdims=True)}

    module = Affine()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return module


def artifact(
    d: Path, framework: str, file: Path, ins: list[tuple[str, str, tuple[int, ...]]], outs: list[Any], **serving: Any
) -> Path:
    """Write model.yaml by hand (no packaging code), so the runtime checks are tested on their own."""
    target = d / file.name
    if file.parent != d:
        d.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    spec = ModelSpec(
        name="m",
        framework=framework,  # type: ignore[arg-type]
        files=(FileEntry(path=target.name, sha256=tree_sha256(target)),),
        signature=Signature(
            inputs=tuple(TensorSpec(name=n, datatype=t, shape=s) for n, t, s in ins),  # type: ignore[arg-type]
            outputs=tuple(TensorSpec(name=n, datatype=t, shape=s) for n, t, s in outs),  # type: ignore[arg-type]
        ),
        serving=Serving(**serving),
    )
    write_spec(d, spec)
    return d


def load(d: Path, threads: int | None = 1) -> Any:
    from services.serving.artifact import load_spec

    rt = create_runtime(load_spec(d), d, threads)
    rt.load()
    return rt


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# -- PyTorch --------------------------------------------------------------------------------------------------------


def test_torchscript_predicts_like_the_module(tmp_path: Path) -> None:
    import torch

    d = make_torch_mlp_artifact(tmp_path / "a", sizes=(8, 16, 3))
    rt = load(d, threads=1)
    assert rt.ready and type(rt).__name__ == "PyTorchRuntime"
    assert torch.get_num_threads() == 1  # threads from the server reach torch
    x = rand(5, 8)
    x.flags.writeable = False  # request bodies arrive as read-only buffers
    got = rt.predict({"input": x})
    with torch.inference_mode():
        want = torch.jit.load(str(d / "model.pt"))(torch.from_numpy(x.copy())).numpy()
    assert set(got) == {"output"} and got["output"].shape == (5, 3)
    np.testing.assert_allclose(got["output"], want, atol=1e-6)


def test_torch_export_two_inputs_dict_outputs(tmp_path: Path) -> None:
    import torch

    module = save_torch_export(tmp_path / "model.pt2")
    d = artifact(
        tmp_path / "a",
        "pytorch",
        tmp_path / "model.pt2",
        [("features", "FP32", (-1, 4)), ("scale", "FP32", (-1, 1))],
        # declared in a different order from the dict: outputs map by key, not position
        [("total", "FP32", (-1, 1)), ("logits", "FP32", (-1, 3))],
    )
    rt = load(d)
    f, s = rand(7, 4), rand(7, 1)
    got = rt.predict({"features": f, "scale": s})
    with torch.inference_mode():
        want = module(torch.from_numpy(f), torch.from_numpy(s))
    np.testing.assert_allclose(got["logits"], want["logits"].numpy(), atol=1e-6)
    np.testing.assert_allclose(got["total"], want["total"].numpy(), atol=1e-5)


def test_torch_export_wrong_output_names_is_a_clear_error(tmp_path: Path) -> None:
    save_torch_export(tmp_path / "model.pt2")
    d = artifact(
        tmp_path / "a",
        "pytorch",
        tmp_path / "model.pt2",
        [("features", "FP32", (-1, 4)), ("scale", "FP32", (-1, 1))],
        [("logits", "FP32", (-1, 3)), ("sum", "FP32", (-1, 1))],
    )
    with pytest.raises(ArtifactError, match=r"outputs are \['logits', 'total'\] but model.yaml declares"):
        load(d)


@pytest.mark.parametrize(
    ("ins", "outs", "message"),
    [
        ([("a", "FP32", (-1, 8)), ("b", "FP32", (-1, 8))], [("o", "FP32", (-1, 3))], r"forward\(\) takes 1 inputs"),
        ([("input", "FP32", (-1, 8))], [("o", "FP32", (-1, 3)), ("p", "FP32", (-1, 3))], "returned 1 outputs"),
        ([("input", "FP32", (-1, 8))], [("o", "FP32", (-1, 4))], r"output 'o' has shape \[1, 3\]"),
        ([("input", "FP32", (-1, 8))], [("o", "INT64", (-1, 3))], "output 'o' is FP32 but model.yaml declares INT64"),
        ([("input", "FP32", (-1, 9))], [("o", "FP32", (-1, 3))], "warm-up forward pass .* failed"),
    ],
    ids=["input-count", "output-count", "output-shape", "output-dtype", "input-shape"],
)
def test_torchscript_signature_mismatch_fails_at_load(tmp_path: Path, ins: Any, outs: Any, message: str) -> None:
    src = make_torch_mlp_artifact(tmp_path / "src", sizes=(8, 16, 3)) / "model.pt"
    d = artifact(tmp_path / "a", "pytorch", src, ins, outs)
    rt = create_runtime(read_spec(d), d)
    with pytest.raises(ArtifactError, match=message):
        rt.load()
    assert not rt.ready


def test_predict_before_load_is_refused(tmp_path: Path) -> None:
    d = make_torch_mlp_artifact(tmp_path / "a")
    rt = create_runtime(read_spec(d), d)
    with pytest.raises(RuntimeError, match="not loaded"):
        rt.predict({"input": rand(1, 8)})


def test_garbage_model_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a torchscript archive")
    d = artifact(
        tmp_path / "a", "pytorch", tmp_path / "model.pt", [("input", "FP32", (-1, 8))], [("o", "FP32", (-1, 3))]
    )
    with pytest.raises(ArtifactError, match=r"cannot load as TorchScript .*torch.jit.save"):
        load(d)


# -- ONNX -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, save_onnx(path)


def _onnx_artifact(tmp_path: Path, src: Path, ins: Any, outs: Any) -> Path:
    copy = tmp_path / "src" / "model.onnx"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    return artifact(tmp_path / "a", "onnx", copy, ins, outs)


def test_onnx_predicts_like_the_torch_source(tmp_path: Path, onnx_file: tuple[Path, Any]) -> None:
    import torch

    d = _onnx_artifact(tmp_path, onnx_file[0], [("x", "FP32", (-1, 6))], [("y", "FP32", (-1, 2))])
    rt = load(d, threads=1)
    assert rt.session.get_providers() == ["CPUExecutionProvider"]
    x = rand(9, 6)
    with torch.inference_mode():
        want = onnx_file[1](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rt.predict({"x": x})["y"], want, atol=1e-5)


@pytest.mark.parametrize(
    ("ins", "outs", "message"),
    [
        (
            [("input", "FP32", (-1, 6))],
            [("y", "FP32", (-1, 2))],
            r"inputs are \['x'\] but model.yaml declares \['input'\]",
        ),
        ([("x", "FP64", (-1, 6))], [("y", "FP32", (-1, 2))], "'x' is FP32 in the model but model.yaml declares FP64"),
        ([("x", "FP32", (-1, 7))], [("y", "FP32", (-1, 2))], r"'x' has shape \[-1, 6\] in the model"),
        ([("x", "FP32", (-1, 6, 1))], [("y", "FP32", (-1, 2))], r"'x' has shape \[-1, 6\] in the model"),
    ],
    ids=["name", "dtype", "dim", "rank"],
)
def test_onnx_signature_mismatch_fails_at_load(
    tmp_path: Path, onnx_file: tuple[Path, Any], ins: Any, outs: Any, message: str
) -> None:
    d = _onnx_artifact(tmp_path, onnx_file[0], ins, outs)
    with pytest.raises(ArtifactError, match=message):
        load(d)


# -- Keras (torch backend) and TensorFlow -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    return path, save_keras(path)


@TF_GROUP
def test_keras_torch_backend_predicts_like_the_model(tmp_path: Path, keras_file: tuple[Path, Any]) -> None:
    import keras

    copy = tmp_path / "model.keras"
    copy.write_bytes(keras_file[0].read_bytes())
    d = artifact(
        tmp_path / "a",
        "keras",
        copy,
        [("b", "FP32", (-1, 2)), ("a", "FP32", (-1, 5))],  # order differs from the model: inputs map by name
        [("p", "FP32", (-1, 3)), ("q", "FP32", (-1, 1))],
    )
    rt = load(d)
    assert keras.backend.backend() == "torch"
    a, b = rand(4, 5), rand(4, 2)
    got = rt.predict({"a": a, "b": b})
    want = keras_file[1].predict_on_batch([a, b])
    np.testing.assert_allclose(got["p"], want["p"], atol=1e-6)
    np.testing.assert_allclose(got["q"], want["q"], atol=1e-6)


@TF_GROUP
def test_keras_mismatch_and_backend_conflict_are_clear_errors(tmp_path: Path, keras_file: tuple[Path, Any]) -> None:
    copy = tmp_path / "model.keras"
    copy.write_bytes(keras_file[0].read_bytes())
    ins = [("a", "FP32", (-1, 5)), ("c", "FP32", (-1, 2))]
    d = artifact(tmp_path / "a", "keras", copy, ins, [("p", "FP32", (-1, 3)), ("q", "FP32", (-1, 1))])
    with pytest.raises(ArtifactError, match=r"inputs are \['a', 'b'\] but model.yaml declares \['a', 'c'\]"):
        load(d)
    # keras is already imported with torch in this process: a tensorflow-backend model must not silently use torch
    d2 = artifact(
        tmp_path / "b",
        "keras",
        d / "model.keras",
        [("a", "FP32", (-1, 5)), ("b", "FP32", (-1, 2))],
        [("p", "FP32", (-1, 3)), ("q", "FP32", (-1, 1))],
        keras_backend="tensorflow",
    )
    with pytest.raises(ArtifactError, match="already imported in this process with backend 'torch'"):
        load(d2)


@pytest.fixture(scope="module")
def savedmodel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("tf") / "saved_model"
    return path, save_savedmodel(path)


@TF_GROUP
def test_tensorflow_savedmodel_predicts_like_the_module(tmp_path: Path, savedmodel: tuple[Path, Any]) -> None:
    import shutil

    shutil.copytree(savedmodel[0], tmp_path / "src" / "saved_model")
    d = artifact(
        tmp_path / "a",
        "tensorflow",
        tmp_path / "src" / "saved_model",
        [("x", "FP32", (-1, 3))],
        [("n", "FP32", (-1, 1)), ("y", "FP32", (-1, 2))],
    )
    rt = load(d)
    x = rand(6, 3)
    got = rt.predict({"x": x})
    want = savedmodel[1].serve(x)
    np.testing.assert_allclose(got["y"], want["y"].numpy(), atol=1e-6)
    np.testing.assert_allclose(got["n"], x.sum(axis=1, keepdims=True), atol=1e-5)


@TF_GROUP
@pytest.mark.parametrize(
    ("outs", "message"),
    [
        ([("n", "FP32", (-1, 1)), ("z", "FP32", (-1, 2))], r"outputs are \['n', 'y'\] but model.yaml declares"),
        ([("n", "FP32", (-1, 1)), ("y", "INT32", (-1, 2))], "'y' is FP32 in the model but model.yaml declares INT32"),
    ],
    ids=["name", "dtype"],
)
def test_tensorflow_signature_mismatch_fails_at_load(
    tmp_path: Path, savedmodel: tuple[Path, Any], outs: Any, message: str
) -> None:
    import shutil

    shutil.copytree(savedmodel[0], tmp_path / "src" / "saved_model")
    d = artifact(tmp_path / "a", "tensorflow", tmp_path / "src" / "saved_model", [("x", "FP32", (-1, 3))], outs)
    with pytest.raises(ArtifactError, match=message):
        load(d)


def test_create_runtime_imports_only_the_chosen_framework(tmp_path: Path) -> None:
    """A torch model must not pay for TensorFlow: checked in a fresh interpreter."""
    import subprocess
    import sys

    d = make_torch_mlp_artifact(tmp_path / "a")
    code = (
        "import sys; from services.serving.artifact import load_spec; "
        "from services.serving.runtimes import create_runtime; "
        f"rt = create_runtime(load_spec({str(d)!r}), {str(d)!r}); rt.load(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
