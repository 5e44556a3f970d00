"""The registry's location and object-store behaviour beyond the shared suite (``test_registry.py``):
the location grammar and its precedence, one-line failures of a bucket that is missing, refuses the
credentials or can't be reached, ``dlstack models copy`` between backends, and the deploy path on a fresh
clone: ``dlstack render`` of both example stacks from an S3 registry, with one index read per render.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path, PurePath

import pytest

from services.registry import Registry, parse_location, registry_location
from services.serving.artifact import file_sha256
from services.serving.errors import UserError
from tests.conftest import ROOT, free_port, git, make_torch_mlp_artifact
from tests.s3 import S3Server, point_at
from tests.test_registry import byte_artifact

DLSTACK = [sys.executable, "-m", "stacks.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no DLSTACK_* or AWS_* settings of the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLSTACK_", "AWS_"))}
    return {**env, **extra}


def _dlstack(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DLSTACK, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# ---- where the registry is -------------------------------------------------------------------


def test_location_grammar_one_line_errors_and_canonical_urls(tmp_path: Path) -> None:
    assert parse_location("s3://acme-models/team/dlstack/").url == "s3://acme-models/team/dlstack"
    assert parse_location("s3://acme-models").prefix == ""
    assert parse_location("gs://acme_models/x").scheme == "gs"
    assert parse_location("az://models/x").bucket == "models"
    assert parse_location("file:///srv/registry").url == "/srv/registry"
    assert parse_location("reg", base=tmp_path).url == str(tmp_path / "reg")
    assert parse_location("~/reg").url == str(Path.home() / "reg")
    # pathlib collapses "//": a Path-typed --registry elsewhere must still mean the bucket.
    assert Registry(PurePath("s3://acme-models/team")).url == "s3://acme-models/team"
    bad = {
        "s3://Acme Models/x": "no credentials, query, spaces",
        "s3://AcmeModels/x": '"AcmeModels" is not a valid bucket name',
        "s3://ab": '"ab" is not a valid bucket name',
        "s3://key:secret@acme-models/x": "credentials and the endpoint come from the environment",
        "s3://acme-models/a//b": 'prefix segment "" is invalid',
        "s3://acme-models/../b": 'prefix segment ".." is invalid',
        "http://minio:9000/models": 'unsupported scheme "http://"',
        "file://relative": "is not a file URL",
        " ": "the registry location is empty",
    }
    for value, message in bad.items():
        with pytest.raises(UserError) as err:
            parse_location(value, "$DLSTACK_REGISTRY")
        assert err.value.message.startswith("$DLSTACK_REGISTRY: ") and message in err.value.message, value
        assert "\n" not in err.value.message


def test_precedence_flag_then_env_then_stack_file_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a git repository: the default is .registry right here
    monkeypatch.delenv("DLSTACK_REGISTRY", raising=False)
    assert registry_location().url == str(tmp_path / ".registry")
    stack = registry_location(None, "s3://stack-bucket/p", stack_base=ROOT)
    assert (stack.url, stack.source) == ("s3://stack-bucket/p", "dlstack:registry")
    assert registry_location(None, "shared/registry", stack_base=ROOT).url == str(ROOT / "shared" / "registry")
    monkeypatch.setenv("DLSTACK_REGISTRY", "s3://env-bucket/p")
    assert registry_location(None, "s3://stack-bucket/p").url == "s3://env-bucket/p"
    assert registry_location("s3://flag-bucket/p", "s3://stack-bucket/p").url == "s3://flag-bucket/p"
    assert Registry.for_stack("s3://stack-bucket/p").url == "s3://env-bucket/p"
    monkeypatch.delenv("DLSTACK_REGISTRY")
    assert Registry.for_stack("s3://stack-bucket/p").url == "s3://stack-bucket/p"


def test_stack_file_key_is_validated_by_the_one_schema(tmp_path: Path) -> None:
    from stacks.config import ConfigError, load_stack_config

    text = (ROOT / "Pulumi.dev.yaml").read_text()
    good = tmp_path / "Pulumi.dev.yaml"
    good.write_text(text.replace("config:\n", "config:\n  dlstack:registry: s3://acme-models/dlstack\n", 1))
    assert load_stack_config("dev", good).registry == "s3://acme-models/dlstack"
    assert load_stack_config("dev", ROOT / "Pulumi.dev.yaml").registry is None  # default: the local registry
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(text.replace("config:\n", "config:\n  dlstack:registry: s3://Acme/x\n", 1))
    with pytest.raises(ConfigError) as err:
        load_stack_config("dev", bad)
    assert err.value.message == (
        'Pulumi.bad.yaml: dlstack:registry: "s3://Acme/x": "Acme" is not a valid bucket name '
        "(3-63 lower-case letters, digits, '.' and '-')"
    )


# ---- failures are one line -------------------------------------------------------------------


def _one_line_failure(res: subprocess.CompletedProcess[str], *parts: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_missing_bucket_bad_credentials_and_dead_endpoint_are_one_line(s3_server: S3Server, tmp_path: Path) -> None:
    env = _clean_env(**s3_server.env, DLSTACK_CACHE=str(tmp_path / "cache"))
    missing = "s3://no-such-bucket-here/dlstack"
    res = _dlstack("models", "list", "--registry", missing, env=env)
    _one_line_failure(res, missing, s3_server.endpoint, "does not exist", "aws s3 mb s3://no-such-bucket-here")
    art = byte_artifact(tmp_path / "a", b"x")
    res = _dlstack("models", "register", str(art), "--name", "m", "--framework", "onnx", "--registry", missing, env=env)
    _one_line_failure(res, missing, "does not exist")

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = _dlstack("models", "list", env={**env, "AWS_ENDPOINT_URL": dead, "DLSTACK_REGISTRY": "s3://any-bucket/x"})
    _one_line_failure(res, "s3://any-bucket/x", dead, "cannot reach the endpoint", "AWS_ENDPOINT_URL")

    strict = S3Server(free_port(), auth=True)  # checks keys like AWS does: ours are unknown to it
    try:
        res = _dlstack("models", "list", env={**env, **strict.env, "DLSTACK_REGISTRY": "s3://team-bucket/x"})
    finally:
        strict.stop()
    _one_line_failure(res, "s3://team-bucket/x", "credentials were refused", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID")

    # No keys anywhere (environment or ~/.aws): said at once, without a request.
    home = tmp_path / "home"
    home.mkdir()
    bare = _clean_env(HOME=str(home), AWS_EC2_METADATA_DISABLED="true", DLSTACK_REGISTRY="s3://team-bucket/x")
    res = _dlstack("models", "list", env=bare)
    _one_line_failure(res, "s3://team-bucket/x", "no AWS credentials", "AWS_PROFILE")

    res = _dlstack("models", "list", env={**env, "DLSTACK_REGISTRY": "s3://Team/x"})
    _one_line_failure(res, '$DLSTACK_REGISTRY: "s3://Team/x"', "not a valid bucket name")
    # The deploy path says it the same way, before any resource exists.
    res = _dlstack("render", "--stack", "dev", "--out", str(tmp_path / "r"), "--registry", missing, env=env)
    _one_line_failure(res, "the model registry cannot be read", missing, "does not exist")


def test_aws_config_files_supply_credentials_and_region(s3_server: S3Server, tmp_path: Path) -> None:
    """Without keys in the environment, ~/.aws/credentials and ~/.aws/config (a named profile) are used."""
    bucket = s3_server.bucket()
    aws = tmp_path / "home" / ".aws"
    aws.mkdir(parents=True)
    creds = s3_server.env
    (aws / "credentials").write_text(
        f"[team]\naws_access_key_id = {creds['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {creds['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (aws / "config").write_text("[profile team]\nregion = us-east-1\n")
    env = _clean_env(
        HOME=str(tmp_path / "home"),
        AWS_PROFILE="team",
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_EC2_METADATA_DISABLED="true",
        DLSTACK_CACHE=str(tmp_path / "cache"),
    )
    art = byte_artifact(tmp_path / "a", b"from a profile")
    res = _dlstack(
        "models", "register", str(art), "--name", "m", "--framework", "onnx", "--registry", f"s3://{bucket}/p", env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("registered m:1 (sha256 ") and f"in s3://{bucket}/p" in res.stdout


# ---- copy between registries -----------------------------------------------------------------


@pytest.fixture
def laptop(tmp_path: Path) -> Registry:
    """A laptop's local registry: m:1, m:2 (with lineage, alias champion -> 2) and n:1."""
    reg = Registry(tmp_path / "laptop")
    reg.register(byte_artifact(tmp_path / "m1", b"m-one"), "m", "onnx", metrics={"accuracy": 0.9})
    reg.register(byte_artifact(tmp_path / "m2", b"m-two" * 1000), "m", "onnx", note="wider")
    reg.register(byte_artifact(tmp_path / "n1", b"n-one", name="n"), "n", "onnx")
    reg.set_alias("m", "champion", "2")
    return reg


def test_copy_local_to_s3_keeps_versions_lineage_aliases_and_is_idempotent(
    s3_server: S3Server, laptop: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(s3_server, monkeypatch, tmp_path / "cache")
    team_url = f"s3://{s3_server.bucket()}/team"
    env = {**os.environ}
    res = _dlstack("models", "copy", laptop.url, team_url, "m", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"m:1  {laptop.resolve('m:1').sha256[:12]}  copied",
        f"m:2  {laptop.resolve('m:2').sha256[:12]}  copied",
        "  m@champion -> m:2",
        f"2 version(s) copied, 0 already there: {laptop.url} -> {team_url}",
    ]
    team = Registry(team_url)
    assert team.names() == ["m"]  # only what was asked for
    for v in ("1", "2"):
        a, b = laptop.resolve(f"m:{v}").summary(), team.resolve(f"m:{v}").summary()
        assert {k: x for k, x in a.items() if k != "path"} == {k: x for k, x in b.items() if k != "path"}
    assert team.resolve("m@champion").version == "2"
    assert team.verify() == []

    before = s3_server.client().get_object(Bucket=team_url[5:].split("/")[0], Key="team/index.json")["ETag"]
    res = _dlstack("models", "copy", laptop.url, team_url, "m:1", "m@champion", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == f"0 version(s) copied, 2 already there: {laptop.url} -> {team_url}"
    after = s3_server.client().get_object(Bucket=team_url[5:].split("/")[0], Key="team/index.json")["ETag"]
    assert before == after, "an idempotent copy writes nothing"

    res = _dlstack("models", "copy", laptop.url, team_url, env=env)  # no refs: everything
    assert res.returncode == 0 and res.stdout.splitlines()[-1].startswith("1 version(s) copied, 2 already there")
    assert Registry(team_url).names() == ["m", "n"]

    # Back out of the bucket into another machine's empty registry, files and all.
    res = _dlstack("models", "copy", team_url, str(tmp_path / "other"), env=env)
    assert res.returncode == 0, res.stderr
    other = Registry(tmp_path / "other")
    assert other.verify() == []
    out = other.resolve("m:2").export(tmp_path / "export")
    assert (out / "model.onnx").read_bytes() == b"m-two" * 1000


def test_copy_refuses_a_version_that_differs_and_writes_nothing(
    s3_server: S3Server, laptop: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(s3_server, monkeypatch, tmp_path / "cache")
    bucket = s3_server.bucket()
    team = Registry(f"s3://{bucket}/team")
    team.register(byte_artifact(tmp_path / "other", b"someone else's m:1"), "m", "onnx")
    index = s3_server.client().get_object(Bucket=bucket, Key="team/index.json")["Body"].read()
    res = _dlstack("models", "copy", laptop.url, team.url, "m", env={**os.environ})
    _one_line_failure(res, f"{team.url} already has m:1 with other content", "versions never change")
    assert s3_server.client().get_object(Bucket=bucket, Key="team/index.json")["Body"].read() == index
    # Between two buckets as well (S3 -> S3): the versions DST lacks are fine.
    second = Registry(f"s3://{s3_server.bucket()}/copy")
    res = _dlstack("models", "copy", team.url, second.url, env={**os.environ})
    assert res.returncode == 0, res.stderr
    assert second.resolve("m:1").sha256 == team.resolve("m:1").sha256


# ---- the deploy path on a fresh clone --------------------------------------------------------


@pytest.mark.timeout(900)
def test_fresh_clone_renders_dev_and_prod_from_the_s3_registry(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acceptance: no .registry, DLSTACK_REGISTRY at the S3 server: `dlstack render` resolves every model."""
    point_at(s3_server, monkeypatch, tmp_path / "laptop-cache")
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/dlstack"
    team = Registry(url)
    for name in ("mnist-mlp", "tiny-cnn"):  # what both stack files deploy, as tiny real TorchScript models
        team.register(make_torch_mlp_artifact(tmp_path / name, name=name), name, "pytorch")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone), env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    assert not (clone / ".registry").exists()
    cache = tmp_path / "ci-cache"  # a CI runner's: empty
    env = _clean_env(**s3_server.env, DLSTACK_REGISTRY=url, DLSTACK_CACHE=str(cache), PYTHONPATH=str(clone))
    index_key = f"/{bucket}/dlstack/index.json"
    for stack in ("dev", "prod"):
        reads = s3_server.requests("GET", index_key)
        res = _dlstack("render", "--stack", stack, "--out", str(tmp_path / stack), env=env, cwd=clone)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"rendered {stack}: ")
        assert s3_server.requests("GET", index_key) - reads == 1, "one index read per render, not one per model"
        for name in ("mnist-mlp", "tiny-cnn"):
            assert (tmp_path / stack / "manifests" / "models" / f"deployment-{name}.yaml").is_file()
    assert not (clone / ".registry").exists(), "nothing fell back to a local registry"
    assert not (cache / "blobs").exists(), "a render needs the index, not the model files"

    res = _dlstack("outputs", "--stack", "dev", env=env, cwd=clone)
    assert res.returncode == 0, res.stderr
    models = json.loads(res.stdout)["models"]
    assert models["mnist-mlp"]["sha256"] == team.resolve("mnist-mlp:1").sha256

    # The stack file's dlstack:registry does the same without the variable; the variable overrides it.
    dev = clone / "Pulumi.dev.yaml"
    dev.write_text(dev.read_text().replace("config:\n", f"config:\n  dlstack:registry: {url}\n", 1))
    keyed = {k: v for k, v in env.items() if k != "DLSTACK_REGISTRY"}
    res = _dlstack("render", "--stack", "dev", "--out", str(tmp_path / "keyed"), env=keyed, cwd=clone)
    assert res.returncode == 0, res.stderr
    res = _dlstack(
        "render",
        "--stack",
        "dev",
        "--out",
        str(tmp_path / "o"),
        env={**keyed, "DLSTACK_REGISTRY": str(tmp_path / "empty")},
        cwd=clone,
    )
    assert res.returncode == 2 and f"is not in the registry {tmp_path / 'empty'}" in res.stderr


@pytest.mark.timeout(900)
def test_promote_and_rollback_from_a_fresh_clone_with_the_s3_registry(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dlstack outputs`, `promote` and `rollback` resolve and verify versions in the bucket."""
    point_at(s3_server, monkeypatch, tmp_path / "laptop-cache")
    url = f"s3://{s3_server.bucket()}/dlstack"
    team = Registry(url)
    for name in ("mnist-mlp", "tiny-cnn"):
        team.register(make_torch_mlp_artifact(tmp_path / name, name=name), name, "pytorch")
    team.register(make_torch_mlp_artifact(tmp_path / "mlp2", name="mnist-mlp", seed=7), "mnist-mlp", "pytorch")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone), env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    dev = clone / "Pulumi.dev.yaml"
    dev.write_text(dev.read_text().replace("model: mnist-mlp:1", "model: mnist-mlp:2"))
    git(clone, "commit", "-qm", "dev runs mnist-mlp:2", "Pulumi.dev.yaml")
    env = _clean_env(**s3_server.env, DLSTACK_REGISTRY=url, DLSTACK_CACHE=str(tmp_path / "ci"), PYTHONPATH=str(clone))
    res = _dlstack("outputs", "--stack", "dev", "--out", str(tmp_path / "dev.json"), env=env, cwd=clone)
    assert res.returncode == 0, res.stderr
    promote = [
        "promote",
        "--from",
        "dev",
        "--to",
        "prod",
        "--model",
        "mnist-mlp",
        "--outputs",
        str(tmp_path / "dev.json"),
    ]
    res = _dlstack(*promote, "--stack-dir", str(clone), env=env, cwd=clone)
    assert res.returncode == 0, res.stderr
    assert "model: mnist-mlp:2" in (clone / "Pulumi.prod.yaml").read_text()
    git(clone, "commit", "-qm", "promote", "Pulumi.prod.yaml", "stacks/promotions.yaml")
    res = _dlstack("rollback", "--env", "prod", "--model", "mnist-mlp", "--stack-dir", str(clone), env=env, cwd=clone)
    assert res.returncode == 0, res.stderr
    assert "model: mnist-mlp:1" in (clone / "Pulumi.prod.yaml").read_text()
    git(clone, "commit", "-qm", "rollback", "Pulumi.prod.yaml", "stacks/promotions.yaml")
    # The version must be in the bucket: a registry without it refuses, naming it.
    res = _dlstack(
        *promote, "--stack-dir", str(clone), env={**env, "DLSTACK_REGISTRY": str(tmp_path / "empty")}, cwd=clone
    )
    assert res.returncode == 2 and "mnist-mlp" in res.stderr, res.stderr
    # With the bucket named in the stack files instead of the environment, promote finds it there too.
    for stack in ("dev", "prod"):
        f = clone / f"Pulumi.{stack}.yaml"
        f.write_text(f.read_text().replace("config:\n", f"config:\n  dlstack:registry: {url}\n", 1))
    git(clone, "commit", "-qm", "the team registry", "Pulumi.dev.yaml", "Pulumi.prod.yaml")
    no_env = {k: v for k, v in env.items() if k != "DLSTACK_REGISTRY"}
    res = _dlstack(*promote, "--stack-dir", str(clone), env=no_env, cwd=clone)
    assert res.returncode == 0, res.stderr
    assert "model: mnist-mlp:2" in (clone / "Pulumi.prod.yaml").read_text()


@pytest.mark.timeout(900)
def test_the_pulumi_program_reads_the_stack_files_registry_key_and_stages_images_from_s3(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `pulumi up -s dev` runs (stacks/__main__.py), under mocks, in a fresh clone; the stack names the bucket."""
    point_at(s3_server, monkeypatch, tmp_path / "laptop-cache")
    url = f"s3://{s3_server.bucket()}/dlstack"
    team = Registry(url)
    for name in ("mnist-mlp", "tiny-cnn"):
        team.register(make_torch_mlp_artifact(tmp_path / name, name=name), name, "pytorch")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ROOT), str(clone), env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})
    program = (
        "import json, runpy, sys\n"
        "from ruamel.yaml import YAML\n"
        "from stacks.mocks import run_program\n"
        "raw = YAML(typ='safe').load(open('Pulumi.dev.yaml'))['config']\n"
        f"raw['dlstack:registry'] = {url!r}\n"
        "engine = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}\n"
        "run_program(lambda: runpy.run_path('stacks/__main__.py', run_name='__main__'), stack='dev', config=engine)\n"
    )
    env = _clean_env(**s3_server.env, DLSTACK_CACHE=str(tmp_path / "ci"), PYTHONPATH=str(clone))
    res = subprocess.run(
        [sys.executable, "-c", program], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    # The image build contexts hold the models exported (streamed, sha256-checked) from the bucket.
    staged = {p.parent.parent.name.split("-v1-")[0]: p for p in (clone / "build" / "images").glob("*/model/model.pt")}
    assert sorted(staged) == ["mnist-mlp", "tiny-cnn"]
    for name, path in staged.items():
        assert file_sha256(path) == team.resolve(f"{name}:1").spec.files[0].sha256
    assert not (clone / ".registry").exists()
