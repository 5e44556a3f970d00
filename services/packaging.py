"""``dlstack package``: turn a framework model file into an artifact (``model.yaml`` + the file, hashed).

The signature is inferred where the file describes itself (ONNX graph, Keras inputs/outputs, the SavedModel
``serving_default`` signature, a torch.export graph). TorchScript does not record dtypes or shapes, so its
inputs must be given; its outputs are then measured with two trial forward passes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services import outdir
from services.serving import names
from services.serving.artifact import (
    MODEL_YAML,
    ArtifactError,
    Datatype,
    FileEntry,
    Framework,
    ModelSpec,
    Serving,
    Signature,
    TensorSpec,
    format_validation_error,
    tree_sha256,
    write_spec,
)
from services.serving.errors import UserError

# file name inside the artifact, per framework and source suffix; one fixed name keeps image builds simple
TORCHSCRIPT_FILE = "model.pt"
EXPORT_FILE = "model.pt2"
KERAS_FILE = "model.keras"
ONNX_FILE = "model.onnx"
SAVEDMODEL_DIR = "saved_model"

SHAPE_HELP = "dims separated by 'x' or ',', -1 for a variable dim, batch dim first, e.g. -1x784 or -1,3,64,64"


# -- parsing --------------------------------------------------------------------------------------------------


def parse_shape(text: str, what: str = "shape") -> tuple[int, ...]:
    """``-1x784`` / ``-1,784`` / ``[-1, 784]`` -> (-1, 784)."""
    body = text.strip().strip("[]()").replace(" ", "")
    sep = "," if "," in body else "x"
    parts = body.split(sep) if body else []
    dims: list[int] = []
    for p in parts:
        try:
            d = int(p)
        except ValueError:
            raise UserError(f"{what} {text!r}: {p!r} is not an integer dim; {SHAPE_HELP}") from None
        if d == 0 or d < -1:
            raise UserError(f"{what} {text!r}: dim {d} is invalid; dims are positive or -1 (variable)")
        dims.append(d)
    if not dims:
        raise UserError(f"{what} {text!r} is empty; {SHAPE_HELP}")
    return tuple(dims)


def _datatype_aliases() -> dict[str, Datatype]:
    """Lower-case spellings users copy from numpy and torch, each naming exactly one V2 datatype."""
    aliases: dict[str, Datatype] = {}
    for dt in Datatype:
        aliases[dt.value.lower()] = dt
        if dt is not Datatype.BYTES:
            np_name = dt.numpy.name  # float32, int64, bool, ...
            for prefix in ("", "np.", "numpy.", "torch."):
                aliases[prefix + np_name] = dt
    for name, dt in {"half": Datatype.FP16, "double": Datatype.FP64, "short": Datatype.INT16}.items():
        for prefix in ("", "np.", "numpy.", "torch."):
            aliases[prefix + name] = dt
    # torch's own names. Bare "float" and "int" are no aliases: numpy reads them as float64 and int64,
    # torch as float32 and int32; numpy's "long" is 32 bits on Windows.
    aliases.update({"torch.float": Datatype.FP32, "torch.int": Datatype.INT32})
    aliases.update({"long": Datatype.INT64, "torch.long": Datatype.INT64})
    for name in ("bytes", "object", "str", "np.bytes_", "np.object_", "np.str_"):
        aliases[name] = Datatype.BYTES
    return aliases


_DATATYPE_ALIASES = _datatype_aliases()


def parse_datatype(text: str, what: str = "datatype") -> Datatype:
    """A V2 datatype name or a numpy/torch spelling of one (float32, torch.float16, half ...), case-insensitive."""
    found = _DATATYPE_ALIASES.get(text.strip().lower())
    if found is not None:
        return found
    valid = ", ".join(d.value for d in Datatype)
    raise UserError(
        f"{what} {text!r} is not a datatype; use one of {valid} "
        "(numpy/torch names also work: float32, torch.float16, half, double, int64, bool, ...)"
    )


def parse_tensor(text: str, flag: str = "--input") -> TensorSpec:
    """``NAME:DTYPE:SHAPE`` -> TensorSpec; the name may itself contain ':' (TF tensor names)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise UserError(f"{flag} {text!r}: expected NAME:DTYPE:SHAPE, e.g. {flag} input:FP32:-1x784")
    name, dtype, shape = parts
    return TensorSpec(
        name=name,
        datatype=parse_datatype(dtype, f"{flag} {text!r}: datatype"),
        shape=parse_shape(shape, f"{flag} {text!r}: shape"),
    )


# -- framework errors -------------------------------------------------------------------------------------------

# The line that names the error at the end of a TorchScript interpreter trace, e.g. "RuntimeError: mat1 and ...".
_FINAL_ERROR_RE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception)): ", re.MULTILINE)
_MAX_MESSAGE = 2000  # only a dump (a whole config or graph) is longer; keeps one error from flooding the terminal


def framework_message(exc: BaseException) -> str:
    """The framework's own message on one line: the part that says what went wrong, never cut at a newline.

    A TorchScript error starts with "The following operation failed in the TorchScript interpreter."
    and a trace of serialized code; what helps ("mat1 and mat2 shapes cannot be multiplied (1x783
    and 784x512)") is the last error line, so that line and what follows it are kept.
    """
    text = str(exc).strip()
    if "Traceback of TorchScript" in text:
        finals = list(_FINAL_ERROR_RE.finditer(text))
        if finals:
            text = text[finals[-1].end() :]
    line = " ".join(text.split()) or type(exc).__name__
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


# -- inference --------------------------------------------------------------------------------------------------


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    """Framework dims (int = fixed; None, str or a symbol = dynamic) -> model.yaml dims (-1 = variable)."""
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


def _tensor(name: str, dtype: Datatype | None, shape: Sequence[Any] | None, where: str) -> TensorSpec:
    if dtype is None:
        raise UserError(f"{where}: tensor {name!r} has a datatype with no V2 equivalent; it cannot be served")
    if shape is None:
        raise UserError(f"{where}: tensor {name!r} has unknown rank; give it explicitly with NAME:DTYPE:SHAPE")
    return TensorSpec(name=name, datatype=dtype, shape=_dims(shape))


def _out_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def infer_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have many types
        raise UserError(f"{path}: not an ONNX model ({framework_message(exc)})") from exc
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise UserError(f"{path}: weights stored as external data are not supported; save with one file")
    initializers = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        try:
            dt: Datatype | None = Datatype.from_numpy(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, ArtifactError, TypeError):
            dt = None
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        return _tensor(vi.name, dt, shape, str(path))

    return [spec(i) for i in model.graph.input if i.name not in initializers], [spec(o) for o in model.graph.output]


def infer_keras(path: Path, backend: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from services.serving.runtimes.keras import import_keras, keras_dtype, output_names

    keras = import_keras(backend)
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # keras wraps many error types while deserializing
        raise UserError(
            f"{path}: keras cannot load it ({framework_message(exc)}); save the model with model.save('model.keras')"
        ) from exc
    if not getattr(model, "inputs", None):
        raise UserError(f"{path}: the model was never built, so it has no inputs; build it with keras.Input(...)")
    ins = [_tensor(t.name, keras_dtype(t.dtype), t.shape, str(path)) for t in model.inputs]
    names = output_names(model)
    outs = [_tensor(n, keras_dtype(t.dtype), t.shape, str(path)) for n, t in zip(names, model.outputs, strict=True)]
    return ins, outs


def infer_savedmodel(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from services.serving.runtimes.tensorflow import serving_signature, tf_dtype, tf_shape

    try:
        _, fn = serving_signature(str(path))
    except ArtifactError:
        raise
    except Exception as exc:  # TF raises many error types for a broken SavedModel
        raise UserError(f"{path}: not a loadable SavedModel ({framework_message(exc)})") from exc
    ins: Mapping[str, Any] = fn.structured_input_signature[1]
    outs: Mapping[str, Any] = fn.structured_outputs
    # sorted: TF does not keep a stable order for the signature's dicts, and model.yaml must be reproducible
    return (
        [_tensor(n, tf_dtype(s.dtype), tf_shape(s), str(path)) for n, s in sorted(ins.items())],
        [_tensor(n, tf_dtype(s.dtype), tf_shape(s), str(path)) for n, s in sorted(outs.items())],
    )


def _torch_dtype(t: Any) -> Datatype | None:
    import torch

    try:
        return Datatype.from_numpy(torch.empty((), dtype=t.dtype).numpy().dtype)
    except (TypeError, ArtifactError, RuntimeError):
        return None


def infer_export(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import torch

    from services.serving.runtimes.pytorch import export_output_names

    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many error types for a foreign file
        raise UserError(
            f"{path}: not a torch.export program ({framework_message(exc)}); save it with torch.export.save"
        ) from exc
    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    arg_names = list(program.module_call_graph[0].signature.forward_arg_names)  # type: ignore[union-attr]
    if len(arg_names) != len(sig.user_inputs):
        raise UserError(
            f"{path}: forward() arguments {arg_names} do not map one-to-one to tensors; give --input for each tensor"
        )
    ins = []
    for arg, node_name in zip(arg_names, sig.user_inputs, strict=True):
        val = nodes[str(node_name)].meta.get("val")
        ins.append(_tensor(arg, _torch_dtype(val), None if val is None else list(val.shape), str(path)))
    names = export_output_names(program) or _out_names(len(sig.user_outputs))
    outs = []
    for name, node_name in zip(names, sig.user_outputs, strict=True):
        node = nodes.get(str(node_name))
        val = None if node is None else node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise UserError(f"{path}: output {name!r} is not a tensor; give --output for every output")
        outs.append(_tensor(name, _torch_dtype(val), list(val.shape), str(path)))
    return ins, outs


def infer_torchscript_outputs(path: Path, inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """Measure outputs with trial passes at batch 1 and 2: dims that follow the batch become -1."""
    import torch

    if any(d == -1 for t in inputs for d in t.shape[1:]) or any(t.datatype is Datatype.BYTES for t in inputs):
        raise UserError(
            f"{path}: outputs of a TorchScript model with variable non-batch input dims cannot be measured; "
            "give --output NAME:DTYPE:SHAPE for each output"
        )
    module = torch.jit.load(str(path), map_location="cpu").eval()
    runs = []
    fixed = inputs[0].shape[0]
    for rows in (1, 2) if fixed == -1 else (fixed,):
        args = [torch.zeros((rows, *t.shape[1:]), dtype=getattr(torch, str(t.datatype.numpy))) for t in inputs]
        try:
            with torch.inference_mode():
                out = module(*args)
        except Exception as exc:  # TorchScript raises its own error types
            raise UserError(
                f"{path}: a trial forward pass with zeros shaped like the --input tensors failed "
                f"({framework_message(exc)}); "
                "check the --input dtypes and shapes"
            ) from exc
        if isinstance(out, torch.Tensor):
            runs.append({"output": out})
        elif isinstance(out, Mapping):
            runs.append({str(k): v for k, v in out.items()})
        elif isinstance(out, (tuple, list)):
            runs.append(dict(zip(_out_names(len(out)), out, strict=True)))
        else:
            raise UserError(f"{path}: forward() returns {type(out).__name__}; give --output for every output")
    outs = []
    for name, one in runs[0].items():
        two = runs[-1][name]
        pairs = enumerate(zip(one.shape, two.shape, strict=True))
        dims = [-1 if (i == 0 and fixed == -1) or a != b else a for i, (a, b) in pairs]
        outs.append(_tensor(name, _torch_dtype(one), dims, str(path)))
    return outs


def is_torch_export(path: Path) -> bool:
    """torch.export archives (PT2 format) are zips holding ``*/archive_format``; TorchScript zips hold code/."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in zf.namelist())


# -- packaging ----------------------------------------------------------------------------------------------------


def _check_source(path: Path, framework: Framework) -> str:
    """Validate the model file for its framework and return its name inside the artifact."""
    if not path.exists():
        raise UserError(f"model file {str(path)!r} does not exist; give the path of the saved model")
    if framework is Framework.TENSORFLOW:
        if not (path.is_dir() and (path / "saved_model.pb").is_file()):
            raise UserError(
                f"{path}: a TensorFlow model must be a SavedModel directory holding saved_model.pb "
                "(tf.saved_model.save or keras model.export)"
            )
        return SAVEDMODEL_DIR
    if not path.is_file():
        raise UserError(f"{path} is a directory; --framework {framework.value} expects a single model file")
    if framework is Framework.KERAS:
        if path.suffix != ".keras":
            raise UserError(f"{path}: a Keras 3 model must be a .keras file (model.save('model.keras'))")
        return KERAS_FILE
    if framework is Framework.ONNX:
        return ONNX_FILE
    return EXPORT_FILE if is_torch_export(path) else TORCHSCRIPT_FILE


def infer_signature(
    path: Path,
    framework: Framework,
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    keras_backend: str = "torch",
) -> Signature:
    """Given tensors win; what is missing is read from the model file (or measured, for TorchScript)."""
    framework = Framework(framework)
    ins, outs = list(inputs), list(outputs)
    if ins and outs:
        return _signature(ins, outs)
    if framework is Framework.PYTORCH and not is_torch_export(path):
        if not ins:
            raise UserError(
                f"{path}: TorchScript does not record input dtypes or shapes; give one --input NAME:DTYPE:SHAPE per "
                "forward() argument, in order (e.g. --input input:FP32:-1x784), or save with torch.export (.pt2)"
            )
        return _signature(ins, infer_torchscript_outputs(path, ins))
    if framework is Framework.PYTORCH:
        found = infer_export(path)
    elif framework is Framework.ONNX:
        found = infer_onnx(path)
    elif framework is Framework.KERAS:
        found = infer_keras(path, keras_backend)
    else:
        found = infer_savedmodel(path)
    return _signature(ins or found[0], outs or found[1])


def _signature(ins: Sequence[TensorSpec], outs: Sequence[TensorSpec]) -> Signature:
    from pydantic import ValidationError

    try:
        return Signature(inputs=tuple(ins), outputs=tuple(outs))
    except ValidationError as exc:
        raise UserError(f"signature: {format_validation_error(exc)}") from exc


def signature_warnings(sig: Signature) -> list[str]:
    """Things that load fine but will surprise at serving time."""
    return [
        f"input {t.name!r} has a fixed batch dim {t.shape[0]}: the server accepts only that many rows per request "
        "and cannot batch; re-export with a dynamic batch dim (torch.export Dim, keras Input(shape=...)) to serve any"
        for t in sig.inputs
        if t.shape[0] != -1
    ]


def _out_rule(name: str, force: bool) -> dict[str, Any]:
    """--out is absent, empty, or a previous artifact: of ``name``, or of any model with ``force``.

    Even with ``force`` only the previous artifact's own files (model.yaml and what it lists) are
    replaced: a directory holding anything else is refused, never emptied.
    """
    return {"label": "--out", "what": "artifact", "recognise": outdir.artifact(name, label="--out", force=force)}


def package_model(
    model_path: Path | str,
    *,
    name: str,
    framework: Framework | str,
    out: Path | str,
    version: str = "1",
    inputs: Sequence[TensorSpec] = (),
    outputs: Sequence[TensorSpec] = (),
    serving: Serving | None = None,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
    verify: bool = True,
) -> ModelSpec:
    """Write an artifact into ``out`` and return its spec.

    It is built in a temporary sibling directory, loaded once with its runtime (``verify``), then swapped in,
    so a failure leaves ``out`` untouched.
    """
    from pydantic import ValidationError

    try:
        fw = Framework(framework)
    except ValueError:
        raise UserError(
            f"framework {framework!r} is unknown; use one of {', '.join(f.value for f in Framework)}"
        ) from None
    if not names.is_dns_label(name):
        raise UserError(f"--name {name!r} is not a DNS-1123 label (lowercase letters, digits and '-', max 63)")
    src, dest = Path(model_path), Path(out)
    serving = serving or Serving()
    target = _check_source(src, fw)
    if dest.resolve() == src.resolve() or dest.resolve() in src.resolve().parents:
        raise UserError(f"--out {dest} contains the model file {src}; write the artifact to another directory")
    outdir.check_dir(dest, **_out_rule(name, force))  # before the signature: loading a model takes a while
    signature = infer_signature(src, fw, inputs, outputs, serving.keras_backend)
    with outdir.replace_dir(dest, **_out_rule(name, force)) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp / target)
        else:
            shutil.copyfile(src, tmp / target)
        try:
            spec = ModelSpec(
                name=name,
                version=version,
                framework=fw,
                files=(FileEntry(path=target, sha256=tree_sha256(tmp / target)),),
                signature=signature,
                serving=serving,
                metadata=dict(metadata or {}),
            )
        except ValidationError as exc:
            raise UserError(format_validation_error(exc)) from exc
        write_spec(tmp, spec)
        if verify:
            from services.serving.runtimes import create_runtime

            create_runtime(spec, tmp, threads=None).load()  # None: leave the caller's thread settings alone
    return spec


# -- CLI ----------------------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "package",
        help="turn a model file into an artifact (model.yaml + file, hashed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_FILE", help=".pt/.pt2 (pytorch), .keras, SavedModel dir, .onnx")
    p.add_argument("--name", required=True, help="artifact name, a DNS-1123 label (e.g. mnist-mlp)")
    p.add_argument("--framework", required=True, help=f"one of {', '.join(f.value for f in Framework)}")
    p.add_argument(
        "--version",
        help="version in model.yaml when this directory is served as is (default 1); "
        "`dlstack models register` assigns the registry's own versions 1, 2, ...",
    )
    p.add_argument(
        "--input", action="append", default=[], metavar="NAME:DTYPE:SHAPE", help=f"input tensor; {SHAPE_HELP}"
    )
    p.add_argument("--output", action="append", default=[], metavar="NAME:DTYPE:SHAPE", help="output tensor")
    p.add_argument(
        "--out", required=True, type=Path, help="artifact directory: new, empty or a previous artifact of --name"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also replace a previous artifact of another model (only its own files; other files are never touched)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="serving.max_batch_size; 1 = no batching (default: unset = auto, 8 rows when every input's "
        "first dim is variable, else 1)",
    )
    p.add_argument("--max-batch-time-ms", type=float, help="serving.max_batch_time_ms (default 2)")
    p.add_argument("--threads", type=int, help="serving.threads (default: CPU limit / workers)")
    p.add_argument("--keras-backend", help="serving.keras_backend for .keras models (default torch)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    given = {
        k: v
        for k, v in {
            "max_batch_size": args.max_batch_size,
            "max_batch_time_ms": args.max_batch_time_ms,
            "threads": args.threads,
            "keras_backend": args.keras_backend,
        }.items()
        if v is not None
    }
    try:
        serving = Serving(**given)
    except ValidationError as exc:
        raise UserError("serving: " + format_validation_error(exc)) from exc
    spec = package_model(
        args.model,
        name=args.name,
        framework=args.framework,
        out=args.out,
        version=args.version or "1",
        inputs=[parse_tensor(t, "--input") for t in args.input],
        outputs=[parse_tensor(t, "--output") for t in args.output],
        serving=serving,
        force=args.force,
    )
    for w in signature_warnings(spec.signature):
        print(f"dlstack package: warning: {w}", file=sys.stderr)
    sig = spec.signature
    fmt = ", ".join
    # The registry, not packaging, numbers versions: printing "name:1" here would contradict the
    # "registered name:N" that `models register` prints next, so the version is only named if given.
    reg_cmd = f"dlstack models register {args.out} --name {spec.name} --framework {spec.framework.value}"
    version = (
        f"{spec.version} in model.yaml; the registry assigns its own: `{reg_cmd}`"
        if args.version
        else f"assigned by the registry: `{reg_cmd}`"
    )
    print(
        f"packaged {spec.name} ({spec.framework.value}) -> {args.out}/{MODEL_YAML}\n"
        f"  inputs:  {fmt(f'{t.name} {t.datatype.value} {list(t.shape)}' for t in sig.inputs)}\n"
        f"  outputs: {fmt(f'{t.name} {t.datatype.value} {list(t.shape)}' for t in sig.outputs)}\n"
        f"  sha256:  {spec.sha256}\n"
        f"  version: {version}"
    )
    return 0
