"""Smoke test of the server benchmark's harness: real servers, a real 1-second wrk run, the real parser."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.bench import harness, server_bench, wrk
from tests.conftest import free_port, make_torch_mlp_artifact

pytestmark = [
    pytest.mark.xdist_group("bench-smoke"),
    pytest.mark.tool("wrk"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[harness.Server, harness.Server, Path]]:
    tmp = tmp_path_factory.mktemp("bench")
    art = make_torch_mlp_artifact(tmp / "mlp", name="mlp", sizes=(8, 16, 3))
    env = {"PYTHONPATH": str(harness.ROOT), "NAIVE_MODEL_DIR": str(art)}
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
    by_name = {t.name: t for t in server_bench.targets(good, mem, cold, 32, 8)}
    assert by_name["MLP, JSON, c=32"].passed and by_name["MLP, binary tensors, c=32 (vs naive JSON)"].passed
    assert not by_name["CNN, JSON, c=32"].passed and by_name["CNN, JSON, c=32"].measured == "not measured"
    assert by_name["memory (PSS, 2 workers, MLP)"].passed and by_name["cold start MLP"].passed
    slow_tail = [pt("naive", 1000, 10), pt("dlstack", 2000, 11)]
    assert not server_bench.targets(slow_tail, mem, cold, 32, 8)[0].passed  # p99 worse than naive
    errs = [pt("naive", 1000, 10), pt("dlstack", 2000, 9, errors=3)]
    assert not server_bench.targets(errs, mem, cold, 32, 8)[0].passed
