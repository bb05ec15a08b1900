"""The optimizer's options, shared by every frontend (``graphopt.optimize``, the
``torch.compile`` backend, ``graphopt.optimize_onnx`` and the CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import GraphoptError


# the search engine of Options() when none is given (the test suite's --search sets it)
DEFAULT_SEARCH = "egraph"


def _default_search() -> str:
    return DEFAULT_SEARCH


@dataclass
class Options:
    # rule sources: shipped library names ("default": the generated rules, "handwritten": the
    # compiled substitutions/*.rules), or paths of .json libraries and .rules files
    rules: tuple = ("default", "handwritten")
    rulesets: tuple | None = None               # run only these rulesets (default: every one loaded)
    schedule: tuple | None = None               # phases (see graphopt.schedule); default DEFAULT_SCHEDULE
    cost_model: str = "roofline"
    device: str | None = None                   # cost-model device; default: where the inputs live
    # engine of the search phases: "egraph" (equality saturation, the default: never a costlier
    # graph than TASO's search in benchmarks/bench_search.py, and 3-20x faster), "backtracking"
    # (TASO's) or "hybrid" (egraph, then backtracking); see graphopt.engines, BENCHMARKS.md
    search: str = field(default_factory=_default_search)
    alpha: float = 1.05
    budget: int = 100
    time_limit: float = 10.0
    verify: bool = True
    verify_trials: int = 2
    inductor: bool = False                      # hand the result on to inductor
    seed: int = 0
    lint: bool = False                          # check the IR after every stage (the test suite does)

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
        from .engines import ENGINES
        if opts.search not in ENGINES or opts.search == "greedy":
            raise GraphoptError(f"unknown search engine {opts.search!r} (known: "
                                f"{', '.join(sorted(k for k in ENGINES if k != 'greedy'))})")
        if isinstance(opts.rules, str):
            opts.rules = (opts.rules,)
        if isinstance(opts.rulesets, str):
            opts.rulesets = (opts.rulesets,)
        return opts


__all__ = ["Options"]
