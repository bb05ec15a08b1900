"""The command line, through a subprocess, as a user runs it."""
import json

import pytest

from graphopt.rules import load_rules


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_writes_library_and_statistics(cli, tmp_path):
    out = tmp_path / "r.json"
    proc = cli("generate", "--max-ops", "2", "--ops", "matmul,add,transpose,smul", "--workers", "2",
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "stage statistics" in proc.stdout and "graphs_enumerated" in proc.stdout
    assert "enumerated" in proc.stderr and "verified" in proc.stderr  # the stages' log lines
    assert "\r" not in proc.stderr   # no progress bar when stderr is not a terminal
    lib = load_rules(out)
    assert len(lib) > 0 and lib.meta["generator"]["ops"] == ["matmul", "add", "transpose", "smul"]
    assert f"wrote {len(lib)} rules" in proc.stdout


def test_rules_list_show_verify(cli, tmp_path):
    out = tmp_path / "r.json"
    assert cli("generate", "--max-ops", "2", "--ops", "matmul,transpose,smul", "-q", "-o", str(out)).returncode == 0
    listing = cli("rules", "list", str(out))
    assert listing.returncode == 0
    lines = listing.stdout.strip().splitlines()
    assert lines and all(" == " in line for line in lines)
    rule_id = lines[0].split()[0]
    only_smul = cli("rules", "list", str(out), "--op", "smul").stdout.strip().splitlines()
    assert only_smul and all("smul" in line for line in only_smul) and len(only_smul) < len(lines)
    as_json = json.loads(cli("rules", "list", str(out), "--json").stdout)
    assert {r["id"] for r in as_json} == {line.split()[0] for line in lines}

    show = cli("rules", "show", rule_id, "--library", str(out))
    assert show.returncode == 0 and "source (" in show.stdout and "target (" in show.stdout
    dot = cli("rules", "show", rule_id[:8], "--library", str(out), "--dot")
    assert dot.stdout.startswith("digraph") and "cluster_src" in dot.stdout

    verify = cli("rules", "verify", str(out), "--dtype", "float32", "--dtype", "float64")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"{len(lines)} passed, 0 failed" in verify.stdout


def test_rules_verify_fails_on_a_false_rule(cli, tmp_path):
    bad = {"format": "graphopt-rules", "schema_version": 1, "rules": [{
        "inputs": [{"name": "X", "shape": ["a", "b"]}],
        "src": {"nodes": [{"op": "relu", "inputs": ["X"]}], "outputs": ["%0"]},
        "dst": {"nodes": [{"op": "neg", "inputs": ["X"]}], "outputs": ["%0"]}}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = cli("rules", "verify", str(path))
    assert proc.returncode == 1
    assert "0 passed, 1 failed" in proc.stdout and "FAILED" in proc.stdout


def test_png(cli, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    cli("generate", "--max-ops", "2", "--ops", "matmul,transpose", "-q", "-o", str(out))
    rule_id = load_rules(out).rules[0].id
    png = tmp_path / "rule.png"
    proc = cli("rules", "show", rule_id, "--library", str(out), "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, needles", [
    (("generate", "--ops", "matmul,frobnicate", "-o", "x.json"), ["unknown op 'frobnicate'"]),
    (("generate", "--ops", "reshape", "-o", "x.json"), ["cannot be enumerated"]),
    (("generate", "--max-ops", "0", "-o", "x.json"), ["--max-ops"]),
    (("generate", "--max-ops", "two"), ["invalid int value"]),
    (("generate", "--inputs", "X:a,b;X:b", "-o", "x.json"), ["duplicate input"]),
    (("generate", "--inputs", "X:a,%", "-o", "x.json"), ["invalid shape"]),
    (("generate", "--max-ops", "1", "-o", "no/such/dir/x.json"), ["does not exist"]),
    (("rules", "list", "missing.json"), ["no such rule library"]),
    (("rules", "show", "rzzzz"), ["no rule with id"]),
    (("rules", "frob",), ["invalid choice"]),
    ((), ["required"]),
])
def test_bad_input_is_one_line(cli, tmp_path, args, needles):
    proc = cli(*args, cwd=tmp_path)
    _one_line_error(proc, *needles)
    assert not (tmp_path / "x.json").exists()


def test_truncated_library_is_one_line(cli, tmp_path, fresh_library):
    path = tmp_path / "lib.json"
    fresh_library.save(path)
    data = path.read_text()
    path.write_text(data[: len(data) // 2])
    _one_line_error(cli("rules", "list", str(path)), "not valid JSON", "truncated")
    path.write_text(data.replace('"schema_version": 1', '"schema_version": 7'))
    _one_line_error(cli("rules", "verify", str(path)), "unsupported schema version 7")


def test_ops_lists_registry(cli):
    proc = cli("ops")
    assert proc.returncode == 0
    for op in ("matmul", "split", "reduce_sum", "reshape"):
        assert op in proc.stdout


FACTORY = '''
import torch
from graphopt.models import Llama, LlamaConfig

def make():
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab=100, n_layer=1, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq=32)).eval()
    return m, (torch.randint(0, 100, (1, 16)),)

def wrong():
    return 42

def broken():
    raise RuntimeError("boom")


class ReluSplit(torch.nn.Module):
    def forward(self, x):
        y = x @ x.transpose(0, 1)
        return torch.relu(y) + -torch.relu(-y)

def relu_split():
    return ReluSplit(), (torch.randn(16, 16),)
'''

USER_RULES = '''# a user's rule file
rule relu-split:
    inputs X:(a,b)
    add(relu(X), neg(relu(neg(X))))  ==  X
    reason "x = relu(x) - relu(-x)"
'''


def test_optimize_factory_json_and_save(cli, tmp_path):
    src = tmp_path / "models.py"
    src.write_text(FACTORY)
    saved = tmp_path / "opt.pt"
    proc = cli("optimize", f"{src}:make", "--json", "--runs", "2", "--save", str(saved), timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["graphs"] == 1 and report["fallbacks"] == []
    assert any("concat" in v for v in report["rewrites"].values())  # merged projections
    assert report["max_abs_diff_outputs"] < 1e-4
    assert report["latency_ms"]["original"] > 0 and report["latency_ms"]["optimized"] > 0
    import torch
    blob = torch.load(saved, weights_only=False)
    assert len(blob["graph_modules"]) == 1


def test_optimize_text_report(cli, tmp_path):
    src = tmp_path / "models.py"
    src.write_text(FACTORY)
    proc = cli("optimize", f"{src}:make", "--runs", "1", "--capture", "export", timeout=600)
    assert proc.returncode == 0, proc.stderr
    for needle in ("rules applied", "cost (model)", "latency", "max |optimized - original|"):
        assert needle in proc.stdout
    assert "FALLBACK" not in proc.stdout and "rules applied  none" not in proc.stdout, proc.stdout


def test_optimize_with_a_user_rule_file(cli, tmp_path):
    """--rules FILE: the user's text rules are verified when loaded and applied (besides the
    shipped ones); rules list/verify read the same file."""
    src, rules = tmp_path / "models.py", tmp_path / "my.rules"
    src.write_text(FACTORY)
    rules.write_text(USER_RULES)
    listing = cli("rules", "list", str(rules))
    assert listing.returncode == 0 and "[relu-split]" in listing.stdout, listing.stderr
    rule_id = listing.stdout.split()[0]
    assert cli("rules", "verify", str(rules)).returncode == 0
    proc = cli("optimize", f"{src}:relu_split", "--rules", str(rules), "--json", "--runs", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rules_applied"].get(rule_id + "+") == 1, report["rules_applied"]
    assert "my" in report["phases"]["search"]["rulesets"]  # a ruleset no phase names joins the search
    assert report["fallbacks"] == [] and report["max_abs_diff_outputs"] < 1e-4
    # (that the shipped rules alone do not apply it: tests/test_pipeline.py)


@pytest.mark.parametrize("text, needles", [
    ("rule r:\n    inputs X:(a,b)\n    sofmax(X)  ==  X\n", ["my.rules:3:5:", "unknown op 'sofmax'"]),
    ("rule r:\n    inputs X:(a,b)\n    relu(X)  ==  X\n", ["my.rules:1:6:", "does not hold", "differs"]),
    ("rule r:\n    inputs X:(a,b)\n    relu(relu(X)  ==  X\n", ["my.rules:3:"]),
])
def test_a_bad_user_rule_file_is_a_one_line_error(cli, tmp_path, text, needles):
    rules = tmp_path / "my.rules"
    rules.write_text(text)
    _one_line_error(cli("rules", "list", str(rules)), *needles)


def test_optimize_with_a_bad_rule_file_fails_before_the_model_is_built(cli, tmp_path):
    src, rules = tmp_path / "models.py", tmp_path / "my.rules"
    src.write_text(FACTORY.replace("def relu_split():", "def relu_split():\n    raise SystemExit('built')"))
    rules.write_text("rule r:\n    inputs X:(a,b)\n    relu(X)  ==  X\n")
    _one_line_error(cli("optimize", f"{src}:relu_split", "--rules", str(rules)), "my.rules:1:6:", "does not hold")


def test_rules_compile_check_and_output(cli, tmp_path):
    """(The shipped handwritten.json is checked in tests/test_shipped_libraries.py.)"""
    out = tmp_path / "mine.json"
    rules = tmp_path / "my.rules"
    rules.write_text(USER_RULES)
    proc = cli("rules", "compile", str(rules), "-o", str(out))
    assert proc.returncode == 0 and "wrote 1 verified rules (my)" in proc.stdout, proc.stderr
    assert load_rules(out)["relu-split"].provenance["ruleset"] == "my"
    assert "say where to write" in cli("rules", "compile", str(rules)).stderr  # never over the shipped one
    rules.write_text(USER_RULES + "# edited since\n")
    assert cli("rules", "compile", str(rules), "-o", str(out), "--check").returncode == 1


@pytest.mark.parametrize("args, needles", [
    (("optimize", "gpt2", "--rules", "nothere.rules"), ["nothere.rules: no such rule file"]),
    (("optimize", "gpt2", "--ruleset", "nope"), ["unknown ruleset(s) 'nope'"]),
    (("optimize", "bert"), ["unknown model 'bert'"]),
    (("optimize", "missing.py:make"), ["no such file"]),
    (("optimize", "{src}:nothere"), ["no function 'nothere'"]),
    (("optimize", "{src}:wrong"), ["must return (module, example_inputs)"]),
    (("optimize", "{src}:broken"), ["failed (RuntimeError: boom)"]),
    (("optimize", "gpt2", "--seq-len", "0"), ["--seq-len must be between 1 and 1024"]),
    (("optimize", "gpt2", "--alpha", "0.5"), ["alpha must be >= 1.0"]),
    (("optimize", "gpt2", "--cost-model", "psychic"), ["invalid choice"]),
    (("optimize", "gpt2", "--save", "no/dir/x.pt"), ["does not exist"]),
])
def test_optimize_bad_input(cli, tmp_path, args, needles):
    src = tmp_path / "models.py"
    src.write_text(FACTORY)
    args = [a.replace("{src}", str(src)) for a in args]
    _one_line_error(cli(*args, cwd=tmp_path), *needles)


@pytest.mark.parametrize("args, needles", [
    (("generate", "--max-ops", "1", "--workers", "-1", "-o", "x.json"), ["--workers"]),
    (("generate", "--max-ops", "1", "--seed", "-1", "-o", "x.json"), ["--seed must be >= 0"]),
    (("generate", "--ops", "", "-o", "x.json"), ["--ops is empty"]),
    (("generate", "--inputs", "X:100000,100000", "-o", "x.json"), ["small symbolic sizes"]),
])
def test_more_bad_generate_input(cli, tmp_path, args, needles):
    _one_line_error(cli(*args, cwd=tmp_path), *needles)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["src"]["nodes"][0]["attrs"].update(axis=float("inf")), "invalid value"),
    (lambda r: r.update(evidence=[1]), '"evidence" must be an object'),
    (lambda r: r.update(evidence={"float": "yes"}), '"evidence.float" must be an object'),
    (lambda r: r["inputs"][0].update(shape=["99999999a", "b"]), "too large"),
    (lambda r: r["inputs"][0].update(shape="ab"), '"shape" list'),
    (lambda r: r["inputs"][0].update(shape=[0, "b"]), "zero or too large"),
    (lambda r: r.update(dst=r["src"]), "both sides are the same"),
])
def test_malformed_rules_are_one_line(cli, tmp_path, mutate, needle):
    rule = {"inputs": [{"name": "X", "shape": ["a", "b"]}],
            "src": {"nodes": [{"op": "concat", "inputs": ["X", "X"], "attrs": {"axis": -1}}], "outputs": ["%0"]},
            "dst": {"nodes": [{"op": "concat", "inputs": ["X", "X"], "attrs": {"axis": -1}},
                              {"op": "neg", "inputs": ["%0"]}], "outputs": ["%1"]}}
    mutate(rule)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "graphopt-rules", "schema_version": 1, "rules": [rule]}))
    for cmd in (("rules", "list", str(path)), ("rules", "verify", str(path))):
        _one_line_error(cli(*cmd), needle)


def test_deeply_nested_json_and_png_to_directory(cli, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    _one_line_error(cli("rules", "list", str(deep)), "nested too deeply")
    _one_line_error(cli("rules", "show", "rc00", "--png", str(tmp_path)), "is a directory")


def test_optimize_lora_with_the_egraph_engine(cli):
    """``--search egraph`` finds the LoRA merge: one GEMM per adapted layer, said in the report."""
    proc = cli("optimize", "lora", "--seq-len", "32", "--search", "egraph", "--json", "--runs", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    search = report["phases"]["search"]
    assert search["engine"] == "egraph" and search["graph_stats"][0]["improved_blocks"] >= 1
    assert report["cost_after_s"] < report["cost_before_s"]


def test_optimize_with_an_unknown_engine_is_a_usage_error(cli):
    proc = cli("optimize", "lora", "--search", "beam")
    assert proc.returncode != 0 and "invalid choice: 'beam'" in proc.stderr and "Traceback" not in proc.stderr
