"""``--reference-data FILE.npz``: the drift reference stored with a registered version.

The .npz holds one array per signature input (``np.savez(FILE, input=X)``), at least
``MIN_ROWS`` rows, plain numeric dtypes exactly as model.yaml declares them. The model is loaded
with its own runtime and run on that data in batches; the bins of its inputs and outputs
(``services.serving.server.drift``) go to ``reference.json`` in the artifact, listed in model.yaml
``files`` so its sha256 travels with the version and ``dlstack models verify`` covers it.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np

from services.registry.store import RegistryError
from services.serving.artifact import (
    MODEL_YAML,
    ArtifactError,
    Datatype,
    FileEntry,
    ModelSpec,
    TensorSpec,
    artifact_file,
    file_sha256,
    read_spec,
    verify_files,
    write_spec,
)
from services.serving.atomic import atomic_write
from services.serving.server.drift import (
    MIN_ROWS,
    REFERENCE_FILE,
    Reference,
    TensorReference,
    group_means,
    group_starts,
    reference_bins,
    tensor_label,
)

BATCH_ROWS = 256  # rows per forward pass while computing the reference outputs
FLAG = "--reference-data"


def load_reference_data(path: Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The .npz arrays keyed by input name, validated against the signature; one-line errors otherwise."""
    where = f"{FLAG} {path}"
    if not path.is_file():
        raise RegistryError(f"{where}: no such file; save the inputs with np.savez(FILE, NAME=ARRAY, ...)")
    inputs = {t.name: t for t in spec.signature.inputs}
    names = ", ".join(inputs)
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError:  # not .npz/.npy: numpy would unpickle it, which allow_pickle=False refuses
        raise RegistryError(
            f"{where}: not an .npz file (a pickle or other format, never unpickled); save the inputs with np.savez"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RegistryError(f"{where}: not an .npz file ({exc}); save the inputs with np.savez(FILE, ...)") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise RegistryError(
            f"{where}: is a single .npy array, not an .npz; use np.savez(FILE, {names.split(',')[0]}=X)"
        )
    with npz:
        keys = list(npz.files)
        for key in keys:
            if key not in inputs:
                raise RegistryError(
                    f"{where}: array {key!r} is not an input of the model (inputs: {names}); "
                    "save it under an input name or leave it out"
                )
        data: dict[str, np.ndarray] = {}
        for name, t in inputs.items():
            if name not in keys:
                raise RegistryError(f"{where}: no array {name!r} (the model's inputs: {names}); add it to np.savez")
            try:
                data[name] = npz[name]
            except ValueError:
                raise RegistryError(
                    f"{where}: array {name!r} holds pickled objects; save a numeric array ({t.datatype.value})"
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise RegistryError(f"{where}: array {name!r} cannot be read ({exc}); write the file again") from None
    for name, arr in data.items():
        _check_array(where, inputs[name], arr)
    rows = {name: arr.shape[0] for name, arr in data.items()}
    if len(set(rows.values())) > 1:
        raise RegistryError(f"{where}: the inputs have different row counts {rows}; give every input the same rows")
    return data


def _check_array(where: str, t: TensorSpec, arr: np.ndarray) -> None:
    what = f"{where}: array {t.name!r}"
    if t.datatype is Datatype.BYTES:
        raise RegistryError(f"{what}: BYTES inputs cannot be binned for drift; register without {FLAG}")
    if arr.dtype != t.datatype.numpy:
        raise RegistryError(
            f"{what} is {arr.dtype} but model.yaml declares {t.datatype.value}; convert it with "
            f".astype(np.{t.datatype.numpy})"
        )
    declared = list(t.shape)
    if arr.ndim != len(t.shape) or not all(s in (-1, g) for s, g in zip(t.shape[1:], arr.shape[1:], strict=True)):
        raise RegistryError(
            f"{what} has shape {list(arr.shape)} but the input is {declared} (-1 = any); reshape it to [rows, ...]"
        )
    if arr.shape[0] < MIN_ROWS:
        raise RegistryError(f"{what} has {arr.shape[0]} rows; give at least {MIN_ROWS} (deciles need them)")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            raise RegistryError(
                f"{what} has NaN or Inf in {int(bad.sum())} row(s) (first: row {int(np.argmax(bad))}); "
                "drop or impute those rows"
            )


def compute_reference(artifact: Path, spec: ModelSpec, data: dict[str, np.ndarray], data_sha256: str) -> Reference:
    """Run the model on ``data`` with its own runtime and bin its inputs and outputs."""
    from services.serving.runtimes import create_runtime

    runtime = create_runtime(spec, artifact)
    try:
        runtime.load()
    except ArtifactError as exc:
        raise RegistryError(f"{FLAG}: the model does not load ({exc.message})") from exc
    rows = next(iter(data.values())).shape[0]
    fixed = spec.signature.inputs[0].shape[0]
    step = BATCH_ROWS
    if fixed != -1:  # a model exported with a fixed batch takes only that many rows per pass
        step = fixed
        rows -= rows % step
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in spec.signature.outputs}
    for start in range(0, rows, step):
        out = runtime.predict({k: v[start : start + step] for k, v in data.items()})
        for name in parts:
            parts[name].append(np.asarray(out[name]))
    outputs = {name: np.concatenate(p) for name, p in parts.items()}
    input_names = {t.name for t in spec.signature.inputs}
    tensors = [_tensor(t.name, "input", data[t.name][:rows], input_names) for t in spec.signature.inputs]
    for t in spec.signature.outputs:
        if t.datatype is Datatype.BYTES:
            continue  # text outputs have no mean to bin
        arr = outputs[t.name]
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise RegistryError(
                f"{FLAG}: the model answered NaN or Inf in output {t.name!r} on this data; check the data or the model"
            )
        tensors.append(_tensor(t.name, "output", arr, input_names))
    return Reference(rows=rows, data_sha256=data_sha256, tensors=tensors)


def _tensor(name: str, side: str, arr: np.ndarray, input_names: set[str]) -> TensorReference:
    flat = arr.reshape(arr.shape[0], -1)
    starts = group_starts(flat.shape[1])
    edges, ratios = reference_bins(group_means(flat, starts))
    return TensorReference(
        name=name,
        side=side,  # type: ignore[arg-type]
        label=tensor_label(name, side, input_names),
        width=flat.shape[1],
        starts=starts,
        edges=edges,
        ratios=ratios,
    )


def with_reference(artifact: Path, data_path: Path, out: Path) -> Path:
    """A copy of ``artifact`` in ``out`` (model.yaml + its files) with ``reference.json`` added or replaced.

    The source directory is never written: the registry stores what ``out`` holds.
    """
    spec = read_spec(artifact)
    try:
        verify_files(artifact, spec)
    except ArtifactError as exc:
        raise RegistryError(exc.message) from exc
    data = load_reference_data(data_path, spec)
    files = tuple(f for f in spec.files if f.path != REFERENCE_FILE)
    if not files:
        raise RegistryError(f"{artifact / MODEL_YAML}: lists only {REFERENCE_FILE}; list the model file first")
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        src = artifact_file(artifact, f.path, f"{artifact / MODEL_YAML}: files[{i}].path")
        dst = out / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
    spec = spec.model_copy(update={"files": files})
    reference = compute_reference(out, spec, data, file_sha256(data_path))
    atomic_write(out / REFERENCE_FILE, reference.model_dump_json(indent=1) + "\n", mode=0o644)
    entry = FileEntry(path=REFERENCE_FILE, sha256=file_sha256(out / REFERENCE_FILE))
    write_spec(out, spec.model_copy(update={"files": (*files, entry)}))
    return out
