"""``dlstack capacity``: measure what one replica sustains under a p99 objective, then size the Deployment.

Measure: start the real model server for an artifact with ``DLSTACK_CPU_LIMIT=C`` (so workers and
threads are laid out as in a pod with that CPU limit), pin it to ceil(C) cores when the machine has
more, and load it at rising concurrency (1, 2, 4, ...) until p99 exceeds the objective, requests
fail, or throughput stops rising (two steps in a row under +5 %). The load generator is wrk (Lua POST script) when
installed, else a Python thread pool.

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

from services.atomic import atomic_write
from services.errors import UserError

WRK = "/usr/bin/wrk"
HEADROOM = 0.3
MEMORY_MARGIN = 0.25
MAX_CONCURRENCY = 64
PLATEAU_GAIN = 1.05  # a step must beat the best req/s so far by 5 % to count as "still rising"
PLATEAU_STEPS = 2  # stop after this many steps in a row that do not rise
MI = 1 << 20


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

LoadFn = Callable[[int, float], tuple[int, int, float, float, float]]


def wrk_load(url: str, body_path: Path, cores: set[int] | None) -> LoadFn:
    script = body_path.with_suffix(".lua")
    script.write_text(_WRK_SCRIPT.format(body=body_path))

    def run(concurrency: int, seconds: float) -> tuple[int, int, float, float, float]:
        threads = max(1, min(concurrency, len(cores) if cores else 2))
        argv = [WRK, "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s"]
        argv += ["--timeout", "10s", "-s", str(script), url]
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        line = next((x for x in res.stdout.splitlines() if x.startswith("DLSTACK ")), None)
        if res.returncode != 0 or line is None:
            raise UserError(f"wrk failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
        r = json.loads(line[len("DLSTACK ") :])
        return r["requests"], r["errors"], r["duration_us"] / 1e6, r["p50_us"] / 1e3, r["p99_us"] / 1e3

    return run


def python_load(url: str, body: bytes) -> LoadFn:
    import numpy as np
    import requests

    def run(concurrency: int, seconds: float) -> tuple[int, int, float, float, float]:
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def worker() -> None:
            with requests.Session() as s:
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        ok = s.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10).ok
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


# --- measure -----------------------------------------------------------------------------------------


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
    from services.artifact import load_spec

    if p99_ms <= 0:
        raise UserError(f"--p99-ms must be > 0, got {p99_ms:g}")
    if cpu <= 0:
        raise UserError(f"--cpu must be > 0 cores, got {cpu:g}")
    if duration_s < 3:
        raise UserError(f"--duration-s must be >= 3 seconds, got {duration_s:g}")
    spec = load_spec(artifact_dir)
    body = request_body(spec)
    use_wrk = loadgen == "wrk" or (loadgen == "auto" and shutil.which(WRK) is not None)
    if loadgen == "wrk" and shutil.which(WRK) is None:
        raise UserError(f"--loadgen wrk: {WRK} is not installed (apt-get install wrk), or use --loadgen python")
    levels = []
    c = 1
    while c <= MAX_CONCURRENCY:
        levels.append(c)
        c *= 2
    step_s = max(1.0, duration_s / len(levels))
    server_cores, load_cores = _split_cpus(cpu)
    server = Server(artifact_dir, cpu, server_cores)
    steps: list[Step] = []
    peak = 0
    reason = f"reached concurrency {MAX_CONCURRENCY}"
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
            deadline = time.monotonic() + duration_s
            best, flat = 0.0, 0
            for conc in levels:
                left = deadline - time.monotonic()
                if left < 1.0:
                    reason = f"the {duration_s:g} s load budget is spent"
                    break
                cpu0, t0 = server.cpu_seconds(), time.monotonic()
                n, errors, elapsed, p50, p99 = run(conc, min(step_s, left))
                cores = (server.cpu_seconds() - cpu0) / max(time.monotonic() - t0, 1e-6)
                peak = max(peak, server.pss_bytes())
                step = Step(conc, n, errors, elapsed, n / elapsed if elapsed else 0.0, p50, p99, cores)
                steps.append(step)
                log(f"{conc:>11} {step.rps:>9.1f} {p50:>8.1f} {p99:>8.1f} {errors:>7} {cores:>9.2f}")
                if errors:
                    reason = f"{errors} failed requests at concurrency {conc}"
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
        finally:
            server.stop()
    if not steps:
        raise UserError(f"no load step completed within --duration-s {duration_s:g}; raise it")
    return Measurement(
        model=spec.name,
        version=spec.version,
        cpu=cpu,
        p99_limit_ms=p99_ms,
        loadgen="wrk" if use_wrk else "python",
        steps=tuple(steps),
        peak_pss_bytes=peak,
        stop_reason=reason,
    )


# --- outputs -----------------------------------------------------------------------------------------


def plot(m: Measurement, path: Path) -> Path:
    """PNG of p99 latency against throughput, one point per concurrency, with the objective as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    rps = [s.rps for s in m.steps]
    p99 = [s.p99_ms for s in m.steps]
    ax.plot(rps, p99, "o-", color="tab:blue", label="p99 latency (one replica)")
    for s in m.steps:
        ax.annotate(f"c={s.concurrency}", (s.rps, s.p99_ms), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(m.p99_limit_ms, color="tab:red", linestyle="--", label=f"p99 objective {m.p99_limit_ms:g} ms")
    try:
        best = m.best
        ax.axvline(best.rps, color="tab:green", linestyle=":", label=f"max sustainable {best.rps:.0f} req/s")
    except UserError:
        pass
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"{m.model} v{m.version}: one replica, CPU {cpu_quantity(m.cpu)} ({m.loadgen})")
    ax.set_xlim(left=0, right=max(rps) * 1.15 if rps else None)
    ax.set_ylim(bottom=0, top=max([*p99, m.p99_limit_ms]) * 1.2)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write(path, buf.getvalue())


def write_config(stack: str, model: str, rec: Recommendation, path: Path | None = None) -> Path:
    """Write the sizing into ``Pulumi.<stack>.yaml``'s model entry, keeping comments; atomic and validated."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from stacks.config import load_stack_config, stack_file

    path = path if path is not None else stack_file(stack)
    if not path.is_file():
        raise UserError(f"{path}: no such stack file; create it or pick an existing stack with --write-config")
    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    doc = y.load(path.read_text())
    models = (doc or {}).get("config", {}).get("dlstack:models") or []
    entry = next((e for e in models if isinstance(e, dict) and e.get("name") == model), None)
    if entry is None:
        names = ", ".join(str(e.get("name")) for e in models if isinstance(e, dict)) or "none"
        raise UserError(
            f"{path.name}: model {model!r} is not in dlstack:models (it has: {names}); add an entry for it "
            "first, or pass --model NAME to size an existing entry"
        )
    for key, values in (
        ("replicas", {"min": rec.replicas_min, "max": rec.replicas_max, "target_cpu_percent": rec.target_cpu_percent}),
        ("resources", {"cpu": rec.cpu, "memory": rec.memory}),
    ):
        if not isinstance(entry.get(key), dict):
            entry[key] = CommentedMap()
            entry[key].fa.set_flow_style()
        entry[key].update(values)
    buf = io.StringIO()
    y.dump(doc, buf)
    try:
        # Validate before replacing: a config the schema rejects must never land.
        atomic_write(path, buf.getvalue(), validate=lambda tmp: load_stack_config(stack, tmp))
    except UserError as exc:
        raise UserError(f"{path.name}: not changed, the new sizing does not validate: {exc.message}") from exc
    return path


def report(m: Measurement, rec: Recommendation) -> dict[str, Any]:
    return {
        "measurement": {**asdict(m), "max_rps": m.max_rps, "per_replica_rps": m.per_replica_rps},
        "recommendation": asdict(rec),
    }


# --- CLI ---------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "capacity",
        help="measure one replica under load and recommend replicas, HPA target and resources",
        description=(
            "Start the model server for ARTIFACT_DIR, load it at rising concurrency until p99 exceeds "
            "--p99-ms, and size the Deployment for --target-rps with --headroom spare capacity."
        ),
    )
    p.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    p.add_argument("--target-rps", type=float, required=True, help="requests/s the model must serve")
    p.add_argument("--p99-ms", type=float, required=True, help="p99 latency objective in milliseconds")
    p.add_argument("--cpu", type=float, default=1.0, help="CPU limit of one replica in cores (default 1)")
    p.add_argument("--duration-s", type=float, default=120.0, help="load-test budget in seconds (default 120)")
    p.add_argument("--headroom", type=float, default=HEADROOM, help="spare capacity share (default 0.3 = 30%%)")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto", help="default: wrk if installed")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of p99 latency against throughput")
    p.add_argument("--write-config", metavar="ENV", help="write the sizing into Pulumi.ENV.yaml")
    p.add_argument("--config-file", type=Path, metavar="PATH", help="stack file to write (default Pulumi.ENV.yaml)")
    p.add_argument("--model", metavar="NAME", help="model entry to size (default: the name in model.yaml)")
    p.add_argument("--report", type=Path, metavar="PATH", help="also write measurement + recommendation as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    if not args.artifact_dir.is_dir():
        raise UserError(f"{args.artifact_dir}: not a directory; pass an artifact made by `dlstack package`")
    if args.target_rps <= 0:
        raise UserError(f"--target-rps must be > 0, got {args.target_rps:g}")
    print(f"dlstack capacity: {args.artifact_dir} with CPU {cpu_quantity(args.cpu)}, p99 objective {args.p99_ms:g} ms")
    print(f"{'concurrency':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu cores':>9}")
    m = measure(
        args.artifact_dir,
        args.p99_ms,
        cpu=args.cpu,
        duration_s=args.duration_s,
        loadgen=args.loadgen,
        log=lambda line: print(line, flush=True),
    )
    print(f"stopped: {m.stop_reason} (load generator: {m.loadgen})")
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
        args.report.write_text(json.dumps(report(m, rec), indent=2) + "\n")
    if args.write_config:
        path = write_config(args.write_config, args.model or m.model, rec, args.config_file)
        print(f"wrote {path}: model {args.model or m.model}: replicas and resources")
    return 0
