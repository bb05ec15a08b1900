"""Progress reporting for long stages (to stderr; a bar on a terminal, lines otherwise)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, enabled: bool = True):
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last_pct = -1

    def __call__(self, done: int, total: int | None = None):
        if not self.enabled:
            return
        if total:
            self.total = max(total, 1)
        pct = int(100 * done / self.total)
        elapsed = time.monotonic() - self.start
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            self.stream.write(f"\r{self.label:<10} [{bar}] {done}/{self.total} {elapsed:6.1f}s")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif pct // 10 != self.last_pct // 10 or done >= self.total:
            self.stream.write(f"{self.label}: {done}/{self.total} ({pct}%) {elapsed:.1f}s\n")
            self.stream.flush()
        self.last_pct = pct
