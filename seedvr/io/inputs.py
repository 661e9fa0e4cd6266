"""Client media in: base64, a URL or a local file -> a probed file in the job's folder.

Every item of a request is fetched, sniffed from its bytes and probed before the
model is touched, so a bad item in a list fails the job before any GPU work.
Images are decoded here (they are small); video frames are streamed later.
"""

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from seedvr.io.media.fetch import fetch_url
from seedvr.io.media.image import DecodedImage, read_image
from seedvr.io.media.payload import ANIMATABLE_MIMES, SNIFF_BYTES, MediaKind, check_forced_type, decode_base64, sniff_media
from seedvr.io.media.video import VideoInfo, probe_video, select_part


@dataclass(frozen=True)
class MediaSpec:
    """The request's media: base64 strings or URLs as sent, the field that carried them, the forced type."""

    field: str  # "media", "media_url", or the legacy "video" / "image"
    values: tuple[str, ...]
    media_type: str = "auto"  # "auto" | "video" | "image"
    deinterlace: str = "auto"  # "auto" | "on" | "off": see seedvr.io.media.video
    deinterlace_rate: str = "frame"  # "frame" | "field"
    start_time: float | None = None  # videos: restore only from here (seconds) ...
    duration: float | None = None  # ... for this long; None: to the end


@dataclass
class InputItem:
    """One probed input: a video (frames streamed on demand) or a decoded image."""

    index: int
    field: str                     # the request field it came from, e.g. "media" or "media_url[2]"
    kind: str                      # "video" | "image"
    path: Path
    width: int
    height: int
    frame_count: int
    video: VideoInfo | None = None
    image: DecodedImage | None = None

    @property
    def fps(self) -> Fraction | None:
        return self.video.fps if self.video else None


def _sniff_file(path: Path) -> MediaKind:
    with open(path, "rb") as file:
        head = file.read(SNIFF_BYTES)
    kind = sniff_media(head)
    if kind.mime in ANIMATABLE_MIMES:  # still or animated: counting frames needs the whole file
        kind = sniff_media(path.read_bytes())
    return kind


def _probe(index: int, field: str, path: Path, kind: str, media: MediaSpec) -> InputItem:
    if kind == "image":
        image = read_image(path, field=field)
        return InputItem(index, field, "image", path, image.width, image.height, 1, image=image)
    info = probe_video(path, field=field, deinterlace=media.deinterlace, deinterlace_rate=media.deinterlace_rate)
    info = select_part(info, media.start_time, media.duration, field)
    return InputItem(index, field, "video", path, info.width, info.height, info.frame_count, video=info)


def local_input(path: Path, media: MediaSpec, index: int = 0) -> InputItem:
    """A file on this machine (the command line's inputs); `media` gives the forced type and decode options."""
    field = str(path)
    kind = _sniff_file(path)
    check_forced_type(kind, media.media_type)
    return _probe(index, field, path, kind.kind, media)


def gather_inputs(media: MediaSpec, workdir: Path) -> list[InputItem]:
    """Fetch or decode, sniff and probe every media item of a restore request, in order."""
    items = []
    for index, value in enumerate(media.values):
        field = media.field if len(media.values) == 1 else f"{media.field}[{index}]"
        if media.field == "media_url":
            downloaded = fetch_url(value, workdir, field=field)
            kind = _sniff_file(downloaded)
            path = downloaded.rename(workdir / f"input{index}.{kind.extension}")
        else:
            data = decode_base64(value, field)
            kind = sniff_media(data)
            path = workdir / f"input{index}.{kind.extension}"
            path.write_bytes(data)
            del data
        check_forced_type(kind, media.media_type)
        items.append(_probe(index, field, path, kind.kind, media))
    return items
