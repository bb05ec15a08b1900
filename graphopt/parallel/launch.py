"""Run a tensor-parallel plan on this machine: N CPU processes on a gloo process group.

What ``graphopt optimize MODEL --tp N`` runs, and what tests and ``benchmarks/bench_parallel.py``
use to spawn their ranks: each process builds the model with ``build()`` (the same seed on
every rank gives the same weights), joins a gloo group (rendezvous through a file in a
temporary folder), calls :func:`graphopt.parallelize`, checks the plan's outputs against the
model's on the example inputs and on fresh ones, times both, and sends back what it found.
The threads of the machine are shared out (``threads // N`` per process), so that N
processes use what one process would.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import traceback

import torch

from ..errors import GraphoptError


def _timed(fn, inputs, runs: int) -> float:
    with torch.no_grad():
        fn(*inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _state_bytes(state: dict) -> int:
    """Bytes of a state_dict, each storage once (tied weights share one)."""
    seen = {}
    for t in state.values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
    return sum(seen.values())


def max_diff(a, b) -> float:
    """The largest difference between two outputs (tensors, or structures of them)."""
    import torch.utils._pytree as pytree
    xs, ys = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(xs, ys)
                if isinstance(x, torch.Tensor) and x.numel()), default=0.0)


# the ops counted in a profiled call of a rank's program (torch.profiler: what really ran)
# (the functional collectives' own ops: the process group's calls under them are not counted again)
COUNTED = {"all_reduce": ("_c10d_functional::all_reduce",),
           "all_gather": ("_c10d_functional::all_gather_into_tensor",),
           "reduce_scatter": ("_c10d_functional::reduce_scatter_tensor",),
           "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
           "sdpa": ("aten::scaled_dot_product_attention",), "softmax": ("aten::_softmax",)}


def profile_counts(fn, inputs) -> dict:
    """Counts of collectives, matmuls and attention kernels in one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*inputs)
    counts = {k: 0 for k in COUNTED}
    for ev in prof.events():
        if ev.cpu_parent is not None and any(w in ev.cpu_parent.name for w in ("scaled_dot_product", "all_")):
            continue    # a kernel inside SDPA or a collective belongs to it
        for k, words in COUNTED.items():
            if any(ev.name == w or (w.startswith("_c10d") and ev.name.startswith(w)) for w in words):
                counts[k] += 1
                break
    return counts


def _worker(rank: int, world: int, build, path: str, queue, threads: int, runs: int, options: dict,
            profile: bool = False, compile_backend: str | None = None):
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        from .plan import parallelize
        model, inputs = build()
        with torch.no_grad():
            expected = model(*inputs)
        whole = _state_bytes(model.state_dict())
        plan = parallelize(model, inputs, world, **options)
        dist.barrier()
        rank_bytes = _state_bytes(plan.state_dict())
        with torch.no_grad():
            got = plan(*inputs)
            fresh = tuple(torch.randint_like(x, 0, int(x.max()) + 1) if not x.is_floating_point()
                          else torch.randn_like(x) for x in inputs)
            diff_fresh = max_diff(plan(*fresh), model(*fresh))
        diff = max_diff(got, expected)
        diff_compiled = None
        if compile_backend:     # the rank's graph through Dynamo (functional collectives traced)
            from . import collectives
            with collectives.use_group(None), torch.no_grad():
                compiled = torch.compile(plan.rank_module, backend=compile_backend, fullgraph=True)
                diff_compiled = max_diff(list(compiled(*inputs)), [expected])
        del model
        t_plan = _timed(plan, inputs, runs) if runs else 0.0
        counts = profile_counts(plan, inputs) if profile else {}
        queue.put({"rank": rank, "diff": diff, "diff_fresh": diff_fresh, "rank_bytes": rank_bytes,
                   "whole_bytes": whole, "seconds": t_plan, "report": str(plan.report),
                   "names": sorted(plan.state_dict()), "counts": counts, "diff_compiled": diff_compiled})
    except GraphoptError as e:
        queue.put({"rank": rank, "error": str(e)})
    except Exception as e:  # noqa: BLE001  (a bug: sent back whole)
        queue.put({"rank": rank, "error": f"internal error ({type(e).__name__}: {e})",
                   "traceback": traceback.format_exc()})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(build, world: int, runs: int = 0, threads: int | None = None, timeout: float = 600,
              profile: bool = False, compile_backend: str | None = None, **options) -> list:
    """Run ``parallelize`` on ``world`` local processes; one result dict per rank (rank order).

    Args:
        build: a picklable function returning ``(model, example_inputs)`` (called on every rank).
        world: processes.
        runs: timed calls of the plan per rank (0: none).
        profile: count what one call of the plan ran (:func:`profile_counts`).
        compile_backend: also run each rank's graph through ``torch.compile(backend=...,
            fullgraph=True)`` and compare (``diff_compiled``).
        threads: torch threads per process (default: this process's threads // world, at least 1).
        options: passed to :func:`graphopt.parallelize` (``device``, ``memory_per_rank``...).
    Raises:
        GraphoptError: a rank failed (its message), or the ranks did not finish in ``timeout``.
    """
    import torch.multiprocessing as mp
    if world < 1:
        raise GraphoptError(f"--tp must be >= 1, got {world}")
    threads = threads or max(1, torch.get_num_threads() // world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="graphopt-tp-") as tmp:
        path = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, build, path, queue, threads, runs, options, profile,
                                                          compile_backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = []
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GraphoptError(f"the {world} ranks did not finish within {timeout:.0f} s")
                try:
                    results.append(queue.get(timeout=min(left, 5.0)))
                except Exception:  # noqa: BLE001  (queue.Empty: check the processes are alive)
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead and len(results) < world:
                        raise GraphoptError(f"rank process exited with code {dead[0].exitcode}") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    results.sort(key=lambda r: r["rank"])
    for r in results:
        if "error" in r:
            raise GraphoptError(f"rank {r['rank']}: {r['error']}")
    return results
