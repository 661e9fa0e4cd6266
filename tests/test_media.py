"""seedvr.io.media: base64 payloads, sniffing, images and videos through Pillow and ffmpeg.

All media are made on the spot by tests/media_factory.py (64x48, 5-10 frames).
"""

import base64
import logging
import struct
import subprocess
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_factory import (
    FFMPEG,
    HEIGHT,
    IMAGE_CASES,
    VIDEO_CASES,
    WIDTH,
    base_alpha,
    base_rgb,
    closest_pattern_frame,
    ffmpeg_children,
    make_audio_only,
    make_image,
    make_video,
    pattern_frames,
    stream_line,
    write_video,
)
from PIL import Image

from seedvr.errors import INTERNAL, INVALID_INPUT, UNSUPPORTED_MEDIA, RestoreError
from seedvr.io.media import payload
from seedvr.io.media.ffmpeg import packet_timing
from seedvr.io.media.image import read_image, write_image
from seedvr.io.media.payload import (
    DECODE_CHUNK_CHARS,
    ENCODE_CHUNK_BYTES,
    MediaKind,
    check_forced_type,
    decode_base64,
    encode_file_base64,
    sniff_media,
)
from seedvr.io.media.video import iter_frames, probe_video, read_frames
from seedvr.io.media.writer import VideoWriter

PATTERN_TOLERANCE = 8.0  # largest mean-colour error of a frame after lossy codecs (measured: about 4)
AUDIO_CASES = [name for name, case in VIDEO_CASES.items() if case.audio_codec]
COPIED_INTO_MP4 = {"aac", "mp3"}  # of the audio codecs the factory makes (Opus in mp4 becomes AAC)
AUDIO_PACKET_SLACK_S = 0.05  # audio is cut at packet boundaries (AAC: 1024 samples = 21 ms at 48 kHz)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def video(media_dir):
    """The path of a VIDEO_CASES entry, made once per module."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_video(media_dir, name)
        return made[name]

    return get


def assert_frames_follow_pattern(frames: list[np.ndarray], count: int) -> None:
    assert len(frames) == count
    for index, frame in enumerate(frames):
        closest, distance = closest_pattern_frame(frame, count)
        assert (closest, index) == (index, index), f"frame {index} looks like pattern frame {closest}"
        assert distance <= PATTERN_TOLERANCE, f"frame {index}: mean colour off by {distance:.1f}"


# ----------------------------------------------------------------------------- base64

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff"  # every byte value: '+', '/', '-' and '_' all appear
STANDARD = base64.b64encode(PAYLOAD).decode()
URL_SAFE = base64.urlsafe_b64encode(PAYLOAD).decode()


@pytest.mark.parametrize(
    "encoded",
    [
        STANDARD,
        URL_SAFE,
        STANDARD.rstrip("="),  # no padding
        URL_SAFE.rstrip("="),
        "\n".join(STANDARD[i:i + 76] for i in range(0, len(STANDARD), 76)) + "\n",  # MIME line breaks
        "  " + STANDARD[:100] + " \t\r\n" + STANDARD[100:] + "  ",
        "data:video/mp4;base64," + STANDARD,
        "DATA:application/octet-stream;name=x.mp4;BASE64," + URL_SAFE.rstrip("="),
        "data:;base64," + STANDARD,
    ],
    ids=["standard", "url-safe", "unpadded", "url-safe-unpadded", "line-breaks", "whitespace",
         "data-uri", "data-uri-params-upper", "data-uri-no-mime"],
)
def test_decode_base64_accepts_every_common_spelling(encoded):
    assert decode_base64(encoded, "video") == PAYLOAD


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   \n ",
        "=====",
        123,
        None,
        b"AAAA",
        "not base64 at all!",
        STANDARD[:-3] + "*" + STANDARD[-2:],  # one bad character
        STANDARD[:5],  # length 1 mod 4: truncated
        "AAAA=AAAA",  # padding in the middle
        "data:video/mp4," + STANDARD,  # a data URI that is not base64
    ],
    ids=["empty", "blank", "padding-only", "int", "none", "bytes", "garbage", "bad-char", "truncated",
         "inner-padding", "data-uri-not-base64"],
)
def test_decode_base64_rejects_bad_values_naming_the_field(value):
    with pytest.raises(RestoreError) as caught:
        decode_base64(value, "image")
    assert caught.value.code == INVALID_INPUT
    assert caught.value.message.startswith("image ")
    assert len(caught.value.message) < 300  # quotes an excerpt, never the whole value


@pytest.mark.parametrize("size", [DECODE_CHUNK_CHARS // 4 * 3 - 1, DECODE_CHUNK_CHARS // 4 * 3 + 1,
                                  DECODE_CHUNK_CHARS + 5])
def test_decode_base64_across_chunk_boundaries(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # whitespace shifts every boundary
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    for variant in (text, wrapped, urlsafe, "data:video/mp4;base64," + wrapped):
        assert decode_base64(variant, "media") == data


def test_decode_base64_checks_size_before_decoding():
    assert decode_base64(STANDARD, "video", max_bytes=len(PAYLOAD)) == PAYLOAD
    with pytest.raises(RestoreError) as caught:
        decode_base64(STANDARD + "*" * 10_000, "video", max_bytes=len(PAYLOAD))
    assert caught.value.code == INVALID_INPUT and "limit" in caught.value.message


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, ENCODE_CHUNK_BYTES - 1, ENCODE_CHUNK_BYTES, ENCODE_CHUNK_BYTES + 2,
                                  2 * ENCODE_CHUNK_BYTES + 1])
def test_encode_file_base64_equals_base64_of_the_whole_file(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    assert encode_file_base64(path) == base64.b64encode(data).decode("ascii")
    uri = encode_file_base64(path, "image/png")
    assert uri.startswith("data:image/png;base64,")
    if data:  # an empty payload is refused by decode_base64
        assert decode_base64(uri, "x") == data


# ----------------------------------------------------------------------------- sniffing

@pytest.mark.parametrize("name", VIDEO_CASES)
def test_sniff_recognises_video(video, name):
    kind = sniff_media(video(name).read_bytes())
    assert kind.kind == "video"
    assert kind.mime == VIDEO_CASES[name].mime
    assert "." + kind.extension == video(name).suffix


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_sniff_recognises_image(media_dir, name):
    path, _, _ = make_image(media_dir, name)
    kind = sniff_media(path.read_bytes())
    assert (kind.kind, kind.mime) == ("image", IMAGE_CASES[name][0])
    assert Path("x." + kind.extension).suffix in {path.suffix, ".jpg"}


@pytest.mark.parametrize("name", ["mp4_aac", "webm_vp9_opus", "ts_aac", "gif", "apng"])
def test_sniff_without_libmagic_falls_back_to_filetype(video, monkeypatch, name):
    expected = sniff_media(video(name).read_bytes())
    monkeypatch.setattr(payload, "magic", None)
    assert sniff_media(video(name).read_bytes()) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        b"just some text, certainly not a video\n" * 10,
        bytes(4096),
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x44\xac\x00\x00\x88\x58\x01\x00"
        b"\x02\x00\x10\x00data\x00\x00\x00\x00",
    ],
    ids=["pdf", "text", "zeros", "noise", "wav"],
)
def test_sniff_rejects_other_content_listing_accepted_formats(data):
    with pytest.raises(RestoreError) as caught:
        sniff_media(data)
    assert caught.value.code == UNSUPPORTED_MEDIA
    assert "mp4" in caught.value.message and "png" in caught.value.message


def test_sniff_rejects_audio_only_mp4(media_dir):
    with pytest.raises(RestoreError) as caught:
        sniff_media(make_audio_only(media_dir).read_bytes())
    assert caught.value.code == UNSUPPORTED_MEDIA


@pytest.mark.parametrize(
    "kind, media_type, fails",
    [
        ("video", None, False), ("video", "auto", False), ("video", "video", False),
        ("image", "image", False), ("video", "image", True), ("image", "video", True), ("image", "movie", True),
    ],
)
def test_check_forced_type_rejects_contradictions(kind, media_type, fails):
    media = MediaKind(kind, "video/mp4" if kind == "video" else "image/png", "mp4" if kind == "video" else "png")
    if not fails:
        check_forced_type(media, media_type)
        return
    with pytest.raises(RestoreError) as caught:
        check_forced_type(media, media_type)
    assert caught.value.code == INVALID_INPUT and caught.value.message.startswith("media_type")


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("name", IMAGE_CASES)
def test_read_image_gives_rgb_and_alpha(media_dir, name):
    path, expected_rgb, expected_alpha = make_image(media_dir, name)
    decoded = read_image(path)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == expected_rgb.shape
    error = np.abs(decoded.rgb.astype(int) - expected_rgb).max()
    assert error <= IMAGE_CASES[name][1], f"max error {error}"
    if expected_alpha is None:
        assert decoded.alpha is None
    else:
        assert decoded.alpha.dtype == np.uint8
        np.testing.assert_array_equal(decoded.alpha, expected_alpha)
    assert read_image(path.read_bytes()).rgb.shape == expected_rgb.shape  # bytes work like paths


def test_read_image_refuses_decompression_bombs_before_decoding(tmp_path):
    # A valid 1x1 PNG whose header claims 100000 x 100000 pixels.
    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    with pytest.raises(RestoreError) as caught:
        read_image(bytes(data), field="image")
    assert caught.value.code == INVALID_INPUT and "megapixels" in caught.value.message
    with pytest.raises(RestoreError):
        read_image(make_image(tmp_path, "rgba_png")[0], max_pixels=WIDTH * HEIGHT - 1)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_read_image_rejects_truncated_files(media_dir, cut):
    data = make_image(media_dir, "rgba_png")[0].read_bytes()
    with pytest.raises(RestoreError) as caught:
        read_image(data[: int(len(data) * cut)], field="image")
    assert caught.value.code == INVALID_INPUT and caught.value.message.startswith("image ")


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_write_image_puts_resized_alpha_back(tmp_path, fmt):
    rgb = np.repeat(np.repeat(base_rgb(), 2, axis=0), 2, axis=1)  # the output is twice the input size
    path = tmp_path / f"out.{fmt}"
    write_image(rgb, base_alpha(), path, format=fmt)
    with Image.open(path) as written:
        assert written.mode == "RGBA" and written.size == (2 * WIDTH, 2 * HEIGHT)
        alpha = np.asarray(written)[:, :, 3].astype(int)
        rgb_back = np.asarray(written)[:, :, :3].astype(int)
    expected = np.asarray(Image.fromarray(base_alpha()).resize((2 * WIDTH, 2 * HEIGHT), Image.Resampling.LANCZOS))
    assert np.abs(alpha - expected).max() <= (0 if fmt == "png" else 2)
    assert np.abs(rgb_back - rgb).mean() <= (0 if fmt == "png" else 3)


def test_write_image_jpeg_drops_alpha(tmp_path):
    path = tmp_path / "out.jpg"
    write_image(base_rgb(), base_alpha(), path, format="jpeg", quality=95)
    with Image.open(path) as written:
        assert (written.format, written.mode) == ("JPEG", "RGB")
        assert np.abs(np.asarray(written).astype(int) - base_rgb()).max() <= 8


def test_write_image_then_read_image_is_lossless_for_png(tmp_path):
    write_image(base_rgb(), None, tmp_path / "out.png")
    decoded = read_image(tmp_path / "out.png")
    np.testing.assert_array_equal(decoded.rgb, base_rgb())
    assert decoded.alpha is None


# ----------------------------------------------------------------------------- probing and decoding

@pytest.mark.parametrize("name", VIDEO_CASES)
def test_probe_reports_exact_rate_count_and_audio(video, name):
    case = VIDEO_CASES[name]
    info = probe_video(video(name))
    assert info.fps == case.fps and isinstance(info.fps, Fraction)
    assert info.frame_count == case.frame_count
    assert info.duration == pytest.approx(case.frame_count / case.fps)
    assert (info.has_audio, info.audio_codec) == (case.audio_codec is not None, case.audio_codec)
    assert info.rotation == case.rotation
    upright = (HEIGHT, WIDTH) if case.rotation % 180 == 90 else (WIDTH, HEIGHT)
    assert (info.width, info.height) == upright


@pytest.mark.parametrize("name", VIDEO_CASES)
def test_iter_frames_yields_every_frame_in_order(video, name):
    case = VIDEO_CASES[name]
    info = probe_video(video(name))
    frames = list(iter_frames(video(name), info))
    assert all(f.shape == (info.height, info.width, 3) and f.dtype == np.uint8 for f in frames)
    if case.rotation:
        # ffmpeg applies the display rotation: 90° counter-clockwise is np.rot90(k=1).
        assert np.abs(frames[1].astype(int) - np.rot90(pattern_frames(2)[1], k=1)).mean() < 4
        frames = [np.rot90(frame, k=-1) for frame in frames]
    assert_frames_follow_pattern(frames, case.frame_count)


def test_read_frames_returns_a_range_and_stops_ffmpeg(video):
    path = video("mkv_pcm")
    info = probe_video(path)
    frames = read_frames(path, info, start=3, count=4)
    assert frames.shape == (4, HEIGHT, WIDTH, 3)
    assert [closest_pattern_frame(f, info.frame_count)[0] for f in frames] == [3, 4, 5, 6]
    assert ffmpeg_children() == []


def test_iter_frames_closed_early_leaves_no_ffmpeg(video):
    frames = iter_frames(video("mp4_aac"), probe_video(video("mp4_aac")))
    next(frames)
    assert len(ffmpeg_children()) == 1
    frames.close()
    assert ffmpeg_children() == []


def test_iter_frames_rejects_a_truncated_video(tmp_path):
    faststart = ("-c:v", "libx264", "-movflags", "+faststart")  # the index first, the last packet last
    path = write_video(tmp_path / "whole.mp4", pattern_frames(12), Fraction(25), faststart)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[:-3])  # the last packet loses its last bytes
    info = probe_video(truncated)
    with pytest.raises(RestoreError) as caught:
        list(iter_frames(truncated, info, field="video"))
    assert caught.value.code == INVALID_INPUT and caught.value.message.startswith("video ")
    assert ffmpeg_children() == []


@pytest.mark.parametrize("content", ["garbage", "truncated-header", "audio-only"])
def test_probe_rejects_what_is_not_a_video(tmp_path, video, content):
    path = tmp_path / "input.mp4"
    if content == "garbage":
        path.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(500))
    elif content == "truncated-header":
        path.write_bytes(video("mp4_aac").read_bytes()[:300])
    else:
        path = make_audio_only(tmp_path)
    with pytest.raises(RestoreError) as caught:
        probe_video(path, field="video")
    assert caught.value.code == (UNSUPPORTED_MEDIA if content == "audio-only" else INVALID_INPUT)
    assert caught.value.message.startswith("video ")


# ----------------------------------------------------------------------------- writing

@pytest.mark.parametrize("name", AUDIO_CASES + ["mp4_silent", "gif_variable", "mov_rotated"])
def test_writer_round_trip_keeps_count_rate_order_and_audio(video, tmp_path, name):
    source = video(name)
    info = probe_video(source)
    output = tmp_path / "restored.mp4"
    audio_source = source if info.has_audio else None
    with VideoWriter(output, info.width, info.height, info.fps, audio_source=audio_source) as writer:
        for frame in iter_frames(source, info):
            writer.write(frame)
    assert writer.frames_written == info.frame_count
    written = probe_video(output)
    assert (written.frame_count, written.fps) == (info.frame_count, info.fps)
    assert (written.width, written.height, written.rotation) == (info.width, info.height, 0)
    expected_audio = None
    if info.has_audio:
        expected_audio = info.audio_codec if info.audio_codec in COPIED_INTO_MP4 else "aac"
    assert written.audio_codec == expected_audio
    if expected_audio:  # the source's audio lasts as long as its video, give or take a packet
        assert abs(float(packet_timing(output, 1).span) - info.duration) <= AUDIO_PACKET_SLACK_S
    frames = list(iter_frames(output, written))
    if VIDEO_CASES[name].rotation:
        frames = [np.rot90(frame, k=-1) for frame in frames]
    assert_frames_follow_pattern(frames, info.frame_count)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restored.mp4"]  # no intermediate left
    assert ffmpeg_children() == []


@pytest.mark.parametrize("audio_args", [("-c:a", "aac"), ("-c:a", "pcm_s16le")], ids=["copied", "re-encoded"])
@pytest.mark.parametrize("audio_seconds", [3.0, 0.1], ids=["longer-audio", "shorter-audio"])
def test_writer_keeps_the_audio_whole_and_every_video_frame(tmp_path, audio_args, audio_seconds):
    source = write_video(tmp_path / "source.mkv", pattern_frames(10), Fraction(25), audio_args=audio_args,
                         audio_seconds=audio_seconds)
    info = probe_video(source)
    with VideoWriter(tmp_path / "out.mp4", info.width, info.height, info.fps, audio_source=source) as writer:
        for frame in pattern_frames(info.frame_count):
            writer.write(frame)
    written = probe_video(tmp_path / "out.mp4")
    assert (written.frame_count, written.audio_codec) == (10, "aac")
    audio_span = float(packet_timing(tmp_path / "out.mp4", 1).span)
    assert abs(audio_span - audio_seconds) <= AUDIO_PACKET_SLACK_S  # never cut, never stretched


def test_writer_copies_audio_bit_exactly(video, tmp_path):
    source = video("mp4_aac")
    info = probe_video(source)
    with VideoWriter(tmp_path / "out.mp4", info.width, info.height, info.fps, audio_source=source) as writer:
        for frame in pattern_frames(info.frame_count):
            writer.write(frame)
    hashes = [
        subprocess.run([FFMPEG, "-v", "error", "-i", str(p), "-map", "0:a", "-c", "copy", "-f", "md5", "-"],
                       capture_output=True, text=True, check=True).stdout
        for p in (source, tmp_path / "out.mp4")
    ]
    assert hashes[0] == hashes[1] and hashes[0].startswith("MD5=")


@pytest.mark.parametrize(
    "fps",
    [Fraction(30000, 1001), Fraction(24000, 1001), Fraction(60000, 1001), Fraction(25), Fraction(25, 2),
     Fraction(400, 13)],  # 400/13: a GIF's average rate
    ids=str,
)
def test_writer_keeps_the_exact_rational_rate(tmp_path, fps):
    with VideoWriter(tmp_path / "out.mp4", WIDTH, HEIGHT, fps) as writer:
        for frame in pattern_frames(7):
            writer.write(frame)
    info = probe_video(tmp_path / "out.mp4")
    assert (info.fps, info.frame_count) == (fps, 7)


def test_writer_encodes_bt709_colours_faithfully(tmp_path):
    # Saturated colours: a BT.601/BT.709 mismatch between the conversion and the tags
    # moves them by 10-30 levels.
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (len(colours), HEIGHT, WIDTH, 3))
    with VideoWriter(tmp_path / "out.mp4", WIDTH, HEIGHT, Fraction(25)) as writer:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame))
    assert "yuv420p(tv, bt709, progressive)" in stream_line(tmp_path / "out.mp4", "Video")
    info = probe_video(tmp_path / "out.mp4")
    decoded = np.stack(list(iter_frames(tmp_path / "out.mp4", info))).astype(int)
    assert np.abs(decoded - frames).max() <= 4


def test_writer_pads_odd_sizes_by_repeating_the_edge(tmp_path):
    frames = pattern_frames(5, WIDTH - 1, HEIGHT - 1)
    with VideoWriter(tmp_path / "odd.mp4", WIDTH - 1, HEIGHT - 1, Fraction(24)) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.frame_count) == (WIDTH, HEIGHT, 5)
    decoded = np.stack(list(iter_frames(tmp_path / "odd.mp4", info))).astype(int)
    assert np.abs(decoded[:, :-1, :-1].mean(axis=(1, 2)) - frames.mean(axis=(1, 2))).max() <= PATTERN_TOLERANCE


def test_writer_kills_ffmpeg_when_the_block_fails(tmp_path, video):
    with pytest.raises(KeyError):
        with VideoWriter(tmp_path / "out.mp4", WIDTH, HEIGHT, Fraction(25), audio_source=video("mp4_aac")) as writer:
            writer.write(pattern_frames(1)[0])
            assert len(ffmpeg_children()) == 1
            raise KeyError("the model failed")
    assert ffmpeg_children() == []
    assert not (tmp_path / "out.video-only.mp4").exists()


def test_writer_reports_ffmpeg_failure_as_internal_with_stderr_in_log(tmp_path, caplog):
    missing_dir = tmp_path / "missing" / "out.mp4"
    with caplog.at_level(logging.ERROR), pytest.raises(RestoreError) as caught:
        with VideoWriter(missing_dir, WIDTH, HEIGHT, Fraction(25)) as writer:
            for frame in pattern_frames(8):
                writer.write(frame)
    assert caught.value.code == INTERNAL
    assert "No such file or directory" in caplog.text and "No such file" not in caught.value.message
    assert ffmpeg_children() == []


def test_writer_failing_to_mux_audio_is_internal_and_leaves_no_file(tmp_path, caplog):
    not_media = tmp_path / "audio.mp4"
    not_media.write_bytes(b"no audio in here" * 100)
    with caplog.at_level(logging.ERROR), pytest.raises(RestoreError) as caught:
        with VideoWriter(tmp_path / "out.mp4", WIDTH, HEIGHT, Fraction(25), audio_source=not_media) as writer:
            for frame in pattern_frames(3):
                writer.write(frame)
    assert caught.value.code == INTERNAL
    assert "Invalid data found" in caplog.text and "Invalid data" not in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.mp4"]
    assert ffmpeg_children() == []


def test_writer_rejects_frames_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError):
        with VideoWriter(tmp_path / "out.mp4", WIDTH, HEIGHT, Fraction(25)) as writer:
            writer.write(np.zeros((HEIGHT, WIDTH + 2, 3), np.uint8))
    assert ffmpeg_children() == []
