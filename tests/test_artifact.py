"""From a model folder to a deployable artifact: ``graphopt optimize DIR -o model.pt2``, ``--config``,
plain-torch graphs, the HTML report rendered in headless Chromium, and the progress display."""
import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios

import pytest
import torch
from conftest import run_cli

import graphopt
from graphopt import cli as graphopt_cli
from graphopt import hf

T = 24
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Llama and GPT-2 folders as ``save_pretrained`` writes them (random weights)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          max_position_embeddings=256),
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256,
                                        bos_token_id=0, eos_token_id=0),
    }
    for name, config in configs.items():
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
    return root


def _eager_logits(folder, ids):
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False).logits


# runs an ExportedProgram in a process where importing graphopt fails
WITHOUT_GRAPHOPT = """
import sys, torch
sys.modules["graphopt"] = None
ep = torch.export.load(sys.argv[1])
ids = torch.load(sys.argv[2])
torch.save(ep.module()(ids), sys.argv[3])
print(sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"}))
"""


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_folder_becomes_a_pt2_that_runs_without_graphopt(folders, tmp_path, arch):
    out, page = tmp_path / "model.pt2", tmp_path / "report.html"
    proc = run_cli("optimize", str(folders / arch), "--seq-len", str(T), "-o", str(out), "--html", str(page),
                   "--runs", "1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["fallbacks"] == [] and result["saved"] == str(out)
    assert result["attention"]["fused"] == result["attention"]["blocks"] == 2, result["attention"]
    assert out.stat().st_size > 0 and page.stat().st_size > 0
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(7))   # not the example's
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", WITHOUT_GRAPHOPT, str(out), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "aten.scaled_dot_product_attention.default" in run.stdout and "softmax" not in run.stdout, run.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _eager_logits(folders / arch, ids),
                               rtol=1e-4, atol=1e-4)


def test_optimized_graphs_are_plain_torch(folders):
    """No graphopt callable in an optimised graph but its run-time kernels, which choose how to
    run on the tensors they get and trace to torch ops (graphopt.kernels.gemm, sink_attention):
    it reads as PyTorch and exports like any module."""
    from graphopt import kernels
    from graphopt.ops.attention import sink_attention
    runtime_kernels = {kernels.gemm, sink_attention}
    for arch, captures in (("llama", ("dynamo", "export")), ("gpt2", ("dynamo",))):
        model = hf.load_folder(folders / arch)
        ids = hf.example_ids(model, 1, T)
        for capture in captures:
            fast = graphopt.optimize(model, (ids,), capture=capture)
            assert fast.report.attention["fused"] == 2, fast.report
            for gm in fast.graph_modules:
                for n in gm.graph.nodes:
                    if n.op in ("call_function", "call_method") and n.target not in runtime_kernels:
                        module = getattr(n.target, "__module__", "") or ""
                        assert not module.startswith("graphopt"), (arch, capture, n.format_node())
                assert "graphopt_backends" not in gm.code and "run_op" not in gm.code
            with torch.no_grad():
                torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, sets", [
    ("llama", ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2",
               "vocab_size=128"]),
    ("qwen2", ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "num_key_value_heads=2",
               "vocab_size=128"]),
    ("gpt_neox", ["hidden_size=64", "intermediate_size=128", "num_attention_heads=4", "vocab_size=128"]),
])
def test_config_builds_any_architecture(capsys, name, sets):
    args = ["optimize", "--config", name, "--layers", "1", "--seq-len", "16", "--runs", "1", "--json", "-q"]
    for s in sets:
        args += ["--set", s]
    assert graphopt_cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == f"--config {name}" and result["inputs"] == [[1, 16]]
    assert result["fallbacks"] == [] and result["attention"]["fused"] == result["attention"]["blocks"] == 1
    assert result["max_abs_diff_outputs"] < 1e-4


def test_dtype_is_honoured(capsys, folders):
    assert graphopt_cli.main(["optimize", str(folders / "llama"), "--dtype", "bfloat16", "--seq-len", "16",
                              "--runs", "1", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["fallbacks"] == []
    assert result["attention"]["fused"] == 2, result["attention"]


def _break(folder, tmp_path, how):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    if how == "no-config":
        (broken / "config.json").unlink()
    elif how == "no-weights":
        (broken / "model.safetensors").unlink()
    elif how == "missing-shard":
        (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
        (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif how == "bad-json":
        (broken / "config.json").write_text("{not json")
    return broken


@pytest.mark.parametrize("how, needle", [
    ("no-config", "not a Hugging Face model folder (no config.json)"),
    ("no-weights", "no weight file"),
    ("missing-shard", "weight file model-00002-of-00002.safetensors (listed in model.safetensors.index.json) is missing"),
    ("bad-json", "config.json: not valid JSON"),
])
def test_a_folder_that_is_not_a_model_is_one_line(capsys, folders, tmp_path, how, needle):
    broken = _break(folders / "llama", tmp_path, how)
    out = tmp_path / "m.pt2"
    _one_line_error(capsys, ["optimize", str(broken), "-o", str(out)], needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--config", "lama"], "not a causal-LM architecture of transformers"),
    (["--config", "llama", "--set", "hiden_size=64"], "has no field 'hiden_size'"),
    (["{llama}", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["{llama}", "--device", "cuda"] if not torch.cuda.is_available() else ["--config", "x", "--set", "a"],
     "no CUDA device" if not torch.cuda.is_available() else "--set a: expected KEY=VALUE"),
    (["{llama}", "-o", "{tmp}/m.onnx"], "a torch model is written as a torch.export program"),
    (["./no/such/folder"], "no such file or directory"),
])
def test_bad_model_arguments_are_one_line(capsys, folders, tmp_path, args, needle):
    args = [a.replace("{llama}", str(folders / "llama")).replace("{tmp}", str(tmp_path)) for a in args]
    _one_line_error(capsys, ["optimize", *args], needle)
    assert not list(tmp_path.glob("*.pt2")) and not list(tmp_path.glob("*.onnx"))


def test_a_bad_folder_at_the_command_line_is_one_line_without_traceback(folders, tmp_path):
    broken = _break(folders / "gpt2", tmp_path, "no-weights")
    proc = run_cli("optimize", str(broken), "-o", str(tmp_path / "m.pt2"), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"graphopt: error: {broken}: no weight file "
                                                "(model.safetensors, pytorch_model.bin or a sharded index)"]
    assert not list(tmp_path.glob("m.pt2")) and not list(tmp_path.glob("r.html"))


def _one_line_error(capsys, argv, needle):
    assert graphopt_cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), err
    assert needle in lines[0], lines[0]


# -- the HTML report, rendered headless ------------------------------------------------------

def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_headless(page, png) -> list:
    """Render ``page`` in headless Chromium into ``png``; returns the console messages."""
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                           "--window-size=1200,1600", "--enable-logging=stderr", "--log-level=0",
                           f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert png.exists(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def _not_blank(png) -> bool:
    from PIL import Image
    img = Image.open(png).convert("L")
    dark = sum(1 for v in img.get_flattened_data() if v < 200)
    return dark > 0.005 * img.width * img.height and len(img.getcolors(maxcolors=1 << 16) or ()) > 16


@pytest.mark.skipif(not _chromium(), reason="headless Chromium is not installed (.ci/run installs it)")
def test_the_html_report_renders(folders, tmp_path):
    page = tmp_path / "report.html"
    assert graphopt_cli.main(["optimize", str(folders / "llama"), "--seq-len", str(T), "--runs", "1", "-q",
                              "--html", str(page)]) == 0
    text = page.read_text()
    for needle in ("Summary", "Rules applied", "causal-mask", "data:image/png;base64,", "Torch ops before and after",
                   "scaled_dot_product_attention", "Left alone"):
        assert needle in text, needle
    assert "http://" not in text and "https://" not in text and "<script" not in text   # self-contained
    console = render_headless(page, tmp_path / "page.png")
    assert console == []
    assert _not_blank(tmp_path / "page.png")


@pytest.mark.skipif(not _chromium(), reason="headless Chromium is not installed (.ci/run installs it)")
def test_the_headless_check_sees_console_errors_and_blank_pages(tmp_path):
    bad, blank = tmp_path / "bad.html", tmp_path / "blank.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    blank.write_text("<html><body></body></html>")
    assert any("undefinedFunction" in line for line in render_headless(bad, tmp_path / "bad.png"))
    assert render_headless(blank, tmp_path / "blank.png") == []
    assert not _not_blank(tmp_path / "blank.png")


# -- progress ------------------------------------------------------------------------------

def _on_a_terminal(args) -> str:
    """Run the CLI with stderr on a pseudo-terminal; returns what it wrote there."""
    main, other = pty.openpty()
    fcntl.ioctl(other, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # a 120x40 terminal
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=other, env=env)
    os.close(other)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(main)
    assert proc.returncode == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_shows_the_stages_on_a_terminal_only(folders):
    args = ["optimize", str(folders / "gpt2"), "--seq-len", "16", "--runs", "1"]
    shown = _on_a_terminal(args)
    for stage in ("load", "capture", "import", "search", "verify", "latency"):
        assert f"graphopt: {stage}" in shown, shown[-2000:]
    assert "graphopt: search" not in _on_a_terminal(args + ["--quiet"])
