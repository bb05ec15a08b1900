"""Re-verification of a rule library (``graphopt rules verify``).

Each rule is checked again on seeds and shape instantiations it was not
generated with: the float64 reference semantics of both sides must agree, and
so must their torch lowerings in each requested dtype (with that dtype's
tolerance); optionally Z3 is run again on algebraic rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .progress import Progress
from .rules import Rule, RuleLibrary
from .verify import (FloatPlan, TOLERANCES, close, float_check, graph_symbols, instantiations,
                     random_inputs, typechecks, z3_check)


@dataclass
class VerifyReport:
    passed: int = 0
    failures: list = field(default_factory=list)


def check_rule(rule: Rule, seed: int = 12345, dtypes=("float32",), z3: bool = False) -> str | None:
    """None when the rule holds, else a one-line reason."""
    import torch

    plan = FloatPlan(seeds=(seed, seed + 1, seed + 2), shapes=3, shape_seed=seed)
    if not float_check(rule.src, rule.dst, plan):
        return "float64 reference outputs differ"
    for binding in instantiations(graph_symbols(rule.src), 2, seed, valid=lambda b: typechecks(rule.src, b)):
        src_fn, dst_fn = rule.src.to_torch(binding), rule.dst.to_torch(binding)
        env = random_inputs(rule.src, binding, seed)
        expected = rule.src.evaluate(env, "ref", binding)
        for dtype in dtypes:
            tdt = getattr(torch, dtype)
            args = [torch.from_numpy(np.asarray(env[i.name])).to(tdt) for i in rule.inputs]
            with torch.no_grad():
                a, b = src_fn(*args), dst_fn(*args)
            for x, y, ref in zip(a, b, expected):
                x, y = x.to(torch.float64).numpy(), y.to(torch.float64).numpy()
                if not close(x, y, dtype):
                    return f"torch {dtype} outputs differ at sizes {binding}"
                if not close(x, ref, dtype):
                    return f"torch {dtype} lowering disagrees with the reference at sizes {binding}"
    if z3:
        result = z3_check(rule.src, rule.dst)
        if result == "refuted":
            return "Z3 found a counterexample"
    return None


def verify_library(lib: RuleLibrary, seed: int = 12345, dtypes=("float32",), z3: bool = False,
                   progress: bool = True) -> VerifyReport:
    report = VerifyReport()
    bar = Progress("verify", len(lib), enabled=progress)
    for k, rule in enumerate(lib):
        reason = check_rule(rule, seed, dtypes, z3)
        if reason is None:
            report.passed += 1
        else:
            report.failures.append(f"{rule.id}: {reason}: {rule.summary()}")
        if (k + 1) % 200 == 0 or k + 1 == len(lib):
            bar(k + 1)
    return report


__all__ = ["check_rule", "verify_library", "VerifyReport", "TOLERANCES"]
