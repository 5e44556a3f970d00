"""ONNX runtime: an onnxruntime InferenceSession on the CPU execution provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from services.serving.artifact import Datatype
from services.serving.errors import UserError
from services.serving.runtimes.base import Runtime, check_names, check_tensor

# ONNX Runtime type strings -> V2 datatypes (the ones a model signature can use)
ORT_TYPES: dict[str, Datatype] = {
    "tensor(bool)": Datatype.BOOL,
    "tensor(uint8)": Datatype.UINT8,
    "tensor(uint16)": Datatype.UINT16,
    "tensor(uint32)": Datatype.UINT32,
    "tensor(uint64)": Datatype.UINT64,
    "tensor(int8)": Datatype.INT8,
    "tensor(int16)": Datatype.INT16,
    "tensor(int32)": Datatype.INT32,
    "tensor(int64)": Datatype.INT64,
    "tensor(float16)": Datatype.FP16,
    "tensor(float)": Datatype.FP32,
    "tensor(double)": Datatype.FP64,
    "tensor(string)": Datatype.BYTES,
}


class OnnxRuntime(Runtime):
    framework = "onnx"

    def _load(self) -> None:
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initializers are noise in server logs
        try:
            self.session = ort.InferenceSession(str(self.file()), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise self.error(f"onnxruntime cannot load the model ({exc}); export it with torch.onnx.export") from exc
        sig = self.spec.signature
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        check_names(self, "inputs", [t.name for t in sig.inputs], list(ins))
        check_names(self, "outputs", [t.name for t in sig.outputs], list(outs))
        for t in (*sig.inputs, *sig.outputs):
            node = ins.get(t.name) or outs[t.name]
            check_tensor(self, t, ORT_TYPES.get(node.type), node.shape)
        self._out_names = [t.name for t in sig.outputs]
        self._text_inputs = [t.name for t in sig.inputs if t.datatype is Datatype.BYTES]

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {t.name: inputs[t.name] for t in self.spec.signature.inputs}
        for name in self._text_inputs:
            feed[name] = _as_text(name, feed[name])
        results = self.session.run(self._out_names, feed)
        return {name: np.asarray(r) for name, r in zip(self._out_names, results, strict=True)}


def _as_text(name: str, arr: np.ndarray) -> np.ndarray:
    """ONNX string tensors are UTF-8 text; onnxruntime would stringify raw ``bytes`` as "b'...'"."""
    if arr.dtype.kind == "U":
        return arr

    def decode(v: object) -> str:
        if isinstance(v, bytes | bytearray):
            try:
                return bytes(v).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f'input "{name}": ONNX string tensors hold UTF-8 text, got bytes that are not valid UTF-8 '
                    f"at offset {exc.start}; send text, or use a UINT8 input for raw bytes"
                ) from exc
        return str(v)

    out = np.empty(arr.shape, dtype=object)
    for idx, v in np.ndenumerate(arr):
        out[idx] = decode(v)
    return out
