"""Rewrite engines: what a schedule phase runs its patterns with.

An engine is a function ``(mg, patterns, cost_model, opts) -> SearchResult``: it takes a
:class:`~graphopt.rewrite.MGraph` (not modified), the phase's compiled patterns, a cost
model and the :class:`~graphopt.options.Options`, and returns the graph it ends with and
what it applied (:class:`~graphopt.search.SearchResult`).  A new engine (equality
saturation, a beam search) is one function added with :func:`register_engine`; the
pipeline and the schedule do not change.

* ``greedy``: every pattern, in order, at every site where it matches and type-checks,
  until a whole round applies nothing (a fixed point).  For canonical forms and fusions,
  which are always wanted.  A rewrite that leads back to a graph seen before is not taken,
  so a pair of rules that undo each other cannot loop; ``max_rounds`` bounds the rest.
* ``backtracking``: TASO's cost-guided search (:func:`graphopt.search.search`).
* ``egraph``: equality saturation (Tensat's search) on egglog, then the cheapest DAG is
  extracted (:mod:`graphopt.egraph`).
* ``hybrid``: ``egraph``, then ``backtracking`` from its result.
"""
from __future__ import annotations

import time
from collections import Counter

from .rewrite import find_matches
from .search import GraphCost, SearchResult, apply_all, search


def greedy(mg, patterns, cost_model, opts, max_rounds: int = 32, max_matches: int = 4096) -> SearchResult:
    """Apply the patterns as written until none applies; cost is only reported."""
    start = time.monotonic()
    cost = GraphCost(cost_model)
    c0 = cost(mg)
    g, applied, rounds = mg, Counter(), 0
    seen = {g.structural_hash()}
    stopped = "fixed point"
    while True:
        if rounds >= max_rounds:
            stopped = "round limit"
            break
        rounds += 1
        changed = False
        for p in patterns:
            present = g.op_counts()
            if any(present.get(op, 0) < k for op, k in p.op_counts):
                continue
            matches = find_matches(g, p, limit=max_matches)
            if not matches:
                continue
            new, n = apply_all(g, matches)
            if n == 0:
                continue
            h = new.structural_hash()
            if h in seen:
                continue
            seen.add(h)
            g, changed = new, True
            applied[p.rule_id] += n
        if not changed:
            break
    return SearchResult(g, cost(g), c0, applied, expanded=rounds, candidates=len(seen) - 1,
                        seconds=time.monotonic() - start, stopped_by=stopped)


def backtracking(mg, patterns, cost_model, opts) -> SearchResult:
    """TASO's search with the options' alpha, budget and time limit."""
    return search(mg, patterns, cost_model, alpha=opts.alpha, budget=opts.budget, time_limit=opts.time_limit)


def egraph(mg, patterns, cost_model, opts) -> SearchResult:
    """Equality saturation on egglog, block by block (:mod:`graphopt.egraph`)."""
    from .egraph import egraph_search
    return egraph_search(mg, patterns, cost_model, opts)


def hybrid(mg, patterns, cost_model, opts) -> SearchResult:
    """Equality saturation, then TASO's search from the graph it extracted: the e-graph finds
    the rewrites whose first step costs more (the LoRA merge), the backtracking search the
    rules the e-graph leaves out (those bringing in ops a block does not have, such as the
    concat and split of a projection merge).  The e-graph has the time limit; the search what
    is left of it, but at least half."""
    from dataclasses import replace
    start = time.monotonic()
    try:
        first = egraph(mg, patterns, cost_model, opts)
    except Exception as e:   # noqa: BLE001 - the e-graph is an extra: TASO's search still runs
        c0 = GraphCost(cost_model)(mg)
        first = SearchResult(mg, c0, c0, seconds=time.monotonic() - start,
                             stopped_by=f"failed ({type(e).__name__}: {e})")
    rest = max(opts.time_limit / 2, opts.time_limit - first.seconds)
    second = backtracking(first.graph, patterns, cost_model, replace(opts, time_limit=rest))
    return SearchResult(second.graph, second.cost, first.initial_cost, first.applied + second.applied,
                        expanded=first.expanded + second.expanded, candidates=first.candidates + second.candidates,
                        seconds=first.seconds + second.seconds,
                        stopped_by=f"e-graph: {first.stopped_by}; backtracking: {second.stopped_by}",
                        stats=first.stats)


ENGINES = {"greedy": greedy, "backtracking": backtracking, "egraph": egraph, "hybrid": hybrid}


def register_engine(name: str, fn) -> None:
    """Make ``fn`` available to schedules as ``name``."""
    if not callable(fn):
        raise TypeError("an engine is a function (mg, patterns, cost_model, opts) -> SearchResult")
    ENGINES[name] = fn


__all__ = ["ENGINES", "register_engine", "greedy", "backtracking", "egraph", "hybrid"]
