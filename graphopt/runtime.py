"""The optimised graph at run time: what it assumed at optimisation time is checked per call.

An optimised GraphModule reads some tensors as constants: weights folded into new ones
(the concatenation of q/k/v after a merge rule), and values a rewrite relied on (a mask
buffer that a guard found causal, a scalar written into the code as a number).  The
model can change them after :func:`graphopt.optimize` returned: ``load_state_dict``, an
in-place edit, ``model.to(dtype)``, a weight replaced by another tensor.
:class:`GuardedGraph` wraps the optimised module and, per call, looks at each watched
tensor's identity, version counter and data pointer (no value is read: well under a
microsecond per tensor).  When one changed:

* a weight that only feeds folded constants: the folded constants are computed again from
  the new values (the graph's :class:`~graphopt.rewrite.FoldProgram`; no new search);
* a value a rewrite relied on: if its value is still the same (a buffer re-created with the
  same contents) nothing changes, otherwise the original graph runs, for every such call;
* a change of shape, dtype or device: the original graph runs (Dynamo normally compiles a
  new graph for it before this point).

With gradients enabled and a folded weight that requires grad, the folded constants are
computed per call from the live weights, so gradients flow to them (SDPA and the other
registry ops have a backward).  Every call is counted: how many ran the optimised graph,
how many the original and why (:attr:`GuardedGraph.stats`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

# a value a rewrite relied on is copied (to compare with after a change) up to this size
MAX_SNAPSHOT_NUMEL = 1 << 22


@dataclass
class Watched:
    """One tensor the optimised graph depends on: positional argument ``index`` of the
    graph (a weight Dynamo lifts to an input) or attribute ``target`` of ``root``."""

    label: str
    index: int | None
    target: str | None
    root: object = None     # the module ``target`` is read from
    refold: bool = True     # feeds folded constants only (False: its value was relied on)
    names: tuple = ()       # the IR constant inputs it is (for the fold program)
    tied: tuple = ()        # other attribute paths of ``root`` that hold the same tensor
    direct: bool = False    # the optimised module holds it as its own attribute ``target``
    tensor: torch.Tensor | None = None
    version: int = 0
    ptr: int = 0
    meta: tuple = ()
    snapshot: torch.Tensor | None = None


def _state(t) -> tuple:
    # an inference tensor (made under torch.inference_mode) has no version counter: None,
    # which never matches, so it is looked at again at every call
    return (None if t.is_inference() else t._version), t.data_ptr()


def _meta(t) -> tuple:
    return tuple(t.shape), t.dtype, t.device


class _Counted:
    """Counts its runs by outcome (``stats``), and into ``sink`` too when one is set (the
    :class:`~graphopt.optimize.OptimizedModule` reads there what one call ran)."""

    stats: Counter
    sink: Counter | None = None

    def _count(self, outcome: str) -> None:
        self.stats[outcome] += 1
        if self.sink is not None:
            self.sink[outcome] += 1


class GuardedGraph(_Counted):
    """Runs ``fast`` while what it assumed holds (see the module docstring), else ``original``.

    Args:
        fast: the optimised module (its folded constants are attributes named by
            ``targets``: IR constant name -> attribute).
        original: what to run instead (the captured graph, or the model).
        watched: the tensors to check per call (:class:`Watched`).
        program: the :class:`~graphopt.rewrite.FoldProgram` of the folded constants.
        fixed_values: IR constant inputs the program reads that never change (literals).
        can_refold: False when ``fast`` has its constants compiled in (inductor).
    """

    def __init__(self, fast, original, watched: list, program=None, targets=None, fixed_values=None,
                 can_refold: bool = True, args=()):
        self.fast, self.original = fast, original
        self.watched, self.program = watched, program
        self.targets, self.fixed_values = dict(targets or {}), dict(fixed_values or {})
        self.can_refold = can_refold and program is not None and bool(program.outputs)
        self.can_rebind = can_refold
        self.stats: Counter = Counter()
        self._program_inputs = [w for w in watched if w.names]
        self._grad_inputs = [w for w in self._program_inputs if w.refold]
        self._fixed = [w for w in watched if not w.refold]
        for w in watched:
            t = self._current(w, args)
            w.tensor, (w.version, w.ptr), w.meta = t, _state(t), _meta(t)
            if not w.refold and t.numel() <= MAX_SNAPSHOT_NUMEL:
                w.snapshot = t.detach().clone()
        self._bad: dict = {}   # label -> (tensor, version, ptr, why) known to differ from what was assumed
        self._stale = False    # a folded weight changed: the folded constants need computing again

    def _current(self, w: Watched, args):
        if w.index is not None:
            return args[w.index]
        return _lookup(w.root, w.target)

    def __call__(self, *args, **kwargs):
        grad = torch.is_grad_enabled() and self._grad_inputs and any(
            self._current(w, args).requires_grad for w in self._grad_inputs)
        why = self.check(args, refold=not grad)
        if why is None and grad and not self.can_refold:
            why = "gradients are needed through folded weights compiled into the graph"
        if why is None and torch.is_grad_enabled() and self._fixed:
            needs = next((w for w in self._fixed if self._current(w, args).requires_grad), None)
            if needs is not None:   # (a learnable scale written into the code as a number)
                why = f"gradients are needed for {needs.label}, whose value the optimised graph holds fixed"
        if why is not None:
            self._count(why)
            return self.original(*args, **kwargs)
        if grad:
            try:
                return self._with_grad(args, kwargs)
            except _Unfoldable as e:
                self._count(str(e))
                return self.original(*args, **kwargs)
        self._count("optimized")
        return self.fast(*args, **kwargs)

    def check(self, args, refold: bool = True) -> str | None:
        """The per-call guard: None when the optimised graph may run (with ``refold``, its
        folded constants are computed again first if a weight changed), else why not."""
        for w in self.watched:
            t = self._current(w, args)
            if t is w.tensor and w.version is not None and t._version == w.version and t.data_ptr() == w.ptr:
                continue
            why = self._changed(w, t)
            if why is not None:
                return why
            self._stale = self._stale or (w.refold and bool(w.names))   # (kept until the refold ran)
        if self._stale and refold:
            try:
                self._refold(args)
            except _Unfoldable as e:
                return str(e)
            self._stale = False
        return None

    def _changed(self, w: Watched, t):
        """None when the change can be followed (the new state is recorded), else why not."""
        state = (t, *_state(t))
        bad = self._bad.get(w.label)
        if bad is not None and bad[0] is t and bad[1:3] == state[1:] and state[1] is not None:
            return bad[3]
        why = None
        if not isinstance(t, torch.Tensor) or _meta(t) != w.meta:
            why = f"{w.label} changed shape, dtype or device"
        elif w.index is None and t is not w.tensor and w.tied:
            why = f"{w.label} was replaced, and it was one tensor with {', '.join(w.tied)}"
        elif w.index is None and t is not w.tensor and not self._rebind(w, t):
            why = f"{w.label} was replaced by another tensor, which the optimised module cannot read"
        elif not w.refold:
            if w.snapshot is None or not torch.equal(t, w.snapshot):
                why = f"{w.label} changed, and its value was relied on at optimisation time"
        elif w.names and not self.can_refold:
            why = f"{w.label} changed, and the optimised graph has its folded constants compiled in"
        if why is not None:
            self._bad[w.label] = (*state, why)
            return why
        w.tensor, (w.version, w.ptr) = t, _state(t)
        return None

    def _rebind(self, w: Watched, t) -> bool:
        """A weight the optimised module holds as its own attribute was replaced in the model
        (``model.proj.weight = nn.Parameter(...)``): the module reads the new one too."""
        if not self.can_rebind:
            return False
        parent, _, name = w.target.rpartition(".")
        try:
            if w.direct:
                setattr(_lookup(self.fast, parent) if parent else self.fast, name, t)
            return True
        except (AttributeError, TypeError):   # not held there, or a Parameter slot and a plain tensor
            return False

    def _values(self, args, detach: bool) -> dict:
        values = dict(self.fixed_values)
        for w in self._program_inputs:
            t = self._current(w, args)
            for name in w.names:
                values[name] = t.detach() if detach else t
        return values

    def _fold(self, args, detach: bool) -> dict:
        """The folded constants from the weights' values now, computed as at optimisation
        time: without autocast or inference mode, and of the same types."""
        with _plain_mode(grad=not detach):
            new = self.program.run(self._values(args, detach=detach))
        for name, value in new.items():
            old = getattr(self.fast, self.targets[name])
            if value.shape != old.shape or value.dtype != old.dtype or value.device != old.device:
                raise _Unfoldable(f"the folded constant {name} would change type")
        return new

    def _refold(self, args) -> None:
        """The folded constants again, from the weights' new values."""
        for name, value in self._fold(args, detach=True).items():
            setattr(self.fast, self.targets[name], value)
        self._count("refolded")

    def _with_grad(self, args, kwargs):
        """A call that gradients flow through: the folded constants computed from the live
        weights for this call (then the cached ones are put back)."""
        live = self._fold(args, detach=False)
        saved = {name: getattr(self.fast, self.targets[name]) for name in live}
        try:
            for name, value in live.items():
                setattr(self.fast, self.targets[name], value)
            self._count("optimized")
            return self.fast(*args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(self.fast, self.targets[name], value)


class _Unfoldable(Exception):
    pass


def _plain_mode(grad: bool):
    """No autocast and no inference mode (a refold under either would store constants of
    another dtype, or inference tensors that a later backward cannot use)."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
    for device in ("cpu", "cuda"):
        if device == "cpu" or torch.cuda.is_available():
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


class CountingGraph(_Counted):
    """The original graph, where nothing was optimised: counted, with the reason."""

    def __init__(self, original, why: str):
        self.original, self.why = original, why
        self.stats: Counter = Counter()

    def __call__(self, *args, **kwargs):
        self._count(self.why)
        return self.original(*args, **kwargs)


def guard_fx(imp, graph, fast, original, example_inputs, root=None, can_refold: bool = True) -> GuardedGraph:
    """Wrap an optimised GraphModule in its per-call guard.

    Args:
        imp: the :class:`~graphopt.frontends.fx.FxImport` of the captured graph.
        graph: the optimised IR graph (``graph.folds``, ``graph.assumed``).
        fast: ``fast`` = the exported GraphModule; ``original``: what runs otherwise.
        example_inputs: the placeholder values now (the watched weights among them).
        root: where weights read with ``get_attr`` live (default: the captured module);
            for ``torch.export`` capture, the user's model.
    """
    import torch.fx as fx
    from .backends.fx import baked_scalars, folded_target
    from .rewrite import FoldProgram
    program = graph.folds if graph.folds is not None else FoldProgram()
    node_of = {ref: node for node, ref in imp.ref_of.items() if isinstance(node, fx.Node)}
    index = {ph: k for k, ph in enumerate(imp.placeholders)}

    def leaves(node) -> set:   # the weights and buffers a value folded on import came from
        out, todo, seen = set(), [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op in ("placeholder", "get_attr"):
                out.add(n)
            todo.extend(n.all_input_nodes)
        return out

    def resolve(name) -> set:  # the source tensors an IR constant input's value comes from
        if name in program.outputs:
            return set().union(*[resolve(s) for s in program.sources([name])])
        node = node_of.get(name)
        return set() if node is None else leaves(node)

    fixed: set = set()         # sources whose values were relied on
    for inp in graph.inputs:   # values folded on import (a mask sliced from a buffer) are baked in
        node = node_of.get(inp.name)
        if inp.const and node is not None and node.op not in ("placeholder", "get_attr"):
            fixed |= leaves(node)
    for name in set(graph.assumed) | baked_scalars(graph):
        fixed |= resolve(name)
    names: dict = {}           # source -> the IR constant inputs of the fold program it is
    fixed_values = {}
    for name in program.inputs:
        node = node_of.get(name)
        if node is not None and node.op in ("placeholder", "get_attr"):
            names.setdefault(node, []).append(name)
        else:
            fixed_values[name] = graph.constants[name]
            fixed |= resolve(name)
    # weights the optimised module reads as its own attributes: another tensor assigned to
    # the model's attribute (with torch.export capture) is not seen by it, so it is watched
    direct = {node_of[i.name] for i in graph.inputs if i.name in node_of and node_of[i.name].op == "get_attr"}
    # (with the buffers the graph writes: a new tensor assigned to one is written from then on)
    watched = []
    for node in sorted(fixed | set(names) | direct, key=lambda n: n.name):
        if node.op == "placeholder" and node not in index:
            continue
        is_arg = node.op == "placeholder"
        owner = None if is_arg else _owner(node.target, root, imp.gm)
        watched.append(Watched(_label(node), index[node] if is_arg else None, None if is_arg else node.target,
                               owner, refold=node not in fixed, names=tuple(names.get(node, ())),
                               direct=node in direct))
    _watch_tied(watched, root)
    targets = {name: folded_target(name) for name in program.outputs}
    return GuardedGraph(fast, original, watched, program, targets, fixed_values, can_refold, example_inputs)


def _watch_tied(watched: list, root) -> None:
    """Tied weights (GPT-2's ``lm_head.weight is transformer.wte.weight``): torch.export
    reads them through one path.  Every path of the model that holds a watched tensor is
    watched; when one of them is replaced, they are no longer one tensor, which the graph
    cannot express, and the model runs instead."""
    if not isinstance(root, torch.nn.Module):
        return
    paths: dict = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        paths.setdefault(id(t), []).append(name)
    have = {w.target for w in watched if w.target is not None}
    for w in list(watched):
        if w.target is None or w.root is not root:
            continue
        t = _lookup(root, w.target)
        others = tuple(p for p in paths.get(id(t), ()) if p != w.target)
        if not others:
            continue
        w.tied = others
        for p in others:
            if p not in have:
                have.add(p)
                watched.append(Watched(p, None, p, root, refold=w.refold, tied=(w.target,)))


def _lookup(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(target: str, *roots):
    """The first of ``roots`` that has the attribute ``target`` (a dotted path)."""
    for r in roots:
        try:
            if isinstance(_lookup(r, target), torch.Tensor):
                return r
        except AttributeError:
            continue
    return roots[-1]


def _label(node) -> str:
    """A readable name for a weight: ``h.0.attn.c_attn.weight`` from Dynamo's source
    ``L['self']._modules['h']...._parameters['weight']``."""
    import re
    source = getattr(node.meta.get("grapharg"), "source", None)
    text = str(getattr(source, "name", "") or "")
    parts = [p for p in re.findall(r"\[['\"]([^'\"]+)['\"]\]", text) if p != "self"]
    return ".".join(parts) if parts else str(node.target)


__all__ = ["GuardedGraph", "CountingGraph", "Watched", "guard_fx", "MAX_SNAPSHOT_NUMEL"]
