"""Open Inference Protocol V2 / KServe V1 routes against a real gunicorn, plus codec round trips."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from services.serving.artifact import load_spec
from services.serving.runtimes import create_runtime
from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, make_onnx_types_artifact, start_server

ROWS = np.array([[0.5, -1.0, 2.0, 0.0, 3.25, -0.125, 1.0, 7.0], [1.0] * 8], dtype=np.float32)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, Path]]:
    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("proto") / "mlp", version="3", seed=7)
    with start_server(art, workers=2) as srv:
        yield srv, art


@pytest.fixture(scope="module")
def expected(mlp: tuple[ServerHandle, Path]) -> np.ndarray:
    """The same model run in-process: what every route must answer."""
    art = mlp[1]
    rt = create_runtime(load_spec(art), art, 1)
    rt.load()
    return rt.predict({"input": ROWS})["output"]


@pytest.fixture(scope="module")
def types_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    art = make_onnx_types_artifact(tmp_path_factory.mktemp("proto") / "types")
    with start_server(art, workers=1) as srv:
        yield srv


def binary_request(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def split_binary(resp: requests.Response) -> tuple[dict[str, Any], bytes]:
    n = int(resp.headers["Inference-Header-Content-Length"])
    return json.loads(resp.content[:n]), resp.content[n:]


def pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_health_and_server_metadata(mlp: tuple[ServerHandle, Path]) -> None:
    url = mlp[0].url
    assert requests.get(f"{url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = requests.get(f"{url}/v2").json()
    assert meta["name"] == "dlstack-model-server"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("suffix", ["", "/versions/3"])
def test_model_metadata_and_ready(mlp: tuple[ServerHandle, Path], suffix: str) -> None:
    url = mlp[0].url
    meta = requests.get(f"{url}/v2/models/mlp{suffix}").json()
    # the worker's effective settings (README "What it runs with"): model.yaml leaves them to the defaults
    assert meta.pop("parameters") == {
        "max_batch_size": 8,
        "max_batch_time_ms": 2.0,
        "max_body_bytes": 16 * 1024 * 1024,
        "intra_op_threads": 1,
    }
    assert meta == {
        "name": "mlp",
        "versions": ["3"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }
    r = requests.get(f"{url}/v2/models/mlp{suffix}/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


@pytest.mark.parametrize(
    ("method", "path", "needle"),
    [
        ("GET", "/v2/models/other", "unknown model 'other'; this server serves 'mlp'"),
        ("GET", "/v2/models/mlp/versions/9", "has no version '9'"),
        ("GET", "/v2/models/other/ready", "unknown model 'other'"),
        ("GET", "/v2/models/mlp/versions/9/ready", "has no version '9'"),
        ("POST", "/v2/models/other/infer", "unknown model 'other'"),
        ("POST", "/v2/models/mlp/versions/1/infer", "has no version '1'"),
        ("POST", "/v1/models/other:predict", "unknown model 'other'"),
        ("GET", "/v3/nothing", "Not Found"),
    ],
)
def test_unknown_model_version_or_route_is_404(
    mlp: tuple[ServerHandle, Path], method: str, path: str, needle: str
) -> None:
    r = requests.request(method, mlp[0].url + path, json={"inputs": []})
    assert r.status_code == 404
    assert needle in r.json()["error"]


def test_infer_json_flat_and_nested(mlp: tuple[ServerHandle, Path], expected: np.ndarray) -> None:
    url = mlp[0].url
    for data in (ROWS.ravel().tolist(), ROWS.tolist()):
        body = {"id": "req-42", "inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": data}]}
        for path in ("/v2/models/mlp/infer", "/v2/models/mlp/versions/3/infer"):
            r = requests.post(url + path, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["id"] == "req-42" and out["model_name"] == "mlp" and out["model_version"] == "3"
            (t,) = out["outputs"]
            assert t["name"] == "output" and t["datatype"] == "FP32" and t["shape"] == [2, 3]
            np.testing.assert_allclose(np.array(t["data"], np.float32).reshape(2, 3), expected, atol=1e-6)


def test_infer_binary_inputs_and_outputs(mlp: tuple[ServerHandle, Path], expected: np.ndarray) -> None:
    header = {
        "inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }
    body, headers = binary_request(header, [ROWS.astype("<f4").tobytes()])
    r = requests.post(f"{mlp[0].url}/v2/models/mlp/infer", data=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/octet-stream"
    head, raw = split_binary(r)
    (t,) = head["outputs"]
    assert t["parameters"]["binary_data_size"] == len(raw) == 2 * 3 * 4
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(2, 3), expected, atol=1e-6)


def test_binary_data_output_parameter_and_json_default(mlp: tuple[ServerHandle, Path], expected: np.ndarray) -> None:
    url = f"{mlp[0].url}/v2/models/mlp/infer"
    inp = [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": ROWS.ravel().tolist()}]
    r = requests.post(url, json={"inputs": inp, "parameters": {"binary_data_output": True}})
    _, raw = split_binary(r)
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(2, 3), expected, atol=1e-6)
    # a per-output binary_data=false wins over the request-level default
    r = requests.post(
        url,
        json={
            "inputs": inp,
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "output", "parameters": {"binary_data": False}}],
        },
    )
    assert "Inference-Header-Content-Length" not in r.headers
    assert r.json()["outputs"][0]["data"] == pytest.approx(expected.ravel().tolist(), abs=1e-6)


def test_kserve_v1_predict(mlp: tuple[ServerHandle, Path], expected: np.ndarray) -> None:
    r = requests.post(f"{mlp[0].url}/v1/models/mlp:predict", json={"instances": ROWS.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"], np.float32), expected, atol=1e-6)
    assert requests.get(f"{mlp[0].url}/v1/models/mlp").json() == {"name": "mlp", "ready": True}


def test_openapi_documents_exactly_the_flask_rules(mlp: tuple[ServerHandle, Path]) -> None:
    from services.serving.server.app import create_app
    from services.serving.server.openapi import served_operations
    from services.serving.server.settings import ServerSettings

    doc = requests.get(f"{mlp[0].url}/v2/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    app = create_app(ServerSettings(artifact_dir=mlp[1]), background_load=False)
    assert documented == served_operations(app)
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert "/v2/models/<name>/versions/<version>/infer" in rules and "/v1/models/<name>:predict" in rules
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["summary"] and not op["summary"].startswith(("infer", "live"))  # from the docstring
            assert {p["name"] for p in op["parameters"]} == set(re.findall(r"{(\w+)}", path))


TEXT = pack_bytes([b"\x00raw", "é".encode()])  # BYTES: 4-byte little-endian length + raw bytes


@pytest.fixture(scope="module")
def json_types(types_srv: ServerHandle) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": [["héllo", ""], ["a", "b c"]]},
            {"name": "flag", "shape": [2, 3], "datatype": "BOOL", "data": [True, False, True, False, False, True]},
            {"name": "half", "shape": [2, 4], "datatype": "FP16", "data": [0.5, 1.5, -2.0, 1000.0, 0, 1, 2, 3]},
            {"name": "count", "shape": [2, 1], "datatype": "INT64", "data": [[41], [-1]]},
        ]
    }
    r = requests.post(f"{types_srv.url}/v2/models/types/infer", json=body)
    assert r.status_code == 200, r.text
    return {t["name"]: t for t in r.json()["outputs"]}


def post_types_binary(url: str, text: bytes, **parameters: Any) -> requests.Response:
    """One binary-extension request to the "types" model: TEXT (a packed BYTES chunk) plus fixed BOOL/FP16/INT64."""
    chunks = [
        text,
        np.array([1, 0, 1], dtype=np.bool_).tobytes(),
        np.array([0.25, -1, 3, 100], dtype="<f2").tobytes(),
        np.array([7], dtype="<i8").tobytes(),
    ]
    layout = [("text", [1, 2], "BYTES"), ("flag", [1, 3], "BOOL"), ("half", [1, 4], "FP16"), ("count", [1, 1], "INT64")]
    header = {
        "inputs": [
            {"name": n, "shape": s, "datatype": d, "parameters": {"binary_data_size": len(c)}}
            for (n, s, d), c in zip(layout, chunks, strict=True)
        ],
        "parameters": parameters,
    }
    body, headers = binary_request(header, chunks)
    return requests.post(f"{url}/v2/models/types/infer", data=body, headers=headers)


@pytest.fixture(scope="module")
def binary_types(types_srv: ServerHandle) -> dict[str, bytes]:
    r = post_types_binary(types_srv.url, TEXT, binary_data_output=True)
    assert r.status_code == 200, r.text
    head, raw = split_binary(r)
    parts, off = {}, 0
    for t in head["outputs"]:
        n = t["parameters"]["binary_data_size"]
        parts[t["name"]] = raw[off : off + n]
        off += n
    assert off == len(raw)
    return parts


def test_bool_fp16_int64_json(json_types: dict[str, Any]) -> None:
    out = json_types
    assert out["flag_out"]["data"] == [False, True, False, True, True, False]
    assert out["half_out"]["datatype"] == "FP16"
    assert out["half_out"]["data"][:4] == [1.0, 3.0, -4.0, 2000.0]
    assert out["count_out"]["data"] == [42, 0]


def test_an_inf_the_model_makes_is_a_500_in_json_and_exact_in_binary(types_srv: ServerHandle) -> None:
    """65504 * 2 overflows FP16 to inf: JSON cannot carry it (orjson would write null into a 200)."""
    inputs = [
        {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
        {"name": "flag", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
        {"name": "half", "shape": [1, 4], "datatype": "FP16", "data": [65504.0, 1, 2, 3]},
        {"name": "count", "shape": [1, 1], "datatype": "INT64", "data": [1]},
    ]
    url = f"{types_srv.url}/v2/models/types/infer"
    r = requests.post(url, json={"inputs": inputs})
    assert r.status_code == 500
    assert r.json()["error"] == (
        'output "half_out" holds NaN or Inf, which JSON cannot carry; request it with parameters.binary_data=true '
        "to get the exact values"
    )
    r = requests.post(
        url, json={"inputs": inputs, "outputs": [{"name": "half_out", "parameters": {"binary_data": True}}]}
    )
    assert r.status_code == 200, r.text
    _, raw = split_binary(r)
    assert np.frombuffer(raw, "<f2").tolist() == [np.inf, 2.0, 4.0, 6.0]


def test_bool_fp16_int64_binary(binary_types: dict[str, bytes]) -> None:
    assert np.frombuffer(binary_types["flag_out"], np.bool_).tolist() == [False, True, False]
    assert np.frombuffer(binary_types["half_out"], "<f2").tolist() == [0.5, -2.0, 6.0, 200.0]
    assert np.frombuffer(binary_types["count_out"], "<i8").tolist() == [8]


def test_bytes_json_through_a_real_model(json_types: dict[str, Any]) -> None:
    assert json_types["text_out"]["datatype"] == "BYTES" and json_types["text_out"]["shape"] == [2, 2]
    assert json_types["text_out"]["data"] == ["héllo", "", "a", "b c"]


def test_bytes_binary_through_a_real_model(binary_types: dict[str, bytes]) -> None:
    assert binary_types["text_out"] == TEXT


def test_non_utf8_bytes_into_an_onnx_string_tensor_is_a_400(types_srv: ServerHandle) -> None:
    r = post_types_binary(types_srv.url, pack_bytes([b"\xff\xfe", b"ok"]))
    assert r.status_code == 400, r.text
    assert "not valid UTF-8" in r.json()["error"] and '"text"' in r.json()["error"]


def test_signature_codec_round_trips_every_datatype() -> None:
    """Decode -> encode without a model: every V2 datatype, JSON and binary, exactly preserved."""
    from services.serving.artifact import ModelSpec
    from services.serving.server.protocol import Signature

    dts = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
    spec = ModelSpec.model_validate(
        {
            "name": "codec",
            "framework": "onnx",
            "files": [{"path": "x", "sha256": "0"}],
            "signature": {
                "inputs": [{"name": f"in_{d}", "datatype": d, "shape": [-1, 2]} for d in [*dts, "BYTES"]],
                "outputs": [{"name": f"in_{d}", "datatype": d, "shape": [-1, 2]} for d in [*dts, "BYTES"]],
            },
        }
    )
    sig = Signature(spec)
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for d in dts:
        dt = np.dtype({"BOOL": "bool", "FP16": "float16", "FP32": "float32", "FP64": "float64"}.get(d, d.lower()))
        if dt.kind == "b":
            arrays[f"in_{d}"] = rng.integers(0, 2, (3, 2)).astype(bool)
        elif dt.kind == "f":
            arrays[f"in_{d}"] = rng.standard_normal((3, 2)).astype(dt)
        else:
            info = np.iinfo(dt)
            arrays[f"in_{d}"] = np.array([[info.min, info.max], [0, 1], [2, 3]], dtype=dt)
    arrays["in_BYTES"] = np.array([[b"a", b"\x00\x01"], [b"", b"xyz"], [b"1", b"2"]], dtype=object)

    # JSON in (BYTES must be UTF-8 text in JSON, so use text there), binary out
    json_inputs = []
    for n, a in arrays.items():
        data = [b.decode("latin-1") for b in a.ravel()] if a.dtype.kind == "O" else a.ravel().tolist()
        json_inputs.append({"name": n, "shape": list(a.shape), "datatype": n[3:], "data": data})
    req = sig.decode(json.dumps({"inputs": json_inputs, "parameters": {"binary_data_output": True}}).encode())
    for n, a in arrays.items():
        if a.dtype.kind == "O":
            assert req.inputs[n].ravel().tolist() == [b.decode("latin-1").encode() for b in a.ravel()]
        else:
            assert req.inputs[n].dtype == a.dtype and np.array_equal(req.inputs[n], a)

    # binary in -> decode -> encode as binary: byte-identical
    raw = [
        pack_bytes(list(a.ravel())) if a.dtype.kind == "O" else a.astype(a.dtype.newbyteorder("<")).tobytes()
        for a in arrays.values()
    ]
    header = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": n[3:], "parameters": {"binary_data_size": len(b)}}
            for (n, a), b in zip(arrays.items(), raw, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_request(header, raw)
    req = sig.decode(body, headers["Inference-Header-Content-Length"])
    out, json_len = sig.encode(req, req.inputs)
    assert json_len is not None
    assert out[json_len:] == b"".join(raw)
