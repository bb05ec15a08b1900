"""The ONNX path: ``graphopt.optimize_onnx`` and ``graphopt optimize model.onnx``.

Hand-built graphs (onnx.helper) mixing registry ops with ops graphopt does not model
(LayerNormalization, Sin, an ``If`` whose branches read an outer-scope tensor, a custom
domain) go through import, search and export: the result passes the full ONNX checker, keeps
the graph's inputs and outputs (names and order) and its opaque nodes, and computes the same
in onnxruntime.  Attention is fused into ONNX ``Attention`` at opset 23 (and only there), a
tiny HF GPT-2 exported with ``torch.onnx.export(dynamo=True)`` has both blocks fused, a model
corrupted on the way out is caught by verification, and bad input through the CLI ends in one
``graphopt: error:`` line.
"""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphopt  # noqa: E402
from graphopt.backends.onnx import export_onnx  # noqa: E402
from graphopt.frontends.onnx import import_onnx  # noqa: E402

FAST = dict(time_limit=5.0)  # small graphs: the search ends long before this


# ----------------------------------------------------------------------------- helpers

def _model(nodes, inputs, outputs, inits=None, opset=23, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v), k)
                                           for k, v in (inits or {}).items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="test_onnx")
    model.ir_version = 11 if opset >= 23 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(model, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == TensorProto.BOOL:
            out[vi.name] = np.asarray(rng.random(shape) < 0.5)
        elif tt.elem_type == TensorProto.INT64:
            out[vi.name] = rng.integers(0, 128, size=shape).astype(np.int64)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _assert_same_outputs(original, result, seeds=(0, 1, 2)):
    a, b = _session(original), _session(result)
    for seed in seeds:
        f = _feeds(original, seed)
        for x, y in zip(a.run(None, f), b.run(None, f)):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def _io(model):
    return ([i.name for i in model.graph.input], [o.name for o in model.graph.output])


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _copy(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


# ------------------------------------------------------------------ hand-built graphs

def _mixed_model(with_custom=False, flag_shape=(1,)):
    """Registry ops (MatMul, Add, Transpose, Reshape, Mul by a scalar, Softmax) around ops
    graphopt does not model: LayerNormalization, Sin, and an If whose branches read ``sm``,
    the output of a registry Softmax, from the enclosing graph.  ``Transpose`` twice in a row
    gives the search something to remove."""
    rng = np.random.default_rng(0)
    sm_type = _float("then_out", [2, 2, 4, 4])
    then_g = helper.make_graph([helper.make_node("Relu", ["sm"], ["then_out"])], "then", [], [sm_type])
    else_g = helper.make_graph([helper.make_node("Neg", ["sm"], ["else_out"])], "else", [],
                               [_float("else_out", [2, 2, 4, 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Add", ["a", "bias"], ["b"]),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["bt"], ["bb"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["bb", "shape4"], ["r"]),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["rt", "half"], ["rs"]),
        helper.make_node("Softmax", ["rs"], ["sm"], axis=-1),
        helper.make_node("If", ["flag"], ["br"], then_branch=then_g, else_branch=else_g),
        helper.make_node("LayerNormalization", ["b", "ln_scale", "ln_bias"], ["ln"], axis=-1),
        helper.make_node("Sin", ["ln"], ["th"]),
        helper.make_node("Add", ["th", "bb"], ["y_ln"]),
        helper.make_node("Mul", ["sm", "two"], ["y_sm"]),
    ]
    outputs = [_float("y_ln", [2, 4, 8]), _float("br", [2, 2, 4, 4]), _float("y_sm", [2, 2, 4, 4])]
    extra = ()
    if with_custom:
        nodes.append(helper.make_node("Frobnicate", ["y_ln"], ["y_custom"], domain="com.example", gain=3))
        outputs.append(_float("y_custom", [2, 4, 8]))
        extra = (("com.example", 1),)
    inits = {"W": rng.standard_normal((8, 8)).astype(np.float32),
             "bias": rng.standard_normal(8).astype(np.float32),
             "shape4": np.array([2, 4, 2, 4], dtype=np.int64),
             "half": np.array(0.5, dtype=np.float32), "two": np.array(2.0, dtype=np.float32),
             "ln_scale": rng.standard_normal(8).astype(np.float32),
             "ln_bias": rng.standard_normal(8).astype(np.float32)}
    inputs = [_float("x", [2, 4, 8]), helper.make_tensor_value_info("flag", TensorProto.BOOL, list(flag_shape))]
    return _model(nodes, inputs, outputs, inits, extra_opsets=extra)


OPAQUE = ("LayerNormalization", "Sin", "If")


def _assert_round_trip(original, result, opaque=OPAQUE):
    onnx.checker.check_model(result, full_check=True)
    assert _io(result) == _io(original)
    assert [o.type for o in result.graph.output] == [o.type for o in original.graph.output]
    ops = _ops(result)
    for op in opaque:
        assert ops.count(op) == _ops(original).count(op), (op, ops)


def _if_branches_read(model):
    node = next(n for n in model.graph.node if n.op_type == "If")
    return {x for branch in ("then_branch", "else_branch") for n in _attr(node, branch).node for x in n.input}


def test_import_export_round_trip_without_search():
    original = _mixed_model()
    imp = import_onnx(original)
    assert imp.counts["opaque"] == 3 and imp.counts["ops"] >= 8, imp.counts
    result = export_onnx(imp, imp.graph)
    _assert_round_trip(original, result)
    assert _if_branches_read(result) == {"sm"}
    _assert_same_outputs(original, result)


def test_optimize_mixed_graph_keeps_opaque_nodes_and_outputs():
    original = _mixed_model()
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report
    assert report["opaque"] == 3 and report["rules_applied"], report  # the double transpose goes
    _assert_round_trip(original, result)
    assert _ops(result).count("Transpose") < _ops(original).count("Transpose")
    # the If still reads 'sm' from the enclosing graph, and it still exists there
    assert _if_branches_read(result) == {"sm"}
    produced = {o for n in result.graph.node for o in n.output}
    assert "sm" in produced
    _assert_same_outputs(original, result)
    assert report["max_abs_diff"] <= 1e-5


def test_custom_domain_node_is_kept_without_verification(tmp_path):
    original = _mixed_model(with_custom=True)
    imp = import_onnx(original)
    assert imp.counts["opaque"] == 4
    direct = export_onnx(imp, imp.graph)
    result = graphopt.optimize_onnx(original, verify=False, **FAST)
    for model in (direct, result):
        _assert_round_trip(original, model, OPAQUE + ("Frobnicate",))
        custom = [n for n in model.graph.node if n.op_type == "Frobnicate"]
        assert len(custom) == 1 and custom[0].domain == "com.example" and _attr(custom[0], "gain") == 3
        assert ("com.example", 1) in {(o.domain, o.version) for o in model.opset_import}
    assert not graphopt.onnx_report(result)["fallbacks"]


def test_cli_no_verify_keeps_a_custom_domain_node(cli, tmp_path):
    src, out = tmp_path / "custom.onnx", tmp_path / "out.onnx"
    original = _mixed_model(with_custom=True)
    onnx.save_model(original, str(src))
    proc = cli("optimize", str(src), "-o", str(out), "--no-verify", "--json", "--runs", "1",
               "--time-limit", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["fallbacks"] and report["rules_applied"] and report["opaque"] == 4, report
    result = onnx.load(str(out))
    _assert_round_trip(original, result, OPAQUE + ("Frobnicate",))
    assert [n.domain for n in result.graph.node if n.op_type == "Frobnicate"] == ["com.example"]


def test_scalar_bool_input_does_not_break_verification():
    original = _mixed_model(flag_shape=())
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report["fallbacks"]
    assert report["rules_applied"], report


def test_optimize_onnx_leaves_its_argument_alone():
    original = _model([helper.make_node("Tanh", ["x"], ["y"])], [_float("x", [4, 8])], [_float("y", [4, 8])])
    before = original.SerializeToString()
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"] and report["rules_applied"] == {}, report
    assert original.SerializeToString() == before
    assert result is not original


# ------------------------------------------------------------ a rewrite the search does

def _shared_input_model():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"]), helper.make_node("MatMul", ["x", "W2"], ["y2"])]
    inits = {"W1": rng.standard_normal((256, 256)).astype(np.float32),
             "W2": rng.standard_normal((256, 256)).astype(np.float32)}
    return _model(nodes, [_float("x", [64, 256])], [_float("y1", [64, 256]), _float("y2", [64, 256])], inits)


def test_matmuls_sharing_an_input_are_merged():
    original = _shared_input_model()
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"] and report["rules_applied"], report
    ops = _ops(result)
    assert ops.count("MatMul") == 1 and "Split" in ops, ops
    # the concatenated weight is folded into one initializer, not concatenated at run time
    assert "Concat" not in ops, ops
    _assert_round_trip(original, result, opaque=())
    _assert_same_outputs(original, result)


# ------------------------------------------------------------------------- attention

B, H, T, D = 2, 4, 8, 16


def _attention_model(opset=23, masked_value=-np.inf):
    mask = np.triu(np.full((T, T), masked_value, dtype=np.float32), k=1)
    mask[np.tril_indices(T)] = 0.0
    nodes = [
        helper.make_node("Transpose", ["K"], ["Kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "Kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "V"], ["out"]),
    ]
    inputs = [_float(n, [B, H, T, D]) for n in ("Q", "K", "V")]
    inits = {"scale": np.array(0.25, dtype=np.float32), "mask": mask}
    return _model(nodes, inputs, [_float("out", [B, H, T, D])], inits, opset=opset)


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("masked_value", [-np.inf, float(np.finfo(np.float32).min)], ids=["-inf", "finfo.min"])
def test_causal_attention_fused_at_opset_23(masked_value):
    original = _attention_model(masked_value=masked_value)
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report
    assert report["attention"]["blocks"] == report["attention"]["fused"] == 1, report
    assert report["attention"]["causal"] == 1 and report["attention"]["masked"] == 0, report
    attention = [n for n in result.graph.node if n.op_type == "Attention"]
    assert len(attention) == 1, _ops(result)
    assert _attr(attention[0], "is_causal") == 1
    assert _attr(attention[0], "scale") == pytest.approx(0.25)
    assert "Softmax" not in _ops(result)
    _assert_round_trip(original, result, opaque=())
    _assert_same_outputs(original, result)


def test_attention_not_fused_below_opset_23_unless_converted():
    original = _attention_model(opset=20)
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report
    assert report["attention"]["blocks"] == 1 and report["attention"]["fused"] == 0, report
    assert "Attention" not in _ops(result) and "Softmax" in _ops(result)
    assert _opset(result) == 20
    assert any("opset 23" in n for n in report["notes"]), report["notes"]
    _assert_same_outputs(original, result)

    converted = graphopt.optimize_onnx(original, opset=23, **FAST)
    report = graphopt.onnx_report(converted)
    assert _opset(converted) == 23
    assert not report["fallbacks"], report
    assert report["attention"]["fused"] == 1 and report["attention"]["causal"] == 1, report
    assert not any("opset 23" in n for n in report["notes"]), report["notes"]
    assert "Attention" in _ops(converted)
    onnx.checker.check_model(converted, full_check=True)
    assert _io(converted) == _io(original)
    _assert_same_outputs(original, converted)


# ------------------------------------------------------------------- HF GPT-2, exported

@pytest.fixture(scope="module")
def gpt2_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")

    from graphopt.models import Logits
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = Logits(transformers.GPT2LMHeadModel(cfg).eval()).eval()
    ids = torch.randint(0, 128, (2, 16))
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (ids,), str(path), dynamo=True, opset_version=23, verbose=False)
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gpt2_exported_with_dynamo_has_both_blocks_fused(gpt2_onnx):
    original = onnx.load(str(gpt2_onnx))
    assert _opset(original) == 23
    result = graphopt.optimize_onnx(gpt2_onnx, time_limit=20)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report
    assert report["attention"]["blocks"] == report["attention"]["fused"] == 2, report
    assert report["attention"]["causal"] == 2, report
    assert _ops(result).count("Attention") == 2
    onnx.checker.check_model(result, full_check=True)
    assert _io(result) == _io(original)
    _assert_same_outputs(original, result, seeds=(0, 1))


def test_llama_exported_with_dynamo_has_attention_fused_and_projections_merged(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    from graphopt.models import Logits
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = Logits(transformers.LlamaForCausalLM(cfg).eval()).eval()
    path = tmp_path / "llama.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randint(0, 128, (2, 16)),), str(path), dynamo=True, opset_version=23,
                          verbose=False)
    original = onnx.load(str(path))
    result = graphopt.optimize_onnx(original, time_limit=20)
    report = graphopt.onnx_report(result)
    assert not report["fallbacks"], report
    assert report["attention"] == {"blocks": 2, "fused": 2, "causal": 2, "masked": 0, "gqa": 2, "sink": 0}, report
    merged = [k for k, v in report["rewrites"].items() if "concat" in v]
    assert sum(report["rules_applied"][k] for k in merged) >= 6, report  # q/k/v and gate/up, 2 layers
    assert _ops(result).count("Attention") == 2 and "Expand" not in _ops(result)
    onnx.checker.check_model(result, full_check=True)
    assert _io(result) == _io(original)
    _assert_same_outputs(original, result, seeds=(0, 1))


# ------------------------------------------------------------------------ safety net

def test_a_wrong_optimised_model_is_caught_and_the_original_kept(monkeypatch):
    import graphopt.backends.onnx as backend
    real = backend.export_onnx

    def corrupting_export(imp, graph):
        model = real(imp, graph)
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = numpy_helper.to_array(init) + 1.0
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
        return model

    monkeypatch.setattr(backend, "export_onnx", corrupting_export)
    original = _shared_input_model()
    before = _copy(original)
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert len(report["fallbacks"]) == 1 and report["fallbacks"][0].startswith("verification failed"), report
    assert "original model kept" in report["fallbacks"][0]
    assert result.graph == before.graph
    assert report["attention"]["fused"] == 0
    _assert_same_outputs(before, result, seeds=(0,))


def test_a_wrong_attention_scale_is_caught(monkeypatch):
    import graphopt.backends.onnx as backend
    real_node = backend.Builder.node

    def wrong_scale(self, op_type, inputs, outputs, **attrs):  # what OpDef.to_onnx writes with
        if op_type == "Attention":
            attrs["scale"] = attrs["scale"] * 2
        return real_node(self, op_type, inputs, outputs, **attrs)

    monkeypatch.setattr(backend.Builder, "node", wrong_scale)
    original = _attention_model()
    result = graphopt.optimize_onnx(original, **FAST)
    report = graphopt.onnx_report(result)
    assert len(report["fallbacks"]) == 1 and report["fallbacks"][0].startswith("verification failed"), report
    assert "Attention" not in _ops(result) and result.graph == _attention_model().graph
    assert report["attention"]["fused"] == 0 and report["attention"]["blocks"] == 1, report


# ------------------------------------------------------------------------------- CLI

def _truncated(tmp_path):
    good = _attention_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(good[: len(good) // 3])
    return [str(path)]


def _text(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_text("this is not an ONNX model, just some text\n" * 20)
    return [str(path)]


def _missing(tmp_path):
    return [str(tmp_path / "nope.onnx")]


def _external_data_deleted(tmp_path):
    path = tmp_path / "external.onnx"
    onnx.save_model(_shared_input_model(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.onnx.data", size_threshold=0)
    (tmp_path / "external.onnx.data").unlink()
    return [str(path)]


def _opset_99(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save_model(_attention_model(), str(path))
    return [str(path), "--opset", "99"]


@pytest.mark.parametrize("make, words", [
    (_truncated, ("readable",)),
    (_text, ("readable",)),
    (_missing, ("no such file",)),
    (_external_data_deleted, ("external data",)),
    (_opset_99, ("opset", "99")),
], ids=["truncated", "text", "missing", "external-data-deleted", "opset-99"])
def test_cli_bad_input_is_one_line_error(cli, tmp_path, make, words):
    out = tmp_path / "out.onnx"
    proc = cli("optimize", *make(tmp_path), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0].lower(), lines[0]
    assert not out.exists()


def test_cli_optimize_writes_model_and_json(cli, tmp_path):
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    original = _attention_model()
    onnx.save_model(original, str(src))
    proc = cli("optimize", str(src), "-o", str(out), "--json", "--runs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["attention"]["fused"] == report["attention"]["causal"] == 1, report
    assert not report["fallbacks"] and report["saved"] == str(out)
    result = onnx.load(str(out))
    onnx.checker.check_model(result, full_check=True)
    assert "Attention" in _ops(result) and graphopt.onnx_report(result)["attention"]["fused"] == 1
    _assert_same_outputs(original, result, seeds=(0,))
