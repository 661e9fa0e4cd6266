"""Frame interpolation's timing, and its ffmpeg method (motion-compensated `minterpolate`).

The rule, for a factor f (a number with at most two decimals, so an exact fraction: 2.5 = 5/2) and a clip of
N frames at F fps:

- the output has M = ceil(f·N) frames at exactly f·F fps (30000/1001 x 2 = 60000/1001; 24 x 2.5 = 60), so it
  lasts as long as the source: exactly when f·N is whole (2N frames at f = 2), else it ends less than one
  output frame later;
- output frame k shows the source at position k/f, counted in source frames: a whole position is that source
  frame itself, a fractional one a new frame between its two neighbours, and the positions past the last
  source frame (N-1 < k/f < N, the last frame's own display time) repeat the last frame;
- a variable-frame-rate source stays variable: frame k is shown at the time that lies the same fraction of the
  way between the two source frames' times (the last frame's span ends where the source ends), so every source
  frame keeps its time and the new ones fall in proportion between them;
- the source frames come through as they are: output frame i·f is source frame i wherever i·f is whole (every
  source frame at a whole factor, so decimating by f gives the source back, N frames from f·N; every other one
  at 2.5).

Scene cuts are never blended: across one, both methods repeat the nearer source frame (`SceneCuts` finds them).
`motion_interpolated` makes the frames with ffmpeg's minterpolate (mi_mode=mci, with its own scene test too);
RIFE's frames are made by seedvr.engine.interpolation.
"""

import io
import itertools
import logging
import math
import queue
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, NoReturn, cast

import numpy as np

from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.media.ffmpeg import ffmpeg_exe, tail
from seedvr.io.media.video import FrameTimes, stop_process
from seedvr.io.media.writer import MAX_RATE_DENOMINATOR

logger = logging.getLogger(__name__)

MAX_FACTOR = 8
FACTOR_DENOMINATOR = 100  # factors take at most two decimals: 2.5, 1.25, 3.33
# minterpolate emits frames only up to its second-to-last input; two copies of the last frame let it reach the
# end of the clip (the positions between the last frame and them are the last frame held).
MCI_TAIL_FRAMES = 2
MCI_FILTER = "minterpolate=fps={rate}:mi_mode=mci:scd=fdiff"
SCENE_CUT_PERCENT = 10.0  # ffmpeg minterpolate's scd_threshold default
END = object()


def exact_factor(value: float) -> Fraction:
    """The factor a request's number means: 2.5 -> 5/2 (the decimal as written, not the binary float)."""
    return Fraction(str(value)).limit_denominator(FACTOR_DENOMINATOR)


def factor_problem(value: float) -> str | None:
    """Why `value` cannot be an interpolation factor (more than two decimals), or None."""
    if Fraction(str(value)) == exact_factor(value):
        return None
    return f"interpolate_factor takes at most two decimals (e.g. 2.5 or 1.25), got {value}"


def rate_problem(fps: Fraction, factor: Fraction, field: str) -> str | None:
    """Why `field`'s rate times `factor` cannot be written exactly (ffmpeg keeps rates as num/den with
    den <= 1001), or None."""
    rate = fps * factor
    if rate.denominator <= MAX_RATE_DENOMINATOR:
        return None
    return (f"interpolate_factor {float(factor):g} on {field} ({fps} fps) gives {rate} fps, a rate the output "
            f"cannot hold exactly; use a factor that keeps it a plain rate, such as 2, 3 or 4")


@dataclass(frozen=True)
class Retiming:
    """How interpolating a clip of `source_frames` frames at `source_fps` by `factor` changes its frames and
    times (the module docstring's rule). A factor of 1 changes nothing."""

    factor: Fraction
    source_frames: int
    source_fps: Fraction

    def __post_init__(self) -> None:
        if not 1 <= self.factor <= MAX_FACTOR:
            raise ValueError(f"factor must be between 1 and {MAX_FACTOR}, got {self.factor}")
        if self.source_frames < 1:
            raise ValueError(f"a clip has at least one frame, got {self.source_frames}")

    @property
    def output_frames(self) -> int:
        return math.ceil(self.factor * self.source_frames)

    @property
    def output_fps(self) -> Fraction:
        return self.source_fps * self.factor

    def positions(self) -> Iterator[Fraction]:
        """Where each output frame is, in source frames (k/f); past the last frame it is held."""
        last = self.source_frames - 1
        return (min(Fraction(k) / self.factor, Fraction(last)) for k in range(self.output_frames))

    def source_frames_done(self, written: int) -> int:
        """How many source frames `written` output frames account for (for progress)."""
        if written >= self.output_frames:
            return self.source_frames
        return min(self.source_frames, math.floor(written / self.factor))

    def frame_times(self, times: FrameTimes | None) -> FrameTimes | None:
        """A variable-rate source's times for the output: each new frame the same fraction of the way between
        its two source frames' times (in a time base `factor`'s numerator times finer, so all are whole)."""
        if times is None or self.factor == 1:
            return times
        parts, per = self.factor.numerator, self.factor.denominator  # f = parts / per
        bounds = (*times.starts, times.end)
        starts = []
        for k in range(self.output_frames):
            frame, step = divmod(k * per, parts)  # position k/f = frame + step/parts, frame <= N - 1
            starts.append(parts * bounds[frame] + step * (bounds[frame + 1] - bounds[frame]))
        return FrameTimes(times.time_base / parts, tuple(starts), parts * times.end)


class SceneCuts:
    """Where scene cuts lie, by the test of ffmpeg minterpolate's scd=fdiff: a pair of frames is a cut when
    min(mafd, |mafd - the previous pair's mafd|) >= SCENE_CUT_PERCENT, mafd being their mean absolute difference
    in percent of full scale. ffmpeg measures it on its first plane (luma); this on all three RGB values, every
    other row and column (so a cut between two colours of the same brightness is a cut too)."""

    def __init__(self) -> None:
        self.previous_mafd = 0.0

    def between(self, before: np.ndarray, after: np.ndarray) -> bool:
        """Whether a cut lies between two frames; ask for every pair of consecutive frames, in order."""
        difference = np.abs(after[::2, ::2].astype(np.int16) - before[::2, ::2].astype(np.int16))
        mafd = 100.0 * float(difference.mean()) / 255
        cut = min(mafd, abs(mafd - self.previous_mafd)) >= SCENE_CUT_PERCENT
        self.previous_mafd = mafd
        return cut


def nearer_frame(position: Fraction) -> int:
    """Across a cut, the frame a position repeats: the nearer of its two, the earlier at a tie."""
    index = math.floor(position)
    return index if position - index <= Fraction(1, 2) else index + 1


@dataclass
class _Held:
    """The source frames fed to ffmpeg whose output frames are not all out yet, and the cuts between them."""

    frames: deque[tuple[int, np.ndarray]] = field(default_factory=deque)
    cut_after: set[int] = field(default_factory=set)

    def output(self, position: Fraction, made: np.ndarray) -> np.ndarray:
        """The output frame at `position` (Retiming.positions: the held last frame's is whole): the source frame
        when whole (minterpolate re-renders even the frames it keeps, within 2 levels); across a cut the nearer
        one; else ffmpeg's."""
        index = math.floor(position)
        while self.frames[0][0] < index:
            self.frames.popleft()
        assert self.frames[0][0] == index, "a source frame is held until its last output frame is out"
        if position == index:
            return self.frames[0][1]
        if index in self.cut_after:
            return self.frames[nearer_frame(position) - index][1]
        return made


def motion_interpolated(frames: Iterable[np.ndarray], retiming: Retiming,
                        timings: dict[str, float] | None = None) -> Generator[np.ndarray, None, None]:
    """Yield `retiming.output_frames` uint8 (h, w, 3) frames made from `frames` by ffmpeg's minterpolate.

    The frames stream through one ffmpeg process while a thread reads what it makes, so nothing holds the clip;
    the source frames are held from when they are fed until their output frames are out (ffmpeg's latency, a few
    frames). Across a scene cut (ffmpeg's own test on luma, or `SceneCuts` on RGB) the nearer frame is repeated.
    Time spent on ffmpeg goes to timings["interpolate"]. INTERNAL when ffmpeg fails or makes too few frames.
    """
    timings = timings if timings is not None else {}
    source = iter(frames)
    first = next(source, None)
    if first is None:
        return
    height, width = first.shape[:2]
    rate, out_rate = retiming.source_fps, retiming.output_fps
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0",
        # yuv444p: full chroma, and luma first, the plane minterpolate's scene test measures
        "-vf", f"format=yuv444p,{MCI_FILTER.format(rate=f'{out_rate.numerator}/{out_rate.denominator}')}",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1",
    ]
    # ffmpeg's frames, in order, then END. It grows only while this thread writes a frame (ffmpeg answers each
    # with about f frames), and is emptied after every write: a few frames wait at most.
    made: queue.Queue[object] = queue.Queue()
    held, cuts = _Held(), SceneCuts()
    positions = retiming.positions()
    wanted, given = retiming.output_frames, 0
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        reader = threading.Thread(target=_read_frames, args=(process, (height, width, 3), made),
                                  name="minterpolate-read", daemon=True)
        reader.start()
        try:
            last = first
            for index, frame in enumerate(itertools.chain((first,), source)):
                started = time.perf_counter()
                if index and cuts.between(last, frame):
                    held.cut_after.add(index - 1)
                _feed(process, frame, stderr)
                _add_time(timings, started)
                held.frames.append((index, frame))
                last = frame
                while given < wanted and not made.empty():
                    item = made.get()
                    if item is END:
                        _fail("ffmpeg stopped before the last frame", process, stderr)
                    yield held.output(next(positions), cast(np.ndarray, item))
                    given += 1
            started = time.perf_counter()
            for _ in range(MCI_TAIL_FRAMES):
                _feed(process, last, stderr)
            assert process.stdin is not None  # stdin=PIPE
            process.stdin.close()
            _add_time(timings, started)
            while given < wanted:
                started = time.perf_counter()
                item = made.get()
                _add_time(timings, started)
                if item is END:
                    _fail(f"ffmpeg made {given} of {wanted} frames", process, stderr)
                yield held.output(next(positions), cast(np.ndarray, item))
                given += 1
        finally:
            stop_process(process)  # past the wanted frames, the rest of ffmpeg's are not needed
            reader.join()


def _add_time(timings: dict[str, float], started: float) -> None:
    timings["interpolate"] = timings.get("interpolate", 0.0) + time.perf_counter() - started


def _feed(process: subprocess.Popen, frame: np.ndarray, stderr: IO[bytes]) -> None:
    assert process.stdin is not None  # stdin=PIPE
    try:
        process.stdin.write(np.ascontiguousarray(frame).data)
    except (BrokenPipeError, ValueError):  # ffmpeg died / the pipe is closed
        _fail("ffmpeg stopped taking frames", process, stderr)


def _read_frames(process: subprocess.Popen, shape: tuple[int, int, int], made: queue.Queue) -> None:
    """The reader thread: ffmpeg's output cut into frames, queued in order, then END."""
    stdout = cast(io.BufferedReader, process.stdout)  # a buffered pipe: Popen's default bufsize
    size = shape[0] * shape[1] * shape[2]
    try:
        while True:
            buffer = bytearray(size)
            view, filled = memoryview(buffer), 0
            while filled < size:
                count = stdout.readinto(view[filled:])
                if not count:
                    return  # a partial frame at the end is not a frame
                filled += count
            made.put(np.frombuffer(buffer, dtype=np.uint8).reshape(shape))
    except (OSError, ValueError):  # the pipe was closed under it: the consumer has stopped
        return
    finally:
        made.put(END)


def _fail(reason: str, process: subprocess.Popen, stderr: IO[bytes]) -> NoReturn:
    stop_process(process)
    stderr.seek(0)
    logger.error("frame interpolation (minterpolate) failed: %s\n%s", reason, tail(stderr.read().decode(errors="replace")))
    raise RestoreError(INTERNAL, f"frame interpolation failed: {reason}")
