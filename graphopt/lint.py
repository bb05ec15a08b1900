"""A lint of the IR between pipeline stages: what every stage must leave behind.

* every value a node reads exists, and the nodes have a topological order (no cycle,
  ordering dependencies of side effects included);
* every registry node's output types are what the registry infers from its inputs and
  attributes now (a rewrite never changes a type);
* every graph output exists.

The test suite runs it after every stage (``Options(lint=True)``); a failure names the
stage and the node.
"""
from __future__ import annotations

from .dims import Dim, plain
from .errors import GraphoptError
from .ir import OPAQUE
from .ops import get_op
from .rewrite import INPUT


class LintError(GraphoptError):
    """The IR broke an invariant: a bug in the stage named in the message."""


def lint_mgraph(mg, stage: str) -> None:
    """Raise :class:`LintError` when ``mg`` breaks an invariant of the IR."""
    for nid, n in mg.nodes.items():
        for v in n.inputs:
            if v[0] not in mg.nodes or v[1] >= len(mg.nodes[v[0]].outs):
                raise LintError(f"IR lint after {stage}: node {nid} ({n.op}) reads {v}, which does not exist")
    try:
        mg.topo_order()
    except GraphoptError:
        raise LintError(f"IR lint after {stage}: the graph has a cycle") from None
    for nid, n in mg.nodes.items():
        if n.op in (INPUT, OPAQUE):
            continue
        ins = [mg.type_of(v) for v in n.inputs]
        opdef = get_op(n.op)
        try:
            outs = opdef.infer_checked([tuple(Dim.of(d) for d in s) for s, _ in ins], [dt for _, dt in ins],
                                       opdef.full_attrs(dict(n.attrs)))
        except GraphoptError as e:
            raise LintError(f"IR lint after {stage}: node {nid} ({n.op}) does not type-check: {e}") from None
        got = tuple((tuple(plain(d) for d in s), dt) for s, dt in outs)
        if got != tuple(n.outs):
            raise LintError(f"IR lint after {stage}: node {nid} ({n.op}) says its outputs are {n.outs}, "
                            f"the registry infers {got}")
    for v in mg.outputs:
        if v[0] not in mg.nodes:
            raise LintError(f"IR lint after {stage}: graph output {v} does not exist")


__all__ = ["lint_mgraph", "LintError"]
