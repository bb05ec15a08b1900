"""ONNX ModelProto -> IR Graph.

Shapes come from ONNX shape inference; initializers (and ``Constant`` nodes) are
constants.  A node becomes an IR operator when the op registry has an ONNX
spelling for it (``OpDef.onnx``) that accepts the node; every other node,
control flow with subgraphs included, is an *opaque* node that keeps its
NodeProto and is written back unchanged.  Tensors whose shapes are not static
flow only through opaque nodes.

The importer only spells operators: a ``Transpose`` of more than two axes is the
registry's ``permute``, ``Identity``, ``Dropout`` at inference and a cast to the same
type are its ``alias``; the pipeline's canonical forms (``graphopt.ops.forms`` and the
``canonical`` ruleset) do the rest, the same as for torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..dims import from_expression, plain
from ..errors import GraphoptError, first_line
from ..ir import Graph
from ..ops import REGISTRY
from .fx import _unique

MIN_OPSET = 13

_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32",
         5: "int16", 3: "int8", 2: "uint8", 9: "bool"}


@dataclass
class OnnxPayload:
    """How to write one node the IR does not model back: its NodeProto, and which of its
    inputs are the IR node's inputs (the others keep their names)."""

    node: object
    tracked: list          # positions in node.input of the IR inputs, in order
    implicit: list = field(default_factory=list)  # outer names its subgraphs read (IR inputs after tracked)
    pure: bool = False  # no side effects: dropped when its value is no longer used

    def run(self, args):
        raise GraphoptError("an opaque ONNX node cannot run outside onnxruntime")


@dataclass
class OnnxImport:
    graph: Graph
    model: object                              # the (shape-inferred) ModelProto imported
    ref_of: dict = field(default_factory=dict)  # ONNX tensor name -> IR ref
    opset: int = 0
    counts: dict = field(default_factory=dict)


def load_model(src):
    """A ModelProto from a path or a ModelProto, checked; raises GraphoptError naming the problem."""
    import onnx
    if isinstance(src, onnx.ModelProto):
        model, where = src, "model"
    else:
        path = os.fspath(src)
        where = path
        if not os.path.isfile(path):
            raise GraphoptError(f"{path}: no such file")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001  (protobuf raises several kinds)
            raise GraphoptError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
        if not model.graph.node and not model.graph.output:
            raise GraphoptError(f"{path}: not an ONNX model (no graph)")
        try:
            from onnx.external_data_helper import load_external_data_for_model
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as e:  # noqa: BLE001  (onnx raises ValidationError or OSError)
            missing = [x.value for t in _external_tensors(model) for x in t.external_data if x.key == "location"]
            where_data = ", ".join(sorted(set(missing))) or getattr(e, "filename", None) or "?"
            raise GraphoptError(f"{path}: missing or unreadable external data ({where_data})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        first = first_line(e, type(e).__name__)
        raise GraphoptError(f"{where}: invalid ONNX model: {first}") from None
    opset = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise GraphoptError(f"{where}: opset {opset} is not supported (graphopt reads {MIN_OPSET} to {newest})")
    return model


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model, opset: int):
    import onnx
    from onnx import version_converter
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise GraphoptError(f"--opset {opset} is not supported (choose {MIN_OPSET} to {newest})")
    if opset == default_opset(model):
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # noqa: BLE001
        first = first_line(e, type(e).__name__)
        raise GraphoptError(f"cannot convert the model from opset {default_opset(model)} to {opset}: {first}") from None


class _Ctx:
    def __init__(self, imp, types, consts, out_shapes, producers=None):
        self.imp, self.types, self.consts, self.out_shapes = imp, types, consts, out_shapes
        self.opset = imp.opset
        self.producers = producers or {}

    def producer(self, name):
        """The node that computes ``name`` (op_type, inputs, attrs), or None."""
        node = self.producers.get(name)
        if node is None:
            return None
        import onnx
        return node.op_type, list(node.input), {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def shape(self, name):
        t = self.types.get(name)
        return None if t is None else t[0]

    def dtype(self, name):
        t = self.types.get(name)
        return None if t is None else t[1]

    def const(self, name):
        v = self.consts.get(name)
        return None if v is None else v


def _types(model) -> dict:
    """name -> (static shape tuple or None, dtype name) from shape inference."""
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        dtype = _ELEM.get(tt.elem_type)
        if dtype is None or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else from_expression(d.dim_param) if d.dim_param
                else None for d in tt.shape.dim]
        out[vi.name] = (None if any(d is None for d in dims) else tuple(dims), dtype)
    for init in g.initializer:
        dtype = _ELEM.get(init.data_type)
        if dtype:
            out[init.name] = (tuple(init.dims), dtype)
    return out


# the size a symbolic axis (a dim_param) is costed at: ONNX gives no example value
SYMBOL_HINT = 128


def dynamic_axes(model) -> dict:
    """dim_param of the model's inputs -> [(input name, axis), ...] where it occurs."""
    out: dict = {}
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and not d.HasField("dim_value"):
                out.setdefault(d.dim_param, []).append((vi.name, k))
    return out


def _symbolic_shapes(model):
    """Shapes with the dynamic axes propagated as expressions of the inputs' dim_params
    (``seq``, ``4*seq``) through Reshape, Shape and Concat: onnxruntime's symbolic shape
    inference (the maintained tool for it); the plain inference's shapes when it fails."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        import contextlib, io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
        return inferred if inferred is not None else model
    except Exception:  # noqa: BLE001  (an op it does not know: those sizes stay unknown)
        return model


def _outer_names(node) -> list:
    """Names a node's subgraphs read from the enclosing graph."""
    import onnx
    names: list = []

    def visit(graph, bound):
        bound = set(bound) | {i.name for i in graph.input} | {i.name for i in graph.initializer}
        for n in graph.node:
            for x in n.input:
                if x and x not in bound and x not in names:
                    names.append(x)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    visit(sub, bound)
            bound |= set(n.output)
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            visit(sub, set())
    return names


def import_onnx(model) -> OnnxImport:
    import onnx
    from onnx import numpy_helper
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never modify the caller's
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise GraphoptError(f"ONNX shape inference failed: {str(e).strip().splitlines()[0]}") from None
    symbols = dynamic_axes(model)
    if symbols:
        model = _symbolic_shapes(model)
    g_in = model.graph
    imp = OnnxImport(Graph(), model, opset=default_opset(model), counts={"ops": 0, "opaque": 0})
    g, types = imp.graph, _types(model)
    g.hints = {name: SYMBOL_HINT for name in symbols}
    consts: dict = {}
    names: set = set()
    for init in g_in.initializer:
        value = numpy_helper.to_array(init)
        consts[init.name] = value
        t = types.get(init.name)
        if t is not None:
            imp.ref_of[init.name] = g.add_external(_unique(init.name, names), t[0], t[1],
                                                   value=torch.from_numpy(np.array(value)))
    for vi in g_in.input:
        if vi.name in imp.ref_of:
            continue
        t = types.get(vi.name)
        if t is not None and t[0] is not None:
            imp.ref_of[vi.name] = g.add_external(_unique(vi.name, names), t[0], t[1])
    spell: dict = {}  # op_type -> [(op name, parse)], the highest priority first (then registry order)
    forms = [(-f.priority, k, op.name, f) for k, (op, f) in
             enumerate((op, f) for op in REGISTRY.values() for f in op.onnx)]
    for _, _, name, form in sorted(forms, key=lambda x: x[:2]):
        spell.setdefault(form.op_type, []).append((name, form.parse))
    producers = {o: n for n in g_in.node for o in n.output}
    folded = fold_literals(g_in, consts, imp.opset)
    users = {x for n in g_in.node if not all(o in folded for o in n.output) for x in n.input}
    users |= {o.name for o in g_in.output}
    for node in g_in.node:
        if node.output and all(o in folded for o in node.output):
            for o in node.output:  # computed now; a constant for whoever reads it
                value = folded[o]
                consts[o] = value
                types[o] = (tuple(value.shape), _ELEM_BY_NUMPY.get(value.dtype.name))
                if o in users and types[o][1] is not None:
                    imp.ref_of[o] = g.add_external(_unique(o, names), value.shape, types[o][1],
                                                   value=torch.from_numpy(np.array(value)))
            imp.counts["folded"] = imp.counts.get("folded", 0) + 1
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain in ("", "ai.onnx") and node.op_type == "Constant" and "value" in attrs:
            value = numpy_helper.to_array(attrs["value"])
            consts[node.output[0]] = value
            dtype = _ELEM.get(attrs["value"].data_type)
            if dtype:
                imp.ref_of[node.output[0]] = g.add_external(_unique(node.output[0], names), value.shape, dtype,
                                                            value=torch.from_numpy(np.array(value)))
                continue
        if node.domain in ("", "ai.onnx") and _registry_op(imp, node, attrs, types, consts, spell, names, producers):
            imp.counts["ops"] += 1
            continue
        _opaque(imp, node, types)
    g.outputs = [imp.ref_of[o.name] for o in g_in.output if o.name in imp.ref_of]
    return imp


_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
           "Bernoulli", "Dropout")
MAX_FOLD_NUMEL = 1 << 26


def fold_literals(graph, consts: dict, opset: int) -> dict:
    """Values computed from literals alone (scalars and what is computed from them, not
    weights), and integer/boolean values computed from any constants: the attention
    mask a large export computes from ``Range``/``Where`` nodes.  Evaluated with
    ``onnx.reference``; a node it cannot run is left alone.  Returns name -> value."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    literal = {k for k, v in consts.items() if v.size <= 1}
    values: dict = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        ins = [x for x in node.input if x]
        if not all(x in consts or x in values for x in ins):
            continue
        from_literals = all(x in literal or x in values for x in ins)
        try:
            fn = ReferenceEvaluator(onnx.helper.make_model(
                onnx.helper.make_graph([node], "fold", [onnx.helper.make_tensor_value_info(x, 0, None) for x in ins],
                                       [onnx.helper.make_tensor_value_info(o, 0, None) for o in node.output]),
                opset_imports=[onnx.helper.make_opsetid("", opset)]))
            outs = fn.run(None, {x: values[x] if x in values else consts[x] for x in ins})
        except Exception:  # noqa: BLE001  (an op the reference cannot run: leave it to run time)
            continue
        outs = [np.asarray(v) for v in outs]
        if any(v.size > MAX_FOLD_NUMEL for v in outs):
            continue
        if not from_literals and any(np.issubdtype(v.dtype, np.floating) for v in outs):
            continue  # of a weight: left to the search
        for o, v in zip(node.output, outs):
            values[o] = v
    return values


def _registry_op(imp, node, attrs, types, consts, spell, names, producers) -> bool:
    candidates = spell.get(node.op_type)
    outs = [types.get(o) for o in node.output]
    if not candidates or any(t is None or t[0] is None for t in outs):
        return False
    if any(x and x not in imp.ref_of for x in node.input):
        return False
    ctx = _Ctx(imp, types, consts, [t[0] for t in outs], producers)
    g = imp.graph
    for op_name, parse in candidates:
        try:
            parsed = parse([x for x in node.input], attrs, ctx)
        except (TypeError, ValueError, KeyError, IndexError):
            parsed = None
        if parsed is None:
            continue
        args, op_attrs = parsed
        refs = []
        for a in args:
            if isinstance(a, np.ndarray):
                dtype = _ELEM_BY_NUMPY.get(a.dtype.name)
                if dtype is None:
                    break
                refs.append(g.add_external(_unique(f"{node.output[0]}_const", names), a.shape, dtype,
                                           value=torch.from_numpy(np.array(a))))
            else:
                refs.append(imp.ref_of[a])
        else:
            mark = len(g.nodes)
            try:
                out = g.add(op_name, *refs, **op_attrs)
            except GraphoptError:
                del g.nodes[mark:]
                continue
            out_refs = out if isinstance(out, tuple) else (out,)
            got = [(tuple(plain(d) for d in s), dt) for s, dt in (g.type_of(r) for r in out_refs)]
            if got != [tuple(t) for t in outs]:
                del g.nodes[mark:]
                continue
            for name, r in zip(node.output, out_refs):
                imp.ref_of[name] = r
            return True
    return False


_ELEM_BY_NUMPY = {name: name for name in _ELEM.values() if name != "bfloat16"}  # numpy has no bfloat16


def _opaque(imp, node, types):
    imp.counts["opaque"] += 1
    tracked = [k for k, x in enumerate(node.input) if x and x in imp.ref_of]
    implicit = [x for x in _outer_names(node) if x in imp.ref_of]
    ins = [imp.ref_of[node.input[k]] for k in tracked] + [imp.ref_of[x] for x in implicit]
    outs = [types.get(o) for o in node.output]
    typed = all(t is not None and t[0] is not None for t in outs) and all(node.output)
    payload = OnnxPayload(node, tracked, implicit, pure=typed and node.op_type not in _RANDOM)
    refs = imp.graph.add_opaque(payload, ins, [t for t in outs] if typed else [])
    if typed:
        for name, r in zip(node.output, refs if isinstance(refs, tuple) else (refs,)):
            imp.ref_of[name] = r


__all__ = ["import_onnx", "load_model", "convert_opset", "OnnxImport", "OnnxPayload", "default_opset"]
