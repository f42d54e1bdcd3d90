"""Graceful stops: SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) at a step boundary.

    with preemption.guard() as stop:
        for step in ...:
            ...one step...
            if stop.requested:
                save a checkpoint
                raise preemption.Preempted(f"... saved at step {step}")

While the guard is active the first signal only sets `stop.requested` (the loop finishes its step,
checkpoints, and raises `Preempted`); a second one stops at once as the default handler would.
The command line turns `Preempted` into one line on stderr and exit status `EXIT_PREEMPTED`; a
rerun of the same command resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("alchemist_jax.preemption")

# Exit status of a run stopped by a signal after saving its progress (EX_TEMPFAIL: try again).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, its progress saved; rerun to resume."""


class StopRequest:
    """Set by the first SIGTERM / SIGINT inside `guard`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def guard() -> Iterator[StopRequest]:
    """Installs the handlers for the duration of the block (main thread only; elsewhere signals
    keep their handlers and `requested` stays False). Guards nest: the innermost one sees the
    signal."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

    def handle(signum, frame):
        if stop.requested:  # a second signal: give up at once
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        stop.signal_name = signal.Signals(signum).name
        log.info(
            "%s received: stopping at the end of this step (send it again to stop now)",
            stop.signal_name,
        )

    for sig in SIGNALS:
        signal.signal(sig, handle)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
