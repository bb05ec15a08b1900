"""The optimizer as the stages it runs, the same for every frontend::

    import -> canonicalise -> fuse -> search -> fold constants -> export -> verify

A frontend (torch.fx in ``optimize.py``, ONNX in ``optimize_onnx.py``) says how to import
its model into the IR, how to write the IR back, and how to run both versions; this
module does everything in between, in the same way for each.  The middle stages are
the phases of the schedule (:mod:`graphopt.schedule`): canonicalise and fuse are
greedy rulesets, search is the cost-guided engine; before them, registry ops that are
defined as other ops (``OpDef.expand``: ``linear`` is ``matmul(x, transpose(w))``, a
multi-axis ``permute`` is a chain of swaps) are expanded, so no frontend needs
canonicalisation code of its own.

On any error the original is kept, and after the export the result is run against the
original on the example inputs and fresh ones (:func:`compare_outputs`); on a
difference, too, the original is kept and the report says why.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from typing import Protocol

from . import kernels
from .dims import plain
from .errors import GraphoptError, first_line
from .explain import attention_blocks
from .options import Options
from .report import GraphReport, fused_attention
from .verify import TOLERANCES


class Frontend(Protocol):
    """What the pipeline needs from a frontend, for one model or captured graph."""

    original: object                       # returned unchanged on any fallback
    what: str                              # what the original is, for the report: "graph", "model"

    def import_graph(self):                # -> an import with ``.graph`` (IR) and ``.counts``
        ...

    def adjust(self, imp, plan: list, rep: GraphReport) -> list:  # drop what cannot be exported
        ...

    def export(self, imp, graph):          # -> the optimized artifact
        ...

    def trials(self) -> list:              # input sets to verify on (the examples first)
        ...

    def run(self, artifact, inputs) -> list:   # flat list of outputs
        ...


def optimize_with(frontend: Frontend, opts: Options, cost_model, stage=None) -> tuple:
    """Run every stage for one model; returns ``(artifact, GraphReport)``.

    The artifact is ``frontend.original`` when nothing applied, something failed, or the
    result differs from the original (the report's ``fallback`` says which).  ``stage``,
    when given, is called with the name of each stage as it starts (a progress display).
    """
    from .schedule import planned
    stage = stage or (lambda name: None)
    rep = GraphReport()
    plan = planned(opts)  # a bad rule file is the user's error, not a reason to fall back
    try:
        stage("import")
        imp = frontend.import_graph()                                   # import
        rep.nodes = len(imp.graph.nodes)
        rep.ops, rep.opaque = imp.counts["ops"], imp.counts["opaque"]
        rep.attention["blocks"] = attention_blocks(imp.graph)
        if imp.graph.hints:
            rep.sizes = {"symbols": dict(imp.graph.hints),
                         "proved": dict(Counter(g for guards in imp.graph.facts.values() for g in guards))}
        plan = frontend.adjust(imp, plan, rep)
        stage("search")
        graph = transform(imp.graph, plan, cost_model, opts, rep)       # canonicalise, fuse, search, fold
        if graph is None:
            return frontend.original, rep
        artifact = frontend.export(imp, graph)                          # export
    except Exception as e:  # noqa: BLE001  never crash the user's model: keep the original
        first = first_line(e)
        rep.fallback = f"optimisation failed ({type(e).__name__}: {first}); original {frontend.what} kept"
        if not isinstance(e, GraphoptError):
            rep.fallback += " [" + traceback.format_exc(limit=1).strip().splitlines()[-1] + "]"
        rep.cost_after = rep.cost_before
        return frontend.original, rep
    if opts.verify:                                                     # verify
        stage("verify")
        with kernels.recording() as gemms:   # (the first run of a GEMM shape measures its schedules)
            try:
                ok, diff, why = verify_against(frontend, artifact)
            except Exception as e:  # noqa: BLE001  (making the trials failed: nothing verified)
                ok, diff, why = False, float("inf"), f"the trials could not be made ({type(e).__name__}: {first_line(e)})"
        rep.max_abs_diff, rep.gemms = diff, dict(gemms)
        sizes = getattr(frontend, "trial_sizes", None)
        if rep.sizes and sizes:
            seen = []
            for k in getattr(frontend, "trials_ran", ()):
                if k < len(sizes) and sizes[k] and sizes[k] not in seen:
                    seen.append(sizes[k])
            rep.sizes["verified_at"] = seen
        if not ok:
            rep.fallback = f"verification failed: {why}; original {frontend.what} kept"
            return frontend.original, rep
    return artifact, rep


def transform(graph, plan: list, cost_model, opts: Options, rep: GraphReport):
    """The IR stages: expand registry composites, run each phase of the plan, fold constants.

    Fills in ``rep`` (costs, rules applied per phase, folded constants, fused attention).
    Returns:
        the optimised IR graph, or None when nothing was rewritten.
    """
    from .dims import refused, size_hints
    with size_hints(graph.hints):
        out = _transform(graph, plan, cost_model, opts, rep)
        if rep.sizes:   # rules that held at the example's sizes only: not applied there
            rep.sizes["not_for_every_size"] = sorted(refused())
        return out


def _transform(graph, plan: list, cost_model, opts: Options, rep: GraphReport):
    from .engines import ENGINES
    from .explain import unfused_attention
    from .rewrite import MGraph, fold_constants, to_graph
    from .search import GraphCost
    lint = opts.lint or LINT_EVERY_STAGE
    mg, _ = MGraph.from_graph(graph)
    mg.remove_dead()  # e.g. the fp32 softmax whose cast back became one softmax
    _lint(lint, mg, "import")
    cost = GraphCost(cost_model)
    rep.cost_before = cost(mg)
    applied = Counter()
    start = time.monotonic()
    mg, expanded = expand_composites(mg)
    _lint(lint, mg, "expand")
    for step in plan:
        engine = search_engine(step.phase.engine, opts)
        res = ENGINES[engine](mg, step.patterns, cost_model, opts)
        mg = res.graph
        applied.update(res.applied)
        rep.phases[step.phase.name] = {"engine": engine, "rulesets": list(step.phase.rulesets),
                                       "applied": sum(res.applied.values()), "seconds": round(res.seconds, 3),
                                       "cost_before": res.initial_cost, "cost_after": res.cost,
                                       "stopped": res.stopped_by, **({"stats": res.stats} if res.stats else {})}
        _lint(lint, mg, f"phase {step.phase.name}")
    rep.applied, rep.search_seconds = applied, time.monotonic() - start
    by_id = {p.rule_id: p for step in plan for p in step.patterns}
    rep.rewrites = {k: f"{by_id[k].lhs.expression()}  ->  {by_id[k].rhs.expression()}" for k in applied}
    rep.unfused = unfused_attention(mg)
    if not applied:  # (expanding composites alone changes nothing worth a new graph)
        rep.cost_after = rep.cost_before
        return None
    folded_graph, folded, program = fold_constants(mg, graph.constants)   # fold constants
    _lint(lint, folded_graph, "fold constants")
    rep.folded = len(folded)
    rep.attention.update(fused_attention(folded_graph))
    rep.cost_after = GraphCost(cost_model)(folded_graph)
    out = to_graph(folded_graph, graph, folded)
    out.folds = program
    out.assumed = {name for (name, _), held in mg._guard_ok.items() if held}
    return out


# the test suite sets this (tests/conftest.py): every pipeline run lints after every stage
LINT_EVERY_STAGE = False


def search_engine(engine: str, opts: Options) -> str:
    """The engine a phase runs with: a cost-guided search phase (``backtracking`` in the
    schedule) takes the one ``opts.search`` names; greedy phases stay greedy."""
    return opts.search if engine == "backtracking" else engine


def _lint(enabled: bool, mg, stage: str) -> None:
    if enabled:
        from .lint import lint_mgraph
        lint_mgraph(mg, stage)


def expand_composites(mg) -> tuple:
    """Replace every registry node whose op is defined as other ops (``OpDef.expand``)
    by those ops; returns ``(graph, how many were expanded)``."""
    from .ops import get_op
    from .ir import OPAQUE, concrete_attrs
    from .rewrite import INPUT, MNode
    todo = [nid for nid in mg.topo_order() if mg.nodes[nid].op not in (INPUT, OPAQUE)
            and get_op(mg.nodes[nid].op).expand is not None]
    if not todo:
        return mg, 0
    new, count = mg.copy(), 0
    for nid in todo:
        node = new.nodes[nid]
        steps = get_op(node.op).expand([new.type_of(v)[0] for v in node.inputs], dict(node.attrs))
        if steps is None:
            continue
        refs = []
        for op, args, attrs in steps:
            ins = tuple(refs[a[1]] if isinstance(a, tuple) else node.inputs[a] for a in args)
            opdef = get_op(op)
            types = [new.type_of(v) for v in ins]
            from .dims import Dim
            full = opdef.full_attrs(attrs)
            outs = opdef.infer_checked([tuple(Dim.of(d) for d in s) for s, _ in types], [dt for _, dt in types], full)
            outs = tuple((tuple(plain(d) for d in s), dt) for s, dt in outs)
            mnode = MNode(op, ins, tuple(sorted(concrete_attrs(tuple(full.items()), None).items())), outs,
                          after=node.after)
            refs.append((new.add_node(mnode, intern=not node.after), 0))
        if new.type_of(refs[-1]) != node.outs[0]:
            raise GraphoptError(f"internal error: the expansion of {node.op} changes its type")
        _carry_mask_facts(new, node, refs)
        new.replace_uses((nid, 0), refs[-1])
        new.remove_dead({nid})
        new.redirect_after({nid}, {r[0] for r in refs})
        count += 1
    return new, count


def _carry_mask_facts(mg, node, refs) -> None:
    """A boolean mask proved causal (or all-kept) for every size: the additive mask its
    ``fill_masked`` expands to (``mask_bias``) is then proved ``causal`` (``zeros``) too."""
    if node.op != "fill_masked" or len(refs) < 2:
        return
    polarity = "keep" if dict(node.attrs).get("keep", True) else "drop"
    for kind in ("causal", "zeros"):
        if f"{kind}-{polarity}" in mg.facts.get(node.inputs[1], ()):
            mg.facts.setdefault(refs[0], set()).add(kind)


def verify_against(frontend: Frontend, artifact) -> tuple:
    """Run the original and the artifact on every trial input set; ``(ok, max |diff|, why)``."""
    worst = 0.0
    frontend.trials_ran = ran = []   # which trials both ran (a trial the original rejects is none)
    for k, inputs in enumerate(frontend.trials()):
        if inputs is None:
            continue
        try:
            expected = frontend.run(frontend.original, inputs)
        except Exception as e:  # noqa: BLE001  a random trial the model itself rejects (an index
            if k == 0:              # out of range) is no evidence; the example inputs must run
                return False, float("inf"), f"the original raised {type(e).__name__} on the example inputs"
            continue
        try:
            got = frontend.run(artifact, inputs)
        except Exception as e:  # noqa: BLE001
            first = first_line(e)
            return False, float("inf"), f"running the optimised model raised {type(e).__name__}: {first}"
        try:
            ok, diff, why = compare_outputs(expected, got)
        except Exception as e:  # noqa: BLE001  (outputs of a kind it cannot compare: not verified)
            return False, float("inf"), f"cannot compare the outputs ({type(e).__name__}: {e})"
        worst = max(worst, diff)
        ran.append(k)
        if not ok:
            return False, worst, why
    return True, worst, None


def compare_outputs(expected: list, got: list) -> tuple:
    """Compare two flat lists of outputs (torch tensors, numpy arrays or python values):
    ``(ok, max |diff|, why)``.

    Shapes and dtypes must match, integer and boolean outputs exactly, floating ones within
    the dtype's tolerance (:data:`graphopt.verify.TOLERANCES`, relative to the largest
    magnitude of the expected output).  Equal infinities are equal; a NaN is equal only
    to a NaN at the same place (a NaN where the original has none is a difference), and
    so is an infinity.

    Example:
        >>> compare_outputs([torch.tensor([1.0, float("inf")])], [torch.tensor([1.0, float("inf")])])
        (True, 0.0, None)
    """
    import numpy as np
    import torch
    if len(expected) != len(got):
        return False, float("inf"), f"{len(got)} outputs instead of {len(expected)}"
    worst = 0.0
    for k, (x, y) in enumerate(zip(expected, got)):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = _as_tensor(x), _as_tensor(y)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if type(x) is not type(y) or x != y:
                return False, float("inf"), f"output {k}: a non-tensor output differs ({y!r} != {x!r})"
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("inf"), (f"output {k}: type {tuple(y.shape)} {y.dtype} "
                                         f"!= {tuple(x.shape)} {x.dtype}")
        if not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                return False, float("inf"), f"output {k}: an integer output differs"
            continue
        if x.numel() == 0:
            continue
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        d, largest, finite = _float_difference(x.detach().reshape(-1), y.detach().reshape(-1))
        if not finite:
            return False, float("inf"), f"output {k}: non-finite values where the original has others"
        worst = max(worst, d)
        rtol, atol = TOLERANCES.get(str(x.dtype).replace("torch.", ""), TOLERANCES["float32"])
        if d > (atol + rtol) * max(1.0, largest):
            return False, worst, f"output {k}: max |diff| {d:.3g} exceeds the {x.dtype} tolerance"
    return True, worst, None


COMPARE_CHUNK = 1 << 22     # elements compared at a time (a 50k-word vocabulary's logits are 51M)


def _float_difference(a, b) -> tuple:
    """``(max |a - b| where they differ, max |a| over its finite values, finite)`` of two flat
    float tensors, in chunks (widened exactly: half precision to float32, the rest to float64).
    ``finite`` is False when either has a non-finite value where the other differs."""
    import torch
    wide = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else torch.float64
    d = largest = 0.0
    for i in range(0, a.numel(), COMPARE_CHUNK):
        x = a[i:i + COMPARE_CHUNK].to("cpu", wide)
        y = b[i:i + COMPARE_CHUNK].to("cpu", wide)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        if not bool((torch.isfinite(x) | same).all()) or not bool((torch.isfinite(y) | same).all()):
            return float("inf"), largest, False
        d = max(d, float((x - y).abs().masked_fill_(same, 0.0).max()))
        largest = max(largest, float(x.abs().masked_fill_(~torch.isfinite(x), 0.0).max()))
    return d, largest, True


def _as_tensor(v):
    import numpy as np
    import torch
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


__all__ = ["optimize_with", "transform", "expand_composites", "compare_outputs", "verify_against", "Frontend"]
