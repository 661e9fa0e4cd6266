"""Restored media out: encode per the request's options, the before/after image, delivery.

A video is encoded while its frames arrive (`video_writer`), so a long clip is
never held whole; an image is written at once. Each result is then delivered
inline (base64 / data URI) or uploaded to the configured bucket.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from seedvr.io.delivery import Delivered, DeliverySpec, InlineBudget, deliver
from seedvr.io.inputs import InputItem
from seedvr.io.media.compare import side_by_side
from seedvr.io.media.encoders import container_extension, container_for, container_mime
from seedvr.io.media.image import image_extension, image_mime, resized_alpha, write_image
from seedvr.io.media.interpolation import Retiming
from seedvr.io.media.writer import VideoWriter


@dataclass(frozen=True)
class VideoEncoding:
    codec: str = "h264"
    crf: int | None = None  # None: the codec's default
    pix_fmt: str = "yuv420p"
    container: str | None = None  # None: the codec's usual one


@dataclass(frozen=True)
class ImageEncoding:
    format: str = "png"
    quality: int = 95  # jpeg / webp


SMALLER_VIDEO = "a higher crf, a lower res_h/res_w or scale, or a shorter clip"
SMALLER_IMAGE = "format jpeg or webp with a lower quality, or a lower res_h/res_w or scale"
SMALLER_COMPARISON = "compare false, or a lower res_h/res_w or scale"


@dataclass(frozen=True)
class OutputFile:
    path: Path
    mime: str
    what: str = "the result"  # how an error names it, e.g. "the restored video of media[1]"
    smaller: str = SMALLER_IMAGE  # the request fields that make it smaller
    encoder: str | None = None  # the ffmpeg encoder that writes a video, e.g. "libx264" or "h264_nvenc"


def video_writer(encoding: VideoEncoding, item: InputItem, workdir: Path, width: int,
                 height: int, retiming: Retiming | None = None) -> tuple[VideoWriter, OutputFile]:
    """An open writer for item's restored frames, with the source's rate and audio; with `retiming`
    (interpolation), the rate and frame times of its frames instead (seedvr.io.media.interpolation)."""
    assert item.video is not None and item.fps is not None, "a video item carries its probe"
    fps, frame_times = item.fps, item.video.frame_times
    if retiming is not None:
        fps, frame_times = retiming.output_fps, retiming.frame_times(frame_times)
    container = container_for(encoding.codec, encoding.container)
    output = OutputFile(workdir / f"restored{item.index}.{container_extension(container)}", container_mime(container),
                        f"the restored video of {item.field}", SMALLER_VIDEO)
    audio = item.path if item.video.has_audio else None
    writer = VideoWriter(output.path, width, height, fps, audio_source=audio, codec=encoding.codec,
                         crf=encoding.crf, pix_fmt=encoding.pix_fmt, container=container,
                         frame_times=frame_times, color=item.video.color,
                         audio_window=(part.start, part.duration) if (part := item.video.part) else None)
    return writer, replace(output, encoder=writer.encoder)


def write_restored_image(encoding: ImageEncoding, item: InputItem, restored: np.ndarray,
                         workdir: Path) -> OutputFile:
    """uint8 (H, W, 3) -> the requested image format; the input's alpha plane is resized and put back."""
    assert item.image is not None, "an image item carries its decoded pixels"
    output = OutputFile(workdir / f"restored{item.index}.{image_extension(encoding.format)}",
                        image_mime(encoding.format), f"the restored image of {item.field}", SMALLER_IMAGE)
    write_image(restored, item.image.alpha, output.path, format=encoding.format, quality=encoding.quality)
    return output


def write_comparison(before: np.ndarray, after: np.ndarray, item: InputItem, workdir: Path) -> OutputFile:
    """The input frame (resized) beside the restored one, as a PNG. An image's transparency shows over a
    checkerboard, on both halves: the restored frame carries the input's alpha, as the restored file does."""
    output = OutputFile(workdir / f"compare{item.index}.png", "image/png",
                        f"the before/after picture of {item.field}", SMALLER_COMPARISON)
    alpha = item.image.alpha if item.image is not None else None
    if alpha is not None:
        before = np.dstack([before, alpha])
        after = np.dstack([after, resized_alpha(alpha, after.shape[1], after.shape[0])])
    write_image(side_by_side(before, after), None, output.path, format="png")
    return output


def deliver_output(spec: DeliverySpec, output: OutputFile, job_id: str, budget: InlineBudget | None = None,
                   copies: int = 1) -> Delivered:
    """`output` inline or as a URL (seedvr.io.delivery.deliver); `budget` is the job's, shared by its results."""
    return deliver(output.path, mode=spec.mode, job_id=job_id, mime=output.mime, return_data_uri=spec.return_data_uri,
                   budget=budget, copies=copies, what=output.what, smaller=output.smaller)
