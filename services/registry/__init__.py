"""Model registry: immutable, content-addressed model versions with lineage (``dlstack models``)."""

from services.registry.registry import (
    LATEST,
    REGISTRY_ENV,
    DatasetRef,
    ModelVersion,
    Registration,
    Registry,
    default_root,
    framework_version,
    parse_ref,
)
from services.registry.store import LocalStore, RegistryError, Store

__all__ = [
    "LATEST",
    "REGISTRY_ENV",
    "DatasetRef",
    "LocalStore",
    "ModelVersion",
    "Registration",
    "Registry",
    "RegistryError",
    "Store",
    "default_root",
    "framework_version",
    "parse_ref",
]
