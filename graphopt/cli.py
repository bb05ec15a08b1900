"""The ``graphopt`` command line.

Every user error ends in one line ``graphopt: error: ...`` on stderr and exit
status 2; a failed verification exits 1.  No traceback reaches the user.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GraphoptError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise GraphoptError(f"{self.prog.split()[-1]}: {message}")


def _cmd_generate(args) -> int:
    from .enumerate import DEFAULT_OPS
    from .generate import GenerateSettings, generate, parse_inputs
    from .ops import get_op

    _check_output_path(args.output)
    if args.ops is not None and not args.ops.strip(", "):
        raise GraphoptError("--ops is empty")
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip()) if args.ops else DEFAULT_OPS
    for op in ops:
        get_op(op)
    settings = GenerateSettings(max_ops=args.max_ops, ops=ops, seed=args.seed, z3=not args.no_z3,
                                z3_timeout_ms=args.z3_timeout,
                                max_rule_ops=args.max_rule_ops)
    if args.inputs:
        settings.inputs = parse_inputs(args.inputs)
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    lib = generate(settings, workers=args.workers, progress=not args.quiet, log=say)
    lib.save(args.output)
    if not args.quiet:
        print(f"wrote {len(lib)} rules to {args.output}")
        _print_stats(lib.meta)
    return 0


def _check_output_path(path) -> None:
    """Fail before minutes of work, not after, when the output cannot be written."""
    import os
    from pathlib import Path
    p = Path(path)
    directory = p.parent if str(p.parent) else Path(".")
    if not directory.is_dir():
        raise GraphoptError(f"{path}: directory {directory} does not exist")
    if p.is_dir():
        raise GraphoptError(f"{path}: is a directory")
    if not os.access(directory, os.W_OK):
        raise GraphoptError(f"{path}: directory {directory} is not writable")


def _print_stats(meta: dict) -> None:
    print("stage statistics:")
    for k, v in meta.get("stats", {}).items():
        print(f"  {k:<26} {v}")
    t = meta.get("timings", {})
    print("  " + ", ".join(f"{k}={v}" for k, v in t.items()))


def _load(path):
    """A rule library: a .json library, a .rules text file (parsed and verified), or the
    name of a shipped one (default, handwritten); default: the generated library."""
    from .rules import load_rules
    from .schedule import SHIPPED
    if path is not None and str(path).endswith(".rules"):
        from .rulelang import load_rule_file
        return load_rule_file(path)
    return load_rules(SHIPPED.get(path, path))


def _cmd_rules_compile(args) -> int:
    """Parse and verify text rule files into one JSON library (the shipped handwritten.json)."""
    from .schedule import SHIPPED, compile_hand_written, hand_written_sources
    if args.files and not args.output:
        raise GraphoptError("rules compile FILE...: say where to write the library with -o PATH "
                            "(without files, it compiles the shipped ones to substitutions/handwritten.json)")
    sources = args.files or hand_written_sources()
    output = args.output or str(SHIPPED["handwritten"])
    for f in sources:
        if not str(f).endswith(".rules"):
            raise GraphoptError(f"{f}: not a .rules file")
    lib = compile_hand_written(sources)
    text = lib.dumps()
    if args.check:
        from pathlib import Path
        current = Path(output).read_text() if Path(output).exists() else None
        if current != text:
            print(f"{output} is out of date with {', '.join(map(str, sources))}: run graphopt rules compile")
            return 1
        print(f"{output} is up to date ({len(lib)} rules)")
        return 0
    _check_output_path(output)
    from .rules import write_atomic
    write_atomic(output, text)
    names = sorted({r.provenance.get("ruleset", "?") for r in lib})
    print(f"wrote {len(lib)} verified rules ({', '.join(names)}) to {output}")
    return 0


def _cmd_rules_list(args) -> int:
    lib = _load(args.library)
    rules = lib.with_op(args.op) if args.op else list(lib)
    if args.json:
        print(json.dumps([{"id": r.id, "name": r.name, "size": list(r.size), "layers": r.layers(),
                           "rule": r.summary()} for r in rules], indent=1))
        return 0
    for r in rules:
        label = f" [{r.name}]" if r.name else ""
        print(f"{r.id}  {r.size[0]}->{r.size[1]}  {'+'.join(r.layers()):<21} {r.summary()}{label}")
    print(f"{len(rules)} of {len(lib)} rules", file=sys.stderr)
    return 0


def _cmd_rules_show(args) -> int:
    from .dims import shape_str
    if args.png is not None:
        if not args.png:
            raise GraphoptError("--png needs a file name")
        _check_output_path(args.png)
    rule, error = None, None
    for library in ([args.library] if args.library else ["default", "handwritten"]):
        try:  # without --library: the generated rules, then the hand-written ones
            rule = _load(library)[args.rule_id]
            break
        except KeyError as e:
            error = error or str(e.args[0])
    if rule is None:
        raise GraphoptError(error)
    if args.dot:
        from .render import rule_to_dot
        sys.stdout.write(rule_to_dot(rule))
        return 0
    print(f"rule {rule.id}" + (f" ({rule.name})" if rule.name else ""))
    print("inputs: " + ", ".join(f"{i.name}{shape_str(i.shape)}" for i in rule.inputs))
    print(f"source ({rule.src.num_ops()} ops):\n{rule.src.describe()}")
    print(f"target ({rule.dst.num_ops()} ops):\n{rule.dst.describe()}")
    print(f"as equation: {rule.summary()}")
    print(f"evidence: {json.dumps(rule.evidence)}")
    print(f"provenance: {json.dumps(rule.provenance)}")
    if args.png is not None:
        from .render import rule_to_png
        how = rule_to_png(rule, args.png)
        print(f"wrote {args.png} ({how})")
    return 0


def _cmd_rules_verify(args) -> int:
    from .check import verify_library
    lib = _load(args.library)
    report = verify_library(lib, seed=args.seed, dtypes=tuple(args.dtype), z3=args.z3,
                            progress=not args.quiet)
    for line in report.failures:
        print(f"FAILED {line}")
    print(f"{report.passed} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


def _load_model(args):
    """The model the user named, as ``(model, example_inputs)``: ``--config NAME``, a local
    Hugging Face folder, a built-in example, or ``path/to/file.py:factory``."""
    import os

    from . import hf
    from .models import EXAMPLES, example
    spec = args.model
    if args.config:
        model = hf.from_config(args.config, layers=args.layers or 2, dtype=hf.DTYPES[args.dtype],
                               overrides=_overrides(args.set or ()))
        return model, (hf.example_ids(model, args.batch, args.seq_len, args.seed),)
    if spec in EXAMPLES:
        return example(spec, seq_len=args.seq_len, batch=args.batch, layers=args.layers, seed=args.seed)
    if os.path.isdir(spec) or (not spec.rpartition(":")[0].endswith(".py")
                               and (os.sep in spec or spec.startswith("."))):
        model = hf.load_folder(spec, dtype=hf.DTYPES[args.dtype])
        return model, (hf.example_ids(model, args.batch, args.seq_len, args.seed),)
    return _load_factory(spec)


def _overrides(items) -> dict:
    """``--set KEY=VALUE`` pairs as a dict; a VALUE is read as JSON (numbers, true, lists) or else kept as text."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise GraphoptError(f"--set {item}: expected KEY=VALUE (e.g. --set hidden_size=256)")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _load_factory(spec: str):
    """``path/to/file.py:factory``, whose ``factory()`` returns ``(module, example_inputs)``."""
    import importlib.util
    from pathlib import Path

    import torch

    from .models import EXAMPLES
    path, sep, factory = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise GraphoptError(f"unknown model {spec!r}: give a built-in example ({', '.join(EXAMPLES)}), "
                            "a Hugging Face model folder, --config NAME, or path/to/file.py:factory")
    if not Path(path).is_file():
        raise GraphoptError(f"{path}: no such file")
    mod_spec = importlib.util.spec_from_file_location(f"_graphopt_user_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise GraphoptError(f"{path}: importing it failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise GraphoptError(f"{path}: no function {factory!r}")
    try:
        result = fn()
    except Exception as e:
        raise GraphoptError(f"{path}:{factory}() failed ({type(e).__name__}: {e})") from None
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[0])):
        raise GraphoptError(f"{path}:{factory}() must return (module, example_inputs), "
                            f"got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise GraphoptError(f"{path}:{factory}(): example_inputs must be a tensor or a tuple")
    return model, tuple(inputs)


def _place(model, inputs, dtype_name: str, device: str):
    """The model and its floating-point inputs in the dtype and on the device asked for."""
    import torch

    from .hf import DTYPES
    dtype = DTYPES[dtype_name]
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype if dtype_name != "float32" else None)
    inputs = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                   if isinstance(t, torch.Tensor) else t for t in inputs)
    return model, inputs


def _median_ms(fn, inputs, runs: int) -> float:
    import statistics
    import time

    import torch
    sync = torch.cuda.synchronize if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else (lambda: None)
    with torch.no_grad():
        fn(*inputs)
        times = []
        for _ in range(runs):
            sync()
            t = time.perf_counter()
            fn(*inputs)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _search_options(args) -> dict:
    options = dict(cost_model=args.cost_model, search=args.search, alpha=args.alpha, budget=args.budget,
                   time_limit=args.time_limit, verify=not args.no_verify, seed=args.seed)
    if args.rules:
        from pathlib import Path

        from .schedule import load_source
        for f in args.rules:
            if not Path(f).is_file():
                raise GraphoptError(f"{f}: no such rule file")
            load_source(f)  # parse and verify now: a bad rule file fails before the model is built
        options["rules"] = ("default", "handwritten") + tuple(args.rules)
    if args.ruleset:
        options["rulesets"] = tuple(args.ruleset)
    return options


def _cmd_optimize(args) -> int:
    if args.config == "list":
        from .hf import causal_lm_names
        print("\n".join(causal_lm_names()))
        return 0
    if args.set and not args.config:
        raise GraphoptError("--set is for --config NAME (a model folder keeps its own config.json)")
    if args.config and args.model:
        raise GraphoptError(f"give a model or --config NAME, not both (got {args.model!r} and --config {args.config})")
    if not args.config and not args.model:
        raise GraphoptError("no model: give a built-in example (gpt2, llama), a Hugging Face model folder, "
                            "--config NAME, path/to/file.py:factory or model.onnx")
    if args.model and args.model.endswith(".onnx"):
        if args.tp:
            raise GraphoptError("--tp is for torch models (an ONNX file is not sharded)")
        return _cmd_optimize_onnx(args)
    if args.tp is not None:
        return _cmd_optimize_tp(args)
    if args.plan_only:
        raise GraphoptError("--plan-only is for tensor-parallel plans: give --tp N")
    if args.device not in ("cpu", "cuda"):
        raise GraphoptError(f"--device {args.device} names a device to cost a --tp plan on; "
                            "a model runs on cpu or cuda")
    import torch

    from . import optimize
    from .optimize import _flatten
    from .options import Options
    from .progress import Stages
    from .rules import write_atomic
    if args.opset is not None:
        raise GraphoptError("--opset is for ONNX models (model.onnx)")
    if args.output and not args.output.endswith(".pt2"):
        raise GraphoptError(f"-o {args.output}: a torch model is written as a torch.export program "
                            "(-o PATH.pt2); ONNX files are optimized from model.onnx")
    capture = args.capture or ("export" if args.output else "dynamo")
    if args.output and capture != "export":
        raise GraphoptError("-o PATH.pt2 writes one whole graph: use it with --capture export (the default with -o)")
    for path in (args.output, args.save, args.html):
        if path:
            _check_output_path(path)
    if args.runs < 1:
        raise GraphoptError(f"--runs must be >= 1, got {args.runs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GraphoptError("--device cuda: no CUDA device is available here")
    options = _search_options(args)
    Options.of(options)  # validate before the slow part
    from cost_models import get_cost_model  # noqa: F401  (fail early on a broken install)
    names = ["load", "capture", "import", "search", "verify", "latency"] + ["write"] * bool(
        args.output or args.save or args.html)
    with Stages(names, enabled=not args.quiet) as stage:
        stage("load")
        model, inputs = _load_model(args)
        model, inputs = _place(model, inputs, args.dtype, args.device)
        fast = optimize(model, inputs, capture=capture, progress=stage, **options)
        with torch.no_grad():
            ref, out = _flatten(model(*inputs)), _flatten(fast(*inputs))
        diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ref, out)
                    if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel()), default=0.0)
        stage("latency")
        eager_ms = _median_ms(model, inputs, args.runs)
        opt_ms = _median_ms(fast, inputs, args.runs)
        result = {"model": args.model or f"--config {args.config}",
                  "inputs": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
                  "dtype": args.dtype, "device": args.device,
                  **fast.report.to_json(), "optimize_seconds": round(fast.report.total_seconds, 2),
                  "latency_ms": {"original": round(eager_ms, 3), "optimized": round(opt_ms, 3),
                                 "speedup": round(eager_ms / opt_ms, 3), "runs": args.runs},
                  "max_abs_diff_outputs": diff}
        if args.output:
            stage("write", args.output)
            from .artifact import write_pt2
            write_pt2(fast, model, inputs, args.output)
            result["saved"] = args.output
        if args.save:
            import io
            buf = io.BytesIO()
            torch.save({"graph_modules": fast.graph_modules, "report": fast.report.to_json()}, buf)
            write_atomic(args.save, buf.getvalue())
            result["pickled"] = args.save
        if args.html:
            stage("write", args.html)
            from .htmlreport import report_html
            page = report_html(result, fast.report, title=result["model"], rule_sources=Options.of(options).rules)
            write_atomic(args.html, page.encode())
            result["html"] = args.html
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(fast.report)
    print(f"  latency        original {eager_ms:.2f} ms, optimized {opt_ms:.2f} ms "
          f"({eager_ms / opt_ms:.2f}x, median of {args.runs}; {args.dtype} on {args.device})")
    print(f"  outputs        max |optimized - original| = {diff:.3g}")
    print(f"  took           {fast.report.total_seconds:.1f} s to capture, search and verify")
    for key, what in (("saved", "torch.export program"), ("pickled", "pickle, for debugging"),
                      ("html", "report page")):
        if key in result:
            print(f"  wrote          {result[key]} ({what})")
    return 0


def _build_for_tp(args):
    """The model and inputs of ``args`` (called in every rank's process)."""
    model, inputs = _load_model(args)
    return _place(model, inputs, args.dtype, "cpu")


def _cmd_optimize_tp(args) -> int:
    """``--tp N``: a tensor-parallel plan over N ranks, run on N local CPU processes (gloo) and
    checked, or with ``--plan-only`` only made and costed (``--device h100`` ...)."""
    import functools

    import torch

    from .parallel.launch import run_local
    from .parallel.plan import plan_parallel
    if args.tp < 1:
        raise GraphoptError(f"--tp must be >= 1, got {args.tp}")
    if args.plan_only:
        device = "cpu" if args.device in ("cpu", "cuda") else args.device
        model, inputs = _build_for_tp(args)
        rep, _ = plan_parallel(model, inputs, args.tp, device=device)
        print(json.dumps(rep.as_dict(), indent=1) if args.json else rep)
        return 0
    if args.device != "cpu":
        raise GraphoptError(f"--tp {args.tp} runs the plan here on CPU processes (gloo); for --device "
                            f"{args.device} add --plan-only (the plan and its estimated speed-up)")
    results = run_local(functools.partial(_build_for_tp, args), args.tp, runs=args.runs)
    r0 = results[0]
    model, inputs = _build_for_tp(args)
    threads = torch.get_num_threads()
    one = _median_ms(model, inputs, args.runs)
    worst = max(max(r["diff"], r["diff_fresh"]) for r in results)
    plan_ms = max(r["seconds"] for r in results) * 1e3
    if args.json:
        print(json.dumps({"report": r0["report"], "ranks": [{k: v for k, v in r.items() if k != "report"}
                                                            for r in results],
                          "model_ms": one, "plan_ms": plan_ms, "max_diff": worst}, indent=1))
        return 0
    print(r0["report"])
    print(f"ran on {args.tp} processes (gloo, {max(1, threads // args.tp)} threads each): outputs equal to the model's "
          f"(max difference {worst:.3g}, example and fresh inputs)")
    print(f"weights per rank: " + ", ".join(f"rank {r['rank']} {r['rank_bytes'] / 1e6:.2f} MB"
                                            for r in results) + f" of {r0['whole_bytes'] / 1e6:.2f} MB")
    print(f"time: plan {plan_ms:.2f} ms on {args.tp} processes vs model {one:.2f} ms in one process with "
          f"{threads} threads (median of {args.runs})")
    return 0


def _cmd_optimize_onnx(args) -> int:
    import time

    from .optimize_onnx import onnx_report, optimize_onnx, random_inputs, session
    from .rules import write_atomic
    for flag, value in (("--html", args.html), ("--save", args.save)):
        if value:
            raise GraphoptError(f"{flag} is for torch models, not ONNX files")
    if args.dtype != "float32" or args.device != "cpu":
        raise GraphoptError("--dtype and --device are for torch models: an ONNX file keeps its own types "
                            "and runs in onnxruntime on CPU")
    if args.output:
        _check_output_path(args.output)
    if args.runs < 1:
        raise GraphoptError(f"--runs must be >= 1, got {args.runs}")
    options = _search_options(args)
    from .frontends.onnx import load_model
    original = load_model(args.model)
    result = optimize_onnx(original, opset=args.opset, **options)
    report = onnx_report(result)
    data = result.SerializeToString()
    feeds = random_inputs(original, seed=args.seed)

    def median_ms(model):
        sess = session(model)
        sess.run(None, feeds)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    try:
        before, after = median_ms(original), median_ms(result)
    except Exception as e:  # noqa: BLE001  (onnxruntime missing or cannot run it: no timings)
        before = after = None
        report["notes"].append(f"no latency measured ({type(e).__name__})")
    report["latency_ms"] = None if before is None else {
        "original": round(before, 3), "optimized": round(after, 3), "speedup": round(before / after, 3),
        "runs": args.runs, "runtime": "onnxruntime CPU"}
    if args.output:
        write_atomic(args.output, data)
        report["saved"] = args.output
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    from .report import format_report
    print(format_report(report, title=args.model))
    if before is not None:
        print(f"  latency        original {before:.2f} ms, optimized {after:.2f} ms "
              f"({before / after:.2f}x, onnxruntime CPU, median of {args.runs})")
    if args.output:
        print(f"  saved          {args.output}" + (" (the original: see FALLBACK)" if report["fallbacks"] else ""))
    return 0


def _cmd_ops(args) -> int:
    from .ops import REGISTRY, registry_version
    print(f"op registry {registry_version()}")
    for op in REGISTRY.values():
        flags = [k for k, v in (("algebraic", op.algebraic), ("commutative", op.commutative),
                                ("view", op.view), ("enumerated", op.enum_attrs is not None)) if v]
        attrs = ", ".join(f"{k}:{s.kind}" for k, s in op.attrs.items())
        print(f"  {op.name:<11} arity {op.arity}  [{', '.join(flags)}]  {attrs}  - {op.doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="TASO-style graph superoptimizer for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="discover and verify rewrite rules")
    g.add_argument("--max-ops", type=int, default=4, help="largest graph size (default 4)")
    g.add_argument("--ops", help="comma-separated op set (default: the default op set)")
    g.add_argument("--inputs", help='input tensors, e.g. "X:a,b;Y:b,c;s:" (default: X:a,b;Y:b,c;Z:b,c;W:c,d;V:b,c+d;s:)')
    g.add_argument("--seed", type=int, default=0, help="seed of fingerprints and float tests")
    g.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    g.add_argument("--max-rule-ops", type=int, default=7,
                   help="drop rules whose two sides have more ops together (default 7)")
    g.add_argument("--no-z3", action="store_true", help="skip Z3 proofs")
    g.add_argument("--z3-timeout", type=int, default=2000, metavar="MS", help="Z3 timeout per rule")
    g.add_argument("-o", "--output", default="rules.json", help="library to write (atomically)")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(func=_cmd_generate)

    r = sub.add_parser("rules", help="inspect and re-check a rule library")
    rsub = r.add_subparsers(dest="rules_command", required=True, parser_class=_Parser)
    rl = rsub.add_parser("list", help="one line per rule")
    rl.add_argument("library", nargs="?", help="rule library: .json, .rules text, or default / handwritten "
                                               "(default: the generated one)")
    rl.add_argument("--op", help="only rules that use this op")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=_cmd_rules_list)
    rs = rsub.add_parser("show", help="one rule in full, optionally as a picture")
    rs.add_argument("rule_id")
    rs.add_argument("--library", help="rule library: .json, .rules text, or default / handwritten "
                                      "(default: the generated, then the hand-written rules)")
    out = rs.add_mutually_exclusive_group()
    out.add_argument("--png", metavar="FILE", help="write a PNG picture")
    out.add_argument("--dot", action="store_true", help="print Graphviz DOT")
    rs.set_defaults(func=_cmd_rules_show)
    rv = rsub.add_parser("verify", help="re-check every rule on fresh seeds and shapes")
    rv.add_argument("library", nargs="?", help="rule library: .json, .rules text, or default / handwritten "
                                               "(default: the generated one)")
    rv.add_argument("--seed", type=int, default=12345)
    rv.add_argument("--dtype", action="append", choices=["float64", "float32", "float16", "bfloat16"],
                    help="torch dtypes to check the lowering in (default float32; repeatable)")
    rv.add_argument("--z3", action="store_true", help="also re-run Z3 on algebraic rules")
    rv.add_argument("-q", "--quiet", action="store_true")
    rv.set_defaults(func=_cmd_rules_verify)
    rc = rsub.add_parser("compile", help="parse and verify .rules text files into a JSON library "
                                         "(default: substitutions/*.rules -> substitutions/handwritten.json)")
    rc.add_argument("files", nargs="*", help=".rules files (default: the shipped ones)")
    rc.add_argument("-o", "--output", help="the JSON library to write (default: substitutions/handwritten.json)")
    rc.add_argument("--check", action="store_true", help="only say whether the output is up to date (exit 1 if not)")
    rc.set_defaults(func=_cmd_rules_compile)

    op = sub.add_parser("optimize", help="optimize a model and report what changed")
    op.add_argument("model", nargs="?",
                    help="a Hugging Face model folder (config.json + safetensors; nothing is downloaded), "
                         "a built-in example (gpt2, llama), path/to/file.py:factory (factory() returns "
                         "(module, example_inputs)), or model.onnx")
    op.add_argument("--config", metavar="NAME",
                    help="instead of a model: any causal-LM architecture of the installed transformers "
                         "(llama, qwen2, gpt2, ...) built from its config with random weights "
                         "(--layers, default 2); '--config list' lists them")
    op.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="with --config: set a config field, e.g. --set hidden_size=256 (repeatable)")
    op.add_argument("-o", "--output", metavar="PATH",
                    help="write the optimized model: PATH.pt2 for a torch model (a torch.export program that "
                         "torch.export.load runs without graphopt; its input shape is the example's), "
                         "or an .onnx file for an ONNX model")
    op.add_argument("--html", metavar="FILE", help="write the report as one self-contained HTML page")
    op.add_argument("--opset", type=int, help="ONNX: convert to this opset first (23 for fused Attention)")
    op.add_argument("--seq-len", type=int, default=128, help="tokens of the example input (default 128)")
    op.add_argument("--batch", type=int, default=1, help="sequences of the example input (default 1)")
    op.add_argument("--layers", type=int, help="layers, for built-in examples and --config "
                                               "(default: the example's; 2 for --config)")
    op.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="the model's dtype (default float32)")
    op.add_argument("--device", choices=["cpu", "cuda", "h100", "h200", "a100", "pcie"], default="cpu",
                    help="where the model runs (default cpu); with --tp N --plan-only, the device the plan is "
                         "costed on (h100, h200, a100: NVLink; pcie: H100s on PCIe 5)")
    op.add_argument("--tp", type=int, metavar="N",
                    help="tensor parallelism: shard the model over N ranks (graphopt.parallelize) and run the "
                         "plan on N local CPU processes (gloo), checking it against the model")
    op.add_argument("--plan-only", action="store_true",
                    help="with --tp N: make and cost the plan (every rank simulated in this process), no run")
    op.add_argument("--capture", choices=["dynamo", "export"],
                    help="graph capture (default: dynamo; export with -o PATH.pt2)")
    op.add_argument("--cost-model", choices=["roofline", "measured"], default="roofline")
    op.add_argument("--search", choices=["egraph", "backtracking", "hybrid"], default="egraph",
                    help="search engine: egraph (equality saturation on egglog, default; finds the LoRA merge), "
                         "backtracking (TASO's), or hybrid: egraph, then backtracking from its graph")
    op.add_argument("--alpha", type=float, default=1.05, help="search relaxation (>= 1.0, backtracking)")
    op.add_argument("--budget", type=int, default=100, help="most graphs the search expands")
    op.add_argument("--time-limit", type=float, default=10.0, help="search seconds per graph")
    op.add_argument("--rules", action="append", metavar="FILE",
                    help="a rule file (.rules text, verified when loaded, or a .json library) to use "
                         "besides the shipped rules; its rulesets join the search unless a phase names them "
                         "(repeatable)")
    op.add_argument("--ruleset", action="append", metavar="NAME",
                    help="run only these rulesets (repeatable; shipped: canonical, attention, fusion, generated)")
    op.add_argument("--no-verify", action="store_true", help="skip the comparison with the original")
    op.add_argument("--runs", type=int, default=5, help="timed runs for the latency medians")
    op.add_argument("--seed", type=int, default=0)
    op.add_argument("--json", action="store_true", help="print the report as JSON")
    op.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    op.add_argument("--save", metavar="PATH",
                    help="debugging aid: pickle the optimized GraphModules with torch.save (loading it needs "
                         "graphopt and runs no guard); to deploy, use -o PATH.pt2")
    op.set_defaults(func=_cmd_optimize)

    o = sub.add_parser("ops", help="list the op registry")
    o.set_defaults(func=_cmd_ops)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "command", None) == "rules" and getattr(args, "dtype", "x") is None:
            args.dtype = ["float32"]
        return args.func(args)
    except GraphoptError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("graphopt: error: out of memory (are the shapes too large?)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line; GRAPHOPT_DEBUG=1 shows the traceback
        import os
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        print(f"graphopt: error: internal error ({type(e).__name__}: {e}); "
              "rerun with GRAPHOPT_DEBUG=1 for a traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
