"""Cost models for graph search: one protocol, a roofline and a measured model.

Example:
    >>> model = get_cost_model("roofline", device="h100")
    >>> model.name, model.device
    ('roofline', 'h100')
"""
from __future__ import annotations

from graphopt.errors import GraphoptError

from .base import CostModel
from .devices import DEVICES, Device, get_device
from .measured import MeasuredCost
from .roofline import RooflineCost

COST_MODELS = {"roofline": RooflineCost, "measured": MeasuredCost}


def get_cost_model(name: str, **kw) -> CostModel:
    """A cost model by name.

    Args:
        name: "roofline" or "measured".
        **kw: passed to the model's constructor (``device``, ``cache_dir``/``cache_path``...).
    Returns:
        the :class:`CostModel` instance.
    Raises:
        GraphoptError: the name is unknown.
    """
    try:
        cls = COST_MODELS[name]
    except (KeyError, TypeError):
        raise GraphoptError(f"unknown cost model {name!r} (valid: {', '.join(sorted(COST_MODELS))})") from None
    return cls(**kw)


__all__ = ["CostModel", "RooflineCost", "MeasuredCost", "DEVICES", "Device", "get_device",
           "get_cost_model", "COST_MODELS"]
