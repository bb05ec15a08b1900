"""The intermediate representation: a small DAG of operator nodes.

A :class:`Graph` has named inputs (each with a shape and dtype), operator nodes
in topological order, and an ordered list of outputs.  Tensors are referred to
as *refs*: an input's name (``"X"``), a node's single output (``"%3"``) or one
output of a multi-output node (``"%3.1"``).  The same form is used in rule
files, so a rule side is just a Graph serialised to JSON.

Graphs are frontend-neutral: they know nothing of torch.fx or ONNX.  They can
be evaluated in any domain of the op registry (float reference, fingerprint,
Z3) or lowered to a plain torch callable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .dims import Dim, evaluate_shape, plain, shape_of, shape_str, solve
from .errors import GraphoptError, RuleFormatError, ShapeError
from .ops import get_op
from .ops.base import FLOAT_DTYPES


OPAQUE = "opaque"  # a node the registry does not know: carried through, never rewritten


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple  # of Dim
    dtype: str = "float32"
    const: bool = False  # a parameter/buffer/literal whose value is in Graph.constants
    guard: str | None = None  # rule inputs only: a condition on the value (see graphopt.guards)

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": [str(d) for d in self.shape], "dtype": self.dtype}
        if self.guard:
            out["guard"] = self.guard
        return out


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple  # refs
    attrs: tuple   # sorted (key, value) pairs, values concrete python / Dim
    outs: tuple    # ((shape, dtype), ...)

    @property
    def attr_dict(self) -> dict:
        return dict(self.attrs)


def attrs_to_json(attrs: Mapping) -> dict:
    def conv(v):
        if isinstance(v, Dim):
            return v.const if v.is_const else str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in sorted(dict(attrs).items())}


def parse_ref(ref: str) -> tuple:
    """``"%3.1"`` -> (3, 1); ``"%3"`` -> (3, 0); ``"X"`` -> (name, None)."""
    if not isinstance(ref, str):
        raise ShapeError(f"invalid tensor ref {ref!r}")
    if ref.startswith("%"):
        idx, _, out = ref[1:].partition(".")
        if not idx.isdigit() or not (out.isdigit() or ref.count(".") == 0):
            raise ShapeError(f"invalid tensor ref {ref!r}")
        return int(idx), int(out or 0)
    return ref, None


def node_ref(index: int, out: int, num_outs: int) -> str:
    return f"%{index}.{out}" if num_outs > 1 else f"%{index}"


@dataclass
class Graph:
    """Inputs, nodes in topological order, and outputs (refs)."""

    inputs: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    constants: dict = field(default_factory=dict)   # const input name -> tensor
    payloads: dict = field(default_factory=dict)    # opaque node index -> frontend payload
    # node index -> indices of nodes that must run before it though no value flows between
    # them: the original order of side effects (a KV-cache write, then its reads)
    after: dict = field(default_factory=dict)
    # set by the optimizer: how folded constants are computed from the constant inputs
    # (a rewrite.FoldProgram), and the constant inputs whose values a rewrite relied on
    # (a guard such as "this mask is causal" held): both are what a runtime guard watches
    folds: object = None
    assumed: set = field(default_factory=set)
    # symbolic sizes: symbol -> its value in the example (what cost models read), and
    # ref -> guards its value is proved to pass for every size (a causal mask built from
    # the sequence length), which guarded rules accept like a checked constant
    hints: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------
    def add_input(self, name: str, shape, dtype: str = "float32", guard: str | None = None) -> str:
        if dtype not in FLOAT_DTYPES:
            raise ShapeError(f"input {name!r}: unsupported dtype {dtype!r}")
        if any(i.name == name for i in self.inputs) or name.startswith("%"):
            raise ShapeError(f"input name {name!r} is invalid or used twice")
        if guard is not None:
            from .guards import get_guard
            get_guard(guard)
        self.inputs.append(Input(name, shape_of(shape), dtype, guard=guard))
        return name

    def add_external(self, name: str, shape, dtype: str, value=None) -> str:
        """An input of a real model: any dtype; with ``value`` it is a constant
        (a parameter, buffer or literal) that optimisation may fold."""
        if any(i.name == name for i in self.inputs) or name.startswith("%"):
            raise ShapeError(f"input name {name!r} is invalid or used twice")
        self.inputs.append(Input(name, shape_of(shape), dtype, const=value is not None))
        if value is not None:
            self.constants[name] = value
        return name

    def add_opaque(self, payload, inputs, outs) -> str | tuple:
        """A node the registry does not know; ``outs`` is ((shape, dtype), ...).
        The payload (frontend-specific) says how to run and re-emit it."""
        for r in inputs:
            self.type_of(r)
        idx = len(self.nodes)
        outs = tuple((shape_of(s), dt) for s, dt in outs)
        self.nodes.append(Node(OPAQUE, tuple(inputs), (("id", idx),), outs))
        self.payloads[idx] = payload
        refs = tuple(node_ref(idx, j, len(outs)) for j in range(len(outs)))
        return refs[0] if len(refs) == 1 else refs

    def add(self, op: str, *inputs: str, **attrs) -> str | tuple:
        """Append an operator node; returns its output ref(s).  Validates shapes."""
        opdef = get_op(op)
        full = opdef.full_attrs(attrs)
        shapes, dtypes = zip(*[self.type_of(r) for r in inputs]) if inputs else ((), ())
        outs = tuple(opdef.infer_checked(shapes, dtypes, full))
        idx = len(self.nodes)
        self.nodes.append(Node(op, tuple(inputs), tuple(sorted(full.items())), outs))
        refs = tuple(node_ref(idx, j, len(outs)) for j in range(len(outs)))
        return refs[0] if len(refs) == 1 else refs

    def type_of(self, ref: str) -> tuple:
        key, out = parse_ref(ref)
        if out is None:
            for i in self.inputs:
                if i.name == key:
                    return i.shape, i.dtype
            raise ShapeError(f"unknown tensor {ref!r}")
        if not 0 <= key < len(self.nodes) or out >= len(self.nodes[key].outs):
            raise ShapeError(f"unknown tensor {ref!r}")
        if ref != node_ref(key, out, len(self.nodes[key].outs)):  # one spelling per tensor
            raise ShapeError(f"unknown tensor {ref!r} (did you mean {node_ref(key, out, len(self.nodes[key].outs))!r}?)")
        return self.nodes[key].outs[out]

    def bind(self, concrete_shapes: Sequence[tuple], defaults: Mapping | None = None) -> dict:
        """Sizes of the shape symbols given the inputs' concrete shapes.

        Symbols the shapes do not determine are taken from ``defaults``.
        Raises ShapeError if the shapes do not fit or a needed size stays unknown.
        """
        pairs = []
        for inp, shape in zip(self.inputs, concrete_shapes):
            if len(inp.shape) != len(shape):
                raise ShapeError(f"input {inp.name}: expected rank {len(inp.shape)}, got shape {tuple(shape)}")
            pairs.extend(zip(inp.shape, shape))
        want = ", ".join(f"{i.name}{shape_str(i.shape)}" for i in self.inputs)
        solved = solve(pairs)
        if solved is not None and solved[1] and defaults:
            solved = solve(pairs, {s: defaults[s] for s in solved[1] if s in defaults})
        if solved is None:
            raise ShapeError(f"input shapes {[tuple(s) for s in concrete_shapes]} do not fit {want}")
        if solved[1]:
            raise ShapeError(f"input shapes {[tuple(s) for s in concrete_shapes]} do not determine "
                             f"the size of {', '.join(solved[1])} in {want}; pass them as defaults")
        return solved[0]

    def num_ops(self) -> int:
        return len(self.nodes)

    def op_names(self) -> list:
        return [n.op for n in self.nodes]

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, env: Mapping, semantics: str = "ref", binding: Mapping | None = None,
                 prepare: Callable | None = None) -> list:
        """Evaluate the outputs.

        Args:
            env: input name -> array (numpy for ``ref``/``fingerprint``/``z3``).
            semantics: ``"ref"``, ``"fingerprint"`` or ``"z3"`` (an OpDef method name).
            binding: size of each shape symbol, to make symbolic attributes concrete.
            prepare: ``(opdef, args) -> args`` applied before each op (the all-ranks evaluation
                of :mod:`graphopt.parallel.rules` lines up the rank axes this way).
        Returns:
            the output arrays, in the order of ``self.outputs``.
        """
        binding = binding or {}
        values: dict = dict(env)
        for idx, node in enumerate(self.nodes):
            if node.op == OPAQUE:
                raise ShapeError(f"node %{idx} is opaque: it has no {semantics} semantics")
            opdef = get_op(node.op)
            args = [values[r] for r in node.inputs]
            if prepare is not None:
                args = prepare(opdef, args)
            outs = getattr(opdef, semantics)(args, concrete_attrs(node.attrs, binding))
            for j, v in enumerate(outs):
                values[node_ref(idx, j, len(node.outs))] = v
        return [values[r] for r in self.outputs]

    def to_torch(self, defaults: Mapping | None = None) -> Callable:
        """A plain torch callable taking the inputs positionally, returning a tuple of outputs.

        Args:
            defaults: sizes for shape symbols that the input shapes do not determine
                (in ``V: (b, c+d)`` only ``c+d`` is known; a split at ``c`` needs ``c``).
        """
        names = [i.name for i in self.inputs]

        def fn(*tensors):
            if len(tensors) != len(names):
                raise TypeError(f"expected {len(names)} inputs ({', '.join(names)}), got {len(tensors)}")
            binding = self.bind([tuple(t.shape) for t in tensors], defaults)
            values = dict(zip(names, tensors))
            for idx, node in enumerate(self.nodes):
                args = [values[r] for r in node.inputs]
                if node.op == OPAQUE:
                    outs = self.payloads[idx].run(args)
                else:
                    outs = get_op(node.op).torch(args, concrete_attrs(node.attrs, binding))
                for j, v in enumerate(outs):
                    values[node_ref(idx, j, len(node.outs))] = v
            return tuple(values[r] for r in self.outputs)

        return fn

    # -- (de)serialisation ------------------------------------------------------------
    def body_to_json(self) -> dict:
        return {
            "nodes": [{"op": n.op, "inputs": list(n.inputs), "attrs": attrs_to_json(n.attrs)}
                      for n in self.nodes],
            "outputs": list(self.outputs),
        }

    @staticmethod
    def from_json(inputs: Sequence[Mapping], body: Mapping, where: str = "graph") -> "Graph":
        """Rebuild (and re-validate) a graph; raises RuleFormatError naming the problem."""
        g = Graph()
        try:
            for spec in inputs:
                g.add_input(spec["name"], spec["shape"], spec.get("dtype", "float32"), spec.get("guard"))
            if not isinstance(body.get("nodes"), list) or not isinstance(body.get("outputs", []), list):
                raise RuleFormatError(f'{where}: malformed graph: "nodes" must be a list (and "outputs" too)')
            for k, n in enumerate(body["nodes"]):
                try:
                    if not isinstance(n, Mapping) or "op" not in n or not isinstance(n.get("inputs"), list):
                        raise ShapeError("expected {\"op\": ..., \"inputs\": [...], \"attrs\": {...}}")
                    g.add(n["op"], *n["inputs"], **(n.get("attrs") or {}))
                except GraphoptError as e:
                    raise RuleFormatError(f"{where}: node {k}: {e}") from None
                except (TypeError, ValueError) as e:
                    raise RuleFormatError(f"{where}: node {k}: malformed ({e})") from None
            outs = list(body["outputs"])
            for r in outs:
                g.type_of(r)
            g.outputs = outs
        except RuleFormatError:
            raise
        except GraphoptError as e:
            raise RuleFormatError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RuleFormatError(f"{where}: malformed graph ({type(e).__name__}: {e})") from None
        return g

    def describe(self) -> str:
        """Human-readable listing, one node per line."""
        lines = [f"  {i.name}: {shape_str(i.shape)} {i.dtype}" + (f" [guard: {i.guard}]" if i.guard else "")
                 for i in self.inputs]
        for idx, n in enumerate(self.nodes):
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs if not _is_default(n.op, k, v))
            args = ", ".join(n.inputs) + (f"; {attrs}" if attrs else "")
            outs = ", ".join(node_ref(idx, j, len(n.outs)) for j in range(len(n.outs)))
            shapes = ", ".join(shape_str(s) for s, _ in n.outs)
            lines.append(f"  {outs} = {n.op}({args})  -> {shapes}")
        lines.append("  return " + ", ".join(self.outputs))
        return "\n".join(lines)

    def expression(self, ref: str | None = None) -> str:
        """One-line nested expression of an output, e.g. ``matmul(X, add(Y, Z))``."""
        if ref is None:
            return ", ".join(self.expression(r) for r in self.outputs)
        key, out = parse_ref(ref)
        if out is None:
            return key
        node = self.nodes[key]
        args = [self.expression(r) for r in node.inputs]
        args += [f"{k}={v}" for k, v in node.attrs if not _is_default(node.op, k, v)]
        text = f"{node.op}({', '.join(args)})"
        return f"{text}[{out}]" if len(node.outs) > 1 else text


def _is_default(op: str, key: str, value) -> bool:
    if op == OPAQUE:
        return False
    return get_op(op).attrs[key].default == value


def concrete_attrs(attrs, binding: Mapping | None) -> dict:
    """Attributes with their sizes evaluated under ``binding`` (a rule's symbols): ints, or
    Dims where a bound size is itself symbolic.  ``binding=None``: a graph's own attributes,
    whose symbolic sizes stay as they are."""
    out = {}
    for k, v in attrs:
        if isinstance(v, Dim):
            v = _concrete(v, binding)
        elif isinstance(v, tuple) and v and any(isinstance(d, Dim) for d in v):
            v = tuple(_concrete(d, binding) if isinstance(d, Dim) else d for d in v)
        out[k] = v
    return out


def _concrete(d: Dim, binding: Mapping):
    """A size under a binding of a rule's symbols (every one must be bound: a ValueError
    names a missing one); with ``binding=None``, a graph's own symbolic size as it is."""
    if not d.terms:
        return d.const
    if binding is None:
        return d
    if all(isinstance(binding.get(f), int) for f in d.symbols):
        return d.evaluate(binding)
    return plain(d.substitute(binding))


def instantiate_inputs(graph: Graph, binding: Mapping) -> dict:
    """Concrete shape of every input under a binding of size symbols."""
    return {i.name: evaluate_shape(i.shape, binding) for i in graph.inputs}
