"""Stopping cleanly on Ctrl-C, SIGTERM or SIGUSR2: finish the step, save, then exit (or requeue).

SIGUSR2 is how submitit (the SLURM launcher) announces preemption or the time limit; its own
handler requeues the job and exits at once, wherever the step is. Ours waits for the step to end
and the checkpoint to be written, then hands the signal on (`call_previous_handler`), so the requeued job
continues from this step, not from the last epoch.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator


class StopRequest:
    """Set by one of the signals; the training loop checks it after each step."""

    HANDED_ON = tuple(getattr(signal, name) for name in ("SIGUSR2",) if hasattr(signal, name))  # not on Windows

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def call_previous_handler(self) -> None:
        """After the checkpoint: call the handler that was there before ours (submitit's requeue)."""
        handler = self.previous.get(self.signum)
        if self.signum in self.HANDED_ON and callable(handler):
            handler(self.signum, None)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, the signals set the request instead of stopping the process; the
    handlers that were there before are put back after it."""
    request = StopRequest()
    request.previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM, *request.HANDED_ON)}
    try:
        yield request
    finally:
        for sig, handler in request.previous.items():
            signal.signal(sig, handler)
