"""``graphopt.optimize_onnx``: the same search, rules and cost models on an ONNX model.

Import (``frontends/onnx``), search, fold constants, write back
(``backends/onnx``), check with ``onnx.checker`` (full check), and run the
optimised model against the original in onnxruntime on random inputs of the
declared shapes.  On any error or mismatch the original model is returned and
the report says why.  Fused attention is written as the standard ONNX
``Attention`` operator, which needs opset 23: below that, attention rules are
not used and the report says so.
"""
from __future__ import annotations

import json
import time
import traceback

import numpy as np

from .errors import GraphoptError
from .optimize import GraphReport, Options, Report, _patterns, search_and_fold

REPORT_KEY = "graphopt.report"
_ATTENTION_OPS = ("sdpa", "sdpa_masked")


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
    opts = Options.of(options)
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


def _optimize(original, opts: Options):
    import onnx

    from .backends.onnx import export_onnx
    from .frontends.onnx import import_onnx

    rep = GraphReport()
    try:
        imp = import_onnx(original)
        rep.nodes, rep.ops, rep.opaque = len(imp.graph.nodes), imp.counts["ops"], imp.counts["opaque"]
        rep.attention["blocks"] = sum(1 for n in imp.model.graph.node if n.op_type == "Softmax")
        patterns = _patterns(opts.rules)
        if imp.opset < 23:
            patterns = [p for p in patterns if not any(n.op in _ATTENTION_OPS for n in p.rhs.nodes)]
            if rep.attention["blocks"]:
                rep.notes.append(f"attention not fused: the model's opset is {imp.opset}; ONNX's Attention "
                                 f"operator needs opset 23 (pass --opset 23 to convert)")
        from cost_models import get_cost_model
        cost_model = get_cost_model(opts.cost_model, device=opts.device or "cpu")
        graph = search_and_fold(imp.graph, patterns, cost_model, opts, rep)
        if graph is None:
            return original, rep
        result = export_onnx(imp, graph)
        onnx.checker.check_model(result, full_check=True)
    except Exception as e:  # noqa: BLE001  never hand back a broken model: keep the original
        rep.fallback = f"optimisation failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); original model kept"
        if not isinstance(e, GraphoptError):
            rep.fallback += " [" + traceback.format_exc(limit=1).strip().splitlines()[-1] + "]"
        rep.cost_after = rep.cost_before
        return original, rep
    if opts.verify:
        ok, diff, why = verify_onnx(original, result, opts)
        rep.max_abs_diff = diff
        if not ok:
            rep.fallback = f"verification failed: {why}; original model kept"
            return original, rep
    return result, rep


_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_}


def random_inputs(model, seed: int = 0, dynamic: int = 2) -> dict:
    """Inputs of the declared shapes (a symbolic dimension gets ``dynamic``): floats from a
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
        shape = [d.dim_value if d.HasField("dim_value") else dynamic for d in tt.shape.dim]
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
    from .verify import TOLERANCES
    try:
        a_sess, b_sess = session(original), session(optimized)
    except ImportError:
        return False, float("inf"), "onnxruntime is not installed (pip install onnxruntime)"
    except Exception as e:  # noqa: BLE001
        return False, float("inf"), f"onnxruntime cannot load the optimised model ({str(e).strip().splitlines()[0]})"
    worst = 0.0
    for trial in range(1 + opts.verify_trials):
        feeds = random_inputs(original, seed=opts.seed + trial)
        try:
            a, b = a_sess.run(None, feeds), b_sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            return False, float("inf"), f"onnxruntime failed: {str(e).strip().splitlines()[0]}"
        for x, y in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or x.dtype != y.dtype:
                return False, float("inf"), f"output type {y.shape} {y.dtype} != {x.shape} {x.dtype}"
            if not np.issubdtype(x.dtype, np.floating):
                if not np.array_equal(x, y):
                    return False, float("inf"), "an integer output differs"
                continue
            d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
            worst = max(worst, d)
            rtol, atol = TOLERANCES.get(x.dtype.name, TOLERANCES["float32"])
            scale = max(1.0, float(np.max(np.abs(x), initial=0.0)))
            if not np.isfinite(d) or d > (atol + rtol) * scale:
                return False, worst, f"max |diff| {d:.3g} exceeds the {x.dtype.name} tolerance"
    return True, worst, None


__all__ = ["optimize_onnx", "onnx_report", "verify_onnx", "random_inputs"]
