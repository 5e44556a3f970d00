"""``dlstack capacity`` measured for real: a real server, real wrk load, a real PNG, a real stack file rewrite."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.errors import UserError
from stacks.capacity import MI, Measurement, Recommendation, Step, cpu_quantity, measure, recommend, write_config
from stacks.config import load_stack_config
from tests.conftest import ROOT, make_torch_mlp_artifact

TARGET_RPS, P99_MS = 300.0, 500.0

pytestmark = pytest.mark.xdist_group("capacity")


def _cli(*args: str | Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stacks.cli", "capacity", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real measurement through the CLI, writing a plot, a JSON report and a copy of Pulumi.dev.yaml."""
    tmp = tmp_path_factory.mktemp("capacity")
    artifact = make_torch_mlp_artifact(tmp / "artifact", name="cap-mlp")
    stack = tmp / "Pulumi.dev.yaml"
    shutil.copy(ROOT / "Pulumi.dev.yaml", stack)
    res = _cli(
        artifact,
        "--target-rps", TARGET_RPS, "--p99-ms", P99_MS, "--cpu", "1", "--duration-s", "8",
        "--plot", tmp / "capacity.png", "--report", tmp / "report.json",
        "--write-config", "dev", "--config-file", stack, "--model", "mnist-mlp",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return {"tmp": tmp, "stdout": res.stdout, "report": json.loads((tmp / "report.json").read_text()), "stack": stack}


def _measurement_is_real_and_consistent(run: dict[str, Any]) -> None:
    m = run["report"]["measurement"]
    steps = m["steps"]
    assert m["loadgen"] == ("wrk" if Path("/usr/bin/wrk").exists() else "python")
    assert [s["concurrency"] for s in steps] == [2**i for i in range(len(steps))]  # 1, 2, 4, ...
    assert all(s["requests"] > 0 and s["rps"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"] for s in steps)
    assert all(math.isclose(s["rps"], s["requests"] / s["duration_s"], rel_tol=1e-6) for s in steps)
    assert sum(s["duration_s"] for s in steps) <= 8 + 1  # the load budget holds
    ok = [s for s in steps if s["errors"] == 0 and s["p99_ms"] <= P99_MS]
    assert ok and m["max_rps"] == max(s["rps"] for s in ok)
    best = max(ok, key=lambda s: s["rps"])
    assert math.isclose(m["per_replica_rps"], m["max_rps"] * min(1.0, 1.0 / best["cpu_cores"]), rel_tol=1e-9)
    assert best["cpu_cores"] > 0.05  # the server really worked (psutil saw its CPU time)
    assert m["peak_pss_bytes"] > 50 * MI  # python + torch + a model: tens of MiB at least


def _recommendation_follows_the_measurement(run: dict[str, Any]) -> None:
    m, rec = run["report"]["measurement"], run["report"]["recommendation"]
    assert rec["headroom"] == 0.3
    assert rec["replicas_min"] == math.ceil(TARGET_RPS * 1.3 / m["per_replica_rps"])
    assert rec["replicas_max"] == 2 * rec["replicas_min"]
    assert 20 <= rec["target_cpu_percent"] <= 90
    assert rec["cpu"] == "1"
    mem_mi = int(rec["memory"].removesuffix("Mi"))
    assert mem_mi % 16 == 0 and mem_mi * MI >= m["peak_pss_bytes"] * 1.25 > (mem_mi - 16) * MI
    out = run["stdout"]
    assert f"replicas: min {rec['replicas_min']}, max {rec['replicas_max']}" in out
    assert f"max sustainable: {m['max_rps']:.1f} req/s" in out


def _plot_is_a_readable_png(run: dict[str, Any]) -> None:
    import matplotlib.image

    png = run["tmp"] / "capacity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(png).shape[:2]
    assert w >= 600 and h >= 400


def _write_config_updates_the_entry_and_keeps_comments(run: dict[str, Any]) -> None:
    rec = run["report"]["recommendation"]
    before = (ROOT / "Pulumi.dev.yaml").read_text().splitlines()
    after = run["stack"].read_text().splitlines()
    assert [x for x in before if "#" in x] == [x for x in after if "#" in x]  # every comment kept, in place
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) <= 2 and all(b.lstrip().startswith(("replicas:", "resources:")) for _, b in changed)
    cfg = load_stack_config("dev", run["stack"])
    entry = cfg.model("mnist-mlp")
    assert (entry.replicas.min, entry.replicas.max) == (rec["replicas_min"], rec["replicas_max"])
    assert entry.replicas.target_cpu_percent == rec["target_cpu_percent"]
    assert (entry.resources.cpu, entry.resources.memory) == (rec["cpu"], rec["memory"])
    original = load_stack_config("dev", ROOT / "Pulumi.dev.yaml")
    others = [m.name for m in original.models if m.name != "mnist-mlp"]
    assert others and all(cfg.model(n) == original.model(n) for n in others)


def test_capacity_cli_end_to_end(run: dict[str, Any], subtests: Any) -> None:
    """One test over one real measurement (xdist could split separate tests across workers); each check
    is a subtest, reported on its own."""
    for check in (
        _measurement_is_real_and_consistent,
        _recommendation_follows_the_measurement,
        _plot_is_a_readable_png,
        _write_config_updates_the_entry_and_keeps_comments,
    ):
        with subtests.test(msg=check.__name__.strip("_")):
            check(run)


def _rec(**kw: Any) -> Recommendation:
    base: dict[str, Any] = {
        "target_rps": 100.0, "headroom": 0.3, "per_replica_rps": 50.0, "replicas_min": 3, "replicas_max": 6,
        "target_cpu_percent": 76, "cpu": "1", "memory": "320Mi",
    }  # fmt: skip
    return Recommendation(**{**base, **kw})


def test_write_config_refuses_an_unknown_model_and_leaves_the_file(tmp_path: Path) -> None:
    stack = tmp_path / "Pulumi.dev.yaml"
    shutil.copy(ROOT / "Pulumi.dev.yaml", stack)
    text = stack.read_text()
    with pytest.raises(UserError, match=r"model 'nope' is not in dlstack:models \(it has: mnist-mlp"):
        write_config("dev", "nope", _rec(), stack)
    assert stack.read_text() == text


def test_write_config_never_lands_an_invalid_file(tmp_path: Path) -> None:
    stack = tmp_path / "Pulumi.dev.yaml"
    shutil.copy(ROOT / "Pulumi.dev.yaml", stack)
    text = stack.read_text()
    with pytest.raises(UserError, match="not changed, the new sizing does not validate"):
        write_config("dev", "mnist-mlp", _rec(cpu="2 cores"), stack)
    assert stack.read_text() == text
    assert not [p for p in tmp_path.iterdir() if p.name != stack.name]  # no temp file left behind


def _measurement(steps: list[Step], cpu: float = 1.0, pss: int = 300 * MI) -> Measurement:
    return Measurement("m", "1", cpu, 100.0, "wrk", tuple(steps), pss, "test")


def test_recommend_arithmetic() -> None:
    steps = [Step(1, 100, 0, 1.0, 100.0, 5, 10, 0.5), Step(2, 180, 0, 1.0, 180.0, 8, 40, 1.0)]
    steps.append(Step(4, 200, 0, 1.0, 200.0, 20, 150, 1.0))  # over the 100 ms objective: not counted
    m = _measurement(steps)
    assert m.max_rps == 180.0 and m.per_replica_rps == 180.0
    rec = recommend(m, target_rps=1000)
    assert rec.replicas_min == math.ceil(1000 * 1.3 / 180) == 8 and rec.replicas_max == 16
    assert rec.target_cpu_percent == math.floor(100 / 1.3) == 76
    assert rec.memory == "384Mi"  # 300 Mi * 1.25 = 375 Mi, rounded up to 16 Mi
    # Used 2 cores while sized for 1: capacity per replica halves, replicas double.
    m2 = _measurement([Step(1, 180, 0, 1.0, 180.0, 5, 10, 2.0)])
    assert m2.per_replica_rps == 90.0 and recommend(m2, 1000).replicas_min == math.ceil(1300 / 90)
    assert cpu_quantity(0.5) == "500m" and cpu_quantity(2.0) == "2"


def test_recommend_refuses_when_nothing_meets_the_objective() -> None:
    m = _measurement([Step(1, 10, 0, 1.0, 10.0, 150, 300, 1.0)])
    with pytest.raises(UserError, match=r"even at concurrency 1 p99 is 300\.0 ms"):
        recommend(m, 100)
    with pytest.raises(UserError, match="--target-rps must be > 0"):
        recommend(_measurement([Step(1, 10, 0, 1.0, 10.0, 5, 10, 1.0)]), 0)


def test_python_load_generator_fallback(tmp_path: Path) -> None:
    artifact = make_torch_mlp_artifact(tmp_path / "artifact", name="cap-py")
    m = measure(artifact, p99_ms=P99_MS, cpu=1, duration_s=3, loadgen="python")
    assert m.loadgen == "python" and m.steps and m.steps[0].requests > 0
    assert all(s.rps == s.requests / s.duration_s for s in m.steps)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-rps", "10", "--p99-ms", "0"], "--p99-ms must be > 0"),
        (["--target-rps", "-1", "--p99-ms", "100"], "--target-rps must be > 0"),
        (["--target-rps", "10", "--p99-ms", "100", "--cpu", "0"], "--cpu must be > 0"),
    ],
)
def test_cli_bad_input_is_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    res = _cli(tmp_path, *args, timeout=60)  # flags are checked before the artifact is read
    assert res.returncode == 2
    assert f"dlstack capacity: error: {message}" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_missing_artifact(tmp_path: Path) -> None:
    res = _cli(tmp_path / "nope", "--target-rps", "10", "--p99-ms", "100", timeout=60)
    assert res.returncode == 2 and "not a directory" in res.stderr
