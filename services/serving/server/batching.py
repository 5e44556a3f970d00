"""Adaptive batching inside one worker: concurrent requests share one forward pass.

Two front ends, same rules: ``LoopBatcher`` serves the event-loop worker's inference routes;
``Batcher`` serves the Flask views, which run in threads (the Flask test client, another WSGI
server, and requests that arrive while the model is still loading).

``Batcher`` has no batching thread: the first request of a batch (the leader) runs it in its own thread.
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


def run_stacked(predict: Predict, items: list[Tensors]) -> list[Tensors]:
    """One forward pass over ``items`` (equal ``batch_key``) stacked along dim 0, split back per item."""
    if len(items) == 1:
        return [predict(items[0])]
    out = predict({n: np.concatenate([it[n] for it in items]) for n in items[0]})
    splits = np.cumsum([rows_of(it) for it in items])[:-1]
    parts = {n: np.split(a, splits) for n, a in out.items()}
    return [{n: parts[n][i] for n in parts} for i in range(len(items))]


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
            batch.outputs = run_stacked(self._predict, batch.items)
        except BaseException as exc:  # every waiter must wake up with the error
            batch.error = exc
        finally:
            batch.done.set()


Done = Callable[[Tensors | None, BaseException | None], None]


class LoopBatcher:
    """The event-loop worker's batcher: requests parsed in one loop pass share one forward pass.

    ``submit`` is called on the loop, never blocks, and calls ``done(outputs, None)`` or
    ``done(None, error)`` on the loop later. Forward passes run one at a time in ``run_forward``
    (the worker's inference thread), and the next batch fills meanwhile: under load a batch is
    whatever arrived during the previous pass. When the model is idle a batch starts at once,
    unless a request is still being received: then it waits for it up to ``max_batch_time``.
    A request counts as being received only while its body flows: from the end of its headers,
    and only if its last body bytes came within ``max_batch_time`` (``receiving``). A client that
    stalls mid-body (or trickles its headers) never makes others wait for the batch window.
    Only requests with equal ``batch_key`` are stacked; FIFO across keys.
    """

    def __init__(
        self,
        predict: Predict,
        max_batch_size: int,
        max_batch_time_ms: float,
        call_soon: Callable[[Callable[[], None]], object],
        call_later: Callable[[float, Callable[[], None]], object],
        run_forward: Callable[[Callable[[], None], Callable[[], None]], None],
    ) -> None:
        self._predict = predict
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_time = max_batch_time_ms / 1000.0
        self._call_soon = call_soon
        self._call_later = call_later
        self._run_forward = run_forward  # run_forward(work, then): work() off the loop, then() back on it
        self._queue: dict[Key, list[tuple[Tensors, Done]]] = {}  # insertion order = arrival order of keys
        self._receiving: dict[object, float] = {}  # request -> monotonic s of its last body bytes
        self._busy = False
        self._scheduled = False
        self._deadline: float | None = None  # monotonic s; set while an idle model waits for arriving requests
        self._expired = False

    @property
    def arriving(self) -> int:
        """Requests of this worker whose body is still coming in (stalled ones included)."""
        return len(self._receiving)

    def _flowing(self, now: float) -> bool:
        """Whether a request worth waiting for is being received: its body moved within the batch window."""
        since = now - self.max_batch_time
        return any(t >= since for t in self._receiving.values())

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queue.values())

    def submit(self, inputs: Tensors, done: Done) -> None:
        if self.max_batch_size > 1 and all(a.ndim for a in inputs.values()):
            key = batch_key(inputs)
        else:  # batching off, or scalars (which cannot stack): a batch of its own
            key = (("", str(id(done)), ()),)
        self._queue.setdefault(key, []).append((inputs, done))
        self._schedule()

    def receiving(self, request: object) -> None:
        """``request``'s headers are complete and its body bytes are coming in (called again per chunk)."""
        self._receiving[request] = time.monotonic()

    def request_arrived(self, request: object) -> None:
        """``request`` is complete (or failed, or its connection is gone): an idle model may stop waiting."""
        gone = self._receiving.pop(request, None) is not None
        if gone and self._deadline is not None and not self._flowing(time.monotonic()):
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._busy:
            self._scheduled = True
            self._call_soon(self._start)

    def _timeout(self) -> None:
        self._expired = True
        self._schedule()

    def _start(self) -> None:
        self._scheduled = False
        if self._busy or not self._queue:
            return
        key = next(iter(self._queue))
        items = self._queue[key]
        rows = sum(rows_of(x) for x, _ in items)
        if (
            self.max_batch_time > 0
            and self._receiving
            and rows < self.max_batch_size
            and self._flowing(time.monotonic())
        ):
            if self._deadline is None:
                self._deadline = time.monotonic() + self.max_batch_time
                self._expired = False
                self._call_later(self.max_batch_time, self._timeout)
                return
            if not self._expired and time.monotonic() < self._deadline:
                return
        self._deadline = None
        batch: list[tuple[Tensors, Done]] = []
        n = 0
        while items and (not batch or n + rows_of(items[0][0]) <= self.max_batch_size):
            batch.append(items.pop(0))
            n += rows_of(batch[-1][0])
        if not items:
            del self._queue[key]
        self._busy = True
        result: list[Tensors] = []
        error: list[BaseException] = []

        def work() -> None:
            try:
                result.extend(run_stacked(self._predict, [x for x, _ in batch]))
            except BaseException as exc:  # every request of the batch gets the error
                error.append(exc)

        def then() -> None:
            self._busy = False
            if self._queue:
                self._schedule()
            for i, (_, done) in enumerate(batch):
                if error:
                    done(None, error[0])
                else:
                    done(result[i], None)

        self._run_forward(work, then)
