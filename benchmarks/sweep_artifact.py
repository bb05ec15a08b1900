"""Sweep: Hugging Face architectures built from their configs (2 layers, d=64, random weights;
nothing downloaded) -> ``graphopt optimize`` as a user runs it -> a ``.pt2`` program -> loaded and
run in a fresh process where importing graphopt fails.

Per (architecture, dtype), one JSON line: whether the CLI wrote the program, the attention blocks
fused, and, from the loaded program in the other process (where a graphopt callable could not run), the max |diff| against eager on fresh ids (calls 1, 2 and 3) and the softmax / SDPA
kernels one call ran (torch.profiler, after a warm-up call).  Then a summary line.

    python benchmarks/sweep_artifact.py [ARCH ...]       # default: every architecture of sweep_hf_zoo.py
"""
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from sweep_hf_zoo import ARCHS  # noqa: E402  (the same tiny configs as the zoo sweep)

warnings.filterwarnings("ignore")
T = 37   # an odd length

# what the server side does: no graphopt, three calls, kernels counted by torch.profiler
LOAD_AND_RUN = """
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
sys.modules["graphopt"] = None
ep = torch.export.load(sys.argv[1])
ids = torch.load(sys.argv[2])
run = ep.module()
with torch.no_grad():
    outs = [run(ids) for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(ids)
ev = {e.key: e.count for e in prof.key_averages()}
torch.save(outs, sys.argv[3])
print(json.dumps({"softmax": ev.get("aten::_softmax", 0),
                  "sdpa": sum(v for k, v in ev.items() if k.startswith("aten::_scaled_dot_product"))}))
"""


def one(arch: str, dtype: str, tmp: Path) -> dict:
    row = {"arch": arch, "dtype": dtype}
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(arch, **ARCHS[arch])
    folder = tmp / f"{arch}-{dtype}"
    lm = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    lm.save_pretrained(folder)
    out = folder / "model.pt2"
    t = time.time()
    cli = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(folder), "--seq-len", str(T),
                          "--dtype", dtype, "-o", str(out), "--runs", "1", "--json", "-q"],
                         capture_output=True, text=True, timeout=900)
    row["cli_s"] = round(time.time() - t, 1)
    if cli.returncode != 0:
        row["error"] = cli.stderr.strip().splitlines()[-1] if cli.stderr.strip() else f"exit {cli.returncode}"
        return row
    result = json.loads(cli.stdout)
    row["attention"] = result["attention"]
    row["fallbacks"] = result["fallbacks"]
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(11))
    torch.save(ids, folder / "ids.pt")
    served = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(out), str(folder / "ids.pt"),
                             str(folder / "outs.pt")], capture_output=True, text=True, timeout=600)
    if served.returncode != 0:
        row["error"] = "loading the program: " + served.stderr.strip().splitlines()[-1]
        return row
    row["kernels"] = json.loads(served.stdout.strip().splitlines()[-1])
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                              dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        ref = eager(input_ids=ids, use_cache=False).logits.float()
    outs = torch.load(folder / "outs.pt")
    row["diff"] = [float(f"{float((o.float() - ref).abs().max()):.3g}") for o in outs]
    row["rel"] = float(f"{max(row['diff']) / max(float(ref.abs().max()), 1e-6):.3g}")
    return row


def main(archs) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for dtype in ("float32", "bfloat16"):
                try:
                    row = one(arch, dtype, Path(tmp))
                except Exception as e:  # noqa: BLE001  (the sweep goes on; the row says what failed)
                    row = {"arch": arch, "dtype": dtype, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    written = [r for r in rows if "kernels" in r]
    fused = [r for r in written if r["kernels"]["softmax"] == 0 and r["kernels"]["sdpa"] > 0]
    tol = {"float32": 1e-4, "bfloat16": 2e-2}
    equal = [r for r in written if r["rel"] <= tol[r["dtype"]]]
    print(json.dumps({"rows": len(rows), "written_and_loaded": len(written), "fully_fused": len(fused),
                      "equal_outputs": len(equal),
                      "misses": {f"{r['arch']}/{r['dtype']}": r.get("error") or r.get("kernels") for r in rows
                                 if r not in fused}}))


if __name__ == "__main__":
    main(sys.argv[1:] or list(ARCHS))
