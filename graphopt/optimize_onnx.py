"""``graphopt.optimize_onnx``: the ONNX frontend of the pipeline (:mod:`graphopt.pipeline`),
with the same rulesets, schedule and cost models as for torch.

Import (``frontends/onnx``), the pipeline's stages, write back (``backends/onnx``), check
with ``onnx.checker`` (full check), and run the optimised model against the original in
onnxruntime on random inputs of the declared shapes.  On any error or mismatch the
original model is returned and the report says why.  Fused attention is written as the
standard ONNX ``Attention`` operator, which needs opset 23: below that, the attention
ruleset is not in the schedule and the report says so.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .errors import GraphoptError
from .options import Options
from .report import Report

REPORT_KEY = "graphopt.report"


def optimize_onnx(model, opset: int | None = None, **options):
    """Optimise an ONNX model (a path or a ModelProto).

    Args:
        model: path to a ``.onnx`` file, or an ``onnx.ModelProto``.
        opset: convert to this opset first (``onnx.version_converter``); default:
            keep the model's.
        **options: as for :func:`graphopt.optimize` (``cost_model``, ``time_limit``,
            ``verify``, ``rules``, ...).
    Returns:
        a ModelProto; what was done is in its ``metadata_props`` (read it with
        :func:`onnx_report`).
    Raises:
        GraphoptError: a file that is missing, corrupt, not ONNX, lacks its external
        data, or an unsupported opset.
    """
    from .frontends.onnx import convert_opset, load_model
    from .schedule import planned
    opts = Options.of(options)
    planned(opts)  # load (and verify) the rules first: a bad rule file is an error, not a fallback
    start = time.monotonic()
    original = load_model(model)
    if original is model:  # never modify the caller's model (the report goes into metadata)
        import onnx
        original = onnx.ModelProto.FromString(model.SerializeToString())
    if opset is not None:
        original = convert_opset(original, opset)
    result, rep = _optimize(original, opts)
    report = Report([rep], total_seconds=time.monotonic() - start)
    _attach(result, report)
    return result


def onnx_report(model) -> dict:
    """The report :func:`optimize_onnx` stored in a model's metadata (JSON dict)."""
    for prop in model.metadata_props:
        if prop.key == REPORT_KEY:
            return json.loads(prop.value)
    raise GraphoptError("the model has no graphopt report")


def _attach(model, report: Report) -> None:
    for k in range(len(model.metadata_props) - 1, -1, -1):
        if model.metadata_props[k].key == REPORT_KEY:
            del model.metadata_props[k]
    entry = model.metadata_props.add()
    entry.key, entry.value = REPORT_KEY, json.dumps(report.to_json())


# the sizes a dynamic axis is verified at besides 2 (and the size it is costed at)
DYNAMIC_SIZES = (1, 5, 11)
MIXED_SIZES = (3, 7, 2, 9)


class OnnxFrontend:
    """The pipeline's view of an ONNX model (see :mod:`graphopt.pipeline`)."""

    what = "model"

    def __init__(self, model, opts: Options):
        self.original, self.opts = model, opts
        self._sessions: dict = {}

    def import_graph(self):
        from .frontends.onnx import import_onnx
        return import_onnx(self.original)

    def adjust(self, imp, plan, rep):
        """Fused attention is written as ONNX's ``Attention``, which needs opset 23: below
        that, the attention ruleset is not in the schedule."""
        from .schedule import without_ruleset
        if imp.opset >= 23:
            return plan
        if rep.attention["blocks"]:
            rep.notes.append(f"attention not fused: the model's opset is {imp.opset}; ONNX's Attention "
                             f"operator needs opset 23 (pass --opset 23 to convert)")
        return without_ruleset(plan, "attention")

    def export(self, imp, graph):
        import onnx
        from .backends.onnx import export_onnx
        result = export_onnx(imp, graph)
        onnx.checker.check_model(result, full_check=True)
        return result

    def trials(self) -> list:
        """Random inputs of the declared shapes; a model with dynamic axes is also tried with
        them at other sizes (1, 5, 11, and the size they are costed at)."""
        from .frontends.onnx import SYMBOL_HINT, dynamic_axes
        trials = [random_inputs(self.original, seed=self.opts.seed + t) for t in range(1 + self.opts.verify_trials)]
        symbols = sorted(dynamic_axes(self.original))
        self.trial_sizes = [{s: 2 for s in symbols}] * len(trials) if symbols else []
        if symbols:
            for k, size in enumerate(DYNAMIC_SIZES + (SYMBOL_HINT,)):
                trials.append(random_inputs(self.original, seed=self.opts.seed + 100 + k, dynamic=size))
                self.trial_sizes.append({s: size for s in symbols})
            if len(symbols) > 1:   # the symbols at different sizes (a rewrite wrong only when batch != seq)
                mixed = {s: MIXED_SIZES[k % len(MIXED_SIZES)] for k, s in enumerate(symbols)}
                trials.append(random_inputs(self.original, seed=self.opts.seed + 200, dynamic=mixed))
                self.trial_sizes.append(mixed)
        return trials

    def run(self, model, feeds) -> list:
        key = id(model)
        if key not in self._sessions:
            try:
                self._sessions[key] = (model, session(model))
            except ImportError:
                raise GraphoptError("onnxruntime is not installed (pip install onnxruntime)") from None
        return list(self._sessions[key][1].run(None, feeds))


def _optimize(original, opts: Options):
    from cost_models import get_cost_model
    from .pipeline import optimize_with
    cost_model = get_cost_model(opts.cost_model, device=opts.device or "cpu")
    return optimize_with(OnnxFrontend(original, opts), opts, cost_model)


_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_}


def random_inputs(model, seed: int = 0, dynamic: int | dict = 2) -> dict:
    """Inputs of the declared shapes (a symbolic dimension gets ``dynamic``, or
    ``dynamic[dim_param]`` for a dict, 2 where it has none): floats from a
    normal distribution, integers in [0, 16) (valid token ids and indices), random bools."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = _NUMPY.get(tt.elem_type)
        if dtype is None:
            raise GraphoptError(f"input {vi.name!r}: element type {tt.elem_type} is not supported for verification")
        shape = [d.dim_value if d.HasField("dim_value") else
                 (dynamic.get(d.dim_param, 2) if isinstance(dynamic, dict) else dynamic) for d in tt.shape.dim]
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[vi.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            feeds[vi.name] = rng.integers(0, 16, size=shape).astype(dtype)
    return feeds


def session(model):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def verify_onnx(original, optimized, opts: Options):
    """Run both in onnxruntime on random inputs; (ok, max |diff|, why)."""
    from .pipeline import verify_against
    frontend = OnnxFrontend(original, opts)
    try:
        frontend.run(optimized, frontend.trials()[0])
    except GraphoptError as e:
        return False, float("inf"), str(e)
    except Exception as e:  # noqa: BLE001
        return False, float("inf"), f"onnxruntime cannot run the optimised model ({str(e).strip().splitlines()[0]})"
    return verify_against(frontend, optimized)


__all__ = ["optimize_onnx", "onnx_report", "verify_onnx", "random_inputs"]
