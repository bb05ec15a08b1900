"""A plan as one rank's program: an fx graph of the model's calls on this rank's parts, with
the collectives the plan needs (:mod:`graphopt.parallel.collectives`), and :class:`Simulation`,
which runs that program for every rank at once in one process.

The graph is the same on every rank; what differs is the module's state: each rank's
GraphModule holds its own shards of the weights under the weights' own names (so its
``state_dict()`` is this rank's shards), plus, for an embedding split by vocabulary, the
0-d buffer of the first row it holds.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from . import collectives
from ..frontends.fx import fetch_attr
from .layouts import P, R, S, Layout, combine, conversion, part
from .search import Plan, local_args, mutates


def _convert(g: fx.Graph, node: fx.Node, src: Layout, dst: Layout, world: int) -> fx.Node:
    """The calls that turn ``node`` from ``src`` into ``dst`` (:func:`~graphopt.parallel.layouts.conversion`)."""
    call = g.call_function
    kind = conversion(src, dst)
    if kind == "none":
        return node
    if kind == "all_gather":
        return call(collectives.all_gather, (node, src.axis, world, src.blocks))
    if kind == "all_reduce":
        return call(collectives.all_reduce, (node, world))
    if kind == "shard":
        return call(collectives.take_shard, (node, dst.axis, world, dst.blocks))
    if kind == "partial":
        return call(collectives.partial, (node, world))
    if kind == "reduce_scatter":
        return call(collectives.reduce_scatter, (node, dst.axis, world))
    if kind == "regather":
        whole = call(collectives.all_gather, (node, src.axis, world, src.blocks))
        return call(collectives.take_shard, (whole, dst.axis, world, dst.blocks))
    raise AssertionError(f"no conversion from {src} to {dst}")   # the search never plans one


VOCAB_START = "_graphopt_vocab_start"


def rank_graph(plan: Plan) -> fx.Graph:
    """One rank's program for ``plan`` (placeholders: the model's user inputs, flat)."""
    p = plan.problem
    world = p.world
    g = fx.Graph()
    env: dict = {}
    steps = {s.node: s for s in plan.steps}
    vocab = 0
    for n in p.gm.graph.nodes:
        if n.op == "placeholder":
            if n in p.weights and not n.users:   # (a tied weight: export keeps its unused name)
                continue
            env[n] = g.get_attr(p.weights[n][0]) if n in p.weights else g.placeholder(n.name)
            env[n].meta = dict(n.meta)
        elif n.op == "call_function":
            step = steps[n]
            for src, frm, to in step.converts:
                env[src] = _convert(g, env[src], frm, to, world)
            target = step.outcome.target or n.target
            if target is collectives.vocab_embedding:
                weight, ids = (env[a] for a in n.all_input_nodes)
                new = g.call_function(target, (weight, ids, g.get_attr(f"{VOCAB_START}_{vocab}")))
                vocab += 1
            else:
                args, kwargs = local_args(n, step.outcome.rewrite, world, lambda a: env[a])
                new = g.call_function(target, args, kwargs)
            new.name = n.name
            env[n] = new
        elif n.op == "output":
            whole = {o: _convert(g, env[o], layout, R, world) for o, layout in plan.outputs}
            g.output(fx.node.map_arg(n.args[0], lambda a: whole.get(a, env[a])))
    g.lint()
    return g


def rank_state(plan: Plan, rank: int) -> dict:
    """The tensors one rank's module holds: its shards of the weights (copies, so that the
    whole tensors can be freed), and the first vocabulary row of each split embedding."""
    p = plan.problem
    world = p.world
    out = {}
    for ph, (name, full) in p.weights.items():
        layout = plan.weights.get(ph)
        if layout is None:      # a weight no call reads
            continue
        shard = part(full.detach(), layout, rank, world).clone()
        out[name] = torch.nn.Parameter(shard, requires_grad=full.requires_grad) \
            if isinstance(full, torch.nn.Parameter) else shard
    vocab = 0
    for step in plan.steps:
        if step.outcome.target is collectives.vocab_embedding:
            table = p.weights[step.node.all_input_nodes[0]][1]
            out[f"{VOCAB_START}_{vocab}"] = torch.tensor(rank * (table.shape[0] // world), device=table.device)
            vocab += 1
    return out


def rank_module(plan: Plan, rank: int, graph: fx.Graph | None = None) -> fx.GraphModule:
    return fx.GraphModule(rank_state(plan, rank), graph if graph is not None else rank_graph(plan))


class Simulation:
    """Run one rank's program for every rank at once, in one process: each call per rank,
    each collective on all ranks' values (what torch.distributed would compute)."""

    def __init__(self, modules: list):
        self.modules = modules
        self.world = len(modules)

    def run(self, *inputs) -> list:
        """Every rank's outputs (a list per rank) for the same flat user inputs."""
        graph = self.modules[0].graph
        envs = [dict() for _ in self.modules]
        it = iter(inputs)
        for n in graph.nodes:
            if n.op == "placeholder":
                x = next(it)
                for env in envs:
                    env[n] = x
            elif n.op == "get_attr":
                for env, m in zip(envs, self.modules):
                    env[n] = fetch_attr(m, n.target)
            elif n.op == "call_function":
                fetch = (lambda a, env: env[a].clone() if isinstance(env[a], torch.Tensor) else env[a]) \
                    if mutates(n.target) else (lambda a, env: env[a])   # ranks share replicated values
                vals = [(fx.node.map_arg(n.args, lambda a, env=env: fetch(a, env)),
                         fx.node.map_arg(n.kwargs, lambda a, env=env: fetch(a, env))) for env in envs]
                outs = self._collective(n.target, vals) if n.target in _SIMULATED else \
                    [n.target(*a, **k) for a, k in vals]
                for env, o in zip(envs, outs):
                    env[n] = o
            elif n.op == "output":
                return [list(fx.node.map_arg(n.args[0], lambda a, env=env: env[a])) for env in envs]
        raise AssertionError("graph without output")

    def _collective(self, target, vals) -> list:
        w = self.world
        xs = [a[0] for a, _ in vals]
        args = vals[0][0]
        if target is collectives.all_reduce:
            return [combine(xs, P)] * w
        if target is collectives.all_gather:
            return [combine(xs, S(args[1], args[3] if len(args) > 3 else ()))] * w
        if target is collectives.reduce_scatter:
            whole = combine(xs, P)
            return [part(whole, S(args[1]), r, w) for r in range(w)]
        if target is collectives.take_shard:
            return [part(x, S(args[1], args[3] if len(args) > 3 else ()), r, w) for r, x in enumerate(xs)]
        if target is collectives.partial:
            return [x if r == 0 else torch.zeros_like(x) for r, x in enumerate(xs)]
        raise AssertionError(target)


_SIMULATED = {collectives.all_reduce, collectives.all_gather, collectives.reduce_scatter,
              collectives.take_shard, collectives.partial}

