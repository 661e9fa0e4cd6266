"""Stopping a job that RunPod cancelled: a token the work checks between frames, chunks and phases.

    token = CancelToken()
    token.check()            # in the job's thread: raises JobCancelled once cancelled
    token.cancel("stopped")  # from the event loop (runpod's stop, /cancel, a timeout, SIGTERM)

Cancelling also runs the callbacks registered with `on_cancel` (the model holder interrupts a sequence-parallel
job in flight with one), so a job blocked in a long step is stopped too, not only at its next check.
"""

import logging
import threading
from collections.abc import Callable

from seedvr.errors import CANCELLED, RestoreError

log = logging.getLogger(__name__)


class JobCancelled(RestoreError):
    """The job was stopped from outside; its answer is never sent (the job ends with CancelledError)."""

    def __init__(self, reason: str):
        super().__init__(CANCELLED, reason)


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason = ""
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled."""
        if self._event.is_set():
            raise JobCancelled(self._reason)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the job is cancelled (at once if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a failed interruption must not keep the rest from running
                log.exception("interrupting the job failed")
