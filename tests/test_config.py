"""The typed stack config: the committed stack files, every rejection message, and the engine path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from stacks.config import ConfigError, load_pulumi_config, load_stack_config, parse_config, parse_quantity

ROOT = Path(__file__).resolve().parent.parent


def _doc(stack: str = "prod") -> dict[str, Any]:
    return dict(YAML(typ="safe").load((ROOT / f"Pulumi.{stack}.yaml").read_text()))


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "Pulumi.prod.yaml") -> Path:
    path = tmp_path / name
    with path.open("w") as fh:
        YAML().dump(doc, fh)
    return path


def test_committed_stacks_parse_with_the_documented_environments() -> None:
    dev, prod = load_stack_config("dev"), load_stack_config("prod")
    assert (dev.environment, prod.environment) == ("dev", "prod")
    # dev: a local kind cluster, one replica, single-node Elasticsearch, the kind-local registry.
    assert dev.kubernetes.context == "kind-dlstack"
    assert dev.images.registry.startswith("localhost:5001/")
    assert dev.logging.elasticsearch.nodes == 1
    assert all(m.replicas.min == 1 for m in dev.models)
    # prod: highly available and keeps data longer.
    assert prod.logging.elasticsearch.nodes == 3
    assert all(m.replicas.min >= 2 for m in prod.models)
    assert prod.logging.retention_days > dev.logging.retention_days
    assert prod.ingress.replicas >= 2
    # the two example models, with different SLOs
    for cfg in (dev, prod):
        assert [(m.name, m.model, m.framework.value) for m in cfg.models] == [
            ("mnist-mlp", "mnist-mlp:1", "pytorch"),
            ("tiny-cnn", "tiny-cnn:1", "pytorch"),
        ]
        assert cfg.models[0].slo != cfg.models[1].slo


def test_derived_limits_and_quantities() -> None:
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("2") == 2
    assert parse_quantity("1Gi") == 2**30
    m = load_stack_config("dev").models[0]
    assert (m.resources.cpu, m.resources.cpu_limit) == ("500m", "1000m")  # limit defaults to 2 x request
    assert m.resources.memory_limit == m.resources.memory  # no memory overcommit


P = "Pulumi.prod.yaml: "


def _set(doc: dict[str, Any], path: list[Any], value: Any) -> None:
    node: Any = doc["config"]
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()
M = "dlstack:models"

BAD = [
    # (id, [(path, value), ...], exact message)
    (
        "cpu-not-quantity",
        [([M, 1, "resources", "cpu"], "2 cores")],
        P + 'dlstack:models[1].resources.cpu: "2 cores" is not a Kubernetes quantity (e.g. "2" or "500m")',
    ),
    (
        "memory-millibytes",
        [([M, 0, "resources", "memory"], "512m")],
        P + 'dlstack:models[0].resources.memory: "512m" means millibytes; write memory as e.g. "512Mi" or "2Gi"',
    ),
    (
        "typo-suggests",
        [([M, 0, "replica"], {"min": 1})],
        P + 'dlstack:models[0].replica: unknown key; did you mean "replicas"?',
    ),
    (
        "unknown-top-level",
        [(["dlstack:monitorin"], {})],
        P + 'dlstack:monitorin: unknown key; did you mean "dlstack:monitoring"?',
    ),
    (
        "min-above-max",
        [([M, 0, "replicas"], {"min": 3, "max": 2})],
        P + "dlstack:models[0].replicas: min (3) must be <= max (2); raise max or lower min",
    ),
    (
        "prod-single-replica",
        [([M, 0, "replicas"], {"min": 1, "max": 3})],
        P + "dlstack:models[0].replicas.min: prod needs at least 2 replicas for high availability (got 1)",
    ),
    (
        "duplicate-names",
        [([M, 1, "name"], "mnist-mlp")],
        P + 'dlstack:models[1].name: "mnist-mlp" is already used by models[0]; names must be unique',
    ),
    (
        "canary-weight",
        [([M, 0, "canary"], {"model": "mnist-mlp:2", "weight": 120})],
        P + "dlstack:models[0].canary.weight: weight must be between 0 and 100 (a percentage), got 120",
    ),
    (
        "canary-same-ref",
        [([M, 0, "canary"], {"model": "mnist-mlp:1", "weight": 10})],
        P + 'dlstack:models[0]: canary.model "mnist-mlp:1" is the main model; point it at another version',
    ),
    (
        "canary-other-model",
        [([M, 0, "canary"], {"model": "tiny-cnn:2", "weight": 10})],
        P + 'dlstack:models[0]: canary.model "tiny-cnn:2" is not a version of "mnist-mlp"; write "mnist-mlp:<version>"',
    ),
    (
        "gpu-zero",
        [([M, 0, "gpu"], {"count": 0})],
        P + "dlstack:models[0].gpu.count: count must be >= 1 (got 0); remove the gpu block to run on CPU",
    ),
    (
        "bad-model-ref",
        [([M, 0, "model"], "mnist-mlp")],
        P + 'dlstack:models[0].model: "mnist-mlp" is not a model reference (write "name:version" or '
        '"name@alias", e.g. "mnist-mlp:1")',
    ),
    (
        "bad-name",
        [([M, 0, "name"], "MNIST_mlp")],
        P + 'dlstack:models[0].name: "MNIST_mlp" is not a DNS-1123 label (lower-case letters, digits and "-", '
        "at most 63 characters, starting and ending with a letter or digit)",
    ),
    (
        "bad-framework",
        [([M, 0, "framework"], "caffe")],
        P + "dlstack:models[0].framework: \"caffe\" is invalid: input should be 'pytorch', 'keras', "
        "'tensorflow' or 'onnx'",
    ),
    (
        "bad-environment",
        [(["dlstack:environment"], "staging")],
        P + "dlstack:environment: \"staging\" is not allowed: input should be 'dev' or 'prod'",
    ),
    (
        "missing-slo",
        [([M, 0, "slo"], _DELETE)],
        P + "dlstack:models[0].slo: is required; add it",
    ),
    (
        "slo-ratio-range",
        [([M, 1, "slo", "error_ratio"], 1.5)],
        P + "dlstack:models[1].slo.error_ratio: 1.5 is invalid: input should be less than 1",
    ),
    (
        "replicas-not-int",
        [([M, 0, "replicas", "max"], "many")],
        P + 'dlstack:models[0].replicas.max: "many" is invalid: input should be a valid integer',
    ),
    (
        "k8s-version-float",
        [(["dlstack:kubernetes", "version"], 1.3)],
        P + 'dlstack:kubernetes.version: "1.3" is not a Kubernetes minor version (write it quoted, e.g. "1.31")',
    ),
    (
        "retention-duration",
        [(["dlstack:monitoring", "retention"], "30 days")],
        P + 'dlstack:monitoring.retention: "30 days" is not a retention duration (e.g. "15d", "12h", "2w")',
    ),
    (
        "prod-es-quorum",
        [(["dlstack:logging", "elasticsearch", "nodes"], 1)],
        P + "dlstack:logging.elasticsearch.nodes: prod needs at least 3 Elasticsearch nodes for a quorum (got 1)",
    ),
    (
        "limit-below-request",
        [([M, 0, "resources", "limits"], {"cpu": "100m"})],
        P + 'dlstack:models[0].resources: limits.cpu "100m" is below the request "1"; raise it',
    ),
    (
        "image-digest",
        [([M, 0, "image"], {"digest": "sha256:abc"})],
        P + 'dlstack:models[0].image.digest: "sha256:abc" is not an image digest (write "sha256:" and 64 '
        "lower-case hex digits)",
    ),
    (
        "namespaces-distinct",
        [(["dlstack:namespaces", "logging"], "models")],
        P + "dlstack:namespaces: namespace names must be distinct, got ['models', 'models', 'monitoring', 'ingress']",
    ),
    (
        "plain-secret",
        [(["dlstack:grafana_admin_password"], "hunter2")],
        P + "dlstack:grafana_admin_password: is a secret and must not be stored in plain text; run "
        "`pulumi config set --secret dlstack:grafana_admin_password <value>` (or remove it to generate one)",
    ),
    (
        "prediction-log-sample-zero",
        [([M, 0, "prediction_log"], {"sample": 0})],
        P + "dlstack:models[0].prediction_log.sample: must be > 0 and at most 1 (got 0): a fraction of requests; "
        "remove prediction_log for off",
    ),
    (
        "prediction-log-max-bytes-small",
        [([M, 0, "prediction_log"], {"sample": 0.01, "max_bytes": 100})],
        P + "dlstack:models[0].prediction_log.max_bytes: 100 is invalid: input should be greater than or equal to 256",
    ),
    (
        "prediction-log-needs-sample",
        [([M, 0, "prediction_log"], {"max_bytes": 4096})],
        P + "dlstack:models[0].prediction_log.sample: is required; add it",
    ),
    (
        "drift-sample-above-one",
        [([M, 1, "drift"], {"sample": 2})],
        P + "dlstack:models[1].drift.sample: must be > 0 and at most 1 (got 2): a fraction of requests; remove drift "
        "for off",
    ),
    (
        "drift-max-rows-negative",
        [([M, 1, "drift"], {"sample": 0.1, "max_rows_per_s": -5})],
        P + "dlstack:models[1].drift.max_rows_per_s: -5 is invalid: input should be greater than or equal to 0",
    ),
    (
        "bad-domain",
        [(["dlstack:ingress", "domain"], "https://x.example")],
        P + 'dlstack:ingress.domain: "https://x.example" is not a DNS domain (e.g. "dlstack.localtest.me")',
    ),
]


@pytest.mark.parametrize(("edits", "message"), [pytest.param(e, m, id=i) for i, e, m in BAD])
def test_bad_config_gives_one_exact_message(tmp_path: Path, edits: list[tuple[list[Any], Any]], message: str) -> None:
    doc = _doc()
    for path, value in edits:
        _set(doc, path, value if value is _DELETE else copy.deepcopy(value))
    with pytest.raises(ConfigError) as err:
        load_stack_config("prod", _write(tmp_path, doc))
    assert err.value.message == message


def test_serving_overrides_are_optional_and_feedback_knobs_parse(tmp_path: Path) -> None:
    """No batching block = model.yaml decides (None); prediction_log/drift are off unless given."""
    doc = _doc()
    del doc["config"][M][0]["batching"]
    doc["config"][M][0]["prediction_log"] = {"sample": 0.01, "max_bytes": 4096}
    doc["config"][M][1]["drift"] = {"sample": 0.1, "max_rows_per_s": 50}
    first, second = load_stack_config("prod", _write(tmp_path, doc)).models
    assert (first.batching.max_batch_size, first.batching.max_batch_time_ms) == (None, None)
    assert first.prediction_log is not None and (first.prediction_log.sample, first.prediction_log.max_bytes) == (
        0.01,
        4096,
    )
    assert first.drift is None and second.prediction_log is None
    assert second.drift is not None and (second.drift.sample, second.drift.max_rows_per_s) == (0.1, 50)
    assert second.batching.max_batch_size == 8  # the committed stack file sets it: kept


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    doc = _doc()
    doc["config"][M][0]["resources"]["cpu"] = "lots"
    doc["config"][M][1]["replicas"]["target_cpu_percent"] = 0
    with pytest.raises(ConfigError) as err:
        load_stack_config("prod", _write(tmp_path, doc))
    assert err.value.message.splitlines() == [
        P + 'dlstack:models[0].resources.cpu: "lots" is not a Kubernetes quantity (e.g. "2" or "500m")',
        P + "dlstack:models[1].replicas.target_cpu_percent: 0 is invalid: input should be greater than or equal to 1",
    ]


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such stack file; create it"):
        load_stack_config("qa", tmp_path / "Pulumi.qa.yaml")
    bad = tmp_path / "Pulumi.qa.yaml"
    bad.write_text("config: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^Pulumi\.qa\.yaml:2: is not valid YAML: expected ',' or ']'"):
        load_stack_config("qa", bad)
    bad.write_text("encryptionsalt: x\n")
    with pytest.raises(ConfigError, match='has no "config:" mapping'):
        load_stack_config("qa", bad)


def test_secure_secret_and_other_namespaces_are_accepted(tmp_path: Path) -> None:
    doc = _doc("dev")
    doc["config"]["dlstack:grafana_admin_password"] = {"secure": "v1:abc"}
    doc["config"]["kubernetes:enableServerSideApply"] = "true"  # provider settings belong to the provider
    cfg = load_stack_config("dev", _write(tmp_path, doc, "Pulumi.dev.yaml"))
    assert cfg == load_stack_config("dev")


def test_engine_config_goes_through_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `pulumi up` values arrive JSON-encoded from the engine; the result must equal the file parse."""
    raw = _doc("dev")["config"]
    engine = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(engine))
    assert load_pulumi_config("dev") == load_stack_config("dev")
    engine["dlstack:modles"] = "[]"
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(engine))
    with pytest.raises(
        ConfigError, match=r'^Pulumi\.dev\.yaml: dlstack:modles: unknown key; did you mean "dlstack:models"\?$'
    ):
        load_pulumi_config("dev")


def test_parse_config_requires_the_core_sections() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"environment": "dev"}, "Pulumi.x.yaml")
    assert err.value.message.splitlines() == [
        "Pulumi.x.yaml: dlstack:kubernetes: is required; add it",
        "Pulumi.x.yaml: dlstack:images: is required; add it",
        "Pulumi.x.yaml: dlstack:ingress: is required; add it",
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dlstak:models", "[]", 'dlstak:models: unknown namespace "dlstak"; did you mean "dlstack:models"?'),
        ("aws:region", "us-east-1", 'aws:region: unknown namespace "aws"; this program reads "dlstack:" keys'),
        ("dlstack:models", '[{"name": "a", "slo": {"p99_ms": NaN}}]', "dlstack:models[0].slo.p99_ms: nan is not a"),
        ("dlstack:models", '[{"replicas": {"max": 1' + "0" * 40 + "}}]", "dlstack:models[0].replicas.max: a 41-digit"),
        ("dlstack:models", "[" * 100_000 + "]" * 100_000, "dlstack:models: is 200000 characters long; at most 1024"),
        ("dlstack:kubernetes", '{"context": "kind\\n"}', 'dlstack:kubernetes.context: "kind\\n" contains a control'),
    ],
    ids=["namespace-typo", "unknown-namespace", "nan", "huge-int", "deep-json", "newline"],
)
def test_engine_config_gets_the_same_hostile_checks(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, message: str
) -> None:
    """`pulumi up` reads pulumi.Config, not the file: the namespace rules and bounds must hold there too."""
    raw = _doc("dev")["config"]
    engine = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    engine["kubernetes:context"] = "kind-dlstack"  # a provider's own setting is fine
    engine[key] = value
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(engine))
    with pytest.raises(ConfigError) as err:
        load_pulumi_config("dev")
    assert err.value.message.startswith("Pulumi.dev.yaml: " + message)
    assert len(err.value.message.splitlines()) == 1
