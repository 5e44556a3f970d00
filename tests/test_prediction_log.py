"""Sampled prediction log (services/serving/server/predlog.py): sampling rate, summaries over max_bytes, the
opt-out header, drops (not latency) when the consumer stalls, and real events from a real server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
import requests
from prometheus_client import REGISTRY

from services.serving.errors import UserError
from services.serving.server import inference, logs, predlog
from services.serving.server.observe import NO_LOG_HEADER, Prediction
from services.serving.server.predlog import PredictionLog
from services.serving.server.settings import ServerSettings
from tests.conftest import ROOT, free_port, make_torch_mlp_artifact


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prediction(
    rid: str = "r1",
    model: str = "m",
    inputs: dict[str, np.ndarray] | None = None,
    outputs: dict[str, np.ndarray] | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    latency_s: float = 0.0042,
) -> Prediction:
    if inputs is None:
        inputs = {"input": np.arange(8, dtype=np.float32).reshape(1, 8) / 4}
    if outputs is None and status == 200:
        outputs = {"output": np.array([[0.5, -1.25, 3.0]], dtype=np.float32)}
    return Prediction(rid, model, "1", inputs, outputs, status, latency_s, headers or {})


class Collect:
    """A sink that keeps the lines; ``stall()`` makes the writer block in it until ``release()``."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def __call__(self, data: bytes) -> None:
        self.entered.set()
        self.open.wait(60)
        self.lines += data.splitlines(keepends=True)

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.lines]

    def wait(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.docs()


def counter(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model, "version": "1"}) or 0.0


def make_log(sink: Collect, model: str, **kw: Any) -> PredictionLog:
    return PredictionLog(model, "1", sink=sink, **kw)


def answered(observers: list[Any], rid: str, model: str, draw: Callable[[], float] = random.random) -> None:
    """What a front end does after an inference answer: ``notify``, which draws once for all observers."""
    p = prediction(rid=rid, model=model)
    call = SimpleNamespace(
        route="infer", request_id=rid, inputs=p.inputs, outputs=p.outputs, elapsed_ns=4_200_000, headers={}
    )
    inference.notify(SimpleNamespace(name=model, version="1", observers=observers), call, 200, draw)


# --- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.2])
def test_sampling_rate_within_statistical_bounds(rate: float) -> None:
    """20,000 answers at 1 % (seeded draws): the logged count is within ±0.3 % absolute (> 4 sigma) of the rate."""
    sink = Collect()
    log = make_log(sink, f"sample-{rate}", sample=rate, queue_size=20_000)
    n = 20_000
    draw = random.Random(20261128).random
    for i in range(n):
        answered([log], f"r{i}", f"sample-{rate}", draw)
    assert log.flush(30)
    docs = sink.docs()
    assert abs(len(docs) / n - rate) <= 0.003, len(docs)
    ids = [d["http"]["request"]["id"] for d in docs]
    assert len(set(ids)) == len(ids)  # each sampled request is logged once
    assert counter("dlstack_prediction_log_written_total", f"sample-{rate}") == len(docs)


def test_sample_zero_logs_nothing_and_one_logs_everything() -> None:
    off, on = Collect(), Collect()
    log_off, log_on = make_log(off, "s0", sample=0.0), make_log(on, "s1", sample=1.0)
    for i in range(50):
        answered([log_off, log_on], str(i), "s")
    assert len(on.wait(50)) == 50
    assert off.docs() == []


# --- what an event holds ------------------------------------------------------------------------


def test_full_event_carries_request_model_tensors_latency_and_status() -> None:
    sink = Collect()
    log = make_log(sink, "full", sample=1.0)
    p = prediction(rid="abc-123", model="full", latency_s=0.0123456)
    log.observe(p)
    (doc,) = sink.wait(1)
    flat = flatten(doc)
    assert flat["event.dataset"] == predlog.DATASET
    assert flat["http.request.id"] == "abc-123"
    assert (flat["labels.model"], flat["labels.model_version"]) == ("full", "1")
    assert flat["http.response.status_code"] == 200
    assert flat["dlstack.prediction.latency_ms"] == pytest.approx(12.346, abs=1e-3)
    assert flat["event.duration"] == 12345600
    assert flat["dlstack.prediction.form"] == "full"
    pred = doc["dlstack"]["prediction"]
    assert pred["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [x / 4 for x in range(8)]}]
    assert pred["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [1, 3], "data": [0.5, -1.25, 3.0]}]
    assert doc["service"]["name"] == logs.SERVICE_NAME and doc["log"]["logger"] == predlog.LOGGER


def test_failed_request_has_no_outputs() -> None:
    sink = Collect()
    log = make_log(sink, "failed", sample=1.0)
    log.observe(prediction(model="failed", inputs={}, status=400))
    log.observe(Prediction("r2", "failed", "1", None, None, 415, 0.001, {}))
    first, second = sink.wait(2)
    assert first["dlstack"]["prediction"]["outputs"] is None
    assert first["http"]["response"]["status_code"] == 400
    assert second["dlstack"]["prediction"]["inputs"] is None


def test_over_max_bytes_the_event_carries_summaries() -> None:
    rng = np.random.default_rng(3)
    big = rng.normal(size=(4, 300)).astype(np.float32)
    words = np.array([[b"caf\xc3\xa9", b"\xff\xfe"]], dtype=object)
    sink = Collect()
    log = make_log(sink, "big", sample=1.0, max_bytes=1024)
    log.observe(prediction(model="big", inputs={"input": big, "words": words}))
    (doc,) = sink.wait(1)
    line = sink.lines[0]
    assert len(line) <= 1024, len(line)
    pred = doc["dlstack"]["prediction"]
    assert pred["form"] == "summary"
    s_in, s_words = pred["inputs"]
    assert s_in == {
        "name": "input",
        "datatype": "FP32",
        "shape": [4, 300],
        "min": pytest.approx(float(big.min())),
        "max": pytest.approx(float(big.max())),
        "mean": pytest.approx(float(big.astype(np.float64).mean())),
        "sha256": hashlib.sha256(big.tobytes()).hexdigest(),
    }
    assert "data" not in s_in
    packed = b"".join(len(b).to_bytes(4, "little") + b for b in (b"caf\xc3\xa9", b"\xff\xfe"))
    assert s_words["datatype"] == "BYTES" and s_words["sha256"] == hashlib.sha256(packed).hexdigest()
    (s_out,) = pred["outputs"]
    assert s_out["max"] == 3.0 and s_out["min"] == -1.25


def test_an_event_just_over_max_bytes_is_summarised_just_under_is_not() -> None:
    """The limit is on the whole line, not a guess from element counts."""
    p = prediction(model="edge")
    full_len = len(PredictionLog("edge", "1", sample=1.0, max_bytes=65536).line(p, now=0.0))
    for limit, form in ((full_len, "full"), (full_len - 1, "summary")):
        line = PredictionLog("edge", "1", sample=1.0, max_bytes=limit).line(p, now=0.0)
        assert json.loads(line)["dlstack"]["prediction"]["form"] == form


def test_a_json_request_body_over_max_bytes_is_summarised_without_serialising() -> None:
    """The request's own JSON size decides first; a binary request (its body is raw bytes) is judged by its line."""
    log = PredictionLog("edge", "1", sample=1.0, max_bytes=4096)
    small = prediction(model="edge")
    assert json.loads(log.line(small, now=0.0))["dlstack"]["prediction"]["form"] == "full"
    big_body = prediction(model="edge", headers={"content-length": "5000"})
    assert json.loads(log.line(big_body, now=0.0))["dlstack"]["prediction"]["form"] == "summary"
    binary = prediction(model="edge", headers={"content-length": "5000", "inference-header-content-length": "120"})
    assert json.loads(log.line(binary, now=0.0))["dlstack"]["prediction"]["form"] == "full"


def test_bytes_tensors_are_logged_as_text() -> None:
    sink = Collect()
    log = make_log(sink, "bytes", sample=1.0)
    words = np.array([[b"hello", b"caf\xc3\xa9"]], dtype=object)
    log.observe(prediction(model="bytes", inputs={"text": words}, outputs={"text_out": words}))
    (doc,) = sink.wait(1)
    assert doc["dlstack"]["prediction"]["inputs"][0] == {
        "name": "text",
        "datatype": "BYTES",
        "shape": [1, 2],
        "data": ["hello", "café"],
    }


def test_line_is_the_ecs_logging_formatter_line() -> None:
    """Prediction lines are built without a LogRecord; they must be what the server's ECS formatter writes."""
    # Values that need escaping, and a summary line as well as a full one.
    p = prediction(rid='id "quoted" \\ é', model="fmt\tmodel", status=200, latency_s=0.0123456)
    summaries = predlog.summaries_of([p.inputs, p.outputs])
    for form, inputs, outputs in [
        ("full", predlog._tensors(p.inputs), predlog._tensors(p.outputs)),
        ("summary", *summaries),
    ]:
        fields = predlog.event_fields(p, form, inputs, outputs)
        rec = logging.LogRecord(predlog.LOGGER, logging.INFO, __file__, 1, "%s", ("prediction fmt\tmodel:1 200",), None)
        rec.ecs = json.loads(json.dumps(fields, default=lambda a: a.tolist()))
        expected = logs.formatter().format(rec) + "\n"
        got = predlog.ecs_line(rec.created, p, form, inputs, outputs)
        assert got.decode() == expected


# --- opt-out ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "logged"), [("off", False), (" OFF ", False), ("Off", False), ("on", True)])
def test_opt_out_header(value: str, logged: bool) -> None:
    sink = Collect()
    log = make_log(sink, "optout", sample=1.0)
    log.observe(prediction(rid="marker", headers={NO_LOG_HEADER: value}))
    log.observe(prediction(rid="after"))
    ids = [d["http"]["request"]["id"] for d in sink.wait(2 if logged else 1)]
    time.sleep(0.1)
    ids = [d["http"]["request"]["id"] for d in sink.docs()]
    assert ids == (["marker", "after"] if logged else ["after"])


# --- a stalled consumer -------------------------------------------------------------------------


def test_stalled_sink_drops_and_counts_and_never_blocks_the_caller() -> None:
    sink = Collect()
    sink.open.clear()  # the consumer stalls: the writer thread blocks in the sink
    model = "stalled"
    log = make_log(sink, model, sample=1.0, queue_size=10)
    log.observe(prediction(rid="first", model=model))
    assert sink.entered.wait(30)  # the writer holds "first" and is stuck
    before = counter("dlstack_prediction_log_dropped_total", model)
    durations = []
    for i in range(200):
        t0 = time.perf_counter()
        log.observe(prediction(rid=f"r{i}", model=model))
        durations.append(time.perf_counter() - t0)
    # 10 fit in the queue, the other 190 are dropped and counted; none waited for the stalled sink.
    assert counter("dlstack_prediction_log_dropped_total", model) - before == 190
    assert max(durations) < 1.0  # generous: a blocked put would wait the sink's 60 s
    sink.open.set()
    docs = sink.wait(11)
    assert len(docs) == 11
    assert counter("dlstack_prediction_log_written_total", model) == 11


def test_queue_memory_is_bounded_by_bytes_too() -> None:
    sink = Collect()
    sink.open.clear()
    model = "heavy"
    log = make_log(sink, model, sample=1.0, queue_size=1000, queue_bytes=1 << 20)
    big = {"input": np.zeros((1, 100_000), dtype=np.float32)}  # 400 kB each
    log.observe(prediction(rid="first", model=model, inputs=big))
    assert sink.entered.wait(30)
    for i in range(10):
        log.observe(prediction(rid=f"r{i}", model=model, inputs=big))
    # The writer already turned "first" into a line (its arrays are released): 1 MiB holds 2 more, 8 dropped.
    assert counter("dlstack_prediction_log_dropped_total", model) == 8
    sink.open.set()
    assert len(sink.wait(3)) == 3


# --- bad settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sample": 1.5}, "prediction_log_sample 1.5 must be between 0 and 1"),
        ({"sample": -0.1}, "prediction_log_sample -0.1 must be between 0 and 1"),
        ({"max_bytes": 10}, "prediction_log_max_bytes 10 must be >= 256"),
        ({"queue_size": 0}, "prediction_log_queue 0 must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        PredictionLog("m", "1", **kw)


class _Server:
    def __init__(self) -> None:
        self.name, self.version = "inst", "1"
        self.observers: list[Any] = []


@pytest.mark.parametrize(
    ("env", "installed"),
    [
        ({}, False),  # the default: off
        ({"DLSTACK_PREDICTION_LOG_SAMPLE": "0"}, False),
        (
            {
                "DLSTACK_PREDICTION_LOG_SAMPLE": "0.25",
                "DLSTACK_PREDICTION_LOG_MAX_BYTES": "2048",
                "DLSTACK_PREDICTION_LOG_QUEUE": "7",
            },
            True,
        ),
    ],
)
def test_install_registers_an_observer_only_when_on(env: dict[str, str], installed: bool) -> None:
    server = _Server()
    settings = ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": "/model", **env})
    log = predlog.install(server, settings)
    assert (log is not None) == installed
    assert server.observers == ([log] if installed else [])
    if log is not None:
        assert (log.sample, log.max_bytes, log.queue_size) == (0.25, 2048, 7)


def test_bad_env_is_a_one_line_error_naming_the_variable() -> None:
    with pytest.raises(UserError, match="DLSTACK_PREDICTION_LOG_SAMPLE"):
        ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": "/model", "DLSTACK_PREDICTION_LOG_SAMPLE": "2"})


# --- real servers ---------------------------------------------------------------------------------

MODEL = "plog-mlp"
pytestmark = pytest.mark.xdist_group("prediction_log_server")  # one real server for the module's real-server test


def infer_body(rows: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}


def metric(text: str, name: str) -> float:
    """The value of ``name{model=MODEL,version="1"}`` in a Prometheus exposition."""
    prefix = f'{name}{{model="{MODEL}",version="1"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert values, f"{name} is not in /metrics"
    return values[0]


class StallableServer:
    """A real ``dlstack serve`` whose stdout the test reads only while ``reading`` is set: cleared, the pipe
    fills and every write to stdout blocks, as when a log shipper stalls."""

    def __init__(self, artifact: Any, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        full_env.update({"DLSTACK_DRAIN_SECONDS": "0", "DLSTACK_CPU_LIMIT": "1", **env})
        args = [sys.executable, "-m", "stacks.cli", "serve", str(artifact), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.reading = threading.Event()
        self.reading.set()
        self.lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.reading.wait()

    def events(self) -> list[dict[str, Any]]:
        docs = [json.loads(x) for x in list(self.lines)]
        return [flatten(d) for d in docs if d.get("event", {}).get("dataset") == predlog.DATASET]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, b"".join(self.lines[-20:]).decode()
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.reading.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


@dataclass
class Run:
    """What one real server at 50 % saw and wrote: first with its stdout read, then with it stalled."""

    sent: dict[str, tuple[np.ndarray, list[float]]] = field(default_factory=dict)
    opted_out: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    metrics_free: str = ""  # /metrics once the read phase's events were all written
    free: list[float] = field(default_factory=list)  # request latencies (s) with stdout read
    stalled: list[float] = field(default_factory=list)  # ... with stdout unread
    metrics_stalled: str = ""
    recovered: float = 0.0  # written_total once stdout is read again


SAMPLE = 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    artifact = make_torch_mlp_artifact(tmp_path_factory.mktemp("plog") / "artifact", name=MODEL)
    env = {
        ServerSettings.env_name("prediction_log_sample"): str(SAMPLE),
        ServerSettings.env_name("prediction_log_max_bytes"): "2048",
        ServerSettings.env_name("prediction_log_queue"): "20",
    }
    out = Run()
    rng = np.random.default_rng(11)
    url = f"/v2/models/{MODEL}/infer"
    srv = StallableServer(artifact, env)
    try:
        srv.wait_ready()
        with requests.Session() as http:

            def post(rows: np.ndarray, headers: dict[str, str]) -> tuple[float, list[float]]:
                t0 = time.perf_counter()
                r = http.post(srv.url + url, json=infer_body(rows), headers=headers, timeout=30)
                elapsed = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                return elapsed, r.json()["outputs"][0]["data"]

            def written() -> float:
                return metric(http.get(srv.url + "/metrics", timeout=30).text, "dlstack_prediction_log_written_total")

            # Read phase: 1-row requests (full events), 64-row ones (over max_bytes: summaries), some opted out.
            for i in range(200):
                rows = rng.normal(size=(64 if i % 7 == 0 else 1, 8)).astype(np.float32)
                rid = f"plog-{i}"
                headers = {"X-Request-ID": rid}
                if i % 10 == 5:
                    headers[NO_LOG_HEADER] = "off"
                    out.opted_out.add(rid)
                elapsed, answer = post(rows, headers)
                out.sent[rid] = (rows, answer)
                out.free.append(elapsed)
            # The writer lags the answers by milliseconds: wait until its count holds still and stdout has it all.
            deadline, last = time.monotonic() + 30, -1.0
            while (count := written()) != last or len(srv.events()) != count:
                assert time.monotonic() < deadline, "the written events reach stdout"
                last = count
                time.sleep(0.3)
            out.events = srv.events()
            out.metrics_free = http.get(srv.url + "/metrics", timeout=30).text
            # Stalled phase: nothing reads stdout; the 64 KiB pipe fills with about a hundred lines.
            srv.reading.clear()
            one_row = np.ones((1, 8), np.float32)
            out.stalled = [post(one_row, {})[0] for _ in range(600)]
            out.metrics_stalled = http.get(srv.url + "/metrics", timeout=30).text
            # The shipper catches up: events are written again.
            srv.reading.set()
            before = metric(out.metrics_stalled, "dlstack_prediction_log_written_total")
            deadline = time.monotonic() + 30
            while written() < before + 5 and time.monotonic() < deadline:
                post(one_row, {})
                time.sleep(0.05)
            out.recovered = written()
    finally:
        srv.stop()
    yield out


def _sampled_events_carry_what_was_sent_and_answered(run: Run) -> None:
    eligible = len(run.sent) - len(run.opted_out)  # 180 at 50 %: about 90, sd 6.7; ±35 is over 5 sd
    assert abs(len(run.events) - SAMPLE * eligible) <= 35, len(run.events)
    assert metric(run.metrics_free, "dlstack_prediction_log_written_total") == len(run.events)
    assert metric(run.metrics_free, "dlstack_prediction_log_dropped_total") == 0
    forms = set()
    for d in run.events:
        rid = d["http.request.id"]
        assert rid in run.sent and rid not in run.opted_out
        assert (d["labels.model"], d["labels.model_version"], d["http.response.status_code"]) == (MODEL, "1", 200)
        assert d["dlstack.prediction.latency_ms"] > 0 and d["event.duration"] > 0
        rows, answer = run.sent[rid]
        (inp,), (out,) = d["dlstack.prediction.inputs"], d["dlstack.prediction.outputs"]
        forms.add(d["dlstack.prediction.form"])
        if d["dlstack.prediction.form"] == "full":
            assert (inp["name"], inp["datatype"], inp["shape"]) == ("input", "FP32", [1, 8])
            np.testing.assert_array_equal(np.array(inp["data"], np.float32), rows.ravel())
            np.testing.assert_array_equal(np.array(out["data"], np.float32), np.array(answer, np.float32))
        else:
            assert rows.shape[0] == 64 and inp["shape"] == [64, 8] and "data" not in inp
            assert inp["sha256"] == hashlib.sha256(rows.tobytes()).hexdigest()
            assert inp["min"] == pytest.approx(float(rows.min())) and inp["max"] == pytest.approx(float(rows.max()))
            assert out["shape"] == [64, 3]
    assert forms == {"full", "summary"}


def _stalled_stdout_drops_and_counts_without_slowing_requests(run: Run) -> None:
    # 600 requests, about 300 sampled; the pipe, the writer's batch and the 20-event queue hold far fewer.
    assert metric(run.metrics_stalled, "dlstack_prediction_log_dropped_total") >= 100
    assert max(run.stalled) < 5.0  # no request waited for stdout (generous: a blocked one would wait for ever)
    free, stalled = float(np.median(run.free)), float(np.median(run.stalled))
    assert stalled <= 5 * free + 0.05, (stalled, free)
    before = metric(run.metrics_stalled, "dlstack_prediction_log_written_total")
    assert run.recovered >= before + 5, "events are written again once stdout drains"


def test_real_server_prediction_log(run: Run, subtests: Any) -> None:
    """One real server (xdist could split separate tests across workers, starting it twice); each check is a
    subtest, reported on its own."""
    for check in (
        _sampled_events_carry_what_was_sent_and_answered,
        _stalled_stdout_drops_and_counts_without_slowing_requests,
    ):
        with subtests.test(msg=check.__name__.strip("_")):
            check(run)


@pytest.mark.parametrize(
    ("arr", "datatype"),
    [
        (np.array([[1.5, -2.0]], dtype=np.float16), "FP16"),
        (np.array([[True, False, True]]), "BOOL"),
        (np.array([[2**40, -3]], dtype=np.int64), "INT64"),
        (np.array([[0, 255]], dtype=np.uint8), "UINT8"),
        (np.zeros((0, 4), dtype=np.float32), "FP32"),
    ],
)
def test_every_datatype_renders_full_and_summary(arr: np.ndarray, datatype: str) -> None:
    p = prediction(model="types", inputs={"x": arr}, outputs={"y": arr})
    full = json.loads(PredictionLog("types", "1", sample=1.0).line(p, now=0.0))["dlstack"]["prediction"]
    assert full["inputs"] == [
        {"name": "x", "datatype": datatype, "shape": list(arr.shape), "data": arr.ravel().tolist()}
    ]
    (s,) = predlog._summaries({"x": arr}) or []
    assert (s["datatype"], s["shape"], s["sha256"]) == (
        datatype,
        list(arr.shape),
        hashlib.sha256(arr.tobytes()).hexdigest(),
    )
    if arr.size:
        assert (s["min"], s["max"]) == (float(arr.min()), float(arr.max()))
    else:
        assert s["min"] is s["max"] is s["mean"] is None


@pytest.mark.parametrize(
    "arr",
    [
        np.array([0.0, 1.0, -0.0, 1e-7, np.nan, np.inf], np.float32),
        np.zeros(6, np.float64),
        np.zeros(6, np.float16),
        np.zeros(6, np.int8),
        np.zeros(6, np.uint64),
        np.zeros(6, bool),
        np.array([b"", b""], dtype=object),
    ],
    ids=lambda a: str(a.dtype) if a.dtype.kind != "f" or a[1] == 0 else "float32-shortest",
)
def test_the_size_pre_check_never_summarises_values_that_would_fit(arr: np.ndarray) -> None:
    """A tensor goes straight to its summary when its elements at their shortest JSON exceed max_bytes: the
    per-kind minimum must really be a lower bound of what the full line writes, so nothing that fits is cut."""
    raw = orjson.dumps(predlog._data(arr), option=orjson.OPT_SERIALIZE_NUMPY)  # as the full line writes it
    with_separators = len(raw) - 2 + 1  # no brackets, a comma after every element
    assert with_separators >= arr.size * predlog._MIN_JSON_BYTES[arr.dtype.kind], raw
    assert predlog._fits(prediction(inputs={"t": arr}, outputs={}), with_separators)


def test_batched_summaries_equal_one_by_one() -> None:
    """The writer summarises a batch's small same-shaped tensors together (one stacked reduction per statistic,
    the sha256 fed in pieces that keep the GIL); every field must equal the tensor's own ``summary``."""
    rng = np.random.default_rng(7)
    batch: list[dict[str, np.ndarray] | None] = [
        {"x": rng.random((1, 784), dtype=np.float32), "ids": np.array([[3, -1]], np.int64)},
        None,  # a request that failed before decoding
        {"x": rng.random((1, 784), dtype=np.float32), "ids": np.array([[7, 2]], np.int64)},
        {"x": rng.random((2, 784), dtype=np.float32)},  # another shape: its own stack
        {"x": np.array([[np.nan, 1.0]], np.float32), "flag": np.array([[True, False]])},
        {"big": rng.random((1, 20_000)), "empty": np.zeros((0, 4), np.float32), "s": np.array(2.5)},  # alone
        {"text": np.array([b"a", b"bc"], dtype=object)},
    ]
    got = predlog.summaries_of(batch)
    for ts, summaries in zip(batch, got, strict=True):
        if ts is None:
            assert summaries is None
            continue
        assert summaries is not None
        want = predlog._summaries(ts) or []
        assert [s["name"] for s in summaries] == list(ts)
        for g, w in zip(summaries, want, strict=True):
            assert {k: g[k] for k in ("name", "datatype", "shape", "sha256")} == {
                k: w[k] for k in ("name", "datatype", "shape", "sha256")
            }
            for k in ("min", "max", "mean"):
                if w[k] is None:
                    assert g[k] is None
                else:
                    assert g[k] == pytest.approx(w[k], nan_ok=True, rel=1e-12)
