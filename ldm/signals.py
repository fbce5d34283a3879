"""SIGINT and SIGTERM for the command line: the first stops the run cleanly, a second ends it at once.

The first signal raises `Interrupted` (a KeyboardInterrupt, so the code that keeps what was written
and writes the grid of it on Ctrl-C does the same on SIGTERM); the exit status is 128 + the signal
number (130, 143). A second signal while that clean-up runs restores the default action and re-sends
itself: the process ends now, killed by that signal (files are written under temporary names and
renamed, so no partial image is left under a final name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException | None) -> int:
    """128 + the signal number for an Interrupted; 130 (SIGINT's) for a plain KeyboardInterrupt."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


@contextlib.contextmanager
def interrupts():
    """Within this block, SIGINT and SIGTERM raise Interrupted once, then end the process."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; leave Python's defaults
        return
    received = []

    def handle(signum, frame):
        if received:  # a second signal: no more clean-up
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(s, handler)
