"""The device table: peak FLOP/s per dtype, memory bandwidth and per-op overhead.

GPU figures are vendor datasheet numbers (dense, no sparsity).  The ``"cpu"``
entry is a placeholder: :func:`get_device` replaces it by figures measured once
on this machine (matmul FLOP/s per dtype, copy bandwidth) and cached as JSON.

Example:
    >>> get_device("h100").peak_flops["bfloat16"]
    989000000000000.0
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from graphopt.errors import GraphoptError

TERA = 1e12

# Per-op fixed overheads (kernel launch / framework dispatch).  A view op moves no
# data and launches no kernel, so it only pays the (smaller) dispatch cost.
GPU_OVERHEAD = 3e-6
CPU_OVERHEAD = 5e-6
VIEW_OVERHEAD = 1e-6


@dataclass(frozen=True)
class Device:
    """Roofline parameters of one device.

    Attributes:
        name: table key ("a100", "cpu", ...).
        peak_flops: dtype name -> FLOP/s (dense).
        bandwidth: memory bandwidth in bytes/s.
        overhead: fixed seconds per (non-view) op: kernel launch or dispatch.
        view_overhead: fixed seconds per view op (transpose, reshape, split).
        calibrate: True for the placeholder entry that :func:`get_device` measures.
    """

    name: str
    peak_flops: dict = field(default_factory=dict)
    bandwidth: float = 0.0
    overhead: float = CPU_OVERHEAD
    view_overhead: float = VIEW_OVERHEAD
    calibrate: bool = False


# Datasheet sources (all dense, no 2:4 sparsity):
# * A100 SXM4 80GB -- NVIDIA A100 Tensor Core GPU datasheet (2021): FP64 9.7 TFLOPS,
#   FP32 19.5 TFLOPS, BF16/FP16 Tensor Core 312 TFLOPS, HBM2e 2,039 GB/s.
# * H100 SXM5 -- NVIDIA H100 Tensor Core GPU datasheet (2023): FP64 34 TFLOPS,
#   FP32 67 TFLOPS, BF16/FP16 Tensor Core 989 TFLOPS (1,979 is with sparsity),
#   HBM3 3.35 TB/s.
# * H200 SXM -- NVIDIA H200 Tensor Core GPU datasheet (2024): same compute as the
#   H100 SXM (FP64 34, FP32 67, BF16/FP16 989 TFLOPS dense), HBM3e 4.8 TB/s.
# float32 uses the CUDA-core figure, not TF32: torch's default float32 matmul
# precision ("highest") does not use TF32 tensor cores.
DEVICES: dict = {
    "a100": Device("a100", {"float64": 9.7 * TERA, "float32": 19.5 * TERA,
                            "float16": 312 * TERA, "bfloat16": 312 * TERA},
                   bandwidth=2.039e12, overhead=GPU_OVERHEAD),
    "h100": Device("h100", {"float64": 34 * TERA, "float32": 67 * TERA,
                            "float16": 989 * TERA, "bfloat16": 989 * TERA},
                   bandwidth=3.35e12, overhead=GPU_OVERHEAD),
    "h200": Device("h200", {"float64": 34 * TERA, "float32": 67 * TERA,
                            "float16": 989 * TERA, "bfloat16": 989 * TERA},
                   bandwidth=4.8e12, overhead=GPU_OVERHEAD),
    "cpu": Device("cpu", overhead=CPU_OVERHEAD, calibrate=True),
}

@dataclass(frozen=True)
class Link:
    """How the devices of one machine talk to each other (for tensor-parallel plans).

    Attributes:
        name: what it is ("nvlink4", "pcie5", "gloo").
        bandwidth: bytes/s one device sends (and receives) at once, per direction.
        latency: seconds per message step of a ring collective.
        memory: bytes of memory per device (the constraint on a plan's shards).
    """

    name: str
    bandwidth: float
    latency: float
    memory: float


GIGA = 1e9
# Interconnects.  Sources: NVIDIA H100 and H200 SXM datasheets: NVLink 900 GB/s per GPU
# (bidirectional, so 450 GB/s each way), 80 GB / 141 GB of HBM; A100 SXM4 datasheet: NVLink
# 600 GB/s; PCI Express 5.0 x16: 64 GB/s each way (the H100 PCIe card's host link).  The
# latency per ring step (5 us NVLink, 10 us PCIe) is an assumption, not a datasheet figure:
# NCCL's small-message all-reduce takes on the order of 10-30 us on 8 GPUs.
LINKS: dict = {
    "h100": Link("nvlink4", 450 * GIGA, 5e-6, 80 * GIGA),
    "h200": Link("nvlink4", 450 * GIGA, 5e-6, 141 * GIGA),
    "a100": Link("nvlink3", 300 * GIGA, 5e-6, 80 * GIGA),
    "pcie": Link("pcie5", 64 * GIGA, 10e-6, 80 * GIGA),
}


def get_link(name: str) -> Link:
    """The interconnect of ``name`` (a GPU of :data:`DEVICES` or ``"pcie"``); ``"cpu"`` has
    none in the table: :func:`graphopt.parallel.comm.measure_link` measures the process group."""
    if name not in LINKS:
        raise GraphoptError(f"no interconnect figures for {name!r} (known: {', '.join(sorted(LINKS))}; "
                            f"on the CPU the process group is measured)")
    return LINKS[name]


DEFAULT_CACHE_DIR = Path("~/.cache/graphopt")
CALIBRATION_FILE = "cpu_calibration.json"
# Matmul size used to calibrate each dtype: float16 matmul has no fast CPU kernel
# on many machines (a few GFLOP/s), so it is measured on a smaller problem.
CALIBRATION_SIZES = {"float32": 1024, "float64": 512, "bfloat16": 512, "float16": 256}
COPY_ELEMENTS = 8 * 1024 * 1024  # float32: a 32 MiB tensor, well beyond the caches


def get_device(name: str, cache_dir=None) -> Device:
    """The device table entry for ``name``, calibrating the CPU when needed.

    Args:
        name: a key of :data:`DEVICES`.
        cache_dir: where the CPU calibration is cached (default ``~/.cache/graphopt``).
    Returns:
        the :class:`Device`; for ``"cpu"`` with measured peak FLOP/s and bandwidth.
    Raises:
        GraphoptError: the name is not in the table.
    """
    if name not in DEVICES:
        raise GraphoptError(f"unknown device {name!r} (known: {', '.join(sorted(DEVICES))})")
    dev = DEVICES[name]
    if not dev.calibrate:
        return dev
    figures = calibrate_cpu(cache_dir)
    return replace(dev, peak_flops=figures["peak_flops"], bandwidth=figures["bandwidth"],
                   calibrate=False)


def machine_key() -> str:
    """Identifies the CPU configuration a calibration or timing is valid for."""
    return f"{_cpu_model()}|{platform.machine()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def calibrate_cpu(cache_dir=None) -> dict:
    """Measured CPU figures, read from the JSON cache or measured once and stored.

    Args:
        cache_dir: cache directory (default ``~/.cache/graphopt``).
    Returns:
        ``{"peak_flops": {dtype: FLOP/s}, "bandwidth": bytes/s}``.
    """
    path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / CALIBRATION_FILE
    key = machine_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if key in cache:
        return cache[key]
    figures = measure_cpu()
    cache[key] = figures
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return figures


def measure_cpu(sizes=None, copy_elements: int | None = None, repeats: int = 5) -> dict:
    """Measure matmul FLOP/s per dtype and copy bandwidth.

    Each figure comes from the fastest of ``repeats`` timed runs, not their median:
    these are *peak* figures, cached for good, and on a machine shared with other
    jobs the median reflects the load at calibration time rather than the hardware.

    Args:
        sizes: dtype name -> square matmul size (default :data:`CALIBRATION_SIZES`).
        copy_elements: float32 elements of the tensor cloned to measure bandwidth
            (default :data:`COPY_ELEMENTS`).
        repeats: timed runs per measurement, after one warm-up run.
    Returns:
        ``{"peak_flops": {dtype: FLOP/s}, "bandwidth": bytes/s}``.
    """
    peak = {}
    with torch.inference_mode():
        for dtype, n in (sizes or CALIBRATION_SIZES).items():
            a = torch.rand(n, n, dtype=getattr(torch, dtype))
            b = torch.rand(n, n, dtype=getattr(torch, dtype))
            peak[dtype] = 2.0 * n ** 3 / _best_time(lambda: a @ b, repeats)
        x = torch.rand(copy_elements or COPY_ELEMENTS)
        bandwidth = 2.0 * x.numel() * x.element_size() / _best_time(x.clone, repeats)
    return {"peak_flops": peak, "bandwidth": bandwidth}


def _best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-9)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"
