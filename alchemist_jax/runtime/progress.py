"""Progress of long passes: a tqdm bar on a terminal, a periodic one-line rate in a log file.

A job on a cluster writes stderr to a file; tqdm's carriage-return frames would fill it (a 20-s
pass wrote ~100 kB). `bar` returns tqdm when stderr is a terminal, otherwise a `LogProgress`
with the same small interface (iteration, `update`, `set_postfix`, `close`, context manager)
that logs `desc: n/total unit (rate/s, postfix)` at most every `ALCHEMIST_PROGRESS_SECONDS`
(default 30) seconds and once at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("alchemist_jax.progress")


def _interval() -> float:
    return float(os.environ.get("ALCHEMIST_PROGRESS_SECONDS", "30"))


class LogProgress:
    """tqdm's interface, reporting by log lines (see the module docstring)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        initial: int = 0,
        **_: Any,
    ):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.n, self.start_n = total, initial, initial
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        self.n += count
        if time.monotonic() - self.last >= _interval():
            self._report()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._report()

    def _report(self) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.started, 1e-9)
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = (self.n - self.start_n) / elapsed
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s %s (%.3g %s/s%s)", self.desc, done, self.unit, rate, self.unit, extra)


def bar(iterable: Iterable | None = None, **kwargs: Any):
    """A progress reporter over `iterable` (or updated by hand): tqdm on a terminal, else
    `LogProgress`. Takes tqdm's keyword arguments (desc, total, unit, initial, leave, ...)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)
    return LogProgress(iterable, **kwargs)
