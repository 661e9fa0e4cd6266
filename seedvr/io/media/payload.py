"""Client payloads: base64 / data URI <-> bytes, and what kind of media the bytes are.

The kind is decided from the bytes alone (libmagic, then the pure-Python `filetype`
as a fallback, then an MPEG-TS sync-byte check that neither knows), never from a
file name. Animated GIF, APNG and animated WebP are videos; their single-frame
forms are images.

What each sniffer says of the containers that old cameras, phones and discs write
(libmagic 5.44, filetype 1.2), and what we answer:

    file            libmagic                  filetype          answer (mime, extension)
    WMV / ASF       video/x-ms-asf            video/x-ms-wmv    video/x-ms-asf, wmv
    3GP             video/3gpp                video/mp4         video/3gpp, 3gp
    3G2             video/3gpp2               video/mp4         video/3gpp2, 3g2
    M4V (iTunes)    video/x-m4v               video/mp4         video/x-m4v, m4v
    F4V             application/octet-stream  video/mp4         video/x-f4v, f4v
    MTS / M2TS      application/octet-stream  -                 video/mp2t, m2ts (sync-byte check)
    VOB / MPEG-PS   video/mpeg                video/mpeg        video/mpeg, mpg

ISO base media files (mp4, m4v, 3gp, 3g2, f4v, mov with an ftyp box) are told apart
by the major brand of their ftyp box, so that the answer is the same with or
without libmagic; MIME_ALIASES maps filetype's other names onto libmagic's.
"""

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import filetype
from PIL import Image

from seedvr.errors import INVALID_INPUT, UNSUPPORTED_MEDIA, RestoreError, excerpt

magic: ModuleType | None
try:
    import magic
except ImportError:  # libmagic missing: `filetype` alone decides
    magic = None

ENCODE_CHUNK_BYTES = 3 << 20  # a multiple of 3: chunks encode without padding but the last
DECODE_CHUNK_CHARS = 4 << 20  # base64 characters cleaned and decoded at a time
SNIFF_BYTES = 1 << 20  # libmagic never needs more than the first MiB for these formats
DATA_URI = re.compile(r"data:[^,]*?;base64,", re.IGNORECASE)
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")

# MPEG-TS: 188-byte packets each starting with the sync byte 0x47; M2TS (Blu-ray)
# prefixes every packet with a 4-byte timecode.
TS_SYNC_BYTE = 0x47
TS_LAYOUTS = ((188, 0), (192, 4))  # (packet size, offset of the sync byte)
TS_EXTENSIONS = {188: "ts", 192: "m2ts"}  # camcorders (AVCHD) name the 192-byte kind .MTS, Blu-ray .m2ts
TS_PACKETS_TO_CHECK = 5
ISO_FTYP = b"ftyp"  # bytes 4-8 of an ISO base media file: the type of its first box


@dataclass(frozen=True)
class MediaKind:
    kind: str  # "video" | "image"
    mime: str
    extension: str  # without the dot; the suffix to give a temp file of these bytes


# MIME types as libmagic or `filetype` name them -> file extension. GIF, PNG and WebP
# are videos or images depending on their frame count, see `_animated_kind`.
VIDEO_MIMES = {
    "video/mp4": "mp4",
    "video/x-m4v": "m4v",
    "video/quicktime": "mov",
    "video/x-matroska": "mkv",
    "video/webm": "webm",
    "video/x-msvideo": "avi",
    "video/x-flv": "flv",
    "video/mp2t": "ts",
    "video/mpeg": "mpg",
    "video/x-ms-asf": "wmv",
    "video/3gpp": "3gp",
    "video/3gpp2": "3g2",
    "video/x-f4v": "f4v",
}
MIME_ALIASES = {"video/x-ms-wmv": "video/x-ms-asf"}  # filetype's name -> libmagic's
# ISO base media file format: the major brand of the ftyp box (its first 3 bytes; the 4th is a version,
# "3gp4".."3gp6", "M4V "/"M4VH"/"M4VP") -> the MIME type. Other brands (isom, mp42, ...) keep the sniffer's answer.
ISO_MIMES = {"video/mp4", "video/x-m4v", "video/3gpp", "video/3gpp2", "video/x-f4v", "video/quicktime"}
ISO_BRANDS = {b"3gp": "video/3gpp", b"3g2": "video/3gpp2", b"M4V": "video/x-m4v", b"f4v": "video/x-f4v",
              b"qt ": "video/quicktime"}
IMAGE_MIMES = {
    "image/png": "png",
    "image/apng": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/tiff": "tiff",
    "image/gif": "gif",
}
ANIMATABLE_MIMES = {"image/gif", "image/apng", "image/png", "image/webp"}
ACCEPTED = (
    "videos: mp4, m4v, mov, 3gp, 3g2, f4v, mkv, webm, avi, wmv/asf, flv, mpeg-ts/m2ts/mts, mpeg-ps/vob, "
    "animated gif/png/webp; images: png, jpeg, webp, bmp, tiff, gif"
)


def decode_base64(value: object, field: str, *, max_bytes: int | None = None) -> bytearray:
    """Bytes of a base64 string: standard or URL-safe alphabet, padded or not,
    whitespace anywhere, optionally wrapped in a `data:<mime>;base64,` URI.

    `max_bytes` is checked on the encoded length, before anything is decoded. The text is cleaned and
    decoded DECODE_CHUNK_CHARS at a time into one buffer: a payload of hundreds of MB is never copied whole.
    """
    if not isinstance(value, str):
        raise RestoreError(
            INVALID_INPUT, f"{field} must be a base64 string, got {type(value).__name__}"
        )
    text = value.strip()  # the same object when there is nothing to strip
    start = 0
    if text[:5].lower() == "data:":
        header = DATA_URI.match(text)
        if header is None:
            raise RestoreError(
                INVALID_INPUT,
                f"{field} is a data URI without ';base64,' (got {excerpt(text)}); "
                "send 'data:<mime>;base64,<data>' or plain base64",
            )
        start = header.end()
    # Every 4 characters hold 3 bytes (less the "=" padding); whitespace makes this a slight overestimate.
    padding = len(text[-2:]) - len(text[-2:].rstrip("="))
    decoded_size = (len(text) - start - padding) * 3 // 4
    if max_bytes is not None and decoded_size > max_bytes:
        raise RestoreError(
            INVALID_INPUT,
            f"{field} is about {decoded_size / 2**20:.1f} MiB once decoded, over the "
            f"limit of {max_bytes / 2**20:.1f} MiB; send a smaller file",
        )
    decoded, carry, characters = bytearray(), "", 0
    try:
        for offset in range(start, len(text), DECODE_CHUNK_CHARS):
            piece = carry + "".join(text[offset:offset + DECODE_CHUNK_CHARS].split()).translate(URL_SAFE_TO_STANDARD)
            characters += len(piece) - len(carry)
            whole = len(piece) - len(piece) % 4  # decode whole 4-character groups; carry the rest over
            decoded += base64.b64decode(piece[:whole], validate=True)
            carry = piece[whole:]
        tail = carry.rstrip("=")
        if characters and len(tail) % 4 == 1:  # no base64 string has this length, whatever its padding
            raise RestoreError(
                INVALID_INPUT, f"{field} is not valid base64 (truncated?): {excerpt(value)}"
            )
        decoded += base64.b64decode(tail + "=" * (-len(tail) % 4), validate=True)
    except binascii.Error as err:
        raise RestoreError(
            INVALID_INPUT,
            f"{field} is not valid base64 ({err}); got {excerpt(value)}",
        ) from err
    if not decoded:
        raise RestoreError(INVALID_INPUT, f"{field} is empty; send the file as base64")
    return decoded


class InlineBase64(str):
    """Base64 text of a result, as the answer carries it. Its repr is a short placeholder: the runpod SDK
    formats the whole answer into debug log lines (`rp_job.run_job`, even with debug logging off), which would
    otherwise copy the text twice more, and log it; JSON still serialises the text itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} characters of base64>"


def encode_file_base64(path: str | Path, mime: str | None = None) -> InlineBase64:
    """A file as standard padded base64 text (a data URI when `mime` is given), read in chunks into one
    buffer: the file's bytes are never held whole, so the peak is the text twice (buffer, then str)."""
    prefix = f"data:{mime};base64,".encode("ascii") if mime else b""
    size = os.path.getsize(path)
    text = bytearray(len(prefix) + 4 * ((size + 2) // 3))
    text[:len(prefix)] = prefix
    position = len(prefix)
    with open(path, "rb") as file:
        while chunk := file.read(ENCODE_CHUNK_BYTES):
            encoded = base64.b64encode(chunk)
            text[position:position + len(encoded)] = encoded
            position += len(encoded)
    decoded = text.decode("ascii")
    del text  # before the subclass copies the text: still twice the text at the peak, never three times
    return InlineBase64(decoded)


def sniff_media(data: bytes | bytearray) -> MediaKind:
    """What the bytes are, from their content; UNSUPPORTED_MEDIA for anything else."""
    head = bytes(data[:SNIFF_BYTES])
    for mime in _candidate_mimes(head):
        if mime in ISO_MIMES:
            mime = _iso_brand_mime(head) or mime
        if mime in ANIMATABLE_MIMES:
            return _animated_kind(data, mime)
        if mime in VIDEO_MIMES:
            return MediaKind("video", mime, VIDEO_MIMES[mime])
        if mime in IMAGE_MIMES:
            return MediaKind("image", mime, IMAGE_MIMES[mime])
    if (packet_size := _mpeg_ts_packet_size(head)) is not None:
        return MediaKind("video", "video/mp2t", TS_EXTENSIONS[packet_size])
    found = next(iter(_candidate_mimes(head)), "unknown")
    raise RestoreError(
        UNSUPPORTED_MEDIA, f"the media is {found}, which is not supported; send one of {ACCEPTED}"
    )


def check_forced_type(kind: MediaKind, media_type: str | None) -> None:
    """A client-forced `media_type` must agree with the bytes.

    None and "auto" force nothing. A contradiction is INVALID_INPUT (the request is
    inconsistent; the media itself is fine), naming `media_type`.
    """
    if media_type in (None, "auto"):
        return
    if media_type not in ("video", "image"):
        raise RestoreError(
            INVALID_INPUT,
            f"media_type must be 'video', 'image' or 'auto', got {excerpt(media_type)}",
        )
    if media_type != kind.kind:
        raise RestoreError(
            INVALID_INPUT,
            f"media_type is {media_type!r} but the data is {kind.kind} ({kind.mime}); "
            f"send media_type 'auto' or {kind.kind!r}, or send {media_type} data",
        )


def _candidate_mimes(head: bytes) -> list[str]:
    """libmagic's answer, then `filetype`'s, lower-cased, without duplicates."""
    mimes = []
    if magic is not None:
        try:
            mimes.append(magic.from_buffer(head, mime=True).lower())
        except magic.MagicException:  # libmagic failed on these bytes: `filetype` decides
            pass
    guess = filetype.guess(head)
    if guess is not None:
        mimes.append(guess.mime.lower())
    return list(dict.fromkeys(MIME_ALIASES.get(mime, mime) for mime in mimes))


def _iso_brand_mime(head: bytes) -> str | None:
    """The MIME type an ISO base media file's major brand names; None for an unlisted brand or without
    an ftyp box (an old QuickTime file starts with another box)."""
    return ISO_BRANDS.get(head[8:11]) if head[4:8] == ISO_FTYP else None


def _animated_kind(data: bytes | bytearray, mime: str) -> MediaKind:
    """GIF, PNG and WebP are videos when they hold more than one frame."""
    extension = IMAGE_MIMES[mime]
    try:
        with Image.open(io.BytesIO(data)) as image:
            animated = bool(getattr(image, "is_animated", False))
    except Exception as err:  # Pillow raises many types for damaged headers
        raise RestoreError(
            INVALID_INPUT, f"the {extension} data is damaged and cannot be read ({err})"
        ) from err
    if not animated:
        return MediaKind("image", "image/png" if mime == "image/apng" else mime, extension)
    return MediaKind("video", "image/apng" if extension == "png" else mime, extension)


def _mpeg_ts_packet_size(head: bytes) -> int | None:
    """188 (MPEG-TS) or 192 (M2TS: a 4-byte timecode before each packet) when the first packets start
    with the sync byte; None for anything else."""
    for packet_size, offset in TS_LAYOUTS:
        positions = range(offset, offset + packet_size * TS_PACKETS_TO_CHECK, packet_size)
        if len(head) > positions[-1] and all(head[p] == TS_SYNC_BYTE for p in positions):
            return packet_size
    return None
