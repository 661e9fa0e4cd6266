"""Video in through the bundled ffmpeg: probe, then stream the frames.

Frames are uint8 RGB arrays (h, w, 3), always streamed through a rawvideo pipe;
a whole video is never held in memory here. They come as the picture is meant to
be seen:
- display rotation applied;
- square pixels: a stream whose pixels are not square (SAR, e.g. 32:27 for a 16:9
  DVD picture stored as 720x480) is resampled to its display aspect, widened for
  wide pixels and made taller for tall ones (720x480 at SAR 32:27 -> 853x480;
  at SAR 8:9 -> 720x540);
- deinterlaced (ffmpeg's bwdif) when asked, or when `deinterlace` is "auto" and
  ffmpeg's idet finds more interlaced than progressive frames in the first
  IDET_SECONDS (or cannot tell, and the stream is flagged interlaced); a
  field-rate deinterlace gives one frame per field, twice the frames and the rate.

Frame rate: `VideoInfo.fps` is the exact average rate of the frames, as a Fraction.
It comes from the packet timestamps (count / span). When the container's own rate
is a common one (whole or half fps, or NTSC k*1000/1001) and agrees with the
timestamps to within their rounding, that rate is used: a Matroska file keeps
timestamps in milliseconds, so 8 frames at 30000/1001 span 267 ms, and the
container's "29.97" is what tells 30000/1001 apart from 8000/267. GIF, APNG and
animated WebP store one delay per frame; their rate is the average over all
frames (count / total delay).

Variable frame rate: when the frames' times stray from the grid first + i / fps by
more than the timestamps' rounding, `VideoInfo.frame_times` holds each frame's
own time, and the writer (seedvr.io.media.writer) shows every restored frame at it.
"""

import io
import itertools
import logging
import math
import subprocess
import tempfile
from collections.abc import Generator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import cast

import numpy as np

from seedvr.errors import INVALID_INPUT, UNSUPPORTED_MEDIA, RestoreError
from seedvr.io.media.ffmpeg import (
    ColorTags,
    FfmpegError,
    PacketTiming,
    StreamHeader,
    ffmpeg_exe,
    field_counts,
    list_streams,
    packet_timing,
    printed_rate,
    tail,
)
from seedvr.io.media.hardware_decode import decoder_options

logger = logging.getLogger(__name__)

FRAME_DELAY_CODECS = {"gif", "apng", "webp_anim"}  # one delay per frame, no container rate
MAX_RATE_DENOMINATOR = 1001  # ffmpeg parses rates as num/den <= 1001000; keep them exact
TIMESTAMP_SLACK_TICKS = 2  # a span measured from rounded timestamps is off by < 2 ticks
IDET_SECONDS = 2  # interlacing is looked for in the first seconds of a video (idet settles within a few frames)
VARIABLE_RATE_SLACK_S = Fraction(1, 1000)  # frames this close to a constant rate's grid are at that rate


@dataclass(frozen=True)
class FrameTimes:
    """When each frame of a variable-frame-rate video is shown: ticks of `time_base` from the first frame."""

    time_base: Fraction
    starts: tuple[int, ...]  # strictly increasing, starts[0] == 0
    end: int  # when the last frame stops being shown


@dataclass(frozen=True)
class Deinterlace:
    """How the reader deinterlaces (ffmpeg's bwdif): which field comes first, one frame per frame or per field."""

    parity: str  # "tff" | "bff"
    rate: str  # "frame" | "field"


@dataclass(frozen=True)
class FrameRange:
    """The part of a video a request restores (`start_time`/`duration`): `count` frames from decoded frame
    `first`, which shows `start` seconds after the video's first frame; the part lasts `duration` seconds."""

    first: int
    count: int
    start: float
    duration: float
    total: int  # frames in the whole video, as decoded


@dataclass(frozen=True)
class VideoInfo:
    """A probed video, described as the reader delivers its frames: display rotation applied, pixels made
    square, deinterlaced when asked (a field-rate deinterlace doubles the frames and the rate)."""

    width: int
    height: int
    frame_count: int
    fps: Fraction  # exact average frame rate, e.g. Fraction(30000, 1001)
    duration: float  # seconds, from the first frame's start to the last frame's end
    has_audio: bool
    audio_codec: str | None  # ffmpeg's codec name of the first audio stream, e.g. "aac"
    pix_fmt: str | None  # of the stored video, e.g. "yuv420p"
    codec: str  # e.g. "h264"
    rotation: int  # display rotation in degrees stored in the file, 0 when none
    stream_index: int  # the video stream used, as `-map 0:<stream_index>`
    sar: Fraction = Fraction(1)  # the stored pixels' aspect ratio; the reader resamples them to square
    color: ColorTags = ColorTags()
    frame_times: FrameTimes | None = None  # None: a constant rate, frame i shown at i / fps
    field_order: str | None = None  # what idet found: "progressive" | "tff" | "bff"; None: not looked for
    deinterlace: Deinterlace | None = None  # None: frames are read as stored
    part: FrameRange | None = None  # None: the whole video; else frame_count, duration and frame_times are the part's

    def describe(self) -> dict:
        """What the answer's processing_info says about how the video was read."""
        facts: dict = {"fps": "variable" if self.frame_times is not None else str(self.fps)}
        if self.frame_times is not None:
            facts["average_fps"] = str(self.fps)
        if self.sar != 1:
            facts["pixel_aspect"] = {"sar": f"{self.sar.numerator}:{self.sar.denominator}",
                                     "square_pixel_size": f"{self.width}x{self.height}"}
        if self.part is not None:
            facts["range"] = {"first_frame": self.part.first, "frames": self.part.count,
                              "start_time": round(self.part.start, 6), "duration": round(self.part.duration, 6)}
        facts["interlace"] = {"found": self.field_order,
                              "deinterlaced": None if self.deinterlace is None else
                              {"filter": "bwdif", "parity": self.deinterlace.parity, "rate": self.deinterlace.rate}}
        return facts


def probe_video(path: str | Path, field: str = "video", deinterlace: str = "off",
                deinterlace_rate: str = "frame") -> VideoInfo:
    """Everything needed to decode and re-encode a video, without decoding it (but for the first seconds
    when interlacing has to be looked for: `deinterlace` "auto" or "on"; "off", the default here, reads the
    frames as stored; a request's default is "auto")."""
    try:
        streams = list_streams(Path(path))
        video = next((s for s in streams if s.kind == "video" and not s.attached_pic), None)
        if video is None:
            raise RestoreError(
                UNSUPPORTED_MEDIA, f"{field} has no video stream; send a file with video in it"
            )
        timing = packet_timing(Path(path), video.index)
        fps = _frame_rate(video.codec, video.printed_rates, timing, field)
        field_order = None if deinterlace == "off" else _field_order(Path(path), video, timing.count, fps)
    except FfmpegError as err:
        logger.error("ffmpeg could not probe %s: %s\n%s", field, err, err.stderr_tail)
        raise RestoreError(
            INVALID_INPUT, f"{field} cannot be read as a video ({err}); the file may be damaged or truncated"
        ) from err
    if video.width is None or video.height is None:
        raise RestoreError(INVALID_INPUT, f"{field} has a video stream of unknown size")
    audio = next((s for s in streams if s.kind == "audio"), None)
    frame_times = _variable_frame_times(timing, fps)
    frame_count, duration = timing.count, float(timing.count / fps)
    if frame_times is not None:
        duration = float(frame_times.end * frame_times.time_base)
    plan = None
    if deinterlace == "on" or (deinterlace == "auto" and field_order in ("tff", "bff")):
        plan = Deinterlace("bff" if field_order == "bff" else "tff", deinterlace_rate)
    if plan is not None and plan.rate == "field":
        frame_count, fps = 2 * frame_count, 2 * fps
        frame_times = _field_times(frame_times) if frame_times is not None else None
    width, height = _square_pixels(video.width, video.height, video.sar)
    turned = video.rotation % 180 == 90
    return VideoInfo(
        width=height if turned else width,
        height=width if turned else height,
        frame_count=frame_count,
        fps=fps,
        duration=duration,
        has_audio=audio is not None,
        audio_codec=audio.codec if audio else None,
        pix_fmt=video.pix_fmt,
        codec=video.codec,
        rotation=video.rotation,
        stream_index=video.index,
        sar=video.sar,
        color=video.color,
        frame_times=frame_times,
        field_order=field_order,
        deinterlace=plan,
    )


def select_part(info: VideoInfo, start_time: float | None, duration: float | None,
                field: str = "video") -> VideoInfo:
    """The frames shown from `start_time` (seconds after the first frame; None: 0) for `duration` seconds
    (None: to the end): those whose time t has start_time <= t < start_time + duration. INVALID_INPUT when
    no frame is in that window."""
    if start_time is None and duration is None:
        return info
    begin = start_time or 0.0
    end = begin + duration if duration is not None else math.inf
    times = _frame_seconds(info)
    chosen = [index for index, time in enumerate(times) if begin - 1e-9 <= time < end - 1e-9]
    if not chosen:
        raise RestoreError(INVALID_INPUT, f"start_time {begin:g} s is past the end of {field}, which lasts "
                                          f"{info.duration:.3f} s; send a start_time below that")
    first, count = chosen[0], len(chosen)
    stop = times[first + count] if first + count < len(times) else info.duration
    frame_times = info.frame_times
    if frame_times is not None:
        origin = frame_times.starts[first]
        ends = frame_times.starts[first + count] if first + count < len(frame_times.starts) else frame_times.end
        frame_times = FrameTimes(frame_times.time_base,
                                 tuple(t - origin for t in frame_times.starts[first:first + count]), ends - origin)
    part = FrameRange(first, count, times[first], stop - times[first], info.frame_count)
    return replace(info, frame_count=count, duration=part.duration, frame_times=frame_times, part=part)


def _frame_seconds(info: VideoInfo) -> list[float]:
    """When each decoded frame shows, in seconds after the first."""
    if info.frame_times is not None:
        return [float(start * info.frame_times.time_base) for start in info.frame_times.starts]
    return [float(index / info.fps) for index in range(info.frame_count)]


def iter_frames(path: str | Path, info: VideoInfo, field: str = "video") -> Generator[np.ndarray, None, None]:
    """Yield exactly `info.frame_count` frames, uint8 (height, width, 3), in order.

    Raises INVALID_INPUT when the decoder produces another number of frames
    (a damaged file). Stopping early (break, close()) kills ffmpeg.
    """
    # ffmpeg has applied the display rotation before these filters. The scale filter makes the pixels
    # square, and pins the frame size even if the stream changes size midway.
    filters = []
    if info.deinterlace is not None:
        mode = "send_field" if info.deinterlace.rate == "field" else "send_frame"
        filters.append(f"bwdif=mode={mode}:parity={info.deinterlace.parity}:deint=all")
    if info.part is not None:  # by frame number: exact, whatever the timestamps (decodes from the start)
        filters.append(f"trim=start_frame={info.part.first}:end_frame={info.part.first + info.part.count}")
    filters.append(f"scale={info.width}:{info.height}")
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *decoder_options(info.codec), "-i", str(path),
        "-map", f"0:{info.stream_index}", "-vf", ",".join(filters),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1",
    ]
    frame_bytes = info.width * info.height * 3
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        try:
            assert process.stdout is not None  # stdout=PIPE
            produced = 0
            stdout = cast(io.BufferedReader, process.stdout)  # a buffered pipe: Popen's default bufsize
            while (frame := _read_frame(stdout, frame_bytes)) is not None:
                produced += 1
                if produced > info.frame_count:
                    break
                yield frame.reshape(info.height, info.width, 3)
            process.stdout.close()
            returncode = process.wait()
            if returncode != 0 or produced != info.frame_count:
                stderr.seek(0)
                logger.error(
                    "decoding %s: ffmpeg exited with %s after %d of %d frames\n%s",
                    field, returncode, produced, info.frame_count, tail(stderr.read().decode(errors="replace")),
                )
                raise RestoreError(
                    INVALID_INPUT,
                    f"{field} could not be decoded completely (got {produced} frames where its index "
                    f"lists {info.frame_count}); the file may be damaged; re-encode it and send it again",
                )
        finally:
            stop_process(process)


def read_frames(path: str | Path, info: VideoInfo, start: int = 0, count: int | None = None) -> np.ndarray:
    """Frames [start, start + count) as one uint8 array (count, height, width, 3)."""
    stop = info.frame_count if count is None else min(start + count, info.frame_count)
    frames = iter_frames(path, info)
    try:
        return np.stack(list(itertools.islice(frames, start, stop)))
    finally:
        frames.close()


def _frame_rate(codec: str, printed_rates: tuple[str, ...], timing: PacketTiming, field: str) -> Fraction:
    """The exact average frame rate; see the module docstring."""
    slack = TIMESTAMP_SLACK_TICKS * timing.time_base
    if codec not in FRAME_DELAY_CODECS:
        for text in printed_rates:
            rate = printed_rate(text)
            if rate is not None and (timing.span == 0 or abs(timing.count / rate - timing.span) <= slack):
                return rate
    if timing.span <= 0:
        raise RestoreError(INVALID_INPUT, f"{field} has no frame timing; re-encode it with a frame rate")
    return (timing.count / timing.span).limit_denominator(MAX_RATE_DENOMINATOR)


def _field_order(path: Path, video: StreamHeader, frame_count: int, fps: Fraction) -> str:
    """"tff", "bff" or "progressive": what ffmpeg's idet finds in the first IDET_SECONDS; when it cannot
    tell (a still picture shows no combing), what the stream's flags say."""
    if video.codec in FRAME_DELAY_CODECS:
        return "progressive"
    frames = max(1, min(frame_count, int(IDET_SECONDS * fps)))
    counts = field_counts(path, video.index, frames)
    if counts.tff + counts.bff > counts.progressive:
        return "tff" if counts.tff >= counts.bff else "bff"
    if counts.tff + counts.bff + counts.progressive == 0 and video.field_order in ("tff", "bff"):
        return video.field_order
    return "progressive"


def _variable_frame_times(timing: PacketTiming, fps: Fraction) -> FrameTimes | None:
    """The frames' own times when they stray from the constant-rate grid first + i / fps by more than
    the timestamps' rounding (VARIABLE_RATE_SLACK_S, or two ticks of a coarser time base); else None."""
    slack = max(VARIABLE_RATE_SLACK_S, TIMESTAMP_SLACK_TICKS * timing.time_base)
    first = timing.starts[0]
    ticks_per_frame = 1 / (fps * timing.time_base)
    if all(abs(start - first - index * ticks_per_frame) * timing.time_base <= slack
           for index, start in enumerate(timing.starts)):
        return None
    starts: list[int] = []
    for start in timing.starts:  # equal times (a damaged file) would make the output's timestamps collide
        starts.append(max(start - first, starts[-1] + 1 if starts else 0))
    return FrameTimes(timing.time_base, tuple(starts), starts[-1] + max(timing.last_duration, 1))


def _field_times(times: FrameTimes) -> FrameTimes:
    """Two frames per frame, the second halfway to the next frame (in a time base twice as fine)."""
    doubled = [2 * start for start in times.starts] + [2 * times.end]
    starts = [time for start, end in zip(doubled, doubled[1:]) for time in (start, (start + end) // 2)]
    return FrameTimes(times.time_base / 2, tuple(starts), doubled[-1])


def _square_pixels(width: int, height: int, sar: Fraction) -> tuple[int, int]:
    """The size that shows the stored picture at its display aspect with square pixels: wide pixels
    widen it, tall pixels make it taller (never fewer samples than stored)."""
    if sar > 1:
        return max(1, round(width * sar)), height
    if sar < 1:
        return width, max(1, round(height / sar))
    return width, height


def _read_frame(stream: io.BufferedIOBase, size: int) -> np.ndarray | None:
    """The next `size` bytes as a writable uint8 array; None at the end of the stream."""
    buffer = bytearray(size)
    view, filled = memoryview(buffer), 0
    while filled < size:
        read = stream.readinto(view[filled:])
        if not read:
            return None  # a partial frame at the end is not a frame
        filled += read
    return np.frombuffer(buffer, dtype=np.uint8)


def stop_process(process: subprocess.Popen) -> None:
    """Kill ffmpeg if it still runs, and reap it (no zombie)."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None and not pipe.closed:
            try:
                pipe.close()
            except BrokenPipeError:
                pass
