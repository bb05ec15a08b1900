"""The operator registry: every operator is defined once, here or in a sibling module.

An :class:`OpDef` holds everything the rest of graphopt needs to know about an
operator: its arity and attributes, shape/dtype inference, one *array
semantics* function evaluated in three domains (float reference, exact
fingerprint modulo a prime, Z3 symbolic), its lowering to torch, FLOP counts,
and how the enumerator instantiates its attributes.  Nothing else keeps a
per-operator table.

The array semantics are written once against a :class:`Domain`, so the float
reference, the fingerprint and the Z3 semantics cannot drift apart: they are
the same code with different number systems.  Operators with no exact algebraic
meaning (relu, exp) call ``dom.relu``/``dom.exp``: the fingerprint domain
substitutes a non-degenerate polynomial surrogate (TASO uses ``x(x+1)+1`` for
relu) and the Z3 domain raises :class:`NotAlgebraic`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..dims import Dim
from ..errors import NotAlgebraic, ShapeError, UnknownOpError

# Largest prime below 2**24: products of two residues fit in 48 bits, so an
# int64 matmul with an inner dimension below 2**15 cannot overflow.
PRIME = 16777213

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


class Domain:
    """Number system in which array semantics are evaluated."""

    name = "abstract"

    def mod(self, x):
        return x

    def relu(self, x):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def recip(self, x):
        raise NotImplementedError

    def tanh(self, x):
        raise NotImplementedError

    def softmax(self, x, axis: int, keep=None):
        """softmax over ``axis``; ``keep`` (0/1 array, broadcastable) masks entries out."""
        raise NotImplementedError


class FloatDomain(Domain):
    """Real arithmetic in float64 numpy: the reference semantics."""

    name = "float"

    def relu(self, x):
        return np.maximum(x, 0.0)

    def exp(self, x):
        with np.errstate(over="ignore"):
            return np.exp(x)

    def recip(self, x):
        with np.errstate(divide="ignore"):
            return 1.0 / x

    def tanh(self, x):
        return np.tanh(x)

    def softmax(self, x, axis: int, keep=None):
        if keep is not None:
            x = np.where(keep.astype(bool), x, -np.inf)
        m = np.max(x, axis=axis, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(x - m)
            return e / np.sum(e, axis=axis, keepdims=True)


class ModDomain(Domain):
    """Exact integer arithmetic modulo :data:`PRIME`: the fingerprint semantics."""

    name = "fingerprint"

    def mod(self, x):
        return np.mod(x, PRIME)

    def relu(self, x):  # TASO's surrogate for relu: x(x+1)+1
        return (x * ((x + 1) % PRIME) + 1) % PRIME

    def exp(self, x):  # a different non-degenerate polynomial: 3x^2+5x+7
        return ((3 * ((x * x) % PRIME)) + 5 * x + 7) % PRIME

    def tanh(self, x):  # and another: 5x^2+2x+11
        return ((5 * ((x * x) % PRIME)) + 2 * x + 11) % PRIME

    def recip(self, x):
        flat = [pow(int(v), PRIME - 2, PRIME) for v in np.asarray(x).reshape(-1)]
        return np.array(flat, dtype=np.int64).reshape(np.shape(x))

    def softmax(self, x, axis: int, keep=None):  # exp surrogate, normalised exactly
        e = self.exp(x)
        if keep is not None:
            e = (e * keep) % PRIME
        return (e * self.recip(np.sum(e, axis=axis, keepdims=True) % PRIME)) % PRIME


class Z3Domain(Domain):
    """Symbolic arithmetic over Z3 reals (numpy object arrays of Z3 terms)."""

    name = "z3"

    def relu(self, x):
        raise NotAlgebraic("relu")

    def exp(self, x):
        raise NotAlgebraic("exp")

    def tanh(self, x):
        raise NotAlgebraic("tanh")

    def softmax(self, x, axis: int, keep=None):
        raise NotAlgebraic("softmax")

    def recip(self, x):
        return np.vectorize(lambda v: 1 / v, otypes=[object])(x)


FLOAT, FINGERPRINT, Z3 = FloatDomain(), ModDomain(), Z3Domain()


@dataclass(frozen=True)
class AttrSpec:
    """An operator attribute: its kind (``int``, ``bool``, ``dim``, ``dims``) and default."""

    kind: str
    default: object = None


@dataclass(frozen=True)
class FxForm:
    """One way torch.fx spells an operator.

    Attributes:
        targets: ``call_function`` targets (``torch.matmul``, ``operator.matmul``,
            ATen overloads) and ``call_method`` names written ``"method:name"``.
        parse: ``(args, kwargs, ctx) -> (tensor_args, attrs) | None``.  ``ctx`` has
            ``is_tensor(a)``, ``rank(a)`` and ``out_shapes`` (concrete, from the
            node's metadata).  A python number may stand for a scalar operand;
            None means "this call is not this op" (the node stays opaque).
    """

    targets: tuple
    parse: Callable
    priority: int = 0  # forms of several ops on one target are tried highest first


@dataclass(frozen=True)
class OnnxForm:
    """One way ONNX spells an operator.

    Attributes:
        op_type: the ONNX node type (default domain), e.g. ``"MatMul"``.
        parse: ``(inputs, attrs, ctx) -> (tensor_args, attrs) | None``: ``inputs`` are the
            node's input names, ``attrs`` its attributes as python values; ``ctx`` has
            ``shape(name)``, ``dtype(name)``, ``const(name)`` (numpy value of an
            initializer, else None), ``out_shapes`` and ``opset``.  A tensor arg may also
            be a numpy array (a new constant).  None: "this node is not this op".
    """

    op_type: str
    parse: Callable
    priority: int = 0  # forms of several ops on one op_type are tried highest first


@dataclass(frozen=True)
class OpDef:
    """Everything graphopt knows about one operator.

    Attributes:
        name: registry name, also the name used in rule files.
        arity: number of tensor inputs.
        infer: ``(shapes, dtypes, attrs) -> [(shape, dtype), ...]``; raises
            :class:`ShapeError` on invalid input.  Shapes are tuples of :class:`Dim`.
        compute: ``(dom, arrays, attrs) -> [array, ...]`` array semantics, evaluated
            in the float, fingerprint and Z3 domains.  Attributes are concrete.
        lower: ``(tensors, attrs) -> [tensor, ...]`` the torch implementation.
        flops: ``(in_shapes, out_shapes, attrs) -> int`` on concrete shapes.
        algebraic: True when ``compute`` is exact polynomial/rational arithmetic,
            so Z3 can prove identities of graphs made of such ops (TASO: "linear ops").
        commutative: the two inputs may be swapped (the enumerator keeps one order).
        enum_attrs: ``(in_shapes) -> [attrs, ...]`` the attribute values the
            enumerator tries; None means the op is not enumerated.
        view: the op moves no data on a strided device (transpose, reshape, split).
        scalar_operand: position of an input that must be a 0-d tensor (smul, sdiv);
            the enumerator feeds scalars to no other position.
        type_only: the value depends on the input's dtype only, never on its values
            (``unit_scale``): computed once as a constant when constants are folded.
        bool_operands: positions of inputs that are boolean masks (every other input is a
            float tensor, all of one dtype).
        any_dtype: the op only moves data, so its input may also be a boolean mask.
        spmd: a parallel op (:mod:`graphopt.ops.parallel`): its shapes are one rank's, its
            array semantics the whole group's (a leading axis with one entry per rank).
    """

    name: str
    arity: int
    infer: Callable
    compute: Callable
    lower: Callable
    flops: Callable
    algebraic: bool
    doc: str
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    commutative: bool = False
    enum_attrs: Callable | None = None
    view: bool = False
    scalar_operand: int | None = None
    type_only: bool = False
    bool_operands: tuple = ()
    any_dtype: bool = False
    spmd: bool = False
    fx: tuple = ()  # FxForm, ...: how torch.fx graphs (Dynamo and torch.export) spell it
    onnx: tuple = ()  # OnnxForm, ...: how ONNX spells it
    # ``(b, inputs, attrs, outputs) -> None``: write the op as ONNX nodes producing the
    # output names given (``b``: backends.onnx.Builder); None: it cannot be written as ONNX
    to_onnx: Callable | None = None
    # ``(in_shapes, attrs) -> [(op, args, attrs), ...] | None``: the op defined as other registry
    # ops, which the pipeline's first stage substitutes (so rules see one canonical form); an
    # arg is the position of one of the op's inputs or ``("step", k)``, the k-th step's output
    expand: Callable | None = None

    # -- the three semantic domains --------------------------------------------------
    def ref(self, arrays: Sequence[np.ndarray], attrs: Mapping) -> list:
        """Float64 reference evaluation."""
        return list(self.compute(FLOAT, arrays, attrs))

    def fingerprint(self, arrays: Sequence[np.ndarray], attrs: Mapping) -> list:
        """Exact evaluation modulo PRIME (surrogates for non-polynomial ops)."""
        return list(self.compute(FINGERPRINT, arrays, attrs))

    def z3(self, arrays: Sequence[np.ndarray], attrs: Mapping) -> list:
        """Symbolic evaluation on arrays of Z3 terms; raises NotAlgebraic when impossible."""
        if not self.algebraic:
            raise NotAlgebraic(self.name)
        return list(self.compute(Z3, arrays, attrs))

    def torch(self, tensors: Sequence, attrs: Mapping) -> list:
        return list(self.lower(tensors, attrs))

    # -- attributes ---------------------------------------------------------------------
    def full_attrs(self, attrs: Mapping | None) -> dict:
        """Attributes with defaults filled in; unknown attribute names are rejected."""
        attrs = dict(attrs or {})
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for key, spec in self.attrs.items():
            value = attrs.get(key, spec.default)
            if value is None:
                raise ShapeError(f"{self.name}: missing attribute {key!r}")
            out[key] = _coerce_attr(self.name, key, spec.kind, value)
        return out

    def infer_checked(self, shapes, dtypes, attrs) -> list:
        if len(shapes) != self.arity:
            raise ShapeError(f"{self.name} takes {self.arity} input(s), got {len(shapes)}")
        floats = []
        for k, dt in enumerate(dtypes):
            if k in self.bool_operands:
                if dt != "bool":
                    raise ShapeError(f"{self.name}: input {k} must be a boolean mask, got {dt!r}")
                continue
            if dt not in FLOAT_DTYPES and not (self.any_dtype and dt == "bool"):
                raise ShapeError(f"{self.name}: unsupported dtype {dt!r}")
            floats.append(dt)
        if len(set(floats)) > 1:
            raise ShapeError(f"{self.name}: inputs have different dtypes {list(dtypes)}")
        return self.infer(tuple(shapes), tuple(dtypes), attrs)

    def bytes(self, in_shapes, out_shapes, dtype: str) -> int:
        """Bytes moved through memory by a naive kernel: read inputs, write outputs."""
        if self.view:
            return 0
        n = sum(_numel(s) for s in in_shapes) + sum(_numel(s) for s in out_shapes)
        return n * ITEMSIZE[dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _coerce_attr(op: str, key: str, kind: str, value):
    try:
        if kind == "int":
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == "dim":
            return Dim.of(value)
        if kind == "dims":
            return tuple(Dim.of(v) for v in value)
        if kind == "dtype":
            if value not in FLOAT_DTYPES:
                raise ValueError
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    raise ShapeError(f"{op}: attribute {key!r} has invalid value {value!r}")


REGISTRY: dict[str, OpDef] = {}
ATTR_KINDS = ("int", "bool", "dim", "dims", "dtype")  # dtype: a name in FLOAT_DTYPES


class RegistryError(ValueError):
    """An operator definition that is incomplete or inconsistent: raised at registration,
    so a missing field fails when graphopt is imported, not later in a test or a model."""


def opdef_problems(op: OpDef) -> list:
    """The fields of an OpDef that are missing or wrong (empty when it is complete)."""
    problems = []
    if not (isinstance(op.name, str) and op.name.isidentifier()):
        problems.append("name")
    if not (isinstance(op.arity, int) and not isinstance(op.arity, bool) and op.arity >= 1):
        problems.append("arity")
    for fn in ("infer", "compute", "lower", "flops"):
        if not callable(getattr(op, fn, None)):
            problems.append(fn)
    if not (isinstance(op.doc, str) and op.doc.strip()):
        problems.append("doc")
    if not isinstance(op.algebraic, bool):
        problems.append("algebraic")
    if not isinstance(op.commutative, bool) or (op.commutative and op.arity != 2):
        problems.append("commutative")
    if not isinstance(op.view, bool):
        problems.append("view")
    if not isinstance(op.spmd, bool):
        problems.append("spmd")
    if op.scalar_operand is not None and not (isinstance(op.scalar_operand, int)
                                              and 0 <= op.scalar_operand < op.arity):
        problems.append("scalar_operand")
    if op.enum_attrs is not None and not callable(op.enum_attrs):
        problems.append("enum_attrs")
    if not isinstance(op.attrs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, AttrSpec) and v.kind in ATTR_KINDS
            for k, v in op.attrs.items()):
        problems.append("attrs")
    if not all(isinstance(f, FxForm) and callable(f.parse) and isinstance(f.targets, tuple) for f in op.fx):
        problems.append("fx")
    if not all(isinstance(f, OnnxForm) and callable(f.parse) and isinstance(f.op_type, str) for f in op.onnx):
        problems.append("onnx")
    if op.to_onnx is not None and not callable(op.to_onnx):
        problems.append("to_onnx")
    if op.expand is not None and not callable(op.expand):
        problems.append("expand")
    return problems


def register(op: OpDef) -> OpDef:
    """Add an operator to the registry, after checking that its definition is complete."""
    if not isinstance(op, OpDef):
        raise RegistryError(f"register() takes an OpDef, got {type(op).__name__}")
    problems = opdef_problems(op)
    if problems:
        raise RegistryError(f"operator {op.name!r}: missing or invalid field(s): {', '.join(problems)}")
    if op.name in REGISTRY:
        raise RegistryError(f"operator {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def enumerable_ops() -> tuple:
    """The ops the rule generator enumerates by default: every registered op that says how
    to instantiate its attributes (``enum_attrs``), in registry order."""
    return tuple(name for name, op in REGISTRY.items() if op.enum_attrs is not None)


def get_op(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownOpError(f"unknown op {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def registry_version() -> str:
    """A version string that changes whenever an operator's signature changes (the parallel
    ops are not counted: the optimizer's rule libraries cannot contain them, and their own
    rules, ``substitutions/parallel.rules``, are verified whenever they are loaded)."""
    sig = ";".join(
        f"{o.name}/{o.arity}/{sorted((k, s.kind) for k, s in o.attrs.items())}/{o.algebraic}"
        for o in sorted(REGISTRY.values(), key=lambda o: o.name) if not o.spmd
    )
    return "1." + hashlib.sha1(sig.encode()).hexdigest()[:8]


# -- helpers shared by operator definitions ------------------------------------------------

def same_shape(name: str, shapes) -> tuple:
    first = shapes[0]
    for s in shapes[1:]:
        if s != first:
            raise ShapeError(f"{name}: shapes differ: {_fmt(first)} vs {_fmt(s)}")
    return first


def norm_axis(name: str, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"{name}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def numel_int(shape) -> int:
    return _numel(shape)
