"""The runtime lifecycle every framework module follows: ``load()`` sets ready, then ``predict()``."""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.serving.artifact import ArtifactError, Datatype, ModelSpec, TensorSpec


class Runtime(abc.ABC):
    """One loaded model. Subclasses implement ``_load`` and ``_predict`` only."""

    framework: str = ""

    def __init__(self, spec: ModelSpec, artifact_dir: Path, threads: int | None = None) -> None:
        self.spec = spec
        self.artifact_dir = Path(artifact_dir)
        self.threads = threads  # intra-op threads; None = the framework's default
        self.ready = False
        self._bound: set[int] = set()  # threads that ran bind_thread()

    def load(self) -> None:
        """Load the model, then run one warm-up pass that proves it agrees with ``model.yaml``."""
        self._load()
        self._self_check()
        self.ready = True

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward pass: batch-first numpy arrays in, keyed by signature names, and out."""
        if not self.ready:
            raise RuntimeError(f"model {self.spec.name!r} is not loaded; call load() first")
        ident = threading.get_ident()
        if ident not in self._bound:
            self._bound.add(ident)
            self.bind_thread()
        return self._predict(inputs)

    def bind_thread(self) -> None:
        """Apply per-thread framework settings in a thread about to run its first forward pass.

        OpenMP's thread count is per calling thread: ``torch.set_num_threads`` in the loading
        thread left the server's inference thread at one OpenMP thread per CPU: two workers on two
        CPUs ran four spinning threads, and batched MLP throughput fell from 8,500 to 1,400 req/s.
        """
        return None

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def file(self, index: int = 0) -> Path:
        return self.artifact_dir / self.spec.files[index].path

    # -- shared checks ---------------------------------------------------------------------------------------

    def error(self, what: str) -> ArtifactError:
        """An error that names the model and file, for every runtime to raise at load."""
        return ArtifactError(f"model {self.spec.name!r} ({self.spec.files[0].path}): {what}")

    def example_inputs(self, rows: int = 1) -> dict[str, np.ndarray] | None:
        """Zeros shaped like the signature, or None when a non-batch dim is variable (no sound guess)."""
        batch: dict[str, np.ndarray] = {}
        for t in self.spec.signature.inputs:
            if t.datatype is Datatype.BYTES or any(d == -1 for d in t.shape[1:]):
                return None
            n = rows if t.shape[0] == -1 else t.shape[0]  # a model exported with a fixed batch takes only that
            batch[t.name] = np.zeros((n, *t.shape[1:]), dtype=t.datatype.numpy)
        return batch

    def _self_check(self) -> None:
        # A warm-up pass pays for lazy init before the first request and, more importantly,
        # catches a model.yaml that lies about outputs (TorchScript cannot be introspected).
        batch = self.example_inputs(rows=1)
        if batch is None:
            return
        try:
            out = self._predict(batch)
        except ArtifactError:
            raise
        except Exception as exc:
            raise self.error(
                f"a warm-up forward pass on zeros shaped like signature.inputs failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "fix the input names/dtypes/shapes in model.yaml (dlstack package --input NAME:DTYPE:SHAPE)"
            ) from exc
        for t in self.spec.signature.outputs:
            check_output(self, t, out[t.name])


def check_output(rt: Runtime, t: TensorSpec, arr: np.ndarray) -> None:
    """Raise if an output array disagrees with its declared dtype or shape."""
    got_dt = _v2_or_none(arr.dtype)
    if got_dt is not t.datatype:
        raise rt.error(
            f"output {t.name!r} is {got_dt or arr.dtype} but model.yaml declares {t.datatype.value}; "
            "fix signature.outputs (dlstack package --output NAME:DTYPE:SHAPE)"
        )
    # dim 0 follows the batch; only the rank and the other dims are the model's contract
    if len(arr.shape) != len(t.shape) or not t.matches((t.shape[0], *arr.shape[1:])):
        raise rt.error(
            f"output {t.name!r} has shape {list(arr.shape)} on a warm-up batch but model.yaml declares "
            f"{list(t.shape)}; fix signature.outputs"
        )


def _v2_or_none(dtype: np.dtype[Any]) -> Datatype | None:
    try:
        return Datatype.from_numpy(dtype)
    except ArtifactError:
        return None


def check_names(rt: Runtime, side: str, declared: list[str], actual: list[str]) -> None:
    """Raise unless the model's own tensor names equal the declared ones (order-insensitive)."""
    if sorted(declared) != sorted(actual):
        raise rt.error(
            f"the model's {side} are {sorted(actual)} but model.yaml declares {sorted(declared)}; "
            f"make signature.{side} name exactly the model's {side} (re-run dlstack package without --{side[:-1]} "
            "to infer them)"
        )


def writable(arr: np.ndarray) -> np.ndarray:
    """Frameworks that wrap numpy memory (torch.from_numpy) warn on read-only buffers such as request bodies."""
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")


def check_tensor(rt: Runtime, t: TensorSpec, dtype: Datatype | None, shape: Sequence[object] | None) -> None:
    """Raise unless the model's own dtype and dims agree with a declared tensor.

    ``shape`` uses the frameworks' convention: an int is a fixed dim, anything else (None, a symbol) a dynamic one.
    """
    if dtype is not t.datatype:
        raise rt.error(
            f"tensor {t.name!r} is {dtype.value if dtype else 'an unsupported type'} in the model but model.yaml "
            f"declares {t.datatype.value}; fix the datatype in signature (dlstack package infers it when omitted)"
        )
    if shape is None:
        return
    dims = list(shape)
    # -1 in model.yaml needs a dynamic dim in the model: a fixed batch dim would break batching
    if len(dims) != len(t.shape) or any(isinstance(g, int) and g != s for g, s in zip(dims, t.shape, strict=True)):
        shown = [g if isinstance(g, int) else -1 for g in dims]
        raise rt.error(
            f"tensor {t.name!r} has shape {shown} in the model (-1 = dynamic) but model.yaml declares "
            f"{list(t.shape)}; declare the model's fixed dims, or save the model with dynamic dims"
        )
