"""Cost-guided search over rule applications (TASO's backtracking search).

A priority queue holds candidate graphs ordered by cost.  Each step takes the
cheapest, tries every rule pattern (both directions of every rule) and, for a
pattern that matches, applies it at every non-overlapping site at once (LLM
graphs repeat the same block per layer, so one step rewrites all layers).  A
new graph is queued when its cost is below ``alpha`` times the best cost so
far (alpha > 1 lets the search pass through slightly worse graphs) and it has
not been seen (structural hash).  The search stops when the queue is empty,
the budget of expanded graphs is spent, or the time limit passes.  Everything
is iterated in a fixed order, so a run is deterministic.
"""
from __future__ import annotations

import heapq
import time
from collections import Counter
from dataclasses import dataclass, field

from .errors import GraphoptError
from .rewrite import INPUT, MGraph, Pattern, apply_match, find_matches, replacement_plan
from .ir import OPAQUE


@dataclass
class SearchResult:
    graph: MGraph
    cost: float
    initial_cost: float
    applied: Counter = field(default_factory=Counter)   # rule pattern id -> sites rewritten
    expanded: int = 0
    candidates: int = 0
    seconds: float = 0.0
    stopped_by: str = "exhausted"
    stats: dict = field(default_factory=dict)   # engine-specific figures for the report


def compile_patterns(rules) -> list:
    """Both directions of every rule, skipping directions whose left side has no op
    (an identity ``X -> f(X)`` would match every value)."""
    out = []
    for rule in rules:
        for reverse in (False, True):
            p = Pattern.of(rule, reverse)
            if p.lhs.nodes and _uses_all_inputs(p):
                out.append(p)
    return out


def _uses_all_inputs(p: Pattern) -> bool:
    used = {r for n in p.lhs.nodes for r in n.inputs}
    return all(i.name in used for i in p.rhs.inputs if any(i.name in n.inputs for n in p.rhs.nodes))


class GraphCost:
    """Sum of per-node costs with a cache keyed by the node's type signature."""

    def __init__(self, cost_model):
        self.model = cost_model
        self.cache: dict = {}

    def node(self, mg: MGraph, nid: int) -> float:
        n = mg.nodes[nid]
        if n.op in (INPUT, OPAQUE):
            return 0.0
        ins = tuple(mg.type_of(v) for v in n.inputs)
        key = (n.op, ins, n.attrs)
        c = self.cache.get(key)
        if c is None:
            c = self.cache[key] = self.model.op_cost(
                n.op, [s for s, _ in ins], [s for s, _ in n.outs], n.outs[0][1], dict(n.attrs))
        return c

    def __call__(self, mg: MGraph) -> float:
        """Cost of one call; nodes computed from constants only are free (folded once)."""
        const = mg.const_nodes()
        return sum(self.node(mg, nid) for nid in mg.nodes if nid not in const)


def apply_all(mg: MGraph, matches) -> tuple:
    """Apply as many of the matches as do not overlap, on one copy; returns (graph, count).

    Each match was checked against ``mg`` (no cycle); rewriting several sites at
    once could still close one, rarely, so the result is checked once and, if
    cyclic, only the first match is applied."""
    cur, done = mg.copy(), 0
    for m in matches:
        if done and not _still_valid(cur, mg, m):
            continue
        if apply_match(cur, m, inplace=True) is not None:
            done += 1
    if done > 1:
        try:
            cur.topo_order()
        except GraphoptError:
            return apply_all(mg, matches[:1])
    return cur, done


def _still_valid(cur: MGraph, orig: MGraph, m) -> bool:
    for nid in m.nodes.values():
        if cur.nodes.get(nid) is not orig.nodes.get(nid):
            return False
    return all(v[0] in cur.nodes for v in m.values.values())


def estimate_delta(g: MGraph, match, cost: GraphCost, const: set) -> float | None:
    """Cost change of applying one match, from the matched nodes and the replacement's
    types alone (no graph is built); None if the replacement does not type-check."""
    plan = replacement_plan(g, match)
    if plan is None:
        return None
    p = match.pattern
    removed = sum(cost.node(g, nid) for nid in set(match.nodes.values()) if nid not in const)
    types = {i.name: g.type_of(match.values[i.name]) for i in p.rhs.inputs}
    is_const = {i.name: match.values[i.name][0] in const for i in p.rhs.inputs}
    added = 0.0
    for idx, (node, attrs, outs) in enumerate(plan):
        ins = tuple(types[r] for r in node.inputs)
        folded = all(is_const[r] for r in node.inputs)
        if not folded:
            key = (node.op, ins, attrs)
            c = cost.cache.get(key)
            if c is None:
                c = cost.cache[key] = cost.model.op_cost(node.op, [s for s, _ in ins], [s for s, _ in outs],
                                                         outs[0][1], dict(attrs))
            added += c
        for j, t in enumerate(outs):
            ref = f"%{idx}.{j}" if len(outs) > 1 else f"%{idx}"
            types[ref], is_const[ref] = t, folded
    return added - removed


def search(mg: MGraph, patterns, cost_model, alpha: float = 1.05, budget: int = 100,
           time_limit: float = 10.0, max_matches: int = 256, patience: int = 20) -> SearchResult:
    """Find a cheaper equivalent graph.

    Args:
        mg: the graph (not modified).
        patterns: from :func:`compile_patterns`.
        cost_model: an object with ``op_cost`` (see ``cost_models``).
        alpha: relaxation; graphs up to ``alpha * best`` stay in the queue.
        budget: most graphs to expand.
        time_limit: seconds.
        max_matches: most sites of one pattern to rewrite in one step.
        patience: stop after this many expanded graphs without a better one.
    Returns:
        the best graph found and what was applied.
    """
    start = time.monotonic()
    cost = GraphCost(cost_model)
    c0 = cost(mg)
    result = SearchResult(mg, c0, c0)
    queue = [(c0, 0, mg, Counter())]
    seen = {mg.structural_hash()}
    tie = 1
    last_gain = 0
    while queue:
        if result.expanded >= budget:
            result.stopped_by = "budget"
            break
        if result.expanded - last_gain >= patience:
            result.stopped_by = "patience"
            break
        if time.monotonic() - start > time_limit:
            result.stopped_by = "time limit"
            break
        c, _, g, applied = heapq.heappop(queue)
        result.expanded += 1
        present = g.op_counts()
        const = g.const_nodes()
        for p in patterns:
            if any(present.get(op, 0) < k for op, k in p.op_counts):
                continue
            matches = find_matches(g, p, limit=max_matches)
            if not matches:
                continue
            # TASO prunes by cost before building a graph: estimate each site's delta
            deltas = [estimate_delta(g, m, cost, const) for m in matches]
            keep = [m for m, d in zip(matches, deltas) if d is not None]
            total = sum(d for d in deltas if d is not None)
            if not keep or c + total >= alpha * result.cost:
                continue
            new, n = apply_all(g, keep)
            if n == 0:
                continue
            h = new.structural_hash()
            if h in seen:
                continue
            seen.add(h)
            result.candidates += 1
            nc = cost(new)
            hist = applied + Counter({p.rule_id: n})
            if nc < result.cost:
                result.graph, result.cost, result.applied = new, nc, hist
                last_gain = result.expanded
            if nc < alpha * result.cost:
                heapq.heappush(queue, (nc, tie, new, hist))
                tie += 1
            if time.monotonic() - start > time_limit:
                break
    result.seconds = time.monotonic() - start
    return result


__all__ = ["search", "compile_patterns", "SearchResult", "GraphCost", "apply_all"]
