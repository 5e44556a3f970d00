"""PyTorch runtime: TorchScript (``.pt``, torch.jit.load) and torch.export (``.pt2``, torch.export.load)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from services.serving.runtimes.base import Runtime, check_names, writable

EXPORT_SUFFIX = ".pt2"


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        # settable only once per process, before any inter-op work; a second load keeps the first value
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)


class PyTorchRuntime(Runtime):
    framework = "pytorch"

    def _load(self) -> None:
        set_threads(self.threads)
        path = self.file()
        n_in = len(self.spec.signature.inputs)
        try:
            if path.suffix == EXPORT_SUFFIX:
                program = torch.export.load(str(path))
                self.module: Any = program.module()
                arg_names = list(program.module_call_graph[0].signature.forward_arg_names)  # type: ignore[union-attr]
                out_names = export_output_names(program)
                if out_names is not None:
                    check_names(self, "outputs", [t.name for t in self.spec.signature.outputs], out_names)
            else:
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
                arg_names = [a.name for a in self.module.forward.schema.arguments[1:]]  # [0] is self
        except (RuntimeError, ValueError, OSError, KeyError, AttributeError) as exc:
            raise self.error(
                f"cannot load as {'torch.export' if path.suffix == EXPORT_SUFFIX else 'TorchScript'} ({exc}); "
                "save TorchScript with torch.jit.save (.pt) or torch.export.save (.pt2)"
            ) from exc
        if len(arg_names) != n_in:
            raise self.error(
                f"forward() takes {len(arg_names)} inputs {arg_names} but model.yaml declares {n_in} "
                f"{[t.name for t in self.spec.signature.inputs]}; list one --input per forward argument, in order"
            )

    def bind_thread(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # forward args are positional, in signature order
        args = [torch.from_numpy(writable(inputs[t.name])) for t in self.spec.signature.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        return self._map_outputs(out)

    def _map_outputs(self, out: Any) -> dict[str, np.ndarray]:
        specs = self.spec.signature.outputs
        if isinstance(out, torch.Tensor):
            tensors: Sequence[Any] = [out]
        elif isinstance(out, Mapping):
            missing = [t.name for t in specs if t.name not in out]
            if missing:
                raise self.error(
                    f"forward() returned a dict with keys {sorted(out)}; missing declared outputs {missing}"
                )
            tensors = [out[t.name] for t in specs]
        elif isinstance(out, (tuple, list)):
            tensors = out
        else:
            raise self.error(f"forward() returned {type(out).__name__}; return a tensor, a tuple/list or a dict")
        if len(tensors) != len(specs):
            raise self.error(
                f"forward() returned {len(tensors)} outputs but model.yaml declares {len(specs)} "
                f"{[t.name for t in specs]}; list one --output per returned tensor, in order"
            )
        return {t.name: v.detach().cpu().numpy() for t, v in zip(specs, tensors, strict=True)}


def export_output_names(program: Any) -> list[str] | None:
    """Dict keys when an ExportedProgram returns a dict; None for a tensor/tuple (names are then free)."""
    spec = program.call_spec.out_spec
    if spec is not None and spec.type is dict:
        return [str(k) for k in spec.context]
    return None
