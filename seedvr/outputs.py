"""Restored media out: encode per the request's options, the before/after image, delivery.

A video is encoded while its frames arrive (`video_writer`), so a long clip is
never held whole; an image is written at once. Each result is then delivered
inline (base64 / data URI) or uploaded to the configured bucket.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seedvr.delivery import Delivered, deliver
from seedvr.media.compare import side_by_side
from seedvr.media.encoders import container_extension, container_for, container_mime
from seedvr.media.image import image_extension, image_mime, write_image
from seedvr.media.video import VideoWriter


@dataclass(frozen=True)
class OutputFile:
    path: Path
    mime: str


def video_writer(request, item, workdir: Path, width: int, height: int) -> tuple[VideoWriter, OutputFile]:
    """An open writer for item's restored frames, with the source's rate and audio."""
    container = container_for(request.codec, request.container)
    output = OutputFile(workdir / f"restored{item.index}.{container_extension(container)}", container_mime(container))
    audio = item.path if item.video.has_audio else None
    writer = VideoWriter(output.path, width, height, item.fps, audio_source=audio, codec=request.codec,
                         crf=request.crf, pix_fmt=request.pix_fmt, container=container)
    return writer, output


def write_restored_image(request, item, restored: np.ndarray, workdir: Path) -> OutputFile:
    """uint8 (H, W, 3) -> the requested image format; the input's alpha plane is resized and put back."""
    image = item.image
    output = OutputFile(workdir / f"restored{item.index}.{image_extension(request.format)}",
                        image_mime(request.format))
    write_image(restored, image.alpha, output.path, format=request.format, quality=request.quality)
    return output


def write_comparison(before: np.ndarray, after: np.ndarray, index: int, workdir: Path) -> OutputFile:
    """The input frame (resized) beside the restored one, as a PNG."""
    output = OutputFile(workdir / f"compare{index}.png", "image/png")
    write_image(side_by_side(before, after), None, output.path, format="png")
    return output


def deliver_output(request, output: OutputFile, job_id: str) -> Delivered:
    return deliver(output.path, mode=request.output_delivery, job_id=job_id, mime=output.mime,
                   return_data_uri=request.return_data_uri)
