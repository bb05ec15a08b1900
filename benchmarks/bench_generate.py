"""Benchmark of the rule generator: time, memory and rules from 2 to 3 to 4 ops.

Each depth runs in its own process (so peak memory is its own); memory is the
sum of the resident set sizes of the generator and its worker processes,
sampled every 0.1 s.  The depth-4 run uses the default settings, so its output
is the shipped library: the benchmark reports whether it is identical.

Usage:
    python benchmarks/bench_generate.py                 # depths 2, 3, 4; all cores
    python benchmarks/bench_generate.py --depths 2 3 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over a process and all its descendants (Linux /proc)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_depth(depth: int, workers: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "graphopt.cli", "generate", "--max-ops", str(depth),
           "--workers", str(workers), "-q", "-o", str(out)]
    peak = [0]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.1)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    wall = time.monotonic() - start
    done.set()
    t.join()
    if rc != 0:
        raise SystemExit(f"generate --max-ops {depth} failed with exit {rc}")
    meta = json.loads(out.read_text())
    return {"depth": depth, "wall_s": round(wall, 1), "peak_mb": round(peak[0] / 1024),
            "stats": meta["stats"], "timings": meta["timings"], "path": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    workers = args.workers or os.cpu_count()
    print(f"# graphopt generate, {workers} worker(s) on {os.cpu_count()} cores, python {sys.version.split()[0]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.depths:
            rows.append(run_depth(d, workers, Path(tmp) / f"rules{d}.json"))
            r = rows[-1]
            print(f"depth {d}: {r['stats']['rules']} rules in {r['wall_s']} s, peak {r['peak_mb']} MB", flush=True)
        keys = ["graphs_enumerated", "fingerprint_buckets", "candidate_pairs", "float_tested",
                "float_verified", "float_refuted", "z3_proved", "pruned_renaming", "rules"]
        print()
        print("| max ops | " + " | ".join(keys) + " | wall s | enumerate s | verify s | rules/s | peak MB |")
        print("|---" * (len(keys) + 6) + "|")
        for r in rows:
            st, tm = r["stats"], r["timings"]
            print(f"| {r['depth']} | " + " | ".join(str(st.get(k, 0)) for k in keys)
                  + f" | {r['wall_s']} | {tm['enumerate_s']} | {tm['verify_s']} | "
                  + f"{st['rules'] / r['wall_s']:.1f} | {r['peak_mb']} |")
        four = [r for r in rows if r["depth"] == 4]
        shipped = ROOT / "substitutions" / "default.json"
        if four and shipped.exists():
            ids_new = [x["id"] for x in json.loads(four[0]["path"].read_text())["rules"]]
            ids_old = [x["id"] for x in json.loads(shipped.read_text())["rules"]]
            print(f"\ndepth-4 library identical to substitutions/default.json (rule ids, in order): "
                  f"{'yes' if ids_new == ids_old else 'NO'} ({len(ids_new)} vs {len(ids_old)} rules)")
    print("TASO (SOSP'19): 743 rules from graphs of up to 4 ops in about 5 minutes (C++).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
