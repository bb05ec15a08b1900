"""torch.fx frontend and backend: import Dynamo and torch.export graphs into the IR
(unknown ops opaque), write them back, and get the same results."""
import pytest
import torch

from graphopt.dims import shape_of
import torch.nn as nn

from graphopt.backends.fx import export_fx
from graphopt.frontends.fx import import_fx
from graphopt.ir import OPAQUE


class Block(nn.Module):
    """A little of everything: linear (opaque today), layer norm (opaque), matmul,
    transpose, division by a literal, softmax (opaque), relu, scaling, residual add,
    a split into two parts and a concat."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        y = self.ln(x)
        q, k = self.q(y), self.k(y)
        a = (q @ k.transpose(-2, -1)) / 4.0
        a = a.softmax(-1)
        h = torch.relu(a @ y) * 2
        left, right = torch.split(h, [6, 10], dim=-1)
        h = torch.cat([right, left], dim=-1)
        return x + h * self.scale, left.sum(-1)


def _capture(model, *args):
    """The GraphModule(s) Dynamo hands to a backend, with their example inputs."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    return seen


def _assert_same(a, b):
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_dynamo_graph_round_trip():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 16)
    (gm, example), = _capture(model, x)
    code_before = gm.code
    imp = import_fx(gm)
    ops = [n.op for n in imp.graph.nodes]
    for op in ("matmul", "transpose", "sdiv", "relu", "smul", "add", "split", "concat", "reduce_sum",
               "linear_bias"):   # (a linear with a bias: the pipeline expands it to addmm)
        assert op in ops, (op, ops)
    assert ops.count(OPAQUE) == imp.counts["opaque"] >= 1  # layer_norm
    new = export_fx(imp)
    _assert_same(new(*example), gm(*example))
    assert gm.code == code_before  # the captured module is not modified


def test_export_graph_round_trip():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 16)
    ep = torch.export.export(model, (x,))
    imp = import_fx(ep.graph_module)
    assert {"matmul", "split", "concat"} <= {n.op for n in imp.graph.nodes}
    new = export_fx(imp)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    args = [state[spec.target] if spec.target else x for spec in ep.graph_signature.input_specs]
    _assert_same(new(*args), ep.graph_module(*args))
    _assert_same(new(*args), model(x))


def test_backend_via_torch_compile_gives_same_outputs():
    torch.manual_seed(1)
    model, x = Block().eval(), torch.randn(3, 5, 16)

    def backend(gm, example_inputs):
        return export_fx(import_fx(gm))
    out = torch.compile(model, backend=backend)(x)
    _assert_same(out, model(x))


def test_unknown_ops_are_carried_through():
    class Odd(nn.Module):
        def forward(self, x):
            n = x.size(-1)                      # a python int, not a tensor
            y = torch.nn.functional.gelu(x)     # not in the registry
            z = torch.cumsum(y, dim=-1) / n     # division by a symbolic-free int
            return torch.where(z > 0, z, -z).neg()
    model, x = Odd(), torch.randn(4, 6)
    (gm, example), = _capture(model, x)
    imp = import_fx(gm)
    assert imp.counts["opaque"] >= 3 and "neg" in [n.op for n in imp.graph.nodes]
    _assert_same(export_fx(imp)(*example), gm(*example))


def test_dynamic_shapes_are_symbolic_dims():
    """With symbolic sizes (Dynamo's dynamic=True) the IR states them as Dims: the matmuls
    on the symbolic length are registry ops, the example's length is kept as a hint, and
    the written-back graph runs at other lengths."""
    model = Block().eval()
    seen = []

    def backend(gm, example_inputs):
        imp = import_fx(gm)
        seen.append((imp, any(isinstance(t, torch.SymInt) for t in example_inputs)))
        return export_fx(imp)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for t in (5, 7, 1, 13):
        x = torch.randn(2, t, 16)
        _assert_same(compiled(x), model(x))
    assert seen and all(symbolic for _, symbolic in seen), seen   # captured with a symbolic length
    imp = seen[0][0]
    ops = [n.op for n in imp.graph.nodes]
    assert "matmul" in ops, ops
    symbolic = [d for n in imp.graph.nodes for shape, _ in n.outs for d in shape if not d.is_const]
    assert symbolic and imp.graph.hints and set(imp.graph.hints.values()) <= {2, 5}, imp.graph.hints
    assert all(set(d.symbols) <= set(imp.graph.hints) for d in symbolic)


def test_getitem_of_split_maps_to_outputs():
    def f(x):
        a, b = x.split([2, 3], dim=1)
        return b.relu(), a
    (gm, example), = _capture(f, torch.randn(4, 5))
    imp = import_fx(gm)
    assert [n.op for n in imp.graph.nodes] == ["split", "relu"]
    assert imp.graph.outputs == ["%1", "%0.0"]
    _assert_same(export_fx(imp)(*example), gm(*example))


@pytest.mark.parametrize("call, op, attrs", [
    (lambda x: x.t(), "transpose", {"dim0": -2, "dim1": -1}),
    (lambda x: x.transpose(1, 0), "transpose", {"dim0": -2, "dim1": -1}),
    (lambda x: x.permute(1, 0), "transpose", {"dim0": -2, "dim1": -1}),
    (lambda x: x.sum(dim=1, keepdim=True), "reduce_sum", {"axis": -1, "keepdim": True}),
    (lambda x: x.view(-1), "reshape", None),
    (lambda x: 3.0 * x, "smul", {}),
    (lambda x: x / 2, "sdiv", {}),
])
def test_spellings(call, op, attrs):
    (gm, example), = _capture(call, torch.randn(4, 6))
    imp = import_fx(gm)
    node = imp.graph.nodes[-1]
    assert node.op == op
    if attrs is not None:
        assert {k: v for k, v in node.attrs} == attrs
    _assert_same(export_fx(imp)(*example), gm(*example))


def test_broadcasting_add_is_badd():
    """The registry's add needs equal shapes; a broadcasting add (bias, mask) is badd, with
    the full-size operand first whichever side it was written on."""
    (gm, example), = _capture(lambda x, b: b + x, torch.randn(4, 6), torch.randn(6))
    imp = import_fx(gm)
    assert [n.op for n in imp.graph.nodes] == ["badd"]
    assert [imp.graph.type_of(r)[0] for r in imp.graph.nodes[0].inputs] == [shape_of((4, 6)), shape_of((6,))]


def test_add_that_broadcasts_both_ways_stays_opaque():
    (gm, example), = _capture(lambda x, b: x + b, torch.randn(4, 1), torch.randn(6))
    imp = import_fx(gm)
    assert [n.op for n in imp.graph.nodes] == [OPAQUE]


def test_opaque_node_returning_a_tuple():
    """topk is not in the registry and returns (values, indices): both stay usable."""
    def f(x):
        v, i = torch.topk(x, 2, dim=-1)
        return v.neg(), i
    (gm, example), = _capture(f, torch.randn(3, 5))
    imp = import_fx(gm)
    assert [n.op for n in imp.graph.nodes] == [OPAQUE, "neg"]
    _assert_same(export_fx(imp)(*example), gm(*example))


def test_opaque_tuple_of_one_tensor():
    def f(x):
        (y,) = torch.split(x, 5, dim=-1)   # one part: not the registry's two-way split
        return y.exp()
    (gm, example), = _capture(f, torch.randn(3, 5))
    imp = import_fx(gm)
    _assert_same(export_fx(imp)(*example), gm(*example))
