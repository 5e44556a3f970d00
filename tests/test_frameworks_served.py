"""Every framework (both torch formats) packaged by ``dlstack package`` and served by a real gunicorn.

The V2 infer response must equal what the same runtime computes in-process (within 1e-5). One server with
one worker per framework keeps it lean; TensorFlow and Keras share the TF xdist group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from services.packaging import package_model, parse_tensor
from services.serving.artifact import read_spec
from tests.conftest import make_torch_mlp_artifact
from tests.serving import start_server
from tests.test_runtimes import TF_GROUP, load, save_keras, save_onnx, save_savedmodel, save_torch_export


def _torchscript(d: Path) -> Path:
    src = make_torch_mlp_artifact(d / "src", sizes=(8, 16, 3)) / "model.pt"
    package_model(src, name="ts", framework="pytorch", out=d / "a", inputs=[parse_tensor("input:FP32:-1x8")])
    return d / "a"


def _export(d: Path) -> Path:
    save_torch_export(d / "m.pt2")
    package_model(d / "m.pt2", name="export", framework="pytorch", out=d / "a")
    return d / "a"


def _onnx(d: Path) -> Path:
    save_onnx(d / "m.onnx")
    package_model(d / "m.onnx", name="onnx", framework="onnx", out=d / "a")
    return d / "a"


def _keras(d: Path) -> Path:
    save_keras(d / "m.keras")
    package_model(d / "m.keras", name="keras", framework="keras", out=d / "a")
    return d / "a"


def _tensorflow(d: Path) -> Path:
    save_savedmodel(d / "sm")
    package_model(d / "sm", name="tf", framework="tensorflow", out=d / "a")
    return d / "a"


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_torchscript, id="torchscript"),
        pytest.param(_export, id="torch-export"),
        pytest.param(_onnx, id="onnx"),
        pytest.param(_keras, id="keras", marks=TF_GROUP),
        pytest.param(_tensorflow, id="tensorflow", marks=TF_GROUP),
    ],
)
def test_served_prediction_equals_in_process_runtime(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    artifact = build(tmp_path)
    spec = read_spec(artifact)
    rng = np.random.default_rng(11)
    inputs = {t.name: rng.standard_normal((3, *t.shape[1:])).astype(np.float32) for t in spec.signature.inputs}
    want = load(artifact).predict(inputs)
    body: dict[str, Any] = {
        "id": "req-1",
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ],
    }
    with start_server(artifact, workers=1, timeout=180) as srv:
        r = requests.post(f"{srv.url}/v2/models/{spec.name}/infer", json=body, timeout=60)
        meta = requests.get(f"{srv.url}/v2/models/{spec.name}", timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["model_name"] == spec.name and got.get("id") == "req-1"
    assert {o["name"] for o in got["outputs"]} == {t.name for t in spec.signature.outputs}
    for o in got["outputs"]:
        expected = want[o["name"]]
        assert o["datatype"] == "FP32" and o["shape"] == list(expected.shape)
        np.testing.assert_allclose(np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]), expected, atol=1e-5)
    assert meta.status_code == 200
    assert [i["name"] for i in meta.json()["inputs"]] == [t.name for t in spec.signature.inputs]
