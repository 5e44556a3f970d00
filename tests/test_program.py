"""The composed program under mocks: registry resolution, wiring of every component, stack outputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from services.serving.errors import UserError
from stacks.config import StackConfig, parse_config
from stacks.mocks import DOCKER_IMAGE, RANDOM_PASSWORD, RecordingMocks, run_program
from stacks.program import BuildOptions, build, model_quota
from tests.conftest import ROOT, make_torch_mlp_artifact

pytestmark = pytest.mark.xdist_group("program")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services.registry import Registry

    tmp = tmp_path_factory.mktemp("program")
    reg = Registry(tmp / "registry")
    for name, version_seed in (("mnist-mlp", 0), ("mnist-mlp", 1), ("tiny-cnn", 0)):
        art = make_torch_mlp_artifact(tmp / f"{name}-{version_seed}", name=name, seed=version_seed)
        reg.register(art, name, "pytorch")
    return reg


def _raw(stack: str) -> dict[str, Any]:
    doc = YAML(typ="safe").load((ROOT / f"Pulumi.{stack}.yaml").read_text())
    return {k.removeprefix("dlstack:"): v for k, v in doc["config"].items()}


def _cfg(stack: str, **edits: Any) -> StackConfig:
    raw = copy.deepcopy(_raw(stack))
    raw.update(edits)
    return parse_config(raw, f"Pulumi.{stack}.yaml")


def _run(
    cfg: StackConfig, registry: Any, tmp: Path, config: dict[str, str] | None = None
) -> tuple[RecordingMocks, Any]:
    opts = BuildOptions(build_root=tmp / "contexts", prepare_images=False)
    return run_program(lambda: build(cfg, registry, opts), stack=cfg.environment, config=config)


@pytest.fixture(scope="module")
def dev(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordingMocks, Any]:
    return _run(_cfg("dev"), registry, tmp_path_factory.mktemp("dev"))


def test_outputs_name_version_digest_pinned_image_and_urls(dev: tuple[RecordingMocks, Any], registry: Any) -> None:
    mocks, out = dev
    digests = {r.inputs["tags"][0].rsplit(":", 1)[0]: r.answer["digest"] for r in mocks.of_type(DOCKER_IMAGE)}
    for name in ("mnist-mlp", "tiny-cnn"):
        entry = out["models"][name]
        repo = f"localhost:5001/dlstack/{name}"
        assert entry["version"] == "1"
        assert entry["sha256"] == registry.resolve(f"{name}:1").sha256
        assert entry["image"] == f"{repo}@{digests[repo]}"
        assert entry["url"] == f"http://dlstack.localtest.me/models/{name}/"
    assert out["kibana_url"] == "http://kibana.dlstack.localtest.me/"
    assert out["grafana_url"] == "http://grafana.dlstack.localtest.me/"


def test_model_services_run_the_built_image_with_config_values(dev: tuple[RecordingMocks, Any]) -> None:
    mocks, _ = dev
    (mnist_build,) = [r for r in mocks.of_type(DOCKER_IMAGE) if "mnist-mlp" in r.inputs["tags"][0]]
    deploy = mocks.k8s_object("Deployment", "mnist-mlp", "models")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # the digest of exactly this build, never a tag
    assert container["image"] == f"localhost:5001/dlstack/mnist-mlp@{mnist_build.answer['digest']}"
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert container["resources"]["limits"] == {"cpu": "1000m", "memory": "512Mi"}
    assert pod["priorityClassName"] == "dlstack-model-serving"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["DLSTACK_MAX_BATCH_SIZE"], env["DLSTACK_MAX_BATCH_TIME_MS"]) == ("8", "2")
    hpa = mocks.k8s_object("HorizontalPodAutoscaler", "mnist-mlp", "models")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)
    ing = mocks.k8s_object("Ingress", "mnist-mlp", "models")["spec"]
    assert ing["rules"][0]["host"] == "dlstack.localtest.me"


def test_platform_uis_get_ingresses_and_secrets_are_generated(dev: tuple[RecordingMocks, Any]) -> None:
    mocks, _ = dev
    kb = mocks.k8s_object("Ingress", "kibana", "logging")
    assert kb["spec"]["rules"][0]["host"] == "kibana.dlstack.localtest.me"
    assert kb["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "dlstack-kb-http"
    assert kb["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    gf = mocks.k8s_object("Ingress", "grafana", "monitoring")
    assert gf["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {
        "name": "kube-prometheus-stack-grafana",
        "port": {"number": 80},
    }
    assert len(mocks.of_type(RANDOM_PASSWORD)) == 1  # no password in the config: generated
    secret = mocks.k8s_object("Secret", "grafana-admin", "monitoring")
    assert set(secret["stringData"].values()) == {"<masked: secret>"}


def test_grafana_password_from_a_config_secret(registry: Any, tmp_path: Path) -> None:
    mocks, _ = _run(_cfg("dev"), registry, tmp_path, config={"dlstack:grafana_admin_password": "s3cret"})
    assert mocks.of_type(RANDOM_PASSWORD) == []


def test_quota_is_sized_for_every_model_at_max_scale() -> None:
    q = model_quota(_cfg("dev"))
    # dev: 2 models x (max 2 + 1 surge) pods x (500m, 512Mi requests; 1000m, 512Mi limits)
    assert (q.pods, q.requests_cpu, q.requests_memory, q.limits_cpu, q.limits_memory) == (
        6,
        "3000m",
        "3072Mi",
        "6000m",
        "3072Mi",
    )
    assert (q.max_container_cpu, q.max_container_memory, q.gpus) == ("1000m", "512Mi", 0)
    raw = _raw("dev")
    raw["models"][0]["canary"] = {"model": "mnist-mlp:2", "weight": 10}
    raw["models"][0]["gpu"] = {"count": 2}
    q2 = model_quota(parse_config(raw, "x"))
    assert q2.pods == 8  # the canary pod and its surge pod
    assert q2.gpus == 2 * 5  # 5 pods of the GPU model (3 stable + 2 canary)


def test_canary_and_gpu_wiring(registry: Any, tmp_path: Path) -> None:
    raw = _raw("dev")
    raw["models"][0]["canary"] = {"model": "mnist-mlp:2", "weight": 25}
    raw["models"][1]["gpu"] = {"count": 1}
    mocks, out = _run(parse_config(raw, "x"), registry, tmp_path)
    canary = mocks.k8s_object("Deployment", "mnist-mlp-canary", "models")
    (container,) = canary["spec"]["template"]["spec"]["containers"]
    v2 = registry.resolve("mnist-mlp:2")
    (v2_build,) = [r for r in mocks.of_type(DOCKER_IMAGE) if r.inputs["tags"][0].split(":")[-1].startswith("v2-")]
    assert container["image"] == f"localhost:5001/dlstack/mnist-mlp@{v2_build.answer['digest']}"
    assert out["models"]["mnist-mlp"]["canary"]["version"] == "2"
    assert out["models"]["mnist-mlp"]["canary"]["weight"] == 25
    assert out["models"]["mnist-mlp"]["canary"]["image"].startswith("localhost:5001/dlstack/mnist-mlp@sha256:")
    assert any(v2.sha256 == r.inputs["labels"]["io.dlstack.model.sha256"] for r in mocks.of_type(DOCKER_IMAGE))
    ing = mocks.k8s_object("Ingress", "mnist-mlp-canary", "models")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "25"
    gpu_pod = mocks.k8s_object("Deployment", "tiny-cnn", "models")["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    releases = {r.inputs["name"] for r in mocks.of_type("kubernetes:helm.sh/v3:Release")}
    assert "nvidia-device-plugin" in releases


def test_prod_promoted_digest_is_deployed_without_a_build(registry: Any, tmp_path: Path) -> None:
    raw = _raw("prod")
    digest = "sha256:" + "d" * 64
    raw["models"][0]["image"] = {"digest": digest}
    mocks, out = _run(parse_config(raw, "Pulumi.prod.yaml"), registry, tmp_path)
    ref = f"ghcr.io/acme/dlstack/mnist-mlp@{digest}"
    assert out["models"]["mnist-mlp"]["image"] == ref
    (container,) = mocks.k8s_object("Deployment", "mnist-mlp", "models")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ref
    assert [r.inputs["tags"][0].rsplit(":", 1)[0] for r in mocks.of_type(DOCKER_IMAGE)] == [
        "ghcr.io/acme/dlstack/tiny-cnn"
    ]
    # prod: PDBs and topology spread for every model
    assert {p["metadata"]["name"] for p in mocks.k8s_objects("PodDisruptionBudget")} == {"mnist-mlp", "tiny-cnn"}
    pod = mocks.k8s_object("Deployment", "tiny-cnn", "models")["spec"]["template"]["spec"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }


def test_unresolvable_models_fail_before_any_resource(registry: Any, tmp_path: Path) -> None:
    raw = _raw("dev")
    raw["models"][0]["model"] = "mnist-mlp:9"
    raw["models"][1]["model"] = "nope:1"
    raw["models"][1]["name"] = "nope"
    mocks = RecordingMocks()
    with pytest.raises(UserError) as err:
        run_program(lambda: build(parse_config(raw, "x"), registry, BuildOptions(prepare_images=False)), mocks=mocks)
    lines = err.value.message.splitlines()
    assert lines[0].startswith("model references could not be resolved (register them with `dlstack models register`")
    assert lines[1].startswith("  mnist-mlp:9: model 'mnist-mlp' has no version '9' (versions: 1, 2)")
    assert lines[2].startswith("  nope:1: model 'nope' is not in the registry")
    assert mocks.resources == []


def test_framework_mismatch_is_reported(registry: Any) -> None:
    raw = _raw("dev")
    raw["models"][1]["framework"] = "onnx"
    with pytest.raises(UserError, match=r"dlstack:models\[1\]\.model: tiny-cnn:1 is a pytorch model, but framework"):
        run_program(lambda: build(parse_config(raw, "x"), registry, BuildOptions(prepare_images=False)))


def test_mocked_run_puts_the_sdk_back_even_when_the_program_raises() -> None:
    """The render patches SDK internals for speed; a real `pulumi up` in the same process must get them back."""
    import pulumi._types
    import pulumi.resource
    import pulumi.runtime.resource
    import pulumi.runtime.rpc

    targets = [
        (pulumi.runtime.rpc, "serialize_property"),
        (pulumi.runtime.rpc, "deserialize_property"),
        (pulumi.runtime.rpc, "translate_output_properties"),
        (pulumi._types, "unwrap_type"),
        (pulumi.runtime.resource, "create_urn"),
        (pulumi.resource, "collapse_alias_to_urn"),
    ]
    before = [getattr(mod, name) for mod, name in targets]

    def program() -> None:
        raise UserError("boom")

    with pytest.raises(UserError, match="boom"):
        run_program(program)
    after = [getattr(mod, name) for mod, name in targets]
    assert [a is b for a, b in zip(before, after, strict=True)] == [True] * len(targets)
