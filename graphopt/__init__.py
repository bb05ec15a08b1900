"""graphopt: a TASO-style computation-graph superoptimizer for PyTorch.

Example:
    >>> import graphopt
    >>> lib = graphopt.load_rules()                 # the shipped default library
    >>> rule = lib[lib.rules[0].id]
    >>> src_fn, dst_fn, specs = rule.as_torch()     # plain torch callables
"""
__version__ = "0.1.0"

from .errors import GraphoptError, RuleFormatError, ShapeError, UnknownOpError  # noqa: E402
from .ir import Graph  # noqa: E402
from .rules import Rule, RuleLibrary, load_rules  # noqa: E402
from .optimize import OptimizedModule, optimize, register as _register  # noqa: E402
from .report import Report  # noqa: E402
from .optimize_onnx import onnx_report, optimize_onnx  # noqa: E402
from .parallel.plan import ParallelPlan, parallelize, plan_parallel  # noqa: E402

_register()  # torch.compile(model, backend="graphopt")

__all__ = ["optimize", "optimize_onnx", "parallelize", "plan_parallel", "ParallelPlan", "onnx_report", "OptimizedModule", "Report", "load_rules", "Rule", "RuleLibrary", "Graph", "GraphoptError", "RuleFormatError",
           "ShapeError", "UnknownOpError", "__version__"]
