"""The rule generator pipeline: enumerate -> fingerprint buckets -> structural
pruning -> float verification -> Z3 proofs -> renaming dedupe -> RuleLibrary.

Every stage's counts are collected in ``stats`` and stored in the library's
metadata, so a library says how it was made.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import __version__
from .enumerate import DEFAULT_OPS, EnumConfig, decode, default_inputs, enumerate_graphs
from .errors import GraphoptError
from .ir import Input
from .ops import get_op
from .progress import Progress
from .prune import candidate_pairs, dedupe_by_renaming, representatives
from .rules import Rule, RuleLibrary
from .verify import TOLERANCES, FloatPlan, verify_rule


@dataclass
class GenerateSettings:
    max_ops: int = 4
    ops: tuple = DEFAULT_OPS
    inputs: tuple = field(default_factory=default_inputs)
    seed: int = 0
    float_seeds: int = 3
    float_shapes: int = 2
    z3: bool = True
    z3_timeout_ms: int = 2000
    max_outputs: int = 2
    # a rule whose sides have more ops than this together is not kept: at depth 4 the
    # 4->4 pairs are most of the candidates and, in our samples, compositions of smaller rules
    max_rule_ops: int = 7

    def validate(self):
        if not 1 <= self.max_ops <= 6:
            raise GraphoptError(f"--max-ops must be between 1 and 6, got {self.max_ops}")
        if self.seed < 0:
            raise GraphoptError(f"--seed must be >= 0, got {self.seed}")
        if self.max_rule_ops < 2:
            raise GraphoptError(f"--max-rule-ops must be >= 2, got {self.max_rule_ops}")
        if self.z3_timeout_ms <= 0:
            raise GraphoptError(f"--z3-timeout must be > 0, got {self.z3_timeout_ms}")
        if not self.ops:
            raise GraphoptError("the op set is empty")
        for op in self.ops:
            if get_op(op).enum_attrs is None:
                raise GraphoptError(f"op {op!r} cannot be enumerated (its attributes need concrete sizes)")
        if self.float_seeds < 3 or self.float_shapes < 2:
            raise GraphoptError("float verification needs at least 3 seeds and 2 shape instantiations")
        if not any(len(i.shape) for i in self.inputs):
            raise GraphoptError("the input set needs at least one tensor of rank >= 1")

    def plan(self) -> FloatPlan:
        return FloatPlan(seeds=tuple(range(self.seed * 100 + 1, self.seed * 100 + 1 + self.float_seeds)),
                         shapes=self.float_shapes)

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = [i.to_json() for i in self.inputs]
        d["ops"] = list(self.ops)
        plan = self.plan()
        d["float_plan"] = {"dtype": "float64", "tolerance": list(TOLERANCES["float64"]),
                           "seeds": list(plan.seeds), "shapes": plan.shapes}
        return d


def _used_inputs(records, inputs) -> list:
    names = {r for rec in records for _, _, ins in rec.nodes for r in ins}
    return [i for i in inputs if i.name in names]


def _verify_bucket(records, settings: GenerateSettings, stats: Counter) -> list:
    """All rules a bucket yields, after structural pruning and verification."""
    m = len(records)
    stats["candidate_pairs"] += m * (m - 1) // 2
    reps = representatives(records)
    stats["pruned_same_top"] += m * (m - 1) // 2 - len(reps) * (len(reps) - 1) // 2
    pairs, common, independent = candidate_pairs(reps)
    stats["pruned_common_subgraph"] += common
    stats["pruned_side_by_side"] += independent
    small = [(i, j) for i, j in pairs if reps[i].num_ops + reps[j].num_ops <= settings.max_rule_ops]
    stats["pruned_rule_size"] += len(pairs) - len(small)
    pairs = small
    if not pairs:
        return []
    plan = settings.plan()
    graphs, cache = {}, {}
    rules = []
    for i, j in pairs:
        # the bigger graph is the source: applying a rule forward simplifies
        a, b = (i, j) if (reps[i].num_ops, reps[i].nodes) > (reps[j].num_ops, reps[j].nodes) else (j, i)
        inputs = _used_inputs([reps[a], reps[b]], settings.inputs)
        key = tuple(x.name for x in inputs)
        for k in (a, b):
            if (k, key) not in graphs:
                graphs[(k, key)] = decode(reps[k], inputs)
        src, dst = graphs[(a, key)], graphs[(b, key)]
        stats["float_tested"] += 1
        verdict = verify_rule(src, dst, plan, z3=settings.z3, z3_timeout_ms=settings.z3_timeout_ms,
                              fingerprint=True, cache=cache)
        if not verdict.evidence["float"]["passed"]:
            stats["float_refuted"] += 1
            continue
        stats["float_verified"] += 1
        z3_result = verdict.evidence["z3"]
        stats[f"z3_{z3_result.replace('-', '_')}"] += 1
        if not verdict.passed:
            continue
        evidence = verdict.evidence  # seeds, shapes and tolerance of the float plan: in "generator"
        provenance = {"source": "generator", "seed": settings.seed}
        rules.append(Rule(src, dst, evidence, provenance))
    return rules


def _verify_chunk(args):
    chunk, settings = args
    stats: Counter = Counter()
    rules = []
    for records in chunk:
        rules.extend(_verify_bucket(records, settings, stats))
    return stats, rules


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)


def generate(settings: GenerateSettings, workers: int = 0, progress: bool = True, log=None) -> RuleLibrary:
    """Run the whole generator and return the verified, pruned rule library.

    Args:
        settings: depth, op set, inputs, seeds.
        workers: processes (0 = all cores).
        progress: print progress bars to stderr.
        log: optional callable receiving one line per finished stage.
    """
    settings.validate()
    if not 0 <= workers <= 256:
        raise GraphoptError(f"--workers must be between 0 (all cores) and 256, got {workers}")
    workers = workers or os.cpu_count() or 1
    say = log or (lambda line: None)
    timings = {}
    t0 = time.monotonic()
    cfg = EnumConfig(max_ops=settings.max_ops, ops=tuple(settings.ops), inputs=tuple(settings.inputs),
                     seed=settings.seed, max_outputs=settings.max_outputs)
    enum = enumerate_graphs(cfg, workers, Progress("enumerate", 1, enabled=progress))
    timings["enumerate_s"] = round(time.monotonic() - t0, 2)
    say(f"enumerated {enum.graphs} graphs ({enum.recorded} connected) into {enum.fingerprints} "
        f"fingerprint buckets; {len(enum.buckets)} buckets hold 2+ graphs [{timings['enumerate_s']}s]")

    t1 = time.monotonic()
    buckets = list(enum.buckets.values())
    n_chunks = max(1, min(len(buckets), workers * 16))
    chunks = [buckets[k::n_chunks] for k in range(n_chunks)]
    stats: Counter = Counter()
    found = []
    bar = Progress("verify", n_chunks, enabled=progress)
    if workers == 1:
        results = (_verify_chunk((c, settings)) for c in chunks)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers)
        results = pool.imap(_verify_chunk, [(c, settings) for c in chunks])
    try:
        for k, (st, rules) in enumerate(results):
            stats.update(st)
            found.extend(rules)
            bar(k + 1)
    finally:
        if pool:
            pool.close()
            pool.join()
    timings["verify_s"] = round(time.monotonic() - t1, 2)
    say(f"verified {stats['float_verified']} of {stats['float_tested']} candidate pairs by float tests "
        f"({stats['float_refuted']} refuted); Z3 proved {stats['z3_proved']} [{timings['verify_s']}s]")

    t2 = time.monotonic()
    # rules with one id differ only by renaming; keep the same one whatever the
    # scheduling of the workers: order by id, then by content
    found.sort(key=lambda r: (sum(r.size), r.id, json.dumps(r.to_json(), sort_keys=True)))
    library = RuleLibrary()
    dropped = dedupe_by_renaming(found, library)
    timings["prune_s"] = round(time.monotonic() - t2, 2)
    timings["total_s"] = round(time.monotonic() - t0, 2)
    counts = {
        "graphs_enumerated": enum.graphs,
        "graphs_bucketed": enum.recorded,
        "fingerprint_buckets": enum.fingerprints,
        "buckets_with_candidates": len(enum.buckets),
        "graphs_in_those_buckets": sum(len(b) for b in buckets),
        **{k: stats[k] for k in ("candidate_pairs", "pruned_same_top", "pruned_common_subgraph",
                                 "pruned_side_by_side", "pruned_rule_size", "float_tested",
                                 "float_refuted", "float_verified")},
        **{k: v for k, v in sorted(stats.items()) if k.startswith("z3_")},
        "pruned_renaming": dropped,
        "rules": len(library),
    }
    library.meta = {
        "graphopt_version": __version__,
        "generator": settings.to_json(),
        "stats": counts,
        "timings": {**timings, "workers": workers, "peak_rss_mb": _peak_rss_mb()},
    }
    say(f"pruned {dropped} rules equal up to renaming; {len(library)} rules "
        f"[{timings['total_s']}s total, peak memory {library.meta['timings']['peak_rss_mb']} MB]")
    return library


def parse_inputs(text: str) -> tuple:
    """Parse ``"X:a,b;Y:b,c;s:"`` into generator inputs (float32)."""
    inputs = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, dims = part.partition(":")
        if not sep or not name.isidentifier():
            raise GraphoptError(f"invalid input spec {part!r} (expected NAME:DIM,DIM,...)")
        from .dims import Dim
        try:
            shape = tuple(Dim.parse(d) for d in dims.split(",") if d.strip())
        except ValueError as e:
            raise GraphoptError(f"invalid shape in input spec {part!r}: {e}") from None
        if any(d == 0 for d in shape):
            raise GraphoptError(f"invalid shape in input spec {part!r}: zero-size dimension")
        if any(d.const > 64 or any(c > 8 for _, c in d.terms) for d in shape):
            raise GraphoptError(f"invalid shape in input spec {part!r}: the generator works with small "
                                "symbolic sizes (constants up to 64, coefficients up to 8)")
        inputs.append(Input(name, shape))
    if len({i.name for i in inputs}) != len(inputs):
        raise GraphoptError(f"duplicate input names in {text!r}")
    if not inputs:
        raise GraphoptError("no inputs given")
    return tuple(inputs)
