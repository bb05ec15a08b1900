"""The roofline cost model: FLOPs and bytes against a device table.

``cost = overhead + max(flops / peak_flops[dtype], bytes / bandwidth)``; a view
op (transpose, reshape, split) moves no data and costs only a small dispatch
overhead.  Deterministic for a given device entry, and needs no hardware
(except the one-off, cached calibration of the ``"cpu"`` entry).

Example:
    >>> cost = RooflineCost("h100").op_cost("matmul", [(64, 128), (128, 256)], [(64, 256)], "float16")
    >>> round(cost * 1e6, 2)  # microseconds: launch overhead + memory-bound time
    3.03
"""
from __future__ import annotations

from graphopt.errors import GraphoptError

from .base import CostModel, lookup_op
from .devices import get_device


class RooflineCost(CostModel):
    """Roofline estimate of an op's run time on a device of :data:`DEVICES`.

    Args:
        device: a key of :data:`DEVICES` ("cpu", "a100", "h100", "h200").
        cache_dir: where the CPU calibration is cached (default ``~/.cache/graphopt``).
    """

    name = "roofline"

    def __init__(self, device: str = "cpu", cache_dir=None):
        super().__init__()
        self.spec = get_device(device, cache_dir)
        self.device = device

    def _price(self, op, in_shapes, out_shapes, dtype, attrs) -> float:
        opdef = lookup_op(op)
        if opdef.view:
            return self.spec.view_overhead
        peak = self.spec.peak_flops.get(dtype)
        if not peak:
            raise GraphoptError(f"device {self.device!r} has no peak FLOP/s for dtype {dtype!r}")
        compute = opdef.flops(in_shapes, out_shapes, attrs) / peak
        memory = opdef.bytes(in_shapes, out_shapes, dtype) / self.spec.bandwidth
        return self.spec.overhead + max(compute, memory)
