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

from ..dims import plain
from ..errors import GraphoptError
from ..ir import Graph
from ..ops import REGISTRY, get_op
from ..ops import spellings as sp

_DTYPE_NAMES = {getattr(torch, n): n for n in (
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128")}


@dataclass
class FxPayload:
    """How to re-emit one fx node that the IR does not model."""

    node: fx.Node
    tensor_args: list  # the fx nodes whose values are the IR node's inputs, in order
    tuple_valued: bool = False  # the node returns a tuple; IR outputs are its items
    pure: bool = False  # no side effects: dropped when its value is no longer used

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
    written: set = field(default_factory=set)   # fx nodes written in place (through views too)
    renamed: dict = field(default_factory=dict)  # in-place calls read as functional ones -> target


def _meta_value(node: fx.Node):
    meta = node.meta
    return meta.get("val", meta.get("example_value"))


def _tensor_type(value, hints: dict | None = None):
    """(shape, dtype name) for a tensor whose sizes are numbers or symbolic sizes the IR can
    state (``s0``, ``12*s0``, ``s0*s1``, read without specialising them), else None.
    ``hints`` collects each symbol's value in the example."""
    if not isinstance(value, torch.Tensor):
        return None
    shape = tuple(sym_dim(d, hints) for d in value.shape)
    if any(d is None for d in shape):
        return None
    dtype = _DTYPE_NAMES.get(value.dtype)
    return None if dtype is None else (shape, dtype)


def sym_dim(d, hints: dict | None = None):
    """A size as the IR states it: an int, or a :class:`~graphopt.dims.Dim` for a symbolic
    size that is a polynomial with non-negative integer coefficients in the shape
    environment's symbols (``s0``, ``12*s0 + 12``); None for anything else (``s0 - 1``,
    ``s0 // 2``, a size without an example value)."""
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    if not isinstance(d, torch.SymInt):
        return None
    node = d.node
    expr = node.expr
    if expr.is_Integer:
        return int(expr)
    from ..dims import from_expression
    out = from_expression(expr)
    if out is None:
        return None
    env = node.shape_env
    for sym in expr.free_symbols:
        value = getattr(env, "backed_var_to_val", getattr(env, "var_to_val", {})).get(sym) \
            if env is not None else None
        if value is None:
            return None     # an unbacked size (data-dependent): nothing to cost or verify with
        if hints is not None:
            hints[str(sym)] = int(value)
    return out


def _spellings() -> dict:
    """call target -> [(op name, parse), ...], the highest ``priority`` first (then registry order)."""
    table: dict = {}
    for op in REGISTRY.values():
        for form in op.fx:
            for target in form.targets:
                table.setdefault(target, []).append((-form.priority, len(table.get(target, ())), op.name, form.parse))
    return {t: [(name, parse) for _, _, name, parse in sorted(forms, key=lambda f: f[:2])]
            for t, forms in table.items()}


class _Ctx:
    def __init__(self, imp: FxImport, out_shapes, node=None):
        self.imp, self.out_shapes, self.node = imp, out_shapes, node

    def node_value(self):
        """The fake tensor (or value) of the call being imported."""
        return _meta_value(self.node) if self.node is not None else None

    def written_in_place(self, a) -> bool:
        """Whether ``a`` or the call's result is written in place by a later call."""
        users = (*(self.node.users if self.node is not None else ()), *(a.users if isinstance(a, fx.Node) else ()))
        written = getattr(self.imp, "written", set())  # written in place, through views too
        renamed = getattr(self.imp, "renamed", {})   # read as functional calls
        return any(_mutates(u) and u not in renamed for u in users) or a in written or self.node in written

    def is_tensor(self, a) -> bool:
        return isinstance(a, fx.Node) and a in self.imp.ref_of

    def rank(self, a) -> int:
        return len(self.imp.graph.type_of(self.imp.ref_of[a])[0])

    def shape(self, a) -> tuple:
        """The operand's shape: ints, and Dims where a size is symbolic."""
        return tuple(plain(d) for d in self.imp.graph.type_of(self.imp.ref_of[a])[0])

    def dtype(self, a) -> str:
        return self.imp.graph.type_of(self.imp.ref_of[a])[1]

    def const_value(self, a):
        """The value of a constant tensor (a folded literal or a weight), else None."""
        ref = self.imp.ref_of.get(a) if isinstance(a, fx.Node) else None
        return self.imp.graph.constants.get(ref) if isinstance(ref, str) else None

    def meta_shape(self, a) -> tuple | None:
        """The shape of the tensor an fx node carries, as the IR states sizes (ints, Dims;
        None for a size it cannot state)."""
        v = _meta_value(a) if isinstance(a, fx.Node) else None
        return tuple(sym_dim(d) for d in v.shape) if isinstance(v, torch.Tensor) else None

    @staticmethod
    def meta(a):
        """The fake tensor (or value) an fx node carries, for looking at producers."""
        return _meta_value(a) if isinstance(a, fx.Node) else None


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
    # a graph without shape metadata (torch.fx.symbolic_trace) gets it from the examples; a
    # captured one keeps its own (propagating concrete examples through Dynamo's symbolic
    # sizes would add guards that specialise them, and a call returning None has none)
    if example_inputs is not None and any(_meta_value(n) is None for n in gm.graph.nodes
                                          if n.op == "placeholder"):
        _propagate(gm, example_inputs)
    spell = _spellings()
    g = Graph()
    imp = FxImport(g, gm, [], counts={"ops": 0, "opaque": 0, "folded": 0})
    names = set()
    renamed = imp.renamed = _functional_in_place(gm)
    written = _written(gm, skip=renamed)  # found once: folding, constants, aliases and ordering need it
    imp.written = written
    mutated = _roots(written)
    folded = fold_literals(gm, {n: v for n, v in (constant_inputs or {}).items() if n not in mutated}, written)
    order = _SideEffectOrder(g, written)
    for node in gm.graph.nodes:
        mark = len(g.nodes)
        if node in folded:
            if folded[node] is not None:  # used outside the folded part: a constant input
                value = folded[node]
                imp.ref_of[node] = g.add_external(_unique(node.name, names), tuple(value.shape),
                                                  _DTYPE_NAMES[value.dtype], value=value)
                imp.counts["folded"] += 1
        elif node.op == "call_function" and node.target in _DROPPED:
            pass  # a trace-time metadata check: it held when the graph was captured
        elif node.op == "placeholder":
            imp.placeholders.append(node)
            t = _tensor_type(_meta_value(node), imp.graph.hints)
            if t is not None:
                value = None if node in mutated else (constant_inputs or {}).get(node)
                imp.ref_of[node] = g.add_external(_unique(node.name, names), t[0], t[1],
                                                  value=None if value is None else value.detach())
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            t = _tensor_type(value, g.hints)
            if t is not None:  # a weight or buffer: a constant, unless the graph writes to it (a KV cache)
                imp.ref_of[node] = g.add_external(_unique(node.name, names), t[0], t[1],
                                                  value=None if node in mutated else value)
            else:
                _opaque(imp, node)
        elif node.op == "output":
            args = [a for a in node.all_input_nodes if a in imp.ref_of]
            imp.output = FxPayload(node, args)
            g.outputs = [imp.ref_of[a] for a in args]
        elif node.op == "call_function" and node.target is operator.getitem and _getitem(imp, node):
            pass
        elif node in renamed:   # x.masked_fill_(m, v) as a statement: x = x.masked_fill(m, v)
            if _registry_op(imp, node, spell, names, target=renamed[node]):
                imp.counts["ops"] += 1
            else:
                _opaque(imp, node)   # the call itself, run on x: later reads see its result too
            if node in imp.ref_of:
                imp.ref_of[node.args[0]] = imp.ref_of[node]
        elif node.op in ("call_function", "call_method") and _registry_op(imp, node, spell, names):
            imp.counts["ops"] += 1
        else:
            _opaque(imp, node)
        order.step(node, mark)
    if g.hints:   # symbolic sizes: masks built from them are proved causal (or all-kept) here
        from ..masks import mask_facts
        for node, guards in mask_facts(gm, written | set(renamed)).items():
            if isinstance(imp.ref_of.get(node), str):
                g.facts[imp.ref_of[node]] = set(guards)
    return imp


class _SideEffectOrder:
    """Ordering deps (``Graph.after``) that keep side effects where they were: every opaque
    node runs after the previous one, a read of a tensor the graph writes to runs after the
    opaque node before it, and a write runs after the reads before it.  Rewrites keep them
    (a replacement inherits the deps of what it replaces)."""

    def __init__(self, graph, written: set):
        self.graph, self.written = graph, written
        self.last_opaque, self.readers = None, []

    def step(self, node, mark):
        g = self.graph
        new = range(mark, len(g.nodes))
        reads = any(a in self.written for a in node.all_input_nodes)
        writes = _mutates(node)
        for i in new:
            deps = set()
            if g.nodes[i].op == "opaque":
                deps |= {self.last_opaque} if self.last_opaque is not None else set()
                deps |= set(self.readers) if writes else set()
            elif reads and self.last_opaque is not None:
                deps.add(self.last_opaque)
            deps.discard(i)
            if deps:
                g.after[i] = tuple(sorted(deps))
        if reads:
            self.readers.extend(new)
        opaque = [i for i in new if g.nodes[i].op == "opaque"]
        if opaque:
            self.last_opaque = opaque[-1]
        if writes:
            self.readers = []


# calls dropped on import: torch.export's checks of a tensor's dtype/device, which held
# when the graph was traced and hold in the rewritten graph (rewrites never change types)
_DROPPED = (torch.ops.aten._assert_tensor_metadata.default,)

# never folded: values that differ from call to call, or calls run for their effects
_IMPURE_WORDS = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "poisson",
                 "exponential", "cauchy", "geometric", "empty", "seed", "grad", "assert", "print",
                 "log_api", "record", "profiler", "set_")

# folded values larger than this (elements) stay computed at run time
MAX_FOLD_NUMEL = 1 << 26


def _pure_call(node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    name = str(name).lower().split(".")[0]
    if any(w in name for w in _IMPURE_WORDS) or _mutates(node):
        return False
    try:
        return not node.is_impure()
    except Exception:  # noqa: BLE001  (an unusual target: leave it alone)
        return False


def fold_literals(gm: fx.GraphModule, constants: dict | None = None, written: set | None = None) -> dict:
    """Compute now the values that depend on no input, parameter or buffer, and the
    boolean/integer values computed from constants (a slice of a mask buffer).

    Attention masks are such values in Hugging Face models (built from ``arange``
    comparisons, ``tril`` or ``full(...).triu()`` at the traced sequence length);
    folding them lets guarded rules see that a mask is causal.  Only pure calls
    are folded, never random ones or buffers (which may change between calls).

    Returns:
        fx node -> its value if the value is used by the rest of the graph (a tensor),
        or None if it is only used by other folded nodes.
    """
    values: dict = dict(constants or {})
    literal: set = set()  # nodes computed from literals alone
    if written is None:  # a tensor updated in place later (a lazily created cache) is no constant
        written = _written(gm)
    for node in gm.graph.nodes:
        if not _pure_call(node) or node in written or any(a not in values for a in node.all_input_nodes):
            continue
        from_literals = all(a in literal for a in node.all_input_nodes)
        meta = _meta_value(node)
        if not isinstance(meta, (torch.Tensor, numbers.Number, tuple, list)) or isinstance(meta, bool):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
        try:
            with torch.no_grad():
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                value = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
        except Exception:  # noqa: BLE001  (cannot run it here: leave it to run time)
            continue
        if isinstance(value, torch.Tensor) and (value.numel() > MAX_FOLD_NUMEL or value.is_complex()
                                                or value.requires_grad):
            continue
        if not from_literals and (not isinstance(value, torch.Tensor) or value.is_floating_point()):
            continue  # of a weight: left to the search, which folds what its rewrites need
        values[node] = value
        literal.update([node] if from_literals else [])
    # keep a node folded only if every use outside the folded part can read it as a constant
    for node in constants or {}:
        del values[node]
    changed = True
    while changed:
        changed = False
        for node in list(values):
            outside = [u for u in node.users if u not in values]
            if outside and not (isinstance(values[node], torch.Tensor) and _tensor_type(values[node])):
                del values[node]
                changed = True
    return {n: (v if any(u not in values for u in n.users) else None) for n, v in values.items()}


_INPLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.iand, operator.ior, operator.ixor, operator.imatmul)


def _mutates(node) -> bool:
    """An in-place call (``x[i] = v``, ``x.add_(y)``, ``out=``): aliasing its operand is unsafe."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _INPLACE_OPERATORS or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        name = node.target
    elif isinstance(node.target, torch._ops.OpOverload):
        name = node.target.__name__.split(".")[0]
    else:  # a torch function: in-place ones end in "_" (operator.and_ is not one)
        name = getattr(node.target, "__name__", "") if getattr(node.target, "__module__", "") != "_operator" else ""
    return name.endswith("_") and not name.endswith("__")


def mutated_roots(gm: fx.GraphModule) -> set:
    """Placeholders and attributes that the graph updates in place, directly or through a
    view (``cache.index_copy_(...)``, ``x[:, i] = v``): their values are not constants."""
    return _roots(_written(gm))


def _roots(written: set) -> set:
    return {n for n in written if n.op in ("placeholder", "get_attr")}


def _functional_in_place(gm: fx.GraphModule) -> dict:
    """In-place calls that can be read as their functional form, the later reads of the operand
    then reading the result (``scores.masked_fill_(mask, min)`` as a statement, XLM): the
    operand is a fresh result (a matmul's, no view), this call is the first to use it and no
    other call writes it.  Returns node -> the functional call's target."""
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_method" and isinstance(node.target, str):
            name = node.target
            functional = f"method:{name[:-1]}"
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = node.target.__name__.split(".")[0]
            packet = getattr(torch.ops.aten, name[:-1], None)
            functional = getattr(packet, node.target._overloadname, None) if packet is not None else None
        else:
            continue
        if not name.endswith("_") or name.endswith("__") or functional is None or "out" in node.kwargs:
            continue
        x = node.args[0] if node.args else None
        if not sp.fresh_result(x) or any(order[u] < order[node] and not _shape_only(u, x) for u in x.users):
            continue
        if any(_mutates(u) for u in x.users if u is not node):
            continue
        out[node] = functional
    return out


def _shape_only(user, x) -> bool:
    """``user`` reads only x's shape or dtype (``m.expand_as(x)``, ``x.size()``)."""
    aten = torch.ops.aten
    if user.op == "call_function":
        if user.target is aten.sym_size.int:
            return True
        return user.target in (aten.expand_as.default, aten.type_as.default) and user.args[0] is not x
    if user.op != "call_method":
        return False
    if user.target in ("size", "dim"):
        return True
    return user.target in ("expand_as", "type_as", "view_as", "reshape_as") and user.args[0] is not x


def _written(gm: fx.GraphModule, skip=()) -> set:
    """Every node whose value an in-place call changes: the operand and what it views (not
    through the calls in ``skip``, read as functional)."""
    out = set()
    for node in gm.graph.nodes:
        if not _mutates(node) or not node.args or node in skip:
            continue
        x = node.args[0]
        while isinstance(x, fx.Node) and x not in out:
            out.add(x)
            if x.op in ("placeholder", "get_attr"):
                break
            x = x.args[0] if x.args else None
    return out


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
    if refs is not None and not node.users and isinstance(index, int) and index >= len(refs):
        return True     # an output the op does not model, read by nothing (max(dim)'s indices)
    if refs is None or not isinstance(index, int) or not -len(refs) <= index < len(refs):
        return False
    imp.ref_of[node] = refs[index]
    return True


def _registry_op(imp: FxImport, node, spell, names, target=None) -> bool:
    if target is None:
        target = f"method:{node.target}" if node.op == "call_method" else node.target
    try:
        candidates = spell.get(target)
    except TypeError:  # unhashable target
        return False
    if not candidates:
        return False
    value = _meta_value(node)
    outs = value if isinstance(value, (list, tuple)) else [value]
    types = [_tensor_type(v, imp.graph.hints) for v in outs]
    if not outs or any(t is None for t in types):
        return False
    ctx = _Ctx(imp, [t[0] for t in types], node)
    for op_name, parse in candidates:
        try:
            parsed = parse(node.args, dict(node.kwargs), ctx)
        except TypeError:   # a spelling that compares a symbolic size with a number: not
            parsed = None   # provable for every size, so not this op
        if parsed is None:
            continue
        # a third item: the call is only that output of the op (x[..., :k] is split's first part)
        tensor_args, attrs, *pick = parsed
        refs = []
        for a in tensor_args:
            if isinstance(a, fx.Node):
                refs.append(imp.ref_of[a])
            elif isinstance(a, numbers.Number):  # a literal scalar operand -> 0-d constant
                dtype = imp.graph.type_of(refs[0])[1] if refs else "float32"
                literal = torch.tensor(a, dtype=getattr(torch, dtype))
                refs.append(imp.graph.add_external(_unique(f"{node.name}_literal", names), (), dtype,
                                                   value=literal))
            elif isinstance(a, torch.Tensor):  # a constant the spelling computed (a mask)
                refs.append(imp.graph.add_external(_unique(f"{node.name}_const", names), tuple(a.shape),
                                                   _DTYPE_NAMES[a.dtype], value=a))
            else:
                break
        else:
            mark = len(imp.graph.nodes)
            try:
                out = imp.graph.add(op_name, *refs, **attrs)
            except GraphoptError:
                continue
            out_refs = out if isinstance(out, tuple) else (out,)
            got = [(tuple(plain(d) for d in s), dt) for s, dt in (imp.graph.type_of(r) for r in out_refs)]
            wanted = [tuple(t) for t in types]
            if pick:
                out_refs, got = out_refs[pick[0]:pick[0] + 1], got[pick[0]:pick[0] + 1]
            elif isinstance(value, (list, tuple)) and len(got) < len(wanted) and all(
                    u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                    and (0 <= u.args[1] < len(got) or not u.users) for u in node.users):
                wanted = wanted[:len(got)]  # the op is the leading outputs, the only ones read
                                            # (max(dim)'s values, not its indices)
            if got != wanted:                     # not this op after all (a cast that casts): the
                del imp.graph.nodes[mark:]        # next spelling, or an opaque node
                continue
            if isinstance(value, (list, tuple)):
                imp.ref_of[(node, "multi")] = out_refs
            else:
                imp.ref_of[node] = out_refs[0]
            return True
    return False


def _opaque(imp: FxImport, node):
    imp.counts["opaque"] += 1
    tensor_args = [a for a in node.all_input_nodes if a in imp.ref_of]
    value = _meta_value(node)
    if isinstance(value, (list, tuple)):
        types = [_tensor_type(v, imp.graph.hints) for v in value]
        outs = [t for t in types if t is not None] if all(t is not None for t in types) else []
    else:
        t = _tensor_type(value, imp.graph.hints)
        outs = [t] if t is not None else []
    payload = FxPayload(node, tensor_args, tuple_valued=isinstance(value, (list, tuple)) and bool(outs),
                        pure=bool(outs) and _pure_call(node))
    refs = imp.graph.add_opaque(payload, [imp.ref_of[a] for a in tensor_args], outs)
    if not outs:
        return
    if isinstance(value, (list, tuple)):
        imp.ref_of[(node, "multi")] = refs if isinstance(refs, tuple) else (refs,)
    else:
        imp.ref_of[node] = refs


__all__ = ["import_fx", "FxImport", "FxPayload", "get_op"]
