"""The graph IR (graphopt.ir): construction, evaluation, torch lowering, JSON."""
import json

import numpy as np
import pytest
import torch

from graphopt.dims import Dim, shape_of
from graphopt.errors import RuleFormatError, ShapeError, UnknownOpError
from graphopt.ir import Graph, instantiate_inputs, parse_ref
from graphopt.ops import PRIME


def xyz_graph():
    """matmul(X, add(Y, Z)) with X:(a,b), Y,Z:(b,c)."""
    g = Graph()
    g.add_input("X", ["a", "b"])
    g.add_input("Y", ["b", "c"])
    g.add_input("Z", ["b", "c"])
    s = g.add("add", "Y", "Z")
    g.outputs = [g.add("matmul", "X", s)]
    return g


def split_graph():
    """X:(2c, b) split in halves along axis 0; returns (relu(top), bottom * s)."""
    g = Graph()
    g.add_input("X", ["2c", "b"])
    g.add_input("s", [])
    top, bottom = g.add("split", "X", axis=0, left="c")
    g.outputs = [g.add("relu", top), g.add("smul", bottom, "s")]
    return g


# -- construction ----------------------------------------------------------------------------

def test_add_input():
    g = Graph()
    assert g.add_input("X", ["a", 2, "b+c"], "float16") == "X"
    (inp,) = g.inputs
    assert inp.shape == (Dim.sym("a"), Dim.of(2), Dim.parse("b+c"))
    assert inp.dtype == "float16"
    assert g.type_of("X") == (inp.shape, "float16")
    assert inp.to_json() == {"name": "X", "shape": ["a", "2", "b+c"], "dtype": "float16"}


@pytest.mark.parametrize("name, dtype, message", [
    ("X", "int64", "unsupported dtype 'int64'"),
    ("X", "float32", "used twice"),      # X already exists
    ("%1", "float32", "invalid"),
])
def test_add_input_errors(name, dtype, message):
    g = Graph()
    g.add_input("X", ["a"])
    with pytest.raises(ShapeError, match=message):
        g.add_input(name, ["a"], dtype)
    assert len(g.inputs) == 1


def test_add_returns_refs_and_types():
    """Single-output nodes are %i, multi-output nodes %i.j; types are inferred."""
    g = Graph()
    g.add_input("X", ["2c", "b"])
    assert g.add("neg", "X") == "%0"
    assert g.add("split", "%0", axis=0, left="c") == ("%1.0", "%1.1")
    assert g.add("add", "%1.0", "%1.1") == "%2"
    assert g.add("transpose", "%2") == "%3"
    assert g.type_of("%1.1") == (shape_of(["c", "b"]), "float32")
    assert g.type_of("%3") == (shape_of(["b", "c"]), "float32")
    assert g.num_ops() == 4
    assert g.op_names() == ["neg", "split", "add", "transpose"]
    assert g.nodes[1].attr_dict == {"axis": 0, "left": Dim.sym("c")}
    assert g.nodes[3].attr_dict == {"dim0": -2, "dim1": -1}    # defaults are stored


def test_parse_ref():
    assert parse_ref("%3.1") == (3, 1)
    assert parse_ref("%3") == (3, 0)
    assert parse_ref("X") == ("X", None)


@pytest.mark.parametrize("op, inputs, attrs, error, message", [
    ("matmul", ("X", "X"), {}, ShapeError, r"^matmul: inner dimensions differ: b vs a"),
    ("add", ("X", "Y"), {}, ShapeError, r"^add: shapes differ: \(a, b\) vs \(b, c\)"),
    ("smul", ("X", "Y"), {}, ShapeError, r"^smul: second input must be a scalar"),
    ("neg", ("X", "Y"), {}, ShapeError, r"^neg takes 1 input\(s\), got 2"),
    ("neg", ("W",), {}, ShapeError, r"unknown tensor 'W'"),
    ("neg", ("%5",), {}, ShapeError, r"unknown tensor '%5'"),
    ("neg", ("%0.1",), {}, ShapeError, r"unknown tensor '%0.1'"),
    ("concat", ("X", "X"), {"axis": 0, "dim": 1}, ShapeError, r"^concat: unknown attribute\(s\) \['dim'\]"),
    ("add", ("X", "H"), {}, ShapeError, r"^add: inputs have different dtypes"),
    ("frobnicate", ("X",), {}, UnknownOpError, r"unknown op 'frobnicate'"),
])
def test_add_validates(op, inputs, attrs, error, message):
    """Invalid nodes are rejected with a message naming the problem, and not appended."""
    g = Graph()
    g.add_input("X", ["a", "b"])
    g.add_input("Y", ["b", "c"])
    g.add_input("H", ["a", "b"], "float16")
    g.add("neg", "X")
    with pytest.raises(error, match=message):
        g.add(op, *inputs, **attrs)
    assert g.num_ops() == 1


def test_add_malformed_ref_is_shape_error():
    g = Graph()
    g.add_input("X", ["a"])
    with pytest.raises(ShapeError):
        g.add("neg", "%x")


def test_non_canonical_refs_are_rejected():
    """A tensor has one spelling ('%0' for a single output, '%1.0' for a split's), so every
    ref that Graph.add accepts can be evaluated."""
    g = Graph()
    g.add_input("X", ["2c", "b"])
    g.add("neg", "X")
    with pytest.raises(ShapeError, match=r"unknown tensor '%0.0' \(did you mean '%0'\?\)"):
        g.add("neg", "%0.0")
    g.add("split", "%0", axis=0, left="c")
    with pytest.raises(ShapeError, match="did you mean '%1.0'"):
        g.add("neg", "%1")
    g.outputs = [g.add("neg", "%1.1")]
    out = g.evaluate({"X": np.ones((4, 3))}, "ref", {"c": 2, "b": 3})
    assert np.array_equal(out[0], np.ones((2, 3)))


def test_bind():
    g = split_graph()
    assert g.bind([(6, 4), ()]) == {"c": 3, "b": 4}
    with pytest.raises(ShapeError, match=r"do not fit X\(2c, b\), s\(\)"):
        g.bind([(7, 4), ()])
    with pytest.raises(ShapeError, match="input X: expected rank 2"):
        g.bind([(6,), ()])


def test_instantiate_inputs():
    assert instantiate_inputs(split_graph(), {"c": 3, "b": 5}) == {"X": (6, 5), "s": ()}


# -- evaluation --------------------------------------------------------------------------------

def test_evaluate_ref():
    """Reference evaluation computes the float64 values of the outputs."""
    g = xyz_graph()
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=(2, 3)), rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    (out,) = g.evaluate({"X": x, "Y": y, "Z": z}, "ref")
    np.testing.assert_allclose(out, x @ (y + z), rtol=1e-12)
    assert g.evaluate({"X": x, "Y": y, "Z": z})[0].shape == (2, 4)   # "ref" is the default


def test_evaluate_fingerprint():
    """Fingerprint evaluation is exact arithmetic modulo PRIME."""
    g = xyz_graph()
    rng = np.random.default_rng(1)
    x, y, z = (rng.integers(0, PRIME, size=s) for s in [(2, 3), (3, 4), (3, 4)])
    (out,) = g.evaluate({"X": x, "Y": y, "Z": z}, "fingerprint")
    X, S = x.tolist(), ((y + z) % PRIME).tolist()
    expected = [[sum(X[i][k] * S[k][j] for k in range(3)) % PRIME for j in range(4)] for i in range(2)]
    assert out.tolist() == expected


def test_evaluate_with_symbolic_attrs():
    """A symbolic split point is made concrete by the binding."""
    g = split_graph()
    x = np.arange(-12.0, 12.0).reshape(6, 4)
    a, b = g.evaluate({"X": x, "s": np.array(2.0)}, "ref", {"c": 3, "b": 4})
    np.testing.assert_array_equal(a, np.maximum(x[:3], 0))
    np.testing.assert_array_equal(b, 2 * x[3:])
    with pytest.raises(ValueError, match="'c'"):
        g.evaluate({"X": x, "s": np.array(2.0)}, "ref")   # no binding for c


def test_evaluate_outputs_order_and_inputs():
    """Outputs come back in the order of g.outputs; an input can itself be an output."""
    g = xyz_graph()
    g.outputs = ["X", g.outputs[0], "%0"]
    x, y, z = np.ones((2, 3)), np.full((3, 4), 2.0), np.full((3, 4), 3.0)
    outs = g.evaluate({"X": x, "Y": y, "Z": z})
    assert outs[0] is x
    np.testing.assert_array_equal(outs[1], np.full((2, 4), 15.0))
    np.testing.assert_array_equal(outs[2], np.full((3, 4), 5.0))


# -- torch lowering ------------------------------------------------------------------------------

@pytest.mark.parametrize("c, b", [(3, 4), (1, 2), (5, 1)])
def test_to_torch_symbolic_split(c, b):
    """The lowered callable binds the split size from the actual tensor shapes."""
    fn = split_graph().to_torch()
    x = torch.randn(2 * c, b, dtype=torch.float64)
    s = torch.tensor(-1.5, dtype=torch.float64)
    top, bottom = fn(x, s)
    assert tuple(top.shape) == tuple(bottom.shape) == (c, b)
    assert torch.equal(top, torch.relu(x[:c]))
    assert torch.equal(bottom, x[c:] * s)


def test_to_torch_matches_ref():
    g = xyz_graph()
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=s) for s in [(3, 5), (5, 2), (5, 2)]]
    (ref,) = g.evaluate(dict(zip("XYZ", arrays)), "ref")
    (got,) = g.to_torch()(*[torch.from_numpy(a) for a in arrays])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_to_torch_shape_errors():
    """Tensors that do not fit the symbolic input shapes raise ShapeError."""
    fn = split_graph().to_torch()
    s = torch.tensor(2.0)
    with pytest.raises(ShapeError, match="do not fit"):
        fn(torch.zeros(7, 4), s)             # 7 is not 2c
    with pytest.raises(ShapeError, match="expected rank 2"):
        fn(torch.zeros(6), s)
    g = xyz_graph()
    with pytest.raises(ShapeError, match="do not fit"):
        g.to_torch()(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(4, 5))   # b = 3 vs 4
    with pytest.raises(TypeError, match=r"expected 3 inputs \(X, Y, Z\), got 2"):
        g.to_torch()(torch.zeros(2, 3), torch.zeros(3, 4))


# -- JSON ------------------------------------------------------------------------------------------

def inputs_json(g):
    return [i.to_json() for i in g.inputs]


@pytest.mark.parametrize("make", [xyz_graph, split_graph])
def test_json_round_trip(make):
    """body_to_json / from_json reproduce the same graph (also through a JSON string)."""
    g = make()
    body = json.loads(json.dumps(g.body_to_json()))
    back = Graph.from_json(json.loads(json.dumps(inputs_json(g))), body)
    assert back.inputs == g.inputs
    assert back.nodes == g.nodes
    assert back.outputs == g.outputs
    assert back.body_to_json() == g.body_to_json()
    assert back.describe() == g.describe()


def test_body_to_json_format():
    """Attributes are JSON-friendly: constant dims are ints, symbolic dims strings."""
    g = Graph()
    g.add_input("X", [6, "2c"])
    parts = g.add("split", "X", axis=1, left="c")
    r = g.add("reshape", parts[0], shape=[6, "c"])
    g.outputs = [r, parts[1]]
    assert g.body_to_json() == {
        "nodes": [
            {"op": "split", "inputs": ["X"], "attrs": {"axis": 1, "left": "c"}},
            {"op": "reshape", "inputs": ["%0.0"], "attrs": {"shape": [6, "c"]}},
        ],
        "outputs": ["%1", "%0.1"],
    }
    g2 = Graph()
    g2.add_input("X", [6, 4])
    g2.outputs = [g2.add("split", "X", axis=0, left=2)]
    assert g2.body_to_json()["nodes"][0]["attrs"] == {"axis": 0, "left": 2}


X_AB = [{"name": "X", "shape": ["a", "b"]}]


@pytest.mark.parametrize("body, message", [
    ({"nodes": [{"op": "neg", "inputs": ["X"]}, {"op": "nosuch", "inputs": ["%0"]}], "outputs": ["%1"]},
     r"^rule 7 src: node 1: unknown op 'nosuch'"),
    ({"nodes": [{"op": "neg", "inputs": ["%3"]}], "outputs": ["%0"]},
     r"^rule 7 src: node 0: unknown tensor '%3'"),
    ({"nodes": [{"op": "neg", "inputs": ["X"]}, {"op": "neg", "inputs": ["Q"]}], "outputs": ["%1"]},
     r"^rule 7 src: node 1: unknown tensor 'Q'"),
    ({"nodes": [{"op": "transpose", "inputs": ["X"], "attrs": {"dim0": "x"}}], "outputs": ["%0"]},
     r"^rule 7 src: node 0: transpose: attribute 'dim0' has invalid value 'x'"),
    ({"nodes": [{"op": "neg", "inputs": ["X"], "attrs": {"axis": 0}}], "outputs": ["%0"]},
     r"^rule 7 src: node 0: neg: unknown attribute"),
    ({"nodes": [{"op": "matmul", "inputs": ["X", "X"]}], "outputs": ["%0"]},
     r"^rule 7 src: node 0: matmul: inner dimensions differ"),
    ({"nodes": [{"op": "neg", "inputs": ["X"]}], "outputs": ["%1"]},
     r"^rule 7 src: unknown tensor '%1'"),
    ({"nodes": [{"op": "neg", "inputs": ["X"]}]},
     r"^rule 7 src: malformed graph \(KeyError"),
    ({"nodes": "neg", "outputs": []},
     r"^rule 7 src: malformed graph: \"nodes\" must be a list"),
])
def test_from_json_errors(body, message):
    """from_json raises RuleFormatError naming where the problem is (node index first)."""
    with pytest.raises(RuleFormatError, match=message):
        Graph.from_json(X_AB, body, where="rule 7 src")


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "X", "shape": ["a-b"]}], r"^graph: malformed graph \(ValueError"),
    ([{"name": "X", "shape": ["a"], "dtype": "int8"}], r"^graph: input 'X': unsupported dtype"),
    ([{"shape": ["a"]}], r"^graph: malformed graph \(KeyError"),
])
def test_from_json_bad_inputs(inputs, message):
    with pytest.raises(RuleFormatError, match=message):
        Graph.from_json(inputs, {"nodes": [], "outputs": []})


def test_from_json_malformed_ref_names_node():
    with pytest.raises(RuleFormatError, match="node 0"):
        Graph.from_json(X_AB, {"nodes": [{"op": "neg", "inputs": ["%x"]}], "outputs": ["%0"]})


# -- describe / expression --------------------------------------------------------------------

def test_describe():
    """describe() lists inputs, one line per node (non-default attrs only), and the outputs."""
    assert split_graph().describe() == "\n".join([
        "  X: (2c, b) float32",
        "  s: () float32",
        "  %0.0, %0.1 = split(X; axis=0, left=c)  -> (c, b), (c, b)",
        "  %1 = relu(%0.0)  -> (c, b)",
        "  %2 = smul(%0.1, s)  -> (c, b)",
        "  return %1, %2",
    ])
    g = Graph()
    g.add_input("X", ["a", "b"])
    t = g.add("transpose", "X")
    g.outputs = [g.add("reduce_sum", t, axis=0), g.add("reduce_sum", t, axis=1, keepdim=False)]
    assert g.describe().splitlines()[1:] == [
        "  %0 = transpose(X)  -> (b, a)",
        "  %1 = reduce_sum(%0; axis=0)  -> (1, a)",
        "  %2 = reduce_sum(%0; axis=1, keepdim=False)  -> (b)",
        "  return %1, %2",
    ]


def test_expression():
    """expression() nests the producers of each output; multi-output nodes get [j]."""
    assert xyz_graph().expression() == "matmul(X, add(Y, Z))"
    g = split_graph()
    assert g.expression() == "relu(split(X, axis=0, left=c)[0]), smul(split(X, axis=0, left=c)[1], s)"
    assert g.expression("%2") == "smul(split(X, axis=0, left=c)[1], s)"
    assert g.expression("s") == "s"
    g2 = Graph()
    g2.add_input("X", ["a", "b", "c"])
    g2.outputs = [g2.add("transpose", "X", dim0=0, dim1=2)]
    assert g2.expression() == "transpose(X, dim0=0, dim1=2)"
