"""Progress of a job: {phase, frames_done, frames_total, percent, eta_s}, and `warnings` when it has any.

On RunPod the updates go through `runpod.serverless.progress_update` (which
posts to the URL in RUNPOD_WEBHOOK_POST_OUTPUT); the command line gives its own
sink (a progress bar). Updates within a phase are throttled; a new phase is
always reported. The job's early warnings (seedvr.serving.early_warnings) ride on
every update from the first: `/status` shows only the latest one, and a client
that sees them can cancel the job before the work is spent.
"""

import logging
import os
import time
from collections.abc import Callable, Sequence

import runpod

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 1.0  # between two updates of the same phase
ProgressSink = Callable[[dict], None]


def runpod_sink(job: dict) -> ProgressSink | None:
    """Send updates to RunPod when running there (or under a test harness that sets the webhook)."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") or "id" not in job:
        return None
    return lambda update: runpod.serverless.progress_update(job, update)


class Progress:
    def __init__(self, frames_total: int, sink: ProgressSink | None, warnings: Sequence[str] = ()):
        self.frames_total = max(frames_total, 1)
        self.warnings = list(warnings)
        self.frames_done = 0
        self.sink = sink
        self.phase_name: str | None = None
        self.started = time.monotonic()
        self.last_sent = float("-inf")

    def phase(self, name: str) -> None:
        self.phase_name = name
        self._send(force=True)

    def advance(self, frames: int) -> None:
        self.frames_done = min(self.frames_done + frames, self.frames_total)
        self._send(force=self.frames_done == self.frames_total)

    def update(self) -> dict:
        elapsed = time.monotonic() - self.started
        done = self.frames_done
        eta = round(elapsed / done * (self.frames_total - done), 1) if done else None
        update: dict = {"phase": self.phase_name, "frames_done": done, "frames_total": self.frames_total,
                        "percent": round(100.0 * done / self.frames_total, 1), "eta_s": eta}
        if self.warnings:
            update["warnings"] = list(self.warnings)
        return update

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        if self.sink is None or (not force and now - self.last_sent < MIN_INTERVAL_S):
            return
        self.last_sent = now
        update = self.update()
        log.debug("progress %s", update)
        try:
            self.sink(update)
        except Exception:  # progress is best effort: never fail a job over it
            log.exception("progress update failed")
