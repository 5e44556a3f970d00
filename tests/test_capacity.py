"""``dlstack capacity`` measured for real: a real server, real wrk load, a real PNG, a real stack file rewrite."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.registry import Registry
from services.serving.artifact import FileEntry, ModelSpec, Signature, TensorSpec, file_sha256, write_spec
from services.serving.errors import UserError
from stacks.capacity import (
    MI,
    STEP_GRACE_S,
    Measurement,
    Recommendation,
    Step,
    check_runs,
    concurrency_levels,
    cpu_quantity,
    figure,
    measure,
    python_load,
    ramp,
    recommend,
    resolve_artifact,
    write_config,
)
from stacks.cli import main
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


def _stack_copy(dest: Path, ref: str) -> Path:
    """A copy of the project's Pulumi.dev.yaml whose mnist-mlp entry runs ``ref``."""
    text = (ROOT / "Pulumi.dev.yaml").read_text()
    pin = re.search(r"model: mnist-mlp\S*", text)
    assert pin, "Pulumi.dev.yaml has no mnist-mlp entry"
    dest.write_text(text.replace(pin.group(0), f"model: {ref}", 1))
    return dest


def _rps_autoscaled(path: Path) -> Path:
    """``path`` with ``autoscaling: {metric: rps}`` (no target: it waits for a measurement) on mnist-mlp."""
    text = path.read_text()
    slo = re.search(r"\n( +)slo: [^\n]*\n", text)
    assert slo, "no slo line in the stack copy"
    at = slo.end()
    path.write_text(text[:at] + f"{slo.group(1)}autoscaling: {{metric: rps}}\n" + text[at:])
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real measurement through the CLI, writing a plot, a JSON report and a copy of Pulumi.dev.yaml
    whose mnist-mlp entry runs exactly the measured artifact (mnist-mlp:1 in a fresh registry) and asks
    for autoscaling on rps without a target: the measurement gives it one."""
    tmp = tmp_path_factory.mktemp("capacity")
    artifact = make_torch_mlp_artifact(tmp / "artifact", name="mnist-mlp")
    registry = Registry(tmp / "registry")
    assert registry.register(artifact, "mnist-mlp", "pytorch").version.version == "1"
    stack = _rps_autoscaled(_stack_copy(tmp / "Pulumi.dev.yaml", "mnist-mlp:1"))
    with pytest.raises(UserError, match=r"dlstack:models\[0\]\.autoscaling\.target: is required: no measured"):
        load_stack_config("dev", stack)
    res = _cli(
        artifact,
        "--target-rps", TARGET_RPS, "--p99-ms", P99_MS, "--cpu", "1", "--duration-s", "8",
        "--plot", tmp / "capacity.png", "--report", tmp / "report.json",
        "--write-config", "dev", "--config-file", stack, "--registry", registry.root,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp / "report.json").read_text())
    return {"tmp": tmp, "stdout": res.stdout, "report": report, "stack": stack}


def _measurement_is_real_and_consistent(run: dict[str, Any]) -> None:
    m = run["report"]["measurement"]
    steps = m["steps"]
    assert m["loadgen"] == ("wrk" if Path("/usr/bin/wrk").exists() else "python")
    assert [s["concurrency"] for s in steps] == [2**i for i in range(len(steps))]  # 1, 2, 4, ...
    assert all(s["requests"] > 0 and s["rps"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"] for s in steps)
    assert all(math.isclose(s["rps"], s["requests"] / s["duration_s"], rel_tol=1e-6) for s in steps)
    assert m["budget_s"] == 8
    # The budget stops the ramp, or something else did first; either way the output says which.
    assert m["budget_spent"] == m["stop_reason"].startswith("the 8 s load budget was spent before concurrency ")
    assert len(steps) < len(concurrency_levels()) or not m["budget_spent"]
    assert f"stopped: {m['stop_reason']}" in run["stdout"]
    assert ("the ramp stopped on its 8 s budget" in run["stdout"]) == m["budget_spent"]
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
    before = _rps_autoscaled(_stack_copy(run["tmp"] / "before.yaml", "mnist-mlp:1")).read_text().splitlines()
    after = run["stack"].read_text().splitlines()
    assert [x for x in before if "#" in x] == [x for x in after if "#" in x]  # every comment kept, in place
    added = [x for x in after if x.lstrip().startswith("capacity:")]
    assert len(added) == 1 and len(after) == len(before) + 1  # one new line: the measured capacity
    changed = [(a, b) for a, b in zip(before, [x for x in after if x not in added], strict=True) if a != b]
    assert len(changed) <= 2 and all(b.lstrip().startswith(("replicas:", "resources:")) for _, b in changed)
    cfg = load_stack_config("dev", run["stack"])
    entry = cfg.model("mnist-mlp")
    assert (entry.replicas.min, entry.replicas.max) == (rec["replicas_min"], rec["replicas_max"])
    assert entry.replicas.target_cpu_percent == rec["target_cpu_percent"]
    assert (entry.resources.cpu, entry.resources.memory) == (rec["cpu"], rec["memory"])
    # The measured per-replica req/s (4 significant digits), the headroom and the UTC day of the run.
    assert entry.capacity is not None
    assert math.isclose(entry.capacity.per_replica_rps, rec["per_replica_rps"], rel_tol=1e-3)
    assert entry.capacity.headroom == rec["headroom"] == 0.3
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", entry.capacity.measured)
    # ... which is now the default target of autoscaling on rps: capacity less the headroom.
    assert entry.load_target == round(entry.capacity.per_replica_rps / 1.3, 3)
    assert "the default target of autoscaling on rps" in run["stdout"]
    original = load_stack_config("dev", run["tmp"] / "before.yaml", unmeasured_ok=True)
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


def test_write_config_records_the_capacity_in_the_entry_byte_for_byte(tmp_path: Path) -> None:
    stack = _rps_autoscaled(_stack_copy(tmp_path / "Pulumi.dev.yaml", "mnist-mlp:1"))
    before = stack.read_bytes()
    write_config("dev", "mnist-mlp", _rec(per_replica_rps=123.456789), stack, measured="2026-11-28")
    after = stack.read_bytes()
    # Replicas and resources as before; capacity is one new flow line at the end of the entry.
    line = b"      capacity: {per_replica_rps: 123.5, headroom: 0.3, measured: '2026-11-28'}\n"
    assert after.count(line) == 1
    entry_end = after.index(line)
    assert after[entry_end + len(line) :].startswith(b"    - name: tiny-cnn")
    assert after.replace(line, b"").count(b"\n") == before.count(b"\n")
    cfg = load_stack_config("dev", stack)
    assert cfg.model("mnist-mlp").load_target == round(123.5 / 1.3, 3)
    assert cfg.model("tiny-cnn").capacity is None
    # A new measurement replaces the values in place; nothing else moves.
    write_config("dev", "mnist-mlp", _rec(per_replica_rps=80.0, headroom=0.2), stack, measured="2026-12-01")
    again = stack.read_bytes()
    assert again == after.replace(
        line, b"      capacity: {per_replica_rps: 80.0, headroom: 0.2, measured: '2026-12-01'}\n"
    )
    assert load_stack_config("dev", stack).model("mnist-mlp").load_target == round(80 / 1.2, 3)


def test_write_config_without_a_day_writes_the_sizing_only(tmp_path: Path) -> None:
    stack = _stack_copy(tmp_path / "Pulumi.dev.yaml", "mnist-mlp:1")
    write_config("dev", "mnist-mlp", _rec(), stack)
    assert b"capacity:" not in stack.read_bytes()
    assert load_stack_config("dev", stack).model("mnist-mlp").replicas.min == 3


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
    # 3 s hold one 1 s step and its grace, not a second one: the ramp ends on its budget and says so.
    assert m.budget_spent and m.stop_reason == "the 3 s load budget was spent before concurrency 2"
    assert len(m.steps) == 1


# --- the load budget, by events: a fake clock that only the load generator advances ------------------


class FakeLoad:
    """A load generator on a fake clock: a step lasts its seconds plus ``overrun``."""

    def __init__(self, overrun: float, p99_ms: float = 5.0, rps_per_connection: float = 100.0) -> None:
        self.now, self.overrun, self.p99_ms, self.rps = 0.0, overrun, p99_ms, rps_per_connection
        self.asked: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def __call__(self, concurrency: int, seconds: int) -> tuple[int, int, float, float, float]:
        self.asked.append((concurrency, seconds))
        self.now += seconds + self.overrun
        p99 = self.p99_ms if concurrency < 8 else self.p99_ms * 100
        return int(self.rps * concurrency * seconds), 0, float(seconds), 1.0, p99


@pytest.mark.parametrize("budget", [3, 5, 8, 20, 60, 120, 600])
def test_the_ramp_ends_within_its_budget_even_when_every_step_overruns(budget: int) -> None:
    load = FakeLoad(overrun=STEP_GRACE_S)  # the most a load generator may overrun a step
    r = ramp(load, p99_ms=1e9, budget_s=budget, clock=load.clock)
    assert load.now <= budget
    assert all(isinstance(sec, int) and sec >= 1 for _, sec in load.asked)  # whole seconds: wrk's -d unit
    assert [s.concurrency for s in r.steps] == [c for c, _ in load.asked] == concurrency_levels()[: len(r.steps)]
    if r.budget_spent:
        assert len(r.steps) < len(concurrency_levels())
        assert r.stop_reason == f"the {budget} s load budget was spent before concurrency {2 ** len(r.steps)}"
    else:
        assert r.stop_reason == "reached concurrency 64"


def test_a_short_budget_stops_the_ramp_early_and_says_so() -> None:
    short, full = FakeLoad(overrun=0.3), FakeLoad(overrun=0.3)
    r_short = ramp(short, p99_ms=1e9, budget_s=5, clock=short.clock)
    r_full = ramp(full, p99_ms=1e9, budget_s=120, clock=full.clock)
    assert r_short.budget_spent and r_short.stop_reason.startswith("the 5 s load budget was spent before concurrency")
    assert not r_full.budget_spent and len(r_full.steps) == len(concurrency_levels())
    assert 0 < len(r_short.steps) < len(r_full.steps)
    m = Measurement("m", "1", 1.0, 100.0, "wrk", r_short.steps, 100 * MI, r_short.stop_reason, 5, r_short.budget_spent)
    assert "load budget spent" in figure(m).axes[0].get_title()


def test_other_stops_are_not_budget_stops() -> None:
    load = FakeLoad(overrun=0.1)  # p99 jumps 100-fold at concurrency 8
    r = ramp(load, p99_ms=100, budget_s=120, clock=load.clock)
    assert [s.concurrency for s in r.steps] == [1, 2, 4, 8]
    assert (r.budget_spent, r.stop_reason) == (False, "p99 500.0 ms > 100 ms at concurrency 8")
    silent = FakeLoad(overrun=0.1, rps_per_connection=0.0)
    r = ramp(silent, p99_ms=100, budget_s=120, clock=silent.clock)
    assert (len(r.steps), r.budget_spent) == (1, False)
    assert r.stop_reason == "no request was answered within the 16 s step at concurrency 1"


def test_python_load_does_not_wait_for_answers_after_the_step() -> None:
    """Waiting for in-flight requests let one slow answer carry a step (and the ramp) past its budget."""
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            release.wait(30)  # answers only once the generator has returned
            try:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        answered, failed, *_ = python_load(f"http://127.0.0.1:{srv.server_port}/", b"{}")(2, 1)
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
    # Cut off at the end of the step, as wrk does: neither answers nor failures.
    assert (answered, failed) == (0, 0)


# --- which version is measured ---------------------------------------------------------------------------


def _bytes_artifact(d: Path, payload: bytes, version: str = "1") -> Path:
    """A pytorch-framework artifact of arbitrary bytes: the version check reads model.yaml, never the model."""
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(payload)
    t = TensorSpec(name="input", datatype="FP32", shape=(-1, 8))  # type: ignore[arg-type]
    files = (FileEntry(path="model.pt", sha256=file_sha256(d / "model.pt")),)
    spec = ModelSpec(
        name="mnist-mlp",
        version=version,
        framework="pytorch",  # type: ignore[arg-type]
        files=files,
        signature=Signature(inputs=(t,), outputs=(t,)),
    )
    write_spec(d, spec)
    return d


@pytest.fixture
def versions(tmp_path: Path) -> dict[str, Path]:
    """A registry with mnist-mlp 1 and 2 (champion -> 2), v1 exported, and a dev stack on mnist-mlp@champion."""
    reg = Registry(tmp_path / "registry")
    for v in (1, 2):
        reg.register(_bytes_artifact(tmp_path / f"src{v}", f"weights {v}".encode()), "mnist-mlp", "pytorch")
    reg.set_alias("mnist-mlp", "champion", "2")
    return {
        "registry": reg.root,
        "v1": reg.resolve("mnist-mlp:1").export(tmp_path / "v1"),
        "v2": reg.resolve("mnist-mlp:2").export(tmp_path / "v2"),
        "stack": _stack_copy(tmp_path / "Pulumi.dev.yaml", "mnist-mlp@champion"),
    }


def _capacity(versions: dict[str, Path], artifact: Path | str, *extra: str) -> int:
    return main(
        ["capacity", str(artifact), "--target-rps", "10", "--p99-ms", "100", "--write-config", "dev",
         "--config-file", str(versions["stack"]), "--registry", str(versions["registry"]), *extra]
    )  # fmt: skip


def test_write_config_refuses_an_artifact_of_another_version(
    versions: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = versions["stack"].read_text()
    assert _capacity(versions, versions["v1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the server started: nothing measured
    assert err == (
        f"dlstack capacity: error: {versions['v1']} is mnist-mlp:1, but Pulumi.dev.yaml runs mnist-mlp:2 "
        "(mnist-mlp@champion) for mnist-mlp; its sizing would come from another version; measure that version: "
        "`dlstack models export mnist-mlp:2 DIR`, then rerun with DIR (or pass mnist-mlp:2 as ARTIFACT)\n"
    )
    assert versions["stack"].read_text() == before


def test_write_config_refuses_a_relabelled_artifact(
    versions: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory that says version 2 but holds other files (re-packaged, edited) is not mnist-mlp:2."""
    fake = _bytes_artifact(tmp_path / "fake", b"retrained", version="2")
    assert _capacity(versions, fake) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"dlstack capacity: error: {fake} says mnist-mlp:2, but its files are not the registry's mnist-mlp:2 (model "
    )
    assert "`dlstack models export mnist-mlp:2 DIR`" in err and err.count("\n") == 1


def test_the_version_the_stack_runs_is_accepted_as_a_directory_or_a_reference(versions: dict[str, Path]) -> None:
    from services.serving.artifact import load_spec

    reg = versions["registry"]
    check_runs(str(versions["v2"]), load_spec(versions["v2"]), "dev", "mnist-mlp", versions["stack"], reg)
    for ref in ("mnist-mlp:2", "mnist-mlp@champion"):
        path = resolve_artifact(ref, reg)
        assert load_spec(path).version == "2"
        check_runs(ref, load_spec(path), "dev", "mnist-mlp", versions["stack"], reg)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope"], r"Pulumi\.dev\.yaml: model 'nope' is not in dlstack:models \(it has: mnist-mlp, "),
        (["--registry", "EMPTY"], r"Pulumi\.dev\.yaml: mnist-mlp: model 'mnist-mlp' is not in the registry "),
    ],
)
def test_write_config_check_errors_name_the_file_and_the_fix(
    versions: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    assert _capacity(versions, versions["v2"], *args) == 2
    err = capsys.readouterr().err
    assert re.match(r"dlstack capacity: error: " + message, err), err
    assert err.count("\n") == 1


def test_artifact_argument_errors(versions: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a directory; pass an artifact made by `dlstack package`"):
        resolve_artifact(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"model 'mnist-mlp' has no version '9' \(versions: 1, 2\)"):
        resolve_artifact("mnist-mlp:9", versions["registry"])


# --- the plot's labels ------------------------------------------------------------------------------------

# (objective ms, [(concurrency, req/s, p99 ms)]): points close together, as real ramps make them.
PLOTS = {
    # The README's measurement: c=8 and c=16 a few pixels apart, far under the objective.
    "readme": (
        250.0,
        [(1, 2500, 1.2), (2, 2930, 1.5), (4, 4110, 2.5), (8, 6100, 3.4), (16, 6148, 5.4), (32, 5480, 39.5)],
    ),
    "crowded around the objective": (11.0, [(1 << i, 1000 + 3 * i, 10 + 0.4 * i) for i in range(7)]),
    "on top of each other": (100.0, [(1 << i, 500 + 0.5 * i, 20 + 0.1 * i) for i in range(7)]),
    "a zigzag cluster": (50.0, [(1 << i, 500 + 6 * i, 30 + 3 * (i % 2) + 0.5 * i) for i in range(7)]),
}


@pytest.mark.parametrize("case", list(PLOTS))
def test_plot_labels_never_overlap(case: str) -> None:
    from matplotlib.text import Text

    slo, points = PLOTS[case]
    steps = tuple(Step(c, round(rps * 10), 0, 10.0, rps, p99 / 2, p99, 0.9) for c, rps, p99 in points)
    m = Measurement("mnist-mlp", "1", 1.0, slo, "wrk", steps, 100 * MI, "test")
    fig = figure(m)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    area = ax.get_window_extent(renderer)
    # The text's own box: an annotation's get_window_extent would add its leader line's box.
    labels = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}
    assert len(labels) == len(ax.texts) and set(labels) <= {f"c={c}" for c, _, _ in points}
    assert {f"c={m.best.concurrency}", f"c={points[-1][0]}"} <= set(labels)  # the two that matter are never dropped
    others = {
        "legend": ax.get_legend().get_window_extent(renderer),
        "title": ax.title.get_window_extent(renderer),
        "x label": ax.xaxis.label.get_window_extent(renderer),
        "y label": ax.yaxis.label.get_window_extent(renderer),
    }
    boxes = [*labels.items(), *others.items()]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), f"{case}: {a} {box_a} overlaps {b} {box_b}"
    marks = [ax.transData.transform((s.rps, s.p99_ms)) for s in steps]
    for name, box in labels.items():
        assert area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1, name
        assert not any(box.contains(x, y) for x, y in marks), f"{name} covers a point"
    for t in ax.texts:  # a leader line never runs through another label
        if t.arrow_patch is not None:
            path = t.arrow_patch.get_path()
            assert not any(path.intersects_bbox(b) for n, b in labels.items() if n != t.get_text()), t.get_text()


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
