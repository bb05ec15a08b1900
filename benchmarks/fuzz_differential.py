"""Differential fuzzer: random small models through graphopt.optimize and
torch.compile(backend="graphopt"), compared with eager (issue 15, item 4).

    python benchmarks/fuzz_differential.py --cases 2000 --seed 1 --jsonl /tmp/fuzz/run1.jsonl
    python benchmarks/fuzz_differential.py --seed 1 --only 17 --show      # one case, its source

Every case is rebuilt from (seed, case index) alone (graphopt/fuzz.py: the generator and
the runner).  Each is run eagerly, through ``graphopt.optimize`` and through the
``torch.compile`` backend, on its example inputs and on a fresh input set of the same
shapes, and classified: equal / WRONG (an output differs from eager's) / CRASH (an
exception that is not a GraphoptError escaped) / caught (equal, but a fallback happened:
the safety net refused a rewrite; its reason is counted) / rejected (a GraphoptError).
Exit status 1 when any case is wrong or crashed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import graphopt  # noqa: E402,F401  (registers the torch.compile backend)
from graphopt import fuzz  # noqa: E402


def _reason(fallback: str) -> str:
    """A fallback's reason with the numbers taken out, for counting."""
    return re.sub(r"[-+]?\d[\d.e+-]*", "N", fallback)[:160]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index")
    p.add_argument("--only", type=int, action="append", help="run only this case index (repeatable)")
    p.add_argument("--show", action="store_true", help="print each case's source and result")
    p.add_argument("--jsonl", help="write one JSON line per case here")
    p.add_argument("--paths", default="optimize,compile", help="which of optimize,compile to run")
    p.add_argument("--budget", type=int, default=fuzz.OPTIONS["budget"])
    p.add_argument("--time-limit", type=float, default=fuzz.OPTIONS["time_limit"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the models are tiny)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    fuzz.setup_dynamo()
    options = {"budget": args.budget, "time_limit": args.time_limit}
    paths = tuple(x for x in args.paths.split(",") if x)
    indices = args.only or list(range(args.start, args.start + args.cases))
    out = None
    if args.jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
        out = open(args.jsonl, "w")
    try:
        from tqdm import tqdm
        bar = tqdm(indices, unit="case", mininterval=2.0, file=sys.stderr)
    except ImportError:
        bar = None
    counts = collections.Counter()
    reasons = collections.Counter()
    fused = collections.Counter()
    times = []
    failures = []
    start = time.monotonic()
    for n, k in enumerate(bar if bar is not None else indices):
        case = fuzz.make_case(args.seed, k)
        if args.show:
            print(f"# ---- case {args.seed}/{k}: {' '.join(case.tags)}")
            print(case.source)
        res = fuzz.run_case(case, options, paths)
        counts[res["status"]] += 1
        times.append(res["seconds"].get("total", 0.0))
        for f in res["fallbacks"]:
            reasons[_reason(f)] += 1
        for path, v in res["fused"].items():
            fused[path + "-cases"] += v > 0
            fused[path + "-calls"] += v
        if "attention" in res["tags"]:
            fused["attention-cases"] += 1
        if out:
            out.write(json.dumps(res) + "\n")
            out.flush()
        if res["status"] in ("wrong", "crash", "generator-error"):
            line = f"{res['status'].upper()} case {k}: {'; '.join(res['problems'])[:600]}\n    repro: {case.repro}"
            failures.append(line)
            (bar.write if bar is not None else print)(line)
        if args.show:
            print(f"# result: {res['status']} fused={res['fused']} fallbacks={res['fallbacks']} "
                  f"problems={res['problems']} seconds={res['seconds']}")
            if "traceback" in res:
                print(res["traceback"])
        if bar is None and (n + 1) % 50 == 0:
            print(f"{n + 1}/{len(indices)} cases, {dict(counts)}, {time.monotonic() - start:.0f} s", flush=True)
    if out:
        out.close()
    total = time.monotonic() - start
    steady = times[1:] or times
    print(f"\nfuzz_differential: seed {args.seed}, {len(indices)} cases, {total:.1f} s "
          f"({total / max(1, len(indices)):.3f} s per case; median {statistics.median(steady) if steady else 0:.3f} s, "
          f"max {max(steady) if steady else 0:.2f} s after the first)")
    print(f"  equal {counts['equal']}, WRONG {counts['wrong']}, CRASH {counts['crash']}, caught {counts['caught']}, "
          f"rejected {counts['rejected']}, generator errors {counts['generator-error']}")
    print(f"  attention cases {fused['attention-cases']}; fused into SDPA: "
          + ", ".join(f"{path} {fused[path + '-cases']} cases ({fused[path + '-calls']} calls)" for path in paths))
    if reasons:
        print("  fallbacks (the safety net refused a rewrite):")
        for why, c in reasons.most_common(20):
            print(f"    {c:5d}  {why}")
    if failures:
        print("  failures:")
        for line in failures:
            print("    " + line)
    return 1 if counts["wrong"] or counts["crash"] or counts["generator-error"] else 0


if __name__ == "__main__":
    sys.exit(main())
