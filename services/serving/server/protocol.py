"""Open Inference Protocol V2 (JSON + binary tensor extension) and KServe V1 codecs.

Everything a request can get wrong is checked here against a signature compiled once per
worker, and reported as a ``UserError`` (400) that names the tensor, what was expected and
what arrived. Nothing in here touches Flask, so it is cheap to test and to profile.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

from services.serving.artifact import Datatype, ModelSpec, TensorSpec
from services.serving.errors import DlstackError, UserError

Tensors = dict[str, np.ndarray]

_NUMPY_OPT = orjson.OPT_SERIALIZE_NUMPY
_LEN = struct.Struct("<I")
# JSON numbers numpy may turn into each datatype (kinds: b bool, i int, u uint, f float).
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "booleans (true/false)", "iu": "integers", "iuf": "numbers"}
# How an error names the JSON values it found, in this order when they are mixed.
_TYPE_WORDS = {bool: "booleans", int: "integers", float: "floats", str: "strings", type(None): "null", dict: "objects"}


class OutputError(DlstackError):
    """The model produced something the response cannot carry faithfully: a server-side fault, never the client's."""

    status = 500


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorCodec:
    """One signature tensor, precompiled: numpy dtype, little-endian wire dtype, item size."""

    spec: TensorSpec
    name: str = field(init=False)
    datatype: str = field(init=False)
    dtype: np.dtype[Any] = field(init=False)
    wire: np.dtype[Any] = field(init=False)  # little-endian dtype of the binary extension
    json_kinds: str = field(init=False)

    def __post_init__(self) -> None:
        dt = self.spec.datatype.numpy
        object.__setattr__(self, "name", self.spec.name)
        object.__setattr__(self, "datatype", self.spec.datatype.value)
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "wire", dt.newbyteorder("<") if dt.kind != "O" else dt)
        object.__setattr__(self, "json_kinds", _JSON_KINDS.get(dt.kind, ""))

    def check_shape(self, shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UserError(
                f'input "{self.name}": "shape" must be a list of non-negative integers, e.g. '
                f"{shape_str([1 if d == -1 else d for d in self.spec.shape])}; got {shape!r}"
            )
        got = tuple(shape)
        if not self.spec.matches(got):
            raise UserError(
                f'input "{self.name}": expected shape {shape_str(self.spec.shape)}, got {shape_str(got)} '
                "(-1 = any size)"
            )
        if got and got[0] == 0:
            raise UserError(f'input "{self.name}": the batch dimension (dim 0) must be at least 1, got 0')
        return got

    def from_json(self, data: Any, shape: tuple[int, ...], text: bytes | None = None) -> np.ndarray:
        """``data`` as this tensor; ``text``, the JSON it was parsed from, when known, speeds up _hides_bools."""
        count = math.prod(shape)
        if self.dtype.kind == "O":
            flat = _flatten(data) if isinstance(data, list) else None
            if flat is None or not all(isinstance(s, str) for s in flat):
                raise UserError(
                    f'input "{self.name}": BYTES data must be a list of strings in JSON '
                    "(send raw bytes with the binary tensor extension)"
                )
            if len(flat) != count:
                raise UserError(f'input "{self.name}": shape {shape_str(shape)} needs {count} values, got {len(flat)}')
            arr = np.empty(count, dtype=object)
            arr[:] = [s.encode() for s in flat]
            return arr.reshape(shape)
        if not isinstance(data, list):
            raise UserError(f'input "{self.name}": "data" must be a list of {_KIND_WORDS[self.json_kinds]}')
        try:
            raw = np.asarray(data)
        except (ValueError, TypeError):
            what = (
                "mixes lists and single values at the same nesting level"
                if _mixes_depths(data)
                else "is ragged (nested lists of different lengths)"
            )
            raise UserError(
                f'input "{self.name}": "data" {what}; send {count} values flat or nested in row-major order'
            ) from None
        if self.dtype.kind in "iu" and raw.dtype.kind in "fO" and count:
            raw = self._wide_ints(data, raw)
        if raw.size != count:
            raise UserError(f'input "{self.name}": shape {shape_str(shape)} needs {count} values, got {raw.size}')
        if count and (
            raw.dtype.kind not in self.json_kinds or (raw.dtype.kind != "b" and _hides_bools(data, raw, text))
        ):
            raise UserError(
                f'input "{self.name}": datatype {self.datatype} needs {_KIND_WORDS[self.json_kinds]} in "data", '
                f"got {_describe(data, raw)}"
            )
        if count and self.dtype.kind in "iu" and raw.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            lo, hi = raw.min(), raw.max()
            if lo < info.min or hi > info.max:
                raise UserError(  # no value in the message: payloads never reach the logs
                    f'input "{self.name}": a value is out of range for {self.datatype} [{info.min}, {info.max}]'
                )
        if self.dtype.kind != "f" or raw.dtype == self.dtype:
            return raw.astype(self.dtype, copy=False).reshape(shape)
        # JSON numbers are always finite (orjson refuses NaN, Infinity and 1e400), so overflow is the
        # only way to an Inf; the cast itself reports it, which costs no extra pass over the data.
        try:
            with np.errstate(over="raise"):
                arr = raw.astype(self.dtype)
        except FloatingPointError:
            top = float(np.finfo(self.dtype).max)
            raise UserError(
                f'input "{self.name}": a value is out of range for {self.datatype} [{-top:.8g}, {top:.8g}] and '
                "would become Inf; send values within it (NaN or Inf travel only as binary data)"
            ) from None
        return arr.reshape(shape)

    def _wide_ints(self, data: list[Any], raw: np.ndarray) -> np.ndarray:
        """numpy reads ints beyond int64 (UINT64 values) as float or object; convert them exactly."""
        flat = _flatten(data)
        info = np.iinfo(self.dtype)
        out_of_range = UserError(
            f'input "{self.name}": a value is out of range for {self.datatype} [{info.min}, {info.max}]'
        )
        if not all(type(x) is int for x in flat):
            # orjson reads integers beyond 64 bits as floats, which round to -2**63 or 2**64 at the nearest
            if any(
                type(x) is float and x.is_integer() and (x <= -(2**63) or not info.min <= x <= info.max) for x in flat
            ):
                raise out_of_range
            return raw  # real floats or junk: the kind check below reports it
        try:
            return np.asarray(data, dtype=self.dtype)
        except OverflowError:
            raise out_of_range from None

    def from_binary(self, buf: memoryview, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        if self.dtype.kind == "O":
            items = _unpack_bytes(self.name, buf)
            if len(items) != count:
                raise UserError(
                    f'input "{self.name}": shape {shape_str(shape)} needs {count} BYTES elements, '
                    f"binary data holds {len(items)}"
                )
            arr = np.empty(count, dtype=object)
            arr[:] = items
            return arr.reshape(shape)
        want = count * self.dtype.itemsize
        if len(buf) != want:
            raise UserError(
                f'input "{self.name}": binary_data_size is {len(buf)} bytes but shape {shape_str(shape)} of '
                f"{self.datatype} needs {want}"
            )
        return np.frombuffer(buf, dtype=self.wire).reshape(shape)


def _describe(data: list[Any], raw: np.ndarray) -> str:
    """What "data" holds, in words, for an error (never the values: payloads never reach the logs)."""
    types = set(map(type, _flatten(data)))
    words = [w for t, w in _TYPE_WORDS.items() if t in types] or ["values of other types"]
    if len(words) > 1:
        return "a mix of " + ", ".join(words[:-1]) + " and " + words[-1]
    if raw.dtype.kind == "O" and words == ["integers"]:
        return "integers beyond the 64-bit range"
    return words[0]


def _hides_bools(data: list[Any], raw: np.ndarray, text: bytes | None) -> bool:
    """Whether JSON true/false sit among numbers, where numpy silently reads them as 1/0.

    Three steps, cheapest first, so the hot path stays as fast as before: only an element equal to
    0 or 1 can be one (vectorised; most float data stops there), then the JSON text must contain
    true or false, and only then are the elements' Python types looked at.
    """
    if not ((raw == 0) | (raw == 1)).any():
        return False
    if text is not None and not _may_hold_bools(text):
        return False
    leaves: Iterable[Any] = data
    for _ in range(raw.ndim - 1):  # np.asarray succeeded, so the nesting is uniform: raw.ndim levels
        leaves = chain.from_iterable(leaves)
    return bool in set(map(type, leaves))


def _may_hold_bools(text: bytes) -> bool:
    """Whether JSON text has "ue" or "se" (true, false, or a string): numbers only put digits or a sign
    after an "e", so on number-heavy bodies this is ~10x faster than searching for the words."""
    b = np.frombuffer(text, np.uint8)
    before_e = b[np.flatnonzero(b[1:] == 0x65)]  # 0x65 "e"; b[i] is the byte before b[i + 1]
    return bool(((before_e == 0x75) | (before_e == 0x73)).any())  # "u", "s"


def _mixes_depths(data: list[Any]) -> bool:
    """Whether some list holds both lists and single values (else np.asarray failed on ragged rows)."""
    stack = [data]
    while stack:  # explicit stack: deeply nested bad input must not hit the recursion limit
        item = stack.pop()
        nested = [x for x in item if isinstance(x, list)]
        if nested and len(nested) != len(item):
            return True
        stack.extend(nested)
    return False


def _flatten(data: list[Any]) -> list[Any]:
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []
    stack = [data]
    # Explicit stack: deeply nested bad input must not hit the recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _unpack_bytes(name: str, buf: memoryview) -> list[bytes]:
    items: list[bytes] = []
    off, end = 0, len(buf)
    while off < end:
        if off + 4 > end:
            raise UserError(f'input "{name}": BYTES binary data ends inside a 4-byte length prefix')
        (n,) = _LEN.unpack_from(buf, off)
        off += 4
        if off + n > end:
            raise UserError(f'input "{name}": BYTES element of {n} bytes runs past the end of its binary data')
        items.append(bytes(buf[off : off + n]))
        off += n
    return items


def _pack_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


@dataclass
class InferRequest:
    """A decoded V2 request: validated, batch-first inputs and the outputs to send back."""

    id: str | None
    inputs: Tensors
    outputs: list[tuple[str, bool]]  # (output name, as binary) in response order


class Signature:
    """The model's signature compiled for decoding requests and encoding responses."""

    def __init__(self, spec: ModelSpec, reject_nonfinite: bool = False) -> None:
        self.model = spec.name
        self.version = spec.version
        self.inputs = {t.name: TensorCodec(t) for t in spec.signature.inputs}
        self.outputs = {t.name: TensorCodec(t) for t in spec.signature.outputs}
        self.reject_nonfinite = reject_nonfinite
        self._input_names = ", ".join(f'"{n}"' for n in self.inputs)
        self._output_names = ", ".join(f'"{n}"' for n in self.outputs)

    # -- V2 ---------------------------------------------------------------------------------
    def decode(self, body: bytes, header_length: str | None = None) -> InferRequest:
        """Decode a V2 infer body; ``header_length`` is the ``Inference-Header-Content-Length`` header."""
        binary: memoryview | None = None
        if header_length is not None:
            try:
                n = int(header_length)
            except ValueError:
                raise UserError(
                    f"Inference-Header-Content-Length must be an integer byte count, got {header_length!r}"
                ) from None
            if n < 0 or n > len(body):
                raise UserError(
                    f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes; it must be "
                    "the length of the JSON header that starts the body"
                )
            binary = memoryview(body)[n:]
            body = body[:n]
        req = _loads(body)
        if not isinstance(req, dict):
            raise UserError('the request body must be a JSON object with "inputs", e.g. {"inputs": [...]}')
        rid = req.get("id")
        if rid is not None and not isinstance(rid, str):
            raise UserError(f'"id" must be a string, got {type(rid).__name__}')
        items = req.get("inputs")
        if not isinstance(items, list) or not items:
            raise UserError(f'"inputs" must be a non-empty list of tensors; this model takes {self._input_names}')
        inputs: Tensors = {}
        offset = 0
        for item in items:
            codec = self._input_codec(item, inputs)
            shape = codec.check_shape(item.get("shape"))
            params = _parameters(item, f'input "{codec.name}": ')
            size = params.get("binary_data_size")
            if size is not None:
                if binary is None:
                    raise UserError(
                        f'input "{codec.name}" has binary_data_size but the request has no '
                        "Inference-Header-Content-Length header"
                    )
                if type(size) is not int or size < 0:
                    raise UserError(f'input "{codec.name}": binary_data_size must be a non-negative integer')
                if offset + size > len(binary):
                    raise UserError(
                        f'input "{codec.name}": binary_data_size {size} runs past the end of the body '
                        f"({len(binary) - offset} binary bytes left)"
                    )
                arr = codec.from_binary(binary[offset : offset + size], shape)
                offset += size
            elif "data" in item:
                arr = codec.from_json(item["data"], shape, body)
            else:
                raise UserError(f'input "{codec.name}": needs "data" or parameters.binary_data_size')
            inputs[codec.name] = arr
        if binary is not None and offset != len(binary):
            raise UserError(
                f"the body has {len(binary) - offset} bytes after the JSON header and the inputs' binary data; "
                "Inference-Header-Content-Length or binary_data_size is wrong"
            )
        self._check_inputs(inputs)
        return InferRequest(id=rid, inputs=inputs, outputs=self._select_outputs(req))

    def _input_codec(self, item: Any, seen: Tensors) -> TensorCodec:
        if not isinstance(item, dict):
            raise UserError('each entry of "inputs" must be an object with "name", "shape", "datatype" and "data"')
        name = item.get("name")
        codec = self.inputs.get(name) if isinstance(name, str) else None
        if codec is None:
            raise UserError(f"unknown input {name!r}; this model takes {self._input_names}")
        if name in seen:
            raise UserError(f'input "{name}" is given more than once; name each input once')
        dt = item.get("datatype")
        if dt != codec.datatype:
            raise UserError(f'input "{name}": expected datatype {codec.datatype}, got {dt!r}')
        return codec

    def _check_inputs(self, inputs: Tensors) -> None:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise UserError(
                f"missing input(s) {', '.join(repr(m) for m in missing)}; this model takes {self._input_names}"
            )
        if len(inputs) > 1:
            rows = {n: a.shape[0] for n, a in inputs.items() if a.ndim}
            if len(set(rows.values())) > 1:
                raise UserError(f"all inputs must have the same batch size (dim 0), got {rows}")
        if self.reject_nonfinite:
            for n, a in inputs.items():
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    raise UserError(f'input "{n}": contains NaN or Inf, which this model rejects (reject_nonfinite)')

    def _select_outputs(self, req: dict[str, Any]) -> list[tuple[str, bool]]:
        default_binary = _flag(_parameters(req, ""), "binary_data_output", False, "")
        wanted = req.get("outputs")
        if wanted is None:
            return [(n, default_binary) for n in self.outputs]
        if not isinstance(wanted, list):
            raise UserError('"outputs" must be a list of {"name": ...} objects')
        out: list[tuple[str, bool]] = []
        seen: set[str] = set()
        for o in wanted:
            if not isinstance(o, dict):
                raise UserError('each entry of "outputs" must be an object with "name", e.g. {"name": "output"}')
            name = o.get("name")
            if not isinstance(name, str) or name not in self.outputs:
                raise UserError(f"unknown output {name!r}; this model returns {self._output_names}")
            # a repeated name would repeat the whole tensor in the answer: an easy amplification attack
            if name in seen:
                raise UserError(f'output "{name}" is requested twice; name each output once')
            seen.add(name)
            where = f'output "{name}": '
            p = _parameters(o, where)
            if p.get("classification"):
                raise UserError("the classification extension is not supported; request the raw output instead")
            out.append((name, _flag(p, "binary_data", default_binary, where)))
        return out

    def encode(self, req: InferRequest, outputs: Tensors) -> tuple[bytes, int | None]:
        """Encode a V2 response; returns (body, JSON header length when binary outputs follow it)."""
        tensors = []
        chunks: list[bytes] = []
        for name, binary in req.outputs:
            codec = self.outputs[name]
            arr = _as_datatype(codec, outputs[name])
            t: dict[str, Any] = {"name": name, "datatype": codec.datatype, "shape": arr.shape}
            if binary:
                raw = _pack_bytes(arr) if codec.dtype.kind == "O" else np.ascontiguousarray(arr, codec.wire).tobytes()
                t["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                t["data"] = _json_data(name, arr)
            tensors.append(t)
        resp: dict[str, Any] = {"model_name": self.model, "model_version": self.version, "outputs": tensors}
        if req.id is not None:
            resp["id"] = req.id
        head = orjson.dumps(resp, option=_NUMPY_OPT)
        if not chunks:
            return head, None
        return b"".join([head, *chunks]), len(head)

    # -- KServe V1 --------------------------------------------------------------------------
    def decode_v1(self, body: bytes) -> Tensors:
        """``{"instances": [row, ...]}``; rows are dicts keyed by input name when the model has several."""
        req = _loads(body)
        inst = req.get("instances") if isinstance(req, dict) else None
        if not isinstance(inst, list) or not inst:
            raise UserError('the V1 body must be {"instances": [row, ...]} with at least one row')
        inputs: Tensors = {}
        if len(self.inputs) == 1:
            columns = {next(iter(self.inputs)): inst}
        else:
            if not all(isinstance(r, dict) for r in inst):
                raise UserError(
                    f"this model takes several inputs ({self._input_names}); each instance must be an object"
                )
            columns = {n: [r.get(n) for r in inst] for n in self.inputs}
        for name, rows in columns.items():
            codec = self.inputs[name]
            try:
                probe = np.asarray(rows, dtype=object if codec.dtype.kind == "O" else None)
            except (ValueError, TypeError):
                raise UserError(f'input "{name}": instances are ragged; every row must have the same shape') from None
            shape = codec.check_shape(list(probe.shape))
            inputs[name] = codec.from_json(rows, shape, body)
        self._check_inputs(inputs)
        return inputs

    def encode_v1(self, outputs: Tensors) -> bytes:
        names = list(self.outputs)
        arrays = {n: _as_datatype(self.outputs[n], outputs[n]) for n in names}
        if len(names) == 1:
            preds: Any = _json_rows(names[0], arrays[names[0]])
        else:
            cols = {n: _json_rows(n, arrays[n]) for n in names}
            preds = [{n: cols[n][i] for n in names} for i in range(len(outputs[names[0]]))]
        return orjson.dumps({"predictions": preds}, option=_NUMPY_OPT)


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UserError(f"the request body is not valid JSON: {exc}") from None


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The "parameters" object of a request, input or output ({} when absent)."""
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise UserError(f'{where}"parameters" must be a JSON object, e.g. {{"binary_data": true}}; got {_short(p)}')
    return p


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter: only JSON true/false, so "false" (a truthy string) can never mean true."""
    v = params.get(key, default)
    if type(v) is not bool:
        raise UserError(f'{where}parameter "{key}" must be true or false (a JSON boolean), got {_short(v)}')
    return v


def _short(v: Any) -> str:
    """A client-sent value as JSON, cut short: enough to see the mistake, never a whole payload."""
    try:
        text = orjson.dumps(v).decode()
    except TypeError:  # pragma: no cover - orjson.loads only yields serialisable values
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_datatype(codec: TensorCodec, arr: np.ndarray) -> np.ndarray:
    """The model's output in the signature's dtype; a cast that changes values is the model's fault (500)."""
    if arr.dtype == codec.dtype:
        return arr
    bad = False
    if arr.dtype.kind in "iu" and codec.dtype.kind in "iu" and arr.size:  # integer casts wrap silently
        info = np.iinfo(codec.dtype)
        bad = arr.min() < info.min or arr.max() > info.max
    try:
        with np.errstate(over="raise", invalid="raise"):  # a float cast reports overflow and NaN -> int itself
            out = arr.astype(codec.dtype)
    except FloatingPointError:
        bad = True
    if bad:
        raise OutputError(
            f'output "{codec.name}": the model returned {arr.dtype} values out of range for {codec.datatype}; '
            "fix the model or its signature in model.yaml"
        )
    return out


def _reject_nonfinite_json(name: str, arr: np.ndarray, hint: str) -> None:
    # orjson writes NaN and Inf as null: a 200 with silently changed numbers is worse than an error.
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise OutputError(f'output "{name}" holds NaN or Inf, which JSON cannot carry; {hint}')


def _json_data(name: str, arr: np.ndarray) -> Any:
    if arr.dtype.kind == "O":
        try:
            return [b.decode() if isinstance(b, bytes) else str(b) for b in arr.ravel()]
        except UnicodeDecodeError:
            raise UserError(
                f'output "{name}" holds bytes that are not UTF-8; request it with parameters.binary_data=true'
            ) from None
    _reject_nonfinite_json(name, arr, "request it with parameters.binary_data=true to get the exact values")
    return np.ascontiguousarray(arr).ravel()


def _json_rows(name: str, arr: np.ndarray) -> Any:
    """Rows as nested lists; numeric arrays go to orjson as numpy (float32 stays shortest float32 text)."""
    if arr.dtype.kind == "O":
        return np.asarray(_json_data(name, arr), dtype=object).reshape(arr.shape).tolist()
    _reject_nonfinite_json(name, arr, "V1 has no binary form; use the V2 infer route with parameters.binary_data=true")
    return np.ascontiguousarray(arr)


def datatype_of(arr: np.ndarray) -> str:
    return Datatype.from_numpy(arr.dtype).value
