"""torch.fx GraphModule -> IR Graph.

Accepts both forms that occur in the wild: the torch-level graphs Dynamo hands
to a ``torch.compile`` backend (``call_function`` torch.matmul / operator.add,
``call_method`` transpose, ``getitem``) and the ATen-level graphs of
``torch.export`` (``aten.matmul.default``, ...).  Shapes and dtypes come from
the nodes' fake-tensor metadata (``example_value`` or ``val``).

A call becomes an IR operator only when the op registry has a spelling for it
(``OpDef.fx``), its arguments parse, and the op's shape inference accepts the
inputs.  Everything else becomes an *opaque* node: it keeps its fx node and is
carried through unchanged.  Values the IR does not track (python ints from
``size()``, tensors with symbolic shapes) flow only through opaque nodes.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import GraphoptError
from ..ir import Graph
from ..ops import REGISTRY, get_op

_DTYPE_NAMES = {getattr(torch, n): n for n in (
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128")}


@dataclass
class FxPayload:
    """How to re-emit one fx node that the IR does not model."""

    node: fx.Node
    tensor_args: list  # the fx nodes whose values are the IR node's inputs, in order
    tuple_valued: bool = False  # the node returns a tuple; IR outputs are its items

    def run(self, args):
        raise GraphoptError(f"opaque node {self.node.name} can only run inside its GraphModule")


@dataclass
class FxImport:
    """Result of importing a GraphModule."""

    graph: Graph
    gm: fx.GraphModule
    placeholders: list                      # every placeholder fx node, in order
    ref_of: dict = field(default_factory=dict)  # fx node (or (node, i)) -> IR ref
    output: FxPayload | None = None
    counts: dict = field(default_factory=dict)  # "ops" / "opaque" node counts


def _meta_value(node: fx.Node):
    meta = node.meta
    return meta.get("val", meta.get("example_value"))


def _tensor_type(value):
    """(shape, dtype name) for a tensor with concrete shape, else None."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        shape = tuple(int(d) for d in value.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None
    if any(not isinstance(d, int) for d in value.shape):
        return None
    dtype = _DTYPE_NAMES.get(value.dtype)
    return None if dtype is None else (shape, dtype)


def _spellings() -> dict:
    table: dict = {}
    for op in REGISTRY.values():
        for form in op.fx:
            for target in form.targets:
                table.setdefault(target, []).append((op.name, form.parse))
    return table


class _Ctx:
    def __init__(self, imp: FxImport, out_shapes):
        self.imp, self.out_shapes = imp, out_shapes

    def is_tensor(self, a) -> bool:
        return isinstance(a, fx.Node) and a in self.imp.ref_of

    def rank(self, a) -> int:
        return len(self.imp.graph.type_of(self.imp.ref_of[a])[0])


def import_fx(gm: fx.GraphModule, example_inputs=None, constant_inputs=None) -> FxImport:
    """Import a GraphModule into an IR Graph (the module itself is not modified).

    Args:
        gm: a Dynamo or torch.export GraphModule with shape metadata.  If the
            metadata is missing, ``example_inputs`` are propagated through it with
            fake tensors first.
        example_inputs: the placeholder values (only needed without metadata).
        constant_inputs: placeholder node -> tensor, for placeholders whose value is
            known (the weights Dynamo lifts to inputs); they become constants.
    Returns:
        an :class:`FxImport` with the IR graph and what the backend needs.
    """
    if example_inputs is not None and any(_meta_value(n) is None for n in gm.graph.nodes
                                          if n.op not in ("output",)):
        _propagate(gm, example_inputs)
    spell = _spellings()
    g = Graph()
    imp = FxImport(g, gm, [], counts={"ops": 0, "opaque": 0})
    names = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            imp.placeholders.append(node)
            t = _tensor_type(_meta_value(node))
            if t is not None:
                value = (constant_inputs or {}).get(node)
                imp.ref_of[node] = g.add_external(_unique(node.name, names), t[0], t[1],
                                                  value=None if value is None else value.detach())
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            t = _tensor_type(value)
            if t is not None:
                imp.ref_of[node] = g.add_external(_unique(node.name, names), t[0], t[1], value=value)
            else:
                _opaque(imp, node)
        elif node.op == "output":
            args = [a for a in node.all_input_nodes if a in imp.ref_of]
            imp.output = FxPayload(node, args)
            g.outputs = [imp.ref_of[a] for a in args]
        elif node.op == "call_function" and node.target is operator.getitem and _getitem(imp, node):
            pass
        elif node.op == "call_function" and _composite(imp, node):
            imp.counts["ops"] += 1
        elif node.op in ("call_function", "call_method") and _registry_op(imp, node, spell, names):
            imp.counts["ops"] += 1
        else:
            _opaque(imp, node)
    return imp


def _unique(name: str, names: set) -> str:
    base, k = name, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    return name


def fetch_attr(gm, target: str):
    """The module attribute a get_attr/call_module target names (dotted path)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _propagate(gm, example_inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*example_inputs)


def _getitem(imp: FxImport, node) -> bool:
    """``x[i]`` of a multi-output IR node: just that output's ref."""
    src, index = node.args
    refs = imp.ref_of.get((src, "multi"))
    if refs is None or not isinstance(index, int) or not -len(refs) <= index < len(refs):
        return False
    imp.ref_of[node] = refs[index]
    return True


def _registry_op(imp: FxImport, node, spell, names) -> bool:
    target = f"method:{node.target}" if node.op == "call_method" else node.target
    try:
        candidates = spell.get(target)
    except TypeError:  # unhashable target
        return False
    if not candidates:
        return False
    value = _meta_value(node)
    outs = value if isinstance(value, (list, tuple)) else [value]
    types = [_tensor_type(v) for v in outs]
    if not outs or any(t is None for t in types):
        return False
    ctx = _Ctx(imp, [t[0] for t in types])
    for op_name, parse in candidates:
        parsed = parse(node.args, dict(node.kwargs), ctx)
        if parsed is None:
            continue
        tensor_args, attrs = parsed
        refs = []
        for a in tensor_args:
            if isinstance(a, fx.Node):
                refs.append(imp.ref_of[a])
            elif isinstance(a, numbers.Number):  # a literal scalar operand -> 0-d constant
                dtype = imp.graph.type_of(refs[0])[1] if refs else "float32"
                literal = torch.tensor(a, dtype=getattr(torch, dtype))
                refs.append(imp.graph.add_external(_unique(f"{node.name}_literal", names), (), dtype,
                                                   value=literal))
            else:
                break
        else:
            try:
                out = imp.graph.add(op_name, *refs, **attrs)
            except GraphoptError:
                continue
            out_refs = out if isinstance(out, tuple) else (out,)
            got = [(tuple(d.const for d in s), dt) for s, dt in (imp.graph.type_of(r) for r in out_refs)]
            if got != [tuple(t) for t in types]:
                raise GraphoptError(f"{node.name}: op {op_name} infers {got}, the graph says {types}")
            if isinstance(value, (list, tuple)):
                imp.ref_of[(node, "multi")] = out_refs
            else:
                imp.ref_of[node] = out_refs[0]
            return True
    return False


def _composite(imp: FxImport, node) -> bool:
    """A call that is several registry ops (see ``ops.composites``)."""
    from ..ops.composites import COMPOSITES
    try:
        fn = COMPOSITES.get(node.target)
    except TypeError:
        return False
    types = [_tensor_type(_meta_value(node))]
    if fn is None or types[0] is None:
        return False
    steps = fn(node.args, dict(node.kwargs), _Ctx(imp, [types[0][0]]))
    if not steps:
        return False
    g, mark, refs = imp.graph, len(imp.graph.nodes), []
    try:
        for op, inputs, attrs in steps:
            args = [refs[a[1]] if isinstance(a, tuple) else imp.ref_of[a] for a in inputs]
            refs.append(g.add(op, *args, **attrs))
    except GraphoptError:
        del g.nodes[mark:]
        return False
    got = g.type_of(refs[-1])
    if (tuple(d.const for d in got[0]), got[1]) != tuple(types[0]):
        del g.nodes[mark:]
        return False
    imp.ref_of[node] = refs[-1]
    return True


def _opaque(imp: FxImport, node):
    imp.counts["opaque"] += 1
    tensor_args = [a for a in node.all_input_nodes if a in imp.ref_of]
    value = _meta_value(node)
    if isinstance(value, (list, tuple)):
        types = [_tensor_type(v) for v in value]
        outs = [t for t in types if t is not None] if all(t is not None for t in types) else []
    else:
        t = _tensor_type(value)
        outs = [t] if t is not None else []
    payload = FxPayload(node, tensor_args, tuple_valued=isinstance(value, (list, tuple)) and bool(outs))
    refs = imp.graph.add_opaque(payload, [imp.ref_of[a] for a in tensor_args], outs)
    if not outs:
        return
    if isinstance(value, (list, tuple)):
        imp.ref_of[(node, "multi")] = refs if isinstance(refs, tuple) else (refs,)
    else:
        imp.ref_of[node] = refs


__all__ = ["import_fx", "FxImport", "FxPayload", "get_op"]
