"""Offline render time versus the number of models: ``python -m tests.bench.render_bench [N ...]``.

Builds one tiny TorchScript model into a temporary registry, writes a dev stack file with N model
entries (all serving that model), and times ``stacks.render.render`` end to end (config parse,
program under mocks, files written). Goal: linear growth, 500 models <= 10 s. Each size runs in
a fresh process so that import and warm-up costs are counted the same way every time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
SIZES = (1, 50, 200, 500)


def stack_file(path: Path, n: int) -> Path:
    """A dev stack file like Pulumi.dev.yaml with ``n`` models."""
    yaml = YAML()
    doc = yaml.load((ROOT / "Pulumi.dev.yaml").read_text())
    base = doc["config"]["dlstack:models"][0]
    models = []
    for i in range(n):
        m = dict(base)
        m["name"] = f"model-{i:04d}"
        m["model"] = "bench-mlp:1"
        models.append(m)
    doc["config"]["dlstack:models"] = models
    with path.open("w") as fh:
        yaml.dump(doc, fh)
    return path


def one(n: int, work: Path) -> dict[str, float]:
    """Render ``n`` models in this process; returns timings."""
    from stacks.render import render

    cfg = stack_file(work / f"Pulumi.bench-{n}.yaml", n)
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = render("dev", work / f"out-{n}", cfg)
    return {
        "models": n,
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - c0, 3),
        "resources": res.resources,
        "files": res.files,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON on stdout
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.work)))
        return 0
    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "DLSTACK_REGISTRY": str(work / "registry")}
        setup = (
            "from pathlib import Path; from tests.conftest import make_torch_mlp_artifact; "
            "from services.registry import Registry; "
            f"Registry().register(make_torch_mlp_artifact(Path({str(work / 'art')!r}), name='bench-mlp'), "
            "'bench-mlp', 'pytorch')"
        )
        subprocess.run([sys.executable, "-c", setup], cwd=ROOT, env=env, check=True)
        print(f"{'models':>7} {'seconds':>8} {'cpu s':>7} {'resources':>9} {'files':>6} {'ms/model':>9}")
        rows = []
        for n in args.sizes:
            out = subprocess.run(
                [sys.executable, "-m", "tests.bench.render_bench", "--one", str(n), "--work", str(work)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            per = 1000 * row["seconds"] / max(n, 1)
            print(
                f"{n:>7} {row['seconds']:>8.2f} {row['cpu_seconds']:>7.2f} {row['resources']:>9} "
                f"{row['files']:>6} {per:>9.1f}",
                flush=True,
            )
        if len(rows) >= 2:
            a, b = rows[-2], rows[-1]
            slope = (b["seconds"] - a["seconds"]) / max(b["models"] - a["models"], 1)
            print(f"marginal cost: {1000 * slope:.1f} ms per model (between {a['models']} and {b['models']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
