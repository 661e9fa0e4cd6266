"""The worker's actions: health, initialize, restore.

Data flows one way: request → validate (schema) → fetch/decode and probe every
item → restore → encode → deliver → respond. Everything that can be checked
without the model (the request, every item's bytes, every output size) is
checked before the model is touched; each job works in its own temporary
directory, removed on every path.
"""

import gc
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seedvr import loader, preprocess
from seedvr.delivery import Delivered
from seedvr.errors import INVALID_INPUT, OUT_OF_MEMORY, RestoreError
from seedvr.inputs import InputItem, gather_inputs
from seedvr.media.video import iter_frames
from seedvr.model_holder import ModelHolder
from seedvr.models.attention import available_backends, resolve_backend
from seedvr.outputs import deliver_output, video_writer, write_comparison, write_restored_image
from seedvr.progress import Progress, runpod_sink
from seedvr.schema import max_output_area

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
    if request.sp_size > 1:
        raise RestoreError(INVALID_INPUT, f"sp_size {request.sp_size} asks for sequence parallelism, which this "
                                          f"worker build does not run yet; send sp_size 1")


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


def target_resolution(request, height: int, width: int) -> tuple[int, int]:
    """The (res_h, res_w) whose area the official resize aims at, after `scale` and the caps."""
    if request.scale is not None:
        res_h, res_w = round(height * request.scale), round(width * request.scale)
    else:
        res_h, res_w = request.res_h, request.res_w
    cap_width, cap_height = request.max_resolution
    cap = min(cap_width * cap_height, max_output_area())
    if res_h * res_w > cap:
        shrink = math.sqrt(cap / (res_h * res_w))
        res_h, res_w = math.floor(res_h * shrink), math.floor(res_w * shrink)
    out_h, out_w = preprocess.output_size(height, width, max(res_h, 1), max(res_w, 1))
    if out_h < 16 or out_w < 16:
        raise RestoreError(INVALID_INPUT, f"the requested size gives a {out_w}x{out_h} output for this {width}x"
                                          f"{height} input; each side must be at least 16 pixels: raise res_h/res_w "
                                          f"or scale")
    return res_h, res_w


@dataclass
class ItemResult:
    kind: str
    width: int
    height: int
    delivered: Delivered
    compare: Delivered | None
    info: dict = field(default_factory=dict)


def _read_frames(item: InputItem) -> np.ndarray:
    """uint8 (T, H, W, 3): the image, or the video's frames decoded into one preallocated array."""
    if item.kind == "image":
        return item.image.rgb[None]
    frames = np.empty((item.frame_count, item.height, item.width, 3), dtype=np.uint8)
    for index, frame in enumerate(iter_frames(item.path, item.video, field=item.field)):
        frames[index] = frame
    return frames


def _encode(request, item: InputItem, restored: np.ndarray, workdir: Path):
    if item.kind == "image":
        return write_restored_image(request, item, restored[0], workdir)
    writer, output = video_writer(request, item, workdir, restored.shape[2], restored.shape[1])
    with writer:
        for frame in restored:
            writer.write(frame)
    return output


def _restore_item(model, request, item: InputItem, workdir: Path, progress: Progress, job_id: str) -> ItemResult:
    timings = {}
    started = time.perf_counter()
    progress.phase("decode")
    frames = _read_frames(item)
    timings["decode"] = time.perf_counter() - started
    res_h, res_w = target_resolution(request, item.height, item.width)
    restored = model.pipeline.restore(
        torch.from_numpy(frames), res_h=res_h, res_w=res_w, seed=request.seed, cfg_scale=request.cfg_scale,
        cfg_rescale=request.cfg_rescale, sample_steps=request.sample_steps, color_fix=request.color_fix,
        timings=timings, on_phase=progress.phase).numpy()
    progress.advance(item.frame_count)

    progress.phase("encode")
    encode_started = time.perf_counter()
    output = _encode(request, item, restored, workdir)
    middle = len(restored) // 2
    comparison = write_comparison(frames[middle], restored[middle], item.index, workdir) if request.compare else None
    timings["encode"] = time.perf_counter() - encode_started
    del frames

    progress.phase("deliver")
    deliver_started = time.perf_counter()
    delivered = deliver_output(request, output, job_id)
    compared = deliver_output(request, comparison, job_id) if comparison else None
    timings["deliver"] = time.perf_counter() - deliver_started
    info = {"input_resolution": f"{item.width}x{item.height}", "frames": item.frame_count,
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()}}
    if item.fps is not None:
        info["fps"] = str(item.fps)
    return ItemResult(item.kind, restored.shape[2], restored.shape[1], delivered, compared, info)


def _answer(request, model, results: list[ItemResult], total_s: float) -> dict:
    kinds = [result.kind for result in results]
    answer = {
        "success": True,
        "media": [r.delivered.value if r.delivered.kind == "base64" else None for r in results],
        "media_type": kinds[0] if len(set(kinds)) == 1 else "mixed",
        "model_type": model.model_type,
        "model_variant": model.variant,
        "resolution": f"{results[0].width}x{results[0].height}",
    }
    if any(r.delivered.kind == "url" for r in results):
        answer["media_urls"] = [r.delivered.value if r.delivered.kind == "url" else None for r in results]
    if set(kinds) == {"video"}:
        answer["videos"] = answer["media"]
    if len(results) > 1:
        answer["media_types"] = kinds
        answer["resolutions"] = [f"{r.width}x{r.height}" for r in results]
    if request.compare:
        answer["compare"] = [r.compare.value for r in results]
    info = {
        "seed": request.seed,
        "cfg_scale": request.cfg_scale,
        "cfg_rescale": request.cfg_rescale,
        "sample_steps": request.sample_steps,
        "sequence_parallel_size": request.sp_size,
        "color_fix": request.color_fix,
        "preset": request.preset,
    }
    if len(results) == 1:
        info.update(results[0].info)
        info["timings"]["total"] = round(total_s, 4)
    else:
        info["items"] = [r.info for r in results]
        info["timings"] = {"total": round(total_s, 4)}
    answer["processing_info"] = info
    if model.random_weights:
        answer.update(random_weights=True, warning=RANDOM_WEIGHTS_WARNING)
    return answer


def restore(request, job) -> dict:
    _check_model_options(request)
    started = time.perf_counter()
    job_id = str(job.get("id", "local"))
    with tempfile.TemporaryDirectory(prefix="seedvr-job-") as tmp:
        workdir = Path(tmp)
        items = gather_inputs(request, workdir)
        for item in items:  # every output size is checked before the model is touched
            target_resolution(request, item.height, item.width)
        progress = Progress(sum(item.frame_count for item in items), runpod_sink(job))
        progress.phase("load_model")
        try:
            with HOLDER.use(request.model_type, request.model_variant, request.attention_backend) as model:
                results = [_restore_item(model, request, item, workdir, progress, job_id) for item in items]
        except torch.OutOfMemoryError as error:
            log.warning("CUDA out of memory: %s", error)
            gc.collect()
            torch.cuda.empty_cache()
            raise RestoreError(OUT_OF_MEMORY, "the GPU ran out of memory for this input; lower res_h/res_w, send "
                                              "a shorter clip or use seedvr2_3b") from None
    return _answer(request, model, results, time.perf_counter() - started)
