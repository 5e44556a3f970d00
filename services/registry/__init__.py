"""Model registry: immutable, content-addressed model versions with lineage (``dlstack models``).

One concept per module: ``location`` (where it is, and which setting wins), ``store`` (the storage
interface and the local directory), ``objectstore`` (S3/GCS/Azure), ``cache`` (the local blob cache
of an object store), ``registry`` (versions, aliases, lineage), ``copy`` (between registries).
"""

from services.registry.cache import CACHE_ENV, BlobCache, default_cache_dir
from services.registry.copy import CopyResult, copy_versions
from services.registry.location import (
    REGISTRY_ENV,
    RegistryLocation,
    default_root,
    parse_location,
    registry_location,
)
from services.registry.objectstore import ObjectStore
from services.registry.registry import (
    LATEST,
    DatasetRef,
    ModelVersion,
    Registration,
    Registry,
    RegistrySnapshot,
    framework_version,
    parse_ref,
)
from services.registry.store import LocalStore, RegistryError, Store

__all__ = [
    "CACHE_ENV",
    "LATEST",
    "REGISTRY_ENV",
    "BlobCache",
    "CopyResult",
    "DatasetRef",
    "LocalStore",
    "ModelVersion",
    "ObjectStore",
    "Registration",
    "Registry",
    "RegistryError",
    "RegistryLocation",
    "RegistrySnapshot",
    "Store",
    "copy_versions",
    "default_cache_dir",
    "default_root",
    "framework_version",
    "parse_location",
    "parse_ref",
    "registry_location",
]
