"""Autoscaling on request load (KEDA): stack config, the ScaledObject, its render and judges, and its
trigger query against a REAL Prometheus scraping a REAL model server under load.

* config: ``autoscaling: {metric, target}`` is strict, errors are one line naming the key and the fix;
  an rps target defaults to the measured ``capacity`` (written by `dlstack capacity`) less its headroom;
* render: a stack file with autoscaled models renders one ScaledObject per such model and no CPU HPA
  for it, installs KEDA (pinned), and the ScaledObject waits for KEDA's release; the ScaledObject is
  judged by the strict upstream KEDA CRD schema (tests/schemas), the policy pack, checkov and promtool;
* end to end: Prometheus (real binary) loads the rendered rule file's load rules and scrapes a real
  server under load; each trigger query returns exactly one sample, computed from the model's own
  series of the stable job only (the canary's job is scraped too and must not count).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from ruamel.yaml import YAML

from infra.alerts import LOAD_INFLIGHT, LOAD_P99, LOAD_RPS, ModelSLO, rule_file_yaml
from infra.autoscaling import LoadAutoscaling, ScaledObject, ScaledObjectArgs, query, threshold
from infra.model_service import ModelService, ModelServiceArgs
from services.serving.errors import UserError
from stacks.config import ConfigError, load_stack_config
from stacks.mocks import HELM_RELEASE, RecordingMocks, RecordingMonitor, run_program
from tests.conftest import ROOT, make_torch_mlp_artifact
from tests.k8s_checks import crd_errors, kubernetes_errors, load_manifests, stack_registry
from tests.prometheus import query as _query
from tests.prometheus import running_prometheus, wait_for
from tests.serving import start_server

PROM_URL = "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
IMAGE = "registry.example/m@sha256:" + "a" * 64

# The stack files the render tests use: the project's own, with autoscaling added to their models.
AUTOSCALED = {
    "dev": {"tiny-cnn": "autoscaling: {metric: inflight, target: 4}"},
    "prod": {
        "mnist-mlp": (
            "autoscaling: {metric: rps}\n"
            "      capacity: {per_replica_rps: 130.0, headroom: 0.3, measured: '2026-11-28'}"
        ),
        "tiny-cnn": "autoscaling: {metric: p99_ms, target: 200}",
    },
}


def _with_autoscaling(stack: str, dest: Path, entries: dict[str, str] | None = None) -> Path:
    """``Pulumi.<stack>.yaml`` with ``entries`` (model name -> lines) appended to those models' entries."""
    text = (ROOT / f"Pulumi.{stack}.yaml").read_text()
    for name, lines in (AUTOSCALED[stack] if entries is None else entries).items():
        start = text.index(f"- name: {name}\n")
        end = text.find("\n    - name:", start)
        end = len(text.rstrip("\n")) if end < 0 else end
        text = text[:end] + f"\n      {lines}" + text[end:]
    dest.write_text(text)
    return dest


# ---------------------------------------------------------------------------------------------
# stack config


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            "autoscaling: {metric: rps, target: 0}",
            "Pulumi.prod.yaml: dlstack:models[1].autoscaling.target: must be > 0 and at most 1000000 (got 0); "
            "write the per-replica target",
        ),
        (
            "autoscaling: {metric: qps, target: 3}",
            "Pulumi.prod.yaml: dlstack:models[1].autoscaling.metric: \"qps\" is not allowed: input should be 'rps', "
            "'inflight' or 'p99_ms'",
        ),
        (
            "autoscaling: {metric: rps, traget: 3}",
            'Pulumi.prod.yaml: dlstack:models[1].autoscaling.traget: unknown key; did you mean "target"?',
        ),
        (
            "autoscaling: {metric: rps}",
            "Pulumi.prod.yaml: dlstack:models[1].autoscaling.target: is required: no measured capacity for this "
            "model; measure one replica with `dlstack capacity ARTIFACT --target-rps N --p99-ms MS --write-config ENV`"
            ", or set it",
        ),
        (
            "autoscaling: {metric: inflight}",
            "Pulumi.prod.yaml: dlstack:models[1].autoscaling.target: is required for metric inflight (requests "
            "being answered at once, per replica); set it",
        ),
        (
            "autoscaling: {metric: p99_ms, target: 400}",
            "Pulumi.prod.yaml: dlstack:models[1].autoscaling.target: 400 ms is above slo.p99_ms (300 ms): replicas "
            "would be added only after the SLO is broken; set it below the SLO",
        ),
        (
            "autoscaling: {metric: rps}\n      capacity: {per_replica_rps: 10.0, headroom: 0.3, measured: last week}",
            'Pulumi.prod.yaml: dlstack:models[1].capacity.measured: "last week" is not a date; write it as '
            '"YYYY-MM-DD"',
        ),
        (
            "autoscaling: {metric: rps}\n"
            "      capacity: {per_replica_rps: 10.0, headroom: 0.3, measured: '2026-13-40'}",
            'Pulumi.prod.yaml: dlstack:models[1].capacity.measured: "2026-13-40" is not a date; write it as '
            '"YYYY-MM-DD"',
        ),
        (
            "autoscaling: rps",
            'Pulumi.prod.yaml: dlstack:models[1].autoscaling: "rps" is invalid: write a mapping (key: value)',
        ),
    ],
)
def test_bad_autoscaling_is_one_line_naming_the_key_and_the_fix(tmp_path: Path, lines: str, message: str) -> None:
    path = _with_autoscaling("prod", tmp_path / "Pulumi.prod.yaml", {"tiny-cnn": lines})
    with pytest.raises(ConfigError) as err:
        load_stack_config("prod", path)
    assert err.value.message == message


def test_targets_and_their_defaults(tmp_path: Path) -> None:
    cfg = load_stack_config("prod", _with_autoscaling("prod", tmp_path / "Pulumi.prod.yaml"))
    assert cfg.load_autoscaling
    mlp, cnn = cfg.model("mnist-mlp"), cfg.model("tiny-cnn")
    # rps without a target: the measured per-replica req/s less the headroom the sizing kept.
    assert mlp.autoscaling is not None and mlp.autoscaling.target is None
    assert mlp.load_target == round(130.0 / 1.3, 3)
    assert cnn.load_target == 200
    # No autoscaling key: the CPU HPA, exactly as before, and no KEDA.
    plain = load_stack_config("prod")
    assert not plain.load_autoscaling and all(m.autoscaling is None and m.load_target is None for m in plain.models)
    # An explicit target wins over the measurement.
    measured = "capacity: {per_replica_rps: 130.0, headroom: 0.3, measured: '2026-11-28'}"
    both = f"autoscaling: {{metric: rps, target: 42}}\n      {measured}"
    path = _with_autoscaling("prod", tmp_path / "explicit.yaml", {"mnist-mlp": both})
    assert load_stack_config("prod", path).model("mnist-mlp").load_target == 42


# ---------------------------------------------------------------------------------------------
# the ScaledObject component


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("rps", f'sum({LOAD_RPS}{{namespace="ml", model="m", job="m"}}) or vector(0)'),
        ("inflight", f'sum({LOAD_INFLIGHT}{{namespace="ml", model="m", job="m"}}) or vector(0)'),
        ("p99_ms", f'((max({LOAD_P99}{{namespace="ml", model="m", job="m"}}) * 1000) >= 0) or vector(0)'),
    ],
)
def test_queries_read_the_models_own_rules(metric: str, expected: str) -> None:
    assert query(metric, "ml", "m", "m") == expected


def test_threshold_is_a_plain_decimal_string() -> None:
    assert [threshold(x) for x in (100.0, 76.923, 0.5, 1e-7, 250000.0)] == ["100", "76.923", "0.5", "1e-07", "250000"]


def _service(load: LoadAutoscaling | None, **kw: Any) -> RecordingMocks:
    args = ModelServiceArgs(image=IMAGE, model_version="1", namespace="ml", load_autoscaling=load, **kw)
    mocks, _ = run_program(lambda: ModelService("m", args).url_path)
    return mocks


def test_model_service_has_a_scaled_object_instead_of_the_hpa() -> None:
    load = LoadAutoscaling(metric="rps", target=50.0, server_address=PROM_URL)
    mocks = _service(load, min_replicas=2, max_replicas=5)
    assert mocks.k8s_objects("HorizontalPodAutoscaler") == []
    (so,) = mocks.k8s_objects("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["metadata"]["name"] == "m"
    assert so["metadata"]["namespace"] == "ml"
    assert so["metadata"]["labels"]["app.kubernetes.io/name"] == "m"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (2, 5, 15)
    (trigger,) = spec["triggers"]
    assert trigger == {
        "type": "prometheus",
        "name": "rps",
        "metricType": "AverageValue",
        "metadata": {"serverAddress": PROM_URL, "query": query("rps", "ml", "m", "m"), "threshold": "50"},
    }
    # Prometheus unreachable: hold the replicas (never below min) instead of guessing.
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2, "behavior": "currentReplicasIfHigher"}
    # The component: its own type token, parented by the ModelService, the object parented by it.
    (component,) = [r for r in mocks.resources if r.typ == "dlstack:autoscaling:ScaledObject"]
    assert component.parent.endswith("dlstack:model_service:ModelService::m")
    (obj,) = [r for r in mocks.resources if r.typ == "kubernetes:keda.sh/v1alpha1:ScaledObject"]
    assert obj.parent == component.urn
    assert crd_errors(so) == []


def test_p99_scales_on_the_value_and_has_no_fallback() -> None:
    mocks = _service(LoadAutoscaling(metric="p99_ms", target=80.0, server_address=PROM_URL))
    (so,) = mocks.k8s_objects("ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    # KEDA accepts a fallback only on AverageValue triggers; p99 is the model's, not per replica.
    assert trigger["metricType"] == "Value" and "fallback" not in so["spec"]
    assert crd_errors(so) == []


def test_without_load_autoscaling_the_cpu_hpa_is_unchanged() -> None:
    mocks = _service(None, min_replicas=2, max_replicas=4, target_cpu_percent=65)
    assert mocks.k8s_objects("ScaledObject") == []
    (hpa,) = mocks.k8s_objects("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 65


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (
            LoadAutoscaling(metric="qps", target=1.0, server_address=PROM_URL),
            'load_autoscaling.metric "qps" is not one of rps, inflight, p99_ms',
        ),
        (
            LoadAutoscaling(metric="rps", target=0.0, server_address=PROM_URL),
            "load_autoscaling.target 0 must be a number > 0",
        ),
        (
            LoadAutoscaling(metric="rps", target=1.0, server_address="prometheus:9090"),
            'load_autoscaling.server_address "prometheus:9090" must be an http(s):// URL',
        ),
    ],
)
def test_bad_load_autoscaling_fails_before_anything_is_created(load: LoadAutoscaling, message: str) -> None:
    mocks = RecordingMocks()
    args = ModelServiceArgs(image=IMAGE, model_version="1", load_autoscaling=load)
    with pytest.raises(UserError) as err:
        run_program(lambda: ModelService("m", args), mocks=mocks)
    assert err.value.message == f"ModelService m: {message}"
    assert mocks.resources == []


def test_scaled_object_args_are_validated_on_their_own() -> None:
    mocks = RecordingMocks()
    load = LoadAutoscaling(metric="rps", target=1.0, server_address=PROM_URL)
    bad = ScaledObjectArgs(
        deployment="M", namespace="ml", model="m", job="m", min_replicas=0, max_replicas=1, load=load
    )
    with pytest.raises(UserError) as err:
        run_program(lambda: ScaledObject("so", bad), mocks=mocks)
    assert err.value.message == (
        'ScaledObject so: deployment "M" is not a DNS-1123 label; '
        "replicas min=0 max=1: need 1 <= min <= max; raise max or lower min"
    )
    assert mocks.resources == []


def test_the_crd_schema_judge_fails_a_broken_scaled_object() -> None:
    mocks = _service(LoadAutoscaling(metric="inflight", target=3.0, server_address=PROM_URL))
    (so,) = mocks.k8s_objects("ScaledObject")
    typo = copy.deepcopy(so)
    typo["spec"]["minReplicas"] = typo["spec"].pop("minReplicaCount")  # the HPA's spelling
    assert any("minReplicas" in e for e in crd_errors(typo))
    number = copy.deepcopy(so)
    number["spec"]["triggers"][0]["metadata"]["threshold"] = 3  # KEDA metadata values are strings
    assert any("threshold" in e for e in crd_errors(number))


# ---------------------------------------------------------------------------------------------
# the whole render of a stack with autoscaled models, and its judges


_RENDERS: dict[str, dict[str, Any]] = {}


def _render(stack: str, factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``stack`` with AUTOSCALED rendered once per test process; records each resource's dependencies."""
    from stacks.render import render

    if stack in _RENDERS:
        return _RENDERS[stack]
    tmp = factory.mktemp(f"autoscaled-{stack}")
    config = _with_autoscaling(stack, tmp / f"Pulumi.{stack}.yaml")
    deps: dict[str, list[str]] = {}
    register = RecordingMonitor.RegisterResource

    def spy(self: RecordingMonitor, req: Any) -> Any:
        resp = register(self, req)
        deps[resp.urn] = list(req.dependencies)
        return resp

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RecordingMonitor, "RegisterResource", spy)
        render(stack, tmp / "out", config_file=config, registry=stack_registry(tmp, (stack,)))
    _RENDERS[stack] = {
        "stack": stack,
        "out": tmp / "out",
        "objs": load_manifests(tmp / "out" / "manifests"),
        "deps": deps,
        "config": load_stack_config(stack, config),
    }
    return _RENDERS[stack]


@pytest.fixture(scope="module", params=["dev", "prod"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _render(request.param, tmp_path_factory)


def test_each_autoscaled_model_has_one_scaled_object_and_no_hpa(rendered: dict[str, Any]) -> None:
    objs, cfg = rendered["objs"], rendered["config"]
    scaled = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ScaledObject"}
    hpas = {o["metadata"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    assert set(scaled) == set(AUTOSCALED[rendered["stack"]])
    assert hpas == {m.name for m in cfg.models} - set(scaled)
    for name, so in scaled.items():
        m = cfg.model(name)
        assert m.autoscaling is not None and m.load_target is not None
        spec = so["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (m.replicas.min, m.replicas.max)
        (trigger,) = spec["triggers"]
        assert trigger["metadata"] == {
            # The Monitoring component's in-cluster Prometheus Service.
            "serverAddress": PROM_URL,
            "query": query(m.autoscaling.metric, cfg.namespaces.models, name, name),
            "threshold": threshold(m.load_target),
        }
    if rendered["stack"] == "prod":
        assert scaled["mnist-mlp"]["spec"]["triggers"][0]["metadata"]["threshold"] == "100"  # 130 / 1.3


def test_keda_is_installed_and_the_scaled_objects_wait_for_its_crds(rendered: dict[str, Any]) -> None:
    helm = YAML(typ="safe", pure=True).load((rendered["out"] / "helm" / "keda" / "keda.yaml").read_text())
    assert (helm["chart"], helm["version"], helm["repo"]) == ("keda", "2.20.2", "https://kedacore.github.io/charts")
    keda = [u for u in rendered["deps"] if u.endswith(f"{HELM_RELEASE}::keda")]
    scaled = [u for u in rendered["deps"] if "kubernetes:keda.sh/v1alpha1:ScaledObject::" in u]
    assert len(keda) == 1 and len(scaled) == len(AUTOSCALED[rendered["stack"]])
    for urn in scaled:
        assert keda[0] in rendered["deps"][urn], f"{urn} does not wait for KEDA's release"


def test_scaled_objects_match_the_strict_keda_crd_schema(rendered: dict[str, Any]) -> None:
    scaled = [o for o in rendered["objs"] if o["kind"] == "ScaledObject"]
    assert scaled and [e for o in scaled for e in crd_errors(o)] == []
    # The objects KEDA brings along are valid built-in kinds.
    new = [o for o in rendered["objs"] if "keda" in o["metadata"]["name"]]
    assert {o["kind"] for o in new} == {"Namespace", "NetworkPolicy"}
    assert [e for o in new for v in ("1.31", "1.34") for e in kubernetes_errors(o, v)] == []


def test_the_policy_pack_accepts_the_render(rendered: dict[str, Any]) -> None:
    from tests.test_policy import violations

    spec = importlib.util.spec_from_file_location("dlstack_policy_pack_autoscaling", ROOT / "infra/policy/__main__.py")
    assert spec and spec.loader
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    assert violations(pack, rendered["objs"], rendered["stack"]) == {}
    # ... and would refuse the HPA coming back beside a ScaledObject.
    so = next(o for o in rendered["objs"] if o["kind"] == "ScaledObject")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": so["metadata"]["name"], "namespace": so["metadata"]["namespace"]},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": so["metadata"]["name"]},
            "minReplicas": 2,
            "maxReplicas": 4,
        },
    }
    assert list(violations(pack, [*rendered["objs"], hpa], rendered["stack"])) == ["one-autoscaler"]


@pytest.mark.tool("promtool")
def test_promtool_accepts_the_rules_with_the_load_rules(rendered: dict[str, Any]) -> None:
    (rules,) = (rendered["out"] / "rules").rglob("*.yaml")
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = YAML(typ="safe", pure=True).load(rules.read_text())
    load = {(r["record"], r["labels"]["model"]) for g in doc["groups"] for r in g["rules"] if "record" in r}
    load = {x for x in load if x[0] in (LOAD_RPS, LOAD_INFLIGHT, LOAD_P99)}
    # Only the autoscaled models pay for the short-window rules.
    assert load == {(r, name) for name in AUTOSCALED[rendered["stack"]] for r in (LOAD_RPS, LOAD_INFLIGHT, LOAD_P99)}


def test_checkov_passes_what_autoscaling_adds(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """checkov is slow: the prod render's autoscaled models (ScaledObject instead of HPA) and KEDA's objects."""
    from tests.test_checkov import checkov, skips

    manifests = _render("prod", tmp_path_factory)["out"] / "manifests"
    picked = [
        p
        for p in manifests.rglob("*.yaml")
        if "keda" in p.name or any(p.name.endswith(f"-{name}.yaml") for name in AUTOSCALED["prod"])
    ]
    assert {p.name.split("-", 1)[0] for p in picked} >= {"deployment", "scaledobject", "namespace", "networkpolicy"}
    for p in picked:
        shutil.copy(p, tmp_path / f"{p.parent.name}-{p.name}")
    report = checkov(tmp_path, skips("prod"))
    failed = [f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in report["results"]["failed_checks"]]
    assert failed == [], "\n".join(failed)
    assert report["summary"]["passed"] > 0


# ---------------------------------------------------------------------------------------------
# end to end: the trigger queries against a real Prometheus scraping a real server under load

MODEL = "e2e-auto"
NS = "ml"


class _Load:
    """Inference requests from a few threads until stopped: the load a ScaledObject reacts to."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.stop, self.sent = url, threading.Event(), 0
        self.codes: set[int] = set()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        body = {"inputs": [{"name": "input", "shape": [4, 8], "datatype": "FP32", "data": [0.25] * 32}]}
        with requests.Session() as s:
            while not self.stop.is_set():
                self.codes.add(s.post(self.url, json=body, timeout=30).status_code)
                self.sent += 1

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, _Load]]:
    tmp = tmp_path_factory.mktemp("autoscaling-e2e")
    artifact = make_torch_mlp_artifact(tmp / "artifact", name=MODEL)
    (tmp / "rules.yaml").write_text(rule_file_yaml([ModelSLO(MODEL, NS, 0.01, 250, load_rules=True)]))
    with start_server(artifact, workers=2) as server:
        target = f"127.0.0.1:{server.port}"
        # The same server under the stable job and a canary job: the trigger must count only the first.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target], "labels": {"namespace": NS, "pod": job}}]}
                for job in (MODEL, f"{MODEL}-canary")
            ],
        }
        with running_prometheus(tmp, config) as url:
            wait_for(lambda: _query(url, f'up{{job="{MODEL}"}} == 1'), 60, "first scrape of the server", interval=0.5)
            with _Load(f"{server.url}/v2/models/{MODEL}/infer") as load:
                yield url, load


@pytest.mark.tool("prometheus")
@pytest.mark.xdist_group("prometheus_e2e")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("metric", ["rps", "inflight", "p99_ms"])
def test_trigger_query_returns_the_stable_jobs_load(prometheus: tuple[str, _Load], metric: str) -> None:
    url, load = prometheus
    record = {"rps": LOAD_RPS, "inflight": LOAD_INFLIGHT, "p99_ms": LOAD_P99}[metric]
    rule = f'{record}{{namespace="{NS}", model="{MODEL}"}}'
    # The recording rule has evaluated on real series: one per job, carrying the labels the query selects.
    series = wait_for(lambda: len(_query(url, rule)) == 2 and _query(url, rule), 60, f"{record} for both jobs")
    assert {s["metric"]["job"] for s in series} == {MODEL, f"{MODEL}-canary"}
    assert all({"namespace", "model", "job"} <= set(s["metric"]) for s in series)

    def sample() -> float | None:
        # Exactly what KEDA runs and requires: one sample.
        (result,) = _query(url, query(metric, NS, MODEL, MODEL))
        value = float(result["value"][1])
        return value if metric == "inflight" or value > 0 else None

    value = wait_for(sample, 60, f"{metric} under load")
    assert math.isfinite(value) and value >= 0
    stable = float(_query(url, f'{record}{{namespace="{NS}", model="{MODEL}", job="{MODEL}"}}')[0]["value"][1])
    if metric == "rps":
        # Requests really flowed, and the canary job's copy of the same series is not added in.
        assert load.sent > 0 and load.codes == {200}
        both = sum(float(s["value"][1]) for s in _query(url, rule))
        assert value < 0.75 * both
    if metric == "p99_ms":
        # Milliseconds, from the stable job's 1m p99 in seconds: a real latency, neither 0 nor absurd.
        assert 0 < value < 30_000
        assert math.isclose(value, stable * 1000, rel_tol=0.5)
