"""IR Graph -> ONNX ModelProto.

Registry operators are written by their ``OpDef.to_onnx``; opaque nodes are
copies of their original NodeProto with inputs renamed to wherever their values
now come from (a name a subgraph reads from the enclosing graph is kept by an
``Identity``).  Constants become initializers.  The graph keeps the original
inputs, outputs (names and order), opset imports and model-local functions.
"""
from __future__ import annotations

import numpy as np

from ..dims import Dim, plain
from ..errors import GraphoptError
from ..ir import OPAQUE, Graph, node_ref
from ..ops import get_op
from .fx import _plain


class Builder:
    """What ``OpDef.to_onnx`` writes with: nodes, constants, and the shapes of values."""

    def __init__(self, graph: Graph, opset: int, taken: set):
        self.graph, self.opset = graph, opset
        self.nodes: list = []
        self.initializers: dict = {}     # name -> numpy array
        self.shapes: dict = {}           # ONNX name -> shape tuple
        self.dtypes: dict = {}           # ONNX name -> dtype name
        self.values: dict = {}           # ONNX name -> constant numpy value (for scales)
        self.taken = set(taken)
        self._k = 0
        self.sources: dict = {}          # dim_param -> (graph input name, axis): where it is read
        self._dim_names: dict = {}       # Dim -> name of its 1-element int64 tensor
        self._symbol_names: dict = {}    # dim_param -> name of its Shape value

    def fresh(self, hint: str = "t") -> str:
        while True:
            self._k += 1
            name = f"graphopt_{hint}_{self._k}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(self, op_type: str, inputs, outputs, **attrs) -> list:
        import onnx
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers[name] = np.asarray(value)
        self.values[name] = np.asarray(value)
        return name

    def shape(self, name: str) -> tuple:
        return self.shapes[name]

    def dims(self, sizes, hint: str = "shape") -> str:
        """A 1-D int64 tensor of ``sizes``: a constant when all are numbers; else the symbolic
        ones read at run time (``Shape`` of the graph input whose axis is that dim_param,
        times and plus constants) and concatenated."""
        sizes = [d if isinstance(d, Dim) and d.terms else int(d) for d in sizes]
        if all(isinstance(d, int) for d in sizes):
            return self.const(np.array(sizes, dtype=np.int64), hint)
        parts = [self._dim(d) if isinstance(d, Dim) else self.const(np.array([d], dtype=np.int64), hint)
                 for d in sizes]
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, 1, axis=0)[0]

    def _dim(self, d: Dim) -> str:
        if d in self._dim_names:
            return self._dim_names[d]
        if self.opset < 15:
            raise GraphoptError(f"a symbolic size ({d}) needs Shape(start, end), ONNX opset 15; the model has {self.opset}")
        total = d.compose(self._symbol, lambda a, b: self.node("Mul", [a, b], 1)[0],
                          lambda a, b: self.node("Add", [a, b], 1)[0],
                          lambda k: self.const(np.array([k], dtype=np.int64)))
        self._dim_names[d] = total
        return total

    def _symbol(self, name: str) -> str:
        """A dim_param's size at run time: ``Shape`` of the graph input axis it names (once)."""
        if name not in self._symbol_names:
            src = self.sources.get(name)
            if src is None:
                raise GraphoptError(f"the symbolic size {name} is not an axis of a graph input")
            graph_input, axis = src
            self._symbol_names[name] = self.node("Shape", [graph_input], 1, start=axis, end=axis + 1)[0]
        return self._symbol_names[name]

    def const_value(self, name: str):
        return self.values.get(name)

    def dtype(self, name: str):
        """numpy dtype of a value (for constants written next to it)."""
        return np.dtype(self.dtypes.get(name, "float32"))


def export_onnx(imp, graph: Graph):
    """The ModelProto of an (optimised) IR graph imported from ``imp.model``."""
    import onnx
    from onnx import numpy_helper
    src = imp.model
    taken = {n for node in src.graph.node for n in list(node.input) + list(node.output)}
    taken |= {i.name for i in src.graph.input} | {i.name for i in src.graph.initializer}
    b = Builder(graph, imp.opset, taken)
    from ..frontends.onnx import dynamic_axes
    b.sources = {sym: places[0] for sym, places in dynamic_axes(src).items()}
    name_of: dict = {}   # IR ref -> ONNX name
    out_names = [o.name for o in src.graph.output]
    tracked_outs = [o for o in out_names if o in imp.ref_of]  # graph.outputs, by their ONNX names
    wanted = {}          # IR ref -> graph output name it should carry
    orig_ref = {v: k for k, v in imp.ref_of.items()}
    for ref, name in zip(graph.outputs, tracked_outs):
        wanted.setdefault(ref, name)

    def record(ref, name):
        name_of[ref] = name
        shape, dtype = graph.type_of(ref)
        b.shapes[name] = tuple(plain(d) for d in shape)
        b.dtypes[name] = "float16" if dtype == "bfloat16" else dtype

    graph_inputs = {i.name for i in src.graph.input}
    for inp in graph.inputs:
        original = orig_ref.get(inp.name, inp.name)
        if inp.const:
            value = graph.constants[inp.name]
            name = original if original in taken and original not in graph_inputs else b.fresh("w")
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            b.values[name] = arr
            b.initializers[name] = arr
            record(inp.name, name)
        else:
            record(inp.name, original)
    for idx, node in enumerate(graph.nodes):
        refs = [node_ref(idx, j, len(node.outs)) for j in range(len(node.outs))]
        if node.op == OPAQUE:
            p = graph.payloads[idx]
            new = onnx.NodeProto()
            new.CopyFrom(p.node)
            ins = [name_of[r] for r in node.inputs]
            for pos, k in enumerate(p.tracked):
                new.input[k] = ins[pos]
            for pos, outer in enumerate(p.implicit):  # keep the names subgraphs read
                have = ins[len(p.tracked) + pos]
                if have != outer:
                    b.nodes.append(onnx.helper.make_node("Identity", [have], [outer]))
            b.nodes.append(new)
            for r, name in zip(refs, p.node.output):
                record(r, name)
            continue
        opdef = get_op(node.op)
        if opdef.to_onnx is None:
            raise GraphoptError(f"op {node.op} cannot be written as ONNX")
        outs = [wanted.pop(r) if r in wanted else b.fresh(node.op) for r in refs]
        opdef.to_onnx(b, [name_of[r] for r in node.inputs], {k: _plain(v) for k, v in node.attrs}, outs)
        for r, name in zip(refs, outs):
            record(r, name)
    # graph outputs: the original names, in the original order
    for ref, name in zip(graph.outputs, tracked_outs):
        if name_of[ref] != name:
            b.nodes.append(onnx.helper.make_node("Identity", [name_of[ref]], [name]))
    b.nodes = _live(b.nodes, set(out_names))
    used = {x for n in b.nodes for x in n.input} | set(out_names)
    used |= {x for n in b.nodes for x in _subgraph_inputs(n)}
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in b.initializers.items()
             if name in used]
    new_graph = onnx.helper.make_graph(b.nodes, src.graph.name or "graphopt", list(src.graph.input),
                                       list(src.graph.output), inits)
    model = onnx.helper.make_model(new_graph, opset_imports=list(src.opset_import),
                                   producer_name="graphopt")
    model.ir_version = src.ir_version
    model.functions.extend(src.functions)
    for prop in src.metadata_props:
        model.metadata_props.append(prop)
    return model


def _live(nodes, outputs: set) -> list:
    """Nodes whose results reach an output (ONNX inference nodes have no side effects):
    what a rewrite left unused (the Expand of repeated K/V heads) is dropped."""
    need, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need |= set(n.input) | set(_subgraph_inputs(n))
    return keep[::-1]


def _subgraph_inputs(node) -> list:
    from ..frontends.onnx import _outer_names
    return _outer_names(node)


__all__ = ["export_onnx", "Builder"]
