"""``graphopt.parallelize``: a model sharded over the ranks of a process group.

Example (run by ``torchrun --nproc-per-node 2 script.py``)::

    import torch.distributed as dist, graphopt
    dist.init_process_group("gloo")                      # "nccl" on GPUs
    plan = graphopt.parallelize(model, (input_ids,), world_size=dist.get_world_size())
    logits = plan(input_ids)                             # whole outputs, on every rank
    print(plan.report)

The model is captured with torch.export, the plan searched (:mod:`graphopt.parallel.search`)
under the sharding rules (``substitutions/parallel.rules``), and this rank's program built
(:mod:`graphopt.parallel.lower`) holding only this rank's shards, copied out of the model's
weights when the plan is made.  Before it is returned, the plan is run on the example inputs
and its outputs compared on every rank with the model's own: any difference on any rank is
one :class:`~graphopt.errors.GraphoptError` on every rank.

:func:`plan_parallel` makes the same plan without a process group (``--plan-only``): its
program is run for every rank in one process (:class:`~graphopt.parallel.lower.Simulation`)
and checked the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ..errors import GraphoptError
from . import collectives
from .layouts import R, Layout, local_shape
from .lower import Simulation, rank_graph, rank_module
from .search import Costs, Plan, Problem, megatron, search

RULE_WORDS = {"linear-column": "column split", "column": "column split", "addmm-column": "column split",
              "linear-bias-column": "column split", "linear-row": "row split", "row": "row split",
              "addmm-row": "row split", "linear-bias-row": "row split", "vocab-embedding": "vocabulary split",
              "heads": "split by heads", "heads-masked": "split by heads", "heads-matmul": "split by heads"}


@dataclass
class LayerLine:
    weight: str
    shape: tuple
    layout: str
    how: str


@dataclass
class ParallelReport:
    """What the plan does, per weight and in total, and what it is estimated to cost."""

    world: int
    device: str
    link: str
    layers: list = field(default_factory=list)
    collectives: dict = field(default_factory=dict)     # kind -> (count, bytes)
    weight_bytes: float = 0.0                           # the single-device model's
    rank_bytes: float = 0.0                             # one rank's shards
    replicated: list = field(default_factory=list)      # (weight, why)
    time_one: float = 0.0                               # estimated seconds, one device
    time_plan: float = 0.0                              # estimated seconds, the plan
    comm: float = 0.0
    checked: str = ""
    predictions: list = field(default_factory=list)     # (label, seconds one device, seconds plan)
    megatron: float | None = None                       # estimated seconds of Megatron-LM's plan
    launch_free: tuple = ()                             # (one device, plan) without per-call overhead
    megatron_note: str = ""
    notes: list = field(default_factory=list)
    search_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"world": self.world, "device": self.device, "link": self.link,
                "weight_bytes": self.weight_bytes, "rank_bytes": self.rank_bytes,
                "estimated_seconds": {"one_device": self.time_one, "plan": self.time_plan,
                                      "communication": self.comm, "megatron": self.megatron},
                "predictions": [{"scenario": lb, "one_device": a, "plan": b, "speedup": a / b}
                                for lb, a, b in self.predictions],
                "collectives": {k: {"count": n, "bytes": b} for k, (n, b) in self.collectives.items()},
                "weights": [{"name": ln.weight, "shape": list(ln.shape), "layout": ln.layout, "how": ln.how}
                            for ln in self.layers],
                "checked": self.checked}

    @property
    def speedup(self) -> float:
        return self.time_one / self.time_plan if self.time_plan else 0.0

    def __str__(self) -> str:
        lines = [f"tensor-parallel plan: {self.world} ranks, costed on {self.device} ({self.link})",
                 f"weights per rank: {self.rank_bytes / 1e6:.2f} MB of {self.weight_bytes / 1e6:.2f} MB "
                 f"({100 * self.rank_bytes / max(self.weight_bytes, 1):.1f}%)",
                 f"estimated time: {self.time_plan * 1e3:.3f} ms vs {self.time_one * 1e3:.3f} ms on one device "
                 f"({self.speedup:.2f}x; communication {self.comm * 1e3:.3f} ms)"]
        if self.megatron is not None:
            lines.append(f"Megatron-LM's plan (column/row split by layer name): {self.megatron * 1e3:.3f} ms; "
                         f"the plan found: {self.time_plan * 1e3:.3f} ms ({self.megatron / self.time_plan:.2f}x of it)")
        elif self.megatron_note:
            lines.append(f"Megatron-LM's plan: {self.megatron_note}")
        for label, one, par in self.predictions:
            lines.append(f"  {label}: {one * 1e3:.3f} ms -> {par * 1e3:.3f} ms ({one / par:.2f}x)")
        kinds = ", ".join(f"{n} {k} ({b / 1e6:.2f} MB)" for k, (n, b) in sorted(self.collectives.items()))
        lines.append(f"collectives per call: {kinds or 'none'}")
        for ln in self.layers:
            lines.append(f"  {ln.weight} {tuple(ln.shape)}: {ln.layout} ({ln.how})")
        for w, why in self.replicated:
            lines.append(f"  replicated: {w} ({why})")
        lines += [f"note: {n}" for n in self.notes]
        if self.checked:
            lines.append(self.checked)
        lines.append(f"search: {self.search_seconds:.2f} s")
        return "\n".join(lines)


def _how(plan: Plan, ph) -> str:
    for step in plan.steps:
        for w, _ in step.fixes:
            if w is ph:
                rule = step.outcome.rule
                name = RULE_WORDS.get(rule, rule or "checked on this model")
                return f"{name}, by {step.node.target.__name__ if hasattr(step.node.target, '__name__') else step.node.target}"
    return "unused"


def _report(plan: Plan, costs: Costs, device: str, link_name: str, one: float) -> ParallelReport:
    p = plan.problem
    rep = ParallelReport(p.world, device, link_name, time_one=one, time_plan=plan.cost, comm=plan.comm)
    for ph, (name, t) in p.weights.items():
        layout = plan.weights.get(ph)
        if layout is None:      # not read (a tied weight's second name)
            continue
        nbytes = t.numel() * t.element_size()
        rep.weight_bytes += nbytes
        rep.rank_bytes += nbytes / p.world if layout.split else nbytes
        rep.layers.append(LayerLine(name, tuple(t.shape), str(layout), _how(plan, ph)))
        if not layout.split and t.dim() >= 2:
            rep.replicated.append((name, _why_replicated(t, p.world)))
    for step in plan.steps:
        for src, frm, to in step.converts:
            kind, _ = costs.convert(src, frm, to)
            if kind in ("shard", "partial", "none"):
                continue
            kind = "all_gather" if kind == "regather" else kind   # (then a local slice)
            n, b = rep.collectives.get(kind, (0, 0.0))
            rep.collectives[kind] = (n + 1, b + costs.nbytes(src))
    for o, layout in plan.outputs:
        kind, _ = costs.convert(o, layout, R)
        if kind not in ("none", None):
            n, b = rep.collectives.get(kind, (0, 0.0))
            rep.collectives[kind] = (n + 1, b + costs.nbytes(o))
    return rep


def _why_replicated(t: torch.Tensor, world: int) -> str:
    if all(int(d) % world for d in t.shape):
        return f"no axis of {tuple(t.shape)} divides among {world} ranks"
    return ("cheaper replicated under this cost model, or no split of it carries through the calls "
            "that read it on this many ranks")


def _heads_notes(problem: Problem) -> list:
    """Attention whose heads do not divide among the ranks (it then runs replicated)."""
    from .search import SDPA
    out = []
    for n in problem.gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA:
            heads = int(n.args[0].meta["val"].shape[-3])
            if heads % problem.world:
                out.append(f"attention {n.name}: {heads} heads do not divide among {problem.world} ranks "
                           f"(it runs replicated)")
        elif n.op == "call_function" and n.target is torch.ops.aten.softmax.int:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.dim() == 4 and int(v.shape[-3]) % problem.world:
                out.append(f"attention {n.name}: {int(v.shape[-3])} heads do not divide among "
                           f"{problem.world} ranks (it runs replicated)")
    return out


def _device_and_link(device: str, world: int, group=None):
    from cost_models.devices import get_device, get_link
    dev = get_device("h100" if device == "pcie" else device)   # (pcie: H100 cards on PCIe 5)
    if device == "cpu":
        if group is not None or _initialised():
            from .comm import measure_link
            return dev, measure_link(group)
        from cost_models.devices import Link
        return dev, Link("gloo (assumed: 1 GB/s, 50 us)", 1e9, 50e-6, float("inf"))
    return dev, get_link(device)


def _initialised() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _budget(problem: Problem, memory_per_rank, share: float) -> float:
    if memory_per_rank is not None:
        return float(memory_per_rank)
    return sum(problem.weight_bytes.values()) * share


def make_plan(model, example_inputs, world_size: int, device: str = "cpu", group=None,
              memory_per_rank: float | None = None, share: float | None = None, beam: int = 64,
              shapes: dict | None = None, scenarios: dict | None = None) -> tuple:
    """(Plan, Costs, ParallelReport) for ``model`` over ``world_size`` ranks (no run)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise GraphoptError(f"parallelize: world_size must be a positive integer, got {world_size!r}")
    start = time.perf_counter()
    problem = Problem(model, example_inputs, world_size)
    dev, link = _device_and_link(device, world_size, group)
    costs = Costs(dev, link, world_size, shapes)
    # default budget: the weights split evenly, plus 5% of them (norms, biases and small
    # tables may stay replicated); ``share=1`` lets the cost model replicate anything
    budget = _budget(problem, memory_per_rank, (share if share is not None else
                                                 min(1.0, 1.0 / world_size + 0.05)))
    notes = []
    plan, budget = _search_relaxed(problem, costs, budget, memory_per_rank is None, beam, notes)
    # Megatron-LM's hand-written plan is a candidate too, under the same budget
    meg = None
    try:
        meg = search(problem, costs, budget, beam=beam, allow=megatron(problem))
    except GraphoptError as e:
        megatron_note = f"not applicable to this model ({e})"
    else:
        megatron_note = ""
        if meg.cost < plan.cost:
            plan = meg
            notes.append("the plan is Megatron-LM's (the search found none cheaper)")
    notes += _heads_notes(problem)
    single = search(_single(problem), Costs(dev, link, 1, shapes), float("inf"), beam=1)
    one = single.cost
    rep = _report(plan, costs, device, link.name, one)
    rep.launch_free = (single.launch_free(dev), plan.launch_free(dev))
    rep.notes = notes
    rep.megatron, rep.megatron_note = (meg.cost if meg is not None else None), megatron_note
    scenarios = default_scenarios(example_inputs) if scenarios is None else scenarios
    rep.predictions = predict(problem, model, scenarios, "h100" if device == "cpu" else device, world_size, budget)
    rep.search_seconds = time.perf_counter() - start
    return plan, costs, rep


def _search_relaxed(problem, costs, budget, relax: bool, beam: int, notes: list) -> tuple:
    """The plan within ``budget``; where no plan fits (a size that does not divide among the
    ranks, weights no rule splits), the budget is raised step by step, said in ``notes``."""
    total = sum(problem.weight_bytes.values()) or 1.0
    tries = [budget] + ([b * total for b in (0.6, 0.75, 0.9)] + [float("inf")] if relax else [])
    for k, limit in enumerate(tries):
        if k and limit <= budget:
            continue
        try:
            plan = search(problem, costs, limit, beam=beam)
        except GraphoptError:
            if k == len(tries) - 1:
                raise
            continue
        if k:
            notes.append(f"no plan holds {100 * budget / total:.0f}% of the weights per rank: some weights do not "
                         f"split among {problem.world} ranks (see 'replicated' above); the plan holds at most "
                         + (f"{100 * limit / total:.0f}%" if limit != float("inf") else "all of them"))
        return plan, limit
    raise AssertionError("unreachable")


def _single(problem: Problem) -> Problem:
    import copy
    one = copy.copy(problem)
    one.world = 1
    return one


def export_shapes(model, inputs) -> dict:
    """node name -> output shape of the model's torch.export graph at these inputs (traced
    with fake tensors: nothing is computed)."""
    ep = torch.export.export(model, tuple(inputs), strict=False)
    return {n.name: tuple(n.meta["val"].shape) for n in ep.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)}


def default_scenarios(example_inputs) -> dict:
    """For a model called on token ids (batch, T): prefill at T=1024 and one decode step
    (T=1, the KV cache not modelled), same batch."""
    if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor) or \
            example_inputs[0].dtype not in (torch.int64, torch.int32) or example_inputs[0].dim() != 2:
        return {}
    ids = example_inputs[0]
    return {"prefill T=1024": (torch.zeros(ids.shape[0], 1024, dtype=ids.dtype),),
            "decode (one token)": (torch.zeros(ids.shape[0], 1, dtype=ids.dtype),)}


def predict(problem: Problem, model, scenarios: dict, device: str, world: int, budget: float,
            beam: int = 16) -> list:
    """(label, estimated seconds on one device, estimated seconds of the best plan) per
    scenario: the plan searched again with the scenario's sizes (checks stay on the example)."""
    dev, link = _device_and_link(device, world)
    tensors = {n.name for n in problem.gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    out = []
    for label, inputs in scenarios.items():
        try:
            shapes = export_shapes(model, inputs)
        except Exception:  # noqa: BLE001  (a size the model does not take: no prediction)
            continue
        if len(set(shapes) & tensors) < 0.9 * len(tensors):
            continue    # another graph at these sizes (a size-1 axis takes other paths): not comparable
        try:
            par = search(problem, Costs(dev, link, world, shapes), budget, beam=beam).cost
        except GraphoptError:   # the narrower beam found nothing within the budget: no prediction
            continue
        one = search(_single(problem), Costs(dev, link, 1, shapes), float("inf"), beam=1).cost
        out.append((f"{label} on {world} {device.upper()}", one, par))
    return out


class ParallelPlan(torch.nn.Module):
    """This rank's part of a tensor-parallel model: call it like the model (positional
    tensors); every rank returns the whole outputs.  ``state_dict()`` holds this rank's
    shards only, under the model's own weight names."""

    def __init__(self, module: torch.fx.GraphModule, in_spec, out_spec, report: ParallelReport, group=None,
                 transient=frozenset(), shapes=()):
        super().__init__()
        self.rank_module = module
        self._shapes = list(shapes)
        self._transient = set(transient)
        self._in_spec, self._out_spec, self._group = in_spec, out_spec, group
        self.report = report

    def state_dict(self, *args, **kwargs):
        """This rank's shards under the model's weight names (``model.layers.0.q_proj.weight``)."""
        from .lower import VOCAB_START
        out = self.rank_module.state_dict(*args, **kwargs)
        for k in [k for k in out if k.rsplit(".", 1)[-1].startswith(VOCAB_START) or k in self._transient]:
            del out[k]
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this rank's shards (as :meth:`state_dict` gives them)."""
        return self.rank_module.load_state_dict(state_dict, strict=False, assign=assign) if not strict else \
            self._load_strict(state_dict, assign)

    def _load_strict(self, state_dict, assign):
        mine = self.state_dict()
        if set(state_dict) != set(mine):
            missing, extra = sorted(set(mine) - set(state_dict)), sorted(set(state_dict) - set(mine))
            raise GraphoptError(f"load_state_dict: not this plan's shards (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(mine[k].shape):
                raise GraphoptError(f"load_state_dict: {k} has shape {tuple(v.shape)}, this rank's shard "
                                    f"{tuple(mine[k].shape)}")
        return self.rank_module.load_state_dict(state_dict, strict=False, assign=assign)

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise GraphoptError("the parallel plan was made for calls with the example inputs' structure "
                                f"({self._in_spec.num_leaves} tensors)")
        got = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in flat]
        if self._shapes and got != self._shapes:
            raise GraphoptError(f"the parallel plan was made for inputs of shapes {self._shapes}, got {got}: "
                                "make a plan for these shapes (graphopt.parallelize with such example inputs)")
        with collectives.use_group(self._group):
            out = self.rank_module(*flat)
        return pytree.tree_unflatten(list(out), self._out_spec)


def _outputs_match(expected: list, got: list) -> str:
    from .search import _close
    for k, (a, b) in enumerate(zip(expected, got)):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or not _close(b, a):
                diff = (b.double() - a.double()).abs().max().item() if isinstance(b, torch.Tensor) and \
                    b.shape == a.shape else "shape"
                return f"output {k} differs (max difference {diff})"
    return ""


def parallelize(model, example_inputs, world_size: int | None = None, *, group=None, device: str = "cpu",
                memory_per_rank: float | None = None, beam: int = 64) -> ParallelPlan:
    """Shard ``model`` over the ranks of ``group`` (default: the whole world) by the cheapest
    plan found under the verified sharding rules; returns this rank's :class:`ParallelPlan`.

    Args:
        model: an ``nn.Module`` that torch.export can capture with ``example_inputs``.
        example_inputs: a tuple of tensors, the same on every rank.
        world_size: the number of ranks (default: the group's size; must equal it).
        group: the process group (default: the world).
        device: the device table entry the plan is costed on (``"cpu"``: the group's
            interconnect is measured; ``"h100"``, ``"h200"``, ``"a100"``).
        memory_per_rank: bytes of weights a rank may hold (default: an even split plus 5%
            of the model's weights).
        beam: states the search keeps per step.
    Raises:
        GraphoptError: torch.distributed is not initialised, the world size is not the group's,
            the model cannot be captured, no plan fits, or the plan's outputs differ from the
            model's on the example inputs (on every rank).
    """
    import torch.distributed as dist
    if not _initialised():
        raise GraphoptError("parallelize: torch.distributed is not initialised: call "
                            "torch.distributed.init_process_group() first (e.g. under torchrun), "
                            "or use graphopt.plan_parallel() for a plan without running it")
    size = dist.get_world_size(group)
    if world_size is None:
        world_size = size
    if world_size != size:
        raise GraphoptError(f"parallelize: world_size={world_size} but the process group has {size} ranks")
    rank = dist.get_rank(group)
    plan, costs, rep = make_plan(model, example_inputs, world_size, device, group, memory_per_rank, beam=beam)
    module = rank_module(plan, rank)
    expected = [plan.problem.values[o] if isinstance(o, torch.fx.Node) else o for o in plan.problem.outputs]
    flat_user = [plan.problem.values[ph] for ph in plan.problem.user_inputs]
    with collectives.use_group(group), torch.no_grad():
        got = list(module(*flat_user))
    why = _outputs_match(expected, got)
    bad = torch.tensor([1.0 if why else 0.0])
    dist.all_reduce(bad, group=group)
    if float(bad) > 0:
        raise GraphoptError(f"parallelize: the plan's outputs differ from the model's on the example inputs "
                            f"({why or 'on another rank'}); refusing the plan")
    rep.checked = f"checked at parallelize time: {len(expected)} outputs equal on all {world_size} ranks"
    ep = plan.problem.ep
    plan.problem.values.clear()     # the model's values (and whole weights) are not kept
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in flat_user]
    return ParallelPlan(module, ep.call_spec.in_spec, ep.call_spec.out_spec, rep, group,
                        transient=plan.problem.transient, shapes=shapes)


def plan_parallel(model, example_inputs, world_size: int, *, device: str = "h100",
                  memory_per_rank: float | None = None, beam: int = 64, check: bool = True,
                  shapes: dict | None = None) -> tuple:
    """The plan for ``world_size`` ranks without a process group: ``(report, modules)``,
    ``modules`` one GraphModule per rank; with ``check`` every rank's program is run in one
    process (:class:`~graphopt.parallel.lower.Simulation`) and compared with the model."""
    plan, costs, rep = make_plan(model, example_inputs, world_size, device, None, memory_per_rank,
                                 beam=beam, shapes=shapes)
    graph = rank_graph(plan)
    modules = [rank_module(plan, r, graph) for r in range(world_size)]
    if check:
        expected = [plan.problem.values[o] for o in plan.problem.outputs]
        flat_user = [plan.problem.values[ph] for ph in plan.problem.user_inputs]
        with torch.no_grad():
            outs = Simulation(modules).run(*flat_user)
        for r, got in enumerate(outs):
            why = _outputs_match(expected, got)
            if why:
                raise GraphoptError(f"plan_parallel: rank {r}'s program does not compute the model ({why})")
        rep.checked = f"checked in one process (every rank simulated): {len(expected)} outputs equal on all {world_size} ranks"
    return rep, modules


__all__ = ["parallelize", "plan_parallel", "ParallelPlan", "ParallelReport", "Layout", "local_shape"]
