"""``graphopt.optimize`` and the ``"graphopt"`` torch.compile backend.

Per captured graph (Dynamo hands one per graph break): import it into the IR
(unknown ops stay opaque), run the cost-guided search with the rule
libraries, fold constant-only subgraphs (e.g. a concatenated weight after a
merge), write the result back as a GraphModule and, with ``verify`` (the
default), compare it with the original on the example inputs and on fresh
random inputs of the same shapes.  On any mismatch or error the original graph
is used and the report says why: the optimizer never returns a module that
computes something else.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch

from .errors import GraphoptError
from .verify import TOLERANCES


@dataclass
class Options:
    rules: tuple = ("default", "handwritten")   # library paths, or the names of shipped ones
    cost_model: str = "roofline"
    device: str | None = None                   # cost-model device; default: where the inputs live
    alpha: float = 1.05
    budget: int = 100
    time_limit: float = 10.0
    verify: bool = True
    verify_trials: int = 2
    inductor: bool = False                      # hand the result on to inductor
    seed: int = 0

    @staticmethod
    def of(options) -> "Options":
        if isinstance(options, Options):
            return options
        opts = Options()
        for k, v in dict(options or {}).items():
            if not hasattr(opts, k):
                raise GraphoptError(f"unknown graphopt option {k!r} (known: {', '.join(opts.__dataclass_fields__)})")
            setattr(opts, k, v)
        if opts.alpha < 1.0:
            raise GraphoptError(f"alpha must be >= 1.0, got {opts.alpha}")
        if opts.budget < 0 or opts.time_limit < 0:
            raise GraphoptError("budget and time_limit must be >= 0")
        return opts


@dataclass
class GraphReport:
    nodes: int = 0
    ops: int = 0
    opaque: int = 0
    cost_before: float = 0.0
    cost_after: float = 0.0
    applied: Counter = field(default_factory=Counter)
    rewrites: dict = field(default_factory=dict)   # pattern id -> "lhs  ->  rhs"
    search_seconds: float = 0.0
    folded: int = 0
    max_abs_diff: float = 0.0
    fallback: str | None = None
    attention: Counter = field(default_factory=Counter)  # blocks / fused / causal / masked / gqa
    notes: list = field(default_factory=list)  # why something was not done (e.g. an ONNX opset too old)


def _attention_blocks(imp) -> int:
    """Softmax calls in the captured graph, in any spelling: the attention blocks to fuse."""
    from .ir import OPAQUE
    from .ops import get_op
    from .ir import node_ref
    targets = {t for form in get_op("softmax").fx for t in form.targets}
    used = {r for node in imp.graph.nodes for r in node.inputs} | set(imp.graph.outputs)
    n = 0
    for idx, node in enumerate(imp.graph.nodes):
        if node.op == "softmax":
            n += 1
        elif node.op == OPAQUE and node_ref(idx, 0, len(node.outs)) in used:  # (an fp32 upcast whose
            # cast back became a softmax of its own is not used any more)
            fx_node = imp.graph.payloads[idx].node
            target = f"method:{fx_node.target}" if fx_node.op == "call_method" else fx_node.target
            try:
                n += target in targets
            except TypeError:
                pass
    return n


def _fused_attention(mg) -> Counter:
    out = Counter()
    for n in mg.nodes.values():
        if n.op in ("sdpa", "sdpa_masked"):
            attrs = dict(n.attrs)
            out["fused"] += 1
            out["causal"] += bool(attrs.get("is_causal"))
            out["masked"] += n.op == "sdpa_masked"
            out["gqa"] += bool(attrs.get("enable_gqa"))
    return out


@dataclass
class Report:
    """What graphopt did: per captured graph, and in total."""

    graphs: list = field(default_factory=list)
    total_seconds: float = 0.0   # capture + search + verification, for optimize()

    @property
    def notes(self) -> list:
        return [n for g in self.graphs for n in g.notes]

    @property
    def applied(self) -> Counter:
        total = Counter()
        for g in self.graphs:
            if not g.fallback:
                total.update(g.applied)
        return total

    @property
    def rewrites(self) -> dict:
        out = {}
        for g in self.graphs:
            out.update(g.rewrites)
        return out

    @property
    def cost_before(self) -> float:
        return sum(g.cost_before for g in self.graphs)

    @property
    def cost_after(self) -> float:
        return sum(g.cost_before if g.fallback else g.cost_after for g in self.graphs)

    @property
    def search_seconds(self) -> float:
        return sum(g.search_seconds for g in self.graphs)

    @property
    def fallbacks(self) -> list:
        return [g.fallback for g in self.graphs if g.fallback]

    @property
    def max_abs_diff(self) -> float:
        return max((g.max_abs_diff for g in self.graphs), default=0.0)

    @property
    def attention(self) -> dict:
        total = Counter()
        for g in self.graphs:
            total["blocks"] += g.attention["blocks"]
            if not g.fallback:
                total.update({k: v for k, v in g.attention.items() if k != "blocks"})
        return {k: total[k] for k in ("blocks", "fused", "causal", "masked", "gqa")}

    def to_json(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "ops": sum(g.ops for g in self.graphs),
            "opaque": sum(g.opaque for g in self.graphs),
            "rules_applied": dict(sorted(self.applied.items())),
            "rewrites": {k: self.rewrites.get(k, "") for k in sorted(self.applied)},
            "cost_before_s": self.cost_before,
            "cost_after_s": self.cost_after,
            "search_seconds": round(self.search_seconds, 3),
            "folded_constants": sum(g.folded for g in self.graphs),
            "max_abs_diff": self.max_abs_diff,
            "attention": self.attention,
            "notes": self.notes,
            "fallbacks": self.fallbacks,
        }

    def __str__(self) -> str:
        return format_report(self.to_json())


def format_report(j: dict, title: str | None = None) -> str:
    """The report as text, from its JSON form (:meth:`Report.to_json`; an ONNX model's
    stored report has the same form)."""
    head = title or f"{j['graphs']} graph(s)"
    lines = [f"graphopt: {head}, {j['ops']} ops modelled, {j['opaque']} opaque",
             f"  cost (model)   {j['cost_before_s'] * 1e3:.4f} ms -> {j['cost_after_s'] * 1e3:.4f} ms",
             f"  search         {j['search_seconds']:.2f} s; {j['folded_constants']} constants folded"]
    if j["rules_applied"]:
        lines.append("  rules applied  (id + forward, - backward; sites rewritten)")
        for k, v in j["rules_applied"].items():
            lines.append(f"    {k} x{v}: {j['rewrites'].get(k, '')}")
    else:
        lines.append("  rules applied  none")
    a = j["attention"]
    if a["blocks"] or a["fused"]:
        lines.append(f"  attention      {a['fused']} of {a['blocks']} blocks fused into SDPA "
                     f"({a['causal']} is_causal, {a['masked']} with an explicit mask, {a['gqa']} grouped-query)")
    lines.append(f"  verified       max |diff| {j['max_abs_diff']:.3g}")
    for n in j["notes"]:
        lines.append(f"  note           {n}")
    for f in j["fallbacks"]:
        lines.append(f"  FALLBACK       {f}")
    return "\n".join(lines)

_PATTERN_CACHE: dict = {}


def _patterns(rule_sources) -> list:
    from .rules import DEFAULT_LIBRARY, load_rules
    from .search import compile_patterns
    key = tuple(str(s) for s in rule_sources)
    if key not in _PATTERN_CACHE:
        rules = []
        for src in rule_sources:
            if hasattr(src, "rules"):
                rules.extend(src.rules)
                continue
            path = DEFAULT_LIBRARY.parent / f"{src}.json" if src in ("default", "handwritten") else src
            rules.extend(load_rules(path, check_ids=False).rules)
        _PATTERN_CACHE[key] = compile_patterns(rules)
    return _PATTERN_CACHE[key]


def _cost_model(opts: Options, example_inputs):
    from cost_models import get_cost_model
    device = opts.device
    if device is None:
        dev = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        device = "cpu" if dev.type == "cpu" else _gpu_name()
    return get_cost_model(opts.cost_model, device=device)


def _gpu_name() -> str:
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return "h100"


class Backend:
    """A torch.compile backend that optimises each captured graph; keeps the reports
    and the optimised GraphModules."""

    def __init__(self, options=None):
        self.options = Options.of(options)
        self.report = Report()
        self.modules: list = []

    def __call__(self, gm, example_inputs, **kwargs):
        opts = self.options if not kwargs.get("options") else Options.of(kwargs["options"])
        out, rep = optimize_graph_module(gm, example_inputs, opts)
        self.report.graphs.append(rep)
        self.modules.append(out)
        if opts.inductor:
            from torch._inductor.compile_fx import compile_fx
            run, original = compile_fx(out, example_inputs), gm
        else:
            run, original = out, gm
        if out is gm or not any(_is_buffer(n) for n in gm.graph.nodes if n.op == "placeholder"):
            return run
        return BufferGuard(run, original, gm, example_inputs)


def optimize_graph_module(gm, example_inputs, opts: Options):
    """Optimise one captured GraphModule; returns (module to run, GraphReport)."""
    from .backends.fx import export_fx
    from .frontends.fx import import_fx
    rep = GraphReport()
    try:
        imp = import_fx(gm, example_inputs, constant_inputs=_parameters(gm, example_inputs))
        rep.nodes = len(imp.graph.nodes)
        rep.ops, rep.opaque = imp.counts["ops"], imp.counts["opaque"]
        rep.attention["blocks"] = _attention_blocks(imp)
        cost_model = _cost_model(opts, example_inputs)
        result = search_and_fold(imp.graph, _patterns(opts.rules), cost_model, opts, rep)
        if result is None:
            return gm, rep
        new_gm = export_fx(imp, result)
    except Exception as e:  # never crash the user's model: keep the original graph
        rep.fallback = f"optimisation failed ({type(e).__name__}: {e}); original graph kept"
        rep.cost_after = rep.cost_before
        if not isinstance(e, GraphoptError):
            rep.fallback += " [" + traceback.format_exc(limit=1).strip().splitlines()[-1] + "]"
        return gm, rep
    if opts.verify:
        ok, diff, why = _verify(gm, new_gm, example_inputs, opts)
        rep.max_abs_diff = diff
        if not ok:
            rep.fallback = f"verification failed: {why}; original graph kept"
            return gm, rep
    return new_gm, rep


def search_and_fold(graph, patterns, cost_model, opts: Options, rep: GraphReport):
    """The part every frontend shares: search, then fold constant subgraphs.

    Fills in ``rep`` (costs, rules applied, folded constants, fused attention).
    Returns:
        the optimised IR graph, or None when no rule applied.
    """
    from .rewrite import MGraph, fold_constants, to_graph
    from .search import GraphCost, search
    mg, _ = MGraph.from_graph(graph)
    mg.remove_dead()  # e.g. the fp32 softmax whose cast back became one softmax
    res = search(mg, patterns, cost_model, alpha=opts.alpha, budget=opts.budget, time_limit=opts.time_limit)
    rep.cost_before, rep.cost_after = res.initial_cost, res.cost
    rep.applied, rep.search_seconds = res.applied, res.seconds
    by_id = {p.rule_id: p for p in patterns}
    rep.rewrites = {k: f"{by_id[k].lhs.expression()}  ->  {by_id[k].rhs.expression()}" for k in res.applied}
    if not res.applied:
        return None
    folded_graph, folded = fold_constants(res.graph, graph.constants)
    rep.folded = len(folded)
    rep.attention.update(_fused_attention(folded_graph))
    rep.cost_after = GraphCost(cost_model)(folded_graph)
    return to_graph(folded_graph, graph, folded)


def _parameters(gm, example_inputs) -> dict:
    """Placeholders whose values are known: nn.Parameters (Dynamo lifts a module's weights
    to inputs) and the module's buffers that the graph does not write to (a causal mask
    registered with ``register_buffer``).  Subgraphs of them only are precomputed, and
    guarded rules read them (is this mask causal?).  Buffers can change between calls, so
    the optimised graph only runs while they are unchanged (:class:`BufferGuard`)."""
    from .frontends.fx import mutated_roots
    written = mutated_roots(gm)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {ph: t for ph, t in zip(phs, example_inputs)
            if isinstance(t, torch.nn.Parameter) or (_is_buffer(ph) and ph not in written
                                                      and isinstance(t, torch.Tensor))}


def _is_buffer(ph) -> bool:
    source = getattr(ph.meta.get("grapharg"), "source", None)
    return "._buffers[" in str(getattr(source, "name", ""))


class BufferGuard:
    """Runs the optimised graph while the buffers it read as constants are unchanged (the
    same tensors, not written since: their version counters say so, at no cost), and the
    original graph otherwise."""

    def __init__(self, fast, original, gm, example_inputs):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.fast, self.original = fast, original
        self.guarded = [(k, t, t._version) for k, (ph, t) in enumerate(zip(phs, example_inputs))
                        if _is_buffer(ph) and isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
        self.snapshots = [t.detach().clone() for _, t, _ in self.guarded]
        self.fallbacks = 0

    def __call__(self, *args):
        for (k, t, version), snap in zip(self.guarded, self.snapshots):
            a = args[k]
            if (a is not t or a._version != version) and not (
                    a.shape == snap.shape and a.dtype == snap.dtype and torch.equal(a, snap)):
                self.fallbacks += 1
                return self.original(*args)
        return self.fast(*args)


def _verify(original, optimized, example_inputs, opts: Options):
    """Compare on the example inputs and on fresh random float inputs of the same shapes."""
    gen = torch.Generator().manual_seed(opts.seed)
    example_inputs = [_hint(x) for x in example_inputs]
    trials = [list(example_inputs)]
    buffers = [_is_buffer(n) for n in original.graph.nodes if n.op == "placeholder"]
    for _ in range(opts.verify_trials):
        fresh = []
        for t, is_buffer in zip(example_inputs, buffers):
            if isinstance(t, torch.nn.Parameter) or is_buffer or not isinstance(t, torch.Tensor) or t.numel() == 0:
                fresh.append(t)
            elif t.is_floating_point():
                r = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype).to(t.device)
                fresh.append(r * (t.float().std().item() if t.numel() > 1 else 1.0))
            elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                # e.g. token ids: fresh values within the range seen (valid indices)
                lo, hi = int(t.min()), int(t.max()) + 1
                fresh.append(torch.randint(lo, hi, t.shape, generator=gen, dtype=t.dtype).to(t.device))
            else:
                fresh.append(t)
        trials.append(fresh)
    worst = 0.0
    # module state the graph writes to (a static KV cache): put back after every trial run
    from .frontends.fx import fetch_attr, mutated_roots
    state = [fetch_attr(original, n.target) for n in mutated_roots(original) if n.op == "get_attr"]
    saved = [t.clone() for t in state]
    with torch.no_grad():
        for args in trials:
            try:  # on copies: a graph may update its inputs in place (a KV cache, a position counter)
                a = original(*_copies(args))
                _restore(state, saved)
                b = optimized(*_copies(args))
                _restore(state, saved)
            except Exception as e:
                return False, float("inf"), f"the optimised graph raised {type(e).__name__}: {e}"
            fa, fb = _flatten(a), _flatten(b)
            if len(fa) != len(fb):
                return False, float("inf"), "different number of outputs"
            for x, y in zip(fa, fb):
                if not isinstance(x, torch.Tensor):
                    if x != y:
                        return False, float("inf"), "a non-tensor output differs"
                    continue
                if x.shape != y.shape or x.dtype != y.dtype:
                    return False, float("inf"), f"output type {tuple(y.shape)} {y.dtype} != {tuple(x.shape)} {x.dtype}"
                if not x.is_floating_point():
                    if not torch.equal(x, y):
                        return False, float("inf"), "an integer output differs"
                    continue
                diff = (x.double() - y.double()).abs()
                d = float(diff.max()) if diff.numel() else 0.0
                worst = max(worst, d)
                rtol, atol = TOLERANCES.get(str(x.dtype).replace("torch.", ""), TOLERANCES["float32"])
                scale = max(1.0, float(x.double().abs().max()) if x.numel() else 0.0)
                if not torch.isfinite(y).all() and torch.isfinite(x).all():
                    return False, worst, "non-finite values appeared"
                if d > atol * scale + rtol * scale:
                    return False, worst, f"max |diff| {d:.3g} exceeds the {x.dtype} tolerance"
    return True, worst, None


def _hint(x):
    """A symbolic size (Dynamo passes them for dynamic shapes) as the int it stands for now,
    read without installing a guard (``int()`` would specialise the graph)."""
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)
        if hint is None:
            raise GraphoptError("a symbolic size has no example value to verify with")
        return int(hint)
    return x


def _restore(state, saved) -> None:
    with torch.no_grad():
        for t, s in zip(state, saved):
            t.copy_(s)


def _copies(args) -> list:
    return [t.clone() if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) else t
            for t in args]


def _flatten(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    if isinstance(x, dict):
        return [y for k in sorted(x) for y in _flatten(x[k])]
    return [x]


class OptimizedModule(torch.nn.Module):
    """The optimised model: same call signature, and ``.report``."""

    def __init__(self, model, compiled, backend: Backend):
        super().__init__()
        self._original = [model]    # a list: not registered as a submodule twice
        self._compiled = compiled
        self._backend = backend

    @property
    def report(self) -> Report:
        return self._backend.report

    @property
    def graph_modules(self) -> list:
        """The optimised GraphModules, one per captured graph."""
        return list(self._backend.modules)

    def forward(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)


def optimize(model, example_inputs, capture: str = "dynamo", **options) -> OptimizedModule:
    """Optimise a torch module (or function) for the given example inputs.

    Args:
        model: an ``nn.Module`` or callable; it is not modified.
        example_inputs: a tuple of positional inputs (a single tensor is accepted).
        capture: ``"dynamo"`` (torch.compile's graph capture; graph breaks are fine)
            or ``"export"`` (``torch.export``: one whole graph, or an error).
        **options: see :class:`Options` (``rules``, ``cost_model``, ``alpha``,
            ``budget``, ``time_limit``, ``verify``, ``inductor``, ``seed``).
    Returns:
        a module with the same call signature whose ``.report`` says which rules
        were applied, the cost before and after, and the search time.

    Example:
        >>> fast = graphopt.optimize(model, (x,))
        >>> y = fast(x)
        >>> print(fast.report)
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    backend = Backend(options)
    start = time.monotonic()
    if capture == "export":
        try:
            gm = torch.export.export(model, example_inputs).module()
        except Exception as e:
            raise GraphoptError(f"torch.export could not capture the model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); try capture='dynamo'") from None
        compiled = backend(gm, list(example_inputs))
    elif capture == "dynamo":
        compiled = torch.compile(model, backend=backend, dynamic=False)
        # Dynamo caches compiled code per code object: many models of one class (or one
        # wrapper) would hit its recompile limit and silently run eagerly; raise it for
        # this capture (later calls only look up what was compiled)
        limits = {k: max(getattr(torch._dynamo.config, k), 4096) for k in
                  ("recompile_limit", "accumulated_recompile_limit") if hasattr(torch._dynamo.config, k)}
        with torch.no_grad(), torch._dynamo.config.patch(**limits):
            compiled(*example_inputs)   # capture and optimise now, not at the first user call
        if not backend.report.graphs:
            raise GraphoptError("Dynamo captured no graph of the model (it runs eagerly); try capture='export'")
    else:
        raise GraphoptError(f"unknown capture {capture!r} (dynamo or export)")
    backend.report.total_seconds = time.monotonic() - start
    return OptimizedModule(model, compiled, backend)


def graphopt_backend(gm, example_inputs, options=None):
    """The function registered as ``torch.compile(backend="graphopt")``."""
    backend = Backend(options)
    out = backend(gm, example_inputs)
    LAST_REPORTS.append(backend.report)
    del LAST_REPORTS[:-16]
    return out


LAST_REPORTS: list = []   # reports of recent torch.compile(backend="graphopt") graphs


def register() -> None:
    from torch._dynamo import list_backends, register_backend
    if "graphopt" not in list_backends(exclude_tags=()):
        register_backend(graphopt_backend, name="graphopt")
