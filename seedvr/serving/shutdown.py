"""SIGTERM: RunPod scales a worker down with SIGTERM, then kills it. Stop at once, cleanly.

runpod's own SIGTERM handler only stops taking jobs and then waits for the running one to finish, however
long it takes. In production (RUNPOD_WEBHOOK_GET_JOB set) the first job installs ours on the event loop: it
stops every running job exactly as RunPod's per-job stop does (its task is cancelled, so no answer is posted
and RunPod treats the job as stopped; its work stops at the next check or model block, its ffmpeg processes
end and its files are removed), waits for that up to STOP_GRACE_S, releases the model when the jobs have let
go of it (a group's ranks end), kills any child process left and exits 0. Locally (`--rp_serve_api`,
`python handler.py`) the server's own handling stays.
"""

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

from seedvr.serving.cancel import CancelToken

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # a cancelled job's work gets this long to stop and clean up
KILL_WAIT_S = 3.0  # for child processes to end after SIGKILL


class Shutdown:
    """The running jobs (their tokens, and an event their work sets when it has stopped) and the SIGTERM path."""

    def __init__(self, release: Callable[[], None]):
        self._release = release  # frees the warm model: a group's ranks end
        self._running: dict[CancelToken, tuple[threading.Event, asyncio.Task | None]] = {}
        self._lock = threading.Lock()
        self._watching = False

    @contextmanager
    def running(self, cancel: CancelToken) -> Iterator[threading.Event]:
        """Register a job for its duration; the work sets the event it is given when it has stopped."""
        stopped = threading.Event()
        with self._lock:
            self._running[cancel] = (stopped, asyncio.current_task())
        try:
            yield stopped
        finally:
            with self._lock:
                self._running.pop(cancel, None)

    def watch_sigterm(self) -> None:
        """In production, once, from the event loop: SIGTERM stops the running jobs and exits 0."""
        if self._watching or not os.environ.get("RUNPOD_WEBHOOK_GET_JOB"):
            return
        self._watching = True
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self) -> None:
        with self._lock:
            running = list(self._running.items())
        log.warning("SIGTERM: stopping %d running job(s) and exiting", len(running))
        for cancel, (_, task) in running:
            cancel.cancel("the worker is shutting down (SIGTERM)")
            if task is not None:
                task.cancel()  # as RunPod's own stop: the handler re-raises, runpod posts no answer
        stops = [stopped for _, (stopped, _task) in running]
        threading.Thread(target=self._exit_when_stopped, args=(stops,), name="shutdown", daemon=True).start()

    def _exit_when_stopped(self, stops: list[threading.Event]) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        for stopped in stops:
            stopped.wait(max(0.0, deadline - time.monotonic()))
        if all(stopped.is_set() for stopped in stops):  # else a job still holds the model: killing is all left
            try:
                self._release()
            except Exception:
                log.exception("releasing the model at shutdown failed")
        children = psutil.Process().children(recursive=True)
        for child in children:
            child.kill()
        psutil.wait_procs(children, timeout=KILL_WAIT_S)
        log.warning("SIGTERM: stopped, exiting")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
