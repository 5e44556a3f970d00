"""Adaptive batching: stacking is invisible in the answers, never mixes incompatible requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from services.serving.server.batching import Batcher, LoopBatcher, Tensors
from tests.conftest import make_torch_mlp_artifact
from tests.serving import start_server

HANG_S = 60  # s: the bound on every wait, there to end a hang; no test passes or fails on how fast it went
# A max_batch_time that only a hang would wait out: a batch closes by its size or by nobody else arriving,
# so the result does not depend on how fast the threads got there (a broken batcher fails after it, not hangs).
PATIENT_MS = HANG_S * 1000


class Recorder:
    """A real (numpy) model that remembers every forward pass it ran."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[Tensors] = []
        self.threads: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> Tensors:
        with self.lock:
            self.calls.append(inputs)
            self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        return {f"{n}_out": a * 2 + 1 for n, a in inputs.items()}


def run_concurrently(b: Batcher, requests_: list[Tensors]) -> list[Tensors]:
    """Announce every request first (as the server does before decoding), then submit them from threads."""
    for _ in requests_:
        b.begin()
    with ThreadPoolExecutor(len(requests_)) as pool:
        return list(pool.map(b.submit, requests_))


def test_concurrent_requests_share_one_forward_pass() -> None:
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_batch_time_ms=PATIENT_MS)  # the batch fills: no wait
    reqs = [{"x": np.full((1, 3), i, np.float32)} for i in range(8)]
    outs = run_concurrently(b, reqs)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape == (8, 3)
    for r, o in zip(reqs, outs, strict=True):
        assert np.array_equal(o["x_out"], r["x"] * 2 + 1)


# Requests that must never share a forward pass: each differs from the first in one way.
KINDS: list[Callable[[int], Tensors]] = [
    lambda i: {"x": np.full((1, 4), i, np.float32)},
    lambda i: {"x": np.full((2, 5), i, np.float32)},  # other trailing shape
    lambda i: {"x": np.full((1, 4), i, np.float64)},  # other dtype
    lambda i: {"z": np.full((1, 4), i, np.float32)},  # other input name
    lambda i: {"x": np.full((1, 4), i, np.float32), "z": np.full((1, 4), -i, np.float32)},  # other name set
]


def test_incompatible_requests_are_never_mixed() -> None:
    rec = Recorder(delay=0.01)
    b = Batcher(rec, max_batch_size=64, max_batch_time_ms=PATIENT_MS)  # batches close when all arrived
    kinds = KINDS
    reqs = [kinds[i % len(kinds)](i) for i in range(40)]
    outs = run_concurrently(b, reqs)
    for call in rec.calls:
        keys = {(n, a.dtype.str, a.shape[1:]) for n, a in call.items()}
        assert len(keys) == len(call), f"a forward pass mixed shapes/dtypes: {keys}"
    signatures = [tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in c.items())) for c in rec.calls]
    assert len(set(signatures)) == len(kinds)  # each kind ran, never together with another
    for r, o in zip(reqs, outs, strict=True):
        for n, a in r.items():
            assert o[f"{n}_out"].dtype == a.dtype and np.array_equal(o[f"{n}_out"], a * 2 + 1)
    assert sum(next(iter(c.values())).shape[0] for c in rec.calls) == sum(next(iter(r.values())).shape[0] for r in reqs)
    assert len(rec.calls) < len(reqs)


def test_large_request_runs_alone_and_batches_respect_the_limit() -> None:
    rec = Recorder(delay=0.005)
    b = Batcher(rec, max_batch_size=4, max_batch_time_ms=200)
    reqs = [{"x": np.full((3, 2), i, np.float32)} for i in range(6)] + [{"x": np.ones((9, 2), np.float32)}]
    outs = run_concurrently(b, reqs)
    sizes = sorted(c["x"].shape[0] for c in rec.calls)
    assert 9 in sizes and all(s <= 4 for s in sizes if s != 9)
    assert all(np.array_equal(o["x_out"], r["x"] * 2 + 1) for r, o in zip(reqs, outs, strict=True))


def test_a_lone_request_does_not_wait_and_runs_in_the_caller_thread() -> None:
    """Nobody else is arriving: the request runs at once, not after max_batch_time (longer than the join)."""
    rec = Recorder()
    b = Batcher(rec, max_batch_size=8, max_batch_time_ms=3 * PATIENT_MS)
    caller: list[int] = []
    out: list[Tensors] = []

    def lone() -> None:
        caller.append(threading.get_ident())
        b.begin()
        out.append(b.submit({"x": np.ones((1, 2), np.float32)}))

    t = threading.Thread(target=lone, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), "a lone request waited for max_batch_time although nobody else was arriving"
    assert np.array_equal(out[0]["x_out"], np.full((1, 2), 3, np.float32))
    assert rec.threads == caller  # no batching thread, no hop


def test_a_failed_forward_reaches_every_request_of_the_batch() -> None:
    def fail(inputs: Tensors) -> Tensors:
        raise RuntimeError("model exploded")

    b = Batcher(fail, max_batch_size=4, max_batch_time_ms=PATIENT_MS)  # the batch fills: no wait
    for _ in range(4):
        b.begin()
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(b.submit, {"x": np.ones((1, 2))}) for _ in range(4)]
        for f in futs:
            with pytest.raises(RuntimeError, match="model exploded"):
                f.result(timeout=HANG_S)


def test_batching_off_calls_the_model_directly(tmp_path: Path) -> None:
    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings

    art = make_torch_mlp_artifact(tmp_path / "mlp", max_batch_size=8)
    app = create_app(ServerSettings(artifact_dir=art, max_batch_size=1), background_load=False)  # flag beats yaml
    server = app.extensions["dlstack"]
    assert not server.batcher.enabled
    seen = []
    real = server.runtime.predict
    server.runtime.predict = lambda inputs: (seen.append(threading.get_ident()), real(inputs))[1]
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8}]}
    assert app.test_client().post("/v2/models/mlp/infer", json=body).status_code == 200
    assert seen == [threading.get_ident()]
    assert server.batcher.arriving == 0


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_batched_responses_equal_unbatched_ones_on_a_real_server(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp", sizes=(8, 64, 64, 3), seed=3)
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(48):
        rows = rng.standard_normal((1 + i % 3, 8)).astype(np.float32)
        bodies.append({"id": str(i), "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                                 "data": rows.ravel().tolist()}]})  # fmt: skip
    with start_server(art, workers=1, threads=1, extra_args=["--max-batch-size", "1"]) as off:
        unbatched = [requests.post(f"{off.url}/v2/models/mlp/infer", json=b).json() for b in bodies]
    with start_server(
        art, workers=1, threads=16, extra_args=["--max-batch-size", "8", "--max-batch-time-ms", "20"]
    ) as on:
        with ThreadPoolExecutor(16) as pool:
            batched = list(pool.map(lambda b: requests.post(f"{on.url}/v2/models/mlp/infer", json=b).json(), bodies))
        metrics = requests.get(f"{on.url}/metrics").text
    for u, b in zip(unbatched, batched, strict=True):
        assert u["id"] == b["id"] and u["outputs"][0]["shape"] == b["outputs"][0]["shape"]
        np.testing.assert_allclose(b["outputs"][0]["data"], u["outputs"][0]["data"], rtol=0, atol=1e-6)
    passes = _metric(metrics, "dlstack_batch_size_count")
    rows = _metric(metrics, "dlstack_batch_size_sum")
    assert rows == sum(b["inputs"][0]["shape"][0] for b in bodies)
    assert passes < len(bodies), "no request was batched with another"


class LoopHarness:
    """A real asyncio loop driving a ``LoopBatcher`` the way the worker does (forward in one thread)."""

    def __init__(self, predict: Callable[[Tensors], Tensors], max_batch_size: int, max_batch_time_ms: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = ThreadPoolExecutor(1)
        self.forward_threads: list[int] = []
        self.events: list[tuple[str, float] | str] = []  # timers set and fired, forward passes, in order

        def run_forward(work: Callable[[], None], then: Callable[[], None]) -> None:
            def in_thread() -> None:
                self.forward_threads.append(threading.get_ident())
                self.events.append("forward")
                work()

            fut = self.pool.submit(in_thread)
            fut.add_done_callback(lambda _: self.loop.call_soon_threadsafe(then))

        def call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
            self.events.append(("timer set", delay))

            def fire() -> None:
                self.events.append("timer fired")
                callback()

            return self.loop.call_later(delay, fire)

        self.batcher = LoopBatcher(
            predict, max_batch_size, max_batch_time_ms, self.loop.call_soon, call_later, run_forward
        )

    def submit_all(
        self, reqs: list[Tensors], receiving: tuple[object, ...] = (), timeout: float = HANG_S
    ) -> list[Tensors | BaseException]:
        """Submit ``reqs`` in one loop pass (as requests parsed together are); wait for every answer.

        ``receiving``: requests whose body bytes come in during that pass (their body still incomplete)."""
        results: dict[int, Tensors | BaseException] = {}

        def submit() -> None:
            for token in receiving:
                self.batcher.receiving(token)
            for i, r in enumerate(reqs):
                self.batcher.submit(r, lambda out, err, i=i: results.__setitem__(i, err if err else out))

        self.loop.call_soon(submit)

        async def wait() -> None:
            deadline = time.monotonic() + timeout
            while len(results) < len(reqs) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)

        self.loop.run_until_complete(wait())
        assert len(results) == len(reqs), f"only {len(results)} of {len(reqs)} requests were answered"
        return [results[i] for i in range(len(reqs))]

    def close(self) -> None:
        self.pool.shutdown()
        self.loop.close()


def test_loop_batcher_stacks_what_arrives_in_one_loop_pass() -> None:
    rec = Recorder()
    h = LoopHarness(rec, max_batch_size=8, max_batch_time_ms=0)
    reqs = [{"x": np.full((1, 3), i, np.float32)} for i in range(8)]
    outs = h.submit_all(reqs)
    h.close()
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape == (8, 3)
    for r, o in zip(reqs, outs, strict=True):
        assert isinstance(o, dict) and np.array_equal(o["x_out"], r["x"] * 2 + 1)
    assert rec.threads[0] != threading.get_ident()  # off the loop thread: probes stay answered meanwhile


def test_loop_batcher_never_mixes_keys_respects_the_limit_and_keeps_order() -> None:
    rec = Recorder(delay=0.002)
    h = LoopHarness(rec, max_batch_size=4, max_batch_time_ms=0)
    reqs = [KINDS[i % len(KINDS)](i) for i in range(30)] + [{"x": np.ones((9, 4), np.float32)}]
    outs = h.submit_all(reqs)
    h.close()
    for call in rec.calls:
        keys = {(n, a.dtype.str, a.shape[1:]) for n, a in call.items()}
        assert len(keys) == len(call), f"a forward pass mixed shapes/dtypes: {keys}"
        rows = next(iter(call.values())).shape[0]
        assert rows <= 4 or rows == 9, f"a batch of {rows} rows is over max_batch_size=4"
    for r, o in zip(reqs, outs, strict=True):
        assert isinstance(o, dict)
        for n, a in r.items():
            assert o[f"{n}_out"].dtype == a.dtype and np.array_equal(o[f"{n}_out"], a * 2 + 1)
    kind0 = [c["x"] for c in rec.calls if set(c) == {"x"} and c["x"].dtype == np.float32 and c["x"].shape[1] == 4]
    first_x = [float(x[0, 0]) for x in kind0 if x.shape[0] != 9]  # the 9-row request (all ones) came last
    assert first_x == sorted(first_x), "batches of one kind ran out of arrival order"
    assert len(rec.calls) < len(reqs)


def test_loop_batcher_off_runs_one_forward_per_request() -> None:
    rec = Recorder()
    h = LoopHarness(rec, max_batch_size=1, max_batch_time_ms=50)
    outs = h.submit_all([{"x": np.full((1, 2), i, np.float32)} for i in range(5)])
    h.close()
    assert [c["x"].shape for c in rec.calls] == [(1, 2)] * 5
    assert [float(o["x_out"][0, 0]) for o in outs if isinstance(o, dict)] == [1.0, 3.0, 5.0, 7.0, 9.0]


def test_loop_batcher_error_reaches_every_request_of_the_batch() -> None:
    def fail(inputs: Tensors) -> Tensors:
        raise RuntimeError("model exploded")

    h = LoopHarness(fail, max_batch_size=4, max_batch_time_ms=0)
    outs = h.submit_all([{"x": np.ones((1, 2), np.float32)} for _ in range(4)])
    h.close()
    assert all(isinstance(o, RuntimeError) and "model exploded" in str(o) for o in outs)


def test_loop_batcher_waits_for_arriving_requests_only_up_to_max_batch_time() -> None:
    """An idle model waits (at most max_batch_time) only while another request is still being received.

    The loop's timers are recorded: the order of events shows the wait, not a stopwatch."""
    rec = Recorder()
    h = LoopHarness(rec, max_batch_size=8, max_batch_time_ms=150)
    h.submit_all([{"x": np.ones((1, 2), np.float32)}])  # nobody arriving: no wait
    assert h.events == ["forward"], "a lone request waited for a timer"
    h.events.clear()
    other = object()
    h.submit_all([{"x": np.ones((1, 2), np.float32)}], receiving=(other,))  # one that never completes: waits it out
    still_arriving = h.batcher.arriving
    h.batcher.request_arrived(other)
    h.close()
    # One max_batch_time timer, and the forward pass ran when it fired, the awaited request still missing.
    assert h.events == [("timer set", 0.15), "timer fired", "forward"], h.events
    assert still_arriving == 1 and len(rec.calls) == 2


def test_loop_batcher_stops_waiting_when_the_awaited_request_arrives() -> None:
    """The wait ends when the request being received is complete, not when the timer fires."""
    rec = Recorder()
    h = LoopHarness(rec, max_batch_size=8, max_batch_time_ms=PATIENT_MS)
    other = object()
    h.loop.call_later(0.05, h.batcher.request_arrived, other)  # its last bytes come in 50 ms later
    h.submit_all([{"x": np.ones((1, 2), np.float32)}], receiving=(other,))
    h.close()
    assert h.events == [("timer set", PATIENT_MS / 1000), "forward"], h.events
    assert h.batcher.arriving == 0


def test_loop_batcher_never_waits_for_a_stalled_request() -> None:
    """A request whose body stopped coming (slow or hostile client) is no reason to hold a batch: only one
    whose bytes moved within max_batch_time is waited for. Once its bytes move again, it counts again."""
    rec = Recorder()
    h = LoopHarness(rec, max_batch_size=8, max_batch_time_ms=100)
    stalled = object()
    h.batcher.receiving(stalled)  # headers and some body came in; then nothing
    h.loop.run_until_complete(asyncio.sleep(0.25))  # longer than max_batch_time since its last bytes
    for _ in range(3):
        h.submit_all([{"x": np.ones((1, 2), np.float32)}])
    assert h.events == ["forward"] * 3, f"a stalled request made a batch wait: {h.events}"
    assert h.batcher.arriving == 1  # still counted as unfinished (its connection will time out)
    h.events.clear()
    h.submit_all([{"x": np.ones((1, 2), np.float32)}], receiving=(stalled,))  # its bytes flow again
    h.batcher.request_arrived(stalled)
    h.close()
    assert h.events == [("timer set", 0.1), "timer fired", "forward"], h.events
    assert h.batcher.arriving == 0
