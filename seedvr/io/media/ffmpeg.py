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
SAR_ITEM = re.compile(r"\[SAR (\d+):(\d+) DAR")
IDET_LINE = re.compile(r"Multi frame detection: TFF:\s*(\d+)\s+BFF:\s*(\d+)\s+Progressive:\s*(\d+)")
FIELD_ORDERS = {"top first": "tff", "bottom first": "bff", "top coded first (swapped)": "tff",
                "bottom coded first (swapped)": "bff", "progressive": "progressive"}
# ffmpeg prints one name for the matrix, primaries and transfer when their enum values are equal: the
# matrix's name, whose value is read as primaries and transfer too (e.g. "bt470bg" = matrix bt470bg,
# primaries bt470bg, transfer gamma28). Only the values whose names differ between the three enums are listed.
SAME_VALUE_PRIMARIES = {"gbr": None, "fcc": "bt470m", "ycgco": "film", "bt2020nc": "bt2020", "bt2020c": "smpte428"}
SAME_VALUE_TRANSFER = {"gbr": None, "fcc": "gamma22", "bt470bg": "gamma28", "ycgco": "linear",
                       "bt2020nc": "log100", "bt2020c": "log316"}


class FfmpegError(RuntimeError):
    """ffmpeg failed; `stderr_tail` holds its last lines, for the log only."""

    def __init__(self, message: str, stderr_tail: str):
        super().__init__(message)
        self.stderr_tail = stderr_tail


@dataclass(frozen=True)
class ColorTags:
    """A video stream's colour description as ffmpeg names it; None where the file leaves it unset."""

    range: str | None = None  # "tv" (limited) | "pc" (full)
    matrix: str | None = None  # e.g. "bt709", "smpte170m", "bt470bg", "bt2020nc"
    primaries: str | None = None  # e.g. "bt709", "smpte170m", "bt2020"
    transfer: str | None = None  # e.g. "bt709", "smpte170m", "smpte2084"


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
    sar: Fraction = Fraction(1)  # sample (pixel) aspect ratio: a stored pixel is `sar` times as wide as high
    color: ColorTags = ColorTags()
    field_order: str | None = None  # "tff" | "bff" | "progressive" as the stream is flagged; None when unflagged


@dataclass(frozen=True)
class PacketTiming:
    """The packets of one stream: how many, the time they span, and when each is shown."""

    count: int
    span: Fraction  # seconds from the first presentation time to the end of the last packet
    time_base: Fraction
    starts: tuple[int, ...]  # presentation times in time_base ticks, in presentation order
    last_duration: int  # ticks the last frame is shown


@dataclass(frozen=True)
class FieldCounts:
    """What ffmpeg's `idet` filter found in the frames it looked at (multi-frame detection)."""

    tff: int  # interlaced, top field first
    bff: int  # interlaced, bottom field first
    progressive: int


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
    # Presentation times say when each frame shows; decode times of a reordered (B-frame) stream only
    # follow them on average. MPEG-PS leaves presentation times unset after the first packets: its decode
    # times, one per frame at the frame rate, stand in for them.
    column = 1 if all(p[1] != NO_PTS for p in packets) else 0
    starts = [p[column] for p in packets]
    if NO_PTS in starts:
        raise FfmpegError("the stream's packets carry no timestamps", tail(completed.stderr))
    # A packet without a duration lasts as long as the typical gap between packets.
    ordered = sorted(starts)
    steps = sorted(b - a for a, b in zip(ordered, ordered[1:]) if b > a)
    typical_step = steps[len(steps) // 2] if steps else 0
    ends = [start + (p[2] if p[2] > 0 else typical_step) for start, p in zip(starts, packets)]
    end = max(ends)
    return PacketTiming(len(packets), (end - ordered[0]) * time_base, time_base, tuple(ordered),
                        end - ordered[-1])


def field_counts(path: Path, stream_index: int, frames: int) -> FieldCounts:
    """Run ffmpeg's interlace detector over the first `frames` frames of a video stream."""
    command = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", f"0:{stream_index}",
        "-frames:v", str(frames), "-vf", "idet", "-an", "-f", "null", "-",
    ]
    completed = _run(command)
    if completed.returncode != 0:
        raise FfmpegError("ffmpeg could not look for interlacing", tail(completed.stderr))
    # A filter graph may be built more than once (the first one sees no frames): add them up.
    counts = [tuple(int(n) for n in match.groups()) for match in IDET_LINE.finditer(completed.stderr)]
    return FieldCounts(*(sum(column) for column in zip((0, 0, 0), *counts)))


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
    sar, color, field_order = Fraction(1), ColorTags(), None
    for position, item in enumerate(items[1:], start=1):
        if size := SIZE_ITEM.match(item):
            width, height = int(size[1]), int(size[2])
            if (aspect := SAR_ITEM.search(item)) and int(aspect[1]) > 0 and int(aspect[2]) > 0:
                sar = Fraction(int(aspect[1]), int(aspect[2]))
            if position >= 2:  # the item before the size is the pixel format
                pix_fmt, color, field_order = _pixel_format(items[position - 1])
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
        sar=sar,
        color=color,
        field_order=field_order,
    )


def _pixel_format(item: str) -> tuple[str | None, ColorTags, str | None]:
    """'yuv420p(tv, bt470bg/smpte170m/bt709, top first)' -> the pixel format, its colour tags, its field order.

    The parenthesis lists, each only when set: the range, the colour description (one name, or
    matrix/primaries/transfer), the field order."""
    name, _, details = item.partition("(")
    color, field_order = ColorTags(), None
    for part in (p.strip() for p in details.removesuffix(")").split(",")) if details else ():
        if part in ("tv", "pc"):
            color = ColorTags(part, color.matrix, color.primaries, color.transfer)
        elif part in FIELD_ORDERS:
            field_order = FIELD_ORDERS[part]
        elif "/" in part:
            matrix, primaries, transfer = (None if n == "unknown" else n for n in (part.split("/") + [""] * 3)[:3])
            color = ColorTags(color.range, matrix, primaries, transfer)
        elif part and part != "unknown":
            color = ColorTags(color.range, part, SAME_VALUE_PRIMARIES.get(part, part),
                              SAME_VALUE_TRANSFER.get(part, part))
    return name.strip() or None, color, field_order


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
