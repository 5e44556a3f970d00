"""Logging under Pulumi mocks: ECK objects wired to each other, retention, saved objects, no inlined credentials.

The setup Jobs' shell scripts are run for real with ``sh`` against a stub ``curl`` that records what it
was asked to do, so the success check and the credential handling are exercised, not just read.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from infra import kibana, logstash
from infra.helm import CHARTS
from infra.logging import (
    ILM_POLICY,
    LOGS_READER_ROLE,
    PREDICTIONS_ILM_POLICY,
    PREDICTIONS_READER_ROLE,
    Logging,
    LoggingArgs,
)
from services.serving.errors import UserError
from tests.k8s_checks import Recorded, manifest_errors, manifests, one, record


def render(**kw: Any) -> list[Recorded]:
    return record(lambda: Logging("logging", LoggingArgs(**kw)))


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return manifests(render(es_nodes=1, retention_days=3, predictions_retention_days=1, es_storage="5Gi"))


@pytest.fixture(scope="module")
def prod_records() -> list[Recorded]:
    return render(es_nodes=3, retention_days=30, es_storage="100Gi", storage_class="premium-rwo", kibana_replicas=2)


@pytest.fixture(scope="module")
def prod(prod_records: list[Recorded]) -> list[dict[str, Any]]:
    return manifests(prod_records)


def test_every_object_is_valid(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    kinds = set()
    for obj in dev + prod:
        kinds.add(obj["kind"])
        assert manifest_errors(obj) == [], obj["kind"]
    assert {"Elasticsearch", "Kibana", "Logstash", "Beat", "Job", "ConfigMap", "NetworkPolicy"} <= kinds


def test_eck_operator_chart_is_pinned(prod_records: list[Recorded]) -> None:
    (rel,) = [r for r in prod_records if r.type == "kubernetes:helm.sh/v3:Release"]
    pin = CHARTS["eck-operator"]
    assert (rel.inputs["chart"], rel.inputs["version"], rel.inputs["namespace"]) == (pin.name, pin.version, "logging")


def test_elasticsearch_nodes_and_storage_per_environment(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    for objs, count, size in ((dev, 1, "5Gi"), (prod, 3, "100Gi")):
        (node_set,) = one(objs, "Elasticsearch")["spec"]["nodeSets"]
        assert node_set["count"] == count
        (claim,) = node_set["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "elasticsearch-data"  # the name ECK mounts as the data dir
        assert claim["spec"]["resources"]["requests"]["storage"] == size
    (node_set,) = one(prod, "Elasticsearch")["spec"]["nodeSets"]
    assert node_set["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "premium-rwo"
    assert "storageClassName" not in one(dev, "Elasticsearch")["spec"]["nodeSets"][0]["volumeClaimTemplates"][0]["spec"]


def test_kibana_and_logstash_reference_elasticsearch(prod: list[dict[str, Any]]) -> None:
    es_name = one(prod, "Elasticsearch")["metadata"]["name"]
    assert one(prod, "Kibana")["spec"]["elasticsearchRef"] == {"name": es_name}
    assert one(prod, "Kibana")["spec"]["count"] == 2
    ls = one(prod, "Logstash")["spec"]
    (ref,) = ls["elasticsearchRefs"]
    assert ref["name"] == es_name
    # ECK injects <CLUSTERNAME>_ES_HOSTS/_USER/_PASSWORD; the pipeline must read exactly those.
    (pipe,) = ls["pipelines"]
    prefix = ref["clusterName"].upper().replace("-", "_") + "_ES_"
    used = set(re.findall(r"\$\{([A-Z_]+)\}", pipe["config.string"]))
    assert used == {prefix + s for s in ("HOSTS", "USER", "PASSWORD", "SSL_CERTIFICATE_AUTHORITY")}


def test_beat_ships_models_namespace_to_logstash_service(prod: list[dict[str, Any]]) -> None:
    beat, ls = one(prod, "Beat"), one(prod, "Logstash")
    assert beat["spec"]["type"] == "filebeat"
    (svc,) = ls["spec"]["services"]
    (port,) = svc["service"]["spec"]["ports"]
    # ECK names a Logstash service "<logstash>-ls-<service name>" in the Logstash namespace.
    service_dns = f"{ls['metadata']['name']}-ls-{svc['name']}.{ls['metadata']['namespace']}.svc:{port['port']}"
    assert beat["spec"]["config"]["output.logstash"]["hosts"] == [service_dns]
    assert f"port => {port['targetPort']}" in ls["spec"]["pipelines"][0]["config.string"]
    (provider,) = beat["spec"]["config"]["filebeat.autodiscover"]["providers"]
    assert provider["type"] == "kubernetes" and provider["namespace"] == "models"
    # Autodiscover needs API access: the Beat's ServiceAccount is bound to a read-only ClusterRole.
    sa = beat["spec"]["daemonSet"]["podTemplate"]["spec"]["serviceAccountName"]
    binding = one(prod, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "logging"}]
    role = one(prod, "ClusterRole", binding["roleRef"]["name"])
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}


def test_retention_is_an_ilm_policy_bound_to_the_logstash_indices(dev: list[dict[str, Any]]) -> None:
    files = one(dev, "ConfigMap", "dlstack-ilm-setup")["data"]
    policy = json.loads(files["ilm-policy.json"])["policy"]
    assert policy["phases"]["delete"]["min_age"] == "3d"
    assert json.loads(files["predictions-ilm-policy.json"])["policy"]["phases"]["delete"]["min_age"] == "1d"
    templates = {
        ILM_POLICY: json.loads(files["index-template.json"]),
        PREDICTIONS_ILM_POLICY: json.loads(files["predictions-index-template.json"]),
    }
    for policy_name, template in templates.items():
        assert template["template"]["settings"]["index.lifecycle.name"] == policy_name
        assert template["template"]["settings"]["index.number_of_replicas"] == 0  # one node: replicas can't be placed
    # Each index Logstash writes today falls under exactly one template: the one with its own retention.
    pipe = one(dev, "Logstash")["spec"]["pipelines"][0]["config.string"]
    indices = re.findall(r'index => "([^"]+)"', pipe)
    assert indices == [
        f"{logstash.PREDICTIONS_INDEX_PREFIX}-%{{+YYYY.MM.dd}}",
        f"{logstash.INDEX_PREFIX}-%{{+YYYY.MM.dd}}",
    ]
    for index, policy_name in zip(indices, (PREDICTIONS_ILM_POLICY, ILM_POLICY), strict=True):
        today = index.replace("%{+YYYY.MM.dd}", date.today().strftime("%Y.%m.%d"))
        matching = [n for n, t in templates.items() if any(fnmatch.fnmatch(today, p) for p in t["index_patterns"])]
        assert matching == [policy_name], today


def test_prediction_tensors_are_stored_not_indexed(dev: list[dict[str, Any]]) -> None:
    """Tensors differ in type between models; dynamically mapped, one model's strings would fail to index."""
    files = one(dev, "ConfigMap", "dlstack-ilm-setup")["data"]
    props = json.loads(files["predictions-index-template.json"])["template"]["mappings"]["properties"]
    prediction = props["dlstack"]["properties"]["prediction"]["properties"]
    assert prediction["inputs"] == prediction["outputs"] == {"type": "object", "enabled": False}
    assert prediction["latency_ms"] == {"type": "float"}
    assert props["http"]["properties"]["response"]["properties"]["status_code"] == {"type": "integer"}
    assert props["labels"]["properties"]["model"] == {"type": "keyword"}


def test_reading_logs_does_not_grant_reading_predictions(dev: list[dict[str, Any]]) -> None:
    files = one(dev, "ConfigMap", "dlstack-ilm-setup")["data"]
    logs_role = json.loads(files["logs-reader-role.json"])
    pred_role = json.loads(files["predictions-reader-role.json"])
    (logs_indices,) = logs_role["indices"]
    (pred_indices,) = pred_role["indices"]
    assert logs_indices["names"] == [f"{logstash.INDEX_PREFIX}-*"]
    assert pred_indices["names"] == [f"{logstash.PREDICTIONS_INDEX_PREFIX}-*"]
    today = date.today().strftime("%Y.%m.%d")
    assert not fnmatch.fnmatch(f"{logstash.PREDICTIONS_INDEX_PREFIX}-{today}", logs_indices["names"][0])
    assert set(pred_indices["privileges"]) == {"read", "view_index_metadata"}  # read only


def test_credentials_are_referenced_never_inlined(prod: list[dict[str, Any]]) -> None:
    assert not [o for o in prod if o["kind"] == "Secret"], "ECK generates the credentials"
    text = json.dumps(prod)
    assert not re.search(r'"(password|PASSWORD)"\s*:', text)
    es = one(prod, "Elasticsearch")["metadata"]["name"]
    for job in (o for o in prod if o["kind"] == "Job"):
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["elastic-user"]["secret"]["secretName"] == f"{es}-es-elastic-user"
        assert "env" not in job["spec"]["template"]["spec"]["containers"][0]


def test_saved_objects_configmap_is_the_kibana_ndjson(dev: list[dict[str, Any]]) -> None:
    ndjson = one(dev, "ConfigMap", "dlstack-kibana-objects")["data"]["saved-objects.ndjson"]
    assert ndjson == kibana.to_ndjson(kibana.saved_objects(logstash.INDEX_PREFIX))
    objects = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
    assert {o["id"] for o in objects} >= {kibana.DATA_VIEW_ID, kibana.ERRORS_SEARCH_ID}


def script_of(objs: list[dict[str, Any]], name: str) -> str:
    (container,) = one(objs, "Job", name)["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["/bin/sh", "-ec"]
    return container["command"][2]


def run_script(
    tmp_path: Path, script: str, answer: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, str]]]:
    """Run a Job script with ``sh``: stub curl logs its argv and stdin, the mounts live under tmp_path."""
    secrets = tmp_path / "secrets"
    (secrets / "elastic-user").mkdir(parents=True)
    (secrets / "elastic-user" / "elastic").write_text("s3cr3t-pw")
    (secrets / "ca").mkdir()
    (secrets / "ca" / "ca.crt").write_text("CA")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "curl.log"
    stub = bin_dir / "curl"
    stub.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}) + '\\n')\n"
        f"print({answer!r})\n"
    )
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["sh", "-ec", script.replace("/secrets/", f"{secrets}/")], env=env, capture_output=True, text=True, timeout=30
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_ilm_job_puts_policy_then_template(tmp_path: Path, dev: list[dict[str, Any]]) -> None:
    proc, calls = run_script(tmp_path, script_of(dev, "dlstack-ilm-setup"), '{"acknowledged":true}')
    assert proc.returncode == 0, proc.stderr
    urls = [c["argv"][-1] for c in calls]
    base = "https://dlstack-es-http.logging.svc:9200"
    assert urls == [
        f"{base}/_ilm/policy/{ILM_POLICY}",
        f"{base}/_index_template/{ILM_POLICY}",
        f"{base}/_ilm/policy/{PREDICTIONS_ILM_POLICY}",
        f"{base}/_index_template/{PREDICTIONS_ILM_POLICY}",
        f"{base}/_security/role/{LOGS_READER_ROLE}",
        f"{base}/_security/role/{PREDICTIONS_READER_ROLE}",
    ]
    # Each PUT sends the file the ConfigMap holds for it.
    files = one(dev, "ConfigMap", "dlstack-ilm-setup")["data"]
    sent = [c["argv"][c["argv"].index("--data-binary") + 1].removeprefix("@/setup/") for c in calls]
    assert set(sent) == set(files)
    for call in calls:
        assert "s3cr3t-pw" not in " ".join(call["argv"]), "the password must not be on the command line"
        assert call["stdin"] == 'user = "elastic:s3cr3t-pw"\n'
        assert "--fail-with-body" in call["argv"] and "--cacert" in call["argv"]


@pytest.mark.parametrize(("answer", "code"), [('{"success":true,"successCount":2}', 0), ('{"success":false}', 1)])
def test_kibana_import_job_fails_unless_kibana_reports_success(
    tmp_path: Path, dev: list[dict[str, Any]], answer: str, code: int
) -> None:
    proc, calls = run_script(tmp_path, script_of(dev, "dlstack-kibana-objects"), answer)
    assert proc.returncode == code, proc.stderr
    (call,) = calls
    assert call["argv"][-1] == "https://dlstack-kb-http.logging.svc:5601/api/saved_objects/_import?overwrite=true"
    assert "kbn-xsrf: true" in call["argv"] and "file=@/setup/saved-objects.ndjson" in call["argv"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"retention_days": 0}, "retention_days 0 must be between 1 and 3650"),
        ({"es_storage": "big"}, 'es_storage "big" is not a Kubernetes quantity'),
        ({"version": "latest"}, 'version "latest" is not an Elastic stack version'),
        ({"predictions_retention_days": 0}, "predictions_retention_days 0 must be between 1 and 3650"),
        ({"predictions_index_prefix": "dlstack-logs-pred"}, "index prefixes 'dlstack-logs' .* overlap"),
        ({"index_prefix": "ml", "predictions_index_prefix": "ml"}, "index prefixes 'ml' .* overlap"),
    ],
)
def test_bad_args_create_nothing(kw: dict[str, Any], message: str) -> None:
    created: list[Any] = []
    with pytest.raises(UserError, match=message):
        record(lambda: created.append(Logging("logging", LoggingArgs(**kw))))
    assert not created
