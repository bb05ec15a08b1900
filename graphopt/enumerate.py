"""Depth-first enumeration of small operator graphs (TASO, Algorithm 1).

Every graph of up to ``max_ops`` operators over a fixed input set is built by
adding one operator at a time to every valid combination of the tensors built
so far.  Four things keep the search small without losing graphs:

* **hash-consing** - a node (op, attrs, inputs) exists once; its fingerprint
  value is computed once and shared by every graph that contains it;
* **canonical order** - a graph is reached through exactly one of its
  topological orders (the one that always adds the smallest available node, by
  a structural key), so no set of seen graphs is needed and shards of the
  search never overlap;
* **TASO's pruning** - a node already in the graph is not added again
  (duplicated computation) and a node whose value equals a tensor already in
  the graph is skipped (identical tensors);
* **no tensor twice** - an op never takes the same tensor for two operands
  (``x*x``, ``concat(x, x)``): such graphs multiply the search and give no
  rules that LLM graphs use; the 0-d scalar input feeds only scalar operands.

Each graph's fingerprint is the sorted tuple of its outputs' fingerprints (its
outputs are the tensors nothing else consumes), so it does not depend on the
order of outputs.  Graphs are bucketed by fingerprint; only buckets with two or
more graphs can yield rules.  Only connected graphs (through operators or
shared inputs) are recorded: a disconnected pair of equivalences is a
composition of smaller rules.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from dataclasses import dataclass, field

import numpy as np

from .dims import Dim, evaluate_shape
from .ir import Graph, Input, attrs_to_json
from .ops import PRIME, enumerable_ops, get_op

# every op of the registry that can be enumerated, in registry order
DEFAULT_OPS = enumerable_ops()


def default_inputs() -> tuple:
    """Shapes chosen so matmuls chain (X@Y@W), two weights share a shape (Y, Z:
    x@A + x@B, merged projections), one weight is already concatenated (V, of
    width c+d: splitting fused weights, ops commuting with split) and a scalar
    scales (s)."""
    a, b, c, d = (Dim.sym(x) for x in "abcd")
    return (
        Input("X", (a, b)),
        Input("Y", (b, c)),
        Input("Z", (b, c)),
        Input("W", (c, d)),
        Input("V", (b, c + d)),
        Input("s", ()),
    )


@dataclass
class EnumConfig:
    max_ops: int = 4
    ops: tuple = DEFAULT_OPS
    inputs: tuple = field(default_factory=default_inputs)
    seed: int = 0
    max_outputs: int = 2
    # sizes of the shape symbols at which fingerprints are computed (others get
    # further distinct sizes, see fingerprint_binding)
    binding: dict = field(default_factory=lambda: {"a": 3, "b": 4, "c": 5, "d": 2, "e": 7})

    def fingerprint_binding(self) -> dict:
        out = dict(self.binding)
        spare = iter(s for s in (11, 13, 17, 19, 23, 29, 31, 37) if s not in out.values())
        for inp in self.inputs:
            for d in inp.shape:
                for sym in d.symbols:
                    if sym not in out:
                        out[sym] = next(spare, 3)
        return out


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class _Table:
    """Hash-consed nodes and tensors of one worker, with cached fingerprints."""

    def __init__(self, cfg: EnumConfig):
        self.cfg = cfg
        self.opdefs = [get_op(o) for o in cfg.ops]
        # tensors: parallel lists
        self.t_shape: list = []
        self.t_dtype: list = []
        self.t_val: list = []      # np.int64 array (fingerprint value) or None until computed
        self.t_fp: list = []       # int
        self.t_skey: list = []     # structural key (int)
        self.t_node: list = []     # producing node id, -1 for inputs
        # nodes
        self.n_op: list = []
        self.n_attrs: list = []
        self.n_in: list = []
        self.n_out: list = []
        self.n_skey: list = []
        self.n_tset: list = []     # frozenset of the tensors a node touches
        self.intern: dict = {}
        self.infer_cache: dict = {}
        self.head_cache: dict = {}
        self.input_names: list = []
        rng = np.random.default_rng(cfg.seed)
        self.binding = cfg.fingerprint_binding()
        for inp in cfg.inputs:
            shape = evaluate_shape(inp.shape, self.binding)
            val = rng.integers(1, PRIME, size=shape, dtype=np.int64)
            self._new_tensor(inp.shape, inp.dtype, -1, _h64(b"input:" + inp.name.encode()), val)
            self.input_names.append(inp.name)

    def _new_tensor(self, shape, dtype, node, skey, val=None) -> int:
        tid = len(self.t_shape)
        self.t_shape.append(shape)
        self.t_dtype.append(dtype)
        self.t_node.append(node)
        self.t_skey.append(skey)
        self.t_val.append(val)
        self.t_fp.append(None if val is None else self._value_fp(shape, val))
        return tid

    @staticmethod
    def _value_fp(shape, val) -> int:
        return _h64(repr(shape).encode() + val.tobytes())

    def candidates_with(self, new_tids, avail) -> list:
        """Interned nodes that consume at least one tensor of ``new_tids``."""
        out = []
        new_set = set(new_tids)
        for k, opdef in enumerate(self.opdefs):
            if opdef.arity == 1:
                combos = [(t,) for t in new_tids]
            else:
                combos = []
                for t in new_tids:
                    for u in avail:
                        if u == t or (u in new_set and u < t):
                            continue  # same tensor twice / pair of new tensors seen already
                        combos.append((t, u))
                        combos.append((u, t))
                if opdef.commutative:
                    combos = [c for c in combos if self.t_skey[c[0]] <= self.t_skey[c[1]]]
            for ins in combos:
                if not self._scalars_ok(opdef, ins):
                    continue
                shapes = tuple(self.t_shape[t] for t in ins)
                dtypes = tuple(self.t_dtype[t] for t in ins)
                for attrs in self._infer(k, shapes, dtypes):
                    out.append(self._node(k, attrs, ins))
        return out

    def _scalars_ok(self, opdef, ins) -> bool:
        """0-d tensors (the scalar input) feed only an op's scalar operand."""
        for j, t in enumerate(ins):
            if (len(self.t_shape[t]) == 0) != (j == opdef.scalar_operand):
                return False
        return True

    def _infer(self, k, shapes, dtypes) -> list:
        """[(attrs_tuple, outs)] valid instantiations of op k on these input types."""
        key = (k, shapes, dtypes)
        hit = self.infer_cache.get(key)
        if hit is None:
            opdef = self.opdefs[k]
            hit = []
            for attrs in opdef.enum_attrs(shapes):
                try:
                    full = opdef.full_attrs(attrs)
                    outs = opdef.infer_checked(shapes, dtypes, full)
                except Exception:
                    continue
                hit.append((tuple(sorted(full.items())), tuple(outs)))
            self.infer_cache[key] = hit
        return hit

    def _node(self, k, attrs_outs, ins) -> int:
        attrs, outs = attrs_outs
        key = (k, attrs, ins)
        nid = self.intern.get(key)
        if nid is not None:
            return nid
        nid = len(self.n_op)
        opname = self.opdefs[k].name
        skey = _h64(repr((opname, attrs, tuple(self.t_skey[t] for t in ins))).encode())
        self.n_op.append(k)
        self.n_attrs.append(attrs)
        self.n_in.append(ins)
        self.n_skey.append(skey)
        self.n_out.append(tuple(self._new_tensor(s, dt, nid, skey + j) for j, (s, dt) in enumerate(outs)))
        self.n_tset.append(frozenset(ins) | frozenset(self.n_out[nid]))
        self.intern[key] = nid
        return nid

    def evaluate(self, nid) -> bool:
        """Compute the fingerprint values of a node's outputs; False if impossible."""
        outs = self.n_out[nid]
        if self.t_fp[outs[0]] is not None:
            return True
        opdef = self.opdefs[self.n_op[nid]]
        attrs = {k: (v.evaluate(self.binding) if isinstance(v, Dim) else v) for k, v in self.n_attrs[nid]}
        vals = opdef.fingerprint([self.t_val[t] for t in self.n_in[nid]], attrs)
        for t, v in zip(outs, vals):
            v = np.ascontiguousarray(v, dtype=np.int64)
            self.t_val[t] = v
            self.t_fp[t] = self._value_fp(self.t_shape[t], v)
        return True

    def encode(self, seq, outputs) -> tuple:
        """Portable form of a graph: ((op, attrs_json_items, input refs), ...), output refs."""
        pos = {}
        out = []
        ref_of = {}
        for i, nid in enumerate(seq):
            refs = []
            for t in self.n_in[nid]:
                p = self.t_node[t]
                if p < 0:
                    refs.append(self.input_names[t])
                else:
                    j = self.n_out[p].index(t)
                    refs.append(f"%{pos[p]}.{j}" if len(self.n_out[p]) > 1 else f"%{pos[p]}")
            pos[nid] = i
            for j, t in enumerate(self.n_out[nid]):
                ref_of[t] = f"%{i}.{j}" if len(self.n_out[nid]) > 1 else f"%{i}"
            out.append(self._head(nid) + (tuple(refs),))
        return tuple(out), tuple(ref_of[t] for t in outputs)

    def _head(self, nid) -> tuple:
        """(op name, attrs as sorted JSON-able items) of a node, computed once."""
        head = self.head_cache.get(nid)
        if head is None:
            attrs = tuple((k, tuple(v) if isinstance(v, list) else v)
                          for k, v in sorted(attrs_to_json(self.n_attrs[nid]).items()))
            head = self.head_cache[nid] = (self.opdefs[self.n_op[nid]].name, attrs)
        return head

    def independent(self, seq, outputs) -> bool:
        """True when the graph has several outputs whose cones share no node."""
        if len(outputs) < 2:
            return False
        inside = set(seq)
        cones = []
        for t in outputs:
            cone, stack = set(), [self.t_node[t]]
            while stack:
                nid = stack.pop()
                if nid in cone:
                    continue
                cone.add(nid)
                stack.extend(self.t_node[u] for u in self.n_in[nid] if self.t_node[u] in inside)
            cones.append(cone)
        return all(a.isdisjoint(b) for i, a in enumerate(cones) for b in cones[i + 1:])

    def top_signature(self, outputs) -> tuple:
        """For each output: the producing op, its attributes, which of its outputs, and the
        fingerprints of its inputs.  Two equivalent graphs with the same signature compute
        their outputs by the same op from equivalent tensors: a rule between them follows
        from smaller rules."""
        sig = []
        for t in outputs:
            nid = self.t_node[t]
            sig.append((self.n_op[nid], self.n_attrs[nid], self.n_out[nid].index(t),
                        tuple(self.t_fp[u] for u in self.n_in[nid])))
        return tuple(sig)


class _Search:
    """The DFS over shards (one choice of first node each); buckets accumulate."""

    def __init__(self, table: _Table, max_ops: int, max_outputs: int, buckets: dict):
        self.tb = table
        self.max_ops = max_ops
        self.max_outputs = max_outputs
        self.seq: list = []
        self.pos: dict = {}
        self.consumers: dict = {}
        self.sinks: set = set()
        self.present: set = set()
        self.buckets = buckets
        self.graphs = 0
        self.recorded = 0
        n_inputs = len(table.input_names)
        self.avail: list = list(range(n_inputs))
        for t in self.avail:
            self.present.add(table.t_fp[t])

    def try_add(self, nid) -> bool:
        tb = self.tb
        if nid in self.pos:
            return False  # duplicated computation
        skey = tb.n_skey[nid]
        start = 0
        for t in tb.n_in[nid]:
            p = tb.t_node[t]
            if p >= 0 and self.pos[p] >= start:
                start = self.pos[p] + 1
        seq, n_skey = self.seq, tb.n_skey
        for i in range(start, len(seq)):
            if n_skey[seq[i]] > skey:
                return False  # not the canonical order of this graph
        tb.evaluate(nid)
        outs = tb.n_out[nid]
        if len(outs) == 1:
            return tb.t_fp[outs[0]] not in self.present  # identical tensor already present
        fps = [tb.t_fp[t] for t in outs]
        return not any(f in self.present for f in fps) and len(set(fps)) == len(fps)

    def push(self, nid):
        tb = self.tb
        self.pos[nid] = len(self.seq)
        self.seq.append(nid)
        for t in tb.n_in[nid]:
            c = self.consumers.get(t, 0)
            self.consumers[t] = c + 1
            if c == 0:
                self.sinks.discard(t)
        for t in tb.n_out[nid]:
            self.avail.append(t)
            self.sinks.add(t)
            self.present.add(tb.t_fp[t])

    def pop(self):
        tb = self.tb
        nid = self.seq.pop()
        del self.pos[nid]
        for t in tb.n_out[nid]:
            self.avail.pop()
            self.sinks.discard(t)
            self.present.discard(tb.t_fp[t])
        for t in tb.n_in[nid]:
            c = self.consumers[t] - 1
            self.consumers[t] = c
            if c == 0 and tb.t_node[t] >= 0:
                self.sinks.add(t)

    def record(self):
        tb = self.tb
        self.graphs += 1
        if len(self.sinks) > self.max_outputs:
            return
        if len(self.seq) > 1 and not self._connected():
            return
        gfp = hash(tuple(sorted([tb.t_fp[t] for t in self.sinks])))
        self.recorded += 1
        lst = self.buckets.get(gfp)
        if lst is None:
            self.buckets[gfp] = [tuple(self.seq)]
        else:
            lst.append(tuple(self.seq))

    def _connected(self) -> bool:
        tset = self.tb.n_tset
        seen = set(tset[self.seq[0]])
        left = self.seq[1:]
        while left:
            rest = [n for n in left if seen.isdisjoint(tset[n])]
            if len(rest) == len(left):
                return False
            for n in left:
                if not seen.isdisjoint(tset[n]):
                    seen |= tset[n]
            left = rest
        return True

    def _components(self) -> list:
        """Tensor sets of the graph's connected components (through ops or shared inputs)."""
        tset, comps = self.tb.n_tset, []
        for nid in self.seq:
            merged = set(tset[nid])
            rest = []
            for c in comps:
                if c.isdisjoint(merged):
                    rest.append(c)
                else:
                    merged |= c
            comps = rest + [merged]
        return comps

    def _leaf_filter(self, cands) -> list:
        """At the last level a graph is only recorded, so skip the nodes that would leave
        it disconnected or with too many outputs before doing any work on them."""
        tb, sinks = self.tb, self.sinks
        comps = self._components()
        out = []
        for nid in cands:
            ins = tb.n_in[nid]
            consumed = len({t for t in ins if t in sinks})
            if len(sinks) - consumed + len(tb.n_out[nid]) > self.max_outputs:
                continue
            if not all(not c.isdisjoint(ins) for c in comps):
                continue  # the new node must join every component
            out.append(nid)
        return out

    def dfs(self, cands):
        if len(self.seq) == self.max_ops - 1:
            cands = self._leaf_filter(cands)
        for nid in cands:
            if not self.try_add(nid):
                continue
            self.push(nid)
            self.record()
            if len(self.seq) < self.max_ops:
                new = self.tb.candidates_with(self.tb.n_out[nid], self.avail)
                self.dfs(cands + new)
            self.pop()

    def run_shard(self, nid: int, root_cands: list):
        """Explore every canonical graph whose first node is ``nid``."""
        if not self.try_add(nid):
            return
        self.push(nid)
        self.record()
        if self.max_ops > 1:
            new = self.tb.candidates_with(self.tb.n_out[nid], self.avail)
            self.dfs(root_cands + new)
        self.pop()


# -- driver: enumerate in worker processes, then gather the buckets that matter ---------

@dataclass
class GraphRecord:
    """One enumerated graph, as the verifier needs it."""

    nodes: tuple        # ((op, attrs items, input refs), ...)
    outputs: tuple      # output refs, ordered by output fingerprint
    skeys: frozenset    # structural keys of its nodes (shared key = common subgraph)
    top: tuple          # see _Table.top_signature
    independent: bool   # several outputs computed by disjoint sets of nodes

    @property
    def num_ops(self) -> int:
        return len(self.nodes)


class _Worker:
    """Enumeration state of one process: its shards' buckets stay here until asked for."""

    def __init__(self, cfg: EnumConfig):
        self.cfg = cfg
        self.table = _Table(cfg)
        n = len(self.table.input_names)
        self.roots = self.table.candidates_with(list(range(n)), list(range(n)))
        self.buckets: dict = {}
        self.graphs = self.recorded = 0

    def shard(self, index: int):
        search = _Search(self.table, self.cfg.max_ops, self.cfg.max_outputs, self.buckets)
        search.run_shard(self.roots[index], self.roots)
        self.graphs += search.graphs
        self.recorded += search.recorded

    def counts(self):
        keys = np.fromiter(self.buckets.keys(), dtype=np.int64, count=len(self.buckets))
        vals = np.fromiter((len(v) for v in self.buckets.values()), dtype=np.int64, count=len(self.buckets))
        return self.graphs, self.recorded, keys, vals

    def records(self, wanted) -> dict:
        tb, out = self.table, {}
        for gfp in wanted:
            seqs = self.buckets.get(int(gfp))
            if not seqs:
                continue
            recs = []
            for seq in seqs:
                consumed = {t for nid in seq for t in tb.n_in[nid]}
                outs = sorted((t for nid in seq for t in tb.n_out[nid] if t not in consumed),
                              key=tb.t_fp.__getitem__)
                nodes, refs = tb.encode(seq, outs)
                recs.append(GraphRecord(nodes, refs, frozenset(tb.n_skey[n] for n in seq),
                                        tb.top_signature(outs), tb.independent(seq, outs)))
            out[int(gfp)] = recs
        return out


def _process_main(cfg, task_q, conn):
    worker = _Worker(cfg)
    while True:
        index = task_q.get()
        if index is None:
            break
        worker.shard(index)
        conn.send(("done", index))
    conn.send(("counts", worker.counts()))
    wanted = conn.recv()
    conn.send(("records", worker.records(wanted)))
    conn.close()


@dataclass
class EnumResult:
    buckets: dict          # fingerprint -> [GraphRecord, ...]  (only buckets of >= 2 graphs)
    graphs: int            # canonical graphs of 1..max_ops ops visited
    recorded: int          # connected graphs with <= max_outputs outputs, bucketed
    fingerprints: int      # distinct fingerprints among them
    shards: int


def _gather(count_list, n_shards) -> tuple:
    graphs = sum(c[0] for c in count_list)
    recorded = sum(c[1] for c in count_list)
    keys = np.concatenate([c[2] for c in count_list])
    vals = np.concatenate([c[3] for c in count_list])
    uniq, inv = np.unique(keys, return_inverse=True)
    totals = np.bincount(inv, weights=vals).astype(np.int64)
    return graphs, recorded, len(uniq), uniq[totals >= 2]


def _sorted_buckets(parts) -> dict:
    merged: dict = {}
    for part in parts:
        for gfp, recs in part.items():
            merged.setdefault(gfp, []).extend(recs)
    # deterministic whatever the scheduling: order graphs by size, then structure
    return {gfp: sorted(recs, key=lambda r: (r.num_ops, repr(r.nodes), r.outputs))
            for gfp, recs in sorted(merged.items())}


def enumerate_graphs(cfg: EnumConfig, workers: int = 1, progress=None) -> EnumResult:
    """Enumerate every graph; return the fingerprint buckets that hold two or more.

    Args:
        cfg: op set, inputs, depth and fingerprint seed.
        workers: processes to use (0 = all cores).
        progress: optional callable ``(done_shards, total_shards)``.
    """
    workers = workers or os.cpu_count() or 1
    n_shards = len(_Worker(cfg).roots)
    if workers == 1:
        w = _Worker(cfg)
        for i in range(n_shards):
            w.shard(i)
            if progress:
                progress(i + 1, n_shards)
        graphs, recorded, n_fp, wanted = _gather([w.counts()], n_shards)
        return EnumResult(_sorted_buckets([w.records(wanted)]), graphs, recorded, n_fp, n_shards)

    ctx = mp.get_context("fork")
    task_q = ctx.Queue()
    for i in range(n_shards):
        task_q.put(i)
    pipes, procs = [], []
    for _ in range(workers):
        task_q.put(None)
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_process_main, args=(cfg, task_q, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        done, counts = 0, [None] * workers
        from multiprocessing.connection import wait
        while any(c is None for c in counts):
            for conn in wait([pp for k, pp in enumerate(pipes) if counts[k] is None]):
                k = pipes.index(conn)
                kind, payload = conn.recv()
                if kind == "done":
                    done += 1
                    if progress:
                        progress(done, n_shards)
                else:
                    counts[k] = payload
        graphs, recorded, n_fp, wanted = _gather(counts, n_shards)
        for conn in pipes:
            conn.send(wanted)
        parts = [conn.recv()[1] for conn in pipes]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return EnumResult(_sorted_buckets(parts), graphs, recorded, n_fp, n_shards)


def decode(record: GraphRecord, inputs) -> Graph:
    """Build an IR Graph from a GraphRecord (outputs in fingerprint order)."""
    g = Graph()
    for inp in inputs:
        g.add_input(inp.name, inp.shape, inp.dtype)
    for op, attrs, ins in record.nodes:
        g.add(op, *ins, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs})
    g.outputs = list(record.outputs)
    return g
