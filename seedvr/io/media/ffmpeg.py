"""The ffmpeg binary bundled with imageio-ffmpeg, and what it tells about a file.

There is no ffprobe beside that binary, so stream facts come from two runs of ffmpeg:
- `ffmpeg -i FILE` prints a listing of the streams on stderr: codec, pixel format,
  size, display rotation, and the frame rates rounded to two decimals;
- `ffmpeg -i FILE -map 0:N -c copy -f framecrc -` prints the exact time base and one
  line per packet (dts, pts, duration), from which the frame count and the exact
  average frame rate follow without decoding anything.
"""

import functools
import re
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg

STDERR_TAIL_LINES = 20
PROBE_TIMEOUT_S = 300
NO_PTS = -(2**63)  # AV_NOPTS_VALUE as framecrc prints it
PACKET_FLAG_DISCARD = 0x4  # AV_PKT_FLAG_DISCARD: demuxed but never shown (edit lists)

STREAM_LINE = re.compile(r"^\s*Stream #0:(\d+)\S*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")
SIZE_ITEM = re.compile(r"^(\d+)x(\d+)\b")
RATE_ITEM = re.compile(r"^([\d.]+)(k?) (fps|tbr)$")
ROTATION_LINE = re.compile(r"display ?matrix: rotation of (-?[\d.]+) degrees", re.IGNORECASE)
TIME_BASE_LINE = re.compile(r"^#tb 0: (\d+)/(\d+)$")


class FfmpegError(RuntimeError):
    """ffmpeg failed; `stderr_tail` holds its last lines, for the log only."""

    def __init__(self, message: str, stderr_tail: str):
        super().__init__(message)
        self.stderr_tail = stderr_tail


@dataclass(frozen=True)
class StreamHeader:
    """One stream as `ffmpeg -i` lists it."""

    index: int  # absolute index in the file, for `-map 0:<index>`
    kind: str  # "video" | "audio" | "subtitle" | "data" | "attachment"
    codec: str
    pix_fmt: str | None
    width: int | None  # stored size, before display rotation
    height: int | None
    printed_rates: tuple[str, ...]  # the "fps" then the "tbr" value, as printed
    attached_pic: bool  # cover art stored as a one-frame video stream
    rotation: int  # display rotation in degrees, 0 when none


@dataclass(frozen=True)
class PacketTiming:
    """The packets of one stream: how many, and the time they span."""

    count: int
    span: Fraction  # seconds from the first presentation time to the end of the last packet
    time_base: Fraction


@functools.cache
def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def list_streams(path: Path) -> list[StreamHeader]:
    """The streams of a file; FfmpegError when ffmpeg cannot open it."""
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    # Without an output ffmpeg always exits 1; the listing is what matters.
    stderr = _run(command).stderr
    streams = []
    for number, line in enumerate(lines := stderr.splitlines()):
        match = STREAM_LINE.match(line)
        if match is None:
            continue
        index, kind, description = int(match[1]), match[2].lower(), match[3]
        streams.append(_parse_stream(index, kind, description, _side_data(lines, number)))
    if not streams:
        raise FfmpegError("ffmpeg found no streams", tail(stderr))
    return streams


def packet_timing(path: Path, stream_index: int) -> PacketTiming:
    """Count the packets of a stream and measure their span, without decoding."""
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(path),
        "-map", f"0:{stream_index}", "-c", "copy", "-f", "framecrc", "-",
    ]
    completed = _run(command)
    if completed.returncode != 0:
        raise FfmpegError("ffmpeg could not read the packets", tail(completed.stderr))
    time_base, packets = None, []
    for line in completed.stdout.splitlines():
        if match := TIME_BASE_LINE.match(line):
            time_base = Fraction(int(match[1]), int(match[2]))
        if line.startswith("#") or not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        flags = next((int(f[2:], 16) for f in fields[6:] if f.startswith("F=")), 0)
        if not flags & PACKET_FLAG_DISCARD:
            packets.append((int(fields[1]), int(fields[2]), int(fields[3])))  # dts, pts, duration
    if time_base is None or not packets:
        raise FfmpegError("the stream has no packets", tail(completed.stderr))
    # Decode times are monotonic and always set by most demuxers (MPEG-PS leaves
    # presentation times unset after the first packets); either spans the same time.
    column = 0 if all(p[0] != NO_PTS for p in packets) else 1
    starts = [p[column] for p in packets]
    if NO_PTS in starts:
        raise FfmpegError("the stream's packets carry no timestamps", tail(completed.stderr))
    # A packet without a duration lasts as long as the typical gap between packets.
    ordered = sorted(starts)
    steps = sorted(b - a for a, b in zip(ordered, ordered[1:]) if b > a)
    typical_step = steps[len(steps) // 2] if steps else 0
    end = max(start + (p[2] if p[2] > 0 else typical_step) for start, p in zip(starts, packets))
    return PacketTiming(len(packets), (end - min(starts)) * time_base, time_base)


def printed_rate(text: str) -> Fraction | None:
    """The exact frame rate behind a rate ffmpeg printed with two decimals, when it
    is a common one: whole or half frames per second, or an NTSC rate k·1000/1001
    (29.97 -> 30000/1001). None for anything else (VFR averages, GIF delays)."""
    match = RATE_ITEM.match(text)
    if match is None:
        return None
    value = Fraction(match[1]) * (1000 if match[2] else 1)
    if value <= 0:
        return None
    if (2 * value).denominator == 1:
        return value
    ntsc_base = round(value * Fraction(1001, 1000))
    if abs(value - Fraction(ntsc_base * 1000, 1001)) < Fraction(1, 100):
        return Fraction(ntsc_base * 1000, 1001)
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        raise FfmpegError(f"ffmpeg took over {PROBE_TIMEOUT_S} s", tail(stderr)) from err


def _side_data(lines: list[str], stream_line: int) -> str:
    """The indented lines that follow a stream line (metadata, side data)."""
    block = []
    for line in lines[stream_line + 1:]:
        if STREAM_LINE.match(line) or not line.startswith("    "):
            break
        block.append(line)
    return "\n".join(block)


def _parse_stream(index: int, kind: str, description: str, side_data: str) -> StreamHeader:
    items = _top_level_items(description)
    codec = items[0].split()[0] if items and items[0] else "unknown"
    pix_fmt, width, height, rates = None, None, None, []
    for position, item in enumerate(items[1:], start=1):
        if size := SIZE_ITEM.match(item):
            width, height = int(size[1]), int(size[2])
            if position >= 2:  # the item before the size is the pixel format
                pix_fmt = items[position - 1].split("(")[0].strip() or None
        elif RATE_ITEM.match(item):
            rates.append(item)
    rotation = ROTATION_LINE.search(side_data)
    return StreamHeader(
        index=index,
        kind=kind,
        codec=codec,
        pix_fmt=pix_fmt if kind == "video" else None,
        width=width,
        height=height,
        printed_rates=tuple(sorted(rates, key=lambda r: not r.endswith("fps"))),
        attached_pic="(attached pic)" in description,
        rotation=round(float(rotation[1])) if rotation else 0,
    )


def _top_level_items(description: str) -> list[str]:
    """Split a stream description on the commas outside parentheses/brackets:
    'h264 (High), yuv420p(tv, bt709), 64x48 [SAR 1:1 DAR 4:3], 25 fps'
    -> ['h264 (High)', 'yuv420p(tv, bt709)', '64x48 [SAR 1:1 DAR 4:3]', '25 fps']."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in description:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return items
