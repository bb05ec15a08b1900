"""Property tests (hypothesis) over random small graphs built from the op registry.

Graphs have 1-4 ops over the fixed symbolic inputs X:(a,b), Y:(b,c), Z:(b,c),
W:(a,b+c) and a scalar s.  Each step draws an op, then one of its valid
(inputs, attrs) choices given the tensors built so far (attribute values are
the ones the enumerator would try), so invalid combinations (ShapeError) are
never drawn and every op in the registry can appear.
"""
import itertools
import json

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graphopt.dims import evaluate_shape
from graphopt.errors import ShapeError
from graphopt.ir import Graph, node_ref
from graphopt.ops import PRIME, REGISTRY

INPUTS = [("X", ["a", "b"]), ("Y", ["b", "c"]), ("Z", ["b", "c"]), ("W", ["a", "b+c"]), ("s", [])]
BINDINGS = [{"a": 2, "b": 3, "c": 4}, {"a": 3, "b": 5, "c": 2}]
OP_NAMES = sorted(n for n in REGISTRY if not REGISTRY[n].spmd)  # (parallel ops: test_parallel.py)
ALGEBRAIC_OPS = [n for n in OP_NAMES if REGISTRY[n].algebraic]

# attribute values for ops the enumerator does not instantiate (enum_attrs None)
HAND_ATTRS = {"reshape": lambda shapes: [{"shape": shapes[0]}]}

SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def attr_options(name, shapes):
    op = REGISTRY[name]
    if op.enum_attrs is not None:
        return list(op.enum_attrs(tuple(shapes)))
    return HAND_ATTRS.get(name, lambda s: [])(shapes)


def refs_of(g):
    refs = [i.name for i in g.inputs]
    for idx, n in enumerate(g.nodes):
        refs += [node_ref(idx, j, len(n.outs)) for j in range(len(n.outs))]
    return refs


def valid_choices(g, name):
    """Every (inputs, attrs) with which op ``name`` can be added to ``g`` now."""
    op = REGISTRY[name]
    out = []
    for inputs in itertools.product(refs_of(g), repeat=op.arity):
        types = [g.type_of(r) for r in inputs]
        for attrs in attr_options(name, [s for s, _ in types]):
            try:
                op.infer_checked([s for s, _ in types], [d for _, d in types], op.full_attrs(attrs))
            except ShapeError:
                continue
            out.append((inputs, attrs))
    return out


@st.composite
def graphs(draw, ops=OP_NAMES, max_ops=4):
    """A random valid graph of 1..max_ops nodes; outputs: the last node's outputs
    plus a random selection of earlier ones."""
    g = Graph()
    for name, shape in INPUTS:
        g.add_input(name, shape)
    for _ in range(draw(st.integers(1, max_ops))):
        for _attempt in range(8):
            name = draw(st.sampled_from(ops))
            choices = valid_choices(g, name)
            if choices:   # ops with no valid inputs yet (e.g. split before a concat) are redrawn
                inputs, attrs = draw(st.sampled_from(choices))
                g.add(name, *inputs, **attrs)
                break
    assume(g.nodes)
    last = len(g.nodes) - 1
    outs = [node_ref(last, j, len(g.nodes[last].outs)) for j in range(len(g.nodes[last].outs))]
    earlier = [r for r in refs_of(g) if r.startswith("%") and r not in outs]
    extra = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
    g.outputs = extra + outs
    return g


def float_env(g, binding, seed):
    """Inputs in [-1, 1]; the scalar is kept away from 0 (it may divide)."""
    rng = np.random.default_rng(seed)
    env = {}
    for inp in g.inputs:
        shape = evaluate_shape(inp.shape, binding)
        if shape == ():
            env[inp.name] = np.array(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))
        else:
            env[inp.name] = rng.uniform(-1.0, 1.0, size=shape)
    return env


def fingerprint_env(g, binding, seed):
    rng = np.random.default_rng(seed)
    return {i.name: rng.integers(1, PRIME, size=evaluate_shape(i.shape, binding)) for i in g.inputs}


def fingerprints(g, binding=BINDINGS[0], seed=0):
    return g.evaluate(fingerprint_env(g, binding, seed), "fingerprint", binding)


def assert_close(got, ref):
    """Same shape, same non-finite entries, finite entries equal up to rounding
    (relative to the magnitude of the values, as summation order may differ)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    assert np.array_equal(got[~np.isfinite(got)], ref[~np.isfinite(ref)], equal_nan=True)
    finite = np.isfinite(ref)
    scale = max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
    assert np.allclose(got[finite], ref[finite], rtol=1e-9, atol=1e-12 * scale)


def round_trip(g):
    inputs = json.loads(json.dumps([i.to_json() for i in g.inputs]))
    return Graph.from_json(inputs, json.loads(json.dumps(g.body_to_json())))


@SETTINGS
@given(graphs(), st.integers(0, 2 ** 32 - 1))
def test_ref_matches_torch(g, seed):
    """The float64 reference and the torch lowering agree, at two size bindings;
    output shapes are the inferred symbolic shapes evaluated at the binding."""
    fn = g.to_torch()
    for binding in BINDINGS:
        env = float_env(g, binding, seed)
        with np.errstate(all="ignore"):
            ref = g.evaluate(env, "ref", binding)
        got = fn(*[torch.from_numpy(env[i.name].copy()) for i in g.inputs])
        assert len(ref) == len(got) == len(g.outputs)
        for r, t, out in zip(ref, got, g.outputs):
            assert t.dtype == torch.float64
            assert np.shape(r) == evaluate_shape(g.type_of(out)[0], binding)
            assert_close(t.numpy(), r)


@SETTINGS
@given(graphs(), st.integers(0, 2 ** 32 - 1))
def test_fingerprint_deterministic(g, seed):
    """Fingerprints are exact residues, identical on re-evaluation, and do not
    modify the inputs."""
    env = fingerprint_env(g, BINDINGS[0], seed)
    saved = {k: v.copy() for k, v in env.items()}
    first = g.evaluate(env, "fingerprint", BINDINGS[0])
    second = g.evaluate({k: v.copy() for k, v in saved.items()}, "fingerprint", BINDINGS[0])
    assert all(np.array_equal(env[k], saved[k]) for k in env)
    for p, q, out in zip(first, second, g.outputs):
        p = np.asarray(p)
        assert np.array_equal(p, np.asarray(q))
        assert p.dtype == np.int64
        assert np.all((0 <= p) & (p < PRIME))
        assert p.shape == evaluate_shape(g.type_of(out)[0], BINDINGS[0])


@SETTINGS
@given(graphs())
def test_json_round_trip_preserves_fingerprints(g):
    """to_json / from_json keeps the structure and the fingerprints."""
    back = round_trip(g)
    assert back.body_to_json() == g.body_to_json()
    assert back.describe() == g.describe()
    for p, q in zip(fingerprints(g), fingerprints(back)):
        assert np.array_equal(p, q)


@SETTINGS
@given(graphs())
def test_commuted_graph_is_equivalent(g):
    """Swapping the inputs of every commutative op gives a different graph with the
    same fingerprints and the same float outputs."""
    body = g.body_to_json()
    for node in body["nodes"]:
        if REGISTRY[node["op"]].commutative:
            node["inputs"].reverse()
    other = Graph.from_json([i.to_json() for i in g.inputs], body)
    for p, q in zip(fingerprints(g), fingerprints(other)):
        assert np.array_equal(p, q)
    env = float_env(g, BINDINGS[1], 0)
    with np.errstate(all="ignore"):
        for r, o in zip(g.evaluate(env, "ref", BINDINGS[1]), other.evaluate(env, "ref", BINDINGS[1])):
            assert_close(o, r)


@SETTINGS
@given(graphs(ALGEBRAIC_OPS, max_ops=3), graphs(ALGEBRAIC_OPS, max_ops=3))
def test_equal_fingerprints_imply_equal_floats(g, h):
    """For graphs of algebraic ops: equal symbolic output shapes and equal fingerprints
    at one size binding imply equal float reference outputs at another binding."""
    g.outputs, h.outputs = g.outputs[-1:], h.outputs[-1:]
    assume(g.type_of(g.outputs[0])[0] == h.type_of(h.outputs[0])[0])
    if not np.array_equal(fingerprints(g)[0], fingerprints(h)[0]):
        # distinct fingerprints: then the outputs differ on (almost) every input
        return
    env = float_env(g, BINDINGS[1], 1)
    assert_close(h.evaluate(env, "ref", BINDINGS[1])[0], g.evaluate(env, "ref", BINDINGS[1])[0])


@SETTINGS
@given(graphs())
def test_fingerprint_distinguishes_perturbed_input(g):
    """Fingerprints depend on the inputs: bumping one entry of an input changes some
    output fingerprint whenever it changes some float output."""
    binding = BINDINGS[0]
    env = fingerprint_env(g, binding, 3)
    base = g.evaluate(env, "fingerprint", binding)
    fenv = float_env(g, binding, 3)
    with np.errstate(all="ignore"):
        fbase = g.evaluate(fenv, "ref", binding)
    for name in env:
        bumped = dict(env)
        bumped[name] = env[name].copy()
        bumped[name].reshape(-1)[0] = (bumped[name].reshape(-1)[0] + 1) % PRIME
        fbumped = dict(fenv)
        fbumped[name] = fenv[name] + 0.0
        fbumped[name].reshape(-1)[0] += 0.25
        with np.errstate(all="ignore"):
            float_changed = any(not np.array_equal(p, q, equal_nan=True)
                                for p, q in zip(fbase, g.evaluate(fbumped, "ref", binding)))
        fp_changed = any(not np.array_equal(p, q)
                         for p, q in zip(base, g.evaluate(bumped, "fingerprint", binding)))
        if float_changed:
            assert fp_changed, name
