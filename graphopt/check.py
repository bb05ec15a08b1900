"""Re-verification of a rule library (``graphopt rules verify``).

Each rule is checked again on seeds and shape instantiations it was not
generated with: the float64 reference semantics of both sides must agree, and
so must their torch lowerings in each requested dtype (with that dtype's
tolerance); optionally Z3 is run again on algebraic rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .progress import Progress
from .rules import Rule, RuleLibrary
from .verify import TOLERANCES, FloatPlan, verify_rule


@dataclass
class VerifyReport:
    passed: int = 0
    failures: list = field(default_factory=list)


def check_rule(rule: Rule, seed: int = 12345, dtypes=("float32",), z3: bool = False) -> str | None:
    """None when the rule holds, else a one-line reason (the counterexample)."""
    plan = FloatPlan(seeds=(seed, seed + 1, seed + 2), shapes=3, shape_seed=seed)
    verdict = verify_rule(rule.src, rule.dst, plan, z3=z3, torch_dtypes=tuple(dtypes))
    return None if verdict.passed else verdict.counterexample


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
