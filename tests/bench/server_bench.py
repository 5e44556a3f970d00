"""Server benchmark: dlstack vs the naive Flask+Gunicorn baseline vs an in-process loop.

    python -m tests.bench.server_bench [--duration 15] [--quick] [--json out.json] [--check]

One run builds the two reference TorchScript models (MLP 784-512-512-10, CNN on 3x64x64),
measures them in-process, then starts `dlstack serve` (2 workers) and the naive baseline
(tests/bench/naive_server.py, 2 sync workers, 1 torch thread each) and drives both with wrk
(2 threads, one-row bodies, --latency) at 8 and 32 connections. It prints a markdown table
with PASS/FAIL per target. wrk shares the CPUs with the servers, so compare ratios within one
run, never absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import requests

from tests.bench import harness, wrk
from tests.bench.models import build_model, with_batching


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = 3.0 if args.quick else args.duration
    round_s = max(1.0, duration / args.rounds)
    conns = args.connections
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dlstack-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = print if not args.json_only else (lambda *a, **k: None)
    rounds: dict[tuple[str, str, str, int], list[wrk.WrkResult]] = {}
    memory: dict[str, int] = {}
    cold: dict[str, float] = {}
    inproc: dict[str, float] = {}
    expected: dict[str, np.ndarray] = {}
    base_env = {"PYTHONPATH": str(harness.ROOT), "OMP_NUM_THREADS": "1"}

    artifacts = {m: build_model(m, workdir / "models" / m) for m in args.models}
    batched = {
        m: with_batching(a, workdir / "models" / f"{m}-batch{args.max_batch_size}", args.max_batch_size)
        for m, a in artifacts.items()
    }
    # torch runs in a child process: mapped into this process, it would share (and so shrink) the servers' PSS.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for model, art in artifacts.items():
            expected[model] = pool.submit(_reference, art, _sample(art)[2]).result()
            for b in (1, 32) if model == "mnist-mlp" else (1,):
                inproc[f"{model} batch {b}"] = pool.submit(in_process, art, b, min(duration, 3.0)).result()
                log(f"in-process {model} batch {b}: {inproc[f'{model} batch {b}']:,.0f} samples/s", file=sys.stderr)

    def drive(server: harness.Server, model: str, encoding: str, c: int, art: Path, seconds: float) -> wrk.WrkResult:
        in_name, _, x = _sample(art)
        body, headers = harness.json_body(in_name, x) if encoding == "json" else harness.binary_body(in_name, x)
        return wrk.run(server.infer_url(model), body, headers, connections=c, duration_s=seconds)[0]

    def servers(model: str, art: Path) -> list[tuple[str, Callable[[int], list[str]], dict[str, str], Path]]:
        out: list[tuple[str, Callable[[int], list[str]], dict[str, str], Path]] = [
            ("naive", harness.naive_cmd, {**base_env, "NAIVE_MODEL_DIR": str(art)}, art),
            ("dlstack", partial(harness.dlstack_cmd, batched[model]), base_env, batched[model]),
        ]
        if model == "mnist-mlp":
            off = with_batching(art, workdir / "models" / f"{model}-batch1", 1)
            out.append(("dlstack-nobatch", partial(harness.dlstack_cmd, off), base_env, off))
        return out

    # Phase 1, each server alone: cold start, then PSS after a short warm-up load (nothing else maps torch).
    for model, art in artifacts.items():
        for name, cmd, env, a in servers(model, art)[:2]:
            with serving(name, cmd, workdir, env) as srv:
                cold[f"{name} {model}"] = srv.cold_start_s
                check_correct(srv, model, a, expected[model])
                drive(srv, model, "json", max(conns), a, 2.0)
                memory[f"{name} {model}"] = srv.pss_bytes()
            log(f"{name:16} {model:10} cold start {cold[f'{name} {model}']:.2f} s, "
                f"PSS {memory[f'{name} {model}'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip

    # Phase 2, all servers of a model up at once, driven in alternating short rounds, so background load
    # drifts (the machine is shared) hit every server alike.
    for model, art in artifacts.items():
        with ExitStack() as stack:
            runs = []
            for name, cmd, env, a in servers(model, art):
                srv = stack.enter_context(serving(name, cmd, workdir, env))
                check_correct(srv, model, a, expected[model])
                drive(srv, model, "json", max(conns), a, 1.0)  # warm-up, not recorded
                encodings = ("json", "binary") if name == "dlstack" and model == "mnist-mlp" else ("json",)
                runs += [(srv, enc, a) for enc in encodings]
            for c in conns:
                for _ in range(args.rounds):
                    for srv, enc, a in runs:
                        if srv.name == "dlstack-nobatch" and c != max(conns):
                            continue
                        res = drive(srv, model, enc, c, a, round_s)
                        rounds.setdefault((srv.name, model, enc, c), []).append(res)
                for srv, enc, _ in runs:
                    if (key := (srv.name, model, enc, c)) in rounds:
                        pt = aggregate(key, rounds[key])
                        log(f"{pt.server:16} {model:10} {enc:6} c={c:<3} {pt.rps:9,.0f} req/s p50 {pt.p50_ms:.2f} ms "
                            f"p99 {pt.p99_ms:.2f} ms errors {pt.errors}", file=sys.stderr)  # fmt: skip

    points = [aggregate(k, v) for k, v in rounds.items()]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"duration_s": duration, "rounds": args.rounds, "connections": conns, "wrk_threads": 2,
                     "workers": 2, "max_batch_size": args.max_batch_size,
                     "note": "wrk runs on the same CPUs as the servers"},
        "points": [asdict(p) for p in points],
        "memory_pss_bytes": memory,
        "cold_start_s": cold,
        "in_process_samples_per_s": inproc,
    }  # fmt: skip
    result["targets"] = [asdict(t) for t in targets(points, memory, cold, max(conns), args.max_batch_size)]
    return result


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


def targets(points: list[Point], memory: dict[str, int], cold: dict[str, float], c: int, mbs: int) -> list[Target]:
    """The issue's targets, evaluated on the points of this run; a missing point is a FAIL."""

    def pt(server: str, model: str, enc: str = "json") -> Point | None:
        return next(
            (p for p in points if (p.server, p.model, p.encoding, p.connections) == (server, model, enc, c)), None
        )

    out: list[Target] = []

    def ratio(name: str, goal: float, num: Point | None, den: Point | None, p99: bool) -> None:
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
            goal_s += ", p99 <= naive"
        if num.errors or den.errors:
            measured += f", errors {num.errors}/{den.errors}"
        out.append(Target(name, goal_s, measured, ok))

    ratio(f"MLP, JSON, c={c}", 1.5, pt("dlstack", "mnist-mlp"), pt("naive", "mnist-mlp"), True)
    ratio(f"MLP, binary tensors, c={c} (vs naive JSON)", 2.5, pt("dlstack", "mnist-mlp", "binary"),
          pt("naive", "mnist-mlp"), False)  # fmt: skip
    ratio(f"CNN, JSON, c={c}", 1.0, pt("dlstack", "tiny-cnn"), pt("naive", "tiny-cnn"), True)
    ratio(f"MLP batching on (max {mbs}) vs off, c={c}", 0.95, pt("dlstack", "mnist-mlp"),
          pt("dlstack-nobatch", "mnist-mlp"), False)  # fmt: skip
    dl_mem, nv_mem = memory.get("dlstack mnist-mlp"), memory.get("naive mnist-mlp")
    if dl_mem is None or nv_mem is None:
        out.append(Target("memory (PSS, 2 workers, MLP)", "<= naive", "not measured", False))
    else:
        out.append(Target("memory (PSS, 2 workers, MLP)", "<= naive",
                          f"{dl_mem / 2**20:.0f} MiB vs {nv_mem / 2**20:.0f} MiB", dl_mem <= nv_mem))  # fmt: skip
    cs = cold.get("dlstack mnist-mlp")
    out.append(Target("cold start MLP", "<= 5 s", "not measured" if cs is None else f"{cs:.2f} s",
                      cs is not None and cs <= 5.0))  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"dlstack server benchmark: {s['duration_s']:g} s per point, wrk 2 threads, 2 workers per server, "
        f"{result['machine']['cpus']} CPUs shared by wrk and the servers",
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
    lines += ["", "| extra | value |", "|---|---|"]
    for k, v in result["cold_start_s"].items():
        lines.append(f"| cold start {k} | {v:.2f} s |")
    for k, v in result["memory_pss_bytes"].items():
        lines.append(f"| PSS {k} | {v / 2**20:.0f} MiB |")
    for k, v in result["in_process_samples_per_s"].items():
        lines.append(f"| in-process {k} | {v:,.0f} samples/s |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.server_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per wrk point (default 15)")
    p.add_argument("--quick", action="store_true", help="3 s points: a smoke run, numbers are rough")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    p.add_argument("--connections", type=int, nargs="+", default=[8, 32], help="wrk connection counts (default 8 32)")
    p.add_argument("--models", nargs="+", default=["mnist-mlp", "tiny-cnn"], choices=["mnist-mlp", "tiny-cnn"])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per point (default 3)")
    p.add_argument("--max-batch-size", type=int, default=8, help="dlstack batching setting (default 8)")
    p.add_argument("--workdir", type=Path, help="keep models and server logs here (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration <= 0 or min(args.connections) < 1 or args.max_batch_size < 1 or args.rounds < 1:
        p.error("--duration, --connections, --rounds and --max-batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    failed = [t for t in result["targets"] if not t["passed"]]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
