"""Pruning of redundant rules (TASO section 4).

Four criteria, each counted in the library's statistics:

* **common subgraph** - if both sides contain the same node (same op, attributes
  and inputs; hash-consing makes this an identity test), the rule is the
  smaller rule around that node applied in a context, so it is dropped;
* **same top** - if every output of the two sides is computed by the same op
  from equivalent tensors, the rule follows from the rules that equate those
  tensors: of the graphs of a bucket that share such a *top signature* only
  the smallest is kept as a rule side;
* **side by side** - when both sides compute their outputs by disjoint sets of
  nodes, the rule is two smaller rules applied together;
* **input renaming** - rules equal up to renaming inputs and shape symbols (or
  swapping sides) have the same canonical id; one is kept.

The first three are structural, so they are applied before the (costly) float and
Z3 verification; the last after it.
"""
from __future__ import annotations


def representatives(records: list) -> list:
    """One graph per top signature, the smallest (records are sorted by size)."""
    seen, reps = set(), []
    for r in records:
        if r.top not in seen:
            seen.add(r.top)
            reps.append(r)
    return reps


def candidate_pairs(reps: list) -> tuple:
    """Pairs of representatives that share no node (no common subgraph) and are not
    two independent rules side by side.  Returns (pairs, n_common, n_independent)."""
    pairs, common, independent = [], 0, 0
    for i in range(len(reps)):
        for j in range(i + 1, len(reps)):
            if not reps[i].skeys.isdisjoint(reps[j].skeys):
                common += 1
            elif reps[i].independent and reps[j].independent:
                independent += 1
            else:
                pairs.append((i, j))
    return pairs, common, independent


def dedupe_by_renaming(rules, library) -> int:
    """Add rules to the library unless an equal-up-to-renaming rule is in it; returns drops."""
    dropped = 0
    for r in rules:
        if not library.add(r):
            dropped += 1
    return dropped
