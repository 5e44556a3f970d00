"""Names, versions, aliases and digests: the one validator that config, registry and infra share.

Every check is a full-string match (``re.fullmatch``), never ``re.match`` with ``$``: ``$`` also
matches before a trailing newline, so ``"mnist\\n"`` would pass as a name and become a label, a
file name and a Kubernetes object name.
"""

from __future__ import annotations

import re

# Kubernetes DNS-1123 label: model names become object names, labels and image repositories.
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
VERSION = re.compile(r"[0-9]{1,9}")  # registry versions are integers as strings: "1", "2", ...
ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
SHA256 = re.compile(r"[0-9a-f]{64}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# NAME, NAME:VERSION or NAME@ALIAS.
MODEL_REF = re.compile(
    rf"(?P<name>{DNS_LABEL.pattern})(?::(?P<version>{VERSION.pattern})|@(?P<alias>{ALIAS.pattern}))?"
)

_HINTS = {
    DNS_LABEL: "lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit",
    VERSION: "an integer such as 1 or 2",
    ALIAS: "a letter, then letters, digits, '_', '.' or '-', at most 63",
    SHA256: "64 lowercase hex digits",
    DIGEST: "sha256: followed by 64 lowercase hex digits",
    MODEL_REF: "NAME, NAME:VERSION or NAME@ALIAS, e.g. mnist-mlp:2 or mnist-mlp@champion",
}


def matches(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def check(pattern: re.Pattern[str], value: object, what: str) -> str:
    """``value`` if it matches in full, else ValueError: ``<what> 'x\\n' is not valid: <the grammar>``."""
    if not matches(pattern, value):
        raise ValueError(f"{what} {value!r} is not valid: use {_HINTS[pattern]}")
    return str(value)


def is_dns_label(value: object) -> bool:
    return matches(DNS_LABEL, value)
