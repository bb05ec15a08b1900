"""Tensor parallelism: the parallel ops, the sharding rules and their verifier, the plan
search, one rank's program (simulated and on real gloo processes), the CLI and bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ops import REGISTRY, get_op
from graphopt.parallel.layouts import P, R, S, combine, part
from graphopt.parallel.rules import load_parallel_rules, strategies, verify_parallel_rule
from graphopt.rulelang import parse_rules
from graphopt.verify import verify_rule

PARALLEL_OPS = sorted(n for n, op in REGISTRY.items() if op.spmd)


# -- the parallel ops ---------------------------------------------------------------------

def test_parallel_ops_are_registered():
    assert PARALLEL_OPS == ["all_gather", "all_reduce", "partial", "reduce_scatter", "shard"]


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_op_semantics_match_layouts(world):
    """The registry's semantics over stacked ranks agree with the layouts' part/combine that
    the simulation and the lowering use."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((world, 3, 4 * world))          # a different value on every rank
    same = np.stack([x[0]] * world)                          # a replicated value
    t = [torch.from_numpy(v) for v in x]
    (out,) = get_op("all_reduce").ref([x], {"world": world})
    np.testing.assert_allclose(out, np.stack([combine(t, P).numpy()] * world))
    (out,) = get_op("all_gather").ref([x], {"axis": -1, "world": world})
    np.testing.assert_allclose(out[1], combine(t, S(-1)).numpy())
    (out,) = get_op("shard").ref([same], {"axis": -1, "world": world})
    for r in range(world):
        np.testing.assert_allclose(out[r], part(torch.from_numpy(x[0]), S(-1), r, world).numpy())
    (out,) = get_op("reduce_scatter").ref([x], {"axis": -1, "world": world})
    np.testing.assert_allclose(out[world - 1], part(combine(t, P), S(-1), world - 1, world).numpy())
    (out,) = get_op("partial").ref([same], {"world": world})
    np.testing.assert_allclose(out.sum(0), x[0])


def test_parallel_op_shapes():
    op = get_op("shard")
    with pytest.raises(Exception, match="equal parts"):
        op.infer_checked([(6, 5)], ["float32"], op.full_attrs({"axis": -1, "world": 2}))
    assert op.infer_checked([(6, 4)], ["float32"], op.full_attrs({"axis": -1, "world": 2}))[0][0] == (6, 2)
    g = get_op("all_gather")
    assert g.infer_checked([(6, 4)], ["float32"], g.full_attrs({"axis": 0, "world": 4}))[0][0] == (24, 4)


def test_blocked_layout_round_trip():
    """A blocked split (GPT-2's q, k, v side by side): each rank a part of every block."""
    x = torch.arange(24.0).reshape(2, 12)
    layout = S(-1, (4, 4, 4))
    parts = [part(x, layout, r, 2) for r in range(2)]
    assert parts[0][0].tolist() == [0, 1, 4, 5, 8, 9]
    assert torch.equal(combine(parts, layout), x)


# -- the sharding rules -------------------------------------------------------------------

def test_every_sharding_rule_is_verified_at_two_and_four_ranks():
    rules = load_parallel_rules()
    assert len(rules) >= 20
    for rule in rules:
        worlds = {e["world"]: e for e in rule.evidence["parallel"]}
        assert set(worlds) == {2, 4}, rule.name
        for e in worlds.values():
            assert e["float"] == 6 and e["fingerprint"], rule.name
            assert e["z3"] in ("proved", "not-algebraic"), rule.name
    proved = {r.name for r in rules if all(e["z3"] == "proved" for e in r.evidence["parallel"])}
    assert {"column", "row", "linear-column", "linear-row", "addmm-row", "vocab-embedding", "gqa-heads",
            "heads-matmul", "add-partial", "mul-partial", "reduce-scatter-gather"} <= proved


def test_sharding_rules_go_through_the_verifier_entry_point():
    """``verify_rule`` (what ``graphopt rules verify`` and every rule file use) hands a rule
    with parallel ops to the all-ranks verifier."""
    (rule,) = parse_rules("""
rule row:
    inputs X:(t,2k) W:(2k,n)
    matmul(X, W)  ==  all_reduce(matmul(shard(X, axis=-1, world=2), shard(W, axis=-2, world=2)), world=2)
""")
    verdict = verify_rule(rule.src, rule.dst)
    assert verdict.passed and verdict.evidence["z3"] == "proved" and verdict.evidence["world"] == 2


@pytest.mark.parametrize("text, why", [
    # a replicated tensor added on every rank before the all-reduce: counted twice
    ("""rule wrong-add:
    inputs A:(t,n) X:(t,n)
    add(all_reduce(A, world=2), X)  ==  all_reduce(add(A, X), world=2)""", "differs"),
    # a row split whose partial products are gathered instead of summed... of the wrong axis
    ("""rule wrong-axis:
    inputs X:(t,k) W:(k,2n)
    matmul(X, W)  ==  all_gather(matmul(X, shard(W, axis=-1, world=2)), axis=-2, world=2)""", None),
    # heads split of a softmax over the split axis
    ("""rule wrong-softmax:
    inputs A:(b,h,t,2n)
    softmax(all_gather(A, axis=-1, world=2))  ==  all_gather(softmax(A), axis=-1, world=2)""", "differs"),
])
def test_a_wrong_sharding_rule_is_refuted(text, why):
    try:
        (rule,) = parse_rules(text)
    except Exception as e:  # noqa: BLE001  (shapes that do not even match: refused at parse)
        assert why is None, e
        return
    ok, _, counterexample = verify_parallel_rule(rule, 2)
    assert not ok and why in counterexample


def test_rules_read_as_strategies():
    table = strategies()
    lin = {s.rule: (tuple(map(str, s.ins)), str(s.out)) for s in table["linear"]}
    assert lin["linear-column"] == (("R", "S(-2)"), "S(-1)")
    assert lin["linear-row"] == (("S(-1)", "S(-1)"), "P")
    assert {s.rule for s in table["addmm"]} == {"addmm-column", "addmm-row"}
    assert [str(x) for x in table["sdpa"][0].ins[:3]] == ["S(-3)"] * 3


# -- plans on hand-built blocks -----------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d=256, f=1024):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, d=256, heads=8):
        super().__init__()
        self.h = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.h, d // self.h).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(y.transpose(1, 2).reshape(b, t, d))


def _one_all_reduce(collectives: dict, nbytes: int) -> bool:
    """One all-reduce of the block's output, or its two halves (rule reduce-scatter-gather:
    the residual add then runs on each rank's part, as in Megatron's sequence parallelism)."""
    return collectives in ({"all_reduce": (1, nbytes)},
                           {"reduce_scatter": (1, nbytes), "all_gather": (1, nbytes)})


def _layouts(rep) -> dict:
    return {ln.weight: ln.layout for ln in rep.layers}


def test_the_megatron_plan_is_found_for_an_mlp():
    torch.manual_seed(0)
    rep, _ = graphopt.plan_parallel(MLP().eval(), (torch.randn(1, 256, 256),), 2, device="h100")
    got = _layouts(rep)
    assert got["fc1.weight"] == "S(-2)" and got["fc1.bias"] == "S(-1)"          # column split
    assert got["fc2.weight"] == "S(-1)" and got["fc2.bias"] == "P"              # row split
    assert _one_all_reduce(rep.collectives, 256 * 256 * 4)
    assert rep.megatron is not None and rep.time_plan <= rep.megatron * 1.0001
    assert "row split" in str(rep) and "column split" in str(rep)


def test_the_megatron_plan_is_found_for_an_attention_block():
    torch.manual_seed(0)
    rep, modules = graphopt.plan_parallel(Attention().eval(), (torch.randn(1, 256, 256),), 4, device="h100")
    got = _layouts(rep)
    assert [got[f"{p}_proj.weight"] for p in "qkv"] == ["S(-2)"] * 3 and got["o_proj.weight"] == "S(-1)"
    assert _one_all_reduce(rep.collectives, 256 * 256 * 4)
    assert rep.megatron is not None and rep.time_plan <= rep.megatron * 1.0001
    assert len(modules) == 4 and modules[1].q_proj.weight.shape == (64, 256)


def test_a_rank_holds_only_its_shards():
    torch.manual_seed(0)
    model = MLP().eval()
    _, modules = graphopt.plan_parallel(model, (torch.randn(1, 64, 256),), 2, device="h100")
    for r, m in enumerate(modules):
        sd = m.state_dict()
        assert sd["fc1.weight"].shape == (512, 256)
        assert torch.equal(sd["fc1.weight"], model.fc1.weight[r * 512:(r + 1) * 512])
        assert sd["fc1.weight"].untyped_storage().data_ptr() != model.fc1.weight.untyped_storage().data_ptr()


# -- Hugging Face models, every rank simulated in one process --------------------------------

def _hf(name, **over):
    from graphopt import hf
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = dict(n_embd=128, n_head=4, vocab_size=256, n_positions=64)
    else:
        cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256)
        if name == "llama":
            cfg["head_dim"] = 16
    cfg.update(over)
    return hf.from_config(name, layers=2, overrides=cfg), (torch.randint(0, 256, (2, 12)),)


@pytest.mark.parametrize("name, world", [("llama", 2), ("qwen2", 4), ("gpt2", 2), ("gpt2", 4)])
def test_hf_models_every_rank_simulated(name, world):
    """plan_parallel runs every rank's program in one process and compares it with the model
    (it raises on a difference); the layouts are the ones the model's structure needs."""
    model, inputs = _hf(name)
    rep, modules = graphopt.plan_parallel(model, inputs, world, device="h100")
    assert "outputs equal on all" in rep.checked
    got = _layouts(rep)
    assert rep.rank_bytes <= rep.weight_bytes * (1 / world + 0.05) + 1
    if name == "gpt2":    # the fused q/k/v projection is split per block
        assert got["model.transformer.h.0.attn.c_attn.weight"] == "S(-1, 3 blocks)"
    if name == "qwen2":   # 2 key/value heads, 4 ranks: the k/v projections stay replicated
        assert got["model.model.layers.0.self_attn.k_proj.weight"] == "R"
        assert got["model.model.layers.0.self_attn.q_proj.weight"] == "S(-2)"
    assert [lb.split(" on ")[0] for lb, _, _ in rep.predictions] == ["prefill T=1024", "decode (one token)"]


def test_heads_that_do_not_divide_are_replicated_and_said():
    model, inputs = _hf("llama")
    rep, _ = graphopt.plan_parallel(model, inputs, 3, device="h100")
    text = str(rep)
    assert "4 heads do not divide among 3 ranks" in text
    assert "some weights do not split among 3 ranks" in text and "no axis of (256, 64) divides" in text


def test_bad_input():
    model, inputs = _hf("llama")
    with pytest.raises(GraphoptError, match="not initialised"):
        graphopt.parallelize(model, inputs, 2)
    with pytest.raises(GraphoptError, match="world_size must be a positive integer"):
        graphopt.plan_parallel(model, inputs, 0)
    with pytest.raises(GraphoptError, match="torch.export cannot capture"):
        graphopt.plan_parallel(model, (torch.randn(3),), 2)


# -- real processes on gloo -----------------------------------------------------------------

def build_llama():
    return _hf("llama")


def build_gpt2():
    return _hf("gpt2")


def build_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 32)).train()
    return model, (torch.randn(4, 32),)


@pytest.mark.parametrize("build", [build_llama, build_gpt2])
def test_two_gloo_processes(build):
    from graphopt.parallel.launch import run_local
    results = run_local(build, 2, compile_backend="eager" if build is build_gpt2 else None)
    model, _ = build()
    names = set(model.state_dict())
    for r in results:
        assert r["diff"] < 1e-4 and r["diff_fresh"] < 1e-4
        assert build is not build_gpt2 or r["diff_compiled"] < 1e-4   # Dynamo traces the collectives
        assert r["rank_bytes"] <= 0.55 * r["whole_bytes"]
        assert set(r["names"]) - {n for n in r["names"] if n.startswith("_graphopt")} <= names
    assert "checked at parallelize time" in results[0]["report"]


def test_the_safety_net_refuses_a_plan_that_differs():
    """Dropout in training mode draws other numbers in the plan than in the model: the
    outputs differ on the example, and parallelize refuses on every rank."""
    from graphopt.parallel.launch import run_local
    with pytest.raises(GraphoptError, match="differ from the model's"):
        run_local(build_dropout, 2)


def test_cli_plan_only_and_errors(tmp_path):
    run = [sys.executable, "-m", "graphopt.cli", "optimize", "llama", "--layers", "1", "--seq-len", "16"]
    ok = subprocess.run(run + ["--tp", "8", "--device", "h100", "--plan-only"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "tensor-parallel plan: 8 ranks, costed on h100" in ok.stdout
    assert "prefill T=1024 on 8 H100" in ok.stdout and "Megatron-LM's plan" in ok.stdout
    for extra, message in ((["--tp", "0"], "--tp must be >= 1"),
                           (["--tp", "2", "--device", "h100"], "add --plan-only"),
                           (["--plan-only"], "give --tp N")):
        bad = subprocess.run(run + extra, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_runs_the_plan_on_two_gloo_processes():
    run = [sys.executable, "-m", "graphopt.cli", "optimize", "llama", "--layers", "1", "--seq-len", "16",
           "--tp", "2", "--runs", "1"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "ran on 2 processes (gloo" in out.stdout and "outputs equal to the model's" in out.stdout
    assert "checked at parallelize time: 1 outputs equal on all 2 ranks" in out.stdout


def test_a_plan_refuses_inputs_of_other_shapes():
    import torch.utils._pytree as pytree

    from graphopt.parallel.plan import ParallelPlan, ParallelReport
    class Flat(nn.Module):        # a rank's graph returns its outputs flat, in a list
        def forward(self, x):
            return [x]
    gm = torch.fx.symbolic_trace(Flat())
    _, spec = pytree.tree_flatten(((torch.zeros(1, 4),), {}))
    _, out_spec = pytree.tree_flatten([torch.zeros(1, 4)])
    plan = ParallelPlan(gm, spec, out_spec, ParallelReport(2, "cpu", "gloo"), shapes=[(1, 4)])
    assert plan(torch.ones(1, 4))[0].shape == (1, 4)
    with pytest.raises(GraphoptError, match=r"made for inputs of shapes \[\(1, 4\)\], got \[\(1, 5\)\]"):
        plan(torch.ones(1, 5))
