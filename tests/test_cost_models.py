"""Cost models: the shared protocol on both models, roofline, CPU calibration, measured cache."""
import json
import sqlite3

import pytest
import torch

import cost_models
from cost_models import DEVICES, CostModel, MeasuredCost, RooflineCost, get_cost_model
from cost_models import devices as devices_mod
from graphopt.dims import Dim
from graphopt.errors import GraphoptError
from graphopt.ir import Graph

# Small sizes keep the one-off CPU calibration quick.
FAST_CALIBRATION = {"float32": 256, "float64": 128, "bfloat16": 128, "float16": 64}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cost_cache")


@pytest.fixture(autouse=True)
def fast_calibration(monkeypatch):
    monkeypatch.setattr(devices_mod, "CALIBRATION_SIZES", FAST_CALIBRATION)
    monkeypatch.setattr(devices_mod, "COPY_ELEMENTS", 1 << 20)


@pytest.fixture
def one_thread():
    """Time on one thread: intra-op threads on a machine busy with other test runs
    wait on each other for whole scheduler slices, which swamps small timings."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["roofline", "measured"])
def model(request, cache_dir):
    if request.param == "roofline":
        return RooflineCost("cpu", cache_dir=cache_dir)
    request.getfixturevalue("one_thread")
    return MeasuredCost("cpu", cache_path=cache_dir / "measured.sqlite", warmup=1, repeats=5)


def mlp_graph(m=64, k=128, n=256):
    g = Graph()
    g.add_input("x", [m, k])
    g.add_input("w", [k, n])
    g.outputs = [g.add("relu", g.add("matmul", "x", "w"))]
    return g


def mm_cost(model, n):
    return model.op_cost("matmul", [(n, n), (n, n)], [(n, n)], "float32", {})


# -- the protocol, on both models ------------------------------------------------------

def test_is_cost_model(model):
    assert isinstance(model, CostModel)
    assert model.name in ("roofline", "measured") and model.device == "cpu"


def test_op_cost_positive(model):
    assert mm_cost(model, 32) > 0
    assert model.op_cost("relu", [(8, 8)], [(8, 8)], "float32", {}) > 0
    assert model.op_cost("smul", [(8, 8), ()], [(8, 8)], "float32", {}) > 0  # 0-d scalar operand


def test_matmul_cost_monotone_in_size(model):
    costs = [mm_cost(model, n) for n in (16, 128, 512)]
    assert costs[0] < costs[1] < costs[2]


def test_graph_cost_is_sum_of_node_costs(model):
    g = mlp_graph()
    costs = model.node_costs(g)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    assert model.graph_cost(g) == sum(costs)


def test_view_cheaper_than_matmul(model):
    shape = (128, 128)
    view = model.op_cost("transpose", [shape], [shape], "float32", {"dim0": -2, "dim1": -1})
    assert 0 < view < mm_cost(model, 128)


def test_dim_attrs_and_multi_output_nodes(model):
    g = Graph()
    g.add_input("x", [8, 12])
    left, right = g.add("split", "x", axis=1, left=4)
    r = g.add("reshape", right, shape=[2, 32])
    g.outputs = [left, r]
    costs = model.node_costs(g)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    # Dim-valued attributes given directly are converted too
    assert model.op_cost("split", [(8, 12)], [(8, 4), (8, 8)], "float32",
                         {"axis": 1, "left": Dim.of(4)}) == costs[0]


def test_opaque_and_unknown_ops_cost_nothing(model):
    g = mlp_graph()
    h = g.add_opaque(payload=None, inputs=[g.outputs[0]], outs=[((64, 256), "float32")])
    g.outputs = [g.add("neg", h)]
    costs = model.node_costs(g)
    assert costs[2] == 0.0 and all(c > 0 for i, c in enumerate(costs) if i != 2)
    assert model.op_cost("not_an_op", [(4,)], [(4,)], "float32", {}) == 0.0


def test_symbolic_graph_needs_size_hints(model):
    """A symbolic size is costed at its example value (size_hints); without one, an error
    that names the dimension."""
    from graphopt.dims import size_hints
    g = Graph()
    g.add_input("x", ["a", "b+c"])
    g.outputs = [g.add("relu", "x")]
    with pytest.raises(GraphoptError, match="symbolic dimension a"):
        model.graph_cost(g)
    concrete = Graph()
    concrete.add_input("x", [3, 9])
    concrete.outputs = [concrete.add("relu", "x")]
    with size_hints({"a": 3, "b": 4, "c": 5}):
        assert model.graph_cost(g) == model.graph_cost(concrete)
    g = Graph()
    g.add_input("x", ["a", "b+c"])
    g.outputs = list(g.add("split", "x", axis=1, left="b"))  # a symbolic attribute
    with pytest.raises(GraphoptError, match="symbol .b."):
        model.node_costs(g)


# -- roofline ----------------------------------------------------------------------------

def test_roofline_deterministic(cache_dir):
    """A graph costs the same on every instance whatever was priced before: the per-op memo
    answers only for the same op, shapes, dtype and attributes."""
    g = mlp_graph()
    for device in ("cpu", "h100"):
        fresh = RooflineCost(device, cache_dir=cache_dir)
        expected = fresh.node_costs(g)
        used = RooflineCost(device, cache_dir=cache_dir)
        for other in (mlp_graph(8, 8, 8), mlp_graph(32, 16, 64)):   # the same ops, other shapes
            assert used.node_costs(other) != expected
        half = Graph()
        half.add_input("x", [64, 128], "float16")
        half.add_input("w", [128, 256], "float16")
        half.outputs = [half.add("relu", half.add("matmul", "x", "w"))]
        assert used.node_costs(half) != expected                    # the same shapes, another dtype
        assert used.node_costs(g) == expected == fresh.node_costs(g)


def test_roofline_formula():
    h100 = DEVICES["h100"]
    model = RooflineCost("h100")
    n = 4096  # compute-bound in float16
    expected = h100.overhead + 2 * n ** 3 / h100.peak_flops["float16"]
    assert model.op_cost("matmul", [(n, n), (n, n)], [(n, n)], "float16", {}) == pytest.approx(expected)
    # relu is memory-bound: read and write n*n halves
    expected = h100.overhead + 2 * n * n * 2 / h100.bandwidth
    assert model.op_cost("relu", [(n, n)], [(n, n)], "float16", {}) == pytest.approx(expected)
    assert model.op_cost("reshape", [(n, n)], [(n * n,)], "float16", {"shape": (n * n,)}) == h100.view_overhead


def test_device_table():
    assert {"a100", "h100", "h200", "cpu"} <= set(DEVICES)
    for name in ("a100", "h100", "h200"):
        dev = DEVICES[name]
        assert set(dev.peak_flops) >= {"float32", "float16", "bfloat16"}
        assert dev.peak_flops["float16"] > dev.peak_flops["float32"] > 1e12
        assert dev.bandwidth > 1e12 and 0 < dev.overhead < 1e-4
    assert DEVICES["h200"].bandwidth > DEVICES["h100"].bandwidth > DEVICES["a100"].bandwidth
    g = mlp_graph(1024, 1024, 1024)
    assert RooflineCost("a100").graph_cost(g) > RooflineCost("h100").graph_cost(g)


def test_unknown_device_error():
    with pytest.raises(GraphoptError, match="unknown device 'tpu'.*a100") as e:
        RooflineCost("tpu")
    assert "\n" not in str(e.value)


def test_cpu_calibration_is_cached(tmp_path, monkeypatch):
    calls = []
    real = devices_mod.measure_cpu
    monkeypatch.setattr(devices_mod, "measure_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = RooflineCost("cpu", cache_dir=tmp_path)
    assert len(calls) == 1
    cached = json.loads((tmp_path / devices_mod.CALIBRATION_FILE).read_text())
    figures = cached[devices_mod.machine_key()]
    assert figures["bandwidth"] > 0 and all(v > 0 for v in figures["peak_flops"].values())
    second = RooflineCost("cpu", cache_dir=tmp_path)
    assert len(calls) == 1  # read from the cache, not measured again
    assert second.spec == first.spec
    assert set(first.spec.peak_flops) >= {"float32", "float16", "bfloat16"}


# -- measured ----------------------------------------------------------------------------

def test_measured_cache_hits(tmp_path, one_thread):
    path = tmp_path / "timings.sqlite"
    g = mlp_graph(16, 32, 32)
    g.outputs = [g.add("neg", g.outputs[0]), g.add("relu", g.outputs[0])]  # relu again: same instance
    first = MeasuredCost("cpu", cache_path=path, warmup=1, repeats=3)
    cost = first.graph_cost(g)
    assert first.measured == 3 and first.cache_hits == 0  # matmul, relu (once), neg
    first.close()
    second = MeasuredCost("cpu", cache_path=path, warmup=1, repeats=3)
    assert second.graph_cost(g) == cost
    assert second.measured == 0 and second.cache_hits == 3
    with sqlite3.connect(path) as db:
        keys = db.execute("SELECT device, op, shapes, dtype, attrs FROM timings").fetchall()
    assert len(keys) == 3 and all(k[0].startswith("cpu|") and "threads=" in k[0] for k in keys)


def test_measured_bad_device_or_cache(tmp_path):
    with pytest.raises(GraphoptError, match="device"):
        MeasuredCost("quantum", cache_path=tmp_path / "t.sqlite")
    with pytest.raises(GraphoptError, match="timing cache"):
        MeasuredCost("cpu", cache_path=tmp_path)  # a directory, not a database file


# -- get_cost_model ----------------------------------------------------------------------

def test_get_cost_model(tmp_path):
    assert isinstance(get_cost_model("roofline", device="h200"), RooflineCost)
    m = get_cost_model("measured", cache_path=tmp_path / "t.sqlite")
    assert isinstance(m, MeasuredCost) and m.name == "measured"
    with pytest.raises(GraphoptError, match="unknown cost model 'magic'.*measured.*roofline") as e:
        get_cost_model("magic")
    assert "\n" not in str(e.value)
    assert cost_models.__all__ and all(hasattr(cost_models, name) for name in cost_models.__all__)
