"""Operator registry.  Importing this package registers every operator."""
from . import attention, elementwise, layout, linalg, reduce  # noqa: F401  (registration side effects)
from .base import (FINGERPRINT, FLOAT, PRIME, REGISTRY, Z3, AttrSpec, OpDef, get_op,
                   registry_version)

__all__ = ["REGISTRY", "OpDef", "AttrSpec", "get_op", "registry_version", "PRIME",
           "FLOAT", "FINGERPRINT", "Z3"]
