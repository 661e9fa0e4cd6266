"""A coordinator's segment jobs on its endpoint: started, watched, retried, taken back, cancelled.

One thread submits a job per remote segment and polls their status every POLL_S. A segment is tried again when its
job failed, was cancelled or timed out by the endpoint, vanished (/status 404), stayed unreachable for LOST_AFTER_S,
or finished without its frames in the bucket; after MAX_ATTEMPTS tries the segment has failed, and so does the job,
naming the segment and the last reason. `take_back` lets the coordinator restore a segment whose job is still queued
(the endpoint has no free worker for it) instead of idling. `stop` cancels every job still queued or running.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from seedvr.engine.segments import Segment
from seedvr.errors import WORKER_FAULT, RestoreError
from seedvr.io.segment_store import SegmentStore
from seedvr.serving.cancel import CancelToken
from seedvr.serving.fanout.endpoint import Endpoint, EndpointError, JobStatus

log = logging.getLogger(__name__)

POLL_S = 1.0  # between two rounds of /status
HURRIED_POLL_S = 0.25  # while the coordinator has nothing left to do but wait for a segment
LOST_AFTER_S = 120.0  # a job whose /status fails this long is given up and tried again
MAX_ATTEMPTS = 3  # a failed or lost segment job is retried twice
WAIT_S = 0.5  # how often a waiting coordinator looks at its CancelToken


@dataclass
class SegmentState:
    """Where a segment stands. state: pending (to submit), queued / running (a job on the endpoint), local (the
    coordinator restores it), done (its frames are in the bucket or, for local, on disk), reused (found in the
    bucket), failed (for good)."""

    segment: Segment
    key: str
    state: str = "pending"
    job_id: str | None = None
    attempts: int = 0
    started: float | None = None
    seconds: float | None = None
    frames_done: int = 0
    error: str | None = None
    unreachable_since: float | None = None

    def describe(self) -> dict:
        return {**self.segment.describe(), "state": self.state, "job_id": self.job_id, "attempts": self.attempts,
                "seconds": None if self.seconds is None else round(self.seconds, 3)}


class SegmentJobs:
    """The remote segments' jobs. `make_input(segment)` is a segment job's input; `on_change(state)` is called (from
    the watching thread) whenever a segment's state or progress changes."""

    def __init__(self, endpoint: Endpoint, store: SegmentStore, states: list[SegmentState],
                 make_input: Callable[[Segment], dict], on_change: Callable[[SegmentState], None],
                 poll_s: float = POLL_S) -> None:
        self.endpoint, self.store, self.states = endpoint, store, states
        self.make_input, self.on_change, self.poll_s = make_input, on_change, poll_s
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # the coordinator waits for a segment: poll more often
        self._wake = threading.Event()  # ends the watcher's pause between two rounds
        self._thread = threading.Thread(target=self._watch, name="segment-jobs", daemon=True)
        self.failure: RestoreError | None = None

    def start(self) -> "SegmentJobs":
        self._thread.start()
        return self

    def wait(self, state: SegmentState, cancel: CancelToken) -> None:
        """Until the segment's frames are in the bucket; RestoreError when it failed for good, JobCancelled. The
        jobs are asked more often while the coordinator waits (every HURRIED_POLL_S)."""
        if not self._hurry.is_set():
            self._hurry.set()
            self._wake.set()  # ask now, not at the end of a slow round's pause
        with self._lock:
            while state.state not in ("done", "reused"):
                cancel.check()
                self.check()
                self._lock.wait(WAIT_S)

    def check(self) -> None:
        """Raise the failure of a segment that failed for good."""
        if self.failure is not None:
            raise self.failure

    def take_back(self) -> SegmentState | None:
        """A segment whose job is still queued (asked again now), cancelled on the endpoint and marked local: the
        coordinator restores it itself. None when every remote segment has started or finished."""
        for candidate in [state for state in self.states if state.state == "queued"]:
            try:
                still_queued = candidate.job_id is not None and self.endpoint.status(candidate.job_id).state == "IN_QUEUE"
            except EndpointError:
                still_queued = False
            with self._lock:
                if not still_queued or candidate.state != "queued":
                    continue
                candidate.state, job_id = "local", candidate.job_id
            log.info("segment %d is still queued as job %s: the coordinator takes it back", candidate.segment.index,
                     job_id)
            self._cancel(job_id)
            self.on_change(candidate)
            return candidate
        return None

    def stop(self) -> None:
        """Stop watching; cancel every job still queued or running (nothing is left running for a job that ended)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        for state in self.states:
            if state.state in ("queued", "running"):
                self._cancel(state.job_id)
                state.state = "cancelled"

    def _cancel(self, job_id: str | None) -> None:
        if job_id is None:
            return
        try:
            self.endpoint.cancel(job_id)
        except EndpointError as error:
            log.warning("cancelling segment job %s failed: %s", job_id, error)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            for state in self.states:
                if self._stopping.is_set():
                    break
                if state.state == "pending":
                    self._submit(state)
                elif state.state in ("queued", "running"):
                    self._poll(state)
            self._wake.wait(min(self.poll_s, HURRIED_POLL_S) if self._hurry.is_set() else self.poll_s)
            self._wake.clear()

    def _submit(self, state: SegmentState) -> None:
        state.attempts += 1
        try:
            job_id = self.endpoint.run(self.make_input(state.segment))
        except EndpointError as error:
            self._failed(state, f"the endpoint refused the job: {error}")
            return
        log.info("segment %d (frames %d-%d) is job %s, attempt %d", state.segment.index, state.segment.start,
                 state.segment.stop, job_id, state.attempts)
        with self._lock:
            state.state, state.job_id, state.started, state.unreachable_since = "queued", job_id, time.monotonic(), None
            state.frames_done = 0
        self.on_change(state)

    def _poll(self, state: SegmentState) -> None:
        assert state.job_id is not None, "a queued or running segment has a job"
        try:
            status = self.endpoint.status(state.job_id)
        except EndpointError as error:
            if error.status_code == 404:
                self._failed(state, f"job {state.job_id} vanished from the endpoint (/status 404)")
                return
            now = time.monotonic()
            state.unreachable_since = state.unreachable_since or now
            if now - state.unreachable_since >= LOST_AFTER_S:
                self._cancel(state.job_id)
                self._failed(state, f"job {state.job_id} was unreachable for {LOST_AFTER_S:.0f} s: {error}")
            return
        state.unreachable_since = None
        if status.state == "COMPLETED":
            self._completed(state, status)
        elif status.finished:
            self._failed(state, f"job {state.job_id} ended {status.state}: {status.error or 'no error given'}")
        else:
            self._running(state, status)

    def _running(self, state: SegmentState, status: JobStatus) -> None:
        frames = status.output.get("frames_done") if isinstance(status.output, dict) else None
        with self._lock:
            if state.state not in ("queued", "running"):
                return  # taken back meanwhile
            changed = state.state != ("running" if status.state == "IN_PROGRESS" else "queued")
            state.state = "running" if status.state == "IN_PROGRESS" else "queued"
            if isinstance(frames, int) and frames != state.frames_done:
                state.frames_done, changed = min(frames, state.segment.frames), True
        if changed:
            self.on_change(state)

    def _completed(self, state: SegmentState, status: JobStatus) -> None:
        answer = status.output[-1] if isinstance(status.output, list) and status.output else status.output
        reported = answer.get("segment", {}).get("key") if isinstance(answer, dict) else None
        if reported is not None and reported != state.key:
            self._failed(state, f"job {state.job_id} stored its frames as {reported}, not {state.key}: the workers "
                                "disagree on the recipe (different versions or GPUs?)")
            return
        if not self.store.fresh(state.key):
            self._failed(state, f"job {state.job_id} finished, but its frames are not in the bucket")
            return
        with self._lock:
            if state.state not in ("queued", "running"):
                return
            state.state, state.frames_done = "done", state.segment.frames
            state.seconds = time.monotonic() - (state.started or time.monotonic())
            self._lock.notify_all()
        self.on_change(state)

    def _failed(self, state: SegmentState, reason: str) -> None:
        log.warning("segment %d (frames %d-%d), attempt %d: %s", state.segment.index, state.segment.start,
                    state.segment.stop, state.attempts, reason)
        with self._lock:
            if state.state == "local":
                return
            state.error, state.frames_done = reason, 0
            if state.attempts < MAX_ATTEMPTS:
                state.state = "pending"
            else:
                state.state = "failed"
                self.failure = RestoreError(WORKER_FAULT, f"segment {state.segment.index} (frames {state.segment.start}-"
                                                          f"{state.segment.stop}) failed {state.attempts} times; the "
                                                          f"last: {reason}")
            self._lock.notify_all()
        self.on_change(state)
