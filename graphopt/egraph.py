"""Equality saturation: the ``egraph`` search engine (Tensat's approach, on egglog).

TASO's backtracking search keeps only graphs within ``alpha`` of the best cost, so a
rewrite whose first step is expensive (``(x@A)@B -> x@(A@B)`` before the distributivity
that folds ``A@B`` into a weight) is never found.  This engine keeps every rewrite in an
e-graph (the `egglog <https://github.com/egraphs-good/egglog-python>`_ library: hash-consing,
union-find, congruence closure and the matching of rule patterns as database queries),
then extracts the cheapest graph at the end.

* **Terms.** A value is ``Term.nK(op, info, *args)`` with ``info = (attrs, outs)``, the node's
  concrete attributes and output types; a multi-output node's values are ``Term.out(node, j)``;
  graph inputs, opaque calls and nodes with side effects are ``Term.leaf(i)``, never rewritten.
  ``Term.ref(k)`` names an e-class, so that the e-graph can be read back without printing
  nested terms.
* **Rules.** Every pattern of the phase (both directions of every rule) is one egglog rule:
  its left side is the query (a multi-output rule such as the projection merge is a
  multi-pattern: one query with several roots), its right side the action.  The query
  calls back into Python with the matched input types and attributes; the callback unifies
  the rule's size symbols and type-checks the right side exactly as the backtracking
  matcher does (:func:`graphopt.rewrite.replacement_plan`), so a rule applies only where its
  types and guards hold.  A rule is added once every op of its left side occurs in the
  e-graph.
* **Which rules.** Those with at most :attr:`Limits.rule_ops` ops whose ops the block has,
  and that do not grow the op count (their reverses are the same rule read the other way);
  merges (the projection merge) in a second stage on the extracted graph, over constants.
* **Blocks.** LLM graphs repeat one block per layer.  The graph is cut at the values where
  the fewest tensors computed per call cross (the residual stream); an opaque call inside
  is a wall, not a cut (:func:`cut_blocks`).  Each block is saturated alone, and blocks
  that are the same up to their inputs (same ops, attributes and types) share one
  saturation and extraction: a 12-layer GPT-2 saturates a block or two, not twelve.
* **Extraction** knows the graph is a DAG: a shared value is paid for once, a value computed
  from constants only is free (it is folded), and the result has no cycle.  A greedy DAG
  extractor first, then an exact one (an integer program solved by HiGHS, as Tensat's ILP)
  when the e-graph is small enough, within a time limit, the greedy answer kept otherwise.

The result goes through the same type checks and safety net as every other engine's.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from egglog import (EGraph, Expr, PyObject, String, StringLike, eq, function, i64, i64Like, ne, relation, rule, ruleset,
                    set_, union, var)
from egglog import back_off, run as egg_run

from .dims import Dim, plain
from .errors import GraphoptError
from .ir import OPAQUE, concrete_attrs, parse_ref
from .ops import get_op
from .rewrite import INPUT, MGraph, MNode, Pattern, _PENDING, _bind_type, _unify_attrs
from .search import GraphCost, SearchResult

MAX_ARITY = 6


class Term(Expr):
    """A tensor value (or a multi-output node) of the graph being saturated."""

    @classmethod
    def ref(cls, k: i64Like) -> Term: ...

    @classmethod
    def leaf(cls, k: i64Like) -> Term: ...

    @classmethod
    def n0(cls, op: StringLike, info: PyObject) -> Term: ...

    @classmethod
    def n1(cls, op: StringLike, info: PyObject, a: Term) -> Term: ...

    @classmethod
    def n2(cls, op: StringLike, info: PyObject, a: Term, b: Term) -> Term: ...

    @classmethod
    def n3(cls, op: StringLike, info: PyObject, a: Term, b: Term, c: Term) -> Term: ...

    @classmethod
    def n4(cls, op: StringLike, info: PyObject, a: Term, b: Term, c: Term, d: Term) -> Term: ...

    @classmethod
    def n5(cls, op: StringLike, info: PyObject, a: Term, b: Term, c: Term, d: Term, e: Term) -> Term: ...

    @classmethod
    def n6(cls, op: StringLike, info: PyObject, a: Term, b: Term, c: Term, d: Term, e: Term, f: Term) -> Term: ...

    @classmethod
    def out(cls, node: Term, j: i64Like) -> Term: ...


@function(merge=lambda old, new: old)
def ty(t: Term) -> PyObject:
    """The (shape, dtype) of a value."""


passes = relation("passes", Term, PyObject)   # a constant input that passes a guard
fired = relation("fired", Term, PyObject)     # a rule (its id) rewrote this value
folded = relation("folded", Term)             # computed from constants only (folded when optimised)

CTORS = (Term.n0, Term.n1, Term.n2, Term.n3, Term.n4, Term.n5, Term.n6)
FOLDED = 1e-6   # a folded e-node's cost, relative to computing it per call
# the infos the rules' callbacks made, by repr, to read them back from the serialised e-graph;
# kept for the process (egglog may answer a call it has seen before without calling again)
_INFOS: dict = {}
_FAIL = None   # what a rule's check returns when its types or guards do not hold


@dataclass
class Limits:
    """When saturation stops: iterations, e-nodes, seconds (per block)."""

    iterations: int = 6
    # rules with at most this many ops on both sides together: the library's small identities
    # (associativity, distributivity, moving a scale); saturation chains them into the larger
    # ones, which only make the e-graph grow faster
    rule_ops: int = 5
    # A rule may only bring ops into a block that the block already has, and these: the
    # generated library has thousands of identities through neg, exp, concat, split, ...; as
    # rules in an e-graph they make it grow by orders of magnitude per iteration (measured: a
    # 6-op LoRA block reached 52,622 e-nodes in four iterations with concat and split allowed,
    # 23 without).
    bring_ops: frozenset = frozenset()
    # Merges are the exception: a multi-output rule whose right side computes its left side's
    # ops with fewer of them (the projection merge x@W1, x@W2 -> split(x @ concat(W1, W2))).
    # They run as a second stage, on the graph extracted from the first, may bring the ops
    # they need, and only combine two different values whose combined operands are constants
    # (the concat is folded; two activations are never copied into one).
    merges: bool = True
    # Rules whose right side has more ops than their left (x -> -(-x)^T^T, the reverse of a
    # simplification) are what makes an e-graph grow without end; by default only rules that
    # keep or lower the op count run (associativity, distributivity, moving a scale), and the
    # merges.  Measured on a 33-op Llama attention block: 3,841 e-nodes and 17 s in six
    # iterations with them; 747 e-nodes and 0.9 s without, and the same extracted cost.
    growing: bool = False
    match_limit: int = 200     # egg's back-off scheduler: a rule matching more often sits out
    enodes: int = 5000
    seconds: float = 10.0
    ilp_enodes: int = 3000     # solve the exact extraction when the e-graph has at most this many e-nodes
    ilp_seconds: float = 2.0


@dataclass
class EGraphStats:
    blocks: int = 0
    distinct_blocks: int = 0
    enodes: int = 0            # largest e-graph (e-nodes)
    eclasses: int = 0
    iterations: int = 0
    rules: int = 0             # egglog rules added (patterns whose ops occurred)
    stopped: Counter = field(default_factory=Counter)   # why each distinct block's saturation stopped
    extraction: Counter = field(default_factory=Counter)  # "ilp (optimal)", "greedy", ...
    improved_blocks: int = 0
    seconds: Counter = field(default_factory=Counter)   # saturate / read / extract

    def absorb(self, other: "EGraphStats") -> None:
        """Add a stage's figures (block counts of the first stage; maxima; sums)."""
        self.blocks = self.blocks or other.blocks
        self.distinct_blocks = self.distinct_blocks or other.distinct_blocks
        self.enodes, self.eclasses = max(self.enodes, other.enodes), max(self.eclasses, other.eclasses)
        self.iterations = max(self.iterations, other.iterations)
        self.rules = max(self.rules, other.rules)
        self.improved_blocks += other.improved_blocks
        for mine, theirs in ((self.stopped, other.stopped), (self.extraction, other.extraction),
                             (self.seconds, other.seconds)):
            mine.update(theirs)

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "distinct_blocks": self.distinct_blocks, "max_enodes": self.enodes,
                "max_eclasses": self.eclasses, "iterations": self.iterations, "rules": self.rules,
                "stopped": dict(self.stopped), "extraction": dict(self.extraction),
                "improved_blocks": self.improved_blocks,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


# -- blocks -------------------------------------------------------------------------------------

def _barrier(mg: MGraph, nid: int, ordered: set) -> bool:
    """Nodes the e-graph never rewrites: inputs, opaque calls, side effects, wide ops."""
    n = mg.nodes[nid]
    return n.op in (INPUT, OPAQUE) or bool(n.after) or nid in ordered or len(n.inputs) > MAX_ARITY


@dataclass
class Block:
    nodes: list                 # node ids, topological order
    leaves: list = field(default_factory=list)   # values read from outside, in order of first use
    outs: list = field(default_factory=list)     # values used outside (later nodes, graph outputs)
    # (out index, leaf index): that out must not be computed from that leaf, which an opaque
    # node inside the block's span computes from it (a wall: silu between gate and down)
    forbid: list = field(default_factory=list)
    # the block's nodes and leaf producers computed from constants only (folded, free)
    folded: frozenset = frozenset()


def cut_blocks(mg: MGraph, min_nodes: int = 6) -> list:
    """Split the rewritable nodes into blocks at the values where the fewest tensors cross.

    Walks the topological order of the nodes computed per call (not those computed from
    constants only, which are folded) and counts, after each node, the values computed so far
    that later nodes or the graph's outputs still read.  Where that count is as small as
    anywhere in the middle half of the graph (the residual stream of a transformer), a block
    may end.  Blocks shorter than ``min_nodes`` run on into the next one.  A node computed
    from constants only (a weight's transpose) goes into the block that reads it, when one
    block does; otherwise blocks read it as a leaf.

    A node the e-graph cannot rewrite (an opaque call such as silu, a node other nodes are
    ordered after) does not end a block: it is a wall inside it, kept as it is; its inputs are
    outputs of the block and its outputs are leaves, and :attr:`Block.forbid` keeps the
    extraction from computing the first from the second.  So the gate and up projections on
    either side of a silu are in one block, and can be merged.
    """
    full = mg.topo_order()
    const = mg.const_nodes()
    ordered = {a for nid in mg._ordered if nid in mg.nodes for a in mg.nodes[nid].after}
    order = [nid for nid in full if nid not in const]
    pos = {nid: i for i, nid in enumerate(order)}
    end = len(order)
    last_use: dict = {}
    for nid in order:
        for v in mg.nodes[nid].inputs:
            if v[0] in pos:
                last_use[v] = max(last_use.get(v, -1), pos[nid])
    for v in mg.outputs:
        if v[0] in pos:
            last_use[v] = end
    # crossing[i]: live values computed per call after position i
    starts, ends = [0] * (end + 1), [0] * (end + 1)
    for v, last in last_use.items():
        if mg.nodes[v[0]].op == INPUT:
            continue
        p = pos[v[0]]
        if last > p:
            starts[p] += 1
            ends[last] += 1
    crossing, live = [], 0
    for i in range(end):
        live += starts[i] - ends[i]
        crossing.append(live)
    inner = [crossing[i] for i, nid in enumerate(order) if not _barrier(mg, nid, ordered)]
    n = len(inner)
    middle = inner[n // 4: max(n // 4 + 1, 3 * n // 4)] or [0]
    floor = min(middle)
    blocks, cur = [], []
    for i, nid in enumerate(order):
        if _barrier(mg, nid, ordered):
            continue
        cur.append(nid)
        if crossing[i] <= floor and len(cur) >= min_nodes:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    block_of = {nid: k for k, nodes in enumerate(blocks) for nid in nodes}
    # constant-only nodes: the blocks that read them, directly or through other such nodes
    readers: dict = {}
    for nid in reversed(full):
        if nid not in const or mg.nodes[nid].op == INPUT or _barrier(mg, nid, ordered):
            continue
        ks = set()
        for j in range(len(mg.nodes[nid].outs)):
            for c, _ in mg.consumers.get((nid, j), ()):
                ks |= readers.get(c, set()) if c in const else ({block_of[c]} if c in block_of else {None})
        if (nid, 0) in mg.outputs:
            ks.add(None)
        readers[nid] = ks
        if len(ks) == 1 and None not in ks:
            blocks[next(iter(ks))].append(nid)
    full_pos = {nid: i for i, nid in enumerate(full)}
    out = []
    for nodes in blocks:
        nodes = sorted(nodes, key=full_pos.__getitem__)
        inside = set(nodes)
        b = Block(nodes)
        seen = set()
        for nid in nodes:
            for v in mg.nodes[nid].inputs:
                if v[0] not in inside and v not in seen:
                    seen.add(v)
                    b.leaves.append(v)
        graph_outs = set(mg.outputs)
        for nid in nodes:
            for j in range(len(mg.nodes[nid].outs)):
                v = (nid, j)
                if v in graph_outs or any(c not in inside for c, _ in mg.consumers.get(v, ())):
                    b.outs.append(v)
        b.forbid = _walls(mg, b, full, full_pos)
        b.folded = frozenset(nid for nid in (*nodes, *(v[0] for v in b.leaves)) if nid in const)
        out.append(b)
    return out


def _walls(mg: MGraph, b: Block, full: list, full_pos: dict) -> list:
    """(out index, leaf index) where the leaf is computed, outside the block, from the out."""
    first = min(full_pos[nid] for nid in b.nodes)
    last = max(full_pos[nid] for nid in b.nodes)
    leaf_idx = {v: i for i, v in enumerate(b.leaves)}
    inner = {v[0] for v in b.leaves if first < full_pos[v[0]] < last}
    pairs = set()
    if not inner:
        return []
    users: dict = {}         # data and ordering edges within the block's span
    for nid in full[first + 1:last]:
        for d in mg.deps(nid):
            users.setdefault(d, set()).add(nid)
    for i, o in enumerate(b.outs):
        seen, stack = set(), [o[0]]
        while stack:
            for c in users.get(stack.pop(), ()):
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        for nid in seen & inner:
            pairs.update((i, leaf_idx[(nid, j)]) for j in range(len(mg.nodes[nid].outs)) if (nid, j) in leaf_idx)
    return sorted(pairs)




def block_signature(mg: MGraph, b: Block) -> tuple:
    """Equal for blocks that are the same up to which values they read (ops, attributes,
    types, wiring, which leaves are constants)."""
    leaf_idx = {v: i for i, v in enumerate(b.leaves)}
    node_idx = {nid: i for i, nid in enumerate(b.nodes)}
    parts = [tuple((mg.type_of(v), v[0] in b.folded) for v in b.leaves)]
    for nid in b.nodes:
        n = mg.nodes[nid]
        ins = tuple(("l", leaf_idx[v]) if v in leaf_idx else ("n", node_idx[v[0]], v[1]) for v in n.inputs)
        parts.append((n.op, n.attrs, n.outs, ins))
    parts.append(tuple((node_idx[v[0]], v[1]) for v in b.outs))
    parts.append(tuple(b.forbid))
    return tuple(parts)


# -- rules ---------------------------------------------------------------------------------------

def _float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


_PATTERNS: dict = {}   # rule id -> Pattern, for the callbacks (egglog pickles what it calls:
                       # a module-level function travels by name, a closure with its pattern)


def _nth(plan, i):
    return plan[i]


def _value_type(info, j):
    return info[1][j]


def _check(rule_id, *args):
    """The Python side of a rule's query: unify sizes, check dtypes, type the right side.

    Called with the rule's id, the matched input types (in ``lhs.inputs`` order) and each
    left node's info; returns the right side's node infos, or ``_FAIL``.  The answer depends
    on these arguments only: a match of the same rule on the same types is answered once."""
    key = (rule_id, args)
    hit = _CHECKED.get(key, _MISS)
    if hit is _MISS:
        if len(_CHECKED) > 200_000:     # a long-lived process optimising many graphs
            _CHECKED.clear()
        hit = _CHECKED[key] = _check_types(rule_id, *args)
    return hit


_CHECKED: dict = {}
_MISS = object()


def _check_types(rule_id, *args):
    p = _PATTERNS[rule_id]
    lhs, rhs = p.lhs, p.rhs
    in_pos = {i.name: k for k, i in enumerate(lhs.inputs)}
    n_in = len(lhs.inputs)
    types, infos = args[:n_in], args[n_in:]
    binding: dict = {}
    for k in p.order:
        pnode = lhs.nodes[k]
        for pref in pnode.inputs:
            key, out = parse_ref(pref)
            if out is None:
                shape, dtype = types[in_pos[key]]
                if not _float(dtype):
                    return _FAIL
                pin = lhs.inputs[in_pos[key]]
                b = _bind_type(binding, pin.shape, shape)
                if b is None:
                    return _FAIL
                binding = b
        attrs, _ = infos[k]
        binding = _unify_attrs(pnode.attrs, attrs, binding)
        if binding is None:
            return _FAIL
    if _PENDING in binding:
        return _FAIL
    env = {i.name: types[in_pos[i.name]] for i in rhs.inputs}
    plan = []
    for idx, node in enumerate(rhs.nodes):
        opdef = get_op(node.op)
        ins = [env[r] for r in node.inputs]
        try:
            full = opdef.full_attrs(concrete_attrs(node.attrs, binding))
            outs = opdef.infer_checked([tuple(Dim.of(d) for d in s) for s, _ in ins], [dt for _, dt in ins], full)
        except GraphoptError:
            return _FAIL
        outs = tuple((tuple(plain(d) for d in s), dt) for s, dt in outs)
        plan.append((tuple(sorted(concrete_attrs(tuple(full.items()), None).items())), outs))
        for j, t in enumerate(outs):
            env[f"%{idx}.{j}" if len(outs) > 1 else f"%{idx}"] = t
    for lref, rref in zip(lhs.outputs, rhs.outputs):
        k, j = parse_ref(lref)
        if j is None:
            want = types[in_pos[k]]
        else:
            want = infos[k][1][j]
        if env[rref] != want:
            return _FAIL
    for node, info in zip(rhs.nodes, plan):
        _INFOS.setdefault(repr(info), info)
    return tuple(plan)


def _connected(g) -> bool:
    """Whether a rule side's nodes are one piece (two disjoint pieces match every pair of sites)."""
    parent = list(range(len(g.nodes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_input: dict = {}
    for k, n in enumerate(g.nodes):
        for r in n.inputs:
            key, j = parse_ref(r)
            other = by_input.setdefault(r, k) if j is None else key
            parent[find(k)] = find(other)
    return len({find(k) for k in range(len(g.nodes))}) <= 1


def _is_merge(p: Pattern) -> bool:
    """A multi-output rule whose right side computes the left side's ops with fewer of them,
    with ops the left side does not have to combine and part the operands: it merges two
    computations into one (x@W1, x@W2 -> split(x @ concat(W1, W2)); not its reverse)."""
    if len(p.lhs.outputs) < 2:
        return False
    lhs = Counter(n.op for n in p.lhs.nodes)
    return (sum(1 for n in p.rhs.nodes if n.op in lhs) < sum(lhs.values())
            and any(n.op not in lhs for n in p.rhs.nodes))


def _merges(p: Pattern, present: set) -> bool:
    """A merge whose left side only has ops in ``present`` (see :attr:`Limits.bring_ops`)."""
    return _is_merge(p) and {n.op for n in p.lhs.nodes} <= present


def _folded_inputs(p: Pattern) -> set:
    """The left-side inputs a merge may only combine when they are constants: those read by a
    right-side node of an op the left side does not have (the concat of W1 and W2), so that
    what a merge brings in is folded, and two activations are never copied into one."""
    if not _is_merge(p):
        return set()
    ops = {n.op for n in p.lhs.nodes}
    names = {i.name for i in p.lhs.inputs}
    return {r for n in p.rhs.nodes if n.op not in ops and all(r in names for r in n.inputs) for r in n.inputs}


def compile_rule(p: Pattern):
    """One egglog rule for one direction of a rule, or None when it cannot be one (an
    output that is a bare input, an op wider than the terms allow)."""
    lhs, rhs = p.lhs, p.rhs
    if not lhs.nodes or any(len(n.inputs) > MAX_ARITY for n in (*lhs.nodes, *rhs.nodes)):
        return None
    if any(i.name not in {j.name for j in lhs.inputs} for i in rhs.inputs):
        return None
    if any(parse_ref(r)[1] is None for r in lhs.outputs) or not _connected(lhs):
        return None
    ins = {i.name: var(f"x{k}", Term) for k, i in enumerate(lhs.inputs)}
    tys = [var(f"t{k}", PyObject) for k in range(len(lhs.inputs))]
    nodes = [var(f"n{k}", Term) for k in range(len(lhs.nodes))]
    infos = [var(f"a{k}", PyObject) for k in range(len(lhs.nodes))]

    def lterm(ref):
        key, j = parse_ref(ref)
        if j is None:
            return ins[key]
        return nodes[key] if len(lhs.nodes[key].outs) == 1 else Term.out(nodes[key], j)

    facts = []
    for k, n in enumerate(lhs.nodes):
        facts.append(eq(nodes[k]).to(CTORS[len(n.inputs)](n.op, infos[k], *[lterm(r) for r in n.inputs])))
    for k, i in enumerate(lhs.inputs):
        facts.append(eq(tys[k]).to(ty(ins[i.name])))
        if i.guard:
            facts.append(passes(ins[i.name], PyObject(i.guard)))
    for name in sorted(_folded_inputs(p)):
        facts.append(folded(ins[name]))
    if _is_merge(p):     # two different values: x@W merged with itself only grows the e-graph
        outs = [lterm(r) for r in lhs.outputs]
        facts.extend(ne(a).to(b) for i, a in enumerate(outs) for b in outs[i + 1:])
    plan = var("plan", PyObject)
    _PATTERNS[p.rule_id] = p
    facts.append(eq(plan).to(PyObject(_check)(PyObject(p.rule_id), *tys, *infos)))
    facts.append(ne(plan).to(PyObject(_FAIL)))
    actions, env = [], dict(ins)
    for idx, node in enumerate(rhs.nodes):
        info = PyObject(_nth)(plan, PyObject(idx))
        term = CTORS[len(node.inputs)](node.op, info, *[env[r] for r in node.inputs])
        n_out = len(node.outs)
        for j in range(n_out):
            v = term if n_out == 1 else Term.out(term, j)
            env[f"%{idx}.{j}" if n_out > 1 else f"%{idx}"] = v
            actions.append(set_(ty(v)).to(PyObject(_value_type)(info, PyObject(j))))
    for lref, rref in zip(lhs.outputs, rhs.outputs):
        actions.append(union(lterm(lref)).with_(env[rref]))
        actions.append(fired(lterm(lref), PyObject(p.rule_id)))
    return rule(*facts, name=p.rule_id).then(*actions)


_RULES: dict = {}   # rule id -> compiled egglog rule (None: not expressible)


def _folding_rules() -> list:
    """A value is folded when every input of its e-node is (an e-node without inputs is)."""
    out = []
    for arity, ctor in enumerate(CTORS):
        kids = [var(f"k{i}", Term) for i in range(arity)]
        t = ctor(var("op", String), var("info", PyObject), *kids)
        out.append(rule(eq(var("t", Term)).to(t), *[folded(k) for k in kids], name=f"folded{arity}")
                   .then(folded(var("t", Term))))
    node = var("node", Term)
    out.append(rule(eq(var("t", Term)).to(Term.out(node, var("j", i64))), folded(node), name="folded-out")
               .then(folded(var("t", Term))))
    return out


def _egg_rule(p: Pattern):
    if p.rule_id not in _RULES:
        _RULES[p.rule_id] = compile_rule(p)
    return _RULES[p.rule_id]


_FOLDING = _folding_rules()


# -- saturating one block ---------------------------------------------------------------------

@dataclass
class ENode:
    op: str                 # registry op, "leaf" or "out"
    info: object            # (attrs, outs); leaf: its index; out: the output index
    kids: tuple             # e-class keys


class Saturation:
    """One block's e-graph: build, saturate, read back."""

    def __init__(self, mg: MGraph, block: Block, patterns, limits: Limits):
        self.mg, self.block, self.limits = mg, block, limits
        self.eg = EGraph()
        self.next_ref = 0
        self.value_ref: dict = {}    # block value -> ref number
        present = {mg.nodes[nid].op for nid in block.nodes}
        allowed = present | set(limits.bring_ops)
        self.patterns = [p for p in patterns if len(p.lhs.nodes) + len(p.rhs.nodes) <= limits.rule_ops
                         and (all(n.op in allowed for n in (*p.lhs.nodes, *p.rhs.nodes))
                              and (limits.growing or len(p.rhs.nodes) <= len(p.lhs.nodes))
                              or limits.merges and _merges(p, present))]
        self.added: set = set()        # rule ids of the patterns given to egglog
        self.skipped: set = set()      # patterns that cannot be egglog rules
        self.stopped = "saturated"
        self.iterations = 0
        self.infos: dict = {}

    def _ref(self):
        self.next_ref += 1
        return self.next_ref - 1

    def build(self) -> None:
        mg, b = self.mg, self.block
        cmds = []
        term_of = {}
        guards = {i.guard for p in self.patterns for i in p.lhs.inputs if i.guard}
        for i, v in enumerate(b.leaves):
            t = Term.leaf(i)
            term_of[v] = t
            cmds.append(set_(ty(t)).to(PyObject(mg.type_of(v))))
            if v[0] in b.folded:
                cmds.append(folded(t))
            for g in sorted(guards):
                if mg.passes_guard(v, g):
                    cmds.append(passes(t, PyObject(g)))
        for nid in b.nodes:
            n = mg.nodes[nid]
            self.infos[repr((n.attrs, n.outs))] = (n.attrs, n.outs)
            node = CTORS[len(n.inputs)](n.op, PyObject((n.attrs, n.outs)), *[term_of[v] for v in n.inputs])
            if len(n.outs) > 1:
                k = self._ref()
                cmds.append(union(Term.ref(k)).with_(node))
                node = Term.ref(k)
            for j in range(len(n.outs)):
                v = (nid, j)
                t = node if len(n.outs) == 1 else Term.out(node, j)
                k = self._ref()
                self.value_ref[v] = k
                cmds.append(union(Term.ref(k)).with_(t))
                cmds.append(set_(ty(t)).to(PyObject(n.outs[j])))
                term_of[v] = Term.ref(k)
        self.eg.register(*cmds)
        self.ops = {mg.nodes[nid].op for nid in b.nodes}

    def _enodes(self) -> int:
        return sum(self.eg.function_size(c) for c in (*CTORS, Term.out))

    def saturate(self, deadline: float) -> None:
        lim = self.limits
        rs = None
        for it in range(lim.iterations):
            new = [p for p in self.patterns if p.rule_id not in self.added and p.rule_id not in self.skipped
                   and all(op in self.ops for op, _ in p.op_counts)]
            for p in new:
                if _egg_rule(p) is None:
                    self.skipped.add(p.rule_id)
            new = [p for p in new if p.rule_id not in self.skipped]
            if new:
                self.added.update(p.rule_id for p in new)
                rs = ruleset(*_FOLDING, *[_egg_rule(p) for p in self.patterns if p.rule_id in self.added])
            if rs is None:
                self.stopped = "no rule applies"
                return
            report = self.eg.run(egg_run(rs, scheduler=back_off(match_limit=lim.match_limit, ban_length=2)))
            self.iterations = it + 1
            grew = report.updated
            if grew:
                self.ops |= self._new_ops()
            if not grew and not new:
                self.stopped = "saturated"
                return
            if self._enodes() > lim.enodes:
                self.stopped = "e-node limit"
                return
            if time.monotonic() > deadline:
                self.stopped = "time limit"
                return
        else:
            self.stopped = "iteration limit"

    def _new_ops(self) -> set:
        """Ops that rules' right sides may have brought into the e-graph, and that did."""
        cands = {(n.op, len(n.inputs)) for p in self.patterns if p.rule_id in self.added for n in p.rhs.nodes
                 if n.op not in self.ops}
        found = set()
        for op, arity in sorted(cands):
            if op in found:
                continue
            args = [var(f"q{i}", Term) for i in range(arity)]
            if self.eg.check_bool(CTORS[arity](op, var("qi", PyObject), *args)):
                found.add(op)
        return found

    # -- reading the e-graph back ------------------------------------------------------------
    def read(self) -> dict:
        """e-class key -> [ENode], from egglog's serialised e-graph (every e-node with its
        e-class and its children's e-nodes); an ``info`` is looked up by its repr among those
        this saturation made, never evaluated."""
        import json
        ser = self.eg._serialize(split_primitive_outputs=False)
        nodes = json.loads(ser.to_json())["nodes"]
        classes: dict = {}
        self.canon = {}
        self.fired: dict = {}    # e-class -> rule ids that rewrote it

        def lit(nid):
            return nodes[nid]["op"]

        for n in nodes.values():
            op, kids = n["op"], n["children"]
            if op == "fired":
                import ast
                self.fired.setdefault(nodes[kids[0]]["eclass"], []).append(ast.literal_eval(lit(kids[1])))
                continue
            if not op.startswith("Term."):
                continue
            kind = op[5:]
            if kind == "ref":
                self.canon[int(lit(kids[0]))] = n["eclass"]
                continue
            if kind == "leaf":
                en = ENode("leaf", int(lit(kids[0])), ())
            elif kind == "out":
                en = ENode("out", int(lit(kids[1])), (nodes[kids[0]]["eclass"],))
            else:
                name = json.loads(lit(kids[0]))
                info = self.infos.get(lit(kids[1])) or _INFOS.get(lit(kids[1]))
                if info is None:
                    raise GraphoptError(f"internal error: e-node info {lit(kids[1])[:80]} not made here")
                en = ENode(name, info, tuple(nodes[c]["eclass"] for c in kids[2:]))
            classes.setdefault(n["eclass"], []).append(en)
        return classes

    def root(self, v):
        return self.canon[self.value_ref[v]]


# -- extraction ----------------------------------------------------------------------------------

class Extraction:
    """Choose one e-node per needed e-class: cheapest DAG, constants free, no cycle."""

    def __init__(self, classes: dict, leaves: list, mg: MGraph, cost: GraphCost):
        self.classes, self.mg, self.cost = classes, mg, cost
        self.leaves = leaves
        self.type: dict = {}
        for key, nodes in classes.items():
            for en in nodes:
                t = self._enode_type(en, classes)
                if t is not None:
                    self.type[key] = t
                    break
        self.const = self._constants()

    def _enode_type(self, en, classes):
        if en.op == "leaf":
            return self.mg.type_of(self.leaves[en.info])
        if en.op == "out":
            for parent in classes.get(en.kids[0], ()):
                if parent.op not in ("leaf", "out"):
                    return parent.info[1][en.info]
            return None
        outs = en.info[1]
        return outs[0] if len(outs) == 1 else outs

    def _constants(self) -> set:
        const = set()
        for key, nodes in self.classes.items():
            for en in nodes:
                if en.op == "leaf":
                    node = self.mg.nodes[self.leaves[en.info][0]]
                    if node.op == INPUT and node.const:
                        const.add(key)
        changed = True
        while changed:
            changed = False
            for key, nodes in self.classes.items():
                if key not in const and any(self.is_const_node(en, const) for en in nodes):
                    const.add(key)
                    changed = True
        return const

    def is_const_node(self, en, const=None) -> bool:
        const = self.const if const is None else const
        if en.op == "leaf":
            node = self.mg.nodes[self.leaves[en.info][0]]
            return node.op == INPUT and node.const
        if en.op == "out":
            return en.kids[0] in const
        return bool(en.kids) and (get_op(en.op).type_only or all(k in const for k in en.kids))

    def allowed(self, key) -> list:
        """The e-nodes a class may be extracted as: a leaf if it has one (never re-derived);
        in a constant class only constant-computable e-nodes (so that 'free' stays true)."""
        nodes = self.classes[key]
        leaves = [en for en in nodes if en.op == "leaf"]
        if leaves:
            return leaves[:1]
        if key in self.const:
            return [en for en in nodes if self.is_const_node(en)]
        return nodes

    def own_cost(self, key, en) -> float:
        """What the e-node costs per call; one computed from constants is folded, and costs
        only a millionth, so that of two foldings the shorter is taken."""
        if en.op in ("leaf", "out"):
            return 0.0
        ins = tuple(self.type[k] for k in en.kids)
        attrs, outs = en.info
        ck = (en.op, ins, attrs)
        c = self.cost.cache.get(ck)
        if c is None:
            c = self.cost.cache[ck] = self.cost.model.op_cost(en.op, [s for s, _ in ins], [s for s, _ in outs],
                                                              outs[0][1], dict(attrs))
        return c * FOLDED if key in self.const else c

    def greedy(self, roots) -> dict:
        """Greedy DAG extraction: each class's best e-node by the summed cost of the distinct
        classes it needs (a shared value counted once), iterated to a fixed point."""
        best: dict = {}    # key -> (total, {class: own cost}, enode)
        keys = sorted(self.classes, key=str)
        for _ in range(len(keys) + 1):
            changed = False
            for key in keys:
                for en in self.allowed(key):
                    if any(k not in best for k in en.kids):
                        continue
                    need = {key: self.own_cost(key, en)}
                    for k in en.kids:
                        if key in best[k][1]:
                            need = None
                            break
                        need.update(best[k][1])
                    if need is None:
                        continue
                    total = sum(need.values())
                    if key not in best or total < best[key][0] - 1e-12:
                        best[key] = (total, need, en)
                        changed = True
            if not changed:
                break
        if any(r not in best for r in roots):
            raise GraphoptError("internal error: a root has no acyclic extraction")
        return {k: v[2] for k, v in best.items()}

    def dag_cost(self, choice: dict, roots) -> float | None:
        """Cost of the classes a choice needs from the roots; None if it has a cycle."""
        order = _template(choice, roots)
        return None if order is None else sum(self.own_cost(k, choice[k]) for k in order)

    def reachable(self, roots) -> set:
        """The classes the roots may need, through allowed e-nodes."""
        reach, stack = set(), list(roots)
        while stack:
            k = stack.pop()
            if k in reach:
                continue
            reach.add(k)
            for en in self.allowed(k):
                stack.extend(en.kids)
        return reach

    def has_choice(self, roots) -> bool:
        """Whether some class the roots need can be extracted in more than one way (if not,
        the greedy extraction is the only one, and no integer program is needed)."""
        return any(len(self.allowed(k)) > 1 for k in self.reachable(roots))

    def ilp(self, roots, seconds: float):
        """Exact extraction as an integer program (Tensat's): a binary per e-node, each root
        class and each chosen e-node's child classes covered, a topological order per class
        to forbid cycles; minimise the summed e-node costs.  Returns (choice, status)."""
        import highspy
        import numpy as np
        keys = sorted(self.reachable(roots), key=str)
        cidx = {k: i for i, k in enumerate(keys)}
        enodes = [(k, en) for k in keys for en in self.allowed(k)]
        n_x, n_t = len(enodes), len(keys)
        h = _quiet_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("log_to_console", False)
        h.setOptionValue("time_limit", float(seconds))
        h.setOptionValue("threads", 1)
        inf = highspy.kHighsInf
        big = float(n_t + 1)
        lp = highspy.HighsLp()
        costs = [self.own_cost(k, en) for k, en in enodes] + [0.0] * n_t
        lp.num_col_ = n_x + n_t
        lp.col_cost_ = np.array(costs, dtype=np.float64)
        lp.col_lower_ = np.zeros(n_x + n_t)
        lp.col_upper_ = np.array([1.0] * n_x + [big] * n_t)
        rows_lo, rows_hi, starts, index, value = [], [], [], [], []

        def add_row(entries, lo, hi):
            starts.append(len(index))
            for col, val in entries:
                index.append(col)
                value.append(val)
            rows_lo.append(lo)
            rows_hi.append(hi)

        by_class: dict = {}
        for i, (k, en) in enumerate(enodes):
            by_class.setdefault(k, []).append(i)
        for r in set(roots):
            add_row([(i, 1.0) for i in by_class[r]], 1.0, inf)
        for i, (k, en) in enumerate(enodes):
            for kid in set(en.kids):
                # x_i <= sum of the child's e-nodes
                add_row([(j, 1.0) for j in by_class[kid]] + [(i, -1.0)], 0.0, inf)
                # t_k >= t_kid + 1 when x_i is chosen
                add_row([(n_x + cidx[k], 1.0), (n_x + cidx[kid], -1.0), (i, -big)], 1.0 - big, inf)
        lp.num_row_ = len(rows_lo)
        lp.row_lower_ = np.array(rows_lo, dtype=np.float64)
        lp.row_upper_ = np.array(rows_hi, dtype=np.float64)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.array(starts + [len(index)], dtype=np.int32)
        lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
        lp.integrality_ = [highspy.HighsVarType.kInteger] * n_x + [highspy.HighsVarType.kContinuous] * n_t
        h.passModel(lp)
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        sol = h.getSolution().col_value
        if not sol:
            return None, status
        choice = {}
        for i, (k, en) in enumerate(enodes):
            if sol[i] > 0.5 and k not in choice:
                choice[k] = en
        return choice, status


def _quiet_highs():
    """A HiGHS solver, without the banner its constructor prints on the C level."""
    import os
    import sys
    import highspy
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# -- the engine ----------------------------------------------------------------------------------

def _template(choice: dict, roots: list) -> list | None:
    """The chosen e-nodes' classes in dependency order (post-order from the roots), each once;
    None if the choice has a cycle."""
    order, state = [], {}          # state: 1 on the path, 2 done
    for root in roots:
        if state.get(root) == 2:
            continue
        stack = [(root, iter(choice[root].kids))]
        state[root] = 1
        while stack:
            k, kids = stack[-1]
            for kid in kids:
                st = state.get(kid)
                if st == 1:
                    return None
                if st is None:
                    state[kid] = 1
                    stack.append((kid, iter(choice[kid].kids)))
                    break
            else:
                stack.pop()
                state[k] = 2
                order.append(k)
    return order


def _instantiate(new: MGraph, choice: dict, order: list, leaves: list, moved: dict, block: Block, roots: list):
    """Add the extracted block to ``new``, reading its leaves from the current graph; returns
    {old out value: new value}."""
    val: dict = {}
    for k in order:
        en = choice[k]
        if en.op == "leaf":
            v = leaves[en.info]
            val[k] = moved.get(v, v)
        elif en.op == "out":
            val[k] = (val[en.kids[0]][0], en.info)
        else:
            attrs, outs = en.info
            nid = new.add_node(MNode(en.op, tuple(val[kid] for kid in en.kids), attrs, outs))
            val[k] = (nid, 0) if len(outs) == 1 else (nid, None)
    return {v: val[r] for v, r in zip(block.outs, roots)}


def egraph_search(mg: MGraph, patterns, cost_model, opts, limits: Limits | None = None) -> SearchResult:
    """Equality saturation over the phase's patterns, block by block; see the module doc.

    Two stages: the rules that are not merges, then (on the graph extracted from the first)
    the merges alone.  A merge matches every pair of ops that share an input, so in one
    e-graph with the rest it mostly merges values the extraction will not keep (x@W with the
    x@A of a LoRA adapter, and then with the folded x@(W + s*A@B), ...): the e-graph of a
    LoRA-adapted MLP reached 5,600 e-nodes without merging the two projections it keeps.

    Args:
        mg: the graph (not modified).
        patterns: both directions of the rules (:func:`graphopt.search.compile_patterns`).
        cost_model: prices e-nodes for the extraction.
        opts: :class:`~graphopt.options.Options` (its ``time_limit`` bounds the saturation).
        limits: iterations, e-nodes, seconds, the exact extraction's size and time.
    Returns:
        a :class:`~graphopt.search.SearchResult` whose ``stats`` hold the e-graph's figures;
        the input graph when nothing cheaper was extracted.
    """
    start = time.monotonic()
    limits = limits or Limits(seconds=opts.time_limit)
    cost = GraphCost(cost_model)
    c0 = cost(mg)
    stats = EGraphStats()
    deadline = start + limits.seconds
    merges = [p for p in patterns if _is_merge(p)] if limits.merges else []
    stages = [[p for p in patterns if not _is_merge(p)], merges]
    g, c, applied, stopped = mg, c0, Counter(), "no block"
    for k, stage in enumerate(stages):
        if not stage:
            continue
        # the first stage leaves a quarter of the time to the second, if there is one
        end = deadline if k == len(stages) - 1 or not stages[-1] else start + 0.75 * limits.seconds
        new, used, why = _saturate_blocks(g, stage, cost, limits, end, stats)
        stopped = why if k == 0 or stopped == "no block" else f"{stopped}; merges: {why}"
        c_new = cost(new) if new is not None else c
        if c_new < c:
            g, c = new, c_new
            applied.update(used)
    seconds = time.monotonic() - start
    info = {"engine": "egraph", **stats.to_json()}
    if g is mg:
        return SearchResult(mg, c0, c0, Counter(), seconds=seconds, stopped_by=stopped, stats=info)
    return SearchResult(g, c, c0, applied, expanded=stats.iterations, candidates=stats.enodes,
                        seconds=seconds, stopped_by=stopped, stats=info)


def _saturate_blocks(mg: MGraph, patterns, cost: GraphCost, limits: Limits, deadline: float, stats: EGraphStats):
    """One stage: cut ``mg`` into blocks, saturate and extract each distinct one, put the
    extracted blocks together.  Returns (graph or None, rules used, stopping reasons)."""
    local = EGraphStats()
    blocks = cut_blocks(mg)
    local.blocks = len(blocks)
    results: dict = {}   # signature -> (choice, order, roots, rules) or None
    new = mg.copy()
    moved: dict = {}
    applied = Counter()
    changed = False
    sigs = [block_signature(mg, b) for b in blocks]
    todo = len(set(sigs))
    for b, sig in zip(blocks, sigs):
        if sig not in results:
            # each distinct block its share of the time that is left
            share = max(0.0, deadline - time.monotonic()) / max(1, todo)
            todo -= 1
            results[sig] = _solve_block(mg, b, patterns, cost, limits, time.monotonic() + share, local)
        res = results[sig]
        if res is None:
            continue
        choice, order, root_keys, rules = res
        # the template was made on the first block with this signature: map it by position
        repl = _instantiate(new, choice, order, b.leaves, moved, b, root_keys)
        for old, nv in repl.items():
            if nv != old:
                new.replace_uses(moved.get(old, old), nv)
                moved[old] = nv
        applied.update(rules)
        changed = True
    local.distinct_blocks = len(results)
    stats.absorb(local)
    why = _stopped(local)
    if not changed:
        return None, applied, why
    new.remove_dead()
    try:
        new.topo_order()
    except GraphoptError:
        return None, Counter(), "cycle in the extracted graph (kept the input)"
    return new, applied, why


def _stopped(stats: EGraphStats) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(stats.stopped.items())) or "no block"


def _solve_block(mg, b: Block, patterns, cost: GraphCost, limits: Limits, deadline: float, stats: EGraphStats):
    """Saturate and extract one block; None when nothing cheaper was found."""
    sat = Saturation(mg, b, patterns, limits)
    sat.build()
    t0 = time.monotonic()
    sat.saturate(deadline)
    stats.seconds["saturate"] += time.monotonic() - t0
    stats.stopped[sat.stopped] += 1
    stats.iterations = max(stats.iterations, sat.iterations)
    stats.rules = max(stats.rules, len(sat.added))
    if not sat.added or sat.iterations == 0:
        return None
    t0 = time.monotonic()
    classes = sat.read()
    stats.seconds["read"] += time.monotonic() - t0
    t0 = time.monotonic()
    n_enodes = sum(len(v) for v in classes.values())
    stats.enodes, stats.eclasses = max(stats.enodes, n_enodes), max(stats.eclasses, len(classes))
    roots = [sat.root(v) for v in b.outs]
    ex = Extraction(classes, b.leaves, mg, cost)
    original = {}
    # each class's e-node in the block as it was; where a rule merged two of the block's values
    # (sdiv(matmul(X, Y), s) == matmul(X, Y)), the later one, which reads the earlier
    for nid in reversed(b.nodes):
        n = mg.nodes[nid]
        for j in range(len(n.outs)):
            k = sat.canon[sat.value_ref[(nid, j)]]
            for en in classes[k]:
                if en.op == n.op and en.info == (n.attrs, n.outs):
                    original.setdefault(k, en)

    def usable(choice):
        """The choice's classes in dependency order, or None (a cycle, or through a wall)."""
        order = _template(choice, roots)
        return order if order is not None and _respects_walls(choice, order, roots, b.forbid) else None

    best, how = ex.greedy(roots), "greedy"
    best_cost = ex.dag_cost(best, roots)
    order = usable(best) if best_cost is not None else None
    if order is None:
        best_cost = None
    if n_enodes <= limits.ilp_enodes and ex.has_choice(roots):
        choice, status = ex.ilp(roots, limits.ilp_seconds)
        if choice is not None and all(r in choice for r in roots):
            c = ex.dag_cost(choice, roots)
            o = usable(choice) if c is not None else None
            if o is not None and (best_cost is None or c < best_cost - 1e-12):
                best, best_cost, order = choice, c, o
                how = "ilp"
            elif o is not None and best_cost is not None:
                how = "ilp = greedy" if abs(c - best_cost) <= 1e-12 else how
        how += f" ({status.lower()})" if how.startswith("ilp") else ""
    stats.extraction[how] += 1
    stats.seconds["extract"] += time.monotonic() - t0
    base = _block_cost(mg, b, cost)
    if best_cost is None or best_cost >= base - 1e-12 * max(1.0, base):
        return None
    stats.improved_blocks += 1
    return best, order, roots, _rules_used({k: best[k] for k in order}, original, sat.fired,
                                            {p.rule_id: p for p in sat.patterns}, ex.const)


def _respects_walls(choice: dict, order: list, roots: list, forbid: list) -> bool:
    """Whether no out is computed from a leaf that an opaque node computes from that out."""
    if not forbid:
        return True
    leaves: dict = {}
    for k in order:           # post-order: kids first
        en = choice[k]
        acc = {en.info} if en.op == "leaf" else set()
        for kid in en.kids:
            acc |= leaves[kid]
        leaves[k] = acc
    return all(leaf not in leaves[roots[i]] for i, leaf in forbid)


def _block_cost(mg: MGraph, b: Block, cost: GraphCost) -> float:
    return sum(cost.node(mg, nid) for nid in b.nodes if nid not in b.folded)


def _rules_used(choice: dict, original: dict, fired: dict, patterns: dict, const: set) -> Counter:
    """Which rules the extraction used: per value computed per call whose e-node the block did
    not have there, a rule that rewrote that value (egglog records it), preferring one whose
    right side ends in the extracted op or is an input; folded constants are not counted.  A
    value of a multi-output node counts (the q, k and v read from one merged projection)."""
    out = Counter()
    for k, en in choice.items():
        if en.op == "leaf" or original.get(k) is en or k in const:
            continue
        ids = [r for r in fired.get(k, ()) if r in patterns]
        if not ids:
            continue

        def fits(rid):
            p = patterns[rid]
            for o in p.rhs.outputs:
                key, j = parse_ref(o)
                if j is None:
                    continue
                node = p.rhs.nodes[key]
                if (len(node.outs) > 1) != (en.op == "out") or (en.op != "out" and node.op != en.op):
                    return False
            return True

        out[next((r for r in sorted(ids) if fits(r)), sorted(ids)[0])] += 1
    return out


__all__ = ["egraph_search", "cut_blocks", "block_signature", "compile_rule", "Limits", "Term"]
