"""User-facing frictions of the CLI and the server, each checked through the real ``dlstack`` command."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from services.packaging import framework_message, parse_datatype
from services.serving.artifact import Datatype, read_spec
from services.serving.errors import UserError
from services.serving.server.settings import log_format
from stacks.cli import main
from tests.conftest import ROOT, free_port, make_torch_mlp_artifact
from tests.serving import ServerHandle


def dlstack(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real CLI in its own process (``serve`` execs gunicorn, which must not replace the test process)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "stacks.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchscript_file(path: Path, sizes: tuple[int, int, int] = (8, 16, 3)) -> Path:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(), torch.nn.Linear(*sizes[1:]))
    torch.jit.script(model.eval()).save(str(path))
    return path


# -- 1. `dlstack` alone lists the commands -----------------------------------------------------------------------


def test_no_arguments_prints_the_full_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0
    help_text = capsys.readouterr().out

    with pytest.raises(SystemExit) as bare_exit:
        main([])
    assert bare_exit.value.code == 2  # still a usage error for scripts
    out, err = capsys.readouterr()
    assert out == help_text and err == ""
    for command in ("serve", "package", "models", "datasets", "render", "promote", "rollback"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), f"{command} missing from:\n{out}"

    with pytest.raises(SystemExit) as models_exit:
        main(["models"])
    assert models_exit.value.code == 2
    out = capsys.readouterr().out
    for action in ("register", "list", "show", "alias", "verify", "export"):
        assert re.search(rf"^\s+{action}\s", out, re.MULTILINE), f"{action} missing from:\n{out}"


def test_other_usage_errors_keep_argparse_messages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models", "register"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "the following arguments are required: path, --name, --framework" in err


# -- 2. a busy port is one line, at once --------------------------------------------------------------------------


def test_port_in_use_is_one_line_naming_the_port_and_the_fix(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = dlstack("serve", str(art), "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert str(port) in lines[0] and "already in use" in lines[0] and "--port N" in lines[0]
    assert "PORT=N make serve" in lines[0]
    assert res.stdout == ""  # gunicorn never started: no retry lines


def test_bad_port_and_host_are_one_line(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    res = dlstack("serve", str(art), "--port", "70000")
    assert res.returncode == 2 and "is not a TCP port; use 1-65535" in res.stderr
    res = dlstack("serve", str(art), "--host", "192.0.2.1", "--port", str(free_port()))  # TEST-NET: not ours
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    assert "is not an address of this machine" in res.stderr


# -- 3. package and register agree on the version ------------------------------------------------------------------


def test_package_names_no_version_and_register_says_which_one_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = str(tmp_path / "reg")
    first = make_torch_mlp_artifact(tmp_path / "first", name="m", seed=5)  # other weights than model.pt
    assert (
        main(["models", "register", str(first), "--registry", registry, "--name", "m", "--framework", "pytorch"]) == 0
    )
    assert capsys.readouterr().out.startswith("registered m:1 ")

    model = torchscript_file(tmp_path / "model.pt")
    art = tmp_path / "build" / "m"
    code = main(["package", str(model), "--name", "m", "--framework", "pytorch", "--input", "input:FP32:-1x8",
                 "--out", str(art)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bm:\d", out), out  # no number the registry would contradict
    assert f"version: assigned by the registry: `dlstack models register {art} --name m --framework pytorch`" in out
    assert read_spec(art).version == "1"  # what `dlstack serve build/m` reports until registered

    register = ["models", "register", str(art), "--registry", registry, "--name", "m", "--framework", "pytorch"]
    assert main(register) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("registered m:2 ")
    assert len(out) == 2 and "still says version 1" in out[1] and "the registry's is 2: use m:2" in out[1]

    assert main(register) == 0  # identical content: the same version, the same explanation
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "identical content is already registered as m:2; nothing stored"
    assert "the registry's is 2" in out[1]

    assert main(["models", "show", "--registry", registry, "m:2"]) == 0
    assert re.search(r"^ref:\s+m:2$", capsys.readouterr().out, re.MULTILINE)
    assert main(["models", "export", "--registry", registry, "m:2", str(tmp_path / "exported")]) == 0
    assert read_spec(tmp_path / "exported").version == "2"  # what a deployed server reports


def test_an_explicit_package_version_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torchscript_file(tmp_path / "model.pt")
    art = tmp_path / "art"
    code = main(["package", str(model), "--name", "m", "--framework", "pytorch", "--input", "input:FP32:-1x8",
                 "--version", "7", "--out", str(art)])  # fmt: skip
    assert code == 0
    assert "version: 7 in model.yaml; the registry assigns its own" in capsys.readouterr().out
    registry = str(tmp_path / "reg")
    assert main(["models", "register", str(art), "--registry", registry, "--name", "m", "--framework", "pytorch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("registered m:1 ") and "still says version 7" in out[1]


# -- 4. numpy and torch datatype spellings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FP32", Datatype.FP32),
        ("fp32", Datatype.FP32),
        ("float32", Datatype.FP32),
        ("Float32", Datatype.FP32),
        ("torch.float32", Datatype.FP32),
        ("torch.float", Datatype.FP32),
        ("np.float32", Datatype.FP32),
        ("float16", Datatype.FP16),
        ("half", Datatype.FP16),
        ("torch.half", Datatype.FP16),
        ("float64", Datatype.FP64),
        ("double", Datatype.FP64),
        ("torch.double", Datatype.FP64),
        ("int8", Datatype.INT8),
        ("int16", Datatype.INT16),
        ("short", Datatype.INT16),
        ("int32", Datatype.INT32),
        ("torch.int", Datatype.INT32),
        ("int64", Datatype.INT64),
        ("torch.long", Datatype.INT64),
        ("long", Datatype.INT64),
        ("uint8", Datatype.UINT8),
        ("torch.uint8", Datatype.UINT8),
        ("uint16", Datatype.UINT16),
        ("uint32", Datatype.UINT32),
        ("uint64", Datatype.UINT64),
        ("bool", Datatype.BOOL),
        ("torch.bool", Datatype.BOOL),
        ("BYTES", Datatype.BYTES),
        ("bytes", Datatype.BYTES),
    ],
)
def test_datatype_aliases(text: str, expected: Datatype) -> None:
    assert parse_datatype(text) is expected


@pytest.mark.parametrize("text", ["bfloat16", "torch.bfloat16", "float", "int", "f4", "<f4", "FLOAT42", "complex64"])
def test_other_datatypes_are_rejected_listing_the_valid_names(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError) as exc:
        parse_datatype(text)
    assert "\n" not in exc.value.message
    valid = ", ".join(d.value for d in Datatype)
    assert f"datatype {text!r} is not a datatype; use one of {valid}" in exc.value.message

    code = main(["package", str(tmp_path / "missing.pt"), "--name", "m", "--framework", "pytorch",
                 "--input", f"input:{text}:-1x8", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--input 'input:{text}:-1x8': datatype {text!r}" in err


def test_an_alias_packages_the_v2_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torchscript_file(tmp_path / "model.pt")
    code = main(["package", str(model), "--name", "m", "--framework", "pytorch",
                 "--input", "input:torch.float32:-1x8", "--out", str(tmp_path / "a")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert read_spec(tmp_path / "a").signature.inputs[0].datatype is Datatype.FP32


# -- 5. the framework's own message --------------------------------------------------------------------------------


def test_a_wrong_input_width_shows_torchs_message(tmp_path: Path) -> None:
    model = torchscript_file(tmp_path / "model.pt", sizes=(784, 512, 10))
    res = dlstack("package", str(model), "--name", "mnist", "--framework", "pytorch",
                  "--input", "input:FP32:-1x783", "--out", str(tmp_path / "o"))  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "(mat1 and mat2 shapes cannot be multiplied (1x783 and 784x512)); check the --input" in lines[0]
    assert "TorchScript interpreter" not in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "o").exists()


def test_framework_message_keeps_a_multi_line_message_on_one_line() -> None:
    exc = ValueError("forward() expected a value of type 'Tensor' for argument 'x'\nPosition: 1\n  Value: 3")
    assert framework_message(exc) == "forward() expected a value of type 'Tensor' for argument 'x' Position: 1 Value: 3"
    assert framework_message(RuntimeError("")) == "RuntimeError"
    assert framework_message(RuntimeError("x" * 5000)).endswith("...")


# -- 6. log format -------------------------------------------------------------------------------------------------


def test_log_format_follows_the_terminal_unless_set() -> None:
    assert log_format({}, isatty=True) == "text"
    assert log_format({}, isatty=False) == "json"
    assert log_format({"DLSTACK_LOG_FORMAT": "auto"}, isatty=True) == "text"
    assert log_format({"DLSTACK_LOG_FORMAT": "json"}, isatty=True) == "json"
    assert log_format({"DLSTACK_LOG_FORMAT": "Text"}, isatty=False) == "text"
    with pytest.raises(UserError, match=r"DLSTACK_LOG_FORMAT='xml' is not one of auto, json, text"):
        log_format({"DLSTACK_LOG_FORMAT": "xml"}, isatty=False)


def test_a_bad_log_format_env_fails_before_gunicorn(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    res = dlstack("serve", str(art), "--port", str(free_port()), env={"DLSTACK_LOG_FORMAT": "xml"})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["dlstack serve: error: DLSTACK_LOG_FORMAT='xml' is not one of auto, json, text "
                                       "(--log-format)"]  # fmt: skip


def test_log_format_text_serves_readable_lines(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp", name="textlog", version="4")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "DLSTACK_LOG_FORMAT")}
    env.update({"DLSTACK_DRAIN_SECONDS": "0", "PYTHONUNBUFFERED": "1", "DLSTACK_CPU_LIMIT": "1"})
    args = [sys.executable, "-m", "stacks.cli", "serve", str(art), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--log-format", "text"]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    srv = ServerHandle(proc, port)
    try:
        deadline = time.monotonic() + 90
        while True:  # tests.serving.start_server waits on JSON load events; text has none to parse
            assert proc.poll() is None, "\n".join(srv.stdout_lines() + srv.stderr_lines())
            try:
                if requests.get(f"{srv.url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "\n".join(srv.stdout_lines() + srv.stderr_lines())
            time.sleep(0.1)
        body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
        r = requests.post(f"{srv.url}/v2/models/textlog/infer", json=body, headers={"X-Request-ID": "txt-1"})
        assert r.status_code == 200
        bad = {"inputs": [{"name": "input", "shape": [1, 7], "datatype": "FP32", "data": [0.5] * 7}]}
        assert requests.post(f"{srv.url}/v2/models/textlog/infer", json=bad).status_code == 400

        expected = [  # our pipe reader may lag the server's writes: wait for every line
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO +POST /v2/models/textlog/infer 200 \d+\.\d\d ms "
            r"\(textlog:4, id txt-1\)$",
            r" WARNING +POST /v2/models/textlog/infer 400 .*\): input \"input\": expected shape",
            r" INFO +model textlog:4 ready in",  # lifecycle lines are text too
            r" INFO +Listening at: http://127\.0\.0\.1:",  # and gunicorn's own
        ]
        deadline = time.monotonic() + 10
        while True:
            lines = srv.stdout_lines()
            missing = [p for p in expected if not any(re.search(p, line) for line in lines)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not missing, "\n".join(lines)
        for line in lines:
            with pytest.raises(ValueError):
                json.loads(line)
    finally:
        assert srv.stop() == 0
