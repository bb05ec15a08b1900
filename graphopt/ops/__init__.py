"""Operator registry.  Importing this package registers every operator.

The import order below is the registry's order, which is also the order in which the
enumerator tries the ops it can enumerate (:func:`enumerable_ops`).
"""
from . import linalg, elementwise, attention, layout, reduce, forms, parallel  # noqa: F401,I001  (registration side effects)
from .base import (FINGERPRINT, FLOAT, PRIME, REGISTRY, Z3, AttrSpec, OpDef, RegistryError,
                   enumerable_ops, get_op, registry_version)

__all__ = ["REGISTRY", "OpDef", "AttrSpec", "get_op", "registry_version", "PRIME",
           "FLOAT", "FINGERPRINT", "Z3", "RegistryError", "enumerable_ops"]
