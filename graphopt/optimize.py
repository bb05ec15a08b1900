"""``graphopt.optimize`` and the ``"graphopt"`` torch.compile backend: the torch frontend
of the pipeline (:mod:`graphopt.pipeline`).

Per captured graph (Dynamo hands one per graph break) the pipeline imports it into the
IR (unknown ops stay opaque), runs the schedule's rulesets (canonicalise, fuse, search),
folds constant-only subgraphs (e.g. a concatenated weight after a merge), writes the
result back as a GraphModule and, with ``verify`` (the default), compares it with the
original on the example inputs and on fresh random inputs of the same shapes.  On any
mismatch or error the original graph is used and the report says why: the optimizer
never returns a module that computes something else.  This module adds what only torch
has: the example inputs Dynamo passes, module buffers behind a guard, and the capture.
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from .errors import GraphoptError
from .options import Options
from .report import GraphReport, Report, format_report  # noqa: F401  (re-exported)


def _cost_model(opts: Options, example_inputs):
    from cost_models import get_cost_model
    device = opts.device
    if device is None:
        dev = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        device = "cpu" if dev.type == "cpu" else _gpu_name() if dev.type == "cuda" else "cpu"
    return get_cost_model(opts.cost_model, device=device)


def _gpu_name() -> str:
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return "h100"


class Backend:
    """A torch.compile backend that optimises each captured graph; keeps the reports
    and the optimised GraphModules."""

    def __init__(self, options=None, stage=None):
        self.options = Options.of(options)
        self.stage = stage      # called with each stage's name (a progress display), or None
        self.report = Report()
        self.modules: list = []
        self.ran: Counter = Counter()   # what the graphs ran since it was last cleared (one call)

    def __call__(self, gm, example_inputs, **kwargs):
        opts = self.options if not kwargs.get("options") else Options.of(kwargs["options"])
        out, rep = optimize_graph_module(gm, example_inputs, opts, root=kwargs.get("root"),
                                         eager=kwargs.get("eager"), stage=self.stage)
        self.report.graphs.append(rep)
        from .backends.fx import torch_op_counts
        from .runtime import CountingGraph, GuardedGraph
        rep.op_counts = {"before": torch_op_counts(gm),
                         "after": torch_op_counts(out.fast if isinstance(out, GuardedGraph) else gm)}
        if isinstance(out, GuardedGraph):
            out.stats.clear()   # (the verifier's runs are not calls)
            self.modules.append(out.fast)
            if opts.inductor:
                out.fast, out.can_refold, out.can_rebind = _inductor(out.fast, example_inputs), False, False
            rep.runtime = out
        else:
            self.modules.append(gm)
            run = _inductor(gm, example_inputs) if opts.inductor else gm
            rep.runtime = CountingGraph(run, f"not optimised ({rep.fallback})" if rep.fallback else "nothing to optimise")
        rep.runtime.sink = self.ran
        return rep.runtime


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


class FxFrontend:
    """The pipeline's view of one captured GraphModule (see :mod:`graphopt.pipeline`)."""

    what = "graph"

    def __init__(self, gm, example_inputs, opts: Options, root=None, eager=None):
        self.original, self.example_inputs, self.opts = gm, list(example_inputs), opts
        self.root, self.eager = root, eager   # torch.export capture: the user's model
        self.known = _parameters(gm, self.example_inputs)   # placeholder -> its value (weights, buffers)
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.constant_positions = {k for k, ph in enumerate(phs) if ph in self.known}

    def import_graph(self):
        from .frontends.fx import import_fx
        return import_fx(self.original, self.example_inputs,
                         constant_inputs=self.known)

    def adjust(self, imp, plan, rep):
        return plan

    def export(self, imp, graph):
        """The optimised GraphModule, behind the per-call guard of what it assumes
        (:mod:`graphopt.runtime`: weights folded or relied on)."""
        from .backends.fx import export_fx
        from .runtime import guard_fx
        fast = export_fx(imp, graph)
        return guard_fx(imp, graph, fast, self.eager or self.original, self.example_inputs, root=self.root)

    def trials(self) -> list:
        trials = _trials(self.original, self.example_inputs, self.opts)
        phs = [n for n in self.original.graph.nodes if n.op == "placeholder"]
        bindings = [b for b in size_bindings(phs)]
        # the sizes of each trial, for the report: the example's (hints), then the others
        hints = {str(s): v for s, v in _example_sizes(phs, self.example_inputs).items()}
        self.trial_sizes = [hints] * (len(trials) - len(bindings)) + [{str(k): v for k, v in b.items()}
                                                                      for b in bindings]
        return trials

    def run(self, module, inputs) -> list:
        """One call on copies of the inputs (a graph may update them in place: a KV cache,
        a position counter), with the module state it writes put back afterwards."""
        from .frontends.fx import fetch_attr, mutated_roots
        from .runtime import GuardedGraph
        state = [fetch_attr(self.original, n.target) for n in mutated_roots(self.original) if n.op == "get_attr"]
        saved = [t.clone() for t in state]
        before = Counter(module.stats) if isinstance(module, GuardedGraph) else None
        try:   # the same random numbers for both versions: dropout in training mode stays
            with torch.no_grad(), torch.random.fork_rng(devices=_devices(inputs)):
                torch.manual_seed(self.opts.seed)
                out = _flatten(module(*_copies(inputs, self.constant_positions)))
        finally:
            _restore(state, saved)
        if before is not None and (module.stats - before).keys() - {"optimized", "refolded"}:
            # the guard ran the original: comparing it with itself would prove nothing
            why = next(iter((module.stats - before).keys() - {"optimized", "refolded"}))
            raise GraphoptError(f"the optimised graph's guard fell back during verification ({why})")
        return out


def optimize_graph_module(gm, example_inputs, opts: Options, root=None, eager=None, stage=None):
    """Optimise one captured GraphModule; returns (module to run, GraphReport): a
    :class:`~graphopt.runtime.GuardedGraph`, or ``gm`` itself when nothing was optimised."""
    from .pipeline import optimize_with
    return optimize_with(FxFrontend(gm, example_inputs, opts, root, eager), opts,
                         _cost_model(opts, example_inputs), stage=stage)


def _parameters(gm, example_inputs) -> dict:
    """Placeholders whose values are known: nn.Parameters (Dynamo lifts a module's weights
    to inputs) and the module's buffers that the graph does not write to (a causal mask
    registered with ``register_buffer``).  Subgraphs of them only are precomputed, and
    guarded rules read them (is this mask causal?).  They can change between calls: the
    optimised graph watches them (:mod:`graphopt.runtime`)."""
    from .frontends.fx import mutated_roots
    written = mutated_roots(gm)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {ph: t for ph, t in zip(phs, example_inputs)
            if isinstance(t, torch.nn.Parameter) or (_is_buffer(ph) and ph not in written
                                                      and isinstance(t, torch.Tensor))}


def _is_buffer(ph) -> bool:
    source = getattr(ph.meta.get("grapharg"), "source", None)
    return "._buffers[" in str(getattr(source, "name", ""))


def _trials(original, example_inputs, opts: Options) -> list:
    """The example inputs, then fresh random ones of the same shapes (weights and buffers
    kept; integer inputs such as token ids drawn within the range seen and 0-1, boolean
    ones at random)."""
    gen = torch.Generator().manual_seed(opts.seed)
    example_inputs = [_hint(x) for x in example_inputs]
    trials = [list(example_inputs)]
    phs = [n for n in original.graph.nodes if n.op == "placeholder"]
    buffers = [_is_buffer(n) for n in phs]
    for _ in range(opts.verify_trials):
        trials.append([t if isinstance(t, torch.nn.Parameter) or is_buffer else _random_like(t, getattr(t, "shape", None), gen)
                       for t, is_buffer in zip(example_inputs, buffers)])
    for binding in size_bindings(phs):   # a graph with symbolic sizes: other sizes too
        trial = _at_sizes(phs, example_inputs, buffers, binding, gen)
        trials.append(trial)   # (None: a weight of symbolic size; the verifier skips it)
    return trials


# the sizes every symbolic size is also verified at: 1, sizes that are not multiples of 8,
# and one trial where the symbols differ from each other
SIZE_TRIALS = ((1,), (5,), (11,), (3, 7, 2, 9))


def _symbols(phs) -> list:
    """The size symbols of the placeholders' example values (Dynamo's ``s0``...), in order."""
    from .frontends.fx import _meta_value
    out: list = []
    for ph in phs:
        v = _meta_value(ph)
        sizes = [v] if isinstance(v, torch.SymInt) else list(v.shape) if isinstance(v, torch.Tensor) else []
        for d in sizes:
            if isinstance(d, torch.SymInt):
                out += [s for s in sorted(d.node.expr.free_symbols, key=str) if s not in out]
    return out


def _example_sizes(phs, example_inputs) -> dict:
    """symbol -> its value in the example inputs."""
    from .frontends.fx import _meta_value
    out = {}
    for ph, x in zip(phs, example_inputs):
        v = _meta_value(ph)
        pairs = [(v, x)] if isinstance(v, torch.SymInt) else \
            list(zip(v.shape, x.shape)) if isinstance(v, torch.Tensor) and isinstance(x, torch.Tensor) else []
        for d, n in pairs:
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                out[d.node.expr] = int(_hint(n))
    return out


def size_bindings(phs) -> list:
    """Bindings of the graph's size symbols to verify at (none for a graph without any)."""
    syms = _symbols(phs)
    if not syms:
        return []
    return [{s: values[k % len(values)] for k, s in enumerate(syms)} for values in SIZE_TRIALS]


def _at_sizes(phs, example_inputs, constants, binding, gen):
    """Inputs of the graph with its size symbols at ``binding`` (random values, integer ones
    within the range seen); None when a constant input (a weight) has a symbolic size."""
    from .frontends.fx import _meta_value
    out = []
    for ph, t, constant in zip(phs, example_inputs, constants):
        v = _meta_value(ph)
        if isinstance(v, torch.SymInt):
            size = v.node.expr.xreplace(binding)   # (a sympy Integer, or a python int for a bare symbol)
            if not (isinstance(size, int) or getattr(size, "is_Integer", False)) or int(size) < 0:
                return None
            out.append(int(size))
            continue
        if not isinstance(v, torch.Tensor) or not isinstance(t, torch.Tensor) or \
                all(isinstance(d, int) for d in v.shape):
            out.append(t)
            continue
        if isinstance(t, torch.nn.Parameter) or constant:
            return None
        shape = tuple(int(d.node.expr.xreplace(binding)) if isinstance(d, torch.SymInt) else d for d in v.shape)
        if any(d < 0 for d in shape):
            return None     # (a size such as s0 - 2 at s0 = 1: no such input)
        out.append(_random_like(t, shape, gen))
    return out


def _random_like(t, shape, gen):
    """Random values of t's kind and the given shape (t itself when not a tensor)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point():
        r = torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype).to(t.device)
        return r * (t.float().std().item() if t.numel() > 1 else 1.0)
    if t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        # within the range seen, widened to 0 and 1 at least: an all-ones attention
        # mask must also be tried with zeros (a trial the original itself rejects,
        # e.g. a token id past the vocabulary, is skipped by the verifier)
        lo, hi = min(int(t.min()), 0), max(int(t.max()) + 1, 2)
        return torch.randint(lo, hi, shape, generator=gen, dtype=t.dtype).to(t.device)
    if t.dtype == torch.bool:
        return torch.rand(shape, generator=gen).to(t.device) < 0.5
    return t


def _hint(x):
    """A symbolic size (Dynamo passes them for dynamic shapes) as the int it stands for now,
    read without installing a guard (``int()`` would specialise the graph)."""
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)
        if hint is None:
            raise GraphoptError("a symbolic size has no example value to verify with")
        return int(hint)
    return x


def _devices(inputs) -> list:
    return sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})


def _restore(state, saved) -> None:
    with torch.no_grad():
        for t, s in zip(state, saved):
            t.copy_(s)


def _copies(args, constants=frozenset()) -> list:
    """Copies of the inputs a call may write to (weights and unwritten buffers are passed
    as they are: the optimised graph's guard watches their identity)."""
    return [t.clone() if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
            and k not in constants else t for k, t in enumerate(args)]


def _flatten(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    if isinstance(x, dict):
        return [y for k in sorted(x) for y in _flatten(x[k])]
    return [x]


class OptimizedModule(torch.nn.Module):
    """The optimised model: same call signature, ``.report`` and ``.stats()``."""

    def __init__(self, model, compiled, backend: Backend, capture: str = "dynamo"):
        super().__init__()
        self._original = [model]    # a list: not registered as a submodule twice
        self._compiled = compiled
        self._backend = backend
        self._capture = capture
        self._calls: Counter = Counter()
        # torch.export specialises on each submodule's training flag (dropout, batch norm);
        # Dynamo guards on it itself
        self._modes = _training_flags(model) if capture == "export" else None

    @property
    def report(self) -> Report:
        self._backend.report.calls = self.stats()
        return self._backend.report

    @property
    def graph_modules(self) -> list:
        """The optimised GraphModules, one per captured graph."""
        return list(self._backend.modules)

    def stats(self) -> dict:
        """How the calls so far ran: ``{"calls": n, "optimized": n, "original": {reason: n}}``.

        A call is ``optimized`` when every captured graph it ran was the optimised one;
        otherwise the reasons say why not (a weight changed and was relied on, a dispatch
        mode was active, Dynamo ran the model eagerly, a graph was not optimised).
        Per graph, ``graphs`` gives the same counts (``refolded``: folded constants computed
        again after a weight changed).
        """
        graphs = [dict(g.runtime.stats) if g.runtime is not None else {} for g in self._backend.report.graphs]
        return {"calls": self._calls["calls"], "optimized": self._calls["optimized"],
                "original": {k: v for k, v in self._calls.items() if k not in ("calls", "optimized")},
                "graphs": graphs}

    def forward(self, *args, **kwargs):
        self._calls["calls"] += 1
        mode = _dispatch_mode() if self._capture == "dynamo" else None
        if mode is not None:
            # Dynamo does not run compiled code under a dispatch mode, and (torch 2.13) then
            # marks the frame to be skipped for good; run eagerly, without Dynamo seeing it
            self._calls[f"a dispatch mode ({type(mode).__name__}) was active: the model ran eagerly"] += 1
            with torch.compiler.set_stance("force_eager"):
                return self._original[0](*args, **kwargs)
        if self._modes is not None and _training_flags(self._original[0]) != self._modes:
            self._calls["the model's train/eval mode changed since the export capture: the model ran"] += 1
            return self._original[0](*args, **kwargs)
        ran = self._backend.ran
        ran.clear()
        try:
            if self._capture == "dynamo":
                with _recompile_limits():
                    out = self._compiled(*args, **kwargs)
            else:
                out = self._compiled(*args, **kwargs)
        except Exception:
            self._calls["raised an error"] += 1
            raise
        if not ran:
            self._calls["Dynamo ran the model eagerly (no captured graph ran)"] += 1
        elif set(ran) <= _AS_OPTIMISED | _UNCHANGED and set(ran) & _AS_OPTIMISED:
            self._calls["optimized"] += 1
        else:
            for why in set(ran) - _AS_OPTIMISED:
                self._calls[why] += 1
        return out


# what a captured graph's run says when it ran the optimised graph; and when it ran the
# original because no rewrite applied to it (a call counts as optimised if some graph was)
_AS_OPTIMISED = {"optimized", "refolded"}
_UNCHANGED = {"nothing to optimise"}


def _training_flags(model) -> tuple:
    return tuple(m.training for m in model.modules()) if isinstance(model, torch.nn.Module) else ()


def _dispatch_mode():
    """The active TorchDispatchMode that makes Dynamo skip compiled code, or None."""
    from torch.utils import _python_dispatch as pd
    if getattr(torch._dynamo.config, "inline_torch_dispatch_torch_compile", False):
        active = pd.any_torch_dispatch_mode_on_stack()
    else:
        active = pd.is_in_any_mode_without_ignore_compile_internals()
    return (pd._get_current_dispatch_mode() or object()) if active else None


def optimize(model, example_inputs, capture: str = "dynamo", progress=None, dynamic: bool | None = False,
             **options) -> OptimizedModule:
    """Optimise a torch module (or function) for the given example inputs.

    Args:
        model: an ``nn.Module`` or callable; it is not modified.
        example_inputs: a tuple of positional inputs (a single tensor is accepted).
        capture: ``"dynamo"`` (torch.compile's graph capture; graph breaks are fine)
            or ``"export"`` (``torch.export``: one whole graph, or an error).
        progress: optional callable, called with the name of each stage as it starts
            (``"capture"``, ``"import"``, ``"search"``, ``"verify"``), e.g. a
            :class:`graphopt.progress.Stages` display.
        dynamic: Dynamo's ``dynamic`` (with ``capture="export"``, True exports every axis as
            ``Dim.AUTO``).  False (the default): one graph per set of sizes, each
            optimised for its sizes.  True: sizes symbolic from the start, one graph (fused and
            verified over several sizes) for every size.  None (``torch.compile``'s default):
            the example's sizes first, then one symbolic graph once a call brings other sizes
            (Dynamo remembers sizes per code object: a second model of the same class may then
            be captured symbolic at once).
        **options: see :class:`Options` (``rules``, ``cost_model``, ``alpha``,
            ``budget``, ``time_limit``, ``verify``, ``inductor``, ``seed``).
    Returns:
        a module with the same call signature whose ``.report`` says which rules
        were applied, the cost before and after, and the search time.

    Example:
        >>> fast = graphopt.optimize(model, (x,))
        >>> y = fast(x)
        >>> print(fast.report)
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    backend = Backend(options, stage=progress)
    from .schedule import planned
    planned(backend.options)  # load (and verify) the rules now: a bad rule file is an error, not a fallback
    start = time.monotonic()
    if progress is not None:
        progress("capture")
    if capture == "export":
        try:
            shapes = None
            if dynamic:   # every axis of every tensor input may be symbolic; export keeps what must be static
                auto = torch.export.Dim.AUTO
                shapes = tuple({k: auto for k in range(x.dim())} if isinstance(x, torch.Tensor) else None
                               for x in example_inputs)
            gm = torch.export.export(model, example_inputs, dynamic_shapes=shapes).module()
        except Exception as e:
            raise GraphoptError(f"torch.export could not capture the model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); try capture='dynamo'") from None
        compiled = backend(gm, list(example_inputs), root=model, eager=model)
    elif capture == "dynamo":
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        with torch.no_grad(), _recompile_limits():
            compiled(*example_inputs)   # capture and optimise now, not at the first user call
        if not backend.report.graphs:
            raise GraphoptError("Dynamo captured no graph of the model (it runs eagerly); try capture='export'")
    else:
        raise GraphoptError(f"unknown capture {capture!r} (dynamo or export)")
    backend.report.total_seconds = time.monotonic() - start
    return OptimizedModule(model, compiled, backend, capture)


class _recompile_limits:  # noqa: N801  (used as a context manager, like a function)
    """Dynamo settings for graphopt's captures and calls.  Dynamo caches compiled code per code
    object: many models of one class (or one wrapper) would hit its recompile limit and
    silently run eagerly, so the limits are raised (a call with grad enabled, a new dtype,
    compiles again).  Python floats stay constants (``specialize_float``): otherwise a second
    model of the same class with another head size makes Dynamo pass its attention scale as a
    tensor input, which SDPA cannot take as its ``scale``.  Sizes still become symbolic when
    they change (automatic dynamic shapes)."""

    KEYS, AT_LEAST = ("recompile_limit", "accumulated_recompile_limit"), 4096

    def __enter__(self):
        cfg = torch._dynamo.config
        self.saved = [(k, getattr(cfg, k)) for k in self.KEYS if hasattr(cfg, k) and getattr(cfg, k) < self.AT_LEAST]
        for k, _ in self.saved:
            setattr(cfg, k, self.AT_LEAST)
        if hasattr(cfg, "specialize_float") and not cfg.specialize_float:
            self.saved.append(("specialize_float", False))
            cfg.specialize_float = True

    def __exit__(self, *exc):
        for k, v in self.saved:
            setattr(torch._dynamo.config, k, v)


def graphopt_backend(gm, example_inputs, options=None):
    """The function registered as ``torch.compile(backend="graphopt")``."""
    backend = Backend(options)
    out = backend(gm, example_inputs)
    LAST_REPORTS.append(backend.report)
    del LAST_REPORTS[:-16]
    return out


LAST_REPORTS: list = []   # reports of recent torch.compile(backend="graphopt") graphs


def register() -> None:
    from torch._dynamo import list_backends, register_backend
    if "graphopt" not in list_backends(exclude_tags=()):
        register_backend(graphopt_backend, name="graphopt")
