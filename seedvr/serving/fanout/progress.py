"""A fanned-out job's progress: every segment's frames in one count, each segment's state, one ETA.

    {"phase", "frames_done", "frames_total", "percent", "eta_s", ["warnings"],
     "segments": [{"index", "chunks", "frames", "state", "job_id", "attempts", "seconds", "frames_done"}, ...],
     "merged": frames of the result encoded so far}

frames_total is the sum of the segments' frames (a frame two segments share counts in each): the work the workers do.
A reused segment counts as done from the start; a segment that is tried again starts over. Updates come from the
coordinator's thread (its own segments, the merge) and from the thread that watches the segment jobs.
"""

import threading
from collections.abc import Sequence

from seedvr.serving.fanout.dispatch import SegmentState
from seedvr.serving.progress import Progress, ProgressSink

FINISHED_STATES = ("done", "reused")


class FanOutProgress:
    def __init__(self, states: list[SegmentState], sink: ProgressSink | None, warnings: Sequence[str] = ()) -> None:
        self.states = states
        self.merged = 0
        self._sink = sink
        self._lock = threading.RLock()
        self.progress = Progress(sum(state.segment.frames for state in states), self._send if sink else None,
                                 warnings)
        self._count()

    def phase(self, name: str) -> None:
        with self._lock:
            self._count()
            self.progress.phase(name)

    def changed(self) -> None:
        """A segment's state or frames changed (any thread): count again, send when the throttle allows."""
        with self._lock:
            self._count()
            self.progress.advance(0)

    def merged_frames(self, count: int) -> None:
        with self._lock:
            self.merged = count
            self.progress.advance(0)

    def update(self) -> dict:
        with self._lock:
            self._count()
            return self._with_segments(self.progress.update())

    def _count(self) -> None:
        self.progress.frames_done = sum(state.segment.frames if state.state in FINISHED_STATES else state.frames_done
                                        for state in self.states)

    def _with_segments(self, update: dict) -> dict:
        table = [{**state.describe(), "frames_done": state.segment.frames if state.state in FINISHED_STATES
                  else state.frames_done} for state in self.states]
        return {**update, "segments": table, "merged": self.merged}

    def _send(self, update: dict) -> None:
        assert self._sink is not None, "sent only with a sink"
        self._sink(self._with_segments(update))


class LocalSegmentProgress(Progress):
    """The Progress a segment restored by the coordinator reports to: its frames go to the segment's state."""

    def __init__(self, fanout: FanOutProgress, state: SegmentState) -> None:
        super().__init__(state.segment.frames, None)
        self.fanout, self.state = fanout, state

    def phase(self, name: str) -> None:
        self.fanout.phase(name)

    def advance(self, frames: int) -> None:
        self.state.frames_done = min(self.state.frames_done + frames, self.state.segment.frames)
        self.fanout.changed()
