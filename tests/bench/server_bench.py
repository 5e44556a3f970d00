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
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
    from services.artifact import load_spec
    from services.runtimes import create_runtime

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
    from services.artifact import read_spec

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
    conns = args.connections
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dlstack-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = print if not args.json_only else (lambda *a, **k: None)
    points: list[Point] = []
    memory: dict[str, int] = {}
    cold: dict[str, float] = {}
    inproc: dict[str, float] = {}

    artifacts = {m: build_model(m, workdir / "models" / m) for m in args.models}
    for model, art in artifacts.items():
        batches = (1, 32) if model == "mnist-mlp" else (1,)
        for b in batches:
            inproc[f"{model} batch {b}"] = in_process(art, b, min(duration, 3.0))
            log(f"in-process {model} batch {b}: {inproc[f'{model} batch {b}']:,.0f} samples/s", file=sys.stderr)

    def drive(server: harness.Server, model: str, encoding: str, c: int, art: Path) -> None:
        in_name, _, x = _sample(art)
        body, headers = harness.json_body(in_name, x) if encoding == "json" else harness.binary_body(in_name, x)
        res, _ = wrk.run(server.infer_url(model), body, headers, connections=c, duration_s=duration)
        points.append(Point(server.name, model, encoding, c, res.rps, res.p50_ms, res.p90_ms, res.p99_ms,
                            res.requests, res.errors))  # fmt: skip
        log(f"{server.name:16} {model:10} {encoding:6} c={c:<3} {res.rps:9,.0f} req/s  p50 {res.p50_ms:7.2f} ms  "
            f"p99 {res.p99_ms:7.2f} ms  errors {res.errors}", file=sys.stderr)  # fmt: skip

    base_env = {"PYTHONPATH": str(harness.ROOT), "OMP_NUM_THREADS": "1"}
    for model, art in artifacts.items():
        on = with_batching(art, workdir / "models" / f"{model}-batch{args.max_batch_size}", args.max_batch_size)
        _, _, x = _sample(art)
        expected = _reference(art, x)
        naive_env = {**base_env, "NAIVE_MODEL_DIR": str(art)}
        with (
            serving("naive", harness.naive_cmd, workdir, naive_env) as naive,
            serving("dlstack", lambda p, a=on: harness.dlstack_cmd(a, p), workdir, base_env) as dl,  # type: ignore[misc]
        ):
            cold[f"naive {model}"], cold[f"dlstack {model}"] = naive.cold_start_s, dl.cold_start_s
            check_correct(naive, model, art, expected)
            check_correct(dl, model, on, expected)
            for c in conns:
                # Alternate servers point by point so background load drifts hit both alike.
                drive(naive, model, "json", c, art)
                drive(dl, model, "json", c, on)
                if model == "mnist-mlp":
                    drive(dl, model, "binary", c, on)
            memory[f"naive {model}"], memory[f"dlstack {model}"] = naive.pss_bytes(), dl.pss_bytes()
        if model == "mnist-mlp":
            off = with_batching(art, workdir / "models" / f"{model}-batch1", 1)
            with serving("dlstack-nobatch", lambda p, a=off: harness.dlstack_cmd(a, p), workdir, base_env) as dl:  # type: ignore[misc]
                check_correct(dl, model, off, expected)
                drive(dl, model, "json", max(conns), off)

    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"duration_s": duration, "connections": conns, "wrk_threads": 2, "workers": 2,
                     "max_batch_size": args.max_batch_size, "note": "wrk runs on the same CPUs as the servers"},
        "points": [asdict(p) for p in points],
        "memory_pss_bytes": memory,
        "cold_start_s": cold,
        "in_process_samples_per_s": inproc,
    }  # fmt: skip
    result["targets"] = [asdict(t) for t in targets(points, memory, cold, max(conns), args.max_batch_size)]
    return result


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
    p.add_argument("--max-batch-size", type=int, default=8, help="dlstack batching setting (default 8)")
    p.add_argument("--workdir", type=Path, help="keep models and server logs here (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration <= 0 or min(args.connections) < 1 or args.max_batch_size < 1:
        p.error("--duration, --connections and --max-batch-size must be positive")
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
