"""What communication costs: ring collectives priced on an interconnect (:data:`cost_models.
devices.LINKS`), and the interconnect of a live process group measured (gloo on the CPU)."""
from __future__ import annotations

import time

import torch

from cost_models.devices import Link


def collective_time(kind: str, nbytes: float, world: int, link: Link) -> float:
    """Seconds for a ring collective over ``world`` ranks moving a tensor of ``nbytes``
    (the whole tensor: an all-reduce's input, an all-gather's output).

    Ring algorithms (as NCCL and gloo run them): an all-gather or a reduce-scatter sends
    ``(world-1)/world`` of the tensor in ``world-1`` steps; an all-reduce is both."""
    if world == 1 or kind in ("shard", "partial", "none"):
        return 0.0
    steps = world - 1
    one = steps / world * nbytes / link.bandwidth + steps * link.latency
    return 2 * one if kind == "all_reduce" else one


def measure_link(group=None, sizes=(1 << 12, 1 << 25), repeats: int = 5) -> Link:
    """The interconnect of a live process group: all-reduces of two sizes timed (the best of
    ``repeats``), a latency and a bandwidth fitted to the ring formula."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    times = []
    for n in sizes:
        x = torch.ones(n // 4, dtype=torch.float32)
        dist.all_reduce(x, group=group)
        best = float("inf")
        for _ in range(repeats):
            dist.barrier(group=group)
            start = time.perf_counter()
            dist.all_reduce(x, group=group)
            best = min(best, time.perf_counter() - start)
        t = torch.tensor([best], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(float(t))
    steps = 2 * max(world - 1, 1)
    frac = 2 * max(world - 1, 1) / world
    (s0, s1), (t0, t1) = sizes, times
    # the small message gives the latency, the large one the bandwidth (what is left of its
    # time once the latency is paid); a noisy pair falls back to the large message's own rate
    latency = max(t0 / steps, 1e-7)
    rest = t1 - steps * latency
    bandwidth = frac * s1 / (rest if rest > 0.2 * t1 else t1)
    return Link(f"{dist.get_backend(group)}, measured: {bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.0f} us per step",
                bandwidth, latency, float("inf"))
