"""Smoke test of the server benchmark's harness: real servers, a real 1-second wrk run, the real parser."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from tests.bench import floor_server, harness, hostile_load, server_bench, wrk
from tests.conftest import free_port, make_torch_mlp_artifact

pytestmark = [
    pytest.mark.xdist_group("bench-smoke"),
    pytest.mark.tool("wrk"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[harness.Server, harness.Server, Path]]:
    tmp = tmp_path_factory.mktemp("bench")
    art = make_torch_mlp_artifact(tmp / "mlp", name="mlp", sizes=(8, 16, 3))
    # A 1 s header timeout lets the stalled-connection test see the server close and the helper reopen.
    env = {"PYTHONPATH": str(harness.ROOT), "NAIVE_MODEL_DIR": str(art), "DLSTACK_HEADER_TIMEOUT_S": "1"}
    ports = free_port(), free_port()
    with ThreadPoolExecutor(2) as pool:  # both start at once: torch import dominates
        futures = [
            pool.submit(harness.start, "dlstack", harness.dlstack_cmd(art, ports[0], 1), ports[0], tmp / "d.log", env),
            pool.submit(harness.start, "naive", harness.naive_cmd(ports[1], 1), ports[1], tmp / "n.log", env),
        ]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        failed = [exc for f in futures if (exc := f.exception()) is not None]
        if failed:
            raise failed[0]
        yield started[0], started[1], art
    finally:
        for s in started:
            s.stop()


def infer_total(server: harness.Server) -> float:
    """Successful infer requests counted by the server itself (dlstack_requests_total)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    pat = r"^dlstack_requests_total\{[^}]*\}\s+([\d.e+]+)$"
    lines = [ln for ln in text.splitlines() if 'route="infer"' in ln and 'code="200"' in ln]
    return sum(float(m.group(1)) for ln in lines if (m := re.match(pat, ln)))


def test_wrk_run_is_parsed_and_matches_the_server_count(servers: tuple[harness.Server, harness.Server, Path]) -> None:
    dl, _, _ = servers
    x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
    body, headers = harness.json_body("input", x)
    before = infer_total(dl)
    res, raw = wrk.run(dl.infer_url("mlp"), body, headers, connections=4, duration_s=1)
    served = infer_total(dl) - before
    assert res.errors == 0, raw
    assert res.requests > 0, raw
    # wrk counts completed responses; at most one in-flight request per connection is cut off at the end.
    assert res.requests <= served <= res.requests + 4, (res, served)
    # Requests/sec is wrk's count over wrk's own run time ("N requests in 1.02s"), however long the run took
    # on this machine; both are printed rounded.
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", raw, re.M)
    assert total is not None, raw
    seconds = float(total.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[total.group(3)]
    assert res.rps == pytest.approx(res.requests / seconds, rel=0.02), raw
    assert 0 < res.p50_ms <= res.p90_ms <= res.p99_ms, raw


def test_uvicorn_worker_serves_the_same_answers(
    servers: tuple[harness.Server, harness.Server, Path], tmp_path: Path
) -> None:
    missing = harness.uvicorn_available()
    if missing:
        pytest.skip(missing)
    _, _, art = servers
    _, _, x = server_bench._sample(art)
    port = free_port()
    cmd = harness.uvicorn_cmd(art, port, 1)
    env = {"PYTHONPATH": str(harness.ROOT), **harness.uvicorn_env(art)}
    with harness.start("dlstack-uvicorn", cmd, port, tmp_path / "uv.log", env=env) as uv:
        server_bench.check_correct(uv, "mlp", art, server_bench._reference(art, x))  # JSON and binary
        body, headers = harness.json_body("input", x)
        res, raw = wrk.run(uv.infer_url("mlp"), body, headers, connections=4, duration_s=1)
        assert res.requests > 0 and res.errors == 0, raw
        # uvicorn names itself in every answer: the worker really is uvicorn's, not gunicorn_conf's default
        assert requests.get(f"{uv.url}/v2/health/ready", timeout=10).headers.get("server") == "uvicorn"
        rows = server_bench.mean_batch(uv)
        assert rows is not None and 1.0 <= rows <= 8.0, rows


def test_wrk_counts_error_responses(servers: tuple[harness.Server, harness.Server, Path]) -> None:
    dl, _, _ = servers
    body, headers = harness.json_body("input", np.zeros((1, 8), dtype=np.float32))
    res, raw = wrk.run(dl.infer_url("no-such-model"), body, headers, connections=2, duration_s=1)
    assert res.requests > 0 and res.errors == res.requests, raw


def test_both_servers_agree_with_the_model(servers: tuple[harness.Server, harness.Server, Path]) -> None:
    dl, naive, art = servers
    _, _, x = server_bench._sample(art)
    want = server_bench._reference(art, x)
    for s in (dl, naive):
        server_bench.check_correct(s, "mlp", art, want)  # raises on a wrong answer, binary included
    with pytest.raises(AssertionError, match="expected"):
        server_bench.check_correct(naive, "mlp", art, want + 1)
    assert dl.pss_bytes() > 0 and naive.pss_bytes() > 0
    assert 0 < dl.cold_start_s < 120


def test_targets_fail_when_a_point_is_missing_or_has_errors() -> None:
    def pt(server: str, rps: float, p99: float, errors: int = 0, enc: str = "json") -> server_bench.Point:
        return server_bench.Point(server, "mnist-mlp", enc, 32, rps, 1.0, 2.0, p99, int(rps), errors)

    mem, cold = {"dlstack mnist-mlp": 1, "naive mnist-mlp": 2}, {"dlstack mnist-mlp": 1.0}
    good = [pt("naive", 1000, 10), pt("dlstack", 2000, 9), pt("dlstack", 3000, 5, enc="binary")]
    by_name = {t.name: t for t in server_bench.targets(good, mem, cold, 32, 200)}
    assert by_name["MLP, JSON, c=32"].passed and by_name["MLP, binary tensors, c=32 (vs naive JSON)"].passed
    assert not by_name["CNN, JSON, c=32"].passed and by_name["CNN, JSON, c=32"].measured == "not measured"
    assert by_name["memory (PSS, 2 workers, MLP)"].passed and by_name["cold start MLP"].passed
    slow_tail = [pt("naive", 1000, 10), pt("dlstack", 2000, 11)]
    assert not server_bench.targets(slow_tail, mem, cold, 32, 200)[0].passed  # p99 worse than naive
    errs = [pt("naive", 1000, 10), pt("dlstack", 2000, 9, errors=3)]
    assert not server_bench.targets(errs, mem, cold, 32, 200)[0].passed
    for name in ("MLP, JSON, c=32 vs transport floor JSON", "MLP, JSON, c=32, 200 stalled connections vs none"):
        assert by_name[name].measured == "not measured" and not by_name[name].passed
    more = [*good, pt("floor", 4000, 3), pt("floor", 4000, 3, enc="binary"), pt("dlstack+200 stalled", 1700, 9)]
    by_name = {t.name: t for t in server_bench.targets(more, mem, cold, 32, 200)}
    assert by_name["MLP, JSON, c=32 vs transport floor JSON"].passed  # 2000/4000 = 0.5
    assert by_name["MLP, binary, c=32 vs transport floor binary"].passed  # 3000/4000 = 0.75
    assert not by_name["MLP, JSON, c=32, 200 stalled connections vs none"].passed  # 1700/2000 = 0.85 < 0.9


def test_worker_choice_follows_the_issue_rule() -> None:
    def pt(server: str, rps: float) -> server_bench.Point:
        return server_bench.Point(server, "mnist-mlp", "json", 32, rps, 1.0, 2.0, 5.0, int(rps), 0)

    def probes(*passed: bool) -> list[dict[str, object]]:
        return [{"name": f"p{i}", "passed": ok, "detail": ""} for i, ok in enumerate(passed)]

    same = {"dlstack": probes(True, True), "dlstack-uvicorn": probes(True, True)}
    assert server_bench.worker_choice([pt("dlstack", 1000), pt("dlstack-uvicorn", 850)], same, 32)["choice"] == (
        "UvicornWorker"  # 15 % slower and as robust: the kept library wins
    )
    slow = server_bench.worker_choice([pt("dlstack", 1000), pt("dlstack-uvicorn", 750)], same, 32)
    assert slow["choice"] == "EventLoopWorker" and "costs 25%" in slow["reason"]
    weaker = {"dlstack": probes(True, True), "dlstack-uvicorn": probes(True, False)}
    fragile = server_bench.worker_choice([pt("dlstack", 1000), pt("dlstack-uvicorn", 990)], weaker, 32)
    assert fragile["choice"] == "EventLoopWorker" and fragile["probes_only_ours_pass"] == ["p1"]
    assert not server_bench.worker_choice([pt("dlstack", 1000)], same, 32)["decided"]

    points = [pt("dlstack", 1000), pt("dlstack-uvicorn", 750)]
    result = {
        "settings": {"duration_s": 15, "floor": "protocol"},
        "machine": {"cpus": 2, "loadavg_1m_at_end": 1.5},
        "points": [asdict(p) for p in points],
        "targets": [asdict(t) for t in server_bench.targets(points, {}, {}, 32, 200)],
        "probes": weaker,
        "worker_choice": fragile,
        "cold_start_s": {},
        "memory_pss_bytes": {},
        "in_process_samples_per_s": {},
        "stalled_helper": [{"held": 200, "opened": 230, "closed_by_server": 30}] * 3,
    }
    md = server_bench.markdown(result)
    assert "| hostile probe | EventLoopWorker (ours) | UvicornWorker |" in md
    assert "| p1 | pass:  | FAIL:  |" in md
    assert "Worker choice: **EventLoopWorker** — uvicorn fails probes ours passes: p1." in md
    assert "| stalled connections, 3 rounds | at least 200 held at each round's end; 690 opened, 90 closed" in md


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Server]:
    port = free_port()
    cmd = floor_server.cmd(floor_server.FLOOR_IMPL, port, (-1, 8))
    log = tmp_path_factory.mktemp("floor") / "floor.log"
    with harness.start("floor", cmd, port, log, env={"PYTHONPATH": str(harness.ROOT)}) as server:
        yield server


def test_floor_decodes_like_a_model_server_and_takes_load(
    floor: harness.Server, servers: tuple[harness.Server, harness.Server, Path]
) -> None:
    _, _, art = servers
    server_bench.check_floor(floor, art)  # both encodings 200, a wrongly shaped input 400
    body, headers = harness.binary_body("input", np.ones((1, 8), dtype=np.float32))
    res, raw = wrk.run(floor.infer_url("floor"), body, headers, connections=4, duration_s=1)
    assert res.requests > 0 and res.errors == 0, raw


def test_the_other_floor_implementation_decodes_alike(
    servers: tuple[harness.Server, harness.Server, Path], tmp_path: Path
) -> None:
    _, _, art = servers
    other = next(i for i in floor_server.IMPLS if i != floor_server.FLOOR_IMPL)
    port = free_port()
    cmd = floor_server.cmd(other, port, (-1, 8))
    with harness.start(f"floor-{other}", cmd, port, tmp_path / "f.log", env={"PYTHONPATH": str(harness.ROOT)}) as f:
        server_bench.check_floor(f, art)


def test_stalled_connections_are_held_and_reopened(servers: tuple[harness.Server, harness.Server, Path]) -> None:
    dl, _, _ = servers
    with server_bench.stalled_connections(dl, 20, Path(dl.log_path).parent) as seen:
        # The server answers a stalled request's header timeout (1 s here) by closing it; the helper reopens.
        time.sleep(2.5)
        pid, deadline = _helper_pid(dl.port), time.monotonic() + 10
        # Polled: just after a close the helper may hold 19 for a moment, until its next pass reopens one.
        while server_bench._established(dl.port, pid) != 20:
            assert time.monotonic() < deadline, "the helper did not get back to 20 stalled connections in 10 s"
            time.sleep(0.02)
    assert seen["held"] == 20 and seen["closed_by_server"] >= 20 and seen["opened"] >= 40, seen


def _helper_pid(port: int) -> int:
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tests.bench.hostile_load" in cmd and str(port) in cmd:
            return int(p.pid)
    raise AssertionError("no stalled-connection helper running")


def test_probes_tell_a_hardened_server_from_a_bare_one(
    floor: harness.Server, servers: tuple[harness.Server, harness.Server, Path]
) -> None:
    dl, _, _ = servers
    only = ("repeated headers", "HTTP/2.0 request line", "absolute-form target")
    ours = {p.name: p for p in hostile_load.probe_all("127.0.0.1", dl.port, lambda: [dl.proc.pid], "/", only)}
    bare = {p.name: p for p in hostile_load.probe_all("127.0.0.1", floor.port, lambda: [floor.proc.pid], "/", only)}
    assert list(ours) == list(bare) and len(ours) == 3
    assert ours["HTTP/2.0 request line"].passed, ours
    assert ours["absolute-form target"].passed, ours
    # The floor has no header limits and answers anything httptools parses: the probes must see that.
    assert not bare["5,000 repeated header lines"].passed, bare
    assert bare["5,000 repeated header lines"].detail == "status 200"
    with pytest.raises(ValueError, match="unknown probes"):
        hostile_load.probe_all("127.0.0.1", floor.port, lambda: [], "/", ("nope",))


def test_observer_targets_need_their_points_and_no_drops() -> None:
    def pt(server: str, rps: float, p99: float = 5.0) -> server_bench.Point:
        return server_bench.Point(server, "mnist-mlp", "json", 32, rps, 1.0, 2.0, p99, int(rps), 0)

    off, again, log1, log100 = server_bench.OBSERVER_SERVERS
    assert server_bench.observed_drift(log1) == server_bench.observed_drift(log100) == "drift 0.1 (cap 20 rows/s)"
    names = [f"MLP, JSON, c=32, prediction log {r} + drift 0.1 (cap 20 rows/s) vs off" for r in ("1 %", "100 %")]
    queue = "prediction log 100 %: no request waits on the queue"
    # The means say 0.945x and 0.796x (against the mean of the two off servers, 1,005 req/s), but the
    # targets are the medians of the paired rounds pooled over the blocks: 0.98x and 0.84x.
    points = [pt(off, 1000), pt(again, 1010), pt(log1, 950), pt(log100, 800, 7.0)]
    paired = {again: [[1.01, 0.99], [1.0]], log1: [[0.98, 0.70], [0.99]], log100: [[0.84, 0.83], [0.9]]}
    counts = {"answered": 840.0, "log_written": 840.0, "log_dropped": 0.0, "drift_bin_counts": 1344.0}
    by_name = {t.name: t for t in server_bench.targets(points, {}, {}, 32, 200, {log100: counts}, paired)}
    assert by_name[names[0]].passed  # median 0.98 >= 0.97
    assert by_name[names[0]].measured == (
        # Resampled blocks: the first twice (median 0.84) a quarter of the time, the second twice (0.99) a
        # quarter, one of each (0.98) half: the 90 % interval spans 0.84-0.99.
        "0.980x (median of 3 paired rounds in 2 blocks, 90% CI 0.840-0.990; means 950 vs 1,005 req/s off = 0.945x; "
        "p99 5.0 vs 5.0 ms); "
        "noise control, identical servers: 1.000x"
    )
    assert not by_name[names[1]].passed  # median 0.84 < 0.85
    assert (
        by_name[queue].passed
        and by_name[queue].measured == "840 written of 840 answered, 0 dropped; p99 7.0 vs 5.0 ms off"
    )
    dropped = {**counts, "log_written": 830.0, "log_dropped": 10.0}
    assert not server_bench.targets(points, {}, {}, 32, 200, {log100: dropped}, paired)[-1].passed
    unpaired = {t.name: t for t in server_bench.targets(points, {}, {}, 32, 200, {log100: counts})}
    missing = {t.name: t for t in server_bench.targets(points[:1], {}, {}, 32, 200, None, paired)}
    for n in names:
        assert unpaired[n].measured == missing[n].measured == "not measured"
        assert not unpaired[n].passed and not missing[n].passed
    assert not missing[queue].passed


def test_observer_servers_are_paired_with_the_mean_of_the_two_off_servers() -> None:
    off, again, log1, log100 = server_bench.OBSERVER_SERVERS
    rps = {off: [100.0, 200.0], again: [110.0, 190.0], log1: [105.0, 0.0], log100: [84.0, 156.0]}
    got = server_bench.paired_ratios(rps)
    assert set(got) == {again, log1, log100}  # "off" is only ever a reference
    assert got[again] == pytest.approx([1.1, 0.95])  # the noise control: one identical server over the other
    assert got[log1] == pytest.approx([1.0, 0.0])
    assert got[log100] == pytest.approx([0.8, 0.8])
    assert server_bench.paired_ratios({off: [0.0], again: [0.0], log1: [5.0]})[log1] == [0.0]  # no req/s, no ratio


def test_observer_rounds_are_balanced() -> None:
    """Every server is measured in every position equally often over a full cycle, and never always right
    after the same one: a slow background drift cannot favour one of them."""
    labels = ["a", "b", "c", "d"]
    orders = server_bench.balanced_orders(labels, 8)
    assert all(sorted(o) == labels for o in orders)
    for label in labels:
        assert sorted(o.index(label) for o in orders) == [0, 0, 1, 1, 2, 2, 3, 3]
    for label in labels:  # after each of the others exactly twice, and first twice
        before = sorted(o[o.index(label) - 1] if o.index(label) else "-" for o in orders)
        assert before == sorted(["-", "-", *[x for x in labels if x != label] * 2])
    assert server_bench.median([3.0, 1.0, 2.0]) == 2.0 and server_bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_observer_server_logs_every_answer_and_bins_the_sampled_ones(tmp_path: Path) -> None:
    """The bench's reference artifact (built by the registry's code) served with the log at 100 % and drift
    on every request: the counters the bench reports agree with the requests wrk made and the lines written."""
    art = server_bench.with_drift_reference(
        make_torch_mlp_artifact(tmp_path / "mlp", name="mlp", sizes=(8, 16, 3)), tmp_path / "mlp-ref"
    )
    port = free_port()
    env = {"PYTHONPATH": str(harness.ROOT), "DLSTACK_PREDICTION_LOG_SAMPLE": "1", "DLSTACK_DRIFT_SAMPLE": "1"}
    env["DLSTACK_DRIFT_MAX_ROWS_PER_S"] = "0"  # every answer binned, so the counts can be compared
    with harness.start("observed", harness.dlstack_cmd(art, port, 1), port, tmp_path / "o.log", env) as srv:
        body, headers = harness.json_body("input", np.random.default_rng(0).random((1, 8), dtype=np.float32))
        res, raw = wrk.run(srv.infer_url("mlp"), body, headers, connections=4, duration_s=1)
        assert res.requests > 0 and res.errors == 0, raw
        counts = server_bench.observer_counts(srv)
        assert counts["answered"] >= res.requests and counts["log_dropped"] == 0, counts
        assert counts["log_written"] == counts["answered"], counts
        # 8 input features in 8 groups, 3 outputs in 3 groups: 11 bin counts per binned row
        deadline = time.monotonic() + 30
        while (binned := server_bench.metric_sum(srv, "dlstack_drift_bin_total")) < 11 * counts["answered"]:
            assert time.monotonic() < deadline, (binned, counts)
            time.sleep(0.2)
        assert binned == 11 * counts["answered"]
    lines = [ln for ln in srv.log_path.read_text().splitlines() if '"dlstack.predictions"' in ln]
    assert len(lines) == counts["log_written"]


def test_the_bench_removes_the_temp_dir_it_made_and_keeps_a_given_one(tmp_path: Path) -> None:
    with server_bench.bench_workdir(None) as made:
        (made / "server.log").write_text("x" * 1000)
        assert made.is_dir() and made.name.startswith("dlstack-bench-")
    assert not made.exists()
    given = tmp_path / "bench"
    with server_bench.bench_workdir(given) as kept:
        (kept / "server.log").write_text("x")
    assert kept == given and (given / "server.log").read_text() == "x"
