"""The worker's actions: health, initialize, restore.

Data flows one way: request → validate (schema) → decode media → restore →
encode → respond. Everything that can be checked without the model (the
request, the media bytes, the output size) is checked before the model is
touched; every job works in its own temporary directory, removed on every path.
"""

import base64
import gc
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seedvr import loader, preprocess
from seedvr.errors import INVALID_INPUT, OUT_OF_MEMORY, RestoreError
from seedvr.media.image import read_image, write_image
from seedvr.media.payload import check_forced_type, decode_base64, sniff_media
from seedvr.media.video import VideoWriter, iter_frames, probe_video
from seedvr.model_holder import ModelHolder
from seedvr.models.attention import available_backends, resolve_backend

log = logging.getLogger(__name__)

HOLDER = ModelHolder()
RANDOM_WEIGHTS_WARNING = ("random weights (python -m seedvr.tiny): the output is noise; "
                          "this answer only proves the plumbing")


def _gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"cuda_available": False, "gpu_memory": 0, "gpu_name": None, "gpu_free_memory": 0, "gpu_count": 0}
    free, total = torch.cuda.mem_get_info()
    return {"cuda_available": True, "gpu_memory": total, "gpu_name": torch.cuda.get_device_name(),
            "gpu_free_memory": free, "gpu_count": torch.cuda.device_count()}


def _weight_files() -> dict:
    """Which weight files are present, per model; never opens them."""
    present = {}
    for model_type in loader.MODEL_TYPES:
        try:
            config = loader.load_config(model_type)
        except RestoreError:
            continue
        for variant in config.dit.checkpoints:
            files = loader.model_files(config, variant)
            present.update({str(path): path.is_file() for path in files.all()})
    return present


def health(request, job) -> dict:
    return {
        "status": "healthy",
        **HOLDER.describe(),
        **_gpu_facts(),
        "weights": _weight_files(),
        "attention_backends": available_backends(),
    }


def _check_model_options(request) -> None:
    """What the schema cannot know: what this machine can run."""
    try:
        resolve_backend(request.attention_backend)
    except ValueError as error:
        raise RestoreError(INVALID_INPUT, f"attention_backend: {error}") from None
    _check_sp_size(request.sp_size)


def _check_sp_size(sp_size: int) -> None:
    if sp_size > 1:
        raise RestoreError(INVALID_INPUT, f"sp_size {sp_size} asks for sequence parallelism, which this worker "
                                          f"build does not run yet; send sp_size 1")


def initialize(request, job) -> dict:
    _check_model_options(request)
    model = HOLDER.ensure(request.model_type, request.model_variant, request.attention_backend)
    answer = {
        "message": f"Model {model.model_type} ({model.variant}) initialized successfully",
        "model_type": model.model_type,
        "model_variant": model.variant,
        "sp_size": request.sp_size,
        "ready": True,
    }
    if model.random_weights:
        answer.update(random_weights=True, warning=RANDOM_WEIGHTS_WARNING)
    return answer


@dataclass
class InputMedia:
    kind: str                   # "video" | "image"
    path: Path
    frames: np.ndarray          # uint8 [T, H, W, 3]
    alpha: np.ndarray | None    # uint8 [H, W] for images with transparency
    video_info: object | None   # seedvr.media.video.VideoInfo for videos


def _decode_media(request, workdir: Path) -> InputMedia:
    data = decode_base64(request.media_value, request.media_field)
    sniffed = sniff_media(data)
    check_forced_type(sniffed, request.media_type)
    path = workdir / f"input.{sniffed.extension}"
    path.write_bytes(data)
    del data
    field = request.media_field
    if sniffed.kind == "image":
        image = read_image(path, field=field)
        return InputMedia("image", path, image.rgb[None], image.alpha, None)
    info = probe_video(path, field=field)
    frames = np.empty((info.frame_count, info.height, info.width, 3), dtype=np.uint8)
    for index, frame in enumerate(iter_frames(path, info, field=field)):
        frames[index] = frame
    return InputMedia("video", path, frames, None, info)


def _encode_output(media: InputMedia, restored: np.ndarray, workdir: Path) -> bytes:
    if media.kind == "image":
        path = workdir / "restored.png"
        write_image(restored[0], media.alpha, path, format="png")
        return path.read_bytes()
    path = workdir / "restored.mp4"
    height, width = restored.shape[1:3]
    audio = media.path if media.video_info.has_audio else None
    with VideoWriter(path, width, height, media.video_info.fps, audio_source=audio) as writer:
        for frame in restored:
            writer.write(frame)
    return path.read_bytes()


def _run_model(request, media: InputMedia, timings: dict):
    try:
        with HOLDER.use(request.model_type, request.model_variant, request.attention_backend) as model:
            started = time.perf_counter()
            restored = model.pipeline.restore(
                torch.from_numpy(media.frames), res_h=request.res_h, res_w=request.res_w, seed=request.seed,
                cfg_scale=request.cfg_scale, cfg_rescale=request.cfg_rescale, sample_steps=request.sample_steps,
                color_fix=request.color_fix, timings=timings)
            timings["restore"] = time.perf_counter() - started
            return model, restored.numpy()
    except torch.OutOfMemoryError as error:
        log.warning("CUDA out of memory: %s", error)
        gc.collect()
        torch.cuda.empty_cache()
        raise RestoreError(OUT_OF_MEMORY, "the GPU ran out of memory for this input; lower res_h/res_w, send a "
                                          "shorter clip or use seedvr2_3b") from None


def restore(request, job) -> dict:
    _check_model_options(request)
    timings = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seedvr-job-") as tmp:
        workdir = Path(tmp)
        media = _decode_media(request, workdir)
        timings["decode"] = time.perf_counter() - started
        frame_count, in_h, in_w = media.frames.shape[:3]
        out_h, out_w = preprocess.output_size(in_h, in_w, request.res_h, request.res_w)
        if out_h < 16 or out_w < 16:
            raise RestoreError(INVALID_INPUT, f"res_h·res_w gives a {out_w}x{out_h} output for this "
                                              f"{in_w}x{in_h} input; each side must be at least 16 pixels")

        model, restored = _run_model(request, media, timings)
        media.frames = None

        encode_started = time.perf_counter()
        encoded = base64.b64encode(_encode_output(media, restored, workdir)).decode("ascii")
        timings["encode"] = time.perf_counter() - encode_started
    timings["total"] = time.perf_counter() - started

    answer = {
        "success": True,
        "media": [encoded],
        "media_type": media.kind,
        "model_type": model.model_type,
        "model_variant": model.variant,
        "resolution": f"{restored.shape[2]}x{restored.shape[1]}",
        "processing_info": {
            "seed": request.seed,
            "cfg_scale": request.cfg_scale,
            "cfg_rescale": request.cfg_rescale,
            "sample_steps": request.sample_steps,
            "sequence_parallel_size": request.sp_size,
            "color_fix": request.color_fix,
            "input_resolution": f"{in_w}x{in_h}",
            "frames": frame_count,
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()},
        },
    }
    if media.kind == "video":
        answer["videos"] = answer["media"]
        answer["processing_info"]["fps"] = str(media.video_info.fps)
    if model.random_weights:
        answer.update(random_weights=True, warning=RANDOM_WEIGHTS_WARNING)
    return answer
