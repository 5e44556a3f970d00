"""Stack file -> rendered pod env -> a REAL server's effective settings, and every bad DLSTACK_* value.

The stack file is a copy of Pulumi.dev.yaml with its models edited; the program is evaluated under
Pulumi mocks (the only mock); each Deployment's container env is handed, as rendered, to a real
gunicorn server of a real TorchScript model built here, which reports what it does in
``GET /v2/models/{name}`` (``parameters``) and in its ``effective settings`` log line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from ruamel.yaml import YAML

from services.serving.artifact import AUTO_MAX_BATCH_SIZE, Signature, read_spec, write_spec
from services.serving.errors import UserError
from services.serving.server.settings import ServerSettings
from stacks.config import load_stack_config
from stacks.mocks import run_program
from stacks.program import BuildOptions, build
from tests.conftest import ROOT, free_port, make_torch_mlp_artifact
from tests.serving import start_server

pytestmark = pytest.mark.xdist_group("program")

# (stack entry, registered model, batching block of the stack file or None, the server's max_batch_size)
CASES = [
    ("override", "yaml16", {"max_batch_size": 4, "max_batch_time_ms": 1}, 4),  # the stack file wins
    ("from-yaml", "yaml16", None, 16),  # no override: model.yaml serving.max_batch_size
    ("auto", "auto", None, AUTO_MAX_BATCH_SIZE),  # model.yaml unset, variable batch dim: batching on
    ("fixed", "fixed", None, 1),  # model.yaml unset, fixed batch dim: batching off
]


def _fixed_batch(art: Path) -> Path:
    """The same MLP with a fixed batch dim of 1 in its signature (as an exported graph would have)."""
    spec = read_spec(art)
    sig = spec.signature
    fixed = Signature(
        inputs=tuple(t.model_copy(update={"shape": (1, *t.shape[1:])}) for t in sig.inputs),
        outputs=tuple(t.model_copy(update={"shape": (1, *t.shape[1:])}) for t in sig.outputs),
    )
    write_spec(art, spec.model_copy(update={"signature": fixed}))
    return art


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, str], Path]]:
    """{stack entry: (its Deployment's container env, the artifact it serves)} from an edited dev stack file."""
    from services.registry import Registry

    tmp = tmp_path_factory.mktemp("settings-e2e")
    arts = {
        "yaml16": make_torch_mlp_artifact(tmp / "yaml16", name="yaml16", max_batch_size=16),
        "auto": make_torch_mlp_artifact(tmp / "auto", name="auto"),
        "fixed": _fixed_batch(make_torch_mlp_artifact(tmp / "fixed", name="fixed")),
    }
    registry = Registry(tmp / "registry")
    for name, art in arts.items():
        registry.register(art, name, "pytorch")

    yaml = YAML()
    doc = yaml.load((ROOT / "Pulumi.dev.yaml").read_text())
    template = doc["config"]["dlstack:models"][0]
    models = []
    for entry, model, batching, _ in CASES:
        m = json.loads(json.dumps(template))  # a plain copy of the committed entry
        m.update(name=entry, model=f"{model}:1", workers=1)
        m.pop("batching")
        if batching is not None:
            m["batching"] = batching
        models.append(m)
    models[0].update(prediction_log={"sample": 0.01, "max_bytes": 512}, drift={"sample": 0.1, "max_rows_per_s": 50})
    doc["config"]["dlstack:models"] = models
    stack_file = tmp / "Pulumi.dev.yaml"
    with stack_file.open("w") as fh:
        yaml.dump(doc, fh)

    cfg = load_stack_config("dev", stack_file)
    opts = BuildOptions(build_root=tmp / "contexts", prepare_images=False)
    mocks, _ = run_program(lambda: build(cfg, registry, opts), stack="dev")
    out = {}
    for entry, model, _, _ in CASES:
        (container,) = mocks.k8s_object("Deployment", entry, "models")["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        out[entry] = (env, arts[model])
    return out


def _serve(env: dict[str, str], art: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start gunicorn with exactly the rendered DLSTACK_* env (bound to loopback); its metadata and settings line."""
    port = free_port()
    server_env = {k: v for k, v in env.items() if k.startswith("DLSTACK_")}
    server_env[ServerSettings.env_name("bind")] = f"127.0.0.1:{port}"  # the pod binds 0.0.0.0:8080
    name = read_spec(art).name
    with start_server(art, workers=1, port=port, env=server_env, direct=True) as srv:
        meta = requests.get(f"{srv.url}/v2/models/{name}", timeout=30).json()
        (line,) = [d for d in srv.json_lines() if d.get("message", "").startswith("effective settings")]
    return meta, line["dlstack"]["settings"]


@pytest.fixture(scope="module")
def served(
    rendered: dict[str, tuple[dict[str, str], Path]],
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """{stack entry: (GET /v2/models/{name}, the effective settings line)}: one real server per entry."""
    return {entry: _serve(*rendered[entry]) for entry, *_ in CASES}


@pytest.mark.parametrize(("entry", "expected"), [pytest.param(c[0], c[3], id=c[0]) for c in CASES])
def test_stack_file_batching_reaches_the_server(
    rendered: dict[str, tuple[dict[str, str], Path]],
    served: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    entry: str,
    expected: int,
) -> None:
    env, art = rendered[entry]
    batching = next(c[2] for c in CASES if c[0] == entry)
    # Only what the stack file sets is in the pod env; model.yaml decides the rest.
    assert ("DLSTACK_MAX_BATCH_SIZE" in env) == (batching is not None)
    meta, settings = served[entry]
    assert meta["parameters"]["max_batch_size"] == expected
    assert settings["max_batch_size"] == expected
    want_ms = batching["max_batch_time_ms"] if batching else read_spec(art).serving.max_batch_time_ms
    assert meta["parameters"]["max_batch_time_ms"] == settings["max_batch_time_ms"] == want_ms
    assert settings["workers"] == 1 and settings["cpu_limit"] == 1.0  # resources.cpu 500m: limit 2 x = 1000m


def test_production_feedback_knobs_reach_the_server(
    rendered: dict[str, tuple[dict[str, str], Path]], served: dict[str, tuple[dict[str, Any], dict[str, Any]]]
) -> None:
    env = rendered["override"][0]
    assert env["DLSTACK_PREDICTION_LOG_SAMPLE"] == "0.01" and env["DLSTACK_DRIFT_SAMPLE"] == "0.1"
    on, off = served["override"][1], served["auto"][1]
    assert (on["prediction_log_sample"], on["prediction_log_max_bytes"], on["drift_sample"]) == (0.01, 512, 0.1)
    assert env["DLSTACK_DRIFT_MAX_ROWS_PER_S"] == "50" and on["drift_max_rows_per_s"] == 50
    # an entry without them leaves them out of the pod: the server's defaults (off), not a copy of them
    assert not {k for k in rendered["auto"][0] if "PREDICTION_LOG" in k or "DRIFT" in k}
    defaults = ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": "/m"})
    assert (off["prediction_log_sample"], off["drift_sample"]) == (defaults.prediction_log_sample, 0.0)
    assert off["prediction_log_max_bytes"] == defaults.prediction_log_max_bytes
    assert off["drift_max_rows_per_s"] == defaults.drift_max_rows_per_s == 20


def test_model_yaml_unset_means_auto_from_the_signature(tmp_path: Path) -> None:
    auto = read_spec(make_torch_mlp_artifact(tmp_path / "auto", name="auto"))
    fixed = read_spec(_fixed_batch(make_torch_mlp_artifact(tmp_path / "fixed", name="fixed")))
    explicit = read_spec(make_torch_mlp_artifact(tmp_path / "one", name="one", max_batch_size=1))
    assert (auto.serving.max_batch_size, auto.max_batch_size) == (None, AUTO_MAX_BATCH_SIZE)
    assert (fixed.serving.max_batch_size, fixed.max_batch_size) == (None, 1)
    assert explicit.max_batch_size == 1  # an explicit 1 turns batching off even for a variable batch dim
    assert "max_batch_size" not in (tmp_path / "auto" / "model.yaml").read_text()  # unset stays unset


# ---------------------------------------------------------------------------------------------
# bad values: one line that names the variable and the fix

BAD = [
    ("DLSTACK_WORKERS", "x", "DLSTACK_WORKERS='x' is not an integer; set it to a whole number >= 1"),
    ("DLSTACK_WORKERS", "0", "DLSTACK_WORKERS='0' is out of range; set it to a whole number >= 1"),
    ("DLSTACK_WORKERS", "1.5", "DLSTACK_WORKERS='1.5' is not an integer; set it to a whole number >= 1"),
    ("DLSTACK_HTTP_THREADS", "-2", "DLSTACK_HTTP_THREADS='-2' is out of range; set it to a whole number >= 1"),
    (
        "DLSTACK_CPU_LIMIT",
        "two",
        'DLSTACK_CPU_LIMIT=\'two\' is not a number; set it to a CPU count > 0, e.g. "2", "1.5" or "500m"',
    ),
    ("DLSTACK_CPU_LIMIT", "xm", 'DLSTACK_CPU_LIMIT=\'xm\' is not a CPU count; set it to e.g. "2", "1.5" or "500m"'),
    (
        "DLSTACK_CPU_LIMIT",
        "0m",
        'DLSTACK_CPU_LIMIT=\'0m\' is out of range; set it to a CPU count > 0, e.g. "2", "1.5" or "500m"',
    ),
    ("DLSTACK_TIMEOUT", "0", "DLSTACK_TIMEOUT='0' is out of range; set it to a whole number >= 1"),
    ("DLSTACK_KEEPALIVE", "-1", "DLSTACK_KEEPALIVE='-1' is out of range; set it to a whole number >= 0"),
    ("DLSTACK_DRAIN_SECONDS", "nan", "DLSTACK_DRAIN_SECONDS='nan' is not a finite number; set it to a number >= 0"),
    ("DLSTACK_LOG_FORMAT", "xml", "DLSTACK_LOG_FORMAT='xml' is not one of auto, json, text (--log-format)"),
    (
        "DLSTACK_PRELOAD_FRAMEWORK",
        "maybe",
        "DLSTACK_PRELOAD_FRAMEWORK='maybe' is not a boolean; set it to 1 or 0 (true/false)",
    ),
    ("DLSTACK_MAX_BATCH_SIZE", "0", "DLSTACK_MAX_BATCH_SIZE='0' is out of range; set it to a whole number >= 1"),
    ("DLSTACK_MAX_BATCH_TIME_MS", "soon", "DLSTACK_MAX_BATCH_TIME_MS='soon' is not a number; set it to a number >= 0"),
    (
        "DLSTACK_MAX_BODY_BYTES",
        "100",
        "DLSTACK_MAX_BODY_BYTES='100' is out of range; set it to a whole number >= 1024",
    ),
    ("DLSTACK_HEADER_TIMEOUT_S", "0", "DLSTACK_HEADER_TIMEOUT_S='0' is out of range; set it to a number > 0"),
    (
        "DLSTACK_PREDICTION_LOG_SAMPLE",
        "2",
        "DLSTACK_PREDICTION_LOG_SAMPLE='2' is out of range; set it to a number between 0 and 1",
    ),
    (
        "DLSTACK_DRIFT_SAMPLE",
        "inf",
        "DLSTACK_DRIFT_SAMPLE='inf' is not a finite number; set it to a number between 0 and 1",
    ),
]


@pytest.mark.parametrize(("key", "raw", "message"), [pytest.param(*b, id=f"{b[0]}={b[1]}") for b in BAD])
def test_a_bad_value_is_one_line_naming_the_variable_and_the_fix(key: str, raw: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": "/m", key: raw})
    assert err.value.message == message


_NOT_A_NUMBER = {"artifact_dir", "bind"}  # any text is a path / an address (gunicorn checks the address)


@pytest.mark.parametrize("field", sorted(set(ServerSettings.model_fields) - _NOT_A_NUMBER))
def test_every_setting_rejects_garbage_in_one_line(field: str) -> None:
    key = ServerSettings.env_name(field)
    with pytest.raises(UserError) as err:
        ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": "/m", key: "garbage"})
    assert err.value.message.startswith(f"{key}='garbage' is not ") and "\n" not in err.value.message
    assert "set it to" in err.value.message or "--log-format" in err.value.message


def test_several_bad_values_and_a_missing_artifact_dir_are_one_line() -> None:
    with pytest.raises(UserError) as err:
        ServerSettings.from_env({"DLSTACK_WORKERS": "x", "DLSTACK_DRIFT_SAMPLE": "-1"})
    assert err.value.message == (
        "DLSTACK_ARTIFACT_DIR is not set; start the server with `dlstack serve ARTIFACT_DIR`; "
        "DLSTACK_WORKERS='x' is not an integer; set it to a whole number >= 1; "
        "DLSTACK_DRIFT_SAMPLE='-1' is out of range; set it to a number between 0 and 1"
    )


def test_settings_to_env_uses_the_field_names_and_refuses_typos() -> None:
    env = ServerSettings.to_env(max_batch_size=4, drift_sample=0.1, preload_framework=False, workers=None)
    assert env == {"DLSTACK_MAX_BATCH_SIZE": "4", "DLSTACK_DRIFT_SAMPLE": "0.1", "DLSTACK_PRELOAD_FRAMEWORK": "0"}
    with pytest.raises(KeyError, match="max_batchsize"):
        ServerSettings.to_env(max_batchsize=4)
    with pytest.raises(UserError, match="DLSTACK_MAX_BATCH_SIZE='0'"):
        ServerSettings.to_env(max_batch_size=0)


def test_a_misspelled_setting_is_named_with_the_right_one() -> None:
    env = {"DLSTACK_MAX_BATCHSIZE": "4", "DLSTACK_WORKER": "2", "DLSTACK_REGISTRY": "/r", "DLSTACK_WORKERS": "2"}
    assert ServerSettings.misspelled(env) == [
        "DLSTACK_MAX_BATCHSIZE is not a server setting and is ignored; did you mean DLSTACK_MAX_BATCH_SIZE?",
        "DLSTACK_WORKER is not a server setting and is ignored; did you mean DLSTACK_WORKERS?",
    ]  # the registry's own variable shares the prefix and is no typo


@pytest.mark.parametrize("how", ["gunicorn", "dlstack serve"])
def test_a_bad_env_fails_once_before_any_worker_starts(tmp_path: Path, how: str) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    env = {
        "PATH": "/usr/bin:/bin",
        "DLSTACK_ARTIFACT_DIR": str(art),
        "DLSTACK_WORKERS": "2",
        "DLSTACK_DRIFT_SAMPLE": "x",
    }
    if how == "gunicorn":
        from services.serving.server.cli import APP, CONF

        argv = [sys.executable, "-m", "gunicorn", "-c", CONF, APP, "--bind", f"127.0.0.1:{free_port()}"]
    else:
        argv = [
            sys.executable,
            "-m",
            "stacks.cli",
            "serve",
            str(art),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "dlstack serve: error: DLSTACK_DRIFT_SAMPLE='x' is not a number; set it to a number between 0 and 1"
    ]
    assert "Booting worker" not in res.stdout + res.stderr


def test_no_server_module_reads_dlstack_env_itself() -> None:
    """ServerSettings is the one reader of DLSTACK_* variables."""
    server = ROOT / "services" / "serving" / "server"
    # DLSTACK_OWNS_METRICS_DIR is plumbing between `dlstack serve` and gunicorn_conf, not a setting.
    direct = re.compile(r'(os\.environ(\.get\(|\[)|getenv\()"DLSTACK_(?!OWNS_METRICS_DIR")')
    readers = [p.name for p in server.glob("*.py") if direct.search(p.read_text())]
    assert readers == []
