"""How a run stops early: a loss that is not finite, or a request to stop (Ctrl-C, SIGTERM).

Both end in ``TrainingHalted``, whose message (one line) says at which step and where
the last good checkpoint is; the CLI prints it and exits with ``exit_code``. A stop
request is only acted on between optimizer steps, so the checkpoint written for it holds
a whole step, never half of one.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_FAULT = 1
EXIT_INTERRUPTED = 130


class TrainingHalted(RuntimeError):
    """Training stopped before its last step; the message says where it can be resumed from."""

    def __init__(self, message: str, exit_code: int = EXIT_FAULT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _resume_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was saved (pass --save-every N to keep some)"
    return f"the last good checkpoint is {checkpoint}; continue with --resume {checkpoint}"


def check_loss(loss: float, step: int, checkpoint: Path | None) -> None:
    """Raise ``TrainingHalted`` if ``loss`` is NaN or infinite (before it reaches the weights)."""
    if not math.isfinite(loss):
        raise TrainingHalted(
            f"loss is {loss} at step {step}; training stopped before updating the weights, "
            f"{_resume_hint(checkpoint)} (a lower --lr usually helps)"
        )


def interrupted(step: int, checkpoint: Path | None) -> TrainingHalted:
    return TrainingHalted(f"interrupted after step {step}; {_resume_hint(checkpoint)}", EXIT_INTERRUPTED)


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM inside the block; a second SIGINT interrupts at once.

    Outside the main thread (where signals cannot be caught) the event is never set.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame) -> None:
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
