"""Test media made on the spot: videos with the bundled ffmpeg, images with Pillow.

Video frame i is a solid colour `FRAME_COLOURS[i]` (the colours are far apart) with
a white square whose position moves with i, so the order of frames survives lossy
codecs and can be checked from their mean colours (`closest_pattern_frame`).
Every case states what it holds (rate, frame count, audio codec), written down
here independently of the code under test.

    path = make_video(tmp_path, "mp4_aac")
    path, rgb, alpha = make_image(tmp_path, "rgba_png")
"""

import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
WIDTH, HEIGHT = 64, 48
SQUARE = 8  # side of the white marker square, in pixels
FRAME_COLOURS = np.array(
    [
        [200, 40, 40], [40, 170, 40], [40, 60, 200], [210, 200, 50],
        [50, 190, 200], [190, 60, 190], [120, 120, 120], [240, 140, 30],
        [30, 90, 60], [150, 210, 120], [90, 40, 120], [230, 230, 230],
        [20, 20, 20], [130, 80, 40], [100, 150, 230], [220, 120, 160],
    ],
    dtype=np.uint8,
)


def pattern_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """uint8 (height, width, 3): colour FRAME_COLOURS[index], white square at a spot set by index."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = FRAME_COLOURS[index % len(FRAME_COLOURS)]
    column = (index * SQUARE) % max(width - SQUARE, 1)
    row = (index * SQUARE // 2) % max(height - SQUARE, 1)
    frame[row:row + SQUARE, column:column + SQUARE] = 255
    return frame


def pattern_frames(count: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.stack([pattern_frame(i, width, height) for i in range(count)])


def closest_pattern_frame(frame: np.ndarray, count: int) -> tuple[int, float]:
    """(index of the pattern frame whose mean colour is nearest, distance to it)."""
    means = pattern_frames(count, frame.shape[1], frame.shape[0]).reshape(count, -1, 3).mean(axis=1)
    distances = np.abs(means - frame.reshape(-1, 3).mean(axis=0)).max(axis=1)
    return int(distances.argmin()), float(distances.min())


@dataclass(frozen=True)
class VideoCase:
    file_name: str
    mime: str  # what sniffing must say
    fps: Fraction
    frame_count: int
    video_args: tuple[str, ...]  # encoder and muxer options; empty for Pillow-made GIFs
    audio_codec: str | None = None  # as ffmpeg names it in the file
    audio_args: tuple[str, ...] = ()
    frame_delays_ms: tuple[int, ...] | None = None  # a GIF written by Pillow with these delays
    rotation: int = 0  # display rotation (degrees, counter-clockwise) set after encoding


H264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p")
VIDEO_CASES = {
    "mp4_aac": VideoCase("clip.mp4", "video/mp4", Fraction(30000, 1001), 9, H264, "aac", ("-c:a", "aac")),
    "mp4_silent": VideoCase("silent.mp4", "video/mp4", Fraction(25), 8, H264),
    "webm_vp9_opus": VideoCase(
        "clip.webm", "video/webm", Fraction(24000, 1001), 7, ("-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p"),
        "opus", ("-c:a", "libopus"),
    ),
    "mkv_pcm": VideoCase(
        "clip.mkv", "video/x-matroska", Fraction(30000, 1001), 10, H264, "pcm_s16le", ("-c:a", "pcm_s16le")
    ),
    "avi_pcm": VideoCase(
        "clip.avi", "video/x-msvideo", Fraction(15), 6, ("-c:v", "mpeg4", "-q:v", "2"),
        "pcm_s16le", ("-c:a", "pcm_s16le"),
    ),
    "mov_mp3": VideoCase("clip.mov", "video/quicktime", Fraction(24), 8, H264, "mp3", ("-c:a", "libmp3lame")),
    "flv_aac": VideoCase(
        "clip.flv", "video/x-flv", Fraction(12), 6, ("-c:v", "flv", "-q:v", "2"), "aac", ("-c:a", "aac")
    ),
    "ts_aac": VideoCase(
        "clip.ts", "video/mp2t", Fraction(25), 8, ("-c:v", "mpeg2video", "-q:v", "2", "-f", "mpegts"),
        "aac", ("-c:a", "aac"),
    ),
    "mpeg_ps_mp2": VideoCase(
        "clip.mpg", "video/mpeg", Fraction(25), 8, ("-c:v", "mpeg2video", "-q:v", "2", "-f", "mpeg"),
        "mp2", ("-c:a", "mp2"),
    ),
    "gif": VideoCase("clip.gif", "image/gif", Fraction(10), 6, ("-f", "gif")),
    # Delays 40, 60, 40, 60, 40, 60 ms: 6 frames in 0.3 s, an average of 20 fps.
    "gif_variable": VideoCase("variable.gif", "image/gif", Fraction(20), 6, (), frame_delays_ms=(40, 60) * 3),
    "apng": VideoCase("clip.png", "image/apng", Fraction(10), 5, ("-f", "apng", "-plays", "0")),
    "webp_animated": VideoCase(
        "clip.webp", "image/webp", Fraction(10), 5, ("-c:v", "libwebp", "-lossless", "1", "-loop", "0")
    ),
    "mov_rotated": VideoCase("rotated.mov", "video/quicktime", Fraction(30), 6, H264, rotation=90),
}


# Containers of old cameras, phones and discs, each with the audio it usually carries. They are kept out of
# VIDEO_CASES (every test over those runs on them); tests/test_containers.py reads them.
LEGACY_CASES = {
    "wmv_wmav2": VideoCase(
        "clip.wmv", "video/x-ms-asf", Fraction(25), 5, ("-c:v", "wmv2", "-q:v", "3", "-f", "asf"),
        "wmav2", ("-c:a", "wmav2"),
    ),
    "3gp_amr": VideoCase(  # a phone: MPEG-4 Part 2 video, AMR-NB speech audio (8 kHz mono)
        "clip.3gp", "video/3gpp", Fraction(15), 5, ("-c:v", "mpeg4", "-q:v", "3", "-f", "3gp"),
        "amr_nb", ("-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1"),
    ),
    "m4v_aac": VideoCase(  # iTunes video: the ipod muxer writes the "M4V " brand
        "clip.m4v", "video/x-m4v", Fraction(30000, 1001), 5, H264 + ("-f", "ipod"), "aac", ("-c:a", "aac"),
    ),
    "f4v_aac": VideoCase("clip.f4v", "video/x-f4v", Fraction(24), 5, H264 + ("-f", "f4v"), "aac", ("-c:a", "aac")),
    "mts_ac3": VideoCase(  # AVCHD camcorder: MPEG-TS in 192-byte packets (a 4-byte timecode before each)
        "clip.mts", "video/mp2t", Fraction(30000, 1001), 5, H264 + ("-f", "mpegts", "-mpegts_m2ts_mode", "1"),
        "ac3", ("-c:a", "ac3"),
    ),
    "vob_mp2": VideoCase(  # DVD: MPEG-2 program stream
        "clip.vob", "video/mpeg", Fraction(25), 5, ("-c:v", "mpeg2video", "-q:v", "2", "-f", "vob"),
        "mp2", ("-c:a", "mp2"),
    ),
}


def make_legacy_video(directory: Path, name: str) -> Path:
    """Write LEGACY_CASES[name] (64x48 pattern frames, a tone as audio) into `directory`; return its path."""
    case = LEGACY_CASES[name]
    frames = pattern_frames(case.frame_count)
    return write_video(Path(directory) / case.file_name, frames, case.fps, case.video_args, case.audio_args)


def make_video(directory: Path, name: str) -> Path:
    """Write VIDEO_CASES[name] into `directory` and return its path."""
    case = VIDEO_CASES[name]
    path = Path(directory) / case.file_name
    frames = pattern_frames(case.frame_count)
    if case.frame_delays_ms is not None:
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=list(case.frame_delays_ms), loop=0)
        return path
    target = path.with_name("unrotated" + path.suffix) if case.rotation else path
    write_video(target, frames, case.fps, case.video_args, case.audio_args)
    if case.rotation:
        _ffmpeg("-display_rotation:v:0", str(case.rotation), "-i", str(target), "-c", "copy", str(path))
        target.unlink()
    return path


def write_video(
    path: Path, frames: np.ndarray, fps: Fraction, video_args=H264, audio_args=(), audio_seconds: float | None = None
) -> Path:
    """Encode uint8 frames (n, h, w, 3) with ffmpeg; a 440 Hz tone as audio when `audio_args` are given."""
    count, height, width, _ = frames.shape
    inputs = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
              "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]
    maps = ["-map", "0:v"]
    if audio_args:
        seconds = audio_seconds if audio_seconds is not None else float(count / fps)
        inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds:.4f}"]
        maps += ["-map", "1:a"]
    _ffmpeg(*inputs, *maps, *video_args, *audio_args, str(path), stdin=frames.tobytes())
    return path


def make_audio_only(directory: Path) -> Path:
    """An .m4a holding AAC audio and no video."""
    path = Path(directory) / "audio.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=0.3", "-c:a", "aac", str(path))
    return path


def ffmpeg_children() -> list[int]:
    """ffmpeg processes (zombies included) whose parent is this test process."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == os.getpid() and "ffmpeg" in name:
            children.append(int(entry.name))
    return children


def stream_line(path: Path, kind: str) -> str:
    """The line `ffmpeg -i` prints for the first stream of `kind` ("Video", "Audio")."""
    listing = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return next(line for line in listing.splitlines() if f": {kind}: " in line)


# ----------------------------------------------------------------------------- images

IMAGE_CASES = {  # name -> (mime, largest error allowed per channel: 0 for lossless files)
    "rgba_png": ("image/png", 0),
    "gray_png": ("image/png", 0),
    "gray_alpha_png": ("image/png", 0),
    "palette_png": ("image/png", 0),
    "palette_transparent_png": ("image/png", 0),
    "png_16bit": ("image/png", 0),
    "jpeg": ("image/jpeg", 8),
    "cmyk_jpeg": ("image/jpeg", 8),
    "jpeg_exif_rotated": ("image/jpeg", 8),
    "webp": ("image/webp", 0),
    "webp_alpha": ("image/webp", 0),
    "bmp": ("image/bmp", 0),
    "tiff": ("image/tiff", 0),
    "gif_single": ("image/gif", 0),
}
PALETTE = np.array([[10, 20, 30], [200, 40, 60], [30, 220, 90], [250, 250, 240]], dtype=np.uint8)


def base_rgb(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A smooth, asymmetric uint8 (height, width, 3) gradient."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) % 256], axis=-1).astype(np.uint8)


def base_alpha(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def make_image(directory: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray | None]:
    """Write IMAGE_CASES[name]; return (path, the RGB it must read as, the alpha or None)."""
    directory = Path(directory)
    rgb, alpha = base_rgb(), base_alpha()
    grey = rgb[:, :, 0]
    as_rgb = lambda plane: np.repeat(plane[:, :, None], 3, axis=2)  # noqa: E731
    indices = (np.add.outer(np.arange(HEIGHT) // 12, np.arange(WIDTH) // 16) % len(PALETTE)).astype(np.uint8)
    match name:
        case "rgba_png":
            return _save(directory / "rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), rgb, alpha
        case "gray_png":
            return _save(directory / "gray.png", Image.fromarray(grey, "L")), as_rgb(grey), None
        case "gray_alpha_png":
            image = Image.fromarray(np.dstack([grey, alpha]), "LA")
            return _save(directory / "gray_alpha.png", image), as_rgb(grey), alpha
        case "palette_png" | "palette_transparent_png":
            image = Image.fromarray(indices, "P")
            image.putpalette(PALETTE.flatten().tolist())
            if name == "palette_png":
                return _save(directory / "palette.png", image), PALETTE[indices], None
            image.info["transparency"] = 2  # palette entry 2 is fully transparent
            path = directory / "palette_transparent.png"
            image.save(path, transparency=2)
            return path, PALETTE[indices], np.where(indices == 2, 0, 255).astype(np.uint8)
        case "png_16bit":
            # 16-bit samples v*257 + 100 read back as round(sample / 257) = v.
            samples = grey.astype(np.uint16) * 257 + np.where(grey < 255, 100, 0).astype(np.uint16)
            return _save(directory / "gray16.png", Image.fromarray(samples)), as_rgb(grey), None
        case "jpeg":
            return _save(directory / "photo.jpg", Image.fromarray(rgb), quality=95), rgb, None
        case "cmyk_jpeg":
            return _save(directory / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95), rgb, None
        case "jpeg_exif_rotated":
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation 6: the stored pixels must be turned 90° clockwise to display
            path = _save(directory / "rotated.jpg", Image.fromarray(rgb), quality=95, exif=exif)
            return path, np.ascontiguousarray(np.rot90(rgb, k=-1)), None
        case "webp":
            return _save(directory / "image.webp", Image.fromarray(rgb), lossless=True), rgb, None
        case "webp_alpha":
            image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
            return _save(directory / "alpha.webp", image, lossless=True, exact=True), rgb, alpha
        case "bmp":
            return _save(directory / "image.bmp", Image.fromarray(rgb)), rgb, None
        case "tiff":
            return _save(directory / "image.tiff", Image.fromarray(rgb)), rgb, None
        case "gif_single":
            image = Image.fromarray(indices, "P")
            image.putpalette(PALETTE.flatten().tolist())
            return _save(directory / "still.gif", image), PALETTE[indices], None
    raise KeyError(name)


def _save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def _ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    command = [FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y", *args]
    completed = subprocess.run(command, input=stdin, capture_output=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {' '.join(args)}\n{completed.stderr.decode(errors='replace')}")
