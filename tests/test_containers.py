"""Inputs of old cameras, phones and discs: WMV/ASF, 3GP, M4V, F4V, MTS (M2TS) and DVD VOB are recognised from
their bytes, read frame by frame, and restored through the handler.

Every clip is made on the spot by tests/media_factory.py (LEGACY_CASES: 64x48, 5 frames, with the audio such
files usually carry). What sniffing must answer is written down here from the formats themselves.
"""

import base64
from pathlib import Path

import numpy as np
import pytest
from media_factory import LEGACY_CASES, closest_pattern_frame, ffmpeg_children, make_legacy_video

from seedvr.errors import UNSUPPORTED_MEDIA, RestoreError
from seedvr.io.media import payload
from seedvr.io.media.payload import ACCEPTED, sniff_media
from seedvr.io.media.video import iter_frames, probe_video

PATTERN_TOLERANCE = 8.0  # largest mean-colour error of a frame after lossy codecs
# name -> (MIME type, extension of a temp file holding the bytes, the codec ffmpeg reads the video as)
EXPECTED = {
    "wmv_wmav2": ("video/x-ms-asf", "wmv", "wmv2"),
    "3gp_amr": ("video/3gpp", "3gp", "mpeg4"),
    "m4v_aac": ("video/x-m4v", "m4v", "h264"),
    "f4v_aac": ("video/x-f4v", "f4v", "h264"),
    "mts_ac3": ("video/mp2t", "m2ts", "h264"),  # 192-byte packets: ffmpeg does not care about the suffix
    "vob_mp2": ("video/mpeg", "mpg", "mpeg2video"),
}
# mp4 (the default output) keeps AAC and AC-3 as they are and re-encodes the rest to AAC.
RESTORED_AUDIO = {"wmav2": "aac", "amr_nb": "aac", "aac": "aac", "ac3": "ac3", "mp2": "aac"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The path of a LEGACY_CASES entry, made once per module."""
    directory, made = tmp_path_factory.mktemp("legacy"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_legacy_video(directory, name)
        return made[name]

    return get


@pytest.mark.parametrize("name", LEGACY_CASES)
def test_sniff_tells_each_legacy_container_with_and_without_libmagic(clip, monkeypatch, name):
    data = clip(name).read_bytes()
    mime, extension, _ = EXPECTED[name]
    assert sniff_media(data) == payload.MediaKind("video", mime, extension)
    monkeypatch.setattr(payload, "magic", None)  # `filetype` and the byte checks alone
    assert sniff_media(data) == payload.MediaKind("video", mime, extension)


def test_sniff_tells_m2ts_from_ts_by_packet_size(clip):
    m2ts = clip("mts_ac3").read_bytes()
    assert m2ts[4] == m2ts[4 + 192] == 0x47 and m2ts[0] != 0x47  # a 4-byte timecode, then the sync byte
    ts = b"".join(m2ts[start:start + 188] for start in range(4, len(m2ts), 192))  # the timecodes dropped
    assert sniff_media(ts) == payload.MediaKind("video", "video/mp2t", "ts")


def test_sniff_rejects_a_damaged_m2ts(clip):
    m2ts = bytearray(clip("mts_ac3").read_bytes())
    m2ts[4 + 2 * 192] = 0x00  # the third packet's sync byte
    with pytest.raises(RestoreError) as caught:
        sniff_media(bytes(m2ts))
    assert caught.value.code == UNSUPPORTED_MEDIA


def test_accepted_names_every_container():
    for name in ("wmv", "asf", "3gp", "3g2", "m4v", "f4v", "mts", "m2ts", "vob", "mp4", "mov", "mkv", "webm"):
        assert name in ACCEPTED, name


@pytest.mark.parametrize("name", LEGACY_CASES)
def test_legacy_containers_read_every_frame_in_order(clip, name):
    case, (_, _, codec) = LEGACY_CASES[name], EXPECTED[name]
    info = probe_video(clip(name))
    assert (info.codec, info.width, info.height) == (codec, 64, 48)
    assert (info.frame_count, info.fps, info.audio_codec) == (case.frame_count, case.fps, case.audio_codec)
    frames = list(iter_frames(clip(name), info))
    assert len(frames) == case.frame_count
    for index, frame in enumerate(frames):
        closest, distance = closest_pattern_frame(frame, case.frame_count)
        assert (closest, index) == (index, index) and distance <= PATTERN_TOLERANCE, (index, closest, distance)
    assert ffmpeg_children() == []


@pytest.mark.slow
@pytest.mark.parametrize("name", LEGACY_CASES)
def test_legacy_containers_restore_through_the_handler(tiny_handler, clip, tmp_path, name):
    case = LEGACY_CASES[name]
    media = base64.b64encode(clip(name).read_bytes()).decode()
    answer = tiny_handler({"id": name, "input": {"action": "restore", "media": media, "res_h": 32, "res_w": 48}})
    assert "error" not in answer, answer
    assert answer["media_type"] == "video"
    out = tmp_path / "restored.mp4"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    info = probe_video(out)
    assert (info.codec, info.frame_count, info.fps) == ("h264", case.frame_count, case.fps)
    assert info.audio_codec == RESTORED_AUDIO[case.audio_codec]
    assert answer["resolution"] == f"{info.width}x{info.height}"
    frames = np.stack(list(iter_frames(out, info)))
    assert frames.std() > 0  # the random-weight model still draws something, not a blank
