"""The generated SLO rules pass `promtool check rules` and the `promtool test rules` unit tests in tests/promtool/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from infra.alerts import ALERT_DRIFT, ALERTS, ModelSLO, rule_file_yaml, rule_groups
from services.serving.errors import UserError

PROMTOOL = shutil.which("promtool")
UNIT_TESTS = Path(__file__).parent / "promtool" / "slo_alerts_test.yaml"
# The two models tests/promtool/slo_alerts_test.yaml is written for.
STRICT = ModelSLO(name="strict", namespace="ml", error_ratio=0.01, p99_ms=250)
RELAXED = ModelSLO(name="relaxed", namespace="ml", error_ratio=0.2, p99_ms=1000)

pytestmark = pytest.mark.tool("promtool")


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def _workdir(tmp_path: Path, models: list[ModelSLO]) -> Path:
    """rules.yaml from the generator next to a copy of the unit tests (promtool resolves rule_files there)."""
    (tmp_path / "rules.yaml").write_text(rule_file_yaml(models))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path


def test_generated_rules_pass_promtool_check(tmp_path: Path) -> None:
    d = _workdir(tmp_path, [STRICT, RELAXED])
    res = _promtool("check", "rules", d / "rules.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 18 rules found" in res.stdout  # 2 models x (5 recording rules + 4 alerts)


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    d = _workdir(tmp_path, [STRICT, RELAXED])
    res = _promtool("test", "rules", d / UNIT_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_unit_tests_fail_when_the_slo_is_not_applied(tmp_path: Path) -> None:
    """Proof the unit tests can fail: give "strict" the relaxed SLO and its alerts no longer fire."""
    d = _workdir(tmp_path, [ModelSLO(name="strict", namespace="ml", error_ratio=0.2, p99_ms=1000), RELAXED])
    res = _promtool("test", "rules", d / UNIT_TESTS.name)
    assert res.returncode != 0
    assert "DlstackModelErrorRatioHigh" in res.stdout + res.stderr
    assert "DlstackModelLatencyP99High" in res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    suite = YAML(typ="safe").load(UNIT_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for t in suite["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                # The other model gets the same input but must never appear.
                assert alert["exp_labels"]["model"] == "strict"
    generated = {r["alert"] for g in rule_groups([STRICT]) for r in g["rules"] if "alert" in r}
    assert generated == set(ALERTS)
    assert firing == set(ALERTS), f"alerts without a firing test: {set(ALERTS) - firing}"
    assert quiet == set(ALERTS), f"alerts without a quiet test: {set(ALERTS) - quiet}"


def test_alerts_carry_labels_and_annotations() -> None:
    (group,) = rule_groups([STRICT])
    assert group["name"] == "dlstack-ml-strict"
    records = [r["record"] for r in group["rules"] if "record" in r]
    assert "model:dlstack_request_error_ratio:rate5m" in records
    for rule in group["rules"]:
        if "alert" in rule:
            assert rule["labels"]["model"] == "strict"
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def test_job_and_deployment_labels_follow_the_args() -> None:
    m = ModelSLO(name="m", namespace="ml", error_ratio=0.01, p99_ms=100, job="m-svc", deployment="m-dep")
    exprs = {r["alert"]: r["expr"] for g in rule_groups([m]) for r in g["rules"] if "alert" in r}
    # The canary's Service and Deployment are "<name>-canary".
    assert 'job=~"m-svc(-canary)?"' in exprs["DlstackModelTargetDown"]
    assert 'deployment=~"m-dep(-canary)?"' in exprs["DlstackModelPodsNotReady"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"error_ratio": 1.5}, "slo.error_ratio 1.5 must be between 0 and 1"),
        ({"p99_ms": 0}, "slo.p99_ms 0 must be a positive number"),
        ({"name": "Bad_Name"}, "DNS-1123"),
        ({"error_for": "5 minutes"}, "error_for='5 minutes' is not a Prometheus duration"),
    ],
)
def test_bad_slo_is_a_clear_user_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "m", "namespace": "ml", "error_ratio": 0.01, "p99_ms": 100, **kwargs}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        ModelSLO(**args)  # type: ignore[arg-type]


def test_duplicate_model_is_rejected() -> None:
    with pytest.raises(UserError, match="listed twice"):
        rule_groups([STRICT, STRICT])


# --- drift (tests/promtool/drift_test.yaml) ---------------------------------------------------------------

DRIFT_TESTS = Path(__file__).parent / "promtool" / "drift_test.yaml"


def _drift_models(**kw: object) -> list[ModelSLO]:
    return [
        ModelSLO(name=n, namespace="ml", error_ratio=0.01, p99_ms=250, drift=True, **kw)  # type: ignore[arg-type]
        for n in ("steady", "drifted", "trickle")
    ]


def _drift_workdir(tmp_path: Path, models: list[ModelSLO]) -> Path:
    (tmp_path / "rules.yaml").write_text(rule_file_yaml(models))
    shutil.copy(DRIFT_TESTS, tmp_path / DRIFT_TESTS.name)
    return tmp_path


def test_drift_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    d = _drift_workdir(tmp_path, _drift_models())
    res = _promtool("check", "rules", d / "rules.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 42 rules found" in res.stdout  # 3 models x (5 SLO + 4 drift recording rules + 4 + 1 alerts)
    res = _promtool("test", "rules", d / DRIFT_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("kwargs", "fails"),
    [
        ({"drift_psi": 5.0}, "DlstackModelDrift"),  # the threshold is applied: 3.8 no longer fires
        ({"drift_min_rows": 100}, "trickle"),  # the row minimum is what keeps the trickle quiet
    ],
)
def test_drift_unit_tests_fail_when_a_knob_is_not_applied(
    tmp_path: Path, kwargs: dict[str, object], fails: str
) -> None:
    d = _drift_workdir(tmp_path, _drift_models(**kwargs))
    res = _promtool("test", "rules", d / DRIFT_TESTS.name)
    assert res.returncode != 0
    assert fails in res.stdout + res.stderr


def test_drift_rules_are_opt_in_and_carry_the_runbook() -> None:
    assert ALERT_DRIFT not in {r.get("alert") for g in rule_groups([STRICT]) for r in g["rules"]}
    m = ModelSLO(name="m", namespace="ml", error_ratio=0.01, p99_ms=100, drift=True, drift_window="30m")
    (group,) = rule_groups([m])
    records = [r["record"] for r in group["rules"] if "record" in r]
    assert "model:dlstack_drift_psi:30m" in records and "model:dlstack_drift_rows:30m" in records
    (alert,) = [r for r in group["rules"] if r.get("alert") == ALERT_DRIFT]
    assert alert["annotations"]["runbook_url"].endswith("#runbook-dlstackmodeldrift")
    assert "[30m]" in " ".join(str(r["expr"]) for r in group["rules"])
    with pytest.raises(UserError, match="drift_window='1 hour' is not a Prometheus duration"):
        ModelSLO(name="m", namespace="ml", error_ratio=0.01, p99_ms=100, drift_window="1 hour")
    with pytest.raises(UserError, match="drift_psi=0 and drift_min_rows=500 must both be > 0"):
        ModelSLO(name="m", namespace="ml", error_ratio=0.01, p99_ms=100, drift_psi=0)
