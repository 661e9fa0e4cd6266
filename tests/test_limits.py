"""Honest limits: a result the answer cannot carry fails with OUTPUT_TOO_LARGE in the unit of the limit, an
answer that surely will not fit is warned of before the work, dropped transparency is warned of, and the
before/after picture shows transparency on a checkerboard."""

import base64
import io
import math
import re
import subprocess

import numpy as np
import pytest
from media_factory import FFMPEG, make_image
from PIL import Image

import handler
from seedvr import settings
from seedvr.errors import OUTPUT_TOO_LARGE, RestoreError
from seedvr.io.forecast import least_image_bytes, least_video_bytes
from seedvr.io.inputs import local_input
from seedvr.io.media.compare import CHECKER_COLOURS, side_by_side
from seedvr.io.media.encoders import CODECS
from seedvr.io.media.image import write_image
from seedvr.io.outputs import ImageEncoding, VideoEncoding
from seedvr.serving import jobs
from seedvr.serving.early_warnings import early_warnings
from seedvr.serving.schema import IMAGE_FORMATS, parse_request
from seedvr.serving.specs import restore_spec

SIZE_WARNING = "the results will not fit in the answer"
JPEG_ALPHA_WARNING = "the input's transparency is dropped: jpeg has no alpha; use png or webp"
SMALL_LIMIT = 3000  # bytes of base64: far under any restored 64x96 image, even at the low estimate (6144)


@pytest.fixture
def no_bucket(monkeypatch):
    for name in settings.BUCKET_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def restore(tiny_handler, **fields) -> dict:
    return tiny_handler({"id": "limits", "input": {"action": "restore", "res_h": 64, "res_w": 96, **fields}})


def test_an_oversized_result_fails_with_output_too_large_in_bytes_of_base64(tiny_handler, no_bucket, tmp_path,
                                                                           monkeypatch):
    image, _, _ = make_image(tmp_path, "jpeg")
    monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(SMALL_LIMIT))
    error = restore(tiny_handler, media=b64(image))["error"]

    assert error.startswith("OUTPUT_TOO_LARGE: the restored image of media is "), error
    found = re.search(r"is (\d+) bytes of base64 \(a (\d+)-byte file\)", error)
    assert found, error
    text_bytes, file_bytes = map(int, found.groups())
    assert text_bytes == 4 * math.ceil(file_bytes / 3) > SMALL_LIMIT  # the base64 length, compared as such
    assert f"below {SMALL_LIMIT} bytes of base64 (SEEDVR_BASE64_LIMIT_BYTES)" in error
    assert "BUCKET_ENDPOINT_URL" in error and "format jpeg or webp" in error

    monkeypatch.delenv("SEEDVR_BASE64_LIMIT_BYTES")
    assert restore(tiny_handler, media=b64(image))["success"] is True  # the worker serves the next job


@pytest.mark.parametrize("limit,warned", [(SMALL_LIMIT, True), (None, False)], ids=["large", "small"])
def test_a_result_too_large_for_the_answer_is_warned_of_in_the_first_progress_update(
        tiny_handler, no_bucket, tmp_path, monkeypatch, limit, warned):
    image, _, _ = make_image(tmp_path, "jpeg")
    if limit:
        monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(limit))
    updates: list[dict] = []
    request = parse_request({"action": "restore", "media": b64(image), "res_h": 64, "res_w": 96})
    context = jobs.JobContext("limits", updates.append)

    if warned:
        with pytest.raises(RestoreError) as caught:
            jobs.restore(request, context, handler.HOLDER)
        assert caught.value.code == OUTPUT_TOO_LARGE  # the warning was right
        (warning,) = updates[0]["warnings"]
        assert updates[0]["phase"] == "load_model" and updates[0]["frames_done"] == 0
        assert warning.startswith(SIZE_WARNING) and f"below {limit} bytes of base64" in warning
        assert all(update["warnings"] == [warning] for update in updates)  # /status shows the latest only
    else:
        answer = jobs.restore(request, context, handler.HOLDER)
        assert answer["success"] is True and "warnings" not in answer
        assert updates and not any("warnings" in update for update in updates)


def test_transparency_that_jpeg_drops_is_warned_of_and_png_keeps_it(tiny_handler, no_bucket, tmp_path):
    image, _, _ = make_image(tmp_path, "rgba_png")
    as_jpeg = restore(tiny_handler, media=b64(image), format="jpeg")
    assert as_jpeg["success"] is True and as_jpeg["warnings"] == [JPEG_ALPHA_WARNING]
    assert as_jpeg["warning"].startswith("random weights")  # the older single warning stays where it was

    as_png = restore(tiny_handler, media=b64(image))
    assert as_png["success"] is True and "warnings" not in as_png


def checker_square(height: int) -> int:
    return max(4, round(height / 48))


def test_compare_shows_transparent_pixels_over_a_checkerboard(tiny_handler, no_bucket, tmp_path):
    """Left half of the input fully transparent (storing pure red), right half opaque blue."""
    height, width = 64, 96
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[:, : width // 2] = (255, 0, 0, 0)
    rgba[:, width // 2:] = (0, 0, 255, 255)
    path = tmp_path / "half.png"
    Image.fromarray(rgba, "RGBA").save(path)

    output = restore(tiny_handler, media=b64(path), compare=True)
    assert output["resolution"] == f"{width}x{height}"
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(output["compare"][0]))).convert("RGB"))
    gap = picture.shape[1] - 2 * width
    square = checker_square(height)
    light, dark = (np.array(colour) for colour in CHECKER_COLOURS)
    rows, columns = np.mgrid[height // 2:height, 0:width // 2 - 8]  # transparent, away from the labels and the edge
    expected = np.where((((rows // square) + (columns // square)) % 2 == 0)[..., None], light, dark)
    for left in (0, width + gap):  # before, then the restored frame with the input's alpha
        half = picture[height // 2:, left:left + width // 2 - 8]
        assert np.array_equal(half, expected), f"half at x={left} does not show the checkerboard"
    before_opaque = picture[height // 2:, width // 2 + 8:width]
    assert np.all(before_opaque == (0, 0, 255))  # opaque pixels as they are


def test_side_by_side_composites_rgba_over_the_checkerboard_and_keeps_rgb_as_is():
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, 24:, 3] = 255
    rgba[:, 12:24, 3] = 128
    picture = side_by_side(rgba, rgba, gap=0, labels=False)
    square = checker_square(48)
    light, dark = CHECKER_COLOURS
    assert tuple(picture[0, 0]) == light and tuple(picture[0, square]) == dark
    assert tuple(picture[square, 0]) == dark and tuple(picture[square, square]) == light
    assert tuple(picture[0, 30]) == (10, 200, 30) and tuple(picture[0, 48 + 30]) == (10, 200, 30)
    under = light if (16 // square) % 2 == 0 else dark
    half = picture[0, 16]  # half transparent: halfway between the square under it and the colour
    assert np.allclose(half, (np.array(under) + (10, 200, 30)) / 2, atol=2)

    opaque = rgba[..., :3].copy()
    assert np.array_equal(side_by_side(opaque, opaque, gap=0, labels=False)[:, :48], opaque)


def make_alpha_video(path) -> None:
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red@0.5:s=64x48:d=0.2,format=rgba",
                    "-c:v", "png", str(path)], check=True, capture_output=True)


def warnings_for(path, monkeypatch, limit: int | None = None, **fields) -> list[str]:
    """The early warnings of a request for the file at `path` (no model needed: they come before the work)."""
    if limit:
        monkeypatch.setenv("SEEDVR_BASE64_LIMIT_BYTES", str(limit))
    spec = restore_spec(parse_request({"action": "restore", **fields}, media_required=False))
    item = local_input(path, spec.media)
    return early_warnings(spec, [item], jobs.sizes_of(spec, [item]))


def test_a_video_with_alpha_is_warned_that_the_output_is_opaque(tmp_path, monkeypatch, no_bucket):
    path = tmp_path / "alpha.mov"
    make_alpha_video(path)
    assert warnings_for(path, monkeypatch) == [
        "the input video's transparency (rgba) is dropped: restored videos are opaque"]


def test_the_size_warning_counts_videos_twice_and_respects_crf_and_delivery(tmp_path, monkeypatch, no_bucket):
    path = tmp_path / "alpha.mov"
    make_alpha_video(path)  # 5 frames, at the default 1280*720 area
    assert not any(SIZE_WARNING in text for text in warnings_for(path, monkeypatch))  # 15 MB
    assert any(SIZE_WARNING in text for text in warnings_for(path, monkeypatch, limit=5000))
    assert not any(SIZE_WARNING in text for text in warnings_for(path, monkeypatch, limit=5000, crf=51))
    assert not any(SIZE_WARNING in text for text in warnings_for(path, monkeypatch, limit=5000,
                                                                  output_delivery="url"))


def test_every_codec_and_image_format_has_a_size_floor():
    for codec in CODECS:
        assert least_video_bytes(VideoEncoding(codec), 1280, 720, 10) > 0, codec
    for image_format in IMAGE_FORMATS:
        assert least_image_bytes(ImageEncoding(image_format), 1280, 720) > 0, image_format


@pytest.mark.parametrize("image_format,quality", [("png", 95), ("jpeg", 95), ("jpeg", 40), ("jpeg", 5),
                                                  ("webp", 100), ("webp", 80), ("webp", 10)])
def test_image_size_floors_stay_under_real_encodes_of_textured_pictures(tmp_path, image_format, quality):
    """A picture with what restored frames have, smooth shading plus fine texture, costs more than its floor."""
    height, width = 256, 384
    y, x = np.mgrid[0:height, 0:width]
    shading = np.stack([120 + 80 * np.sin(x / 40), 100 + 60 * np.cos(y / 30), 90 + 50 * np.sin((x + y) / 50)], -1)
    texture = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    rgb = np.clip(np.rint(shading + texture), 0, 255).astype(np.uint8)
    path = tmp_path / f"picture.{image_format}"
    write_image(rgb, None, path, format=image_format, quality=quality)
    floor = least_image_bytes(ImageEncoding(image_format, quality), width, height)
    assert floor < path.stat().st_size, (floor, path.stat().st_size)


@pytest.mark.parametrize("crf", [18, 30, 45])
def test_h264_size_floors_stay_under_real_encodes_of_a_textured_still_clip(tmp_path, crf):
    """A still shot is the cheapest clip there is for an inter-frame codec: its floor still stays under it."""
    height, width, frames = 192, 320, 24
    y, x = np.mgrid[0:height, 0:width]
    shading = np.stack([120 + 80 * np.sin(x / 40), 100 + 60 * np.cos(y / 30), 90 + 50 * np.sin((x + y) / 50)], -1)
    rgb = np.clip(np.rint(shading + np.random.default_rng(0).normal(0, 4, shading.shape)), 0, 255).astype(np.uint8)
    path = tmp_path / "still.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                    "-r", "24", "-i", "-", "-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", str(path)],
                   input=rgb.tobytes() * frames, check=True, capture_output=True)
    floor = least_video_bytes(VideoEncoding("h264", crf), width, height, frames)
    assert floor < path.stat().st_size, (floor, path.stat().st_size)
