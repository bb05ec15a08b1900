"""Rulesets and the schedule that runs them.

A *ruleset* is a named group of rules.  The shipped ones:

===============  ==========================================  =================================
ruleset          what it holds                               where it comes from
===============  ==========================================  =================================
``canonical``    canonical forms (``alias(X) == X``, ...)    ``substitutions/canonical.rules``
``attention``    attention -> SDPA, masks, grouped queries   ``substitutions/attention.rules``
``fusion``       elementwise chains -> one kernel (GELU)     ``substitutions/fusion.rules``
``generated``    the generator's verified library            ``substitutions/default.json``
===============  ==========================================  =================================

A hand-written rule names its ruleset in its provenance (the text file's ``ruleset``
statement, by default the file's stem); a rule of a JSON library without one belongs to
``generated`` when the generator made it, else to the library's file stem.

A *schedule* is a list of :class:`Phase` s; each runs some rulesets with one engine
(:mod:`graphopt.engines`): ``greedy`` applies rules as written, left to right, at every
site until none applies (canonicalise, then fuse); ``backtracking`` is TASO's
cost-guided search over both directions of every rule.  Rulesets that no phase names
(a user's ``--rules my.rules``) join the last search phase.

Example:
    >>> plan = plan_schedule(load_rulesets(("default", "handwritten")))
    >>> [(step.phase.name, len(step.patterns)) for step in plan]
    [('canonicalise', 26), ('fuse', 77), ('search', 21760)]
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import GraphoptError
from .rules import DEFAULT_LIBRARY, Rule, RuleLibrary, load_rules

SUBSTITUTIONS = DEFAULT_LIBRARY.parent
SHIPPED = {"default": DEFAULT_LIBRARY, "handwritten": SUBSTITUTIONS / "handwritten.json"}


@dataclass(frozen=True)
class Phase:
    """One step of a schedule: run ``rulesets`` with ``engine``."""

    name: str
    engine: str        # a name in graphopt.engines.ENGINES
    rulesets: tuple

    @staticmethod
    def of(spec) -> "Phase":
        if isinstance(spec, Phase):
            return spec
        try:
            name, engine, rulesets = spec
        except (TypeError, ValueError):
            raise GraphoptError(f"a schedule phase is (name, engine, rulesets), got {spec!r}") from None
        return Phase(str(name), str(engine), (rulesets,) if isinstance(rulesets, str) else tuple(rulesets))


DEFAULT_SCHEDULE = (
    Phase("canonicalise", "greedy", ("canonical",)),
    Phase("fuse", "greedy", ("attention", "fusion")),
    Phase("search", "backtracking", ("generated",)),
)


# -- loading rulesets ------------------------------------------------------------------------

# the sharding rules (tensor parallelism) are read by graphopt.parallel, not by the
# single-device optimizer
SHARDING_RULES = "parallel.rules"


def hand_written_sources() -> list:
    """The shipped text rule files of the optimizer, in name order."""
    return sorted(p for p in SUBSTITUTIONS.glob("*.rules") if p.name != SHARDING_RULES)


def compile_hand_written(paths=None) -> RuleLibrary:
    """Parse and verify the shipped ``.rules`` files (or ``paths``) into one library: what
    ``graphopt rules compile`` writes to ``substitutions/handwritten.json``."""
    from .rulelang import load_rule_file
    paths = list(paths) if paths is not None else hand_written_sources()
    rules, sources, meta = [], {}, {}
    for path in paths:
        lib = load_rule_file(path)
        rules.extend(lib.rules)
        sources.update(lib.meta.get("sources", {}))
        meta.setdefault("float_plan", lib.meta.get("float_plan"))
    meta = {"description": "hand-written rules, compiled from substitutions/*.rules by `graphopt rules compile`",
            "sources": sources, **meta}
    out = RuleLibrary(meta=meta)
    for r in rules:
        if not out.add(r):
            raise GraphoptError(f"rule {r.name or r.id} ({r.provenance.get('file')}:{r.provenance.get('line')}) "
                                f"is the same rule as {out[r.id].name or r.id}")
    return out


def _source_hashes(lib: RuleLibrary) -> dict:
    root = SUBSTITUTIONS.parent
    now = {}
    for rel in lib.meta.get("sources", {}):
        path = root / rel if not Path(rel).is_absolute() else Path(rel)
        now[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return now


def stale_sources(lib: RuleLibrary) -> list:
    """The text sources of a compiled library that changed since it was compiled (or that
    were added: a new ``substitutions/*.rules`` file)."""
    recorded = lib.meta.get("sources", {})
    now = _source_hashes(lib)
    changed = [rel for rel, h in now.items() if h != recorded.get(rel)]
    root = SUBSTITUTIONS.parent
    known = {str((root / rel).resolve()) for rel in recorded}
    changed += [str(p.relative_to(root)) for p in hand_written_sources() if str(p.resolve()) not in known]
    return changed


_LOADED: dict = {}


def load_source(src) -> list:
    """The rules of one source, each with its ruleset: ``[(ruleset, Rule), ...]``.

    Args:
        src: ``"default"`` (the generated library), ``"handwritten"`` (the compiled
            ``substitutions/*.rules``; compiled afresh when a text file changed since),
            a path to a ``.rules`` text file (parsed and verified), a path to a ``.json``
            library, or a :class:`RuleLibrary`.
    """
    if isinstance(src, RuleLibrary):
        return [(_ruleset_of(r, src.meta.get("ruleset"), "user"), r) for r in src.rules]
    key = str(src)
    path = SHIPPED.get(key, Path(key))
    try:
        stamp = (path.stat().st_mtime_ns, path.stat().st_size)
    except OSError:
        stamp = None
    if key in _LOADED and _LOADED[key][0] == stamp and stamp is not None and key != "handwritten":
        return _LOADED[key][1]
    if key == "handwritten":
        lib = load_rules(path, check_ids=False)
        if stale_sources(lib):  # an edited .rules file wins over its stale compiled form
            lib = compile_hand_written()
    elif path.suffix == ".rules":
        from .rulelang import load_rule_file
        lib = load_rule_file(path)
    else:
        lib = load_rules(path, check_ids=False)
    stem = "generated" if key == "default" else path.stem
    out = [(_ruleset_of(r, lib.meta.get("ruleset"), stem), r) for r in lib.rules]
    _LOADED[key] = (stamp, out)
    return out


def _ruleset_of(rule: Rule, library_ruleset, fallback: str) -> str:
    named = rule.provenance.get("ruleset") or library_ruleset
    if named:
        return str(named)
    return "generated" if rule.provenance.get("source") == "generator" else fallback


def load_rulesets(sources) -> dict:
    """``{ruleset name: [Rule, ...]}`` from the sources, in order of first appearance.  A rule
    that two sources both contain is kept once (the first)."""
    out: dict = {}
    seen: set = set()
    for src in sources:
        for name, rule in load_source(src):
            if rule.id in seen:
                continue
            seen.add(rule.id)
            out.setdefault(name, []).append(rule)
    return out


# -- the schedule ----------------------------------------------------------------------------

@dataclass
class Step:
    """A phase of the schedule, ready to run: its compiled patterns, and the ruleset each
    pattern comes from (by pattern id)."""

    phase: Phase
    patterns: list
    origin: dict


def plan_schedule(rulesets: dict, schedule=None, only=None) -> list:
    """The phases to run, each with its compiled patterns: ``[Step, ...]``.

    Args:
        rulesets: from :func:`load_rulesets`.
        schedule: phases (:class:`Phase` or ``(name, engine, rulesets)`` triples); default
            :data:`DEFAULT_SCHEDULE`.  Rulesets loaded but named by no phase join the last
            ``backtracking`` phase (or a new ``search`` phase).
        only: run only these rulesets (names); an unknown name is an error.
    """
    from .engines import ENGINES
    from .rewrite import Pattern
    from .search import compile_patterns
    phases = [Phase.of(p) for p in (schedule if schedule is not None else DEFAULT_SCHEDULE)]
    for p in phases:
        if p.engine not in ENGINES:
            raise GraphoptError(f"schedule phase {p.name!r}: unknown engine {p.engine!r} "
                                f"(known: {', '.join(sorted(ENGINES))})")
    if only is not None:
        unknown = [n for n in only if n not in rulesets]
        if unknown:
            raise GraphoptError(f"unknown ruleset(s) {', '.join(map(repr, unknown))} "
                                f"(loaded: {', '.join(rulesets) or 'none'})")
    named = {n for p in phases for n in p.rulesets}
    extra = tuple(n for n in rulesets if n not in named)
    if extra:
        searches = [k for k, p in enumerate(phases) if p.engine == "backtracking"]
        if searches:
            k = searches[-1]
            phases[k] = Phase(phases[k].name, phases[k].engine, phases[k].rulesets + extra)
        else:
            phases.append(Phase("search", "backtracking", extra))
    plan = []
    for p in phases:
        names = tuple(n for n in p.rulesets if n in rulesets and (only is None or n in only))
        patterns, origin = [], {}
        for n in names:
            rules = rulesets[n]
            # greedy phases rewrite as the rule is written; the search tries both directions
            got = [Pattern.of(r) for r in rules if r.src.nodes] if p.engine == "greedy" else compile_patterns(rules)
            patterns.extend(got)
            origin.update({q.rule_id: n for q in got})
        plan.append(Step(Phase(p.name, p.engine, names), patterns, origin))
    return plan


def without_ruleset(plan: list, name: str) -> list:
    """The plan with one ruleset taken out of every phase (e.g. ``attention`` for an ONNX
    model whose opset has no ``Attention`` operator)."""
    out = []
    for step in plan:
        if name not in step.phase.rulesets:
            out.append(step)
            continue
        phase = Phase(step.phase.name, step.phase.engine, tuple(n for n in step.phase.rulesets if n != name))
        out.append(Step(phase, [q for q in step.patterns if step.origin[q.rule_id] != name],
                        {k: v for k, v in step.origin.items() if v != name}))
    return out


_PLANS: dict = {}


def planned(opts) -> list:
    """The plan for an :class:`~graphopt.options.Options` (cached per rule sources, schedule
    and ruleset selection: compiling 25,000 patterns takes a while)."""
    sources = tuple(s if isinstance(s, RuleLibrary) else str(s) for s in opts.rules)
    stamps = []
    for s in sources:
        path = SHIPPED.get(s, Path(s)) if isinstance(s, str) else None
        try:
            stamps.append((path.stat().st_mtime_ns, path.stat().st_size) if path else None)
        except OSError:
            stamps.append(None)
        if s == "handwritten":  # its text sources decide whether the compiled form is current
            stamps.extend((q.name, q.stat().st_mtime_ns, q.stat().st_size) for q in hand_written_sources())
    key = (tuple(tuple(r.id for r in s.rules) if isinstance(s, RuleLibrary) else s for s in sources), tuple(stamps),
           repr(opts.schedule), tuple(opts.rulesets) if opts.rulesets is not None else None)
    if key not in _PLANS:
        _PLANS[key] = plan_schedule(load_rulesets(sources), opts.schedule, opts.rulesets)
    return _PLANS[key]


__all__ = ["Phase", "Step", "DEFAULT_SCHEDULE", "load_rulesets", "load_source", "plan_schedule", "planned",
           "without_ruleset", "compile_hand_written", "stale_sources", "hand_written_sources"]
