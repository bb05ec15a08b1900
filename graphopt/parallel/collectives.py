"""What one rank runs for the parallel ops: torch.distributed's functional collectives.

The functions here are the call targets of a rank's graph (:mod:`graphopt.parallel.lower`).
They use torch.distributed's *functional* collectives (``torch.distributed.
_functional_collectives``), which return new tensors instead of writing in place, so that
Dynamo and inductor can trace a rank's graph.  The process group is the one
:func:`use_group` set (the plan sets it before each call; default: the whole world).
:class:`graphopt.parallel.lower.Simulation` runs the same graphs for every rank in one process
by intercepting exactly these functions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

_GROUP = None


@contextlib.contextmanager
def use_group(group):
    """Run the collectives of a rank's graph on ``group`` (None: the default group)."""
    global _GROUP
    saved, _GROUP = _GROUP, group
    try:
        yield
    finally:
        _GROUP = saved


def group():
    return _GROUP if _GROUP is not None else dist.group.WORLD


def rank() -> int:
    return dist.get_rank(group())


def take_shard(x: torch.Tensor, axis: int, world: int, blocks: tuple = ()) -> torch.Tensor:
    """This rank's part of a replicated tensor (a slice: no communication)."""
    from .layouts import S, part
    return part(x, S(axis, blocks), rank(), world)


def all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over the ranks of ``x``, on every rank."""
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group()))


def all_gather(x: torch.Tensor, axis: int, world: int, blocks: tuple = ()) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``axis`` in rank order, on every rank (for a
    blocked split, each block's parts put together: :func:`graphopt.parallel.layouts.combine`)."""
    whole = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), axis % x.dim(), group()))
    if not blocks:
        return whole
    from .layouts import S, combine
    return combine(list(whole.chunk(world, axis)), S(axis, blocks))


def reduce_scatter(x: torch.Tensor, axis: int, world: int) -> torch.Tensor:
    """This rank's part (along ``axis``) of the sum over the ranks of ``x``."""
    return funcol.wait_tensor(funcol.reduce_scatter_single(x.contiguous(), "sum", axis % x.dim(), group()))


def partial(x: torch.Tensor, world: int) -> torch.Tensor:
    """``x`` on rank 0, zeros elsewhere: a replicated value as a partial sum."""
    return x if rank() == 0 else torch.zeros_like(x)


def vocab_embedding(weight: torch.Tensor, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Rows of this rank's slice of an embedding table split by vocabulary (rows
    ``start .. start + len(weight)``); ids outside the slice give zero rows, so the sum over
    the ranks (an all-reduce) is the full lookup.  ``start`` is a 0-d buffer of the rank's
    module (the rank's graph is the same on every rank)."""
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    rows = torch.nn.functional.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
    return rows * inside.unsqueeze(-1).to(rows.dtype)

