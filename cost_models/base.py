"""The cost-model protocol shared by every cost model.

A cost model prices one operator instance (:meth:`CostModel.op_cost`) in
seconds; the cost of a graph is the sum over its nodes.  Nodes whose op the
registry does not know (opaque nodes, carried through unchanged) cost 0.0:
every candidate graph contains them alike, so they do not change a comparison.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

from graphopt.dims import Dim
from graphopt.errors import GraphoptError
from graphopt.ir import Graph, concrete_attrs
from graphopt.ops import REGISTRY


class CostModel(ABC):
    """Base class of cost models.

    Attributes:
        name: the model's name ("roofline", "measured").
        device: the device it prices ops for.
    """

    name: str = "abstract"
    device: str = ""

    def __init__(self) -> None:
        self._memo: dict = {}

    @abstractmethod
    def _price(self, op: str, in_shapes: tuple, out_shapes: tuple, dtype: str, attrs: dict) -> float:
        """Cost of a registered op; arguments are already plain (ints, JSON-able attrs)."""

    def op_cost(self, op: str, in_shapes: Sequence, out_shapes: Sequence, dtype: str,
                attrs: Mapping | None = None) -> float:
        """Seconds one instance of ``op`` takes.

        Args:
            op: registry name; an unregistered or opaque op costs 0.0.
            in_shapes: shapes of the inputs, as tuples of ints (``()`` for a scalar).
            out_shapes: shapes of the outputs.
            dtype: dtype name ("float32", ...).
            attrs: concrete attributes (Dim values are converted to ints).
        Returns:
            the cost in seconds.
        """
        if lookup_op(op) is None:
            return 0.0
        ins, outs = plain_shapes(in_shapes), plain_shapes(out_shapes)
        plain = {k: plain_value(v) for k, v in dict(attrs or {}).items()}
        key = (op, ins, outs, dtype, attrs_key(plain))
        if key not in self._memo:
            self._memo[key] = float(self._price(op, ins, outs, dtype, plain))
        return self._memo[key]

    def node_costs(self, graph: Graph) -> list:
        """Cost of each node of ``graph``, in node order.

        Args:
            graph: a graph with concrete (constant) shapes.
        Returns:
            a list of seconds, one per node (0.0 for opaque nodes).
        """
        costs = []
        for node in graph.nodes:
            if lookup_op(node.op) is None:
                costs.append(0.0)
                continue
            in_types = [graph.type_of(r) for r in node.inputs]
            dtype = in_types[0][1] if in_types else node.outs[0][1]
            try:
                attrs = concrete_attrs(node.attrs, {})
            except ValueError as e:  # a symbolic attribute such as split(left=c)
                raise GraphoptError(f"cost models need concrete sizes: {node.op}: {e}") from None
            costs.append(self.op_cost(node.op, [s for s, _ in in_types], [s for s, _ in node.outs],
                                      dtype, attrs))
        return costs

    def graph_cost(self, graph: Graph) -> float:
        """Total cost of ``graph``: the sum of :meth:`node_costs`.

        Args:
            graph: a graph with concrete (constant) shapes.
        Returns:
            seconds.
        """
        return sum(self.node_costs(graph))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"


def lookup_op(op: str):
    """The registry's OpDef for ``op``, or None for unregistered or opaque ops."""
    opdef = REGISTRY.get(op)
    if opdef is None or getattr(opdef, "opaque", False):
        return None
    return opdef


def plain_value(value):
    """Dims (and tuples/lists of them) as ints: a symbolic size as its example value (the hint
    of :func:`graphopt.dims.size_hints`); raises GraphoptError for a symbolic dim without one."""
    if isinstance(value, Dim):
        try:
            return value.hint()
        except ValueError:
            raise GraphoptError(f"cost models need a size for the symbolic dimension {value}") from None
    if isinstance(value, (tuple, list)):
        return tuple(plain_value(v) for v in value)
    return value


def plain_shapes(shapes) -> tuple:
    """A sequence of shapes as a tuple of tuples of ints."""
    return tuple(tuple(int(plain_value(d)) for d in s) for s in shapes)


def attrs_key(attrs: Mapping) -> str:
    """Canonical JSON of plain attributes (the cache key)."""
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(attrs.items())},
                      sort_keys=True)
