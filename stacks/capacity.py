"""``dlstack capacity``: measure what one replica sustains under a p99 objective, then size the Deployment.

Measure: start the real model server for an artifact (a directory, or a registry reference such as
``mnist-mlp:2``) with ``DLSTACK_CPU_LIMIT=C`` (so workers and threads are laid out as in a pod with
that CPU limit), pin it to ceil(C) cores when the machine has more, and load it at rising
concurrency (1, 2, 4, ...) until p99 exceeds the objective, requests fail, throughput stops rising
(two steps in a row under +5 %), or the load budget (``--duration-s``) is spent. The load generator
is wrk (Lua POST script) when installed, else a Python thread pool.

The budget bounds the ramp, not the server start: every step gets whole seconds that fit in what is
left, less ``STEP_GRACE_S`` for the load generator to stop, and a request still in flight when its
step ends is cut off rather than waited for (wrk drops it; the Python generator's read timeout ends
with the step), so one slow answer cannot carry the ramp past the budget.

With ``--write-config ENV`` the artifact must be the version the ENV stack file's entry resolves to
(through the registry, aliases included); sizing one version into an entry that runs another is
refused before anything is measured. Besides replicas and resources it records
``capacity: {per_replica_rps, headroom, measured}``, the default target of ``autoscaling: {metric: rps}``
(KEDA), so an entry may ask for load autoscaling before it has been measured.

Recommend (the headroom, default 30 %, is spare capacity for spikes and a lost pod):

* per-replica capacity = best error-free req/s with p99 <= objective, scaled down by C / cores used
  when the server used more CPU than C during that step (CPU-bound assumption);
* replicas.min = ceil(target_rps * (1 + headroom) / per-replica capacity); replicas.max = 2 x min;
* HPA target CPU % = CPU utilisation at saturation / (1 + headroom), so scaling starts before p99 breaks;
* resources.cpu = C; resources.memory = peak PSS of the server's processes + 25 %, rounded up to 16 Mi.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services import outdir
from services.serving.errors import UserError

WRK = "/usr/bin/wrk"
HEADROOM = 0.3
MEMORY_MARGIN = 0.25
MAX_CONCURRENCY = 64
PLATEAU_GAIN = 1.05  # a step must beat the best req/s so far by 5 % to count as "still rising"
PLATEAU_STEPS = 2  # stop after this many steps in a row that do not rise
MI = 1 << 20
STEP_GRACE_S = 1.0  # how far past its length one load step may run (load generator start and stop)
REQUEST_TIMEOUT_S = 10.0  # a request that takes longer counts as failed


@dataclass(frozen=True)
class Step:
    """One load level."""

    concurrency: int  # parallel connections
    requests: int  # completed requests
    errors: int  # non-2xx answers and connection errors
    duration_s: float  # seconds of load
    rps: float  # completed requests per second
    p50_ms: float  # median latency, milliseconds
    p99_ms: float  # 99th percentile latency, milliseconds
    cpu_cores: float  # CPU the server processes used during the step, cores

    def ok(self, p99_limit_ms: float) -> bool:
        return self.errors == 0 and self.requests > 0 and self.p99_ms <= p99_limit_ms


@dataclass(frozen=True)
class Measurement:
    """What one replica did under rising load."""

    model: str  # model name from model.yaml
    version: str  # model version
    cpu: float  # CPU limit the server was laid out for (DLSTACK_CPU_LIMIT), cores
    p99_limit_ms: float  # the objective, milliseconds
    loadgen: str  # "wrk" or "python"
    steps: tuple[Step, ...]  # in order of rising concurrency
    peak_pss_bytes: int  # peak proportional set size of all server processes, bytes
    stop_reason: str  # why the ramp stopped
    budget_s: float = 120.0  # the load budget (--duration-s), seconds
    budget_spent: bool = False  # True when the budget ran out before anything else stopped the ramp

    @property
    def best(self) -> Step:
        good = [s for s in self.steps if s.ok(self.p99_limit_ms)]
        if not good:
            first = self.steps[0]
            raise UserError(
                f"{self.model}: even at concurrency {first.concurrency} p99 is {first.p99_ms:.1f} ms "
                f"with {first.errors} errors, over the {self.p99_limit_ms:g} ms objective; give it more CPU "
                "(--cpu), relax --p99-ms, or make the model faster"
            )
        return max(good, key=lambda s: s.rps)

    @property
    def max_rps(self) -> float:
        return self.best.rps

    @property
    def per_replica_rps(self) -> float:
        """Best req/s, scaled to C cores when the server used more than C (no CPU limit here)."""
        used = self.best.cpu_cores
        return self.max_rps * min(1.0, self.cpu / used) if used > 0 else self.max_rps


@dataclass(frozen=True)
class Recommendation:
    """Deployment sizing for a target load."""

    target_rps: float  # the load to serve, req/s
    headroom: float  # spare share of capacity, e.g. 0.3
    per_replica_rps: float  # sustainable req/s of one replica under the objective
    replicas_min: int  # HPA minReplicas
    replicas_max: int  # HPA maxReplicas
    target_cpu_percent: int  # HPA CPU utilisation target, % of the request
    cpu: str  # CPU request, Kubernetes quantity
    memory: str  # memory request, Kubernetes quantity


def cpu_quantity(cores: float) -> str:
    milli = round(cores * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def recommend(m: Measurement, target_rps: float, headroom: float = HEADROOM) -> Recommendation:
    if target_rps <= 0:
        raise UserError(f"--target-rps must be > 0, got {target_rps:g}")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom must be in [0, 1), e.g. 0.3 for 30 %, got {headroom:g}")
    per_replica = m.per_replica_rps
    replicas = max(1, math.ceil(target_rps * (1 + headroom) / per_replica))
    saturation = min(1.0, m.best.cpu_cores / m.cpu) if m.best.cpu_cores > 0 else 1.0
    target_cpu = int(max(20, min(90, math.floor(100 * saturation / (1 + headroom)))))
    memory = math.ceil(m.peak_pss_bytes * (1 + MEMORY_MARGIN) / (16 * MI)) * 16
    return Recommendation(
        target_rps=target_rps,
        headroom=headroom,
        per_replica_rps=per_replica,
        replicas_min=replicas,
        replicas_max=2 * replicas,
        target_cpu_percent=target_cpu,
        cpu=cpu_quantity(m.cpu),
        memory=f"{max(memory, 64)}Mi",
    )


# --- the server under test -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _split_cpus(cpu: float) -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores): separate them when the machine has room."""
    try:
        avail = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    need = max(1, math.ceil(cpu))
    if need >= len(avail):
        return None, None
    return set(avail[:need]), set(avail[need:])


class Server:
    """``dlstack serve`` in a subprocess (its own session), stopped with SIGTERM then SIGKILL."""

    def __init__(self, artifact_dir: Path, cpu: float, cores: set[int] | None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's log, shown only when it fails to start; it lives as long as the server.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        # A fresh metrics dir per server (serve makes one when unset): never share another server's.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["DLSTACK_CPU_LIMIT"] = str(cpu)
        argv = [sys.executable, "-m", "stacks.cli", "serve", str(artifact_dir), "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the model server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise UserError(f"the model server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().decode(errors="replace").splitlines()[-n:])

    def processes(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def pss_bytes(self) -> int:
        import psutil

        total = 0
        for p in self.processes():
            try:
                info = p.memory_full_info()
                total += int(getattr(info, "pss", info.rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


def request_body(spec: Any) -> bytes:
    """A valid one-row V2 JSON request for the model's signature (variable dims = 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = []
    for t in spec.signature.inputs:
        if t.datatype.value == "BYTES":
            raise UserError(f"{spec.name}: input {t.name!r} is BYTES; capacity can only generate numeric inputs")
        shape = [1 if d == -1 else d for d in t.shape]
        data = rng.random(shape) * 2 - 1 if t.datatype.numpy.kind == "f" else rng.integers(0, 2, shape)
        inputs.append(
            {
                "name": t.name,
                "shape": shape,
                "datatype": t.datatype.value,
                "data": data.astype(t.datatype.numpy).ravel().tolist(),
            }
        )
    return json.dumps({"inputs": inputs}).encode()


# --- load generators ---------------------------------------------------------------------------------

_WRK_SCRIPT = """
local f = io.open([==[{body}]==], "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('DLSTACK {{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

# run(concurrency, seconds) -> (answered, failed, elapsed s, p50 ms, p99 ms); returns within seconds + STEP_GRACE_S.
LoadFn = Callable[[int, int], tuple[int, int, float, float, float]]


def wrk_load(url: str, body_path: Path, cores: set[int] | None) -> LoadFn:
    script = body_path.with_suffix(".lua")
    script.write_text(_WRK_SCRIPT.format(body=body_path))

    def run(concurrency: int, seconds: int) -> tuple[int, int, float, float, float]:
        threads = max(1, min(concurrency, len(cores) if cores else 2))
        # wrk takes whole seconds; the ramp asks for whole seconds, so nothing is rounded up past the budget.
        argv = [WRK, "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds}s"]
        argv += ["--timeout", f"{REQUEST_TIMEOUT_S:g}s", "-s", str(script), url]
        try:
            res = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=seconds + STEP_GRACE_S + 10,
                check=False,
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
            )
        except subprocess.TimeoutExpired:
            raise UserError(
                f"wrk ran 10 s past its {seconds} s and was stopped; rerun, or use --loadgen python"
            ) from None
        line = next((x for x in res.stdout.splitlines() if x.startswith("DLSTACK ")), None)
        if res.returncode != 0 or line is None:
            raise UserError(f"wrk failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
        r = json.loads(line[len("DLSTACK ") :])
        return r["requests"], r["errors"], r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3

    return run


def python_load(url: str, body: bytes) -> LoadFn:
    import numpy as np
    import requests

    def run(concurrency: int, seconds: int) -> tuple[int, int, float, float, float]:
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds
        # Waiting for every request in flight at the end let one slow answer (up to the 10 s timeout)
        # carry the step, and so the ramp, past its budget. As in wrk, a request still unanswered
        # shortly after the step ends is cut off and counted neither as an answer nor as a failure.
        cut_at = stop_at + STEP_GRACE_S / 2

        def worker() -> None:
            with requests.Session() as s:
                while (now := time.monotonic()) < stop_at:
                    limit = min(REQUEST_TIMEOUT_S, cut_at - now)
                    t0 = time.perf_counter()
                    try:
                        ok = s.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=limit).ok
                    except requests.Timeout:
                        if limit < REQUEST_TIMEOUT_S:
                            continue  # cut off by the end of the step
                        ok = False
                    except requests.RequestException:
                        ok = False
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        errors[0] += not ok

        start = time.monotonic()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        if not latencies:
            return 0, 0, elapsed, math.inf, math.inf
        ms = np.array(latencies) * 1e3
        return len(latencies), errors[0], elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))

    return run


# --- the ramp ----------------------------------------------------------------------------------------


def concurrency_levels() -> list[int]:
    """1, 2, 4, ... up to MAX_CONCURRENCY."""
    return [1 << i for i in range(MAX_CONCURRENCY.bit_length()) if 1 << i <= MAX_CONCURRENCY]


def step_seconds(budget_s: float, levels: int) -> int:
    """Whole seconds per step (wrk's unit), so that every level fits in the budget.

    Planned with half the grace: measured, a step costs 0.05 s (wrk) to 0.3 s (Python) beyond its
    length. The ramp still keeps the whole grace free before each step, so a slower step shortens or
    drops the last level instead of overrunning.
    """
    return max(1, math.floor(budget_s / levels - STEP_GRACE_S / 2))


@dataclass(frozen=True)
class Ramp:
    """The load steps run and why they stopped."""

    steps: tuple[Step, ...]  # in order of rising concurrency
    stop_reason: str  # why the ramp stopped
    budget_spent: bool  # True when the budget ran out before anything else stopped it
    peak_pss_bytes: int  # peak PSS sampled after each step, bytes


def ramp(
    run: LoadFn,
    p99_ms: float,
    budget_s: float,
    *,
    cpu_seconds: Callable[[], float] = lambda: 0.0,
    pss_bytes: Callable[[], int] = lambda: 0,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = lambda _: None,
) -> Ramp:
    """Load at rising concurrency until a stop condition; no step starts that could end past ``budget_s``."""
    levels = concurrency_levels()
    planned = step_seconds(budget_s, len(levels))
    deadline = clock() + budget_s
    steps: list[Step] = []
    peak = 0
    reason, spent = f"reached concurrency {levels[-1]}", False
    best, flat = 0.0, 0
    for conc in levels:
        # A step may overrun its length by up to STEP_GRACE_S; a step cut to under half its planned
        # length would measure little, so the ramp ends there instead.
        fits = math.floor(deadline - clock() - STEP_GRACE_S)
        if fits < max(1, planned // 2):
            reason = f"the {budget_s:g} s load budget was spent before concurrency {conc}"
            spent = True
            break
        seconds = min(planned, fits)
        cpu0, t0 = cpu_seconds(), clock()
        n, errors, elapsed, p50, p99 = run(conc, seconds)
        cores = (cpu_seconds() - cpu0) / max(clock() - t0, 1e-6)
        peak = max(peak, pss_bytes())
        step = Step(conc, n, errors, elapsed, n / elapsed if elapsed else 0.0, p50, p99, cores)
        steps.append(step)
        log(f"{conc:>11} {step.rps:>9.1f} {p50:>8.1f} {p99:>8.1f} {errors:>7} {cores:>9.2f}")
        if errors:
            reason = f"{errors} failed requests at concurrency {conc}"
            break
        if n == 0:
            reason = f"no request was answered within the {seconds} s step at concurrency {conc}"
            break
        if p99 > p99_ms:
            reason = f"p99 {p99:.1f} ms > {p99_ms:g} ms at concurrency {conc}"
            break
        # Two flat steps in a row, not one: a single dip is often noise on a busy machine.
        flat = flat + 1 if best and step.rps < best * PLATEAU_GAIN else 0
        if flat >= PLATEAU_STEPS:
            reason = f"throughput stopped rising at concurrency {conc}"
            break
        best = max(best, step.rps)
    return Ramp(tuple(steps), reason, spent, peak)


# --- measure -----------------------------------------------------------------------------------------


def check_flags(*, p99_ms: float, cpu: float, duration_s: float, target_rps: float | None = None) -> None:
    if target_rps is not None and target_rps <= 0:
        raise UserError(f"--target-rps must be > 0, got {target_rps:g}")
    if p99_ms <= 0:
        raise UserError(f"--p99-ms must be > 0, got {p99_ms:g}")
    if cpu <= 0:
        raise UserError(f"--cpu must be > 0 cores, got {cpu:g}")
    if duration_s < 3:
        raise UserError(f"--duration-s must be >= 3 seconds, got {duration_s:g}")


def measure(
    artifact_dir: Path,
    p99_ms: float,
    *,
    cpu: float = 1.0,
    duration_s: float = 120.0,
    loadgen: str = "auto",
    log: Callable[[str], None] = lambda _: None,
) -> Measurement:
    """Run the ramp against a fresh server; ``duration_s`` bounds the load (not the server start)."""
    from services.serving.artifact import load_spec

    check_flags(p99_ms=p99_ms, cpu=cpu, duration_s=duration_s)
    spec = load_spec(artifact_dir)
    body = request_body(spec)
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which(WRK) is not None)
    if loadgen == "wrk" and shutil.which(WRK) is None:
        raise UserError(f"--loadgen wrk: {WRK} is not installed (apt-get install wrk), or use --loadgen python")
    server_cores, load_cores = _split_cpus(cpu)
    server = Server(artifact_dir, cpu, server_cores)
    with tempfile.TemporaryDirectory(prefix="dlstack-capacity-") as tmp:
        try:
            server.wait_ready()
            url = f"{server.url}/v2/models/{spec.name}/infer"
            import requests

            warm = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
            if not warm.ok:
                raise UserError(f"{spec.name}: the warm-up request failed with {warm.status_code}: {warm.text[:300]}")
            body_path = Path(tmp) / "body.json"
            body_path.write_bytes(body)
            run = wrk_load(url, body_path, load_cores) if use_wrk else python_load(url, body)
            r = ramp(run, p99_ms, duration_s, cpu_seconds=server.cpu_seconds, pss_bytes=server.pss_bytes, log=log)
        finally:
            server.stop()
    if not r.steps:
        raise UserError(f"no load step fit in --duration-s {duration_s:g}; raise it")
    return Measurement(
        model=spec.name,
        version=spec.version,
        cpu=cpu,
        p99_limit_ms=p99_ms,
        loadgen="wrk" if use_wrk else "python",
        steps=r.steps,
        peak_pss_bytes=r.peak_pss_bytes,
        stop_reason=r.stop_reason,
        budget_s=duration_s,
        budget_spent=r.budget_spent,
    )


# --- outputs -----------------------------------------------------------------------------------------

LABEL_OFFSETS_PT = (4, 10, 16, 26, 38)  # how far from its point a concurrency label may sit, nearest first
LEADER_FROM_PT = 16  # from this distance on, a thin line leads from the label to its point
# (dx, dy, ha, va): the label's side of the point, and the alignment that keeps the text on that side.
LABEL_SIDES = (
    (1, 1, "left", "bottom"),
    (-1, 1, "right", "bottom"),
    (1, -1, "left", "top"),
    (-1, -1, "right", "top"),
    (1, 0, "left", "center"),
    (-1, 0, "right", "center"),
    (0, 1, "center", "bottom"),
    (0, -1, "center", "top"),
)
LABEL_GAP_PX = 2.0  # the least space between two labels, or a label and a marker or line


def figure(m: Measurement) -> Any:
    """p99 latency against throughput, one point per concurrency, with the objective as a line.

    No two labels overlap: the legend sits under the axes, and each ``c=N`` label takes the nearest
    free spot around its point (clear of other labels, the markers, the curve, the objective and
    capacity lines), or is left out when there is none: crowded points lose labels rather than
    overprint them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.6), dpi=110)
    FigureCanvasAgg(fig)  # no pyplot: no global figure state, nothing to close
    ax = fig.add_subplot()
    shown = [s for s in m.steps if math.isfinite(s.p99_ms)]
    rps = [s.rps for s in shown]
    p99 = [s.p99_ms for s in shown]
    (curve,) = ax.plot(rps, p99, "o-", color="tab:blue", label="p99 latency (one replica)")
    ax.axhline(m.p99_limit_ms, color="tab:red", linestyle="--", label=f"p99 objective {m.p99_limit_ms:g} ms")
    best: Step | None = None
    try:
        best = m.best
        ax.axvline(best.rps, color="tab:green", linestyle=":", label=f"max sustainable {best.rps:.0f} req/s")
    except UserError:
        pass
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    spent = ", load budget spent" if m.budget_spent else ""
    ax.set_title(f"{m.model} v{m.version}: one replica, CPU {cpu_quantity(m.cpu)} ({m.loadgen}{spent})")
    ax.set_xlim(left=0, right=max([*rps, 1.0]) * 1.15)
    ax.set_ylim(bottom=0, top=max([*p99, m.p99_limit_ms]) * 1.2)
    ax.grid(alpha=0.3)
    # Under the axes: inside, the legend covered the objective line and the labels of the points.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=8, frameon=False)
    fig.tight_layout()
    _label_points(fig, ax, curve, shown, m.p99_limit_ms, best)
    return fig


def _label_points(fig: Any, ax: Any, line: Any, steps: list[Step], p99_limit_ms: float, best: Step | None) -> None:
    from matplotlib.path import Path as Segments
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent(renderer).padded(-1)
    to_px = ax.transData.transform
    r = line.get_markersize() * fig.dpi / 72 / 2 + LABEL_GAP_PX
    curve = line.get_transform().transform_path(line.get_path())  # the segments between points, in pixels
    points = [to_px((s.rps, s.p99_ms)) for s in steps]
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in points]
    y = to_px((0, p99_limit_ms))[1]
    rules = [Bbox.from_extents(area.x0, y - LABEL_GAP_PX, area.x1, y + LABEL_GAP_PX)]
    if best is not None:
        x = to_px((best.rps, 0))[0]
        rules.append(Bbox.from_extents(x - LABEL_GAP_PX, area.y0, x + LABEL_GAP_PX, area.y1))
    texts: list[Any] = []  # placed label texts, padded
    leaders: list[Any] = []  # placed leader lines, straight from the marker's edge to the text's centre

    def free(i: int, text: Any, leader: Any) -> bool:
        if not (area.x0 <= text.x0 and text.x1 <= area.x1 and area.y0 <= text.y0 and text.y1 <= area.y1):
            return False
        if any(text.overlaps(b) for b in (*markers, *rules, *texts)) or curve.intersects_bbox(text, False):
            return False
        if any(p.intersects_bbox(text, False) for p in leaders):
            return False
        # A leader that crossed the curve or passed close to another marker would seem to point at it.
        others = [b.padded(r) for j, b in enumerate(markers) if j != i]
        return leader is None or not (
            curve.intersects_path(leader, False) or any(leader.intersects_bbox(b, False) for b in (*others, *texts))
        )

    # The best point and the one that ended the ramp matter most: they get the first pick of spots.
    last = len(steps) - 1
    for i in sorted(range(len(steps)), key=lambda i: (not (steps[i] is best or i == last), i)):
        s, (px, py) = steps[i], points[i]
        for dist, (dx, dy, ha, va) in ((d, side) for d in LABEL_OFFSETS_PT for side in LABEL_SIDES):
            lead = {"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkB": line.get_markersize() / 2 + 1}
            ann = ax.annotate(
                f"c={s.concurrency}",
                (s.rps, s.p99_ms),
                textcoords="offset points",
                xytext=(dx * dist, dy * dist),
                ha=ha,
                va=va,
                fontsize=8,
                arrowprops=lead if dist >= LEADER_FROM_PT else None,
            )
            ann.update_positions(renderer)
            text = Text.get_window_extent(ann, renderer)
            leader = None
            if dist >= LEADER_FROM_PT:
                cx, cy = (text.x0 + text.x1) / 2, (text.y0 + text.y1) / 2
                n = math.hypot(cx - px, cy - py)
                leader = Segments([(px + (cx - px) * r / n, py + (cy - py) * r / n), (cx, cy)])
            if free(i, text, leader):
                texts.append(text.padded(LABEL_GAP_PX))
                if leader is not None:
                    leaders.append(leader)
                break
            ann.remove()


PLOT_MARK = (b"dlstack", b"capacity plot")  # a PNG tEXt chunk: how a later run knows the file is its own
_PNG = b"\x89PNG\r\n\x1a\n"


def is_plot(path: Path) -> bool:
    """Whether ``path`` is a PNG that ``plot`` wrote: a tEXt chunk before the image data carries PLOT_MARK."""
    try:
        with path.open("rb") as fh:
            if fh.read(8) != _PNG:
                return False
            while True:
                head = fh.read(8)
                size, kind = int.from_bytes(head[:4], "big"), head[4:]
                if len(head) < 8 or kind in (b"IDAT", b"IEND") or size > 1 << 16:
                    return False  # text written before the image data, or not at all
                body = fh.read(size + 4)[:size]  # + the CRC
                if kind == b"tEXt" and tuple(body.split(b"\0", 1)) == PLOT_MARK:
                    return True
    except OSError:
        return False


# A previous --report of ours holds both keys; any other file there is the user's.
_REPORT: dict[str, Any] = {
    "label": "--report",
    "what": "capacity report",
    "recognise": outdir.json_with_keys("measurement", "recommendation"),
}


def check_plot(path: Path) -> Path:
    """Refuse a --plot path that exists and is not a previous plot (before measuring: minutes of load)."""
    return outdir.check_file(path, label="--plot", what="capacity plot", recognise=is_plot)


def plot(m: Measurement, path: Path) -> Path:
    """Write ``figure(m)`` as a PNG, atomically, to a new path or over a previous plot (``check_plot``)."""
    fig = figure(m)
    buf = io.BytesIO()
    mark = {PLOT_MARK[0].decode(): PLOT_MARK[1].decode()}
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata=mark)  # the dpi the labels were placed at
    return outdir.replace_file(path, buf.getvalue(), label="--plot", what="capacity plot", recognise=is_plot)


def write_config(
    stack: str, model: str, rec: Recommendation, path: Path | None = None, *, measured: str | None = None
) -> Path:
    """Write the sizing into ``Pulumi.<stack>.yaml``'s model entry, byte for byte elsewhere; atomic and validated.

    The edit goes through ``stacks.yamledit`` like promotion's (same lock, same recovery of an interrupted
    promotion first, same all-or-nothing commit), so comments, quoting, BOM and CRLF survive.

    ``measured`` (the day, YYYY-MM-DD; the CLI passes today's UTC date) also records
    ``capacity: {per_replica_rps, headroom, measured}``: the default target of ``autoscaling: {metric: rps}``
    (stacks.config ``ModelConfig.load_target``). None writes the sizing only.
    """
    import tempfile

    from stacks.config import load_stack_config, stack_file
    from stacks.yamledit import Doc, YamlEditError, commit, locked, recover

    path = path if path is not None else stack_file(stack)
    if not path.is_file():
        raise UserError(f"{path}: no such stack file; create it or pick an existing stack with --write-config")
    try:
        with locked([path.parent]):
            recover(path.parent)
            doc = Doc.read(path)
            cfg = doc.data.get("config") if isinstance(doc.data, dict) else None
            models = cfg.get("dlstack:models") if isinstance(cfg, dict) else None
            models = models if isinstance(models, list) else []
            i = next((n for n, e in enumerate(models) if isinstance(e, dict) and e.get("name") == model), None)
            if i is None:
                names = ", ".join(str(e.get("name")) for e in models if isinstance(e, dict)) or "none"
                raise UserError(
                    f"{path.name}: model {model!r} is not in dlstack:models (it has: {names}); add an entry for it "
                    "first, or pass --model NAME to size an existing entry"
                )
            at = ("config", "dlstack:models", i)
            doc.set_map(
                (*at, "replicas"),
                {"min": rec.replicas_min, "max": rec.replicas_max, "target_cpu_percent": rec.target_cpu_percent},
                flow=True,
            )
            doc.set_map((*at, "resources"), {"cpu": rec.cpu, "memory": rec.memory}, flow=True)
            if measured is not None:
                # Four significant digits: a measurement is not more precise, and never rounds to 0.
                capacity = {"per_replica_rps": float(f"{rec.per_replica_rps:.4g}"), "headroom": rec.headroom}
                doc.set_map((*at, "capacity"), {**capacity, "measured": measured}, flow=True)
            data = doc.result()
            with tempfile.TemporaryDirectory(prefix="dlstack-capacity-") as tmp:
                # Validate before replacing: a config the schema rejects must never land.
                (Path(tmp) / path.name).write_bytes(data)
                try:
                    load_stack_config(stack, Path(tmp) / path.name, unmeasured_ok=True)
                except UserError as exc:
                    raise UserError(
                        f"{path.name}: not changed, the new sizing does not validate: {exc.message}"
                    ) from exc
            commit(path.parent, {path: data})
    except YamlEditError as exc:
        raise UserError(f"{path.name}: not changed: {exc.message}") from exc
    except OSError as exc:
        raise UserError(f"{path}: not changed: {exc.strerror or exc}") from exc
    return path


def report(m: Measurement, rec: Recommendation) -> dict[str, Any]:
    return {
        "measurement": {**asdict(m), "max_rps": m.max_rps, "per_replica_rps": m.per_replica_rps},
        "recommendation": asdict(rec),
    }


# --- what to measure -----------------------------------------------------------------------------------


def resolve_artifact(arg: str, registry: str | None = None) -> Path:
    """ARTIFACT as given on the command line: an artifact directory, or a registry reference."""
    path = Path(arg)
    if path.is_dir():
        return path
    if not path.exists() and "/" not in arg and (":" in arg or "@" in arg):
        from services.registry import Registry

        # The registry's own copy: read-only files, which the server only reads.
        return Registry(registry).resolve(arg).path
    raise UserError(
        f"{arg}: not a directory; pass an artifact made by `dlstack package` or `dlstack models export`, "
        "or a registry reference such as mnist-mlp:2"
    )


def check_runs(
    artifact: str, spec: Any, stack: str, entry: str, config_file: Path | None = None, registry: str | None = None
) -> None:
    """Refuse when ``artifact`` is not the version that ``entry`` of the ``stack`` file resolves to.

    Sizing is only valid for the version that was measured: another version can be slower or bigger.
    """
    from services.registry import Registry
    from stacks.config import load_stack_config, stack_file

    path = config_file if config_file is not None else stack_file(stack)
    cfg = load_stack_config(stack, path, unmeasured_ok=True)  # measuring is how an rps target gets its default
    model = next((m for m in cfg.models if m.name == entry), None)
    if model is None:
        names = ", ".join(m.name for m in cfg.models) or "none"
        raise UserError(
            f"{path.name}: model {entry!r} is not in dlstack:models (it has: {names}); add an entry for it "
            "first, or pass --model NAME to size an existing entry"
        )
    try:
        mv = Registry.for_stack(cfg.registry, flag=registry).resolve(model.model)
    except UserError as exc:
        raise UserError(f"{path.name}: {entry}: {exc.message}") from exc
    runs = mv.ref if model.model == mv.ref else f"{mv.ref} ({model.model})"
    fix = (
        f"measure that version: `dlstack models export {mv.ref} DIR`, then rerun with DIR "
        f"(or pass {mv.ref} as ARTIFACT)"
    )
    if (spec.name, spec.version) != (mv.name, mv.version):
        raise UserError(
            f"{artifact} is {spec.name}:{spec.version}, but {path.name} runs {runs} for {entry}; "
            f"its sizing would come from another version; {fix}"
        )
    if spec.sha256 != mv.sha256:
        raise UserError(
            f"{artifact} says {spec.name}:{spec.version}, but its files are not the registry's {mv.ref} "
            f"(model sha256 {spec.sha256[:12]} != {mv.sha256[:12]}), which {path.name} runs for {entry}; {fix}"
        )


# --- CLI ---------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "capacity",
        help="measure one replica under load and recommend replicas, HPA target and resources",
        description=(
            "Start the model server for ARTIFACT, load it at rising concurrency until p99 exceeds "
            "--p99-ms (within --duration-s), and size the Deployment for --target-rps with --headroom "
            "spare capacity."
        ),
    )
    p.add_argument(
        "artifact",
        metavar="ARTIFACT",
        help="artifact directory (`dlstack package`, `dlstack models export`) or registry reference NAME:VERSION",
    )
    p.add_argument("--target-rps", type=float, required=True, help="requests/s the model must serve")
    p.add_argument("--p99-ms", type=float, required=True, help="p99 latency objective in milliseconds")
    p.add_argument("--cpu", type=float, default=1.0, help="CPU limit of one replica in cores (default 1)")
    p.add_argument("--duration-s", type=float, default=120.0, help="load-ramp budget in seconds (default 120)")
    p.add_argument("--headroom", type=float, default=HEADROOM, help="spare capacity share (default 0.3 = 30%%)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto", help="default: wrk if installed")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="write a PNG of p99 latency against throughput (a new file, or a previous plot: replaced)",
    )
    p.add_argument(
        "--write-config",
        metavar="ENV",
        help="write the sizing into Pulumi.ENV.yaml (refused unless ARTIFACT is the version ENV runs)",
    )
    p.add_argument("--config-file", type=Path, metavar="PATH", help="stack file to write (default Pulumi.ENV.yaml)")
    p.add_argument("--model", metavar="NAME", help="model entry to size (default: the name in model.yaml)")
    p.add_argument(
        "--registry",
        help="registry: a directory or s3://BUCKET/PREFIX (default $DLSTACK_REGISTRY, the stack's dlstack:registry, "
        "else .registry)",
    )
    p.add_argument("--report", type=Path, metavar="PATH", help="also write measurement + recommendation as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from services.serving.artifact import load_spec

    check_flags(p99_ms=args.p99_ms, cpu=args.cpu, duration_s=args.duration_s, target_rps=args.target_rps)
    if args.plot:
        check_plot(args.plot)
    if args.report:
        outdir.check_file(args.report, **_REPORT)
    artifact = resolve_artifact(args.artifact, args.registry)
    spec = load_spec(artifact)
    entry = args.model or spec.name
    if args.write_config:
        # Before the load test: a refusal after minutes of measuring would waste them.
        check_runs(args.artifact, spec, args.write_config, entry, args.config_file, args.registry)
    print(
        f"dlstack capacity: {args.artifact} ({spec.name}:{spec.version}) with CPU {cpu_quantity(args.cpu)}, "
        f"p99 objective {args.p99_ms:g} ms, load budget {args.duration_s:g} s"
    )
    print(f"{'concurrency':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu cores':>9}")
    m = measure(
        artifact,
        args.p99_ms,
        cpu=args.cpu,
        duration_s=args.duration_s,
        loadgen=args.loadgen,
        log=lambda line: print(line, flush=True),
    )
    print(f"stopped: {m.stop_reason} (load generator: {m.loadgen})")
    if m.budget_spent:
        print(
            f"  note: the ramp stopped on its {m.budget_s:g} s budget before p99 broke the objective, so one "
            "replica may sustain more than measured and the sizing may ask for more replicas than needed; raise "
            "--duration-s to ramp further"
        )
    if args.plot:
        print(f"plot: {plot(m, args.plot)}")
    rec = recommend(m, args.target_rps, args.headroom)
    best = m.best
    print(
        f"max sustainable: {m.max_rps:.1f} req/s at concurrency {best.concurrency} "
        f"(p99 {best.p99_ms:.1f} ms, {best.cpu_cores:.2f} cores used)"
    )
    print(f"per-replica capacity at CPU {rec.cpu}: {rec.per_replica_rps:.1f} req/s")
    print(f"recommendation for {rec.target_rps:g} req/s with {rec.headroom:.0%} headroom:")
    print(
        f"  replicas: min {rec.replicas_min}, max {rec.replicas_max}  "
        f"(ceil({rec.target_rps:g} x {1 + rec.headroom:g} / {rec.per_replica_rps:.1f}) = {rec.replicas_min})"
    )
    print(f"  HPA target CPU: {rec.target_cpu_percent}%")
    if best.cpu_cores < 0.5 * m.cpu:
        print(
            f"  note: at its best the server used {best.cpu_cores:.2f} of {m.cpu:g} cores: something else bounds "
            "it (batching wait, a busy machine, I/O), so CPU is a weak autoscaling signal for it"
        )
    print(f"  resources: cpu {rec.cpu}, memory {rec.memory} (peak PSS {m.peak_pss_bytes / MI:.0f} Mi + 25%)")
    if args.report:
        outdir.replace_file(args.report, (json.dumps(report(m, rec), indent=2) + "\n").encode(), **_REPORT)
    if args.write_config:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        path = write_config(args.write_config, entry, rec, args.config_file, measured=today)
        print(
            f"wrote {path}: model {entry} ({spec.name}:{spec.version}): replicas, resources and capacity "
            f"({float(f'{rec.per_replica_rps:.4g}'):g} req/s per replica, the default target of autoscaling on rps)"
        )
    return 0
