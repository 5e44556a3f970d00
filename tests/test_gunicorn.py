"""Gunicorn layout from the CPU limit, model loaded after fork, graceful SIGTERM draining under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from services.serving.errors import UserError
from services.serving.server.settings import cgroup_cpu_limit, cpu_limit, layout
from tests.conftest import ROOT, make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

HANG_S = 120  # s: the bound on every wait, there to end a hang; no test passes or fails on how fast it went


def wait_for(what: str, ok: Any) -> None:
    deadline = time.monotonic() + HANG_S
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not after {HANG_S} s"
        time.sleep(0.05)


def messages(srv: ServerHandle) -> list[tuple[int | None, str]]:
    """(pid, message) of every log line but the access lines, in the order the server wrote them."""
    return [
        (d.get("process", {}).get("pid"), str(d.get("message", "")))
        for d in srv.json_lines()
        if d.get("event", {}).get("dataset") != "dlstack.access"
    ]


def assert_graceful_stop(srv: ServerHandle, workers: set[int]) -> None:
    """Each worker drained and exited in order, none cut requests off at the graceful timeout, then the master."""
    log = messages(srv)
    master = srv.proc.pid
    assert not [m for _, m in log if m.startswith("graceful timeout")], log
    order = [m for pid, m in log if pid == master]
    assert order.index("Handling signal: term") < order.index("Shutting down: Master"), order
    for w in workers:
        mine = [m for pid, m in log if pid == w]
        steps = ["SIGTERM: readiness is now 503; draining", "worker stopping (SIGTERM)", "Worker exiting"]
        at = [next((i for i, m in enumerate(mine) if m.startswith(step)), -1) for step in steps]
        assert -1 not in at and at == sorted(at), (w, mine)


def test_cgroup_v2_and_v1_cpu_limits(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None


def test_cpu_limit_env_wins_and_bad_values_say_how_to_fix() -> None:
    assert cpu_limit({"DLSTACK_CPU_LIMIT": "500m"}) == 0.5
    assert cpu_limit({"DLSTACK_CPU_LIMIT": "3"}) == 3.0
    with pytest.raises(
        UserError, match=r'DLSTACK_CPU_LIMIT=\'two\' is not a number; set it to a CPU count > 0, e.g. "2"'
    ):
        cpu_limit({"DLSTACK_CPU_LIMIT": "two"})
    with pytest.raises(UserError, match="set it to a CPU count > 0"):
        cpu_limit({"DLSTACK_CPU_LIMIT": "0"})


@pytest.mark.parametrize(
    ("cpus", "kw", "expected"),
    [
        (2, {}, (2, 4, 1)),  # one worker per CPU, one intra-op thread each
        (4, {"workers": 2}, (2, 4, 2)),  # fewer workers: the rest of the CPUs go to intra-op threads
        (0.5, {}, (1, 4, 1)),  # a fraction of a CPU still needs one worker
        (2, {"max_batch_size": 16}, (2, 4, 1)),  # batching does not add threads: they would queue on the GIL
        (2, {"http_threads": 3, "max_batch_size": 16}, (2, 3, 1)),  # an explicit value wins
    ],
)
def test_layout_from_cpu_limit(cpus: float, kw: dict[str, Any], expected: tuple[int, int, int]) -> None:
    lay = layout(cpus, **kw)
    assert (lay.workers, lay.http_threads, lay.intra_op_threads) == expected


def gunicorn_settings(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    code = (
        "import json, os, services.serving.server.gunicorn_conf as c; print(json.dumps({k: getattr(c, k) for k in "
        "('workers', 'threads', 'worker_class', 'preload_app', 'timeout', 'graceful_timeout', 'keepalive', "
        "'max_requests', 'max_requests_jitter', 'bind')} | {'intra': os.environ['DLSTACK_INTRA_OP_THREADS']}))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("DLSTACK_")}
    base["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    out = subprocess.run([sys.executable, "-c", code], env=base | env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_gunicorn_conf_defaults_follow_the_cpu_limit(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp", max_batch_size=12)
    env = {
        "DLSTACK_CPU_LIMIT": "4",
        "DLSTACK_WORKERS": "2",
        "DLSTACK_BIND": "127.0.0.1:9",
        "DLSTACK_MAX_BATCH_SIZE": "1",
    }
    s = gunicorn_settings(env | {"DLSTACK_ARTIFACT_DIR": str(art)}, tmp_path)
    assert (s["workers"], s["threads"], s["intra"]) == (2, 4, "2")
    assert s["worker_class"] == "services.serving.server.worker.EventLoopWorker" and s["preload_app"] is False
    assert s["bind"] == ["127.0.0.1:9"]
    assert s["graceful_timeout"] > 0 and s["timeout"] > s["graceful_timeout"] / 2 and s["keepalive"] >= 60
    assert s["max_requests"] > 0 and 0 < s["max_requests_jitter"] < s["max_requests"]
    s = gunicorn_settings({"DLSTACK_CPU_LIMIT": "3", "DLSTACK_ARTIFACT_DIR": str(art)}, tmp_path)
    assert (s["workers"], s["threads"], s["intra"]) == (3, 4, "1")  # batching adds no threads: they queue on the GIL
    s = gunicorn_settings({"DLSTACK_HTTP_THREADS": "6", "DLSTACK_ARTIFACT_DIR": str(art)}, tmp_path)
    assert s["threads"] == 6


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DLSTACK_WORKERS": "two"}, "DLSTACK_WORKERS='two' is not an integer"),
        ({"DLSTACK_MAX_BATCH_SIZE": "0"}, "DLSTACK_MAX_BATCH_SIZE='0' is out of range; set it to a whole number >= 1"),
        ({"DLSTACK_CPU_LIMIT": "lots"}, "DLSTACK_CPU_LIMIT='lots' is not a number; set it to a CPU count > 0"),
        ({"DLSTACK_ARTIFACT_DIR": ""}, "DLSTACK_ARTIFACT_DIR is not set"),
    ],
)
def test_bad_env_fails_once_in_the_master_with_a_clear_message(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """Straight gunicorn (as the image runs it): a bad setting must not crash-loop every worker."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DLSTACK_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    base |= {"DLSTACK_ARTIFACT_DIR": str(tmp_path), "DLSTACK_BIND": "127.0.0.1:0", "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:services.serving.server.gunicorn_conf",
            "services.serving.server.app:create_app()",
        ],
        env=base | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"dlstack serve: error: {message}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("dlstack-metrics-*"))  # nothing left behind


def test_model_is_loaded_after_fork_in_each_worker(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    with start_server(art, workers=2, env={"DLSTACK_CPU_LIMIT": "4"}) as srv:
        workers = srv.worker_pids()
        assert len(workers) == 2

        def has_torch(pid: int) -> bool:
            return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

        # torch is imported before fork (shared pages), but the model is loaded by each worker, not the master
        assert has_torch(srv.proc.pid) and all(has_torch(w) for w in workers)
        assert {e["process"]["pid"] for e in srv.load_events()} == workers
        assert [e["labels"]["intra_op_threads"] for e in srv.load_events()] == ["2", "2"]  # 4 CPUs / 2 workers


def test_sigterm_under_load_drains_without_failed_requests(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "slow", sizes=(8, 1024, 1024, 1024, 3))
    body = {"inputs": [{"name": "input", "shape": [32, 8], "datatype": "FP32", "data": [0.5] * 256}]}
    # The drain is the window the probes below must land in, after the workers said they are draining: a
    # 5 s window leaves room for a busy machine (the test waits for events, never for a fixed time).
    with start_server(art, workers=2, threads=8, env={"DLSTACK_DRAIN_SECONDS": "5"}) as srv:
        workers = srv.worker_pids()
        url = f"{srv.url}/v2/models/mlp/infer"
        results: list[tuple[bool, str]] = []  # (SIGTERM sent before this request was, outcome)
        lock = threading.Lock()
        stop = threading.Event()
        signalled = threading.Event()

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                after_signal = signalled.is_set()
                try:
                    outcome = str(session.post(url, json=body, timeout=HANG_S).status_code)
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                    time.sleep(0.05)
                with lock:
                    results.append((after_signal, outcome))

        def answered() -> int:
            with lock:
                return sum(o == "200" for _, o in results)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        wait_for("32 answers before SIGTERM", lambda: answered() >= 32)
        signalled.set()  # set before the signal: a request that saw it unset was sent before SIGTERM
        srv.proc.send_signal(signal.SIGTERM)
        draining = [(w, "SIGTERM: readiness is now 503; draining") for w in workers]
        wait_for("both workers draining", lambda: set(draining) <= set(messages(srv)))
        ready = requests.get(f"{srv.url}/v2/health/ready", timeout=HANG_S)
        live = requests.get(f"{srv.url}/v2/health/live", timeout=HANG_S)
        during = requests.post(url, json=body, timeout=HANG_S)
        rc = srv.proc.wait(HANG_S)
        stop.set()
        for t in threads:
            t.join(HANG_S)

    assert ready.status_code == 503 and "draining" in ready.json()["error"]
    assert live.status_code == 200
    assert during.status_code == 200, "the server stopped answering before the drain period ended"
    assert rc == 0
    assert_graceful_stop(srv, workers)
    before = [o for after_signal, o in results if not after_signal]
    after = [o for after_signal, o in results if after_signal]
    assert len(before) >= 32
    assert set(before) == {"200"}, f"requests sent before SIGTERM failed: {sorted(set(before))}"
    assert not [o for o in after if o.startswith("5")]


def test_sigterm_keeps_every_access_line_and_no_silent_connection_holds_it_up(tmp_path: Path) -> None:
    """Access lines are buffered per worker: none may be lost at exit. A client that connected but never
    sent a byte (a TCP probe) must not keep a stopping worker waiting: the worker closes it as idle and
    exits on its own, instead of being cut off at the graceful timeout (made longer than the test waits)."""
    import socket

    art = make_torch_mlp_artifact(tmp_path / "m")
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
    rids = [f"before-stop-{i}" for i in range(40)]
    with start_server(art, workers=2, env={"DLSTACK_GRACEFUL_TIMEOUT": str(3 * HANG_S)}) as srv:
        workers = srv.worker_pids()
        with requests.Session() as session:
            for rid in rids:
                r = session.post(f"{srv.url}/v2/models/mlp/infer", json=body, headers={"X-Request-ID": rid})
                assert r.ok
        silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]  # both workers get some
        ours = {s.getsockname() for s in silent}

        def accepted() -> bool:  # the workers hold all 4 (not the listen backlog)
            held = set()
            for w in workers:
                held |= {(c.raddr.ip, c.raddr.port) for c in psutil.Process(w).connections("tcp") if c.raddr}
            return ours <= held

        wait_for("the silent connections accepted", accepted)
        rc = srv.stop(timeout=HANG_S)  # SIGKILL, and rc -9, if it is still running then
        for s in silent:
            s.close()
    assert rc == 0, f"the server did not stop by itself (rc {rc}): a silent connection held it up"
    assert_graceful_stop(srv, workers)
    stopping = [m for pid, m in messages(srv) if pid in workers and m.startswith("worker stopping (SIGTERM)")]
    open_at_stop = sum(int(m.split(": ", 1)[1].split(" connection")[0]) for m in stopping)
    assert open_at_stop >= 4, stopping  # the silent connections were open when the workers began to stop
    logged = {line["http"]["request"]["id"] for line in srv.access_lines()}
    assert set(rids) <= logged, f"access lines lost at shutdown: {sorted(set(rids) - logged)}"


def test_kept_alive_connections_are_closed_after_keepalive_requests(tmp_path: Path) -> None:
    """``DLSTACK_KEEPALIVE_REQUESTS``: the n-th response on a connection says ``Connection: close`` and closes it."""
    import http.client

    art = make_torch_mlp_artifact(tmp_path / "m")
    with start_server(art, workers=1, env={"DLSTACK_KEEPALIVE_REQUESTS": "3"}) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        seen = []
        for _ in range(3):
            conn.request("GET", "/v2/health/live")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == b'{"live":true}'
            seen.append(resp.getheader("Connection"))
        assert seen == ["keep-alive", "keep-alive", "close"]
        assert conn.sock is None or conn.sock.recv(1) == b""  # the server closed it
        conn.close()


def test_live_answers_while_the_model_loads_and_infer_waits_for_it(tmp_path: Path, monkeypatch: Any) -> None:
    """Liveness never depends on the model: a slow load must not make a liveness probe time out."""
    import services.serving.runtimes
    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings

    gate = threading.Event()
    real_create = services.serving.runtimes.create_runtime

    def gated_create(*args: Any, **kw: Any) -> Any:
        runtime = real_create(*args, **kw)
        real_load = runtime.load

        def slow_load() -> None:
            assert gate.wait(HANG_S)  # the "big model" finishes loading when the test says so
            real_load()

        runtime.load = slow_load  # type: ignore[method-assign]
        return runtime

    monkeypatch.setattr(services.serving.runtimes, "create_runtime", gated_create)
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    app = create_app(ServerSettings(artifact_dir=art))
    client = app.test_client()
    assert client.get("/v2/health/live").json == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and (r.json or {})["error"] == "not ready: model is loading"

    events: list[str] = []
    waiting = threading.Event()
    loaded = app.extensions["dlstack"].loaded
    real_wait = loaded.wait

    def recorded_wait(timeout: float | None = None) -> bool:
        events.append("infer waits for the load")
        waiting.set()
        return real_wait(timeout)

    monkeypatch.setattr(loaded, "wait", recorded_wait)
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8}]}
    answer: list[Any] = []

    def infer() -> None:  # arrives mid-load: waits instead of failing
        answer.append(client.post("/v2/models/mlp/infer", json=body))
        events.append("infer answered")

    t = threading.Thread(target=infer, daemon=True)
    t.start()
    try:
        assert waiting.wait(HANG_S), f"the request did not wait for the load: {answer}"
        events.append("load released")
    finally:
        gate.set()
        t.join(HANG_S)
    assert events == ["infer waits for the load", "load released", "infer answered"]
    r = answer[0]
    assert r.status_code == 200 and (r.json or {})["outputs"][0]["shape"] == [1, 3]
    assert client.get("/v2/health/ready").status_code == 200
