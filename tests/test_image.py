"""Build the serving image with ../shared/tools/oci (buildah, no daemon), run it, predict (``make image-test``).

Slow (minutes: torch is installed into the image), so marked ``image`` and excluded from the default run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import requests

from tests.conftest import ROOT, free_port, make_torch_mlp_artifact

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600), pytest.mark.xdist_group("image")]

OCI = ROOT.parent / "shared" / "tools" / "oci"  # only this opt-in test (make image-test) reads ../shared
TAG = "localhost/dlstack-image-test"
SIZES = (8, 16, 3)


def oci(*args: str, timeout: float = 1800) -> str:
    proc = subprocess.run([str(OCI), *args], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"oci {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


def podman_inspect(kind: str, ref: str) -> dict:
    """``podman inspect`` against the oci tool's own storage (the tool has no inspect command)."""
    d = os.environ.get("DLSTACK_OCI_DIR", "/var/tmp/dlstack-oci")
    cmd = ["podman", "--root", f"{d}/storage", "--runroot", f"{d}/run", "--storage-driver", "vfs"]
    out = subprocess.run([*cmd, kind, "inspect", ref], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def stage_context(ctx: Path, artifact: Path, services: Path = ROOT / "services") -> Path:
    """The build context contract: CONTEXT/services (the package) + CONTEXT/model (the artifact)."""
    shutil.copytree(services, ctx / "services", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(artifact, ctx / "model")
    return ctx


class Built(NamedTuple):
    tag: str
    artifact: Path  # the model inside the image
    services: Path  # the staged code it was built from


def build(ctx: Path, tag: str) -> float:
    t0 = time.perf_counter()
    dockerfile = ctx / "services" / "serving" / "Dockerfile"
    oci("build", str(ctx), tag, "-f", str(dockerfile), "--format", "docker", "--layers",
        "--build-arg", "FRAMEWORK=pytorch")  # fmt: skip
    return time.perf_counter() - t0


def reference(artifact: Path, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.jit.load(str(artifact / "model.pt"))(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def oci_ready() -> None:
    if not OCI.exists():
        pytest.fail(f"{OCI} missing: the image test needs ../shared/tools/oci")
    oci("setup")


@pytest.fixture(scope="module")
def image(oci_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("art") / "m", name="mlp", sizes=SIZES, version="1", seed=0)
    ctx = stage_context(tmp_path_factory.mktemp("ctx"), art)
    seconds = build(ctx, f"{TAG}:v1")
    print(f"\nimage {TAG}:v1 built in {seconds:.0f} s, size {int(oci('size', f'{TAG}:v1')) / 2**20:.0f} MiB")
    yield Built(f"{TAG}:v1", art, ctx / "services")


@pytest.fixture(scope="module")
def container(image: Built) -> Iterator[tuple[str, int]]:
    tag = image.tag
    port = free_port()
    # --read-only: the image must run with a read-only root filesystem (podman mounts a tmpfs on /tmp).
    cid = oci("run", tag, "--read-only", "-e", f"DLSTACK_BIND=127.0.0.1:{port}", "-e", "DLSTACK_WORKERS=1").strip()
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            state = podman_inspect("container", cid)["State"]
            if not state["Running"] or time.monotonic() > deadline:
                logs = subprocess.run([str(OCI), "logs", cid], capture_output=True, text=True, check=False)
                pytest.fail(
                    f"container not ready (state {state['Status']}):\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
                )
            time.sleep(0.5)
        yield cid, port
    finally:
        subprocess.run([str(OCI), "stop", "-t", "5", cid], capture_output=True, check=False)
        subprocess.run([str(OCI), "rm", "-f", cid], capture_output=True, check=False)


def test_image_serves_correct_v2_predictions(image: Built, container: tuple[str, int]) -> None:
    art = image.artifact
    _, port = container
    x = np.random.default_rng(3).random((4, SIZES[0]), dtype=np.float32)
    want = reference(art, x)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    resp = requests.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["name"] == "output" and out["shape"] == [4, SIZES[-1]]
    np.testing.assert_allclose(np.asarray(out["data"], dtype=np.float32).reshape(4, -1), want, rtol=1e-5, atol=1e-6)

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_allclose(client.infer("mlp", [inp]).as_numpy("output"), want, rtol=1e-5, atol=1e-6)


def test_container_runs_as_non_root_uid_10001(container: tuple[str, int]) -> None:
    import psutil

    cid, _ = container
    pid = podman_inspect("container", cid)["State"]["Pid"]
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert {p.uids().effective for p in procs} == {10001}, [(p.pid, p.uids()) for p in procs]


def test_image_config_healthcheck_and_user(image: Built) -> None:
    tag = image.tag
    cfg = podman_inspect("image", tag)["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"][:3] == ["gunicorn", "--config", "python:services.serving.server.gunicorn_conf"]
    assert "/v2/health/ready" in " ".join(podman_inspect("image", tag)["Healthcheck"]["Test"])


def test_new_model_version_changes_only_the_last_layer(image: Built, tmp_path: Path) -> None:
    tag = image.tag
    art2 = make_torch_mlp_artifact(tmp_path / "m2", name="mlp", sizes=SIZES, version="2", seed=1)
    # Same code as the v1 build (the tree may change meanwhile): only the model differs.
    ctx = stage_context(tmp_path / "ctx", art2, services=image.services)
    seconds = build(ctx, f"{TAG}:v2")
    print(f"\nrebuild for a new model version: {seconds:.0f} s")
    v1 = podman_inspect("image", tag)["RootFS"]["Layers"]
    v2 = podman_inspect("image", f"{TAG}:v2")["RootFS"]["Layers"]
    assert len(v1) == len(v2) and v1[:-1] == v2[:-1] and v1[-1] != v2[-1]
