"""Server benchmark: dlstack vs the naive Flask+Gunicorn baseline, a transport floor and uvicorn's worker.

    python -m tests.bench.server_bench [--duration 15] [--quick] [--json out.json] [--check]

One run builds the two reference TorchScript models (MLP 784-512-512-10, CNN on 3x64x64) packaged
with defaults (model.yaml ``serving`` unset, so batching is automatic), measures them in-process,
then starts `dlstack serve` (2 workers) and the naive baseline (tests/bench/naive_server.py, 2 sync
workers, 1 torch thread each) and, for the MLP, dlstack with batching off (DLSTACK_MAX_BATCH_SIZE=1),
the transport floor (tests/bench/floor_server.py: HTTP and decoding, no model) and dlstack's ASGI
front end on uvicorn's gunicorn worker. wrk (2 threads, one-row bodies, --latency) drives them at 8
and 32 connections in alternating rounds; the MLP is measured once more while 200 stalled
connections are held on it (tests/bench/hostile_load.py), and both workers get the hostile probes.
Issue 13's observers are measured on the MLP registered with a drift reference (``reference.json`` built
by services.registry.reference from 1,000 random rows, the way ``dlstack models register --reference-data``
builds it): the same artifact with the observers off (twice: the second is the noise control), with the
prediction log at 1 % and drift bins at 0.1 (the stack's documented example rate) under the server's
default row cap (``drift_max_rows_per_s``, 20 rows/s per server), and with the log at 100 % plus the same
drift, at c=32 in a phase of their own. A few-percent target needs it: on this shared
2-CPU machine, req/s measured a few seconds apart varies by up to 10 %, and two identical server
instances differ by up to 8 % in CPU per request for as long as they live. So the phase runs
``--observer-blocks`` blocks, each on fresh instances of the four servers, started together; each block
has four 1 s rounds, one server after the other in a Williams order (each takes every position once and
follows every other once). Each observer server's req/s is divided by the mean of the two "off" servers'
of the same round, and the target is the median of those paired ratios over all blocks. Beside it, a
bootstrap interval over blocks and the noise control's median show how finely the run resolves. The servers' stdout (the
prediction log) goes to a file, as a container runtime's log driver takes it, and the written/dropped/binned
counters are read back from /metrics.
It prints a markdown table with PASS/FAIL per target, the probe table and the worker choice. wrk
shares the CPUs with the servers, so compare ratios within one run, never absolute numbers across
machines. ``--quick``: 3 s points and the fast probes only (no slowloris, long line or pipelining).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests

from services.serving.server.settings import ServerSettings
from tests.bench import floor_server, harness, hostile_load, wrk
from tests.bench.models import build_model


@dataclass(frozen=True)
class Point:
    server: str  # dlstack | dlstack-nobatch | naive
    model: str  # mnist-mlp | tiny-cnn
    encoding: str  # json | binary
    connections: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    passed: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_process(artifact: Path, batch: int, seconds: float) -> float:
    """Samples/s of the dlstack runtime itself, one intra-op thread, no HTTP."""
    from services.serving.artifact import load_spec
    from services.serving.runtimes import create_runtime

    spec = load_spec(artifact)
    rt = create_runtime(spec, artifact, threads=1)
    rt.load()
    inp = spec.signature.inputs[0]
    x = np.random.default_rng(0).random((batch, *inp.shape[1:]), dtype=np.float32)
    for _ in range(20):
        rt.predict({inp.name: x})
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        rt.predict({inp.name: x})
        n += 1
    return n * batch / elapsed


def _sample(artifact: Path) -> tuple[str, str, np.ndarray]:
    from services.serving.artifact import read_spec

    spec = read_spec(artifact)
    inp, out = spec.signature.inputs[0], spec.signature.outputs[0]
    x = np.round(np.random.default_rng(1).random((1, *inp.shape[1:]), dtype=np.float32), 4)
    return inp.name, out.name, x


def check_correct(server: harness.Server, model: str, artifact: Path, expected: np.ndarray) -> None:
    """One real request per encoding before any load: a fast wrong answer is not a result."""
    in_name, out_name, x = _sample(artifact)
    body, headers = harness.json_body(in_name, x)
    got = harness.json_output(requests.post(server.infer_url(model), data=body, headers=headers, timeout=30), out_name)
    if not np.allclose(got, expected, atol=1e-4):
        raise AssertionError(f"{server.name} answered {got} for {model}, expected {expected}")
    if server.name.startswith("dlstack"):
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        inp = httpclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got_bin = client.infer(model, [inp]).as_numpy(out_name)
        if got_bin is None or not np.allclose(got_bin, expected, atol=1e-4):
            raise AssertionError(f"{server.name} answered {got_bin} over the binary extension, expected {expected}")


@contextmanager
def serving(name: str, cmd: Callable[[int], list[str]], workdir: Path, env: dict[str, str]) -> Iterator[harness.Server]:
    port = _free_port()
    server = harness.start(name, cmd(port), port, workdir / f"{name}-{port}.log", env=env)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serving_all(
    specs: dict[str, tuple[Callable[[int], list[str]], dict[str, str]]], workdir: Path
) -> Iterator[dict[str, harness.Server]]:
    """``serving`` for several servers, started and stopped together (in parallel, a block's four cold starts
    take about as long as two); all that started are stopped on exit, also when another failed to start."""
    ports = {label: _free_port() for label in specs}
    up: dict[str, harness.Server] = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {
            label: pool.submit(
                harness.start, label, cmd(ports[label]), ports[label], workdir / f"{label}-{ports[label]}.log", env
            )
            for label, (cmd, env) in specs.items()
        }
        try:
            failed: list[BaseException] = []
            for label, future in futures.items():
                if (exc := future.exception()) is not None:
                    failed.append(exc)
                else:
                    up[label] = future.result()
            if failed:
                raise failed[0]
            yield up
        finally:
            list(pool.map(harness.Server.stop, up.values()))


@contextmanager
def stalled_connections(server: harness.Server, conns: int, workdir: Path) -> Iterator[dict[str, int]]:
    """``conns`` stalled connections (tests/bench/hostile_load.py) held on ``server`` for the ``with`` body.

    The dict it yields is filled, on exit, with what the helper saw; ``held`` < ``conns`` there means the
    load was not held for the whole measurement.
    """
    summary: dict[str, int] = {}
    out = workdir / f"stalled-{server.port}.json"
    with out.open("wb") as f:
        proc = subprocess.Popen(hostile_load.stalled_cmd(server.port, conns), stdout=f, stderr=subprocess.STDOUT,
                                cwd=harness.ROOT, env={**os.environ, "PYTHONPATH": str(harness.ROOT)})  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while _established(server.port, proc.pid) < conns:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stalled-connection helper did not open {conns} connections: {out.read_text()}")
            time.sleep(0.05)
        yield summary
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        text = out.read_text().strip()
        if text:
            summary.update(json.loads(text.splitlines()[-1]))


def _established(port: int, pid: int) -> int:
    """TCP connections of process ``pid`` to ``port`` that are established."""
    try:
        conns = psutil.Process(pid).connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def mean_batch(server: harness.Server) -> float | None:
    """Mean rows per forward pass so far, from the server's own dlstack_batch_size histogram."""
    try:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
    except requests.RequestException:
        return None
    total = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for k in total:
            if line.startswith(f"dlstack_batch_size_{k}{{"):
                total[k] += float(line.rsplit(" ", 1)[1])
    return total["sum"] / total["count"] if total["count"] else None


def check_floor(server: harness.Server, artifact: Path) -> None:
    """The floor decodes what dlstack decodes: both encodings answer 200, a wrong shape 400."""
    in_name, _, x = _sample(artifact)
    for body, headers in (harness.json_body(in_name, x), harness.binary_body(in_name, x)):
        r = requests.post(server.infer_url("floor"), data=body, headers=headers, timeout=30)
        if r.status_code != 200:
            raise AssertionError(f"floor answered {r.status_code} {r.text[:200]} to a valid request")
    body, headers = harness.json_body(in_name, np.zeros((1, 3), dtype=np.float32))
    r = requests.post(server.infer_url("floor"), data=body, headers=headers, timeout=30)
    if r.status_code != 400:
        raise AssertionError(f"floor answered {r.status_code} to a wrongly shaped input, expected 400")


@dataclass
class Run:
    """One measured series: a server driven with one body encoding, at some connection counts."""

    label: str  # the point's server label
    server: harness.Server
    artifact: Path
    encoding: str = "json"
    max_conns_only: bool = False  # only measured at the largest connection count
    stalled: int = 0  # stalled connections held open on the server while this run's rounds are measured


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = 3.0 if args.quick else args.duration
    round_s = max(1.0, duration / args.rounds)
    conns = args.connections
    c_max = max(conns)
    workdir = Path(args.workdir)  # main() makes it (bench_workdir)
    log = print if not args.json_only else (lambda *a, **k: None)
    rounds: dict[tuple[str, str, str, int], list[wrk.WrkResult]] = {}
    memory: dict[str, int] = {}
    cold: dict[str, float] = {}
    inproc: dict[str, float] = {}
    expected: dict[str, np.ndarray] = {}
    batches: dict[str, float] = {}
    stalled: list[dict[str, int]] = []
    probes: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    base_env = {"PYTHONPATH": str(harness.ROOT), "OMP_NUM_THREADS": "1"}
    dl_env = {**base_env, **({"DLSTACK_MAX_BATCH_SIZE": str(args.max_batch_size)} if args.max_batch_size else {})}
    uvicorn_missing = harness.uvicorn_available()
    if uvicorn_missing:
        notes.append(f"uvicorn worker not measured: {uvicorn_missing}")

    # Packaged with defaults: model.yaml leaves serving.max_batch_size unset (auto).
    artifacts = {m: build_model(m, workdir / "models" / m) for m in args.models}
    observed: dict[str, dict[str, float]] = {}
    ref_artifact = artifacts.get("mnist-mlp")  # replaced by its copy with a drift reference below
    # torch runs in a child process: mapped into this process, it would share (and so shrink) the servers' PSS.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        if "mnist-mlp" in artifacts:
            ref_artifact = pool.submit(
                with_drift_reference, artifacts["mnist-mlp"], workdir / "models" / "mnist-mlp-ref"
            ).result()
        for model, art in artifacts.items():
            expected[model] = pool.submit(_reference, art, _sample(art)[2]).result()
            for b in (1, 32) if model == "mnist-mlp" else (1,):
                inproc[f"{model} batch {b}"] = pool.submit(in_process, art, b, min(duration, 3.0)).result()
                log(f"in-process {model} batch {b}: {inproc[f'{model} batch {b}']:,.0f} samples/s", file=sys.stderr)

    def drive(server: harness.Server, model: str, encoding: str, c: int, art: Path, seconds: float) -> wrk.WrkResult:
        in_name, _, x = _sample(art)
        body, headers = harness.json_body(in_name, x) if encoding == "json" else harness.binary_body(in_name, x)
        return wrk.run(server.infer_url(model), body, headers, connections=c, duration_s=seconds)[0]

    Spec = tuple[str, Callable[[int], list[str]], dict[str, str]]

    def servers(model: str, art: Path) -> list[Spec]:
        out: list[Spec] = [
            ("naive", harness.naive_cmd, {**base_env, "NAIVE_MODEL_DIR": str(art)}),
            ("dlstack", partial(harness.dlstack_cmd, art), dl_env),
        ]
        if model == "mnist-mlp":
            out.append(
                ("dlstack-nobatch", partial(harness.dlstack_cmd, art), {**base_env, "DLSTACK_MAX_BATCH_SIZE": "1"})
            )
            shape = tuple(_input_shape(art))
            out.append(("floor", lambda port: floor_server.cmd(args.floor, port, shape), base_env))
            if not uvicorn_missing:
                out.append(
                    ("dlstack-uvicorn", partial(harness.uvicorn_cmd, art), {**dl_env, **harness.uvicorn_env(art)})
                )
        return out

    # Phase 1, each server alone: cold start, then PSS after a short warm-up load (nothing else maps torch).
    for model, art in artifacts.items():
        for name, cmd, env in servers(model, art)[:2]:
            with serving(name, cmd, workdir, env) as srv:
                cold[f"{name} {model}"] = srv.cold_start_s
                check_correct(srv, model, art, expected[model])
                drive(srv, model, "json", c_max, art, 2.0)
                memory[f"{name} {model}"] = srv.pss_bytes()
            log(f"{name:16} {model:10} cold start {cold[f'{name} {model}']:.2f} s, "
                f"PSS {memory[f'{name} {model}'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip

    # Phase 2, all servers of a model up at once, driven in alternating short rounds, so background load
    # drifts (the machine is shared) hit every server alike.
    for model, art in artifacts.items():
        with ExitStack() as stack:
            runs: list[Run] = []
            up: dict[str, harness.Server] = {}
            for name, cmd, env in servers(model, art):
                srv = up[name] = stack.enter_context(serving(name, cmd, workdir, env))
                if name == "floor":
                    check_floor(srv, art)
                else:
                    check_correct(srv, model, art, expected[model])
                drive(srv, model, "json", c_max, art, 1.0)  # warm-up, not recorded
                if name in ("dlstack", "floor") and model == "mnist-mlp":
                    runs += [Run(name, srv, art, "json"), Run(name, srv, art, "binary")]
                else:
                    runs.append(Run(name, srv, art, "json", max_conns_only=name not in ("dlstack", "naive")))
                if name == "dlstack" and model == "mnist-mlp" and args.stalled:
                    # The same server, measured again while it holds the stalled connections.
                    runs.append(Run(f"dlstack+{args.stalled} stalled", srv, art, "json", True, args.stalled))
            for c in conns:
                for _ in range(args.rounds):
                    for r in runs:
                        if r.max_conns_only and c != c_max:
                            continue
                        if r.stalled:
                            with stalled_connections(r.server, r.stalled, workdir) as seen:
                                res = drive(r.server, model, r.encoding, c, r.artifact, round_s)
                            stalled.append(seen)
                            if seen.get("held", 0) < r.stalled:
                                raise RuntimeError(f"stalled connections not held for the whole round: {seen}")
                        else:
                            res = drive(r.server, model, r.encoding, c, r.artifact, round_s)
                        rounds.setdefault((r.label, model, r.encoding, c), []).append(res)
                for r in runs:
                    if (key := (r.label, model, r.encoding, c)) in rounds:
                        pt = aggregate(key, rounds[key])
                        line = f"{pt.server:20} {model:10} {r.encoding:6} c={c:<3} {pt.rps:9,.0f} req/s"
                        log(f"{line} p50 {pt.p50_ms:.2f} ms p99 {pt.p99_ms:.2f} ms errors {pt.errors}", file=sys.stderr)
            for name, srv in up.items():
                if name.startswith("dlstack") and (rows := mean_batch(srv)) is not None:
                    batches[f"{name} {model}"] = rows
            if model == "mnist-mlp":
                # Robustness of the two workers, after the load so the probes cannot disturb a measurement.
                only = QUICK_PROBES if args.quick else hostile_load.PROBES
                for name in ("dlstack", "dlstack-uvicorn"):
                    if name in up:
                        srv = up[name]
                        found = hostile_load.probe_all(
                            "127.0.0.1", srv.port, partial(_pids, srv), "/v2/health/ready", only
                        )
                        probes[name] = [asdict(p) for p in found]
                        for p in found:
                            log(
                                f"probe {name:16} {p.name:40} {'pass' if p.passed else 'FAIL'}: {p.detail}",
                                file=sys.stderr,
                            )

    # Phase 3, issue 13's observers: the same artifact with and without them, in short paired rounds, on fresh
    # server instances per block (identical instances differ in CPU per request, for their lifetime).
    paired: dict[str, list[list[float]]] = {}
    if ref_artifact is not None and "mnist-mlp" in artifacts:
        blocks, obs_s = (1, 1.0) if args.quick else (args.observer_blocks, OBSERVER_ROUND_S)
        for b in range(blocks):
            block = observer_block(b, ref_artifact, expected["mnist-mlp"], workdir, dl_env, c_max, obs_s)
            for label, (results, counts) in block.items():
                rounds.setdefault((label, "mnist-mlp", "json", c_max), []).extend(results)
                observed[label] = {k: observed.get(label, {}).get(k, 0.0) + v for k, v in counts.items()}
            for label, ratios in paired_ratios({k: [r.rps for r in v[0]] for k, v in block.items()}).items():
                paired.setdefault(label, []).append(ratios)
            log(f"observer block {b + 1}/{blocks}, median paired ratios so far: "
                + ", ".join(f"{k} {median(pooled(v)):.3f}" for k, v in paired.items()), file=sys.stderr)  # fmt: skip

    points = [aggregate(k, v) for k, v in rounds.items()]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_at_end": os.getloadavg()[0]},
        "settings": {"duration_s": duration, "rounds": args.rounds, "connections": conns, "wrk_threads": 2,
                     "workers": 2, "max_batch_size": args.max_batch_size or "model.yaml default (auto)",
                     "floor": args.floor, "stalled_connections": args.stalled,
                     "note": "wrk runs on the same CPUs as the servers"},
        "points": [asdict(p) for p in points],
        "memory_pss_bytes": memory,
        "cold_start_s": cold,
        "in_process_samples_per_s": inproc,
        "mean_batch_rows": batches,
        "stalled_helper": stalled,
        "probes": probes,
        "observers": observed,
        "observer_paired_ratios_by_block": paired,
        "notes": notes,
    }  # fmt: skip
    result["targets"] = [asdict(t) for t in targets(points, memory, cold, c_max, args.stalled, observed, paired)]
    result["worker_choice"] = worker_choice(points, probes, c_max)
    return result


# Issue 13's observers, each a server of the MLP registered with a drift reference (label -> env). The first
# is what the others are compared with; the second, identical to it, measures the comparison's own noise.
# Drift runs under the server's default row cap, as a stack that sets only `drift: {sample: 0.1}` does.
DRIFT_ROW_CAP: float = ServerSettings.model_fields["drift_max_rows_per_s"].default
OBSERVER_SERVERS: dict[str, dict[str, str]] = {
    "dlstack-ref observers off": {"DLSTACK_PREDICTION_LOG_SAMPLE": "0", "DLSTACK_DRIFT_SAMPLE": "0"},
    "dlstack-ref observers off, again": {"DLSTACK_PREDICTION_LOG_SAMPLE": "0", "DLSTACK_DRIFT_SAMPLE": "0"},
    "dlstack-ref log 1% drift 0.1": {"DLSTACK_PREDICTION_LOG_SAMPLE": "0.01", "DLSTACK_DRIFT_SAMPLE": "0.1"},
    "dlstack-ref log 100% drift 0.1": {"DLSTACK_PREDICTION_LOG_SAMPLE": "1", "DLSTACK_DRIFT_SAMPLE": "0.1"},
}
REFERENCE_ROWS = 1000  # rows of the bench model's drift reference
# Blocks of the observer phase (--observer-blocks), each on fresh servers, ~30 s each. At 6, the noise control's
# median ranged 0.98-1.02x across runs, as wide as the 1 % target's whole margin; at 12, the 1 % server's
# 0.959-0.973x in three runs of the same code. Instance noise shrinks with the number of blocks.
OBSERVER_BLOCKS = 30
OBSERVER_ROUND_S = 1.0  # s per server per round: short, so background load drifts little within a round
OFF, AGAIN = list(OBSERVER_SERVERS)[:2]
CI_LEVEL = 0.9  # the confidence level of the interval shown beside each paired median


def observer_block(
    b: int, artifact: Path, expected: np.ndarray, workdir: Path, env: dict[str, str], c: int, round_s: float
) -> dict[str, tuple[list[wrk.WrkResult], dict[str, float]]]:
    """One block of the observer phase on fresh instances of every OBSERVER_SERVERS server, started together:
    per server, its req/s in each of the block's rounds (a Williams order) and its observer counters."""
    labels = list(OBSERVER_SERVERS)
    in_name, _, x = _sample(artifact)
    body, headers = harness.json_body(in_name, x)
    specs = {label: (partial(harness.dlstack_cmd, artifact), {**env, **OBSERVER_SERVERS[label]})
             for label in balanced_orders(labels, b + 1)[b]}  # fmt: skip
    with serving_all(specs, workdir) as up:
        for srv in up.values():
            check_correct(srv, "mnist-mlp", artifact, expected)
            wrk.run(srv.infer_url("mnist-mlp"), body, headers, connections=c, duration_s=1.0)  # warm-up
        results: dict[str, list[wrk.WrkResult]] = {label: [] for label in labels}
        for order in balanced_orders(labels, len(labels)):
            for label in order:
                got = wrk.run(up[label].infer_url("mnist-mlp"), body, headers, connections=c, duration_s=round_s)
                results[label].append(got[0])
        with ThreadPoolExecutor(len(labels)) as pool:  # each waits for its counters to settle
            counts = dict(zip(labels, pool.map(observer_counts, [up[label] for label in labels]), strict=True))
        return {label: (results[label], counts[label]) for label in labels}


def paired_ratios(rps: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round of a block (req/s per server): the noise control over "off", and each observer server over
    the mean of the two identical "off" servers, in whose mean their instance noise is halved."""
    off, again = rps[OFF], rps[AGAIN]
    reference = [(o + a) / 2 for o, a in zip(off, again, strict=True)]
    out = {AGAIN: [a / o if o else 0.0 for a, o in zip(again, off, strict=True)]}
    for label, values in rps.items():
        if label not in (OFF, AGAIN):
            out[label] = [v / r if r else 0.0 for v, r in zip(values, reference, strict=True)]
    return out


def pooled(blocks: list[list[float]]) -> list[float]:
    return [r for block in blocks for r in block]


def block_interval(blocks: list[list[float]], level: float = CI_LEVEL, draws: int = 2000) -> tuple[float, float]:
    """A percentile bootstrap interval of the pooled median, resampling whole blocks: a block's rounds share
    its server instances, so the blocks, not the rounds, are the independent samples. Seeded: one run's
    table is reproducible from its ratios."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(blocks), size=(draws, len(blocks)))
    medians = [median(pooled([blocks[i] for i in row])) for row in picks]
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def balanced_orders(labels: list[str], rounds: int) -> list[list[str]]:
    """The order of ``labels`` in each round, cycling through a Williams design: over each ``len(labels)``
    rounds (an even count) every server takes every position once and follows every other server once, so a
    background drift cannot favour the server always measured first, last or after the same one."""
    n = len(labels)
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    return [[labels[(j + i) % n] for j in first] for i in range(rounds)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def with_drift_reference(artifact: Path, out: Path) -> Path:
    """A copy of ``artifact`` registered with a drift reference of random rows, by the registry's own code."""
    from services.registry.reference import with_reference
    from services.serving.artifact import read_spec, verify_files

    spec = read_spec(artifact)
    inp = spec.signature.inputs[0]
    rows = np.random.default_rng(2).random((REFERENCE_ROWS, *inp.shape[1:]), dtype=np.float32)
    data = out.with_name(out.name + "-reference.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(data, **{inp.name: rows})  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    with_reference(artifact, data, out)
    verify_files(out, read_spec(out))  # reference.json is listed and hashed like the model
    return out


def observer_counts(server: harness.Server, settle_s: float = 10.0) -> dict[str, float]:
    """What the observers did, from the server's /metrics: 200 answers, prediction events written and dropped,
    and drift bin counts (summed over tensors, groups and bins: 16 per sampled MLP row, 8 groups a tensor).
    Waits, up to ``settle_s``, until the counts stay the same for longer than the observers' threads take to
    move what was queued when the load stopped (the drift flush period, the log writer's poll)."""
    from services.serving.server.drift import FLUSH_S

    deadline = time.monotonic() + settle_s
    last: dict[str, float] | None = None
    while True:
        counts = {
            "answered": metric_sum(server, "dlstack_requests_total", 'route="infer"', 'code="200"'),
            "log_written": metric_sum(server, "dlstack_prediction_log_written_total"),
            "log_dropped": metric_sum(server, "dlstack_prediction_log_dropped_total"),
            "drift_bin_counts": metric_sum(server, "dlstack_drift_bin_total"),
        }
        if counts == last or time.monotonic() > deadline:
            return counts
        last = counts
        time.sleep(FLUSH_S * 1.5)


def metric_sum(server: harness.Server, name: str, *having: str) -> float:
    """The sum of a metric's samples on the server's /metrics whose labels contain every string in ``having``."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(h in line for h in having):
            total += float(line.rsplit(" ", 1)[1])
    return total


QUICK_PROBES = ("repeated headers", "idle connections", "HTTP/2.0 request line", "absolute-form target")


def _pids(server: harness.Server) -> list[int]:
    try:
        root = psutil.Process(server.proc.pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _input_shape(artifact: Path) -> list[int]:
    from services.serving.artifact import read_spec

    return list(read_spec(artifact).signature.inputs[0].shape)


def aggregate(key: tuple[str, str, str, int], results: list[wrk.WrkResult]) -> Point:
    """One point from equal-length rounds: mean req/s and mean percentiles, summed counts."""
    n = len(results)
    return Point(*key, rps=sum(r.rps for r in results) / n, p50_ms=sum(r.p50_ms for r in results) / n,
                 p90_ms=sum(r.p90_ms for r in results) / n, p99_ms=sum(r.p99_ms for r in results) / n,
                 requests=sum(r.requests for r in results), errors=sum(r.errors for r in results))  # fmt: skip


def _reference(artifact: Path, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.jit.load(str(artifact / "model.pt"))(torch.from_numpy(x)).numpy()


def targets(
    points: list[Point],
    memory: dict[str, int],
    cold: dict[str, float],
    c: int,
    stalled: int,
    observed: dict[str, dict[str, float]] | None = None,
    paired: dict[str, list[list[float]]] | None = None,
) -> list[Target]:
    """The issues' targets, evaluated on the points of this run; a missing point is a FAIL. ``paired``: per
    observer server and block of the observer phase, ``paired_ratios`` of each round."""

    def pt(server: str, model: str, enc: str = "json") -> Point | None:
        return next(
            (p for p in points if (p.server, p.model, p.encoding, p.connections) == (server, model, enc, c)), None
        )

    out: list[Target] = []

    def ratio(name: str, goal: float, num: Point | None, den: Point | None, p99: str = "") -> None:
        """num/den req/s >= goal, no errors in either; with ``p99`` (den's label) also num's p99 <= den's."""
        if num is None or den is None:
            out.append(Target(name, f">= {goal}x", "not measured", False))
            return
        r = num.rps / den.rps if den.rps else 0.0
        ok = r >= goal and num.errors == 0 and den.errors == 0
        measured = f"{r:.2f}x ({num.rps:,.0f} vs {den.rps:,.0f} req/s)"
        goal_s = f">= {goal}x req/s"
        if p99:
            ok = ok and num.p99_ms <= den.p99_ms
            measured += f", p99 {num.p99_ms:.1f} vs {den.p99_ms:.1f} ms"
            goal_s += f", p99 <= {p99}"
        if num.errors or den.errors:
            measured += f", errors {num.errors}/{den.errors}"
        out.append(Target(name, goal_s, measured, ok))

    mlp = "mnist-mlp"
    ratio(f"MLP, JSON, c={c}", 1.5, pt("dlstack", mlp), pt("naive", mlp), "naive")
    ratio(f"MLP, binary tensors, c={c} (vs naive JSON)", 2.5, pt("dlstack", mlp, "binary"), pt("naive", mlp))
    ratio(f"CNN, JSON, c={c}", 1.0, pt("dlstack", "tiny-cnn"), pt("naive", "tiny-cnn"), "naive")
    ratio(f"MLP batching on (defaults) vs off, c={c}", 0.95, pt("dlstack", mlp), pt("dlstack-nobatch", mlp))
    ratio(f"MLP, JSON, c={c} vs transport floor JSON", 0.5, pt("dlstack", mlp), pt("floor", mlp))
    ratio(
        f"MLP, binary, c={c} vs transport floor binary", 0.65, pt("dlstack", mlp, "binary"), pt("floor", mlp, "binary")
    )
    ratio(f"MLP, JSON, c={c}, {stalled} stalled connections vs none", 0.9, pt(f"dlstack+{stalled} stalled", mlp),
          pt("dlstack", mlp))  # fmt: skip
    dl_mem, nv_mem = memory.get("dlstack mnist-mlp"), memory.get("naive mnist-mlp")
    if dl_mem is None or nv_mem is None:
        out.append(Target("memory (PSS, 2 workers, MLP)", "<= naive", "not measured", False))
    else:
        out.append(Target("memory (PSS, 2 workers, MLP)", "<= naive",
                          f"{dl_mem / 2**20:.0f} MiB vs {nv_mem / 2**20:.0f} MiB", dl_mem <= nv_mem))  # fmt: skip
    cs = cold.get("dlstack mnist-mlp")
    out.append(Target("cold start MLP", "<= 5 s", "not measured" if cs is None else f"{cs:.2f} s",
                      cs is not None and cs <= 5.0))  # fmt: skip
    off, again, log1, log100 = OBSERVER_SERVERS
    ratios = paired or {}
    for label, rate, goal in ((log1, "1 %", 0.97), (log100, "100 %", 0.85)):
        out.append(paired_target(f"MLP, JSON, c={c}, prediction log {rate} + {observed_drift(label)} vs off", goal,
                                 pt(label, mlp), pt(off, mlp), ratios.get(label), ratios.get(again),
                                 pt(again, mlp)))  # fmt: skip
    out.append(queue_target(pt(log100, mlp), pt(off, mlp), (observed or {}).get(log100)))
    return out


def observed_drift(label: str) -> str:
    """How the observer server ``label`` bins drift, as its target's name says it."""
    sample = float(OBSERVER_SERVERS[label]["DLSTACK_DRIFT_SAMPLE"])
    return f"drift {sample:g} (cap {DRIFT_ROW_CAP:g} rows/s)"


def paired_target(
    name: str,
    goal: float,
    on: Point | None,
    off: Point | None,
    blocks: list[list[float]] | None,
    noise: list[list[float]] | None,
    again: Point | None,
) -> Target:
    """The median of the per-round req/s ratios (pooled over blocks) >= goal, no errors; beside it, its
    bootstrap interval over blocks, the ratio of the means and the noise control (the identical "off,
    again" server's median ratio). The means compare with the same reference as the rounds: the mean of
    the two off servers."""
    ratios = pooled(blocks or [])
    if on is None or off is None or again is None or not ratios:
        return Target(name, f">= {goal}x req/s", "not measured", False)
    r = median(ratios)
    lo, hi = block_interval(blocks or [])
    ref = (off.rps + again.rps) / 2
    measured = (f"{r:.3f}x (median of {len(ratios)} paired rounds in {len(blocks or [])} blocks, "
                f"{CI_LEVEL:.0%} CI {lo:.3f}-{hi:.3f}; means {on.rps:,.0f} vs {ref:,.0f} req/s off = "
                f"{on.rps / ref if ref else 0:.3f}x; p99 {on.p99_ms:.1f} vs {off.p99_ms:.1f} ms)")  # fmt: skip
    if noise:
        measured += f"; noise control, identical servers: {median(pooled(noise)):.3f}x"
    if on.errors or off.errors:
        measured += f", errors {on.errors}/{off.errors}"
    return Target(name, f">= {goal}x req/s (median paired ratio)", measured, r >= goal and not on.errors + off.errors)


def queue_target(on: Point | None, off: Point | None, counts: dict[str, float] | None) -> Target:
    """Issue 13: no request waits on the prediction log. The queue is put_nowait, so a writer that fell behind
    shows as dropped events, never as a waiting request; the p99s are shown beside the counts."""
    name, goal = "prediction log 100 %: no request waits on the queue", "0 dropped, every answer written"
    if on is None or off is None or not counts:
        return Target(name, goal, "not measured", False)
    written, dropped, answered = counts["log_written"], counts["log_dropped"], counts["answered"]
    measured = (f"{written:,.0f} written of {answered:,.0f} answered, {dropped:,.0f} dropped; p99 {on.p99_ms:.1f} "
                f"vs {off.p99_ms:.1f} ms off")  # fmt: skip
    return Target(name, goal, measured, dropped == 0 and answered > 0 and written >= answered)


UVICORN_MAX_COST = 0.20  # issue 12: keep the library worker unless it costs more than this share of JSON req/s


def worker_choice(points: list[Point], probes: dict[str, list[dict[str, Any]]], c: int) -> dict[str, Any]:
    """Issue 12's rule: prefer uvicorn's worker (a kept library) unless it costs more than 20 % of the MLP JSON
    req/s at ``c`` connections or fails a robustness probe ours passes."""

    def pt(server: str) -> Point | None:
        return next((p for p in points if (p.server, p.model, p.encoding, p.connections) ==
                     (server, "mnist-mlp", "json", c)), None)  # fmt: skip

    ours, uv = pt("dlstack"), pt("dlstack-uvicorn")
    if ours is None or uv is None or "dlstack-uvicorn" not in probes:
        return {"choice": "EventLoopWorker", "decided": False,
                "reason": "uvicorn's worker was not measured in this run; the current worker stays"}  # fmt: skip
    passed = {name: {p["name"] for p in found if p["passed"]} for name, found in probes.items()}
    only_ours = sorted(passed.get("dlstack", set()) - passed["dlstack-uvicorn"])
    cost = 1 - uv.rps / ours.rps if ours.rps else 0.0
    numbers = (
        f"JSON c={c}: EventLoopWorker {ours.rps:,.0f} req/s p99 {ours.p99_ms:.1f} ms, UvicornWorker {uv.rps:,.0f} "
        f"req/s p99 {uv.p99_ms:.1f} ms (uvicorn {'costs' if cost > 0 else 'gains'} {abs(cost):.0%}); probes passed "
        f"{len(passed.get('dlstack', ()))} vs {len(passed['dlstack-uvicorn'])} of {len(probes['dlstack-uvicorn'])}"
    )
    if cost > UVICORN_MAX_COST:
        choice, why = "EventLoopWorker", f"uvicorn costs more than {UVICORN_MAX_COST:.0%} of the JSON req/s"
    elif only_ours:
        choice, why = "EventLoopWorker", f"uvicorn fails probes ours passes: {', '.join(only_ours)}"
    else:
        choice, why = "UvicornWorker", f"within {UVICORN_MAX_COST:.0%} of ours and as robust: keep the library"
    return {"choice": choice, "decided": True, "reason": f"{why}. {numbers}",
            "uvicorn_cost": cost, "probes_only_ours_pass": only_ours}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"dlstack server benchmark: {s['duration_s']:g} s per point, wrk 2 threads, 2 workers per server, "
        f"{result['machine']['cpus']} CPUs shared by wrk and the servers; dlstack serves models packaged with "
        f"defaults; floor = {s['floor']} transport floor (no model)",
        "",
        "| server | model | body | conns | req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['server']} | {p['model']} | {p['encoding']} | {p['connections']} | {p['rps']:,.0f} | "
            f"{p['p50_ms']:.2f} | {p['p90_ms']:.2f} | {p['p99_ms']:.2f} | {p['errors']} |"
        )
    lines += ["", "| target | goal | measured | result |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['name']} | {t['goal']} | {t['measured']} | {'PASS' if t['passed'] else 'FAIL'} |")
    probes = result.get("probes", {})
    if probes:
        names = list(probes)
        lines += ["", "| hostile probe | " + " | ".join(WORKER_LABELS.get(n, n) for n in names) + " |",
                  "|---|" + "---|" * len(names)]  # fmt: skip
        by = {n: {p["name"]: p for p in found} for n, found in probes.items()}
        for probe in dict.fromkeys(p["name"] for found in probes.values() for p in found):
            cells = []
            for n in names:
                p = by[n].get(probe)
                cells.append("not run" if p is None else f"{'pass' if p['passed'] else 'FAIL'}: {p['detail']}")
            lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    choice = result.get("worker_choice")
    if choice:
        lines += ["", f"Worker choice: **{choice['choice']}** — {choice['reason']}"]
    lines += ["", "| extra | value |", "|---|---|"]
    for k, v in result["cold_start_s"].items():
        lines.append(f"| cold start {k} | {v:.2f} s |")
    for k, v in result["memory_pss_bytes"].items():
        lines.append(f"| PSS {k} | {v / 2**20:.0f} MiB |")
    for k, v in result["in_process_samples_per_s"].items():
        lines.append(f"| in-process {k} | {v:,.0f} samples/s |")
    for k, v in result.get("mean_batch_rows", {}).items():
        lines.append(f"| mean rows per forward pass, {k} | {v:.2f} |")
    for k, v in result.get("observers", {}).items():
        lines.append(
            f"| observers, {k} | {v['answered']:,.0f} answered; prediction log {v['log_written']:,.0f} written, "
            f"{v['log_dropped']:,.0f} dropped; drift bin counts {v['drift_bin_counts']:,.0f} (16 per sampled row) |"
        )
    if seen := result.get("stalled_helper"):
        lines.append(
            f"| stalled connections, {len(seen)} rounds | at least {min(x.get('held', 0) for x in seen)} held at "
            f"each round's end; {sum(x.get('opened', 0) for x in seen)} opened, "
            f"{sum(x.get('closed_by_server', 0) for x in seen)} closed by the server |"
        )
    lines.append(f"| load average (1 min) at the end | {result['machine'].get('loadavg_1m_at_end', 0):.2f} |")
    for note in result.get("notes", []):
        lines.append(f"| note | {note} |")
    return "\n".join(lines)


WORKER_LABELS = {"dlstack": "EventLoopWorker (ours)", "dlstack-uvicorn": "UvicornWorker"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.server_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per wrk point (default 15)")
    p.add_argument("--quick", action="store_true", help="3 s points: a smoke run, numbers are rough")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    p.add_argument("--connections", type=int, nargs="+", default=[8, 32], help="wrk connection counts (default 8 32)")
    p.add_argument("--models", nargs="+", default=["mnist-mlp", "tiny-cnn"], choices=["mnist-mlp", "tiny-cnn"])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per point (default 3)")
    p.add_argument(
        "--max-batch-size", type=int, help="DLSTACK_MAX_BATCH_SIZE for dlstack (default: model.yaml's, auto)"
    )
    p.add_argument(
        "--floor",
        choices=floor_server.IMPLS,
        default=floor_server.FLOOR_IMPL,
        help=f"transport floor implementation (default {floor_server.FLOOR_IMPL}, the faster here)",
    )
    p.add_argument(
        "--stalled", type=int, default=200, help="stalled connections of the hostile-load point (default 200)"
    )
    p.add_argument(
        "--observer-blocks",
        type=int,
        default=OBSERVER_BLOCKS,
        help=f"blocks of fresh observer servers, {len(OBSERVER_SERVERS)} paired rounds of {OBSERVER_ROUND_S:g} s "
        f"each (default {OBSERVER_BLOCKS})",
    )
    p.add_argument("--workdir", type=Path, help="keep models and server logs here (default: a temp dir, removed)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration <= 0 or min(args.connections) < 1 or min(args.rounds, args.stalled, args.observer_blocks) < 1:
        p.error("--duration, --connections, --rounds, --stalled and --observer-blocks must be positive")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1 (1 = batching off)")
    return args


@contextmanager
def bench_workdir(given: Path | None) -> Iterator[Path]:
    """``given`` (kept), or a temp dir removed afterwards: a run's server logs hold ~2.5 GB (the 100 %
    prediction-log server's lines), too much to leave behind in /tmp on every run."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="dlstack-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_workdir(args.workdir) as workdir:
        result = run(argparse.Namespace(**{**vars(args), "workdir": workdir}))
    print(markdown(result))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    print(
        f"\nWorker choice: {result['worker_choice']['choice']} ({result['worker_choice']['reason']})", file=sys.stderr
    )
    failed = [t for t in result["targets"] if not t["passed"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
