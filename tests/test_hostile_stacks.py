"""Hostile and careless stack files through the real CLI: one exact line, exit code 2, nothing touched.

Each case is a bad ``Pulumi.<stack>.yaml`` given to ``dlstack render --config-file F --out DIR``. The
bad part fails while the file is read and validated, before the model registry or the Pulumi program
is reached, so no registry is needed. Each case asserts the exact message, exit code 2, that no
"Traceback" is printed, that ``--out`` is not created and that no file in the working tree changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stacks.cli import main
from stacks.config import MAX_FILE_BYTES, load_stack_config
from tests.conftest import ROOT

# A valid dev stack: every case breaks one thing in it. Kept here, not read from Pulumi.dev.yaml, so a
# change to the committed stack cannot move the line numbers the messages name.
BASE = """\
config:
  dlstack:environment: dev
  dlstack:kubernetes:
    context: kind-dlstack
    version: "1.31"
  dlstack:images:
    registry: localhost:5001/dlstack
    push: true
  dlstack:ingress:
    domain: dlstack.localtest.me
    class_name: nginx
    replicas: 1
  dlstack:namespaces:
    models: models
  dlstack:logging:
    version: 8.17.4
    retention_days: 3
  dlstack:monitoring:
    retention: 3d
  dlstack:models:
    - name: mnist-mlp
      model: mnist-mlp:1
      framework: pytorch
      replicas: {min: 1, max: 2}
      resources: {cpu: 500m, memory: 512Mi}
      batching: {max_batch_size: 8, max_batch_time_ms: 2}
      slo: {error_ratio: 0.01, p99_ms: 250}
"""
F = "Pulumi.dev.yaml"
DIGEST = "sha256:" + "ab" * 32


def sub(old: str, new: str) -> str:
    """BASE with ``old`` (present exactly once) replaced."""
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def add(text: str) -> str:
    """BASE with lines appended under ``config:``."""
    return BASE + text


def model(text: str) -> str:
    """BASE with lines appended to the first model."""
    return BASE + "".join(f"      {line}\n" for line in text.splitlines())


def bomb(levels: int = 9) -> str:
    lines = ['  dlstack:lol0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  dlstack:lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return BASE + "\n".join(lines) + "\n"


def nested_flow(depth: int) -> str:
    return add("  dlstack:deep: " + "[" * depth + "]" * depth + "\n")


def nested_block(depth: int) -> str:
    return add("".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth)).replace("  k0:", "  dlstack:deep:", 1))


P = F + ": "
ML = "dlstack:models[0]"
IMG = "is not an image repository: "
EX = 'write host[:port]/path, e.g. "ghcr.io/acme/dlstack"'
DNS = (
    'is not a DNS-1123 label (lower-case letters, digits and "-", at most 63 characters, '
    "starting and ending with a letter or digit)"
)
REF = 'is not a model reference (write "name:version" or "name@alias", e.g. "mnist-mlp:1")'
DIG = 'is not an image digest (write "sha256:" and 64 lower-case hex digits)'
PROVIDERS = "kubernetes:, pulumi:, random:, docker-build:"

# (id, file content (text or bytes), the exact one-line message after "dlstack render: error: ")
CASES: list[tuple[str, str | bytes | Callable[[], str | bytes], str]] = [
    # --- namespaces: a typo used to render a stack with no models and exit 0 ---
    (
        "ns-missing-letter",
        sub("dlstack:models:", "dlstak:models:"),
        P + 'dlstak:models: unknown namespace "dlstak"; did you mean "dlstack:models"?',
    ),
    (
        "ns-dot-separator",
        sub("dlstack:models:", "dlstack.models:"),
        P + '"dlstack.models": the namespace needs a ":"; did you mean "dlstack:models"?',
    ),
    (
        "ns-underscore-separator",
        sub("dlstack:models:", "dlstack_models:"),
        P + 'dlstack_models: the namespace needs a ":"; did you mean "dlstack:models"?',
    ),
    (
        "ns-capitalised",
        sub("dlstack:models:", "Dlstack:models:"),
        P + 'Dlstack:models: unknown namespace "Dlstack"; did you mean "dlstack:models"?',
    ),
    (
        "ns-hyphenated",
        sub("dlstack:models:", "dl-stack:models:"),
        P + 'dl-stack:models: unknown namespace "dl-stack"; did you mean "dlstack:models"?',
    ),
    (
        "ns-typo-and-key-typo",
        sub("dlstack:models:", "dlstck:modles:"),
        P + 'dlstck:modles: unknown namespace "dlstck"; did you mean "dlstack:models"?',
    ),
    (
        "key-capitalised",
        sub("dlstack:models:", "dlstack:Models:"),
        P + 'dlstack:Models: unknown key; did you mean "dlstack:models"?',
    ),
    (
        "key-without-namespace",
        sub("dlstack:models:", "models:"),
        P + 'models: has no namespace; did you mean "dlstack:models"?',
    ),
    (
        "ns-unknown",
        add("  aws:region: us-east-1\n"),
        P + 'aws:region: unknown namespace "aws"; this program reads "dlstack:" keys, and only the providers\' '
        f"namespaces ({PROVIDERS}) may appear besides",
    ),
    (
        "ns-provider-typo",
        add("  kubernets:context: kind\n"),
        P + 'kubernets:context: unknown namespace "kubernets"; did you mean "kubernetes:context"?',
    ),
    (
        "ns-empty-key",
        add('  "dlstack:": 1\n'),
        P + '"dlstack:": has no key after "dlstack:"; write "dlstack:<key>" (keys: environment, kubernetes, images, '
        "ingress, namespaces, logging, monitoring, models, registry, grafana_admin_password)",
    ),
    ("top-level-typo", sub("config:", "confg:"), P + 'confg: unknown top-level key; did you mean "config"?'),
    (
        "top-level-unknown",
        BASE + "secretsprovder: passphrase\n",
        P + 'secretsprovder: unknown top-level key; did you mean "secretsprovider"?',
    ),
    ("config-key-not-string", add("  123: x\n"), P + 'config key 123 is not a string; write "dlstack:<key>"'),
    # --- unknown keys at every level ---
    ("unknown-model-key", model("resource: {cpu: 1}"), P + f'{ML}.resource: unknown key; did you mean "resources"?'),
    (
        "unknown-ingress-key",
        sub("    class_name: nginx\n", "    class_name: nginx\n    tls_enabled: true\n"),
        P + "dlstack:ingress.tls_enabled: unknown key; valid keys: domain, class_name, tls, replicas",
    ),
    ("unknown-key-newline", model('"slo\\n": {p99_ms: 1}'), P + f'{ML}."slo\\n": unknown key; did you mean "slo"?'),
    ("nested-key-not-string", model("1: one"), P + f"{ML}: key 1 is not a string; quote it"),
    # --- names, references and aliases ending in a newline (re.match with "$" let them through) ---
    ("name-newline", sub("name: mnist-mlp", 'name: "mnist-mlp\\n"'), P + f'{ML}.name: "mnist-mlp\\n" {DNS}'),
    (
        "name-block-scalar",
        sub("- name: mnist-mlp\n", "- name: |\n        mnist-mlp\n"),
        P + f'{ML}.name: "mnist-mlp\\n" {DNS}',
    ),
    (
        "ref-version-newline",
        sub("model: mnist-mlp:1", 'model: "mnist-mlp:1\\n"'),
        P + f'{ML}.model: "mnist-mlp:1\\n" {REF}',
    ),
    (
        "ref-alias-newline",
        sub("model: mnist-mlp:1", 'model: "mnist-mlp@prod\\n"'),
        P + f'{ML}.model: "mnist-mlp@prod\\n" {REF}',
    ),
    (
        "canary-ref-newline",
        model('canary: {model: "mnist-mlp:2\\n", weight: 10}'),
        P + f'{ML}.canary.model: "mnist-mlp:2\\n" {REF}',
    ),
    (
        "namespace-newline",
        sub("models: models", 'models: "models\\n"'),
        P + f'dlstack:namespaces.models: "models\\n" {DNS}',
    ),
    ("digest-newline", model(f'image: {{digest: "{DIGEST}\\n"}}'), P + f'{ML}.image.digest: "{DIGEST}\\n" {DIG}'),
    (
        "context-newline",
        sub("context: kind-dlstack", 'context: "kind-dlstack\\n"'),
        P + 'dlstack:kubernetes.context: "kind-dlstack\\n" contains a control or line-break character; remove it',
    ),
    (
        "k8s-version-newline",
        sub('version: "1.31"', 'version: "1.31\\n"'),
        P + 'dlstack:kubernetes.version: "1.31\\n" is not a Kubernetes minor version (write it quoted, e.g. "1.31")',
    ),
    (
        "domain-newline",
        sub("domain: dlstack.localtest.me", 'domain: "dlstack.localtest.me\\n"'),
        P + 'dlstack:ingress.domain: "dlstack.localtest.me\\n" is not a DNS domain (e.g. "dlstack.localtest.me")',
    ),
    (
        "duration-newline",
        sub("retention: 3d", 'retention: "3d\\n"'),
        P + 'dlstack:monitoring.retention: "3d\\n" is not a retention duration (e.g. "15d", "12h", "2w")',
    ),
    (
        "elastic-version-newline",
        sub("version: 8.17.4", 'version: "8.17.4\\n"'),
        P + 'dlstack:logging.version: "8.17.4\\n" is not an Elastic stack version (e.g. "8.17.4")',
    ),
    (
        "gpu-resource-newline",
        model('gpu: {resource: "nvidia.com/gpu\\n"}'),
        P + f'{ML}.gpu.resource: "nvidia.com/gpu\\n" is not an extended resource name (e.g. "nvidia.com/gpu")',
    ),
    (
        "line-separator-in-name",
        sub("name: mnist-mlp", 'name: "mnist\\u2028mlp"'),
        P + f'{ML}.name: "mnist\\u2028mlp" {DNS}',
    ),
    # --- aliases and anchors ---
    (
        "alias-bomb",
        bomb(),
        "Pulumi.dev.yaml:31: dlstack:lol3[0]: aliases expand the file beyond 4x its size (*a2 repeats 3007 units); "
        "write the values out or use fewer aliases",
    ),
    (
        "alias-recursive",
        add("  dlstack:loop: &r [1, *r]\n"),
        "Pulumi.dev.yaml:28: dlstack:loop[1]: the alias *r refers to a node that contains it; remove the recursion",
    ),
    (
        "alias-undefined",
        add("  dlstack:x: *nowhere\n"),
        "Pulumi.dev.yaml:28: dlstack:x: the alias *nowhere has no anchor &nowhere before it; define it first",
    ),
    (
        "alias-as-key",
        add("  dlstack:a: &k x\n  *k : 1\n"),
        "Pulumi.dev.yaml:29: config: a key must be a plain string, not a mapping, list or alias; write it as text",
    ),
    (
        "anchor-reused-wrongly",
        sub("cpu: 500m", "cpu: &c 500m").replace("max_batch_size: 8", "max_batch_size: *c"),
        P + f'{ML}.batching.max_batch_size: "500m" is invalid: input should be a valid integer',
    ),
    # --- bytes: encodings and control characters ---
    (
        "non-utf8-byte",
        BASE.encode() + b"  # caf\xe9\n",
        f"Pulumi.dev.yaml:28: byte 0xe9 at offset {len(BASE) + 7} is not UTF-8; save the file as UTF-8",
    ),
    (
        "non-utf8-first-byte",
        b"\xff" + BASE.encode(),
        "Pulumi.dev.yaml:1: byte 0xff at offset 0 is not UTF-8; save the file as UTF-8",
    ),
    (
        "bom-then-garbage",
        b"\xef\xbb\xbf\x00\x01\x02garbage",
        "Pulumi.dev.yaml:1: U+0000 is not allowed in YAML; remove it",
    ),
    ("utf16", BASE.encode("utf-16"), P + "is UTF-16; save it as UTF-8"),
    (
        "nul-in-value",
        sub("context: kind-dlstack", "context: kind\x00dlstack").encode(),
        "Pulumi.dev.yaml:4: U+0000 is not allowed in YAML; remove it",
    ),
    (
        "bell-in-value",
        sub("context: kind-dlstack", "context: kind\x07dlstack").encode(),
        "Pulumi.dev.yaml:4: U+0007 is not allowed in YAML; remove it",
    ),
    (
        "escaped-control-in-name",
        sub("name: mnist-mlp", 'name: "mnist\\x1bmlp"'),
        P + f'{ML}.name: "mnist\\u001bmlp" {DNS}',
    ),
    # --- nesting ---
    (
        "deep-flow-nesting",
        nested_flow(40),
        "Pulumi.dev.yaml:28: dlstack:deep[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]"
        "[0][0][0][0][0][0]: nests deeper than 32 levels; flatten it",
    ),
    (
        "very-deep-flow-nesting",
        nested_flow(100_000),
        "Pulumi.dev.yaml:28: dlstack:deep[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]"
        "[0][0][0][0][0][0]: nests deeper than 32 levels; flatten it",
    ),
    (
        "deep-block-nesting",
        nested_block(40),
        "Pulumi.dev.yaml:59: dlstack:deep.k1.k2.k3.k4.k5.k6.k7.k8.k9.k10.k11.k12.k13.k14.k15.k16.k17.k18.k19.k20.k21"
        ".k22.k23.k24.k25.k26.k27.k28.k29.k30: nests deeper than 32 levels; flatten it",
    ),
    # --- numbers: huge, non-finite, fractional, negative, of the wrong type ---
    (
        "huge-int-replicas",
        sub("{min: 1, max: 2}", "{min: 1, max: " + "1" + "0" * 100 + "}"),
        "Pulumi.dev.yaml:24: dlstack:models[0].replicas.max: 100000000000000000000000... (101 characters) is out of "
        "range; write a number of at most 18 digits",
    ),
    (
        "int-beyond-str-limit",
        sub("{min: 1, max: 2}", "{min: 1, max: " + "9" * 5000 + "}"),
        "Pulumi.dev.yaml:24: dlstack:models[0].replicas.max: 999999999999999999999999... (5000 characters) is out of "
        "range; write a number of at most 18 digits",
    ),
    (
        "float-overflow",
        sub("p99_ms: 250", "p99_ms: 1e400"),
        "Pulumi.dev.yaml:27: dlstack:models[0].slo.p99_ms: 1e400 is out of range; write a number of at most 18 digits",
    ),
    (
        "nan",
        sub("p99_ms: 250", "p99_ms: .nan"),
        "Pulumi.dev.yaml:27: dlstack:models[0].slo.p99_ms: .nan is not a finite number; write a number",
    ),
    (
        "inf",
        sub("error_ratio: 0.01", "error_ratio: .inf"),
        "Pulumi.dev.yaml:27: dlstack:models[0].slo.error_ratio: .inf is not a finite number; write a number",
    ),
    (
        "negative-inf",
        sub("max_batch_time_ms: 2", "max_batch_time_ms: -.Inf"),
        "Pulumi.dev.yaml:26: dlstack:models[0].batching.max_batch_time_ms: -.Inf is not a finite number; "
        "write a number",
    ),
    (
        "float-for-int",
        sub("{min: 1, max: 2}", "{min: 1, max: 2.5}"),
        P + f"{ML}.replicas.max: 2.5 is invalid: write an integer",
    ),
    (
        "integral-float-for-int",
        sub("{min: 1, max: 2}", "{min: 1, max: 2.0}"),
        P + f"{ML}.replicas.max: 2.0 is invalid: write an integer",
    ),
    (
        "bool-for-int",
        sub("{min: 1, max: 2}", "{min: true, max: 2}"),
        P + f"{ML}.replicas.min: True is invalid: write an integer",
    ),
    (
        "string-for-int",
        sub("{min: 1, max: 2}", '{min: "1", max: 2}'),
        P + f'{ML}.replicas.min: "1" is invalid: input should be a valid integer',
    ),
    ("int-for-bool", sub("push: true", "push: 1"), P + "dlstack:images.push: 1 is invalid: write true or false"),
    (
        "negative-replicas",
        sub("{min: 1, max: 2}", "{min: -1, max: 2}"),
        P + f"{ML}.replicas.min: -1 is invalid: input should be greater than or equal to 1",
    ),
    (
        "too-many-replicas",
        sub("{min: 1, max: 2}", "{min: 1, max: 100000}"),
        P + f"{ML}.replicas.max: 100000 is invalid: input should be less than or equal to 1000",
    ),
    (
        "negative-cpu",
        sub("cpu: 500m", "cpu: -500m"),
        P + f'{ML}.resources.cpu: "-500m" is not a Kubernetes quantity (e.g. "2" or "500m")',
    ),
    ("zero-memory", sub("memory: 512Mi", "memory: 0"), P + f'{ML}.resources.memory: "0" must be greater than zero'),
    (
        "huge-quantity",
        sub("memory: 512Mi", "memory: 99999999999999999Gi"),
        P + f'{ML}.resources.memory: "99999999999999999Gi" is not a Kubernetes quantity (e.g. "2" or "500m")',
    ),
    (
        "gpu-count-huge",
        model("gpu: {count: 100}"),
        P + f"{ML}.gpu.count: count must be <= 16 (got 100); GPUs are per replica, add replicas instead",
    ),
    (
        "canary-weight-negative",
        model("canary: {model: mnist-mlp:2, weight: -5}"),
        P + f"{ML}.canary.weight: weight must be between 0 and 100 (a percentage), got -5",
    ),
    (
        "batch-time-negative",
        sub("max_batch_time_ms: 2", "max_batch_time_ms: -1"),
        P + f"{ML}.batching.max_batch_time_ms: -1 is invalid: input should be greater than or equal to 0",
    ),
    (
        "retention-days-zero",
        sub("retention_days: 3", "retention_days: 0"),
        P + "dlstack:logging.retention_days: 0 is invalid: input should be greater than or equal to 1",
    ),
    (
        "p99-huge",
        sub("p99_ms: 250", "p99_ms: 1e15"),
        P + f"{ML}.slo.p99_ms: 1000000000000000.0 is invalid: input should be less than or equal to 3600000",
    ),
    # --- image repositories: the docker/distribution grammar ---
    (
        "image-uppercase",
        sub("registry: localhost:5001/dlstack", "registry: localhost:5001/DLStack"),
        P
        + f'dlstack:images.registry: "localhost:5001/DLStack" {IMG}the repository path must be lower-case ("DLStack")',
    ),
    (
        "image-space",
        sub("registry: localhost:5001/dlstack", 'registry: "localhost:5001/dl stack"'),
        P
        + f'dlstack:images.registry: "localhost:5001/dl stack" {IMG}it contains whitespace or a control character; '
        + EX,
    ),
    (
        "image-scheme",
        sub("registry: localhost:5001/dlstack", "registry: https://ghcr.io/acme"),
        P + f'dlstack:images.registry: "https://ghcr.io/acme" {IMG}drop the scheme "https://"; {EX}',
    ),
    (
        "image-trailing-slash",
        sub("registry: localhost:5001/dlstack", "registry: ghcr.io/acme/"),
        P + f'dlstack:images.registry: "ghcr.io/acme/" {IMG}remove the trailing /',
    ),
    (
        "image-empty-component",
        sub("registry: localhost:5001/dlstack", "registry: ghcr.io//acme"),
        P
        + f'dlstack:images.registry: "ghcr.io//acme" {IMG}it has an empty path component ("//" or a leading /); '
        + EX,
    ),
    (
        "image-tag",
        sub("registry: localhost:5001/dlstack", "registry: ghcr.io/acme/dlstack:latest"),
        P + f'dlstack:images.registry: "ghcr.io/acme/dlstack:latest" {IMG}it has a tag; tags are set per model '
        "(the content hash), not on the repository",
    ),
    (
        "image-digest",
        sub("registry: localhost:5001/dlstack", f"registry: ghcr.io/acme@{DIGEST}"),
        P + f'dlstack:images.registry: "ghcr.io/acme@{DIGEST[:67]}"... (84 characters) {IMG}it has a digest; the '
        "digest is pinned per model (image.digest), not on the repository",
    ),
    (
        "image-port-range",
        sub("registry: localhost:5001/dlstack", "registry: localhost:99999/dlstack"),
        P + f'dlstack:images.registry: "localhost:99999/dlstack" {IMG}port 99999 is out of range (1-65535)',
    ),
    (
        "image-leading-separator",
        sub("registry: localhost:5001/dlstack", "registry: ghcr.io/-acme"),
        P + f'dlstack:images.registry: "ghcr.io/-acme" {IMG}"-acme" is not a repository path component (lower-case '
        'letters and digits, separated by ".", "_", "__" or "-")',
    ),
    (
        "image-bad-host",
        sub("registry: localhost:5001/dlstack", "registry: ghcr-.io/acme"),
        P + f'dlstack:images.registry: "ghcr-.io/acme" {IMG}"ghcr-.io" is not a registry host[:port]; {EX}',
    ),
    # --- digests ---
    (
        "digest-uppercase",
        model(f"image: {{digest: {DIGEST.upper().replace('SHA256', 'sha256')}}}"),
        P + f'{ML}.image.digest: "sha256:{"AB" * 32}" {DIG}',
    ),
    (
        "digest-algorithm",
        model(f"image: {{digest: md5:{'ab' * 16}}}"),
        P + f'{ML}.image.digest: "md5:{"ab" * 16}" {DIG}',
    ),
    ("digest-too-long", model(f"image: {{digest: {DIGEST}a}}"), P + f'{ML}.image.digest: "{DIGEST}a" {DIG}'),
    (
        "canary-digest-bad",
        model(f"canary: {{model: mnist-mlp:2, weight: 5}}\nimage: {{digest: {DIGEST}, canary_digest: x}}"),
        P + f'{ML}.image.canary_digest: "x" {DIG}',
    ),
    # --- the model registry location (services.registry.location's grammar) ---
    (
        "registry-newline",
        add('  dlstack:registry: "s3://bucket\\n"\n'),
        P + 'dlstack:registry: "s3://bucket\\n" has a control character or surrounding whitespace; remove it',
    ),
    (
        "registry-space",
        add('  dlstack:registry: "s3://my bucket"\n'),
        P + 'dlstack:registry: "s3://my bucket" may hold only s3://BUCKET/PREFIX (no credentials, query, spaces or '
        "backslash); credentials and the endpoint come from the environment",
    ),
    (
        "registry-scheme",
        add("  dlstack:registry: ftp://host/models\n"),
        P + 'dlstack:registry: "ftp://host/models" has an unsupported scheme "ftp://"; write a directory, '
        "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX",
    ),
    (
        "registry-bucket",
        add("  dlstack:registry: s3://ab\n"),
        P + 'dlstack:registry: "s3://ab": "ab" is not a valid bucket name '
        "(3-63 lower-case letters, digits, '.' and '-')",
    ),
    (
        "registry-dotdot",
        add("  dlstack:registry: s3://bucket/../x\n"),
        P + 'dlstack:registry: "s3://bucket/../x": prefix segment ".." is invalid; use letters, digits and '
        '!_.*\'()=+@,- separated by single "/"',
    ),
    (
        "registry-list",
        add("  dlstack:registry: [s3://bucket]\n"),
        P + "dlstack:registry: ['s3://bucket'] is not a registry location (write a directory or s3://BUCKET/PREFIX)",
    ),
    # --- duplicates ---
    (
        "duplicate-top-level-key",
        add("  dlstack:environment: prod\n"),
        'Pulumi.dev.yaml:28: config: the key "dlstack:environment" appears twice (lines 2 and 28); keep one',
    ),
    (
        "duplicate-nested-key",
        sub("{min: 1, max: 2}", "{min: 1, max: 2, min: 3}"),
        'Pulumi.dev.yaml:24: dlstack:models[0].replicas: the key "min" appears twice (lines 24 and 24); keep one',
    ),
    (
        "duplicate-model-names",
        BASE + BASE[BASE.index("    - name: mnist-mlp") :],
        P + 'dlstack:models[1].name: "mnist-mlp" is already used by models[0]; names must be unique',
    ),
    # --- wrong types at every level ---
    (
        "config-is-list",
        "config:\n  - dlstack:environment: dev\n",
        P + 'has no "config:" mapping; a stack file looks like Pulumi.dev.yaml',
    ),
    ("config-is-null", "config:\n", P + 'has no "config:" mapping; a stack file looks like Pulumi.dev.yaml'),
    (
        "models-is-mapping",
        BASE[: BASE.index("  dlstack:models:")] + "  dlstack:models: {mnist-mlp: {model: mnist-mlp:1}}\n",
        P + "dlstack:models: {'mnist-mlp': {'model': 'mnist-mlp:1'}} is invalid: write a list (one '- item' per line)",
    ),
    (
        "model-is-string",
        sub("  dlstack:models:\n", "  dlstack:models:\n    - mnist-mlp:1\n"),
        P + 'dlstack:models[0]: "mnist-mlp:1" is invalid: write a mapping (key: value)',
    ),
    (
        "kubernetes-is-list",
        sub(
            '  dlstack:kubernetes:\n    context: kind-dlstack\n    version: "1.31"\n',
            "  dlstack:kubernetes: [kind-dlstack]\n",
        ),
        P + "dlstack:kubernetes: ['kind-dlstack'] is invalid: write a mapping (key: value)",
    ),
    (
        "replicas-is-list",
        sub("{min: 1, max: 2}", "[1, 2]"),
        P + f"{ML}.replicas: [1, 2] is invalid: write a mapping (key: value)",
    ),
    (
        "limits-is-scalar",
        sub("{cpu: 500m, memory: 512Mi}", "{cpu: 500m, memory: 512Mi, limits: 2}"),
        P + f"{ML}.resources.limits: 2 is invalid: write a mapping (key: value)",
    ),
    (
        "slo-is-null",
        sub("slo: {error_ratio: 0.01, p99_ms: 250}", "slo:"),
        P + f"{ML}.slo: None is invalid: write a mapping (key: value)",
    ),
    (
        "environment-is-list",
        sub("dlstack:environment: dev", "dlstack:environment: [dev]"),
        P + "dlstack:environment: ['dev'] is not allowed: input should be 'dev' or 'prod'",
    ),
    (
        "context-is-date",
        sub("context: kind-dlstack", "context: 2024-01-01"),
        P + "dlstack:kubernetes.context: datetime.date(2024, 1, 1) is invalid: write a string (quote it)",
    ),
    ("file-is-scalar", "hello\n", P + 'is "hello", not a mapping; a stack file looks like Pulumi.dev.yaml'),
    ("file-is-list", "- config\n", P + "is a list, not a mapping; a stack file looks like Pulumi.dev.yaml"),
    ("file-empty", "", P + 'is empty; a stack file looks like Pulumi.dev.yaml ("config:" and the dlstack: keys)'),
    (
        "file-only-comments",
        "# nothing here\n\n",
        P + 'is empty; a stack file looks like Pulumi.dev.yaml ("config:" and the dlstack: keys)',
    ),
    # --- syntax, size and other YAML features ---
    (
        "tabs",
        sub("    context: kind-dlstack", "\tcontext: kind-dlstack"),
        "Pulumi.dev.yaml:4: is not valid YAML: found character '\\t' that cannot start any token; "
        "indent with spaces, not tabs",
    ),
    (
        "unclosed-flow",
        sub("{min: 1, max: 2}", "{min: 1, max: 2"),
        "Pulumi.dev.yaml:25: is not valid YAML: expected ',' or '}', but got ':'",
    ),
    (
        "long-string",
        sub("context: kind-dlstack", "context: " + "k" * 5000),
        "Pulumi.dev.yaml:4: dlstack:kubernetes.context: is 5000 characters long; at most 1024 are allowed, shorten it",
    ),
    ("long-name", sub("name: mnist-mlp", "name: " + "m" * 64), P + f'{ML}.name: "{"m" * 64}" {DNS}'),
    (
        "file-too-large",
        lambda: BASE + "#" * MAX_FILE_BYTES + "\n",
        P + f"is larger than {MAX_FILE_BYTES} bytes; a stack file is a few kilobytes",
    ),
    (
        "two-documents",
        BASE + "---\n" + BASE,
        'Pulumi.dev.yaml:28: holds more than one YAML document ("---"); a stack file is one mapping',
    ),
    (
        "python-tag",
        add("  dlstack:x: !!python/object/apply:os.system [echo hi]\n"),
        'Pulumi.dev.yaml:28: dlstack:x: the tag "tag:yaml.org,2002:python/object/apply:os.system" is not allowed; '
        "remove it (stack files hold plain YAML)",
    ),
    (
        "binary-tag",
        sub("context: kind-dlstack", "context: !!binary aGk="),
        'Pulumi.dev.yaml:4: dlstack:kubernetes.context: the tag "tag:yaml.org,2002:binary" is not allowed; '
        "remove it (stack files hold plain YAML)",
    ),
    (
        "local-tag",
        sub("context: kind-dlstack", "context: !env HOME"),
        'Pulumi.dev.yaml:4: dlstack:kubernetes.context: the tag "!env" is not allowed; remove it (stack files hold '
        "plain YAML)",
    ),
    (
        "complex-key",
        add("  ? [a, b]\n  : 1\n"),
        "Pulumi.dev.yaml:28: config: a key must be a plain string, not a mapping, list or alias; write it as text",
    ),
    (
        "plain-secret",
        add("  dlstack:grafana_admin_password: hunter2\n"),
        P + "dlstack:grafana_admin_password: is a secret and must not be stored in plain text; run "
        "`pulumi config set --secret dlstack:grafana_admin_password <value>` (or remove it to generate one)",
    ),
    (
        "ingress-class-uppercase",
        sub("class_name: nginx", "class_name: Nginx"),
        P + 'dlstack:ingress.class_name: "Nginx" is not an IngressClass name (a DNS subdomain, e.g. "nginx")',
    ),
]


def _content(raw: str | bytes | Callable[[], str | bytes]) -> bytes:
    value = raw() if callable(raw) else raw
    return value.encode() if isinstance(value, str) else value


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by content hash, directories and links by kind."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_there_are_at_least_60_cases_with_unique_ids() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("content", "message"), [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_bad_stack_file_gives_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes | Callable[[], str | bytes],
    message: str,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("not the render's\n")
    stack = work / F
    stack.write_bytes(_content(content))
    out = work / "render"
    # Relative writes would land in work/, and a registry lookup would find nothing: either shows up below.
    monkeypatch.chdir(work)
    monkeypatch.setenv("DLSTACK_REGISTRY", str(tmp_path / "no-registry"))
    before = _snapshot(tmp_path)
    started = time.monotonic()
    rc = main(["render", "--stack", "dev", "--config-file", str(stack), "--out", str(out)])
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert captured.err == f"dlstack render: error: {message}\n"
    assert rc == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert not out.exists()
    assert _snapshot(tmp_path) == before
    assert elapsed < 20  # the alias bomb and the deep nesting are refused, not expanded


# Some cases once crashed the interpreter's own limits (memory, recursion, int parsing): run those as a
# user would, in a process of their own, and check the exit code and the absence of any traceback there.
SUBPROCESS_CASES = [
    "alias-bomb",
    "very-deep-flow-nesting",
    "int-beyond-str-limit",
    "bom-then-garbage",
    "ns-missing-letter",
]


def test_the_real_command_exits_2_without_a_traceback(tmp_path: Path) -> None:
    by_id = {i: (c, m) for i, c, m in CASES}
    for case in SUBPROCESS_CASES:
        content, message = by_id[case]
        stack = tmp_path / case / F
        stack.parent.mkdir()
        stack.write_bytes(_content(content))
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "stacks.cli",
                "render",
                "--stack",
                "dev",
                "--config-file",
                str(stack),
                "--out",
                "out",
            ],
            cwd=stack.parent,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DLSTACK_REGISTRY": str(tmp_path / "none")},
        )
        assert (res.returncode, res.stdout, res.stderr) == (2, "", f"dlstack render: error: {message}\n"), case
        assert sorted(p.name for p in stack.parent.iterdir()) == [F], case


def test_the_base_and_honest_anchors_still_parse(tmp_path: Path) -> None:
    """The refusals are narrow: the base file parses, and an anchor shared by two models is fine."""
    path = tmp_path / F
    path.write_text(BASE)
    assert load_stack_config("dev", path).models[0].name == "mnist-mlp"
    shared = sub("      slo: {error_ratio: 0.01, p99_ms: 250}\n", "      slo: &slo {error_ratio: 0.01, p99_ms: 250}\n")
    shared += "    - name: tiny-cnn\n      model: tiny-cnn:1\n      framework: pytorch\n      slo: *slo\n"
    path.write_text(shared)
    cfg = load_stack_config("dev", path)
    assert cfg.models[0].slo == cfg.models[1].slo
    # a UTF-8 BOM, CRLF line ends and provider settings are all accepted
    path.write_bytes(
        b"\xef\xbb\xbf"
        + add("  kubernetes:context: kind\n  pulumi:disable-default-providers: []\n").replace("\n", "\r\n").encode()
    )
    assert load_stack_config("dev", path).environment == "dev"


def test_committed_stacks_pass_the_hostile_checks() -> None:
    for stack in ("dev", "prod"):
        assert load_stack_config(stack, ROOT / f"Pulumi.{stack}.yaml").environment == stack
