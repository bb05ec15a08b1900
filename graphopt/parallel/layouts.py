"""How a tensor is laid out over the ranks of a process group.

``R``: every rank holds the whole tensor (replicated).  ``P``: every rank holds a tensor of
the full shape and the value is their sum (partial sums, what a row-split matmul leaves).
``S(axis)``: the tensor is cut into ``world`` equal parts along ``axis`` and rank r holds part
r.  A split may be *blocked* (GPT-2's fused ``c_attn`` output is q, k and v side by side):
each block is cut into ``world`` parts and a rank holds its part of every block, so that a
later split into the blocks works on every rank.  Axes are negative (counted from the last),
so a layout means the same for a tensor and its batched form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    kind: str            # "R", "P" or "S"
    axis: int = 0        # S: the split axis, negative
    blocks: tuple = ()   # S: full sizes of the blocks along the axis (() : one block)

    def __str__(self) -> str:
        if self.kind != "S":
            return self.kind
        return f"S({self.axis})" if not self.blocks else f"S({self.axis}, {len(self.blocks)} blocks)"

    @property
    def split(self) -> bool:
        return self.kind == "S"


R = Layout("R")
P = Layout("P")


def S(axis: int, blocks: tuple = ()) -> Layout:  # noqa: N802  (reads like the notation)
    if axis >= 0:
        raise ValueError("a split axis is negative (counted from the last axis)")
    return Layout("S", axis, tuple(blocks) if len(blocks) > 1 else ())


def divisible(shape, layout: Layout, world: int) -> bool:
    """Whether a tensor of this shape can take this layout."""
    if not layout.split:
        return True
    if -layout.axis > len(shape):
        return False
    size = int(shape[layout.axis])
    blocks = layout.blocks or (size,)
    return sum(blocks) == size and all(b % world == 0 and b > 0 for b in blocks)


def local_shape(shape, layout: Layout, world: int) -> tuple:
    shape = tuple(int(d) for d in shape)
    if not layout.split or -layout.axis > len(shape):
        return shape
    out = list(shape)
    out[layout.axis] //= world
    return tuple(out)


def part(full: torch.Tensor, layout: Layout, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of a whole tensor (for P: the whole tensor on rank 0, zeros
    elsewhere; :func:`random_parts` splits a value into random partial sums instead)."""
    if layout.kind == "R":
        return full
    if layout.kind == "P":
        return full if rank == 0 else torch.zeros_like(full)
    pieces = []
    start = 0
    for b in layout.blocks or (full.shape[layout.axis],):
        block = full.narrow(layout.axis, start, b)
        pieces.append(block.narrow(layout.axis, rank * (b // world), b // world))
        start += b
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, layout.axis).contiguous()


def random_parts(full: torch.Tensor, world: int, gen: torch.Generator) -> list:
    """``world`` random tensors that sum to ``full``: partial sums for checking that an op
    really is linear in an input (a nonlinear op then gives a different sum)."""
    parts = [torch.randn(full.shape, generator=gen, dtype=torch.float64).to(full.dtype) * full.abs().mean()
             for _ in range(world - 1)]
    last = full - sum(parts) if parts else full
    return parts + [last]


def combine(parts: list, layout: Layout) -> torch.Tensor:
    """The whole tensor from every rank's part (the inverse of :func:`part`)."""
    if layout.kind == "R":
        return parts[0]
    if layout.kind == "P":
        out = parts[0].clone()
        for p in parts[1:]:
            out = out + p
        return out
    world = len(parts)
    if not layout.blocks:
        return torch.cat(parts, layout.axis)
    blocks, start = [], 0
    for b in layout.blocks:
        n = b // world
        blocks.append(torch.cat([p.narrow(layout.axis, start, n) for p in parts], layout.axis))
        start += n
    return torch.cat(blocks, layout.axis)


def conversion(src: Layout, dst: Layout) -> str | None:
    """The collective that turns a value laid out as ``src`` into ``dst``: ``"none"``,
    ``"all_gather"``, ``"all_reduce"``, ``"shard"`` (a slice of a replicated value),
    ``"partial"``, ``"reduce_scatter"``, ``"regather"`` (an all-gather, then a slice), or
    None where there is none (replicated or split values are never turned into partial sums
    but by ``"partial"``; a blocked split is never reduce-scattered)."""
    if src == dst:
        return "none"
    if dst.kind == "R":
        return "all_gather" if src.split else "all_reduce"
    if src.kind == "R":
        return "shard" if dst.split else "partial"
    if src.kind == "P" and dst.split and not dst.blocks:
        return "reduce_scatter"
    if src.split and dst.split:
        return "regather"
    return None
