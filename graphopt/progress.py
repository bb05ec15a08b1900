"""Progress displays for long work, drawn by tqdm on stderr.

Shown only on a terminal (tqdm's ``disable=None``) and never with ``enabled=False``
(the CLI's ``--quiet``), so logs, pipes and the test suite get none of it.

* :class:`Progress` counts units of one stage (rule shards enumerated, rules verified).
* :class:`Stages` names the stage a long command is in (load, capture, import, search,
  verify, latency), with the time spent so far.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def _bar(enabled: bool, **kwargs):
    return tqdm(file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True, leave=False, **kwargs)


class Progress:
    """A counted stage: call it with ``(done, total=None)`` as the work advances."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.bar = _bar(enabled, desc=label, total=max(total, 1), unit="")

    def __call__(self, done: int, total: int | None = None):
        if total:
            self.bar.total = max(total, 1)
        self.bar.update(done - self.bar.n)
        if done >= self.bar.total:
            self.bar.close()


class Stages:
    """The named stages of one command: ``stages("search")`` moves to the next one.

    Example:
        >>> with Stages(["load", "optimize"], enabled=False) as stage:
        ...     stage("load"); stage("optimize")
    """

    def __init__(self, names, enabled: bool = True):
        self.names = list(names)
        self.bar = _bar(enabled, total=len(self.names), bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}")

    def __call__(self, name: str, detail: str = "") -> None:
        if name in self.names:
            self.bar.n = self.names.index(name)
        self.bar.set_description_str(f"graphopt: {name}" + (f" ({detail})" if detail else ""))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


__all__ = ["Progress", "Stages"]
