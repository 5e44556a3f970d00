"""The registry on S3 versus a local directory: ``python -m tests.bench.registry_bench [--mb 200] [--runs 11]``.

Starts the test S3 server (``tests/s3.py``, moto on loopback), registers the example stacks' models
(tiny real TorchScript models named mnist-mlp and tiny-cnn) in a local registry and in a bucket, then:

1. Renders ``dev`` and ``prod`` (``stacks.render.render``, what ``dlstack render`` and the Pulumi
   program run) against each backend, alternating, after a warm-up; reports the median per stack and
   the S3/local ratio (goal <= 1.5), and the index reads per render (goal: exactly 1).
2. Exports a blob of ``--mb`` MiB (random bytes) from the bucket in a fresh process with an empty
   cache, and reports the extra peak RSS over the process's RSS just before (goal < 100 MB), the time,
   and a second export from the warm cache.

Prints numbers; the asserts are only sanity checks of the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _export_child(location: str, ref: str, dest: str) -> None:
    """In a fresh process: the extra peak RSS of one export (cold cache, then warm).

    The peak is VmHWM, the kernel's high-water mark of this process image's RSS (ru_maxrss would not
    do: Linux carries it over exec from the forking parent, which held the whole blob to upload it).
    """
    from services.registry import Registry

    mv = Registry(location).resolve(ref)  # the index read and imports happen before the baseline
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    mv.export(Path(dest) / "cold")
    cold = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    t0 = time.perf_counter()
    mv.export(Path(dest) / "warm")
    warm = time.perf_counter() - t0
    peak_warm = _status_kib("VmHWM")
    size = sum(p.stat().st_size for p in (Path(dest) / "cold").rglob("*") if p.is_file())
    print(
        json.dumps(
            {
                "bytes": size,
                "rss_before_mb": base / 2**20,
                "extra_peak_cold_mb": (peak - base) / 2**20,
                "extra_peak_warm_mb": (peak_warm - base) / 2**20,
                "cold_s": cold,
                "warm_s": warm,
            }
        )
    )


def _median_render(stack: str, location: str, work: Path, runs: int) -> tuple[float, list[int]]:
    from services.registry import Registry
    from stacks.render import render

    times, reads = [], []
    for i in range(runs):
        reg = Registry(location)  # a new one per render, as each `dlstack render` builds its own
        t0 = time.perf_counter()
        render(stack, work / f"{stack}-{i}", registry=reg)
        times.append(time.perf_counter() - t0)
        reads.append(getattr(reg.store, "index_reads", -1))
    return statistics.median(times), reads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the exported blob in MiB (default 200)")
    parser.add_argument("--runs", type=int, default=11, help="renders per stack and backend (default 11)")
    parser.add_argument("--export-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child:
        _export_child(*args.export_child)
        return 0

    from services.registry import Registry
    from tests.conftest import free_port, make_torch_mlp_artifact
    from tests.s3 import S3Server
    from tests.test_registry import byte_artifact

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        work = Path(tmp)
        server = S3Server(free_port())
        try:
            os.environ.update(server.env)
            os.environ["DLSTACK_CACHE"] = str(work / "cache")
            bucket = server.bucket("bench")
            local, s3 = str(work / "registry"), f"s3://{bucket}/dlstack"
            for name in ("mnist-mlp", "tiny-cnn"):
                art = make_torch_mlp_artifact(work / "art" / name, name=name)
                for loc in (local, s3):
                    Registry(loc).register(art, name, "pytorch")

            print(f"render ({args.runs} runs each, median seconds; after one warm-up render per backend)")
            for loc in (local, s3):
                _median_render("dev", loc, work / "warmup", 1)
            rows = []
            for stack in ("dev", "prod"):
                t_local, _ = _median_render(stack, local, work / "local", args.runs)
                t_s3, reads = _median_render(stack, s3, work / "s3", args.runs)
                rows.append((stack, t_local, t_s3, reads))
            print(f"{'stack':>6} {'local s':>8} {'s3 s':>8} {'s3/local':>9} {'index reads/render':>19}")
            for stack, t_local, t_s3, reads in rows:
                print(f"{stack:>6} {t_local:>8.3f} {t_s3:>8.3f} {t_s3 / t_local:>9.2f} {sorted(set(reads))!s:>19}")
                assert set(reads) == {1}, f"{stack}: {reads} index reads per render"

            print(f"\nexport of a {args.mb} MiB blob from S3 (fresh process, empty cache)")
            blob = byte_artifact(work / "big", b"")
            with (blob / "model.onnx").open("wb") as fh:
                for _ in range(args.mb):
                    fh.write(os.urandom(1 << 20))
            from services.serving.artifact import FileEntry, file_sha256, read_spec, write_spec

            spec = read_spec(blob)
            entry = FileEntry(path="model.onnx", sha256=file_sha256(blob / "model.onnx"))
            write_spec(blob, spec.model_copy(update={"files": (entry,)}))
            Registry(s3).register(blob, "big", "onnx")
            env = {**os.environ, "DLSTACK_CACHE": str(work / "child-cache"), "PYTHONPATH": str(ROOT)}
            res = subprocess.run(
                [sys.executable, "-m", "tests.bench.registry_bench", "--export-child", s3, "big:1", str(work / "out")],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            m = json.loads(res.stdout.strip().splitlines()[-1])
            mb = m["bytes"] / 2**20
            print(f"{'MiB':>6} {'extra peak RSS MB':>18} {'cold s':>7} {'MiB/s':>6} {'warm (cache) s':>15}")
            print(
                f"{mb:>6.0f} {m['extra_peak_cold_mb']:>18.1f} {m['cold_s']:>7.2f} {mb / m['cold_s']:>6.0f} "
                f"{m['warm_s']:>15.2f}"
            )
            print(
                f"(RSS before the export: {m['rss_before_mb']:.0f} MB; "
                f"warm export extra peak {m['extra_peak_warm_mb']:.1f} MB)"
            )
            assert m["extra_peak_cold_mb"] < 100, "export must stream"
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
