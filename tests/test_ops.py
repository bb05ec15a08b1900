"""Per-operator tests over every op in graphopt.ops.REGISTRY.

Most tests are parametrised over the registry, so a newly registered operator
is covered automatically: its OpDef must be complete, its float reference must
agree with its torch lowering on every instantiation the enumerator would try,
its fingerprint must agree with the reference modulo PRIME (algebraic ops) and
its Z3 semantics must agree with the reference after substituting numbers.
"""
import itertools

import numpy as np
import pytest
import torch
import z3

from graphopt.dims import Dim, evaluate_shape, shape_of
from graphopt.errors import NotAlgebraic, ShapeError, UnknownOpError
from graphopt.ir import concrete_attrs
from graphopt.ops import PRIME, REGISTRY, AttrSpec, OpDef, RegistryError, get_op, registry_version
from graphopt.ops.base import opdef_problems, register
from graphopt.ops.base import FLOAT_DTYPES

# the parallel ops' semantics are over all ranks (tests/test_parallel.py checks them)
OP_NAMES = sorted(n for n in REGISTRY if not REGISTRY[n].spmd)
ALGEBRAIC = [n for n in OP_NAMES if REGISTRY[n].algebraic]
# ops whose exact result is a fraction: checked by their own tests below
RATIONAL = {"recip"}
NON_ALGEBRAIC = [n for n in OP_NAMES if not REGISTRY[n].algebraic]

BINDING = {"a": 2, "b": 3, "c": 4, "d": 5}

# Symbolic input shapes tried for every op; the op's own enum_attrs and infer
# decide which combinations are valid.
SHAPE_POOL = [shape_of(s) for s in [
    (), ("a",), ("a", "b"), ("b", "a"), ("b", "c"), ("2a", "b"), ("a", "b+c"),
    ("a", "b", "c"), ("a", "c", "b"), (1, "b"),
]]

# Ops the enumerator does not instantiate (enum_attrs is None) need hand-chosen
# instantiations here: (input shapes, attrs).
HAND_INSTANCES = {
    "reshape": [
        ([(2, 6)], {"shape": (3, 4)}),
        ([(2, 3, 4)], {"shape": (6, 4)}),
        ([(6,)], {"shape": (1, 2, 3)}),
        ([(1,)], {"shape": ()}),
        ([("a", "b")], {"shape": ("a", "b")}),
    ],
    "softmax": [
        ([("a", "b")], {}),
        ([("a", "b", "c")], {"axis": -2}),
    ],
    "recip": [([()], {})],
    "sdpa": [
        ([("a", "b"), ("c", "b"), ("c", "d"), ()], {}),
        ([("a", "b"), ("c", "b"), ("c", "d"), ()], {"is_causal": True}),
        ([(4, "a", "b"), (2, "c", "b"), (2, "c", "d"), ()], {"enable_gqa": True}),
        ([(2, "a", "b"), (2, "a", "b"), (2, "a", "b"), ()], {"is_causal": True}),
    ],
    "badd": [
        ([("a", "b"), ("b",)], {}),
        ([("a", "b"), (1, "b")], {}),
        ([(2, "a", "b"), ("a", 1)], {}),
    ],
    "sdpa_masked": [
        ([("a", "b"), ("c", "b"), ("c", "d"), ("a", "c"), ()], {}),
        ([(2, "a", "b"), (2, "c", "b"), (2, "c", "d"), (1, "a", "c"), ()], {}),
        ([(4, "a", "b"), (2, "c", "b"), (2, "c", "d"), ("a", "c"), ()], {"enable_gqa": True}),
    ],
    "sadd": [([("a", "b"), ()], {})],
    "amax": [([("a", "b")], {"axis": -1}), ([(2, "a", "b")], {"axis": -2, "keepdim": False})],
    "bsub": [([("a", "b"), ("a", 1)], {}), ([(2, "a", "b"), ("b",)], {})],
    "bmul": [([("a", "b"), ("a", 1)], {}), ([(2, "a", "b"), (2, "a", 1)], {})],
    "smax": [([("a", "b"), ()], {})],
    "sigmoid": [([("a", "b")], {})],
    "logsumexp": [([("a", "b")], {"axis": -1}), ([(2, "a", "b")], {"axis": -1, "keepdim": True})],
    "sdpa_sink": [
        ([(2, "a", "b"), (2, "c", "b"), (2, "c", "d"), (2, "a", 1), ()], {}),
        ([(2, "a", "b"), (2, "a", "b"), (2, "a", "d"), (2, 1, 1), ()], {"is_causal": True}),
    ],
    "sdpa_sink_masked": [
        ([(2, "a", "b"), (2, "c", "b"), (2, "c", "d"), ("a", "c"), (2, "a", 1), ()], {}),
    ],
    "spow": [([("a", "b")], {"exponent": 2}), ([("a", "b")], {"exponent": 3})],
    "tanh": [([("a", "b")], {})],
    "gelu_tanh": [([("a", "b")], {}), ([(2, "a", "b")], {})],
    "repeat_heads": [
        ([(2, "a", "b")], {"heads": 4}),
        ([(3, "a", "b")], {"heads": 3}),
    ],
    "alias": [([("a", "b")], {}), ([()], {})],
    "linear": [([("a", "b"), ("c", "b")], {}), ([(2, "a", "b"), ("c", "b")], {})],
    "linear_bias": [([("a", "b"), ("c", "b"), ("c",)], {}), ([(2, "a", "b"), ("c", "b"), ("c",)], {})],
    "permute": [([(2, 3, 4)], {"perm": (1, 2, 0)}), ([(2, "a", "b", 3)], {"perm": (0, 2, 3, 1)})],
    "expand": [([(1, "b")], {"shape": ("a", "b")}), ([("a", 1)], {"shape": (2, "a", "b")})],
    "unit_scale": [([("a", "b")], {}), ([()], {})],
    "addmm": [([("d",), ("a", "b"), ("b", "d")], {}), ([("d",), (2, "a", "c"), ("c", "d")], {})],
    "addmm_gelu": [([("d",), ("a", "b"), ("b", "d")], {}), ([("d",), (2, "a", "c"), ("c", "d")], {})],
    "baddbmm": [([("a", 1, "c"), ("a", "b", "d"), ("a", "d", "c"), ()], {}),
                ([("b", "c"), ("a", "b", "d"), ("a", "d", "c"), ()], {})],
    "bcast_add": [([("a", 1), (1, "b")], {}), ([(2, 1, "b"), ("a", "b")], {})],
    "matmul_heads": [([(2, 1, "a", "b"), (2, 3, "b", "c")], {}), ([(3, "a", "b"), (1, "b", "c")], {})],
    "mask_bias": [([("a", "b")], {"dtype": "float64"}), ([(1, "b")], {"dtype": "float64", "keep": False})],
    "fill_masked": [([("a", "b"), ("a", "b")], {"dtype": "float64"}),
                    ([(2, "a", "b"), (1, "b")], {"dtype": "float64", "keep": False})],
}


def instances(name):
    """Every valid (symbolic input shapes, full attrs, inferred outs) of an op."""
    op = REGISTRY[name]
    if op.enum_attrs is None:
        candidates = [(tuple(shape_of(s) for s in shapes), attrs)
                      for shapes, attrs in HAND_INSTANCES.get(name, [])]
    else:
        candidates = [(shapes, attrs)
                      for shapes in itertools.product(SHAPE_POOL, repeat=op.arity)
                      for attrs in op.enum_attrs(shapes)]
    out = []
    for shapes, attrs in candidates:
        full = op.full_attrs(attrs)
        try:
            outs = op.infer_checked(shapes, _dtypes(op), full)
        except ShapeError:
            continue
        out.append((shapes, full, outs))
    return out


def concrete(full_attrs):
    return concrete_attrs(tuple(sorted(full_attrs.items())), BINDING)


def _dtypes(op) -> tuple:
    """float64 for every input, but a boolean mask where the op takes one."""
    return tuple("bool" if k in op.bool_operands else "float64" for k in range(op.arity))


def float_inputs(op, shapes, rng):
    """Uniform inputs in [-1, 1]; a scalar operand is kept away from zero (sdiv divides); a
    boolean mask operand is drawn True or False."""
    arrays = []
    for pos, s in enumerate(shapes):
        shape = evaluate_shape(s, BINDING)
        if pos in op.bool_operands:
            arrays.append(rng.uniform(size=shape) < 0.5)
        elif pos == op.scalar_operand:
            arrays.append(np.array(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0)))
        else:
            arrays.append(rng.uniform(-1.0, 1.0, size=shape))
    return arrays


def int_inputs(op, shapes, rng):
    """Small integer inputs (as float64).  With a scalar operand s != 0, the other
    inputs are multiples of s, so that even sdiv has an exact integer result."""
    arrays = [rng.integers(-4, 5, size=evaluate_shape(s, BINDING)).astype(np.float64)
              if pos not in op.bool_operands else rng.uniform(size=evaluate_shape(s, BINDING)) < 0.5
              for pos, s in enumerate(shapes)]
    if op.scalar_operand is not None:
        s = float(rng.choice([-3, -2, 2, 3]))
        arrays[op.scalar_operand] = np.array(s)
        arrays = [x if pos == op.scalar_operand else x * s for pos, x in enumerate(arrays)]
    return arrays


# -- completeness of every OpDef ---------------------------------------------------------

# the completeness check lives in the registry (graphopt.ops.base.opdef_problems) and runs at
# registration; these tests make sure it really fails on incomplete definitions


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_opdef_complete(name):
    """Every registered OpDef has all required fields set, under its own name."""
    op = REGISTRY[name]
    assert op.name == name
    assert get_op(name) is op
    assert opdef_problems(op) == []


def _good_opdef(**overrides):
    fields = dict(name="fake", arity=1, infer=lambda *a: [], compute=lambda *a: [],
                  lower=lambda *a: [], flops=lambda *a: 0, algebraic=True, doc="A fake op.")
    fields.update(overrides)
    return OpDef(**fields)


@pytest.mark.parametrize("override, field", [
    (dict(doc=""), "doc"),
    (dict(doc="   "), "doc"),
    (dict(name=""), "name"),
    (dict(arity=0), "arity"),
    (dict(infer=None), "infer"),
    (dict(compute=None), "compute"),
    (dict(lower="torch.neg"), "lower"),
    (dict(flops=None), "flops"),
    (dict(algebraic=1), "algebraic"),
    (dict(algebraic=None), "algebraic"),
    (dict(commutative=True), "commutative"),      # arity 1 cannot commute
    (dict(scalar_operand=1), "scalar_operand"),
    (dict(attrs={"axis": "int"}), "attrs"),
    (dict(attrs={"axis": AttrSpec("float")}), "attrs"),
])
def test_opdef_check_catches_missing_field(override, field):
    """The completeness check really fails on an OpDef that misses a field, and
    registering such an OpDef fails at once, naming the field."""
    assert opdef_problems(_good_opdef()) == []
    assert field in opdef_problems(_good_opdef(**override))
    with pytest.raises(RegistryError, match=field):
        register(_good_opdef(**override))
    assert "fake" not in REGISTRY


def test_register_refuses_a_second_definition():
    with pytest.raises(RegistryError, match="registered twice"):
        register(_good_opdef(name="matmul"))


@pytest.mark.parametrize("name", [n for n in OP_NAMES if REGISTRY[n].expand is not None])
def test_expansion_computes_the_op(name):
    """An op defined as other ops (``OpDef.expand``) computes what its expansion computes."""
    from graphopt.ir import Graph
    op = REGISTRY[name]
    rng = np.random.default_rng(0)
    for shapes, full, _ in instances(name):
        concrete_shapes = [evaluate_shape(s, BINDING) for s in shapes]
        xs = float_inputs(op, shapes, rng)
        want = op.ref(xs, concrete(full))
        g = Graph()
        refs = [g.add_external(f"x{k}", s, dt) for k, (s, dt) in enumerate(zip(concrete_shapes, _dtypes(op)))]
        out = []
        for step_op, args, attrs in op.expand(concrete_shapes, concrete(full)):
            ins = [out[a[1]] if isinstance(a, tuple) else refs[a] for a in args]
            out.append(g.add(step_op, *ins, **attrs))
        g.outputs = [out[-1]]
        got = g.evaluate({f"x{k}": x for k, x in enumerate(xs)})
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)


def test_enumerated_ops_are_derived_from_the_registry():
    from graphopt.enumerate import DEFAULT_OPS
    assert DEFAULT_OPS == tuple(n for n, op in REGISTRY.items() if op.enum_attrs is not None)
    assert DEFAULT_OPS == ("matmul", "add", "mul", "smul", "sdiv", "neg", "relu", "exp",
                           "transpose", "concat", "split", "reduce_sum")


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_has_instances(name):
    """Each op is instantiable (by its enum_attrs or by HAND_INSTANCES here)."""
    assert instances(name), (f"{name}: no valid instantiation; if enum_attrs is None, "
                             f"add hand-chosen ones to HAND_INSTANCES")


def test_get_op_unknown():
    with pytest.raises(UnknownOpError, match="'nosuchop'"):
        get_op("nosuchop")


def test_registry_version_stable():
    """registry_version is a deterministic string."""
    v = registry_version()
    assert isinstance(v, str) and v.startswith("1.") and len(v) == 10
    assert registry_version() == v


def test_registry_version_changes_with_registry(monkeypatch):
    """Registering another op (a signature change) changes the version string."""
    before = registry_version()
    monkeypatch.setitem(REGISTRY, "zz_fake", _good_opdef(name="zz_fake"))
    assert registry_version() != before
    monkeypatch.setitem(REGISTRY, "zz_fake", _good_opdef(name="zz_fake", algebraic=False))
    changed = registry_version()
    monkeypatch.delitem(REGISTRY, "zz_fake")
    assert registry_version() == before != changed


# -- PRIME -------------------------------------------------------------------------------

def test_prime_is_prime():
    """PRIME is prime and the largest prime below 2**24."""
    def is_prime(n):
        return n > 1 and all(n % k for k in range(2, int(n ** 0.5) + 1))
    assert is_prime(PRIME)
    assert PRIME < 2 ** 24
    assert not any(is_prime(n) for n in range(PRIME + 1, 2 ** 24))


def test_prime_products_fit_int64():
    """Two residues times an inner dimension of 2**15 fit in int64: a fingerprint matmul
    of all-(PRIME-1) matrices with inner dimension 2**15 is exact."""
    k = 2 ** 15
    assert k * (PRIME - 1) ** 2 <= np.iinfo(np.int64).max
    x = np.full((1, k), PRIME - 1, dtype=np.int64)
    y = np.full((k, 2), PRIME - 1, dtype=np.int64)
    (out,) = get_op("matmul").fingerprint([x, y], {})
    assert out.dtype == np.int64
    assert out.tolist() == [[(k * (PRIME - 1) ** 2) % PRIME] * 2]


# -- shape inference ---------------------------------------------------------------------

def infer(name, *shapes, dtype="float32", **attrs):
    op = get_op(name)
    return op.infer_checked(tuple(shape_of(s) for s in shapes), (dtype,) * len(shapes),
                            op.full_attrs(attrs))


VALID_CASES = [
    ("matmul", [("a", "b"), ("b", "c")], {}, [("a", "c")]),
    ("matmul", [("d", "a", "b"), ("d", "b", "c")], {}, [("d", "a", "c")]),
    ("add", [("a", "b"), ("a", "b")], {}, [("a", "b")]),
    ("mul", [(2, 3), (2, 3)], {}, [(2, 3)]),
    ("smul", [("a", "b"), ()], {}, [("a", "b")]),
    ("sdiv", [("a",), ()], {}, [("a",)]),
    ("neg", [("a", "b")], {}, [("a", "b")]),
    ("relu", [("a", "b")], {}, [("a", "b")]),
    ("exp", [()], {}, [()]),
    ("concat", [("b", "c"), ("b", "d")], {"axis": 1}, [("b", "c+d")]),
    ("concat", [("b", "c"), ("b", "d")], {"axis": -1}, [("b", "c+d")]),
    ("concat", [("a", "c"), ("a", "c")], {"axis": 0}, [("2a", "c")]),
    ("split", [("2c", "b")], {"axis": 0, "left": "c"}, [("c", "b"), ("c", "b")]),
    ("split", [("a", "b+c")], {"axis": 1, "left": "c"}, [("a", "c"), ("a", "b")]),
    ("split", [(5, "a")], {"axis": 0, "left": 2}, [(2, "a"), (3, "a")]),
    ("reduce_sum", [("a", "b")], {"axis": 1}, [("a", 1)]),
    ("reduce_sum", [("a", "b")], {"axis": 0, "keepdim": True}, [(1, "b")]),
    ("reduce_sum", [("a", "b")], {"axis": 0, "keepdim": False}, [("b",)]),
    ("transpose", [("a", "b")], {}, [("b", "a")]),
    ("transpose", [("a", "b", "c")], {}, [("a", "c", "b")]),
    ("transpose", [("a", "b", "c")], {"dim0": 0, "dim1": 2}, [("c", "b", "a")]),
    ("reshape", [(2, 6)], {"shape": (3, 4)}, [(3, 4)]),
    ("reshape", [(2, 3, 4)], {"shape": (24,)}, [(24,)]),
    ("reshape", [("a", "b")], {"shape": ("a", "b")}, [("a", "b")]),
    ("reshape", [("a*b", "c", "d")], {"shape": ("a", "b", "c", "d")}, [("a", "b", "c", "d")]),
    ("reshape", [("a", "b", "c")], {"shape": ("a*b", "c")}, [("a*b", "c")]),
]


@pytest.mark.parametrize("name, shapes, attrs, expected", VALID_CASES,
                         ids=[f"{c[0]}-{k}" for k, c in enumerate(VALID_CASES)])
def test_infer_valid(name, shapes, attrs, expected):
    """Valid inputs give the documented output shapes, with the input dtype."""
    outs = infer(name, *shapes, dtype="float16", **attrs)
    assert [s for s, _ in outs] == [shape_of(e) for e in expected]
    assert all(dt == "float16" for _, dt in outs)


INVALID_CASES = [
    ("matmul", [("a", "b"), ("c", "d")], {}, "inner dimensions differ"),
    ("matmul", [("a",), ("a", "b")], {}, "rank >= 2"),
    ("matmul", [("d", "a", "b"), ("e", "b", "c")], {}, "batch dimensions differ"),
    ("add", [("a", "b"), ("b", "a")], {}, "shapes differ"),
    ("mul", [("a",), ()], {}, "shapes differ"),
    ("smul", [("a", "b"), ("a",)], {}, "must be a scalar"),
    ("sdiv", [("a", "b"), ("a", "b")], {}, "must be a scalar"),
    ("concat", [("a", "b"), ("a",)], {"axis": 0}, "ranks differ"),
    ("concat", [("a", "b"), ("c", "d")], {"axis": 1}, "dimension 0 differs"),
    ("concat", [("a", "b"), ("a", "b")], {"axis": 2}, "out of range"),
    ("split", [("a", "b")], {"axis": 0, "left": "a"}, "cannot split"),
    ("split", [("a", "b")], {"axis": 0, "left": "c"}, "cannot split"),
    ("split", [("a", "b")], {"axis": 0, "left": 1}, "cannot split"),
    ("split", [(4, "b")], {"axis": 0, "left": 0}, "cannot split"),
    ("split", [(4, "b")], {"axis": 0, "left": 5}, "cannot split"),
    ("split", [("a",)], {"axis": 1, "left": 1}, "out of range"),
    ("reshape", [(2, 6)], {"shape": (5, 2)}, "12 elements into 10"),
    ("reshape", [("a", "b")], {"shape": ("a", "a")}, "for every size"),
    ("reshape", [("a*b", "c")], {"shape": ("a", "c", "c")}, "for every size"),
    ("reduce_sum", [()], {"axis": 0}, "out of range"),
    ("transpose", [("a",)], {}, "out of range"),
    ("transpose", [("a", "b")], {"dim0": 1, "dim1": -1}, "same axis"),
]


@pytest.mark.parametrize("name, shapes, attrs, message", INVALID_CASES,
                         ids=[f"{c[0]}-{k}" for k, c in enumerate(INVALID_CASES)])
def test_infer_invalid(name, shapes, attrs, message):
    """Invalid inputs raise ShapeError whose message starts with the op name."""
    with pytest.raises(ShapeError, match=rf"^{name}\b.*{message}"):
        infer(name, *shapes, **attrs)


@pytest.mark.parametrize("name", OP_NAMES)
def test_wrong_arity(name):
    """Too few or too many inputs raise ShapeError naming the op."""
    op = REGISTRY[name]
    for n in (op.arity - 1, op.arity + 1):
        with pytest.raises(ShapeError, match=rf"^{name} takes {op.arity} input\(s\), got {n}"):
            op.infer_checked((shape_of(("a",)),) * n, ("float32",) * n, {})


@pytest.mark.parametrize("name", [n for n in OP_NAMES if REGISTRY[n].arity - len(REGISTRY[n].bool_operands) >= 2])
def test_mixed_dtypes(name):
    """Inputs of different dtypes raise ShapeError naming the op."""
    shapes, full, _ = instances(name)[0]
    dtypes = ("float32",) + ("float16",) * (len(shapes) - 1)
    with pytest.raises(ShapeError, match=rf"^{name}: inputs have different dtypes"):
        REGISTRY[name].infer_checked(shapes, dtypes, full)


@pytest.mark.parametrize("name", OP_NAMES)
def test_unsupported_dtype(name):
    shapes, full, _ = instances(name)[0]
    why = "unsupported dtype 'int32'|input 0 must be a boolean mask, got 'int32'"
    with pytest.raises(ShapeError, match=rf"^{name}: ({why})"):
        REGISTRY[name].infer_checked(shapes, ("int32",) * len(shapes), full)


def test_a_boolean_operand_must_be_boolean():
    with pytest.raises(ShapeError, match=r"^fill_masked: input 1 must be a boolean mask, got 'float32'"):
        REGISTRY["fill_masked"].infer_checked(((2, 3), (2, 3)), ("float32", "float32"), {"dtype": "float32"})


@pytest.mark.parametrize("name", OP_NAMES)
def test_unknown_attribute(name):
    """An attribute the op does not declare raises ShapeError naming op and attribute."""
    with pytest.raises(ShapeError, match=rf"^{name}: unknown attribute\(s\) \['bogus'\]"):
        REGISTRY[name].full_attrs({"bogus": 1})


@pytest.mark.parametrize("name, attrs, message", [
    ("concat", {}, "missing attribute 'axis'"),
    ("split", {"axis": 0}, "missing attribute 'left'"),
    ("concat", {"axis": 1.5}, "attribute 'axis' has invalid value 1.5"),
    ("concat", {"axis": True}, "attribute 'axis' has invalid value True"),
    ("transpose", {"dim0": "x"}, "attribute 'dim0' has invalid value 'x'"),
    ("reduce_sum", {"axis": 0, "keepdim": 1}, "attribute 'keepdim' has invalid value 1"),
    ("split", {"axis": 0, "left": -1}, "attribute 'left' has invalid value -1"),
    ("split", {"axis": 0, "left": "a-b"}, "attribute 'left' has invalid value"),
    ("reshape", {"shape": 6}, "attribute 'shape' has invalid value 6"),
])
def test_bad_attribute_values(name, attrs, message):
    with pytest.raises(ShapeError, match=rf"^{name}: {message}"):
        get_op(name).full_attrs(attrs)


def test_full_attrs_defaults_and_coercion():
    """Defaults are filled in and values coerced to their kinds."""
    assert get_op("transpose").full_attrs({}) == {"dim0": -2, "dim1": -1}
    assert get_op("reduce_sum").full_attrs({"axis": 1}) == {"axis": 1, "keepdim": True}
    assert get_op("split").full_attrs({"axis": 0, "left": "2c"}) == {"axis": 0, "left": Dim.parse("2c")}
    assert get_op("reshape").full_attrs({"shape": [2, "a"]}) == {"shape": (Dim.of(2), Dim.sym("a"))}
    assert get_op("matmul").full_attrs(None) == {}


# -- semantics: float reference vs torch lowering ------------------------------------------

@pytest.mark.parametrize("name", OP_NAMES)
def test_ref_matches_torch(name):
    """On every instantiation, the float64 reference and the torch lowering agree,
    and both produce the shapes that shape inference promised."""
    op = REGISTRY[name]
    rng = np.random.default_rng(0)
    for shapes, full, outs in instances(name):
        attrs = concrete(full)
        arrays = float_inputs(op, shapes, rng)
        ref = op.ref(arrays, attrs)
        got = op.torch([torch.from_numpy(x.copy()) for x in arrays], attrs)
        assert len(ref) == len(got) == len(outs)
        for r, t, (shape, _) in zip(ref, got, outs):
            expected_shape = evaluate_shape(shape, BINDING)
            assert np.shape(r) == expected_shape, (name, shapes, full)
            assert tuple(t.shape) == expected_shape, (name, shapes, full)
            assert t.dtype == torch.float64
            np.testing.assert_allclose(t.numpy(), r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, arrays, attrs, expected", [
    ("add", [[1.0, 2.0], [10.0, 20.0]], {}, [[11.0, 22.0]]),
    ("mul", [[2.0, 3.0], [4.0, -1.0]], {}, [[8.0, -3.0]]),
    ("smul", [[2.0, 3.0], 2.0], {}, [[4.0, 6.0]]),
    ("sdiv", [[2.0, 3.0], 2.0], {}, [[1.0, 1.5]]),
    ("neg", [[2.0, -3.0]], {}, [[-2.0, 3.0]]),
    ("relu", [[2.0, -3.0, 0.0]], {}, [[2.0, 0.0, 0.0]]),
    ("exp", [[0.0, 1.0]], {}, [[1.0, np.e]]),
    ("matmul", [[[1.0, 2.0]], [[3.0], [4.0]]], {}, [[[11.0]]]),
    ("transpose", [[[1.0, 2.0]]], {"dim0": -2, "dim1": -1}, [[[1.0], [2.0]]]),
    ("concat", [[[1.0]], [[2.0]]], {"axis": 1}, [[[1.0, 2.0]]]),
    ("split", [[1.0, 2.0, 3.0]], {"axis": 0, "left": 1}, [[1.0], [2.0, 3.0]]),
    ("reduce_sum", [[[1.0, 2.0], [3.0, 4.0]]], {"axis": 1, "keepdim": True}, [[[3.0], [7.0]]]),
    ("reduce_sum", [[[1.0, 2.0], [3.0, 4.0]]], {"axis": 0, "keepdim": False}, [[4.0, 6.0]]),
    ("reshape", [[1.0, 2.0, 3.0, 4.0]], {"shape": (2, 2)}, [[[1.0, 2.0], [3.0, 4.0]]]),
])
def test_ref_known_values(name, arrays, attrs, expected):
    """The reference semantics give hand-computed values."""
    out = get_op(name).ref([np.array(x) for x in arrays], attrs)
    assert len(out) == len(expected)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, np.array(e))
        assert np.shape(o) == np.shape(e)


@pytest.mark.parametrize("name", [n for n in OP_NAMES if REGISTRY[n].commutative])
def test_commutative_ops_commute(name):
    op = REGISTRY[name]
    rng = np.random.default_rng(1)
    for shapes, full, _ in instances(name):
        x, y = float_inputs(op, shapes, rng)
        attrs = concrete(full)
        np.testing.assert_allclose(op.ref([x, y], attrs)[0], op.ref([y, x], attrs)[0], rtol=1e-12)


# -- semantics: fingerprint -----------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in ALGEBRAIC if n not in RATIONAL])
def test_fingerprint_matches_ref_mod_prime(name):
    """For algebraic ops, the fingerprint of integer inputs equals the exact reference
    result reduced modulo PRIME (sdiv inputs are multiples of the divisor)."""
    op = REGISTRY[name]
    rng = np.random.default_rng(2)
    for shapes, full, _ in instances(name):
        attrs = concrete(full)
        arrays = int_inputs(op, shapes, rng)
        ref = op.ref(arrays, attrs)
        fp = op.fingerprint([np.mod(x.astype(np.int64), PRIME) for x in arrays], attrs)
        assert len(fp) == len(ref)
        for r, f in zip(ref, fp):
            assert np.all(r == np.round(r)), "reference result should be an exact integer"
            f = np.asarray(f)
            assert f.dtype == np.int64
            assert np.all((0 <= f) & (f < PRIME))
            assert f.shape == np.shape(r)
            assert np.array_equal(f, np.mod(np.asarray(r).astype(np.int64), PRIME)), (name, shapes, full)


def test_fingerprint_sdiv_is_modular_inverse():
    """sdiv in the fingerprint domain multiplies by the modular inverse of the scalar."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, PRIME, size=(3, 4))
    s = np.array(int(rng.integers(1, PRIME)))
    (out,) = get_op("sdiv").fingerprint([x, s], {})
    inv = pow(int(s), PRIME - 2, PRIME)
    assert (int(s) * inv) % PRIME == 1
    assert out.tolist() == [[(int(v) * inv) % PRIME for v in row] for row in x.tolist()]
    # dividing then multiplying by the same scalar is the identity
    (back,) = get_op("smul").fingerprint([out, s], {})
    assert np.array_equal(back, x)


def test_fingerprint_large_residues_no_overflow():
    """add/mul/neg/smul/reduce_sum of residues near PRIME stay exact (checked with Python ints)."""
    rng = np.random.default_rng(4)
    x = rng.integers(PRIME - 1000, PRIME, size=(3, 5))
    y = rng.integers(PRIME - 1000, PRIME, size=(3, 5))
    s = np.array(PRIME - 2)
    X, Y = x.tolist(), y.tolist()
    cases = {
        "add": ([x, y], {}, [[(p + q) % PRIME for p, q in zip(r, t)] for r, t in zip(X, Y)]),
        "mul": ([x, y], {}, [[(p * q) % PRIME for p, q in zip(r, t)] for r, t in zip(X, Y)]),
        "smul": ([x, s], {}, [[(p * (PRIME - 2)) % PRIME for p in r] for r in X]),
        "neg": ([x], {}, [[(-p) % PRIME for p in r] for r in X]),
        "reduce_sum": ([x], {"axis": 1, "keepdim": True}, [[sum(r) % PRIME] for r in X]),
    }
    for name, (arrays, attrs, expected) in cases.items():
        assert get_op(name).fingerprint(arrays, attrs)[0].tolist() == expected, name


@pytest.mark.parametrize("name", OP_NAMES)
def test_fingerprint_deterministic(name):
    """Evaluating the fingerprint twice on the same inputs gives identical results
    and does not modify the inputs."""
    op = REGISTRY[name]
    rng = np.random.default_rng(5)
    for shapes, full, _ in instances(name):
        attrs = concrete(full)
        arrays = [rng.integers(1, PRIME, size=evaluate_shape(s, BINDING)) for s in shapes]
        copies = [x.copy() for x in arrays]
        first = op.fingerprint(arrays, attrs)
        second = op.fingerprint(copies, attrs)
        assert all(np.array_equal(p, q) for p, q in zip(first, second))
        assert all(np.array_equal(x, c) for x, c in zip(arrays, copies))


@pytest.mark.parametrize("name", NON_ALGEBRAIC)
def test_surrogate_non_degenerate(name):
    """A non-algebraic op's fingerprint surrogate is deterministic, stays in [0, PRIME),
    takes many distinct values, and is not the identity."""
    op = REGISTRY[name]
    shapes, full, _ = instances(name)[0]
    if op.bool_operands or op.type_only:   # a mask made additive (two values by design, in no
        return                              # rule); a constant of a dtype (unit_scale)
    if op.arity > 1 or "keepdim" in op.attrs:  # sdpa, a reduction: random residues of the instance's shapes
        rng = np.random.default_rng(7)
        arrays = [rng.integers(1, PRIME, size=evaluate_shape(s, BINDING), dtype=np.int64) for s in shapes]
        (out,) = op.fingerprint(arrays, concrete(full))
        (again,) = op.fingerprint([a.copy() for a in arrays], concrete(full))
        assert np.array_equal(out, again) and np.all((0 <= out) & (out < PRIME))
        assert len(np.unique(out)) == out.size  # no collapse to a few values
        return
    x = np.arange(0, 200, dtype=np.int64)
    big = np.arange(PRIME - 200, PRIME, dtype=np.int64)
    for arr in (x, big):
        arrays = [arr] + [arr] * (op.arity - 1)
        (out,) = op.fingerprint(arrays, concrete(full))
        (again,) = op.fingerprint([a.copy() for a in arrays], concrete(full))
        assert np.array_equal(out, again)
        assert np.all((0 <= out) & (out < PRIME))
        assert len(np.unique(out)) > 100
        assert not np.array_equal(out, arr)


@pytest.mark.parametrize("name, formula", [
    ("relu", lambda v: (v * (v + 1) + 1) % PRIME),
    ("exp", lambda v: (3 * v * v + 5 * v + 7) % PRIME),
])
def test_surrogate_formulas(name, formula):
    """relu uses TASO's x(x+1)+1, exp uses 3x^2+5x+7 (mod PRIME, exact for any residue)."""
    values = [0, 1, 2, 12345, PRIME // 2, PRIME - 2, PRIME - 1]
    (out,) = get_op(name).fingerprint([np.array(values, dtype=np.int64)], {})
    assert out.tolist() == [formula(v) for v in values]


def test_surrogates_differ():
    """relu and exp have different surrogates, so relu(x) and exp(x) never share a fingerprint."""
    x = np.arange(1, 50, dtype=np.int64)
    assert not np.array_equal(get_op("relu").fingerprint([x], {})[0], get_op("exp").fingerprint([x], {})[0])


# -- semantics: Z3 ----------------------------------------------------------------------------

def z3_array(prefix, shape):
    n = int(np.prod(shape, dtype=np.int64))
    arr = np.empty(n, dtype=object)
    for k in range(n):
        arr[k] = z3.Real(f"{prefix}_{k}")
    return arr.reshape(shape)


@pytest.mark.parametrize("name", NON_ALGEBRAIC)
def test_z3_not_algebraic(name):
    """Non-algebraic ops refuse the Z3 domain."""
    op = REGISTRY[name]
    shapes, full, _ = instances(name)[0]
    arrays = [z3_array(f"x{i}", evaluate_shape(s, BINDING)) for i, s in enumerate(shapes)]
    with pytest.raises(NotAlgebraic, match=name):
        op.z3(arrays, concrete(full))


def test_relu_exp_are_not_algebraic():
    assert set(NON_ALGEBRAIC) >= {"relu", "exp"}
    assert {"add", "mul", "smul", "sdiv", "neg", "matmul", "transpose", "concat", "split",
            "reshape", "reduce_sum"} <= set(ALGEBRAIC)


def test_recip_is_the_modular_inverse_and_exact_in_z3():
    import z3
    s = np.array(12345)
    (inv,) = get_op("recip").fingerprint([s], {})
    assert (int(inv) * 12345) % PRIME == 1
    x = np.empty((), dtype=object)
    x[()] = z3.Real("x")
    (r,) = get_op("recip").z3([x], {})
    solver = z3.Solver()
    solver.add(x[()] != 0, r[()] * x[()] != 1)
    assert solver.check() == z3.unsat
    assert get_op("recip").ref([np.array(4.0)], {})[0] == 0.25


@pytest.mark.parametrize("name", [n for n in ALGEBRAIC if n not in RATIONAL])
def test_z3_matches_ref(name):
    """For algebraic ops, the Z3 result is an array of Z3 expressions over the inputs'
    variables which, after substituting the integer inputs, equals the float reference."""
    op = REGISTRY[name]
    rng = np.random.default_rng(6)
    for shapes, full, outs in instances(name)[:4]:
        attrs = concrete(full)
        sym = [z3_array(f"x{i}", evaluate_shape(s, BINDING)) for i, s in enumerate(shapes)]
        nums = int_inputs(op, shapes, rng)
        subst = [(v, z3.RealVal(int(n)))
                 for s, n in zip(sym, nums)
                 for v, n in zip(np.asarray(s).reshape(-1), np.asarray(n).reshape(-1))]
        result = op.z3(sym, attrs)
        ref = op.ref(nums, attrs)
        assert len(result) == len(ref) == len(outs)
        for z, r, (shape, _) in zip(result, ref, outs):
            z = np.asarray(z, dtype=object)
            assert z.shape == evaluate_shape(shape, BINDING)
            for expr, value in zip(z.reshape(-1), np.asarray(r).reshape(-1)):
                assert isinstance(expr, z3.ExprRef)
                got = z3.simplify(z3.substitute(expr, *subst))
                assert z3.is_rational_value(got), (name, expr)
                assert got.as_fraction() == value, (name, shapes, full, expr)


def test_z3_sdiv_proves_identity():
    """Z3 semantics are symbolic: (x / s) * s == x is provable for s != 0."""
    x, s = z3_array("x", (2,)), z3_array("s", ())
    (q,) = get_op("sdiv").z3([x, s], {})
    (back,) = get_op("smul").z3([q, s], {})
    solver = z3.Solver()
    solver.add(s[()] != 0, z3.Or([p != v for p, v in zip(back.reshape(-1), x.reshape(-1))]))
    assert solver.check() == z3.unsat


# -- cost model hooks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", OP_NAMES)
def test_flops_and_bytes(name):
    """flops is a non-negative int; view ops move no bytes, others move inputs + outputs."""
    op = REGISTRY[name]
    for shapes, full, outs in instances(name):
        ins = [evaluate_shape(s, BINDING) for s in shapes]
        out_shapes = [evaluate_shape(s, BINDING) for s, _ in outs]
        flops = op.flops(ins, out_shapes, concrete(full))
        assert isinstance(flops, int) and flops >= 0
        moved = op.bytes(ins, out_shapes, "float32")
        if op.view:
            assert moved == 0
        else:
            numel = sum(int(np.prod(s, dtype=np.int64)) for s in ins + out_shapes)
            assert moved == 4 * numel


def test_flops_values():
    assert get_op("matmul").flops([(2, 3), (3, 4)], [(2, 4)], {}) == 2 * 2 * 4 * 3
    assert get_op("add").flops([(2, 3), (2, 3)], [(2, 3)], {}) == 6
    assert get_op("reduce_sum").flops([(2, 3)], [(2, 1)], {"axis": 1, "keepdim": True}) == 6
    assert get_op("transpose").flops([(2, 3)], [(3, 2)], {"dim0": -2, "dim1": -1}) == 0
    assert get_op("add").bytes([(2, 3), (2, 3)], [(2, 3)], "float16") == 18 * 2


def test_float_dtypes_listed():
    assert set(FLOAT_DTYPES) == {"float16", "bfloat16", "float32", "float64"}
