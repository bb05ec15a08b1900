"""The GPU check's dry run: the same code as on an H100/H200, on CPU with tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
MODELS = {"gpt2-small", "llama-3.2-1b-shaped"}
VARIANTS = {"eager", "hf-sdpa", "graphopt", "torch.compile"}


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] and result["peaks"]["tflops"] > 0 and result["peaks"]["gbps"] > 0
    rows = result["rows"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    for model in MODELS:
        prefill = [r for r in rows if r["model"] == model and r["phase"] == "prefill"]
        assert {r["T"] for r in prefill} == {32}
        for t in (32,):
            assert {r["variant"] for r in prefill if r["T"] == t} == VARIANTS
        for r in prefill:
            assert r["ms"] > 0 and r["tflops"] > 0 and r["pct_peak"] > 0 and r["flops"] > 0
        decode = {r["variant"]: r for r in rows if r["model"] == model and r["phase"] == "decode"}
        assert set(decode) == VARIANTS
        for r in decode.values():
            assert r["tokens_per_s"] > 0 and r["gbps"] > 0 and r["pct_peak"] > 0
        assert decode["eager"]["tokens_equal"] is True
        assert decode["graphopt"]["tokens_equal"] is True
        assert decode["graphopt"]["graphopt"]["graphs"] >= 1
    table = (out / "gpu_check.md").read_text()
    assert "| model | phase | T | variant |" in table
    assert table.count("| gpt2-small |") == 8 and table.count("| llama-3.2-1b-shaped |") == 8
    assert "| model | phase | T | variant |" in run.stdout   # printed too
    assert not list(out.glob(".gpu_check*"))                # no temporary file left behind


def test_without_cuda_and_without_dry_run_is_one_line_error(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "--dry-run" in run.stderr
    assert not list(tmp_path.iterdir())
