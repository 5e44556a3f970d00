"""V2 semantics the codec must not get wrong: names given twice, values a datatype cannot hold, JSON
types mixed in "data", boolean parameters that are not booleans, and NaN/Inf in JSON answers.

Unit tests run ``Signature`` compiled from a real tiny ONNX model (an Identity per V2 datatype, built
in tmp_path); a handful go through a real ``dlstack serve`` of the same model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from services.serving.artifact import load_spec
from services.serving.errors import DlstackError, UserError
from services.serving.server.protocol import OutputError, Signature
from tests.serving import ServerHandle, start_server

# V2 datatype -> (input name, numpy dtype); every input is [-1, 2] and comes back unchanged as <name>_out.
TYPES = {
    "BOOL": ("b", "bool"),
    "UINT8": ("u8", "uint8"),
    "UINT16": ("u16", "uint16"),
    "UINT32": ("u32", "uint32"),
    "UINT64": ("u64", "uint64"),
    "INT8": ("i8", "int8"),
    "INT16": ("i16", "int16"),
    "INT32": ("i32", "int32"),
    "INT64": ("i64", "int64"),
    "FP16": ("f16", "float16"),
    "FP32": ("f32", "float32"),
    "FP64": ("f64", "float64"),
}
NAME = {dt: n for dt, (n, _) in TYPES.items()}
INTS = [dt for dt, (_, np_name) in TYPES.items() if np.dtype(np_name).kind in "iu"]
FLOATS = ["FP16", "FP32", "FP64"]


def make_identity_artifact(out: Path) -> Path:
    """A real ONNX model: Identity from each input to <input>_out, one per numeric V2 datatype."""
    import onnx
    from onnx import TensorProto, helper

    from services.serving.artifact import FileEntry, ModelSpec, TensorSpec, file_sha256, write_spec
    from services.serving.artifact import Signature as SpecSignature

    onnx_types = {
        "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
        "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
        "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
        "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    }  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in NAME.values()],
        "identity",
        [helper.make_tensor_value_info(NAME[dt], t, ["batch", 2]) for dt, t in onnx_types.items()],
        [helper.make_tensor_value_info(f"{NAME[dt]}_out", t, ["batch", 2]) for dt, t in onnx_types.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    spec = ModelSpec(
        name="identity",
        framework="onnx",  # type: ignore[arg-type]
        files=(FileEntry(path="model.onnx", sha256=file_sha256(out / "model.onnx")),),
        signature=SpecSignature(
            inputs=tuple(TensorSpec(name=NAME[dt], datatype=dt, shape=(-1, 2)) for dt in TYPES),  # type: ignore[arg-type]
            outputs=tuple(TensorSpec(name=f"{NAME[dt]}_out", datatype=dt, shape=(-1, 2)) for dt in TYPES),  # type: ignore[arg-type]
        ),
    )
    write_spec(out, spec)
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_identity_artifact(tmp_path_factory.mktemp("v2sem") / "identity")


@pytest.fixture(scope="module")
def sig(artifact: Path) -> Signature:
    return Signature(load_spec(artifact))


def inputs(rows: int = 1, **data: Any) -> list[dict[str, Any]]:
    """``rows`` valid rows for every input; keyword arguments (input name=data) replace one tensor's data."""
    out = []
    for dt, (n, _) in TYPES.items():
        values = data.get(n, ([True, False] if dt == "BOOL" else [1, 2]) * rows)
        out.append({"name": n, "shape": [rows, 2], "datatype": dt, "data": values})
    return out


def body(**request: Any) -> bytes:
    request.setdefault("inputs", inputs())
    return json.dumps(request).encode()


def error(sig: Signature, raw: bytes) -> str:
    with pytest.raises(UserError) as e:
        sig.decode(raw)
    assert e.value.status == 400 and "\n" not in e.value.message
    return e.value.message


# -- names given twice ---------------------------------------------------------------------------


def test_an_output_requested_twice_is_refused(sig: Signature) -> None:
    msg = error(sig, body(outputs=[{"name": "f32_out"}, {"name": "i8_out"}, {"name": "f32_out"}]))
    assert msg == 'output "f32_out" is requested twice; name each output once'


def test_an_input_given_twice_is_refused(sig: Signature) -> None:
    twice = [*inputs(), *[i for i in inputs() if i["name"] == "f32"]]
    assert error(sig, body(inputs=twice)) == 'input "f32" is given more than once; name each input once'


def test_each_output_once_in_the_order_asked(sig: Signature) -> None:
    req = sig.decode(body(outputs=[{"name": "i8_out"}, {"name": "f32_out", "parameters": {"binary_data": True}}]))
    assert req.outputs == [("i8_out", False), ("f32_out", True)]


# -- values out of range for their datatype -------------------------------------------------------


@pytest.mark.parametrize("dt", INTS)
def test_integers_out_of_range_name_the_tensor_and_the_range(sig: Signature, dt: str) -> None:
    info = np.iinfo(TYPES[dt][1])
    n = NAME[dt]
    expected = f'input "{n}": a value is out of range for {dt} [{info.min}, {info.max}]'
    for bad in ([int(info.min) - 1, 0], [0, int(info.max) + 1]):
        assert error(sig, body(inputs=inputs(**{n: bad}))) == expected, bad
    # the limits themselves are exact
    req = sig.decode(body(inputs=inputs(**{n: [int(info.min), int(info.max)]})))
    assert req.inputs[n].dtype == np.dtype(TYPES[dt][1])
    assert req.inputs[n].tolist() == [[int(info.min), int(info.max)]]


@pytest.mark.parametrize(
    ("dt", "bad", "bounds"),
    [
        ("FP16", 65520.0, "[-65504, 65504]"),  # the first number that rounds to inf in FP16
        ("FP16", -1e5, "[-65504, 65504]"),
        ("FP16", 70000, "[-65504, 65504]"),  # an integer, cast from int64
        ("FP32", 1e39, "[-3.4028235e+38, 3.4028235e+38]"),
        ("FP32", -3.5e38, "[-3.4028235e+38, 3.4028235e+38]"),
    ],
)
def test_floats_that_would_become_inf_name_the_tensor_and_the_range(
    sig: Signature, dt: str, bad: float, bounds: str
) -> None:
    n = NAME[dt]
    assert error(sig, body(inputs=inputs(**{n: [1.0, bad]}))) == (
        f'input "{n}": a value is out of range for {dt} {bounds} and would become Inf; send values within it '
        "(NaN or Inf travel only as binary data)"
    )


def test_float_limits_and_rounding_to_them_are_accepted(sig: Signature) -> None:
    req = sig.decode(body(inputs=inputs(f16=[65504.0, 65519.0], f32=[3.4028235e38, -3.4028235e38])))
    assert req.inputs["f16"].tolist() == [[65504.0, 65504.0]]
    assert req.inputs["f32"].tolist() == [[float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max)]]


def test_fp64_beyond_its_range_is_not_json_at_all(sig: Signature) -> None:
    raw = body().replace(b'"FP64", "data": [1, 2]', b'"FP64", "data": [1, 1e400]')
    assert raw != body()
    assert error(sig, raw).startswith("the request body is not valid JSON: number is infinity")


# -- JSON types: bools that are not bools, bools among numbers, mixed data ------------------------


@pytest.mark.parametrize(
    ("data", "got"),
    [
        ([1, 0], "integers"),
        (["true", "false"], "strings"),
        ([True, 1], "a mix of booleans and integers"),
        ([False, 0.0], "a mix of booleans and floats"),
        ([True, None], "a mix of booleans and null"),
    ],
)
def test_bool_data_must_be_json_booleans(sig: Signature, data: list[Any], got: str) -> None:
    assert (
        error(sig, body(inputs=inputs(b=data)))
        == f'input "b": datatype BOOL needs booleans (true/false) in "data", got {got}'
    )


@pytest.mark.parametrize("dt", INTS + FLOATS)
@pytest.mark.parametrize("data", [[True, 1], [0, False], [[True, 1]], [[1, 1], [1, False]]])
def test_a_boolean_among_numbers_is_refused_not_read_as_0_or_1(sig: Signature, dt: str, data: list[Any]) -> None:
    n = NAME[dt]
    want = "integers" if dt in INTS else "numbers"
    assert error(
        sig, body(inputs=inputs(rows=len(data) if len(data) == 2 and isinstance(data[0], list) else 1, **{n: data}))
    ) == (f'input "{n}": datatype {dt} needs {want} in "data", got a mix of booleans and integers')


def test_zeros_and_ones_without_booleans_pass_even_when_the_body_has_true(sig: Signature) -> None:
    """The cheap checks (no 0/1 value, no true/false in the text) only skip work; the type scan decides."""
    req = sig.decode(body(inputs=inputs(f32=[0.0, 1.0], i64=[1, 0]), parameters={"binary_data_output": True}))
    assert req.inputs["f32"].tolist() == [[0.0, 1.0]] and req.inputs["i64"].tolist() == [[1, 0]]
    assert all(binary for _, binary in req.outputs)
    # true elsewhere in the body, a 0/1 in this tensor, and a bool in it: still caught
    raw = body(inputs=inputs(f32=[1.5, True]), parameters={"binary_data_output": True})
    assert error(sig, raw).endswith("got a mix of booleans and floats")


@pytest.mark.parametrize(
    ("data", "got"),
    [
        ([1, "a"], "a mix of integers and strings"),
        ([1.5, None], "a mix of floats and null"),
        ([{"x": 1}, 2.0], "a mix of floats and objects"),
        (["1", "2"], "strings"),
        ([[1, 2.5]], None),  # nested in row-major order is fine
    ],
)
def test_mixed_json_types_in_data_name_the_tensor(sig: Signature, data: list[Any], got: str | None) -> None:
    raw = body(inputs=inputs(f32=data))
    if got is None:
        assert sig.decode(raw).inputs["f32"].tolist() == [[1.0, 2.5]]
    else:
        assert error(sig, raw) == f'input "f32": datatype FP32 needs numbers in "data", got {got}'


def test_three_json_types_in_one_tensor(sig: Signature) -> None:
    raw = body(inputs=inputs(rows=2, f32=[[1, "a"], [2.0, 3]]))
    assert (
        error(sig, raw)
        == 'input "f32": datatype FP32 needs numbers in "data", got a mix of integers, floats and strings'
    )


@pytest.mark.parametrize(
    ("data", "what"),
    [
        ([[1, 2], 3], "mixes lists and single values at the same nesting level"),
        ([1, [2, 3]], "mixes lists and single values at the same nesting level"),
        ([[[1], 2]], "mixes lists and single values at the same nesting level"),
        ([[1, 2], [3]], "is ragged (nested lists of different lengths)"),
    ],
)
def test_nested_lists_mixed_with_numbers_or_ragged(sig: Signature, data: list[Any], what: str) -> None:
    assert error(sig, body(inputs=inputs(f32=data))) == (
        f'input "f32": "data" {what}; send 2 values flat or nested in row-major order'
    )


def test_v1_instances_get_the_same_checks(sig: Signature, artifact: Path) -> None:
    row = {n: [True, False] if dt == "BOOL" else [1, 2] for dt, (n, _) in TYPES.items()}
    ok = sig.decode_v1(json.dumps({"instances": [row]}).encode())
    assert ok["f32"].tolist() == [[1.0, 2.0]]
    for change, needle in [
        ({"f32": [True, 1]}, 'input "f32": datatype FP32 needs numbers in "data", got a mix of booleans and integers'),
        ({"i8": [1, 300]}, 'input "i8": a value is out of range for INT8 [-128, 127]'),
        ({"f16": [1, 1e6]}, 'input "f16": a value is out of range for FP16 [-65504, 65504]'),
    ]:
        with pytest.raises(UserError) as e:
            sig.decode_v1(json.dumps({"instances": [{**row, **change}]}).encode())
        assert e.value.message.startswith(needle)


# -- boolean parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"), [("false", '"false"'), ("true", '"true"'), (0, "0"), (1, "1"), (None, "null")]
)
def test_binary_data_output_accepts_only_json_booleans(sig: Signature, value: Any, shown: str) -> None:
    assert error(sig, body(parameters={"binary_data_output": value})) == (
        f'parameter "binary_data_output" must be true or false (a JSON boolean), got {shown}'
    )


@pytest.mark.parametrize(
    ("value", "shown"), [("false", '"false"'), ([True], "[true]"), ("x" * 100, '"' + "x" * 36 + "...")]
)
def test_binary_data_accepts_only_json_booleans(sig: Signature, value: Any, shown: str) -> None:
    raw = body(outputs=[{"name": "f32_out", "parameters": {"binary_data": value}}])
    assert (
        error(sig, raw)
        == f'output "f32_out": parameter "binary_data" must be true or false (a JSON boolean), got {shown}'
    )


def test_boolean_parameters_decide_binary_output(sig: Signature) -> None:
    req = sig.decode(body(parameters={"binary_data_output": True}, outputs=[{"name": "f32_out"}]))
    assert req.outputs == [("f32_out", True)]
    req = sig.decode(
        body(
            parameters={"binary_data_output": True},
            outputs=[{"name": "f32_out", "parameters": {"binary_data": False}}, {"name": "b_out"}],
        )
    )
    assert req.outputs == [("f32_out", False), ("b_out", True)]
    req = sig.decode(body(parameters={"binary_data_output": False}))
    assert req.outputs == [(f"{n}_out", False) for n in NAME.values()]


@pytest.mark.parametrize(
    ("request_", "msg"),
    [
        ({"parameters": [1]}, '"parameters" must be a JSON object, e.g. {"binary_data": true}; got [1]'),
        (
            {"outputs": [{"name": "f32_out", "parameters": "binary"}]},
            'output "f32_out": "parameters" must be a JSON object, e.g. {"binary_data": true}; got "binary"',
        ),
        ({"outputs": ["f32_out"]}, 'each entry of "outputs" must be an object with "name", e.g. {"name": "output"}'),
        ({"outputs": [{"name": 3}]}, "unknown output 3; this model returns"),
    ],
)
def test_parameters_and_outputs_of_the_wrong_shape(sig: Signature, request_: dict[str, Any], msg: str) -> None:
    assert error(sig, body(**request_)).startswith(msg)


def test_input_parameters_must_be_an_object(sig: Signature) -> None:
    items = [dict(i, parameters=5) if i["name"] == "i8" else i for i in inputs()]
    assert error(sig, body(inputs=items)).startswith('input "i8": "parameters" must be a JSON object')


# -- NaN / Inf and casts in answers ------------------------------------------------------------------


def outputs_like(req_inputs: dict[str, np.ndarray], **change: np.ndarray) -> dict[str, np.ndarray]:
    out = {f"{n}_out": a for n, a in req_inputs.items()}
    out.update({f"{k}_out": v for k, v in change.items()})
    return out


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_json_answer_is_a_500_naming_the_output(sig: Signature, dt: str, bad: float) -> None:
    req = sig.decode(body())
    n = NAME[dt]
    outs = outputs_like(req.inputs, **{n: np.array([[1.0, bad]], dtype=TYPES[dt][1])})
    with pytest.raises(OutputError) as e:
        sig.encode(req, outs)
    assert e.value.status == 500
    assert e.value.message == (
        f'output "{n}_out" holds NaN or Inf, which JSON cannot carry; request it with parameters.binary_data=true '
        "to get the exact values"
    )
    # only that output in binary: the rest is JSON, the bad one travels exactly
    req = sig.decode(body(outputs=[{"name": f"{n}_out", "parameters": {"binary_data": True}}, {"name": "i8_out"}]))
    data, json_len = sig.encode(req, outs)
    assert json_len is not None
    head = json.loads(data[:json_len])
    assert head["outputs"][1] == {"name": "i8_out", "datatype": "INT8", "shape": [1, 2], "data": [1, 2]}
    got = np.frombuffer(data[json_len:], np.dtype(TYPES[dt][1]).newbyteorder("<"))
    assert got[0] == 1.0 and (np.isnan(got[1]) if np.isnan(bad) else got[1] == bad)


def test_v1_answer_with_nan_is_a_500_naming_the_output(sig: Signature) -> None:
    ins = sig.decode(body()).inputs
    with pytest.raises(OutputError) as e:
        sig.encode_v1(outputs_like(ins, f32=np.array([[np.nan, 1]], np.float32)))
    assert e.value.message.startswith('output "f32_out" holds NaN or Inf, which JSON cannot carry; V1 has no binary')
    assert json.loads(sig.encode_v1(outputs_like(ins)))["predictions"][0]["f32_out"] == [1.0, 2.0]


def test_a_cast_the_answer_cannot_hold_is_a_500_not_a_wrap(sig: Signature) -> None:
    """The runtime returned another dtype than model.yaml says: converting must not change values silently."""
    req = sig.decode(body())
    cases = [
        (
            "i8",
            np.array([[1, 300]], np.int64),
            'output "i8_out": the model returned int64 values out of range for INT8',
        ),
        (
            "u8",
            np.array([[-1, 2]], np.int16),
            'output "u8_out": the model returned int16 values out of range for UINT8',
        ),
        ("f32", np.array([[1.0, 1e39]]), 'output "f32_out": the model returned float64 values out of range for FP32'),
        (
            "i32",
            np.array([[np.nan, 1.0]]),
            'output "i32_out": the model returned float64 values out of range for INT32',
        ),
    ]
    for n, arr, msg in cases:
        with pytest.raises(DlstackError) as e:
            sig.encode(req, outputs_like(req.inputs, **{n: arr}))
        assert e.value.status == 500 and e.value.message.startswith(msg), (n, e.value.message)
    # in range: converted to the signature's dtype exactly
    fine = outputs_like(req.inputs, i8=np.array([[-128, 127]], np.int64), f32=np.array([[0.5, -2.0]]))
    out = json.loads(sig.encode(req, fine)[0])["outputs"]
    by_name = {t["name"]: t for t in out}
    assert by_name["i8_out"]["data"] == [-128, 127] and by_name["f32_out"]["data"] == [0.5, -2.0]


# -- through a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(artifact: Path) -> Iterator[ServerHandle]:
    with start_server(artifact, workers=1) as s:
        yield s


def post(srv: ServerHandle, raw: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        f"{srv.url}/v2/models/identity/infer",
        data=raw,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=30,
    )


def test_server_answers_bad_semantics_with_one_line_400s(srv: ServerHandle) -> None:
    pids = srv.worker_pids()
    many = [{"name": "f64_out"}] * 10_000  # used to multiply the answer 10,000 times
    cases = [
        (body(outputs=many), 'output "f64_out" is requested twice; name each output once'),
        (
            body(inputs=inputs(f32=[1.0, 1e39])),
            'input "f32": a value is out of range for FP32 [-3.4028235e+38, 3.4028235e+38] and would become Inf; '
            "send values within it (NaN or Inf travel only as binary data)",
        ),
        (
            body(parameters={"binary_data_output": "false"}),
            'parameter "binary_data_output" must be true or false (a JSON boolean), got "false"',
        ),
        (
            body(inputs=inputs(f32=[True, 1])),
            'input "f32": datatype FP32 needs numbers in "data", got a mix of booleans and integers',
        ),
        (body(inputs=inputs(u8=[1, 256])), 'input "u8": a value is out of range for UINT8 [0, 255]'),
        (
            body(inputs=inputs(i16=[[1, 2], 3])),
            'input "i16": "data" mixes lists and single values at the same nesting level; send 2 values flat or '
            "nested in row-major order",
        ),
    ]
    for raw, msg in cases:
        r = post(srv, raw)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": msg}
        assert len(r.content) < 400  # the answer is the message, nothing multiplied
    assert srv.worker_pids() == pids
    ok = post(srv, body(outputs=[{"name": "f64_out"}]))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [1.0, 2.0]


def test_server_nan_output_is_a_500_in_json_and_exact_in_binary(srv: ServerHandle) -> None:
    """A NaN input passes (reject_nonfinite is off) and comes back out: never as a silent null."""
    nan_row = np.array([np.nan, 2.0], "<f4").tobytes()
    header = {
        "inputs": [
            dict(i, parameters={"binary_data_size": len(nan_row)}) if i["name"] == "f32" else i for i in inputs()
        ],
        "outputs": [{"name": "f32_out"}],
    }
    for item in header["inputs"]:
        if item["name"] == "f32":
            del item["data"]
    head = json.dumps(header).encode()
    hdr = {"Inference-Header-Content-Length": str(len(head))}
    r = post(srv, head + nan_row, hdr)
    assert r.status_code == 500
    answer = json.loads(r.content)  # valid JSON, with the request id to find it in the log
    assert answer["error"] == (
        'output "f32_out" holds NaN or Inf, which JSON cannot carry; request it with parameters.binary_data=true '
        "to get the exact values"
    )
    assert answer["request_id"]

    header["outputs"] = [{"name": "f32_out", "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    r = post(srv, head + nan_row, {"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    got = np.frombuffer(r.content[n:], "<f4")
    assert np.isnan(got[0]) and got[1] == 2.0


def test_a_nan_the_model_returns_in_another_float_dtype_travels_in_binary(sig: Signature) -> None:
    """Casting keeps NaN/Inf (only finite values that overflow are refused), so binary carries them."""
    req = sig.decode(body(outputs=[{"name": "f32_out", "parameters": {"binary_data": True}}]))
    data, json_len = sig.encode(req, outputs_like(req.inputs, f32=np.array([[np.nan, -np.inf]])))
    assert json_len is not None
    got = np.frombuffer(data[json_len:], "<f4")
    assert np.isnan(got[0]) and got[1] == -np.inf


def test_zeros_and_ones_in_a_body_without_true_or_false(tmp_path: Path) -> None:
    """An FP32-only model (the torch MLP): the text check can prove there is no boolean, or not."""
    from tests.conftest import make_torch_mlp_artifact

    mlp = Signature(load_spec(make_torch_mlp_artifact(tmp_path / "mlp")))

    def req(data: list[Any]) -> bytes:
        return json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": data}]}).encode()

    ok = mlp.decode(req([0, 1, 0.0, 1.0, 0, 0, 0.5, 1]))
    assert ok.inputs["input"].tolist() == [[0, 1, 0, 1, 0, 0, 0.5, 1]]
    for data in ([0, 1, 0.0, True, 0, 0, 0.5, 1], [False, 1, 2, 3, 4, 5, 6, 7]):
        with pytest.raises(UserError) as e:
            mlp.decode(req(data))
        assert e.value.message.startswith('input "input": datatype FP32 needs numbers in "data", got a mix of booleans')
