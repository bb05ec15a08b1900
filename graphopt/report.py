"""What the optimizer did, per captured graph and in total, as data (``to_json``) and as
text (``str``); the torch and the ONNX paths fill in the same report."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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
    unfused: list = field(default_factory=list)  # why each attention block left alone was (graphopt.explain)
    notes: list = field(default_factory=list)  # why something was not done (e.g. an ONNX opset too old)
    phases: dict = field(default_factory=dict)  # schedule phase -> {"engine", "rulesets", "applied", "seconds"}
    op_counts: dict = field(default_factory=dict)  # "before"/"after" -> {torch op: calls} (torch frontend)
    runtime: object = field(default=None, repr=False, compare=False)  # what runs (graphopt.runtime), with .stats
    gemms: dict = field(default_factory=dict)  # GEMM shape -> the schedule graphopt.kernels measured for it
    # a graph with symbolic sizes: {"symbols": {name: example value}, "proved": {guard: masks},
    # "verified_at": [{name: size}, ...]}
    sizes: dict = field(default_factory=dict)


# the registry's fused attention ops
FUSED_ATTENTION = ("sdpa", "sdpa_masked", "sdpa_sink", "sdpa_sink_masked")


def fused_attention(mg) -> Counter:
    """Fused attention calls in a rewritten graph: how many, causal, masked, grouped-query,
    with a sink."""
    out = Counter()
    for n in mg.nodes.values():
        if n.op in FUSED_ATTENTION:
            attrs = dict(n.attrs)
            out["fused"] += 1
            out["causal"] += bool(attrs.get("is_causal"))
            out["masked"] += n.op.endswith("_masked")
            out["gqa"] += bool(attrs.get("enable_gqa"))
            out["sink"] += n.op.startswith("sdpa_sink")
    return out


@dataclass
class Report:
    """What graphopt did: per captured graph, and in total."""

    graphs: list = field(default_factory=list)
    total_seconds: float = 0.0   # capture + search + verification, for optimize()
    calls: dict | None = None    # how the calls so far ran (OptimizedModule.stats())

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
    def phases(self) -> dict:
        """Per schedule phase, summed over the graphs: sites rewritten and seconds."""
        out: dict = {}
        for g in self.graphs:
            for name, p in g.phases.items():
                q = out.setdefault(name, {"engine": p["engine"], "rulesets": p["rulesets"],
                                          "applied": 0, "seconds": 0.0})
                q["applied"] += 0 if g.fallback else p["applied"]
                q["seconds"] = round(q["seconds"] + p["seconds"], 3)
                if p.get("stats"):
                    q.setdefault("graph_stats", []).append(p["stats"])
                    q["stopped"] = p.get("stopped")
        return out

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
        return {k: total[k] for k in ("blocks", "fused", "causal", "masked", "gqa", "sink")}

    @property
    def attention_reasons(self) -> dict:
        """Why the attention blocks that were not fused were not: ``{reason: blocks}``."""
        out: Counter = Counter()
        for g in self.graphs:
            if g.fallback:
                if g.attention["blocks"]:
                    out[g.fallback] += g.attention["blocks"]
                continue
            out.update(g.unfused)
            missing = g.attention["blocks"] - g.attention["fused"] - len(g.unfused)
            if missing > 0:   # (a softmax the rewrite removed without fusing it: none known)
                out["a softmax was removed without being fused"] += missing
        return dict(out.most_common())

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
            "attention_not_fused": self.attention_reasons,
            "gemms": {k: v for g in self.graphs if not g.fallback for k, v in g.gemms.items()},
            "phases": self.phases,
            "notes": self.notes,
            "fallbacks": self.fallbacks,
            "symbolic_sizes": [g.sizes for g in self.graphs if g.sizes],
            **({"calls": {k: v for k, v in self.calls.items() if k != "graphs"}} if self.calls else {}),
        }

    def __str__(self) -> str:
        return format_report(self.to_json())


def format_report(j: dict, title: str | None = None) -> str:
    """The report as text, from its JSON form (:meth:`Report.to_json`; an ONNX model's
    stored report has the same form)."""
    head = title or f"{j['graphs']} graph(s)"
    lines = [f"graphopt: {head}, {j['ops']} ops modelled, {j['opaque']} opaque",
             f"  cost (model)   {j['cost_before_s'] * 1e3:.4f} ms -> {j['cost_after_s'] * 1e3:.4f} ms",
             f"  rewriting      {j['search_seconds']:.2f} s (all phases); {j['folded_constants']} constants folded"]
    for name, p in (j.get("phases") or {}).items():
        lines.append(f"  phase          {name}: {p['engine']} over {', '.join(p['rulesets']) or 'no ruleset'}, "
                     f"{p['applied']} site(s) rewritten, {p['seconds']:.2f} s")
        for st in p.get("graph_stats") or ([p["stats"]] if p.get("stats") else []):
            if st.get("engine") != "egraph":
                continue
            lines.append(f"  e-graph        {st['blocks']} block(s), {st['distinct_blocks']} saturated "
                         f"({st['improved_blocks']} cheaper); largest {st['max_enodes']} e-nodes in "
                         f"{st['max_eclasses']} classes, {st['rules']} rules, {st['iterations']} iteration(s); "
                         f"stopped: {', '.join(f'{k} x{v}' for k, v in st['stopped'].items())}; extraction: "
                         + (", ".join(f"{k} x{v}" for k, v in st["extraction"].items()) or "none"))
    if j["rules_applied"]:
        lines.append("  rules applied  (id + forward, - backward; sites rewritten)")
        for k, v in j["rules_applied"].items():
            lines.append(f"    {k} x{v}: {j['rewrites'].get(k, '')}")
    else:
        lines.append("  rules applied  none")
    a = j["attention"]
    if a["blocks"] or a["fused"]:
        lines.append(f"  attention      {a['fused']} of {a['blocks']} blocks fused into SDPA "
                     f"({a['causal']} is_causal, {a['masked']} with an explicit mask, {a['gqa']} grouped-query"
                     + (f", {a['sink']} with a sink" if a.get("sink") else "") + ")")
        for why, n in (j.get("attention_not_fused") or {}).items():
            lines.append(f"  not fused      {n} block(s): {why}")
    for what, c in (j.get("gemms") or {}).items():
        lines.append(f"  GEMM schedule  {what}: {c['schedule']}, {c['ms']:.3g} ms (plain call {c['plain_ms']:.3g} ms)")
    lines.append(f"  verified       max |diff| {j['max_abs_diff']:.3g}")
    for sz in j.get("symbolic_sizes") or ():
        names = ", ".join(f"{k} (example {v})" for k, v in sz["symbols"].items())
        proved = ", ".join(f"{n} {g}" for g, n in sz.get("proved", {}).items()) or "nothing"
        at = "; ".join(", ".join(f"{k}={v}" for k, v in b.items()) for b in sz.get("verified_at", ()))
        lines.append(f"  sizes          symbolic: {names}; masks proved for every size: {proved}; "
                     f"verified at {len(sz.get('verified_at', ()))} size(s): {at or 'none'}")
        refused = sz.get("not_for_every_size") or []
        if refused:
            lines.append(f"  sizes          {len(refused)} rule size condition(s) held at the example's sizes "
                         f"but not for every size, not applied: {', '.join(refused[:4])}"
                         + (" ..." if len(refused) > 4 else ""))
    for n in j["notes"]:
        lines.append(f"  note           {n}")
    for f in j["fallbacks"]:
        lines.append(f"  FALLBACK       {f}")
    calls = j.get("calls")
    if calls and calls["calls"]:
        lines.append(f"  calls          {calls['calls']}: {calls['optimized']} ran the optimised graph"
                     + "".join(f"; {n} the original: {why}" for why, n in calls["original"].items()))
    return "\n".join(lines)


__all__ = ["GraphReport", "Report", "format_report", "fused_attention"]
