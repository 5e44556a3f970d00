"""Drift end to end: register with --reference-data, serve the export, feed it, and let a REAL Prometheus score it.

Two real servers (``dlstack serve``, 1 gunicorn worker each, ``DLSTACK_DRIFT_SAMPLE=1`` under a row cap of
``CAP`` per second, below what the feed sends) serve the same
TorchScript MLP, registered twice with the same reference data (1,000 rows of N(0, 1)): "shifted" is
fed N(2, 1) inputs, "steady" more N(0, 1). Prometheus (loopback, 1 s scrape and evaluation) loads the
drift rules of infra.alerts with a 30 s window instead of 1 h, so the score settles in seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from infra.alerts import ALERT_DRIFT, DRIFT_PSI, ModelSLO, drift_record, rule_file_yaml
from services.registry import Registry
from stacks.cli import main
from tests.conftest import make_torch_mlp_artifact
from tests.prometheus import running_prometheus, wait_for
from tests.serving import ServerHandle, start_server

NS = "ml"
MODELS = ("shifted", "steady")
ROWS = 20  # rows per request
CAP = 40  # DLSTACK_DRIFT_MAX_ROWS_PER_S: below what the feed sends, so the cap decides the rows binned
SLOS = {
    m: ModelSLO(name=m, namespace=NS, error_ratio=0.5, p99_ms=10_000, drift=True, drift_window="30s", drift_for="3s")
    for m in MODELS
}
PSI = drift_record(DRIFT_PSI, SLOS["shifted"])

pytestmark = [pytest.mark.tool("prometheus"), pytest.mark.xdist_group("prometheus_e2e"), pytest.mark.timeout(180)]


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict[str, float]:
        """model label -> value of each result series."""
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body.get("status") == "success", body
        return {s["metric"].get("model", ""): float(s["value"][1]) for s in body["data"]["result"]}

    def alerts(self) -> dict[str, str]:
        """model -> state of DlstackModelDrift."""
        body = requests.get(f"{self.url}/api/v1/alerts", timeout=5).json()
        return {
            a["labels"]["model"]: a["state"] for a in body["data"]["alerts"] if a["labels"]["alertname"] == ALERT_DRIFT
        }


@contextlib.contextmanager
def _prometheus(tmp: Path, servers: dict[str, ServerHandle]) -> Iterator[Prom]:
    (tmp / "rules.yaml").write_text(rule_file_yaml(list(SLOS.values()), interval="1s"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": m,
                "static_configs": [{"targets": [f"127.0.0.1:{s.port}"], "labels": {"namespace": NS, "pod": f"{m}-0"}}],
            }
            for m, s in servers.items()
        ],
    }
    with running_prometheus(tmp, config) as url:
        yield Prom(url)


def _feed(servers: dict[str, ServerHandle], stop: threading.Event, sent: dict[str, int]) -> None:
    """One request of ROWS rows to each server every ~50 ms until ``stop``."""
    rng = np.random.default_rng(1)
    with requests.Session() as http:
        while not stop.is_set():
            for m, s in servers.items():
                x = rng.normal(loc=2.0 if m == "shifted" else 0.0, size=(ROWS, 8)).astype(np.float32)
                body = {
                    "inputs": [{"name": "input", "shape": [ROWS, 8], "datatype": "FP32", "data": x.ravel().tolist()}]
                }
                r = http.post(f"{s.url}/v2/models/{m}/infer", json=body, timeout=30)
                assert r.status_code == 200, r.text
                sent[m] += 1
            stop.wait(0.05)


def test_shifted_inputs_raise_the_drift_score_and_the_alert(tmp_path: Path) -> None:
    artifact = make_torch_mlp_artifact(tmp_path / "artifact", name="mlp")
    data = tmp_path / "reference.npz"
    np.savez(data, input=np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32))
    registry = tmp_path / "registry"
    exports = {}
    for m in MODELS:
        args = ["models", "register", str(artifact), "--registry", str(registry), "--name", m, "--framework", "pytorch"]
        assert main([*args, "--reference-data", str(data)]) == 0
        exports[m] = Registry(str(registry)).resolve(f"{m}:1").export(tmp_path / f"export-{m}")  # the image's /model

    env = {"DLSTACK_DRIFT_SAMPLE": "1", "DLSTACK_DRIFT_MAX_ROWS_PER_S": str(CAP)}
    with (
        start_server(exports["shifted"], workers=1, env=env) as shifted,
        start_server(exports["steady"], workers=1, env=env) as steady,
    ):
        servers = {"shifted": shifted, "steady": steady}
        metrics = requests.get(f"{shifted.url}/metrics", timeout=10).text.splitlines()
        # (8 input groups + 3 output groups) x 10 bins, each a reference share and a counter at 0
        for name in ("dlstack_drift_reference_ratio{", "dlstack_drift_bin_total{"):
            assert len([line for line in metrics if line.startswith(name)]) == 110, name
        with _prometheus(tmp_path, servers) as prom:
            # Counters start at 0 in the first scrape, so the whole feed shows up as an increase.
            wait_for(lambda: prom.query("count(up == 1)").get("") == 2, 30, "first scrape of both servers")
            stop, sent = threading.Event(), dict.fromkeys(MODELS, 0)
            feeder = threading.Thread(target=_feed, args=(servers, stop, sent), daemon=True)
            t0 = time.monotonic()
            feeder.start()
            try:
                scores = wait_for(
                    lambda: (s := prom.query(PSI)).keys() == set(MODELS) and s["shifted"] > 0.5 and s,
                    60,
                    f"{PSI} for both models",
                )
                state = wait_for(lambda: prom.alerts().get("shifted") == "firing" and prom.alerts(), 30, "drift alert")
                scores = prom.query(PSI)
                rows = prom.query(drift_record("model:dlstack_drift_rows:{window}", SLOS["steady"]))
            finally:
                stop.set()
                feeder.join(30)
                fed_s = time.monotonic() - t0
                fed = sent["steady"] * ROWS / fed_s
    print(f"requests sent {sent} ({fed:.0f} rows/s); PSI {scores}; sampled rows in the window {rows}")  # with -s
    assert sent["shifted"] > 0 and sent["steady"] > 0
    # Same distribution: within sampling noise of 0 (about 9 / rows per group); shifted by 2 sigma: far above 0.2.
    assert scores["steady"] < 0.1, scores
    assert scores["shifted"] > 1.0, scores
    assert rows["steady"] >= 500, rows
    # The cap binned CAP rows a second over the feed (or the 30 s window), the bucket's first second and
    # increase()'s extrapolation aside: far less than was fed.
    assert fed > 2 * CAP, f"the feed sent only {fed:.0f} rows/s; the cap of {CAP} was never reached"
    assert rows["steady"] <= CAP * (min(fed_s, 30) + 1) * 1.25, (rows, fed_s)
    assert "steady" not in state, state
