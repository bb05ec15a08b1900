"""Applying rules to concrete graphs: a mutable graph, a matcher and a rewriter.

:class:`MGraph` is the search's working form of an IR :class:`~graphopt.ir.Graph`:
nodes by id, each input a ``(node_id, output_index)`` value, and a consumer
index, so a rewrite touches only the nodes it changes.

A rule side is a *pattern*; a match binds every pattern input to a graph value
and every pattern node to a graph node with the same op and attributes, with
the pattern's symbolic sizes unified with the graph's concrete ones.  Rules use
negative axes, so a pattern input of rank r also matches a value of higher
rank: the extra leading axes are batch axes.  Pattern nodes whose outputs are
not rule outputs must have no consumer outside the match.  The replacement is
built by the op registry's shape inference; if it does not produce exactly the
matched outputs' types the match is dropped, so a rewrite never changes a
type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .dims import Dim, plain, solve
from .errors import GraphoptError
from .ir import OPAQUE, Graph, concrete_attrs, parse_ref
from .ops import get_op

INPUT = "input"


@dataclass
class MNode:
    op: str
    inputs: tuple            # ((node_id, out_index), ...)
    attrs: tuple             # sorted (key, value) items, concrete
    outs: tuple              # ((shape ints, dtype), ...)
    name: str | None = None  # graph input name
    payload: object = None   # opaque payload
    const: bool = False      # a graph input whose value is known (weights, literals)
    after: tuple = ()        # node ids that must run first though no value flows (side effects)


class MGraph:
    """A mutable graph with a consumer index."""

    def __init__(self):
        self.nodes: dict = {}
        self.consumers: dict = {}   # value -> {(node_id, position), ...}
        self.outputs: list = []     # values
        self.next_id = 0
        self._intern: dict = {}     # (op, inputs, attrs) -> node id, for registry ops
        self._by_op: dict | None = None  # op -> sorted node ids (rebuilt after a change)
        self._by_sig: dict | None = None
        self._changes = 0                # bumped by every mutation; keys derived caches
        self._levels: tuple | None = None
        self.constants: dict = {}        # const input name -> value (read by guarded rules)
        self._guard_ok: dict = {}        # (input name, guard) -> bool
        self.facts: dict = {}            # value -> guards it passes for every size (proved)
        self._ordered: set = set()       # ids of nodes with ordering deps (``MNode.after``)

    # -- building ------------------------------------------------------------------
    def add_node(self, node: MNode, intern: bool = True) -> int:
        key = (node.op, node.inputs, node.attrs)
        if intern and node.op not in (INPUT, OPAQUE) and key in self._intern:
            return self._intern[key]
        nid = self.next_id
        self.next_id += 1
        self._changes += 1
        self._by_op = self._by_sig = None
        self.nodes[nid] = node
        for pos, v in enumerate(node.inputs):
            self.consumers.setdefault(v, set()).add((nid, pos))
        if node.op not in (INPUT, OPAQUE):
            self._intern[key] = nid
        if node.after:
            self._ordered.add(nid)
        return nid

    def redirect_after(self, old: set, new: set) -> None:
        """Nodes that had to run after one of ``old`` (side effects: a write after the reads
        before it) now run after the nodes ``new`` that replace them."""
        for k in sorted(self._ordered):
            n = self.nodes.get(k)
            if n is None or not old & set(n.after):
                continue
            after = tuple(sorted((set(n.after) - old) | (new - {k})))
            self.nodes[k] = MNode(n.op, n.inputs, n.attrs, n.outs, n.name, n.payload, n.const, after)
            self._changes += 1
            self._levels = None

    @staticmethod
    def from_graph(graph: Graph) -> tuple:
        """Returns (MGraph, value_of) where value_of maps IR refs to values."""
        mg = MGraph()
        value_of, id_of = {}, {}
        for inp in graph.inputs:
            shape = tuple(plain(d) for d in inp.shape)
            nid = mg.add_node(MNode(INPUT, (), (), ((shape, inp.dtype),), name=inp.name, const=inp.const),
                              intern=False)
            value_of[inp.name] = (nid, 0)
        for idx, n in enumerate(graph.nodes):
            outs = tuple((tuple(plain(d) for d in s), dt) for s, dt in n.outs)
            ins = tuple(value_of[r] for r in n.inputs)
            after = tuple(id_of[k] for k in graph.after.get(idx, ()))
            if n.op == OPAQUE:
                nid = mg.add_node(MNode(OPAQUE, ins, n.attrs, outs, payload=graph.payloads[idx], after=after),
                                  intern=False)
            else:
                nid = mg.add_node(MNode(n.op, ins, tuple(concrete_attrs(n.attrs, None).items()), outs, after=after),
                                  intern=not after)
            id_of[idx] = nid
            for j in range(len(outs)):
                value_of[f"%{idx}.{j}" if len(outs) > 1 else f"%{idx}"] = (nid, j)
        mg.outputs = [value_of[r] for r in graph.outputs]
        mg.constants = graph.constants
        mg.facts = {value_of[r]: set(guards) for r, guards in graph.facts.items() if r in value_of}
        return mg, value_of

    def copy(self) -> "MGraph":
        new = MGraph()
        new.nodes = dict(self.nodes)
        new.consumers = {k: set(v) for k, v in self.consumers.items()}
        new.outputs = list(self.outputs)
        new.next_id = self.next_id
        new._intern = dict(self._intern)
        new._changes, new._levels = self._changes, self._levels  # same graph: caches stay valid
        new.constants, new._guard_ok, new.facts = self.constants, self._guard_ok, self.facts
        new._ordered = set(self._ordered)
        return new

    def passes_guard(self, value, guard: str) -> bool:
        """Whether ``value`` is a constant input whose value passes the guard, or a value
        proved to pass it for every size (``facts``)."""
        if guard in self.facts.get(value, ()):
            return True
        node = self.nodes[value[0]]
        if node.op != INPUT or not node.const or node.name not in self.constants:
            return False
        key = (node.name, guard)
        if key not in self._guard_ok:
            from .guards import get_guard
            self._guard_ok[key] = get_guard(guard).check(self.constants[node.name])
        return self._guard_ok[key]

    # -- queries ----------------------------------------------------------------------
    def type_of(self, value) -> tuple:
        nid, j = value
        return self.nodes[nid].outs[j]

    def by_op(self, op: str) -> list:
        if self._by_op is None:
            index: dict = {}
            for nid in sorted(self.nodes):
                index.setdefault(self.nodes[nid].op, []).append(nid)
            self._by_op = index
        return self._by_op.get(op, [])

    def by_signature(self, sig: tuple) -> list:
        """Nodes with this op whose inputs come from these ops (None: any producer).

        A pattern's first node has such a signature; looking it up rejects most
        patterns in O(1)."""
        if self._by_op is None or self._by_sig is None:
            index: dict = {}
            for nid in sorted(self.nodes):
                n = self.nodes[nid]
                prods = tuple(self.nodes[v[0]].op for v in n.inputs)
                for mask in range(1 << len(prods)):
                    key = (n.op, tuple(None if mask >> i & 1 else p for i, p in enumerate(prods)))
                    index.setdefault(key, []).append(nid)
            self._by_sig = index
            self.by_op("")
        return self._by_sig.get(sig, [])

    def op_counts(self) -> dict:
        self.by_op("")
        return {op: len(ids) for op, ids in self._by_op.items()}

    def deps(self, nid) -> set:
        """What must run before a node: its inputs' producers and its ordering deps."""
        n = self.nodes[nid]
        return {v[0] for v in n.inputs} | {a for a in n.after if a in self.nodes}

    def topo_order(self) -> list:
        """Node ids, inputs (and ordering deps) before users (stable: ties by id)."""
        import heapq
        deps = {nid: self.deps(nid) for nid in self.nodes}
        indeg = {nid: len(d) for nid, d in deps.items()}
        users: dict = {}
        for nid, d in deps.items():
            for src in d:
                users.setdefault(src, []).append(nid)
        ready = [nid for nid, d in indeg.items() if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            nid = heapq.heappop(ready)
            order.append(nid)
            for u in users.get(nid, ()):
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(self.nodes):
            raise GraphoptError("internal error: the rewritten graph has a cycle")
        return order

    # -- mutation -------------------------------------------------------------------
    def replace_uses(self, old, new) -> None:
        for nid, pos in list(self.consumers.get(old, ())):
            node = self.nodes[nid]
            ins = list(node.inputs)
            ins[pos] = new
            self._set_inputs(nid, tuple(ins))
        self.outputs = [new if v == old else v for v in self.outputs]

    def _set_inputs(self, nid, ins):
        node = self.nodes[nid]
        for pos, v in enumerate(node.inputs):
            self.consumers[v].discard((nid, pos))
        if node.op not in (INPUT, OPAQUE) and self._intern.get((node.op, node.inputs, node.attrs)) == nid:
            del self._intern[(node.op, node.inputs, node.attrs)]
        self.nodes[nid] = MNode(node.op, ins, node.attrs, node.outs, node.name, node.payload, node.const, node.after)
        self._by_sig = None
        self._changes += 1
        for pos, v in enumerate(ins):
            self.consumers.setdefault(v, set()).add((nid, pos))
        if node.op not in (INPUT, OPAQUE):
            self._intern.setdefault((node.op, ins, node.attrs), nid)

    def remove_dead(self, start=None) -> int:
        """Drop registry nodes (and pure opaque ones) whose outputs nobody uses; returns how many.

        Args:
            start: node ids that may have become dead (default: all); their
                producers are checked in turn.
        """
        removed = 0
        live_outputs = set(self.outputs)
        stack = list(self.nodes) if start is None else list(start)
        while stack:
            nid = stack.pop()
            node = self.nodes.get(nid)
            if node is None or node.op == INPUT or (node.op == OPAQUE and not getattr(node.payload, "pure", False)):
                continue
            if any(self.consumers.get((nid, j)) or (nid, j) in live_outputs for j in range(len(node.outs))):
                continue
            for pos, v in enumerate(node.inputs):
                self.consumers[v].discard((nid, pos))
                stack.append(v[0])
            if self._intern.get((node.op, node.inputs, node.attrs)) == nid:
                del self._intern[(node.op, node.inputs, node.attrs)]
            del self.nodes[nid]
            self._by_op = self._by_sig = None
            self._changes += 1
            removed += 1
        return removed

    def levels(self) -> dict:
        """Longest path from a graph input to each node (cached until the next change)."""
        if self._levels is None or self._levels[0] != self._changes:
            lv: dict = {}
            for nid in self.topo_order():
                lv[nid] = 1 + max((lv[d] for d in self.deps(nid)), default=-1)
            self._levels = (self._changes, lv)
        return self._levels[1]

    def depends_on(self, value, targets: set) -> bool:
        """Whether ``value`` is computed (transitively) from any node in ``targets``."""
        lv = self.levels()
        floor = min(lv[t] for t in targets)
        stack, seen = [value[0]], set()
        while stack:
            nid = stack.pop()
            if nid in targets:
                return True
            if nid in seen or lv[nid] <= floor:
                continue
            seen.add(nid)
            stack.extend(self.deps(nid))
        return False

    def const_nodes(self) -> set:
        """Registry nodes computed from constants only: folded at optimisation time."""
        const = set()
        for nid in self.topo_order():
            n = self.nodes[nid]
            if (n.op == INPUT and n.const) or (n.op not in (INPUT, OPAQUE) and n.inputs and (
                    get_op(n.op).type_only or all(v[0] in const for v in n.inputs))):
                const.add(nid)
        return const

    def structural_hash(self) -> int:
        memo: dict = {}
        for nid in self.topo_order():
            n = self.nodes[nid]
            if n.op == INPUT:
                memo[nid] = hash((INPUT, n.name))
            elif n.op == OPAQUE:
                memo[nid] = hash((OPAQUE, id(n.payload), tuple((memo[v[0]], v[1]) for v in n.inputs)))
            else:
                memo[nid] = hash((n.op, n.attrs, tuple((memo[v[0]], v[1]) for v in n.inputs)))
        return hash(tuple((memo[v[0]], v[1]) for v in self.outputs))


# -- patterns and matching ------------------------------------------------------------

@dataclass
class Pattern:
    """One direction of a rule: match ``lhs``, replace with ``rhs``."""

    rule_id: str
    lhs: Graph
    rhs: Graph
    order: list = field(default_factory=list)   # lhs node indices in matching order
    op_counts: tuple = ()   # ((op, how many lhs nodes), ...): a graph needs at least these
    anchor_sig: tuple = ()  # (op, producer op of each input or None): see MGraph.by_signature

    @staticmethod
    def of(rule, reverse: bool = False) -> "Pattern":
        lhs, rhs = (rule.dst, rule.src) if reverse else (rule.src, rule.dst)
        p = Pattern(rule.id + ("-" if reverse else "+"), lhs, rhs)
        counts: dict = {}
        for n in lhs.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        p.op_counts = tuple(sorted(counts.items()))
        p.order = _matching_order(lhs)
        if p.order:
            anchor = lhs.nodes[p.order[0]]
            prods = tuple(None if parse_ref(r)[1] is None else lhs.nodes[parse_ref(r)[0]].op
                          for r in anchor.inputs)
            p.anchor_sig = (anchor.op, prods)
        return p


def _matching_order(g: Graph) -> list:
    """Start at the producer of the first output, then always a node adjacent (by a
    tensor) to the ones already placed, so candidates come from the consumer index."""
    if not g.nodes:
        return []
    first = parse_ref(g.outputs[0])[0] if parse_ref(g.outputs[0])[1] is not None else 0
    order, placed = [first], {first}
    while len(order) < len(g.nodes):
        for k, n in enumerate(g.nodes):
            if k in placed:
                continue
            if _adjacent(g, k, placed):
                order.append(k)
                placed.add(k)
                break
        else:
            rest = [k for k in range(len(g.nodes)) if k not in placed]
            order.append(rest[0])
            placed.add(rest[0])
    return order


def _adjacent(g: Graph, k: int, placed: set) -> bool:
    node = g.nodes[k]
    mine = set(node.inputs) | {f"%{k}", *[f"%{k}.{j}" for j in range(len(node.outs))]}
    for p in placed:
        other = g.nodes[p]
        theirs = set(other.inputs) | {f"%{p}", *[f"%{p}.{j}" for j in range(len(other.outs))]}
        if mine & theirs:
            return True
    return False


@dataclass
class Match:
    pattern: Pattern
    nodes: dict      # lhs node index -> graph node id
    values: dict     # lhs ref -> graph value
    binding: dict    # symbol -> size
    batch: tuple     # leading batch axes of the matched inputs (informational)


def _bind_type(binding, pshape, value_shape):
    """Unify a symbolic pattern shape with a concrete one (extra leading axes allowed)."""
    extra = len(value_shape) - len(pshape)
    if extra < 0:
        return None
    solved = solve(list(zip(pshape, value_shape[extra:])), binding)
    if solved is None or solved[1]:
        return None
    return solved[0]


_PENDING = "__pending__"   # attribute sizes not solvable yet (b*h before b or h is known)


def _unify_attrs(pattrs, gattrs, binding):
    """Attributes equal, symbolic sizes (alone or in a shape tuple) unified with the graph's;
    a size that other parts of the match must fix first stays pending (None: no match)."""
    pairs = list(binding.pop(_PENDING, ()))
    for (pk, pv), (gk, gv) in zip(pattrs, gattrs):
        if pk != gk:
            return None
        if isinstance(pv, Dim):
            pairs.append((pv, gv))
        elif isinstance(pv, tuple) and any(isinstance(d, Dim) for d in pv):
            if not isinstance(gv, tuple) or len(gv) != len(pv):
                return None
            pairs.extend(zip(pv, gv))
        elif pv != gv:
            return None
    if not pairs:
        return binding
    solved = solve(pairs, binding)
    if solved is None:
        return None
    out, unsolved = solved
    if unsolved:
        out[_PENDING] = tuple((d, v) for d, v in pairs if any(f in unsolved for f in Dim.of(d).symbols))
    return out


def find_matches(mg: MGraph, pattern: Pattern, limit: int | None = None) -> list:
    """All matches of the pattern in the graph (deterministic order)."""
    lhs = pattern.lhs
    if not lhs.nodes:
        return []
    out = []
    first = pattern.order[0]
    for nid in mg.by_signature(pattern.anchor_sig):
        for m in _extend(mg, pattern, 0, {first: nid}, {}, {}):
            out.append(m)
            if limit and len(out) >= limit:
                return out
    return out


def _extend(mg, pattern, step, nodes, values, binding):
    lhs = pattern.lhs
    k = pattern.order[step]
    gid = nodes[k]
    pnode, gnode = lhs.nodes[k], mg.nodes[gid]
    if gnode.op != pnode.op or len(gnode.inputs) != len(pnode.inputs):
        return
    binding = dict(binding)
    values = dict(values)
    # outputs of this node
    for j in range(len(pnode.outs)):
        ref = f"%{k}.{j}" if len(pnode.outs) > 1 else f"%{k}"
        v = (gid, j)
        if values.get(ref, v) != v:
            return
        values[ref] = v
    # inputs
    for pref, gval in zip(pnode.inputs, gnode.inputs):
        key, out = parse_ref(pref)
        if values.get(pref, gval) != gval:
            return
        if out is None:  # a pattern input: bind its shape
            pin = next(i for i in lhs.inputs if i.name == key)
            shape, dtype = mg.type_of(gval)
            if not dtype.startswith(("float", "bfloat")):
                return  # rules are about real arithmetic: any float dtype, nothing else
            b = _bind_type(binding, pin.shape, shape)
            if b is None or (pin.guard and not mg.passes_guard(gval, pin.guard)):
                return
            binding = b
        elif key in nodes and nodes[key] != gval[0]:
            return
        values[pref] = gval
    # attributes (after the inputs, whose shapes bind the symbols a product such as b*h needs)
    binding = _unify_attrs(pnode.attrs, gnode.attrs, binding)
    if binding is None:
        return
    if step + 1 == len(pattern.order):
        if _PENDING not in binding and _closed(mg, pattern, nodes, values):
            yield Match(pattern, dict(nodes), values, binding, ())
        return
    nxt = pattern.order[step + 1]
    for cand in _candidates(mg, lhs, nxt, values, nodes):
        if cand in nodes.values():
            continue
        nodes[nxt] = cand
        yield from _extend(mg, pattern, step + 1, nodes, values, binding)
        del nodes[nxt]


def _candidates(mg, lhs, k, values, nodes) -> list:
    """Graph nodes that could be lhs node k, found through already-bound values."""
    pnode = lhs.nodes[k]
    found = set()
    for j in range(len(pnode.outs)):  # something already matched consumes this node
        ref = f"%{k}.{j}" if len(pnode.outs) > 1 else f"%{k}"
        if ref in values:
            found.add(values[ref][0])
    for pos, pref in enumerate(pnode.inputs):  # this node consumes a bound value
        if pref in values:
            found |= {nid for nid, p in mg.consumers.get(values[pref], ()) if p == pos}
    if not found:
        return mg.by_op(pnode.op)
    return sorted(n for n in found if mg.nodes[n].op == pnode.op)


def _closed(mg, pattern, nodes, values) -> bool:
    """Values produced inside the match and not rule outputs must not escape it."""
    lhs = pattern.lhs
    inside = set(nodes.values())
    outputs = {values[r] for r in lhs.outputs}
    for k, gid in nodes.items():
        for j in range(len(lhs.nodes[k].outs)):
            v = (gid, j)
            if v in outputs:
                continue
            if v in mg.outputs or any(c not in inside for c, _ in mg.consumers.get(v, ())):
                return False
    # a rule input bound to a value computed inside the match, or from it, would make
    # the rewritten graph cyclic
    for inp in lhs.inputs:
        v = values.get(inp.name)
        if v is not None and (v[0] in inside or mg.depends_on(v, inside)):
            return False
    return True


def replacement_plan(mg: MGraph, match: Match) -> list | None:
    """Type-check the rule's other side under the match's sizes, without building it.

    Returns:
        per replacement node ``(node, concrete attrs, out types)``, or None when a
        node does not type-check, an input is unbound, or a rule output would
        change type.
    """
    p = match.pattern
    types = {}
    for inp in p.rhs.inputs:
        if inp.name not in match.values:
            return None  # an input the matched side does not use: cannot bind it
        types[inp.name] = mg.type_of(match.values[inp.name])
    plan = []
    for idx, node in enumerate(p.rhs.nodes):
        opdef = get_op(node.op)
        ins = [types[r] for r in node.inputs]
        try:
            full = opdef.full_attrs(concrete_attrs(node.attrs, match.binding))
            outs = opdef.infer_checked([tuple(Dim.of(d) for d in s) for s, _ in ins], [dt for _, dt in ins], full)
        except GraphoptError:
            return None
        outs = tuple((tuple(plain(d) for d in s), dt) for s, dt in outs)
        plan.append((node, tuple(sorted(concrete_attrs(tuple(full.items()), None).items())), outs))
        for j, t in enumerate(outs):
            types[f"%{idx}.{j}" if len(outs) > 1 else f"%{idx}"] = t
    for lref, rref in zip(p.lhs.outputs, p.rhs.outputs):
        if mg.type_of(match.values[lref]) != types[rref]:
            return None
    return plan


def apply_match(mg: MGraph, match: Match, inplace: bool = False) -> MGraph | None:
    """A new graph with the match replaced by the rule's other side, or None if the
    replacement does not type-check (see :func:`replacement_plan`); ``inplace``
    changes ``mg`` itself."""
    p = match.pattern
    plan = replacement_plan(mg, match)
    if plan is None:
        return None
    new = mg if inplace else mg.copy()
    env = {inp.name: match.values[inp.name] for inp in p.rhs.inputs}
    matched = set(match.nodes.values())
    # the replacement runs no earlier than what it replaces had to (reads of a cache after a write)
    after = tuple(sorted({a for m in matched for a in mg.nodes[m].after} - matched))
    for idx, (node, attrs, outs) in enumerate(plan):
        mnode = MNode(node.op, tuple(env[r] for r in node.inputs), attrs, outs, after=after)
        nid = new.add_node(mnode, intern=not after)
        if nid in matched:  # it interned to a node being replaced (relu(X) -> relu(relu(X))): a fresh copy
            nid = new.add_node(mnode, intern=False)
        for j in range(len(outs)):
            env[f"%{idx}.{j}" if len(outs) > 1 else f"%{idx}"] = (nid, j)
    pairs = [(match.values[lref], env[rref]) for lref, rref in zip(p.lhs.outputs, p.rhs.outputs)]
    for old, repl in pairs:
        if old != repl:
            new.replace_uses(old, repl)
    created = {v[0] for k, v in env.items() if k.startswith("%")}
    new.remove_dead(set(match.nodes.values()) | {v[0] for v in env.values()})
    gone = {m for m in matched if m not in new.nodes}
    if gone and new._ordered:   # a write that had to wait for a replaced read waits for its replacement
        new.redirect_after(gone, created)
    return new


@dataclass
class FoldProgram:
    """How the folded constants of a graph are computed from its constant inputs, so they
    can be computed again from new values (a weight loaded from a checkpoint after the
    optimisation) without a new search, or with gradients (training through a merged
    projection).

    ``steps`` are ``(op, attrs, input keys, output keys)`` in order; a key is an input
    name or a ``(node id, output)`` pair; ``outputs`` maps each folded name to its key.
    """

    inputs: tuple = ()
    steps: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    def run(self, values: dict) -> dict:
        """The folded constants for these input values (name -> tensor); ``{name: tensor}``."""
        from .backends.fx import run_op
        env = dict(values)
        for op, attrs, ins, outs in self.steps:
            out = run_op(op, attrs, *[env[k] for k in ins])
            env.update(zip(outs, out if isinstance(out, tuple) else (out,)))
        return {name: env[key].contiguous() for name, key in self.outputs.items()}

    def sources(self, names) -> set:
        """The inputs that the given folded constants are computed from."""
        need = {self.outputs[n] for n in names if n in self.outputs}
        for _, _, ins, outs in reversed(self.steps):
            if need & set(outs):
                need |= set(ins)
        return {k for k in need if isinstance(k, str) and k in self.inputs}


def fold_constants(mg: MGraph, constants: dict) -> tuple:
    """Compute every registry node whose inputs are all constants once, now.

    Args:
        mg: the graph (not modified).
        constants: value of each constant input, by name (torch tensors).
    Returns:
        (new graph, {name: tensor} of the folded values it reads as constant inputs,
        the :class:`FoldProgram` that computes them).
    """
    import torch
    from .backends.fx import run_op
    const = mg.const_nodes()
    # a view of constants (the transpose of a weight) that the rest of the graph reads stays
    # a view: materialising it would copy the weight and change the layout BLAS sees
    order = mg.topo_order()
    views: set = set()
    for nid in reversed(order):
        n = mg.nodes[nid]
        if nid in const and n.op != INPUT and get_op(n.op).view and any(
                c not in const or c in views for v in _outs(nid, n) for c, _ in mg.consumers.get(v, ())):
            views.add(nid)
    values: dict = {}
    folded: dict = {}
    steps, key, outputs = [], {}, {}
    new = mg.copy()
    for nid in order:
        n = mg.nodes[nid]
        if nid not in const:
            continue
        if n.op == INPUT:
            values[(nid, 0)] = constants[n.name]
            key[(nid, 0)] = n.name
            continue
        if get_op(n.op).type_only:   # a constant of the input's dtype: never computed again
            stand_ins = [torch.empty((), dtype=getattr(torch, mg.nodes[v[0]].outs[v[1]][1])) for v in n.inputs]
            out = run_op(n.op, n.attrs, *stand_ins)
        else:
            out = run_op(n.op, n.attrs, *[values[v] for v in n.inputs])
            steps.append((n.op, n.attrs, tuple(key[v] for v in n.inputs), tuple(_outs(nid, n))))
        outs = out if isinstance(out, tuple) else (out,)
        for j, t in enumerate(outs):
            values[(nid, j)] = t
            v = (nid, j)
            key[v] = v
            used_outside = nid not in views and (
                any(c not in const or c in views for c, _ in mg.consumers.get(v, ())) or v in mg.outputs)
            if used_outside:
                name = f"_folded_{nid}_{j}"
                folded[name] = t.detach().contiguous()
                if not get_op(n.op).type_only:
                    outputs[name] = v
                fid = new.add_node(MNode(INPUT, (), (), (n.outs[j],), name=name, const=True), intern=False)
                new.replace_uses(v, (fid, 0))
    new.remove_dead()
    program = FoldProgram(outputs=outputs)
    needed = set(program.outputs.values())
    for step in reversed(steps):     # only the steps the folded values need
        if needed & set(step[3]):
            program.steps.insert(0, step)
            needed |= set(step[2])
    program.inputs = tuple(sorted(k for k in needed if isinstance(k, str)))
    return new, folded, program


def _outs(nid, node) -> list:
    return [(nid, j) for j in range(len(node.outs))]


def to_graph(mg: MGraph, template: Graph, extra_constants: dict | None = None) -> Graph:
    """Write an MGraph back as an IR Graph (inputs, constants and payloads from the template;
    constant inputs the search added, e.g. folded weights, from ``extra_constants``)."""
    g = Graph(constants=dict(template.constants), hints=dict(template.hints))
    ref = {}
    for inp in template.inputs:
        g.inputs.append(inp)
    known = {i.name for i in template.inputs}
    for nid in mg.topo_order():
        n = mg.nodes[nid]
        if n.op == INPUT:
            if n.name not in known:
                shape, dtype = n.outs[0]
                g.add_external(n.name, shape, dtype, value=(extra_constants or {})[n.name])
            ref[(nid, 0)] = n.name
            continue
        ins = [ref[v] for v in n.inputs]
        if n.op == OPAQUE:
            out = g.add_opaque(n.payload, ins, n.outs)
        else:
            out = g.add(n.op, *ins, **dict(n.attrs))
        for j, r in enumerate(out if isinstance(out, tuple) else (out,)):
            ref[(nid, j)] = r
    g.outputs = [ref[v] for v in mg.outputs]
    return g


__all__ = ["MGraph", "MNode", "Pattern", "Match", "FoldProgram", "find_matches", "apply_match", "fold_constants",
           "to_graph"]
