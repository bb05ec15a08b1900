"""The search for a tensor-parallel plan over a model's torch.export graph.

Every value of the graph gets a layout (:mod:`graphopt.parallel.layouts`): replicated, split
along an axis, or partial sums.  Weights (parameters and buffers) are free: they are split
when the plan is made, at no communication cost, so their layout is whatever their first
user needs.  For each call, in graph order, the search tries the layouts its operands have,
the strategies of the verified sharding rules for its op (:mod:`graphopt.parallel.rules`:
column and row splits, heads, vocabulary), the same with replicated operands sliced to match
a split one, and every operand replicated; converting an operand costs a collective
(all-gather, all-reduce, reduce-scatter) on the interconnect, or nothing (a slice of a
replicated tensor).  The cost of a plan is the roofline time of every call on one rank's
shapes plus its collectives; the memory of a plan is the bytes of weights one rank holds,
and plans over the budget are dropped.  The search is a dynamic program over graph order
whose state is the layouts of the values still to be used: states with the same layouts
keep the cheaper plan; the ``beam`` cheapest states go on.

Each (call, operand layouts) pair the search uses is checked on this model's values: every
rank's part of the operands is computed (random partial sums for P, so an op that is not
linear fails), the call run per rank (with size arguments of views and splits divided), and
the result must be the rank's part of the real result in one layout, which the check
returns.  So a strategy the rules state is also confirmed on the instance, and an op no rule
covers (a view, RoPE's slices, a norm written out) runs split only where the check proves it.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import GraphoptError
from . import collectives
from .comm import collective_time
from .layouts import P, R, S, Layout, combine, conversion, divisible, local_shape, part, random_parts
from .rules import strategies

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
MATMULS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
           aten.baddbmm.default}
SDPA = {aten.scaled_dot_product_attention.default}
# an embedding lookup is a one-hot matmul (rule vocab-embedding): operand 0 the table
EMBEDDING = aten.embedding.default


@dataclass
class Outcome:
    """A checked way to run one call: the result's layout, the size arguments rewritten
    (``("none",)``, ``("shape", axis)`` or ``("split",)``) and the target one rank calls."""

    out: object            # Layout, or a tuple of Layouts for a call returning several tensors
    rewrite: tuple = ("none",)
    target: object = None  # None: the call's own target
    rule: str = ""         # the sharding rule this strategy comes from ("" : checked only)


@dataclass
class Step:
    node: fx.Node
    ins: tuple             # operand layouts the call runs on
    outcome: Outcome
    converts: tuple        # (operand node, from layout, to layout)
    fixes: tuple           # (weight node, layout) chosen here
    compute: float
    comm: float


@dataclass
class State:
    layouts: dict
    cost: float = 0.0
    mem: float = 0.0
    steps: tuple = ()

    def key(self, live: set) -> tuple:
        return tuple(sorted(((n.name, self.layouts[n]) for n in self.layouts if n in live),
                            key=lambda kv: kv[0]))


class Problem:
    """A model captured with torch.export, with every value computed once on the examples."""

    def __init__(self, model, example_inputs, world: int):
        self.world = world
        try:
            self.ep = torch.export.export(model, tuple(example_inputs), strict=False)
        except Exception as e:  # noqa: BLE001  (any capture failure is one clear error)
            raise GraphoptError(f"parallelize: torch.export cannot capture the model "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.gm = self.ep.graph_module
        sig = self.ep.graph_signature
        state = dict(self.ep.state_dict)
        state.update(getattr(self.ep, "constants", {}))
        self.weights: dict = {}       # placeholder -> (state name, tensor)
        # what is not part of the model's state_dict: non-persistent buffers, lifted constants
        self.transient = {spec.target for spec in sig.input_specs if spec.target is not None and
                          (spec.target not in self.ep.state_dict or spec.persistent is False)}
        self.user_inputs: list = []
        flat = []
        user = iter(example_inputs)
        for spec, ph in zip(sig.input_specs, [n for n in self.gm.graph.nodes if n.op == "placeholder"]):
            if spec.target is not None and spec.target in state:
                self.weights[ph] = (spec.target, state[spec.target])
                flat.append(state[spec.target])
            else:
                self.user_inputs.append(ph)
                flat.append(next(user))
        self.weight_bytes = {ph: float(t.numel() * t.element_size()) for ph, (_, t) in self.weights.items()}
        self.values = _run_all(self.gm, flat)
        self.checker = Checker(self)
        self.outputs = [a for a in fx.node.map_arg(list(self._output().args[0]), lambda n: n)]
        self.block_hints = _block_hints(self.gm)

    def _output(self) -> fx.Node:
        return next(n for n in self.gm.graph.nodes if n.op == "output")


def _run_all(gm: fx.GraphModule, flat: list) -> dict:
    values = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            # a copy: a later in-place call (Falcon's scores /= ...) must not change it
            values[n] = out.detach().clone() if isinstance(out, torch.Tensor) and n.op == "call_function" else out
            return out
    with torch.no_grad():
        Keep(gm).run(*flat)
    return values


def _block_hints(gm) -> dict:
    """Matmul calls whose result is split into blocks along its last axis (GPT-2's c_attn
    into q, k and v): call -> the block sizes."""
    hints = {}
    for n in gm.graph.nodes:
        if n.target in SPLITS:
            src, sizes, dim = n.args[0], n.args[1], (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0))
            shape = src.meta["val"].shape
            if dim % len(shape) != len(shape) - 1:
                continue
            total = int(shape[-1])
            blocks = tuple([int(sizes)] * (total // int(sizes))) if isinstance(sizes, int) else tuple(int(s) for s in sizes)
            prod = src
            while prod.target in VIEWS:      # GPT-2: view(addmm(...)) then split
                prod = prod.args[0]
            if prod.op == "call_function" and prod.target in MATMULS and sum(blocks) == total:
                hints[prod] = blocks
    return hints


class Checker:
    """Checks (call, operand layouts) on the captured values; results are memoised."""

    def __init__(self, problem: Problem):
        self.p, self.memo = problem, {}

    @property
    def world(self) -> int:
        return self.p.world

    def __call__(self, node: fx.Node, ins: tuple, target=None) -> Outcome | None:
        key = (node, ins, target, self.world)
        if key not in self.memo:
            self.memo[key] = self._check(node, ins, target)
        return self.memo[key]

    def _locals(self, node, ins, gen):
        per_rank = [dict() for _ in range(self.world)]
        for n, layout in zip(node.all_input_nodes, ins):
            full = self.p.values[n]
            if layout.kind == "R" or not isinstance(full, torch.Tensor):
                for env in per_rank:
                    env[n] = full
                continue
            if layout.kind == "P" and not full.is_floating_point():
                return None
            if layout.split and not divisible(full.shape, layout, self.world):
                return None
            parts = random_parts(full, self.world, gen) if layout.kind == "P" else \
                [part(full, layout, r, self.world) for r in range(self.world)]
            for env, x in zip(per_rank, parts):
                env[n] = x
        return per_rank

    def _check(self, node, ins, target) -> Outcome | None:
        gen = torch.Generator().manual_seed(hash(node.name) % (1 << 31))
        per_rank = self._locals(node, ins, gen)
        if per_rank is None:
            return None
        full = self.p.values[node]
        blocks = {layout.blocks for layout in ins if layout.split and layout.blocks}
        for rewrite in self._rewrites(node, full):
            outs = []
            try:
                for r, env in enumerate(per_rank):
                    fetch = (lambda n, env=env: _fresh(env[n])) if mutates(node.target) else (lambda n, env=env: env[n])
                    args, kwargs = local_args(node, rewrite, self.world, fetch)
                    if target is collectives.vocab_embedding:
                        weight, ids = args[0], args[1]
                        args, kwargs = (weight, ids, torch.tensor(r * weight.shape[0])), {}
                    with torch.no_grad():
                        outs.append((target or node.target)(*args, **kwargs))
            except Exception:  # noqa: BLE001  (the call does not run on these parts: not this way)
                continue
            out = explain(outs, full, self.world, blocks)
            if out is not None:
                return Outcome(out, rewrite, target)
        return None

    def _rewrites(self, node, full) -> list:
        out = [("none",)]
        if node.target in VIEWS and isinstance(full, torch.Tensor):
            out += [("shape", a) for a in range(-full.dim(), 0) if full.shape[a] % self.world == 0]
        if node.target in SPLITS:
            out.append(("split",))
        return out


def mutates(target) -> bool:
    """Whether a call writes to its arguments (``aten.div_``): it then gets copies."""
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _fresh(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def local_args(node: fx.Node, rewrite: tuple, world: int, value) -> tuple:
    """The call's args and kwargs for one rank: operand nodes mapped by ``value``, size
    arguments divided as ``rewrite`` says."""
    args = list(fx.node.map_arg(node.args, value))
    kwargs = dict(fx.node.map_arg(node.kwargs, value))
    if rewrite[0] == "shape":
        full = node.meta["val"].shape
        shape = list(args[1])
        if len(shape) != len(full) or not isinstance(shape[rewrite[1]], int) or shape[rewrite[1]] == -1:
            raise GraphoptError("shape argument not divisible")
        shape[rewrite[1]] //= world
        args[1] = shape
    elif rewrite[0] == "split":
        sizes = args[1]
        args[1] = sizes // world if isinstance(sizes, int) else [s // world for s in sizes]
    return tuple(args), kwargs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within the dtype's rounding, relative to the magnitude of ``b`` (never an absolute
    tolerance: an RMSNorm's mean of squares is ~1e-4, and half of it must not pass for it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a64, b64 = a.double(), b.double()
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(a.dtype, 2e-2)
    # the magnitude of the values, not of mask sentinels (finfo.min where a key is masked:
    # against 3e38 any difference would pass), which must match one by one
    typical = b64[torch.isfinite(b64) & (b64.abs() < 1e30)]
    scale = float(typical.abs().max()) if typical.numel() else 0.0
    diff = (a64 - b64).abs()
    return bool(torch.isfinite(a64).all() == torch.isfinite(b64).all()) and \
        bool((diff.nan_to_num(0.0) <= tol * scale + tol * b64.abs().nan_to_num(0.0)).all())


def explain(outs: list, full, world: int, blocks: set):
    """The layout in which ``outs`` (one per rank) are the parts of ``full``, or None."""
    if isinstance(full, (tuple, list)):
        if not all(isinstance(o, (tuple, list)) and len(o) == len(full) for o in outs):
            return None
        got = tuple(explain([o[k] for o in outs], full[k], world, blocks) for k in range(len(full)))
        return None if any(g is None for g in got) else got
    if not isinstance(full, torch.Tensor):
        return R if all(o == full for o in outs) else None
    if not all(isinstance(o, torch.Tensor) for o in outs):
        return None
    if all(_close(o, full) for o in outs):
        return R
    for a in range(-full.dim(), 0):
        if full.shape[a] % world or any(o.shape[a] * world != full.shape[a] for o in outs):
            continue
        for b in sorted(blocks) + [()]:
            layout = S(a, b)
            if b and sum(b) != full.shape[a]:
                continue
            if _close(combine(outs, layout), full):
                return layout
    if full.is_floating_point() and all(o.shape == full.shape for o in outs) and _close(combine(outs, P), full):
        return P
    return None


# -- costs -------------------------------------------------------------------------------

def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _flops(node, shapes_in, shape_out) -> float:
    t = node.target
    if t in MATMULS and shapes_in:
        a = shapes_in[1] if t in (aten.addmm.default, aten.baddbmm.default) else shapes_in[0]
        return 2.0 * _numel(shape_out) * int(a[-1])
    if t in SDPA and len(shapes_in) >= 3:
        q, k = shapes_in[0], shapes_in[1]
        return 4.0 * _numel(q[:-1]) * int(k[-2]) * int(q[-1])
    return float(_numel(shape_out)) if shape_out else 0.0


class Costs:
    """Roofline time of calls on one rank's shapes, and collective time, on a device."""

    def __init__(self, device, link, world: int, shapes: dict | None = None):
        self.device, self.link, self.world = device, link, world
        self.shapes = shapes or {}   # node name -> full shape (a larger twin's, for predictions)

    def shape(self, node):
        if node.name in self.shapes:
            return self.shapes[node.name]
        v = node.meta.get("val")
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def itemsize(self, node) -> int:
        v = node.meta.get("val")
        return v.element_size() if isinstance(v, torch.Tensor) else 4

    def nbytes(self, node) -> float:
        s = self.shape(node)
        return float(_numel(s) * self.itemsize(node)) if s is not None else 0.0

    def compute(self, node, ins: tuple, out) -> float:
        if node.target is operator.getitem or node.target in VIEWS and node.target is not aten.expand.default:
            return self.device.view_overhead
        shapes_in = []
        for n, layout in zip(node.all_input_nodes, ins):
            s = self.shape(n)
            if s is not None:
                shapes_in.append(local_shape(s, layout, self.world))
        s = self.shape(node)
        out_layout = out if isinstance(out, Layout) else R
        shape_out = local_shape(s, out_layout, self.world) if s is not None else ()
        flops = _flops(node, shapes_in, shape_out)
        v = node.meta.get("val")
        dtype = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else "float32"
        peak = self.device.peak_flops.get(dtype) or self.device.peak_flops.get("float32")
        item = self.itemsize(node)
        moved = (sum(_numel(x) for x in shapes_in) + _numel(shape_out)) * item
        return self.device.overhead + max(flops / peak, moved / self.device.bandwidth)

    def convert(self, node, src: Layout, dst: Layout) -> tuple:
        """(kind, seconds) of converting a value from ``src`` to ``dst`` (kind None: impossible;
        see :func:`~graphopt.parallel.layouts.conversion`)."""
        kind = conversion(src, dst)
        if kind is None:
            return None, 0.0
        # a regather moves what an all-gather moves (the slice after it is local)
        priced = "all_gather" if kind == "regather" else kind
        return kind, collective_time(priced, self.nbytes(node), self.world, self.link)


# -- the search ---------------------------------------------------------------------------

@dataclass
class Plan:
    """The search's result: one Step per call, the layout of every weight, totals."""

    problem: Problem
    steps: list
    weights: dict            # placeholder -> Layout
    outputs: list            # (output node, converts from layout)
    cost: float
    mem: float
    comm: float = 0.0
    notes: list = field(default_factory=list)

    def launch_free(self, device) -> float:
        """The plan's estimated time without the fixed cost per call (kernel launches, views):
        what a launch-free runtime (CUDA graphs) would approach."""
        fixed = sum(min(s.compute, device.overhead) for s in self.steps)
        return self.cost - fixed


def _tensor_arity(opdef) -> int:
    return opdef.arity - (opdef.scalar_operand is not None)


def _rule_candidates(node, table) -> list:
    """(operand layouts, rule name, target) from the sharding rules for this call."""
    from ..frontends.fx import _spellings
    from ..ops import get_op
    ins = node.all_input_nodes
    out = []
    if node.target is EMBEDDING and len(ins) == 2:
        for st in table.get("matmul", []):
            if st.rule == "vocab-embedding":
                out.append(((st.ins[1], R), st.rule, collectives.vocab_embedding))
            elif st.rule == "column":
                out.append(((st.ins[1], R), st.rule, None))
        return out
    names = [name for name, _ in _spellings().get(node.target, [])]
    for name in dict.fromkeys(names):
        if name not in table or _tensor_arity(get_op(name)) != len(ins):
            continue
        for st in table[name]:
            if len(st.ins) >= len(ins):
                out.append((st.ins[:len(ins)], st.rule, None))
    return out


def _with_blocks(layouts: tuple, node, problem) -> list:
    """A column split of a call whose result is cut into blocks (q, k, v): the same split,
    blocked, on the weight and bias operands."""
    blocks = problem.block_hints.get(node)
    if not blocks:
        return []
    shapes = [tuple(n.meta["val"].shape) for n in node.all_input_nodes]
    out = []
    new = []
    for layout, shape, n in zip(layouts, shapes, node.all_input_nodes):
        if layout.split and n in problem.weights and int(shape[layout.axis]) == sum(blocks):
            new.append(S(layout.axis, blocks))
        else:
            new.append(layout)
    if tuple(new) != tuple(layouts):
        out.append(tuple(new))
    return out


def search(problem: Problem, costs: Costs, memory_budget: float = float("inf"), beam: int = 64,
           progress=None, allow=None) -> Plan:
    """The cheapest plan found whose weights fit ``memory_budget`` bytes per rank.

    ``allow(weight placeholder, layout, rule name) -> bool`` restricts how weights may be
    split (:func:`megatron` states Megatron-LM's hand-written plan that way)."""
    table = strategies()
    check = problem.checker
    world = problem.world
    wbytes = problem.weight_bytes
    unfixed_min = sum(b / world for b in wbytes.values())
    states = [State({ph: R for ph in problem.user_inputs}, 0.0, unfixed_min)]
    calls = [n for n in problem.gm.graph.nodes if n.op == "call_function"]
    for k, (node, live) in enumerate(zip(calls, _live_after(problem.gm, calls))):
        if progress:
            progress(k, len(calls))
        new: dict = {}
        for st in states:
            for cand in _expand(st, node, problem, check, costs, table, wbytes, memory_budget, allow):
                key = cand.key(live)
                if key not in new or cand.cost < new[key].cost:
                    cand.layouts = {n: l for n, l in cand.layouts.items() if n in live or n is node}
                    new[key] = cand
        if not new:
            if memory_budget == float("inf"):
                raise GraphoptError(f"parallelize: no allowed way to run {node.name} on {world} ranks")
            raise GraphoptError(f"parallelize: no plan fits {memory_budget / 1e9:.3g} GB of weights per rank "
                                f"(at {node.name})")
        states = sorted(new.values(), key=lambda s: s.cost)[:beam]
    best, best_cost, best_out = None, float("inf"), None
    for st in states:
        total, outs = st.cost, []
        for o in problem.outputs:
            if not isinstance(o, fx.Node):
                continue
            layout = st.layouts.get(o, R)
            kind, t = costs.convert(o, layout, R)
            if kind is None:
                break
            total += t
            outs.append((o, layout))
        else:
            if total < best_cost:
                best, best_cost, best_out = st, total, outs
    if best is None:
        raise GraphoptError("parallelize: no plan returns the model's outputs whole")
    steps, cell = [], best.steps
    while cell:
        cell, step = cell
        steps.append(step)
    steps.reverse()
    weights = {}
    for step in steps:
        for ph, layout in step.fixes:
            weights[ph] = layout
    comm = sum(s.comm for s in steps) + sum(costs.convert(o, l, R)[1] for o, l in best_out)
    return Plan(problem, steps, weights, best_out, best_cost, best.mem, comm)


def _live_after(gm, calls: list) -> list:
    """For each call, the values defined so far that a later node still reads (what the
    search's state keeps), computed in one pass."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    out, live, done = [], set(), 0
    for call in calls:
        idx = pos[call]
        live.update(n for n in nodes[done:idx + 1] if last.get(n, -1) > idx)
        done = idx + 1
        live = {n for n in live if last[n] > idx}
        out.append(live)
    return out


def _expand(st: State, node, problem, check, costs, table, wbytes, budget, allow=None) -> list:
    ins = node.all_input_nodes
    world = problem.world
    if all(st.layouts.get(n, R) == R and n not in problem.weights for n in ins):   # all replicated
        return [_advance(st, node, tuple(R for _ in ins), Outcome(R), (), (), costs, wbytes, world)]
    if node.target is operator.getitem:
        src = st.layouts.get(ins[0], R)
        layout = src[node.args[1]] if isinstance(src, tuple) else src
        return [_advance(st, node, (src,), Outcome(layout), (), (), costs, wbytes, world, compute=0.0)]
    cur = tuple(st.layouts.get(n) for n in ins)        # None: a weight not split yet
    shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else () for n in ins]
    options: list = []
    options.append((tuple(c if c is not None else R for c in cur), "", None))
    options.append((tuple(R for _ in ins), "", None))
    for layouts, rule, target in _rule_candidates(node, table):
        options.append((layouts, rule, target))
        for blocked in _with_blocks(layouts, node, problem):
            options.append((blocked, rule, target))
    for k, c in enumerate(cur):         # replicated operands sliced to match a split one
        if isinstance(c, Layout) and c.split and not c.blocks:
            size = shapes[k][c.axis]
            options.append((tuple(S(c.axis) if d in (None, R) and len(s) >= -c.axis and s[c.axis] == size
                                  else (d if d is not None else R) for d, s in zip(cur, shapes)), "", None))
    if any(isinstance(c, Layout) and c.kind == "P" for c in cur):
        options.append((tuple(R if c == P else (c if c is not None else R) for c in cur), "", None))
    partial = [k for k, c in enumerate(cur) if c == P]
    if partial:     # partial sums reduce-scattered along any axis, the others sliced alike
        ref = shapes[partial[0]]                # (along the sequence: Megatron's sequence parallelism)
        for a in range(-len(ref), 0):
            if ref[a] % world:
                continue
            options.append((tuple(S(a) if c == P or (c in (None, R) and len(s) >= -a and s[a] == ref[a])
                                  else (c if c is not None else R) for c, s in zip(cur, shapes)), "", None))
    if len(ins) == 1 and cur[0] is None and len(shapes[0]) >= 1:
        # a weight first read by a layout call (Falcon's x @ W.T reads W.T): split on any axis,
        # its reader's check says what layout the result has
        options += [((S(a),), "", None) for a in range(-len(shapes[0]), 0) if shapes[0][a] % world == 0]
    out = []
    seen = set()
    for layouts, rule, target in options:
        if (layouts, target) in seen or len(layouts) != len(ins):
            continue
        seen.add((layouts, target))
        if not all(divisible(s, l, world) for s, l in zip(shapes, layouts)):
            continue
        converts, fixes, comm = [], [], 0.0
        ok = True
        for n, c, want in zip(ins, cur, layouts):
            if c is None:               # a weight: split as wanted, when the plan is made
                if allow is not None and not allow(n, want, rule):
                    ok = False
                    break
                fixes.append((n, want))
                continue
            if isinstance(c, tuple):
                ok = False
                break
            if c != want:
                kind, t = costs.convert(n, c, want)
                if kind is None:
                    ok = False
                    break
                converts.append((n, c, want))
                comm += t
        if not ok:
            continue
        outcome = check(node, layouts, target)
        if outcome is None:
            continue
        outcome = dataclasses.replace(outcome, rule=outcome.rule or rule)   # (memoised: not changed)
        nxt = _advance(st, node, layouts, outcome, tuple(converts), tuple(fixes), costs, wbytes, world, comm=comm)
        if nxt.mem <= budget:
            out.append(nxt)
    return out


# Megatron-LM's plan, as DeepSpeed's AutoTP applies it by layer name: these projections are
# split by columns (their biases with them), these by rows (their biases added once), the
# token embedding by vocabulary; every other weight (norms, position tables) replicated.
MEGATRON_COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "c_attn",
                   "c_fc", "query_key_value", "fc1", "fc_in", "w1", "w3", "lm_head", "head", "embed_out",
                   "dense_h_to_4h")
MEGATRON_ROW = ("o_proj", "down_proj", "c_proj", "dense", "fc2", "fc_out", "w2", "out_proj", "dense_4h_to_h")
MEGATRON_VOCAB = ("embed_tokens", "wte", "embed", "embed_in", "word_embeddings")
# key/value projections stay replicated where the key/value heads do not divide among the ranks
MEGATRON_KV = ("k_proj", "v_proj")


def megatron(problem: Problem):
    """``allow`` for :func:`search` that admits Megatron-LM's plan only."""
    def kind(ph):
        parts = problem.weights[ph][0].split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        for words, k in ((MEGATRON_COLUMN, "column"), (MEGATRON_ROW, "row"), (MEGATRON_VOCAB, "vocab")):
            if module in words:
                return k, module
        return None, module

    if not any(kind(ph)[0] for ph in problem.weights):
        raise GraphoptError("no layer has a name that Megatron-LM's plan splits (q_proj, o_proj, fc1, ...)")

    def allow(ph, layout, rule) -> bool:
        k, module = kind(ph)
        if k is None or (module in MEGATRON_KV and layout == R):
            return layout == R
        if not rule:        # a reader no rule covers (a transpose, a metadata assert): split any way
            return layout.split
        if k == "vocab":
            # (a tied LM head reads the same table by columns: the same split)
            return rule == "vocab-embedding" or (rule.endswith("column") and layout.split)
        return rule.endswith(k)
    return allow


def _advance(st, node, ins, outcome, converts, fixes, costs, wbytes, world, comm=0.0, compute=None) -> State:
    layouts = dict(st.layouts)
    mem = st.mem
    for ph, layout in fixes:
        if ph in layouts:      # the same weight twice in one call
            continue
        layouts[ph] = layout
        mem += wbytes[ph] - wbytes[ph] / world if not layout.split else 0.0
    for n, _, want in converts:
        layouts[n] = want
    layouts[node] = outcome.out
    t = costs.compute(node, ins, outcome.out) if compute is None else compute
    step = Step(node, ins, outcome, converts, fixes, t, comm)
    return State(layouts, st.cost + t + comm, mem, (st.steps, step))
