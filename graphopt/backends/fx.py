"""IR Graph -> torch.fx GraphModule.

Registry operators are emitted as the plain torch calls of their lowering
(``OpDef.lower`` is traced with fx proxies that know the IR's shapes and dtypes), so
the graph reads as the PyTorch a person would write
(``F.scaled_dot_product_attention(q, k, v, scale=0.125, is_causal=True)``), can be
exported with ``torch.export``, saved and loaded without graphopt, and handed to
inductor.  Opaque nodes are re-emitted as copies of their original fx nodes.
Constants that the IR added (literals, folded weights) become buffers of the new
module; the original module is never modified.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..dims import Dim
from ..errors import GraphoptError
from ..frontends.fx import fetch_attr
from ..ir import OPAQUE, Graph, node_ref
from ..ops import get_op


def run_op(op_name: str, attrs: tuple, *tensors):
    """Run a registry op on torch tensors; one output is returned bare, several as a tuple."""
    outs = get_op(op_name).torch(tensors, dict(attrs))
    return outs[0] if len(outs) == 1 else tuple(outs)


def _plain(value):
    """An attribute as a lowering reads it: constant sizes as ints (symbolic ones stay Dims,
    written as run-time size expressions by :class:`_Sizes`)."""
    if isinstance(value, Dim):
        return value.const if value.is_const else value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


class _Sizes:
    """Symbolic sizes as fx nodes of the new graph: a symbol is read from where the call
    receives it (Dynamo passes ``s0`` as an int argument; else ``x.size(k)`` of an input
    whose axis k is exactly that size), a Dim is then sums and products of those."""

    def __init__(self, new: fx.Graph, placeholders: list, fx_env: dict):
        from ..frontends.fx import _meta_value, sym_dim
        self.new, self.nodes, self.sources = new, {}, {}
        for ph in placeholders:
            value = _meta_value(ph)
            d = sym_dim(value) if isinstance(value, torch.SymInt) else None
            if isinstance(d, Dim) and d.symbol():
                self.sources.setdefault(d.symbol(), fx_env[ph])
        for ph in placeholders:
            value = _meta_value(ph)
            for k, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
                d = sym_dim(size)
                if isinstance(d, Dim) and d.symbol():
                    self.sources.setdefault(d.symbol(), (fx_env[ph], k))

    def symbol(self, name: str):
        if name not in self.nodes:
            src = self.sources.get(name)
            if src is None:
                raise GraphoptError(f"the symbolic size {name} is not an input size of the graph")
            self.nodes[name] = src if isinstance(src, fx.Node) else \
                self.new.call_function(torch.ops.aten.sym_size.int, src)
        return self.nodes[name]

    def node(self, d: Dim):
        """The fx value of a symbolic Dim (a node, or the int it is)."""
        call = self.new.call_function
        return d.compose(self.symbol, lambda a, b: call(operator.mul, (a, b)),
                         lambda a, b: call(operator.add, (a, b)), lambda k: k)

    def attrs(self, attrs: tuple, tracer) -> tuple:
        def conv(v):
            if isinstance(v, Dim) and not v.is_const:
                n = self.node(v)
                return fx.Proxy(n, tracer) if isinstance(n, fx.Node) else n
            if isinstance(v, tuple):
                return tuple(conv(x) for x in v)
            return v
        return tuple((k, conv(v)) for k, v in attrs)


def export_fx(imp, graph: Graph | None = None) -> fx.GraphModule:
    """Write an (optimised) IR graph of an imported GraphModule back as a GraphModule.

    Args:
        imp: the :class:`~graphopt.frontends.fx.FxImport` the graph came from.
        graph: the graph to emit (default: ``imp.graph`` unchanged).
    Returns:
        a new, linted and recompiled GraphModule with the same call signature.
    """
    graph = graph if graph is not None else imp.graph
    new = fx.Graph()
    new._codegen = imp.gm.graph._codegen  # keeps torch.export's pytree calling convention (not mutated)
    fx_env: dict = {}    # original fx node -> new fx node
    ref_env: dict = {}   # IR ref -> new fx node
    attrs: dict = {}     # get_attr target -> value, for the new module
    ref_of_name = {ref: node for node, ref in imp.ref_of.items() if isinstance(node, fx.Node)}

    for ph in imp.placeholders:
        n = new.placeholder(ph.name, type_expr=ph.type, default_value=_default(ph))
        n.meta = dict(ph.meta)
        fx_env[ph] = n
        if ph in imp.ref_of:
            ref_env[imp.ref_of[ph]] = n
    for inp in graph.inputs:
        old = ref_of_name.get(inp.name)
        if not inp.const:
            if old is not None and old.op == "get_attr":  # a buffer the graph writes (a cache)
                attrs[old.target] = fetch_attr(imp.gm, old.target)
                ref_env[inp.name] = fx_env[old] = new.get_attr(old.target)
                ref_env[inp.name].meta = dict(old.meta)
            continue
        if old is not None and old.op == "placeholder":
            continue  # a weight Dynamo passes per call: read it from there (it may change)
        target = old.target if old is not None and old.op == "get_attr" else folded_target(inp.name)
        attrs[target] = graph.constants[inp.name]
        n = new.get_attr(target)
        n.meta["val"] = graph.constants[inp.name]
        ref_env[inp.name] = n
        if old is not None:
            fx_env[old] = n

    sizes = _Sizes(new, imp.placeholders, fx_env)
    for idx, node in enumerate(graph.nodes):
        if node.op == OPAQUE:
            payload = graph.payloads[idx]
            inputs = dict(zip(payload.tensor_args, node.inputs))

            def remap(a, inputs=inputs):
                return ref_env[inputs[a]] if a in inputs else fx_env[a]
            if payload.node.op in ("get_attr", "call_module"):
                attrs[payload.node.target] = fetch_attr(imp.gm, payload.node.target)
            n = new.node_copy(payload.node, remap)
            fx_env[payload.node] = n
            _bind_outputs(new, n, idx, node, ref_env, payload.tuple_valued)
        else:
            concrete = tuple((k, _plain(v)) for k, v in node.attrs)
            pos = get_op(node.op).scalar_operand
            args = [_number(graph, r) if k == pos and _number(graph, r) is not None else ref_env[r]
                    for k, r in enumerate(node.inputs)]
            for j, n in enumerate(_emit_op(new, graph, node, concrete, args, sizes)):
                ref_env[node_ref(idx, j, len(node.outs))] = n

    out = imp.output
    inputs = dict(zip(out.tensor_args, graph.outputs))
    new.node_copy(out.node, lambda a: ref_env[inputs[a]] if a in inputs else fx_env[a])
    for n in [n for n in new.nodes if n.op == "get_attr" and not n.users]:
        new.erase_node(n)   # a constant now written into the code as a number
        attrs.pop(n.target, None)
    gm = fx.GraphModule(attrs, new, class_name="GraphoptModule")
    gm.graph.lint()
    gm.recompile()
    return gm


class _TypedProxy(fx.Proxy):
    """An fx proxy that answers what a lowering may ask of its input (shape, dtype, rank)
    from the IR's types, so the lowering's python runs at emission and only its torch calls
    are recorded.  A symbolic size is read from the tensor at run time (``x.size(i)``)."""

    def __init__(self, node, tracer, shape, dtype: str):
        super().__init__(node, tracer)
        self._shape, self._dtype = shape, dtype

    @property
    def shape(self):
        return tuple(d.const if d.is_const else self.size(k) for k, d in enumerate(self._shape))

    @property
    def dtype(self):
        return getattr(torch, self._dtype)

    def dim(self) -> int:
        return len(self._shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def _emit_op(new: fx.Graph, graph: Graph, node, attrs: tuple, args: list, sizes=None) -> list:
    """The fx nodes of one registry op: its torch lowering traced into ``new``."""
    tracer = fx.proxy.GraphAppendingTracer(new)
    if sizes is not None:
        attrs = sizes.attrs(attrs, tracer)
    proxies = [_TypedProxy(a, tracer, *graph.type_of(r)) if isinstance(a, fx.Node) else a
               for a, r in zip(args, node.inputs)]
    try:
        outs = get_op(node.op).torch(proxies, dict(attrs))
    except Exception as e:  # noqa: BLE001  (a lowering that needs a value at run time)
        raise GraphoptError(f"op {node.op!r} could not be written as torch calls "
                            f"({type(e).__name__}: {e})") from None
    nodes = [o.node if isinstance(o, fx.Proxy) else o for o in outs]
    if len(nodes) != len(node.outs) or not all(isinstance(n, fx.Node) for n in nodes):
        raise GraphoptError(f"op {node.op!r}: its lowering gave {len(nodes)} value(s) for "
                            f"{len(node.outs)} output(s)")
    return nodes


def torch_op_counts(gm: fx.GraphModule) -> dict:
    """How many calls of each torch op a GraphModule makes, by readable name (``aten.mm``,
    ``scaled_dot_product_attention``, ``method transpose``, ``add``), most frequent first."""
    from collections import Counter
    counts: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem:
            t = n.target
            name = str(t.overloadpacket) if hasattr(t, "overloadpacket") else getattr(t, "__name__", str(t))
            counts[name.replace("aten::", "aten.")] += 1
        elif n.op == "call_method":
            counts[f"method {n.target}"] += 1
        elif n.op == "call_module":
            counts[f"module {type(fetch_attr(gm, n.target)).__name__}"] += 1
    return dict(counts.most_common())


def baked_scalars(graph: Graph) -> set:
    """The constants that :func:`export_fx` writes into the code as python numbers (a
    change of their value needs a new graph, not new constants)."""
    out = set()
    for node in graph.nodes:
        if node.op == OPAQUE:
            continue
        pos = get_op(node.op).scalar_operand
        if pos is not None and pos < len(node.inputs) and _number(graph, node.inputs[pos]) is not None:
            out.add(node.inputs[pos])
    return out


def folded_target(name: str) -> str:
    """The attribute of the exported module that holds the constant input ``name``."""
    return f"_graphopt_{name}"


def _number(graph: Graph, ref: str):
    """A constant scalar operand (a literal scale, a folded 1/s) as a python number: SDPA's
    ``scale`` must be one, and compilers downstream (inductor) cannot read a tensor's value."""
    value = graph.constants.get(ref)
    if value is None or value.dim() != 0 or not value.dtype.is_floating_point:
        return None
    return value.item()


def _bind_outputs(new, n, idx, node, ref_env, tuple_valued: bool):
    if not tuple_valued:
        if node.outs:
            ref_env[node_ref(idx, 0, 1)] = n
        return
    for j in range(len(node.outs)):
        ref_env[node_ref(idx, j, len(node.outs))] = new.call_function(operator.getitem, (n, j))


def _default(ph):
    return ph.args[0] if ph.args else fx.node.inspect.Signature.empty


__all__ = ["export_fx", "run_op", "baked_scalars", "folded_target", "torch_op_counts"]
