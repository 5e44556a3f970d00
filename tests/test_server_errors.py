"""Bad input never kills a worker and never gets a 500: every case gets a 4xx that says what was wrong."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import ROOT, make_torch_mlp_artifact
from tests.serving import ServerHandle, make_onnx_types_artifact, start_server

LIMIT = 4096  # --max-body-bytes for this server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    art = make_onnx_types_artifact(tmp_path_factory.mktemp("errors") / "types", reject_nonfinite=True)
    with start_server(art, workers=2, threads=4, extra_args=["--max-body-bytes", str(LIMIT)]) as s:
        yield s


def good_inputs() -> list[dict[str, Any]]:
    return [
        {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
        {"name": "flag", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
        {"name": "half", "shape": [1, 4], "datatype": "FP16", "data": [1, 2, 3, 4]},
        {"name": "count", "shape": [1, 1], "datatype": "INT64", "data": [1]},
    ]


def with_input(tensor: str, **change: Any) -> dict[str, Any]:
    inputs = good_inputs()
    for i in inputs:
        if i["name"] == tensor:
            i.update(change)
    return {"inputs": inputs}


def binary(header: dict[str, Any], tail: bytes, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head) if header_length is None else header_length)}


def half_binary(size: int = 8) -> dict[str, Any]:
    inputs = good_inputs()
    inputs[2] = {"name": "half", "shape": [1, 4], "datatype": "FP16", "parameters": {"binary_data_size": size}}
    return {"inputs": inputs}


def bytes_binary(size: int) -> dict[str, Any]:
    inputs = good_inputs()
    inputs[0] = {"name": "text", "shape": [1, 2], "datatype": "BYTES", "parameters": {"binary_data_size": size}}
    return {"inputs": inputs}


# (case id, body (dict -> JSON, or (bytes, headers)), expected status, substring of the error message)
CASES: list[tuple[str, Any, int, str]] = [
    ("malformed json", (b'{"inputs": [', {"Content-Type": "application/json"}), 400, "not valid JSON"),
    ("wrong content type", (b"inputs=1", {"Content-Type": "application/x-www-form-urlencoded"}), 415, "Content-Type"),
    ("empty body", (b"", {"Content-Type": "application/json"}), 400, "body is empty"),
    ("not an object", [1, 2], 400, "must be a JSON object"),
    ("no inputs", {"id": "x"}, 400, '"inputs" must be a non-empty list'),
    ("input not an object", {"inputs": [5]}, 400, "must be an object"),
    ("unknown input", with_input("count", name="counts"), 400, "unknown input 'counts'; this model takes"),
    ("duplicated input", {"inputs": [*good_inputs(), good_inputs()[0]]}, 400, 'input "text" is given more than once'),
    ("missing input", {"inputs": good_inputs()[:3]}, 400, "missing input(s) 'count'"),
    ("wrong datatype", with_input("half", datatype="FP32"), 400, "input \"half\": expected datatype FP16, got 'FP32'"),
    ("shape not a list", with_input("half", shape="1,4"), 400, '"shape" must be a list of non-negative integers'),
    ("wrong rank", with_input("flag", shape=[3]), 400, 'input "flag": expected shape [-1, 3], got [3]'),
    ("wrong dims", with_input("half", shape=[1, 3], data=[1, 2, 3]), 400, "expected shape [-1, 4], got [1, 3]"),
    ("zero batch", with_input("count", shape=[0, 1], data=[]), 400, "batch dimension (dim 0) must be at least 1"),
    ("data length mismatch", with_input("flag", data=[True, False]), 400, "shape [1, 3] needs 3 values, got 2"),
    ("ragged data", with_input("half", data=[[1, 2], [3]]), 400, "ragged"),
    ("non-numeric data", with_input("half", data=["a", "b", "c", "d"]), 400, "FP16 needs numbers"),
    ("null data", with_input("half", data=[1, None, 3, 4]), 400, "FP16 needs numbers"),
    ("numbers for BOOL", with_input("flag", data=[1, 0, 1]), 400, "BOOL needs booleans"),
    ("floats for INT64", with_input("count", data=[1.5]), 400, "INT64 needs integers"),
    ("INT64 out of range", with_input("count", data=[2**70]), 400, "out of range for INT64"),
    ("BYTES not strings", with_input("text", data=[1, 2]), 400, "BYTES data must be a list of strings"),
    (
        "no data",
        {"inputs": [*good_inputs()[:3], {"name": "count", "shape": [1, 1], "datatype": "INT64"}]},
        400,
        'needs "data"',
    ),
    ("data not a list", with_input("count", data=5), 400, '"data" must be a list of integers'),
    ("batch sizes differ", with_input("count", shape=[2, 1], data=[1, 2]), 400, "same batch size"),
    ("inf after FP16 cast", with_input("half", data=[70000, 1, 2, 3]), 400, "NaN or Inf"),
    ("unknown output", {"inputs": good_inputs(), "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ("id not a string", {"id": 7, "inputs": good_inputs()}, 400, '"id" must be a string'),
    ("body over limit", {"inputs": good_inputs(), "pad": "x" * LIMIT}, 413, "over the 4096-byte limit"),
    ("binary NaN", binary(half_binary(), np.array([1, np.nan, 2, 3], "<f2").tobytes()), 400, "NaN or Inf"),
    (
        "header length past body",
        binary(half_binary(), b"\0" * 8, header_length=10**6),
        400,
        "Inference-Header-Content-Length is 1000000",
    ),
    (
        "negative header length",
        binary(half_binary(), b"\0" * 8, header_length=-1),
        400,
        "Inference-Header-Content-Length is -1",
    ),
    (
        "header length not int",
        (b"{}", {"Inference-Header-Content-Length": "abc"}),
        400,
        "must be an integer byte count",
    ),
    ("binary size past end", binary(half_binary(16), b"\0" * 8), 400, "runs past the end of the body"),
    (
        "binary size vs shape",
        binary(half_binary(6), b"\0" * 6),
        400,
        "binary_data_size is 6 bytes but shape [1, 4] of FP16 needs 8",
    ),
    ("trailing binary bytes", binary(half_binary(), b"\0" * 12), 400, "4 bytes after the JSON header"),
    ("binary without header", half_binary(), 400, "no Inference-Header-Content-Length header"),
    (
        "BYTES prefix truncated",
        binary(bytes_binary(6), struct.pack("<I", 1) + b"a" + b"\0"),
        400,
        "inside a 4-byte length prefix",
    ),
    (
        "BYTES element past end",
        binary(bytes_binary(6), struct.pack("<I", 9) + b"ab"),
        400,
        "runs past the end of its binary data",
    ),
    (
        "BYTES count vs shape",
        binary(bytes_binary(5), struct.pack("<I", 1) + b"a"),
        400,
        "needs 2 BYTES elements, binary data holds 1",
    ),
    (
        "classification",
        {"inputs": good_inputs(), "outputs": [{"name": "half_out", "parameters": {"classification": 2}}]},
        400,
        "classification extension is not supported",
    ),
]


def post(srv: ServerHandle, body: Any, path: str = "/v2/models/types/infer") -> requests.Response:
    if isinstance(body, tuple):
        data, headers = body
        return requests.post(srv.url + path, data=data, headers=headers, timeout=10)
    return requests.post(srv.url + path, json=body, timeout=10)


def test_bad_inputs_get_4xx_with_a_clear_message_and_workers_survive(srv: ServerHandle) -> None:
    pids = srv.worker_pids()
    assert len(pids) == 2
    assert post(srv, {"inputs": good_inputs()}).status_code == 200
    failures = []
    for case, body, status, needle in CASES:
        for _ in range(2):  # twice, so both workers most likely see each case
            r = post(srv, body)
            msg = r.json().get("error", "") if r.headers.get("Content-Type") == "application/json" else r.text
            if r.status_code != status or needle not in msg:
                failures.append(f"{case}: {r.status_code} {msg!r}")
    assert not failures, "\n".join(failures)
    assert srv.worker_pids() == pids
    assert post(srv, {"inputs": good_inputs()}).status_code == 200
    access = srv.access_lines(at_least=2 * len(CASES) + 3)
    assert {a["process"]["pid"] for a in access} == pids  # both workers answered bad input
    assert not [a for a in access if a["http"]["response"]["status_code"] >= 500]
    errs = [a for a in access if a["http"]["response"]["status_code"] >= 400]
    assert len(errs) >= 2 * len(CASES) and all(a["error"]["message"] for a in errs)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"instances": []}, "at least one row"),
        ({"instances": [[1, 2]]}, "several inputs"),
        ({"inputs": [1]}, '{"instances": [row, ...]}'),
    ],
)
def test_v1_bad_input(srv: ServerHandle, body: Any, needle: str) -> None:
    r = post(srv, body, "/v1/models/types:predict")
    assert r.status_code == 400 and needle in r.json()["error"]


def test_method_not_allowed_is_json(srv: ServerHandle) -> None:
    r = requests.get(srv.url + "/v2/models/types/infer")
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]


def test_corrupted_file_leaves_worker_live_but_not_ready(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    (art / "model.pt").write_bytes((art / "model.pt").read_bytes() + b"tampered")
    # straight to gunicorn (a container entry point may do that): the worker re-hashes before loading
    with start_server(art, workers=1, direct=True, wait_ready=False) as s:
        assert requests.get(f"{s.url}/v2/health/live").json() == {"live": True}
        r = requests.get(f"{s.url}/v2/health/ready")
        assert r.status_code == 503
        assert "'model.pt' is corrupted or was changed" in r.json()["error"]
        r = requests.post(f"{s.url}/v2/models/mlp/infer", json={"inputs": []})
        assert r.status_code == 503 and "model.pt" in r.json()["error"]
        (event,) = s.load_events()
        assert event["event"]["outcome"] == "failure" and "model.pt" in event["error"]["message"]


def test_cli_rejects_a_corrupted_artifact_before_starting(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    (art / "model.pt").write_bytes(b"not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "stacks.cli", "serve", str(art), "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dlstack serve: error: ")
    assert "'model.pt' is corrupted or was changed" in proc.stderr and "Traceback" not in proc.stderr


def test_internal_error_is_500_with_request_id(tmp_path: Path) -> None:
    """A model that fails at predict time (not bad input): 500, the request id in body and header, worker fine."""
    import torch

    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings
    from tests.conftest import write_torchscript_artifact

    class Boom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x[0, 0] == 42.0):
                raise RuntimeError("boom")
            return x * 2

    write_torchscript_artifact(tmp_path, Boom(), name="boom", inputs=("x", 2), outputs=("y", 2))
    client = create_app(ServerSettings(artifact_dir=tmp_path), background_load=False).test_client()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [42, 0]}]}
    r = client.post("/v2/models/boom/infer", json=body, headers={"X-Request-ID": "rid-500"})
    assert r.status_code == 500
    assert r.headers["X-Request-ID"] == "rid-500"
    error = r.get_json()
    assert error == {"error": error["error"], "request_id": "rid-500"}
    assert "rid-500" in error["error"] and "boom" not in error["error"]  # no internals leak to clients
    body["inputs"][0]["data"] = [1, 0]
    assert client.post("/v2/models/boom/infer", json=body).get_json()["outputs"][0]["data"] == [2, 0]
