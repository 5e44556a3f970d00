"""What the one inference path tells its observers (prediction log, drift bins) after each answer.

An observer is called on the thread that finishes the request (the worker's event loop, or a WSGI
thread), after the answer is on its way. It must never block or raise: anything slow goes through
its own bounded queue. The tensors are the arrays the model saw and produced, shared, never copied:
observers must not modify them, nor the Prediction. Keeping a reference (e.g. on a queue) is safe: the
path never writes to them after the answer (request bodies are immutable bytes; batching stacks into
new arrays).

Sampling happens once, in ``inference.notify``: one uniform draw per answer, shared by the observers; an
observer with ``sample`` s is handed the answers whose draw is below s. Each observer still gets exactly
its share, and an answer no observer samples costs one draw, not a Prediction and a call per observer.
Shared, the samples nest: the answers handed to the observer with the smaller share are among those handed
to the larger. An observer may change its ``sample`` at any time (drift lowers it under its row cap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from services.serving.server.protocol import Tensors

NO_LOG_HEADER = "x-dlstack-log"  # a request with "X-Dlstack-Log: off" is never written to the prediction log


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ cost ~1.3 us more, on every request
class Prediction:
    request_id: str
    model: str
    version: str
    inputs: Tensors | None  # None when the request failed before decoding
    outputs: Tensors | None  # None unless the status is 200
    status: int
    latency_s: float  # from the first byte of the request to the answer
    headers: Mapping[str, str]  # request headers, lower-cased names


class Observer(Protocol):
    sample: float  # the share of inference answers it is handed, 0..1 (drawn by ``inference.notify``)

    def observe(self, p: Prediction) -> None: ...


def nbytes(ts: Tensors | None) -> int:
    """Bytes of the arrays a Prediction's inputs or outputs hold: what an observer's queue keeps alive."""
    return sum(a.nbytes for a in ts.values()) if ts else 0
