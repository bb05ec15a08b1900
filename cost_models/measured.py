"""The measured cost model: time each op instance once, remember it on disk.

Each distinct instance (op, input shapes, dtype, attributes) is run through the
op's torch lowering on random tensors, and the median time per call after a
warm-up is stored in an sqlite database keyed by device, op, shapes, dtype and
attributes.  Another MeasuredCost on the same file measures nothing it has seen.

Example:
    >>> m = MeasuredCost("cpu", cache_path=tmp_path / "t.sqlite")  # doctest: +SKIP
    >>> m.graph_cost(g), m.measured, m.cache_hits                    # doctest: +SKIP
    (0.00012, 2, 0)
"""
from __future__ import annotations

import json
import math
import sqlite3
import statistics
import time
from pathlib import Path

import torch

from graphopt.errors import GraphoptError

from .base import CostModel, attrs_key, lookup_op
from .devices import DEFAULT_CACHE_DIR, machine_key

MIN_SAMPLE_S = 2e-4   # each timed sample runs the op often enough to last this long
MAX_INNER = 1000      # ... but at most this many times

_SCHEMA = """CREATE TABLE IF NOT EXISTS timings (
    device TEXT, op TEXT, shapes TEXT, dtype TEXT, attrs TEXT, seconds REAL,
    PRIMARY KEY (device, op, shapes, dtype, attrs))"""


class MeasuredCost(CostModel):
    """Op costs timed on a torch device, cached in sqlite.

    Args:
        device: a torch device string ("cpu", "cuda", "cuda:1").
        cache_path: the sqlite file (default ``~/.cache/graphopt/measured.sqlite``).
        warmup: untimed runs before timing.
        repeats: timed samples; the cost is their median.

    Attributes:
        measured: op instances timed by this object.
        cache_hits: op instances found in the on-disk cache (lookups answered from
            this object's in-memory memo are not counted).
    """

    name = "measured"

    def __init__(self, device: str = "cpu", cache_path=None, warmup: int = 3, repeats: int = 10):
        super().__init__()
        self.torch_device = _torch_device(device)
        self.device = str(self.torch_device)
        self.device_key = _device_key(self.torch_device)
        self.warmup, self.repeats = max(0, int(warmup)), max(1, int(repeats))
        self.measured = 0
        self.cache_hits = 0
        path = Path(cache_path or DEFAULT_CACHE_DIR / "measured.sqlite").expanduser()
        self.cache_path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise GraphoptError(f"cannot open timing cache {str(path)!r}: {e}") from None

    def close(self) -> None:
        """Close the sqlite connection."""
        self._db.close()

    def _price(self, op, in_shapes, out_shapes, dtype, attrs) -> float:
        key = (self.device_key, op, json.dumps(in_shapes), dtype, attrs_key(attrs))
        row = self._db.execute("SELECT seconds FROM timings WHERE device=? AND op=? AND shapes=? "
                               "AND dtype=? AND attrs=?", key).fetchone()
        if row is not None:
            self.cache_hits += 1
            return row[0]
        seconds = self.time_op(op, in_shapes, dtype, attrs)
        self.measured += 1
        self._db.execute("INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?, ?, ?)", key + (seconds,))
        return seconds

    def time_op(self, op: str, in_shapes, dtype: str, attrs: dict) -> float:
        """Time one op instance now (no cache).

        Args:
            op: registry name.
            in_shapes: input shapes as tuples of ints (``()`` makes a 0-d tensor).
            dtype: dtype name.
            attrs: plain concrete attributes.
        Returns:
            median seconds per call.
        """
        opdef = lookup_op(op)
        dt = getattr(torch, dtype)
        with torch.inference_mode():
            tensors = [torch.rand(s, dtype=dt, device=self.torch_device) + 0.5 for s in in_shapes]

            def call():
                opdef.torch(tensors, attrs)

            try:
                for _ in range(self.warmup):
                    call()
                inner = self._calls_per_sample(call)
                samples = [self._sample(call, inner) for _ in range(self.repeats)]
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise GraphoptError(f"cannot time {op} on shapes {list(in_shapes)} {dtype}: {msg}") from None
        return max(statistics.median(samples), 1e-9)

    def _sample(self, call, inner: int) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(inner):
            call()
        self._sync()
        return (time.perf_counter() - start) / inner

    def _calls_per_sample(self, call) -> int:
        once = self._sample(call, 1)
        return max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_S / max(once, 1e-9))))

    def _sync(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


def _torch_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise GraphoptError(f"invalid torch device {device!r}: {str(e).splitlines()[0]}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GraphoptError(f"device {device!r} requested but CUDA is not available")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    raise GraphoptError(f"unsupported device {device!r} for measured costs (use 'cpu' or 'cuda[:N]')")


def _device_key(dev: torch.device) -> str:
    """What a timing depends on: the device, its model, thread count (CPU), torch version."""
    if dev.type == "cuda":
        return f"{dev}|{torch.cuda.get_device_name(dev)}|torch={torch.__version__}"
    return f"cpu|{machine_key()}"
