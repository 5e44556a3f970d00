"""Adaptive batching inside one worker: concurrent requests share one forward pass.

No batching thread: the first request of a batch (the leader) runs it in its own thread.
Batched forward passes run one at a time; while one runs, the next batch fills for free.
When the model is idle the leader waits at most ``max_batch_time``, and only while more
requests are on their way (``arriving`` counts requests between ``begin()`` and ``submit()``),
so a lone request never waits. The leader stacks the batch, runs it and splits the outputs. Requests are only
stacked with others that have the same input names, dtypes and trailing shapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

Tensors = dict[str, np.ndarray]
Predict = Callable[[Tensors], Tensors]
Key = tuple[tuple[str, str, tuple[int, ...]], ...]


def batch_key(inputs: Tensors) -> Key:
    """Requests with equal keys can be concatenated along dim 0."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def rows_of(inputs: Tensors) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


class _Batch:
    __slots__ = ("done", "error", "items", "outputs", "rows")

    def __init__(self) -> None:
        self.items: list[Tensors] = []
        self.rows = 0
        self.done = threading.Event()
        self.outputs: list[Tensors] = []
        self.error: BaseException | None = None


class Batcher:
    """Stacks concurrent ``submit`` calls with equal ``batch_key`` into one ``predict`` call."""

    def __init__(
        self,
        predict: Predict,
        max_batch_size: int,
        max_batch_time_ms: float,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_batch_time = max_batch_time_ms / 1000.0
        self._cond = threading.Condition()
        self._open: dict[Key, _Batch] = {}
        self.arriving = 0  # requests that called begin() but not yet submit()/cancel()
        self._waiting = 0  # leaders inside Condition.wait: notifying nobody still costs a lock round trip
        self._busy = False  # one batched forward pass at a time; the next batch fills meanwhile

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def begin(self) -> None:
        """A request started decoding: a leader may wait for it."""
        with self._cond:
            self.arriving += 1

    def cancel(self) -> None:
        """The request failed before submit (bad input): stop waiting for it."""
        with self._cond:
            self.arriving -= 1
            if self._waiting:
                self._cond.notify_all()

    def submit(self, inputs: Tensors) -> Tensors:
        rows = rows_of(inputs)
        if rows >= self.max_batch_size or any(a.ndim == 0 for a in inputs.values()):  # scalars cannot stack
            self.cancel()
            return self._predict(inputs)
        key = batch_key(inputs)
        with self._cond:
            self.arriving -= 1
            batch = self._open.get(key)
            leader = batch is None or batch.rows + rows > self.max_batch_size
            if leader:
                # A full-ish open batch stays with its own leader; this request starts the next one.
                batch = _Batch()
                self._open[key] = batch  # an older open batch with this key is now closed to joiners
            assert batch is not None
            index = len(batch.items)
            batch.items.append(inputs)
            batch.rows += rows
            if self._waiting:
                self._cond.notify_all()
            if leader:
                deadline = time.monotonic() + self.max_batch_time
                while True:
                    closed = batch.rows >= self.max_batch_size or self._open.get(key) is not batch
                    left = deadline - time.monotonic()
                    if not self._busy and (closed or self.arriving == 0 or left <= 0):
                        break
                    # While the model is busy, waiting costs nothing: the batch keeps filling.
                    self._waiting += 1
                    try:
                        self._cond.wait(0.05 if self._busy else left)
                    finally:
                        self._waiting -= 1
                if self._open.get(key) is batch:
                    del self._open[key]
                self._busy = True
        if leader:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    if self._waiting:
                        self._cond.notify_all()
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.outputs[index]

    def _run(self, batch: _Batch) -> None:
        try:
            if len(batch.items) == 1:
                batch.outputs = [self._predict(batch.items[0])]
                return
            names = list(batch.items[0])
            stacked = {n: np.concatenate([it[n] for it in batch.items]) for n in names}
            out = self._predict(stacked)
            splits = np.cumsum([rows_of(it) for it in batch.items])[:-1]
            parts = {n: np.split(a, splits) for n, a in out.items()}
            batch.outputs = [{n: parts[n][i] for n in parts} for i in range(len(batch.items))]
        except BaseException as exc:  # every waiter must wake up with the error
            batch.error = exc
        finally:
            batch.done.set()
