"""The promotion SLO gate against a REAL Prometheus scraping a REAL model server (gunicorn).

The model is a TorchScript MLP that raises for inputs above 100, so the test can make real
5xx answers; Prometheus scrapes every second. One set of traffic serves every assertion.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from services.registry import Registry
from stacks.cli import main
from stacks.promote import history, slo_gate
from tests.conftest import write_torchscript_artifact
from tests.prometheus import running_prometheus, wait_for
from tests.serving import start_server

pytestmark = [
    pytest.mark.xdist_group("slo-gate"),
    pytest.mark.tool("prometheus"),
]
GOOD = {"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}]}
BAD = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1000.0] * 8}]}  # model raises


def failing_mlp_artifact(out: Path) -> Path:
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x > 100).any()):
                raise RuntimeError("input out of range")
            return self.fc(x)

    torch.manual_seed(0)
    return write_torchscript_artifact(out, Mlp().eval(), name="mnist-mlp")


@contextlib.contextmanager
def run_prometheus(tmp: Path, target: str) -> Iterator[str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "dlstack", "static_configs": [{"targets": [target]}]}],
    }
    with running_prometheus(tmp, config) as url:
        # Ready is not enough: the scrape manager applies targets after a few seconds.
        def scraped() -> bool:
            targets = requests.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        wait_for(scraped, 30, "prometheus scraped the server", interval=0.1)
        yield url


def query(url: str, q: str) -> float:
    result = requests.get(f"{url}/api/v1/query", params={"query": q}, timeout=10).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(prometheus url, registry root) after 5 s of traffic: 3 good requests for every bad one."""
    tmp = tmp_path_factory.mktemp("slo")
    reg = Registry(tmp / "registry")
    mv = reg.register(failing_mlp_artifact(tmp / "artifact"), "mnist-mlp", "pytorch").version
    with start_server(mv.path, workers=1) as srv, run_prometheus(tmp, f"127.0.0.1:{srv.port}") as prom:
        infer = f"{srv.url}/v2/models/mnist-mlp/infer"
        stop = time.monotonic() + 5
        codes: list[int] = []

        def traffic() -> None:
            i = 0
            while time.monotonic() < stop:
                codes.append(requests.post(infer, json=BAD if i % 4 == 3 else GOOD, timeout=10).status_code)
                i += 1
                time.sleep(0.02)

        t = threading.Thread(target=traffic)
        t.start()
        t.join(60)
        assert {200, 500} <= set(codes), codes
        sel = 'dlstack_requests_total{model="mnist-mlp",version="1",route="infer"'
        deadline = time.monotonic() + 30
        # Wait until Prometheus has scraped the final counts (one more scrape after the traffic stopped).
        while query(prom, f"sum(max_over_time({sel}}}[1m]))") < len(codes):
            assert time.monotonic() < deadline, "Prometheus never saw the traffic"
            time.sleep(0.5)
        assert query(prom, f'sum(increase({sel},code="500"}}[1m]))') > 0
        yield prom, reg.root


STACK = """\
config:
  dlstack:environment: {env}
  dlstack:kubernetes: {{context: kind-dlstack}}
  dlstack:images: {{registry: localhost:5001/dlstack}}
  dlstack:ingress: {{domain: dlstack.localtest.me, replicas: 2}}
  dlstack:logging: {{elasticsearch: {{nodes: 3}}}}
  dlstack:models:
    - name: mnist-mlp
      model: mnist-mlp:{version}
      framework: pytorch
      replicas: {{min: 2, max: 2}}
      slo: {{error_ratio: {ratio}, p99_ms: 10000}}
"""


def test_gate_against_real_prometheus(
    scraped: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One test on purpose: the scraped server costs ~15 s, and xdist may split a module's tests."""
    prom, registry = scraped
    ok = slo_gate(prom, "mnist-mlp", "1", slo_error_ratio=0.5, slo_p99_ms=10_000, window="1m")
    assert ok.passed, ok.reason
    assert ok.requests > 0
    assert ok.error_ratio is not None and 0.1 < ok.error_ratio < 0.4  # one bad request in four
    assert ok.p99_ms is not None and 0 < ok.p99_ms < 10_000

    errors = slo_gate(prom, "mnist-mlp", "1", slo_error_ratio=0.01, slo_p99_ms=10_000, window="1m")
    assert not errors.passed
    assert errors.reason.startswith("error ratio 0.") and errors.reason.endswith(" > SLO 0.01")

    slow = slo_gate(prom, "mnist-mlp", "1", slo_error_ratio=0.5, slo_p99_ms=0.01, window="1m")
    assert not slow.passed
    assert slow.reason.startswith("p99 ") and slow.reason.endswith(" ms > SLO 0.01 ms")

    none = slo_gate(prom, "mnist-mlp", "2", slo_error_ratio=0.5, slo_p99_ms=10_000, window="1m")
    assert not none.passed
    assert none.reason == "no inference traffic for mnist-mlp:2 in the last 1m: nothing proves the SLO"

    check_promote_require_slo(prom, registry, tmp_path, capsys)


def check_promote_require_slo(prom: str, registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for ratio, passes in ((0.01, False), (0.5, True)):
        d = tmp_path / str(ratio)
        d.mkdir()
        (d / "Pulumi.dev.yaml").write_text(STACK.format(env="dev", version=1, ratio=0.5))
        prod = STACK.format(env="prod", version=1, ratio=ratio).replace("mnist-mlp:1", "mnist-mlp:0")
        (d / "Pulumi.prod.yaml").write_text(prod)
        args = ["promote", "--registry", str(registry), "--stack-dir", str(d), "--force", "--no-render"]
        code = main([*args, "--require-slo", "--prometheus", prom, "--window", "1m"])
        out, err = capsys.readouterr()
        if passes:
            assert code == 0, err
            assert "SLO gate mnist-mlp:1 over 1m: PASS: error ratio 0." in out
            assert (d / "Pulumi.prod.yaml").read_text() == prod.replace("mnist-mlp:0", "mnist-mlp:1")
            (record,) = history(d / "stacks" / "promotions.yaml")
            assert record["gate"]["passed"] is True and record["gate"]["slo_error_ratio"] == 0.5
        else:
            assert code == 2
            assert err.startswith("dlstack promote: error: SLO gate failed, nothing was written: mnist-mlp:1: error ")
            assert (d / "Pulumi.prod.yaml").read_text() == prod
            assert not (d / "stacks" / "promotions.yaml").exists()
