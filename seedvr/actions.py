"""The worker's actions: health, initialize, restore.

Data flows one way: request → validate (schema) → fetch/decode and probe every
item → restore → encode → deliver → respond. Everything that can be checked
without the model (the request, every item's bytes, every output size) is
checked before the model is touched; each job works in its own temporary
directory, removed on every path.
"""

import gc
import itertools
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seedvr import chunking, loader, memory_plan, preprocess
from seedvr.delivery import Delivered
from seedvr.errors import INVALID_INPUT, OUT_OF_MEMORY, RestoreError
from seedvr.inputs import InputItem, gather_inputs
from seedvr.media.video import iter_frames
from seedvr.model_holder import ModelHolder
from seedvr.models.attention import available_backends, resolve_backend
from seedvr.outputs import OutputFile, deliver_output, video_writer, write_comparison, write_restored_image
from seedvr.progress import Progress, runpod_sink
from seedvr.schema import MODEL_TYPES, max_output_area

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
    for model_type in MODEL_TYPES:
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


def check_model_options(request) -> None:
    """What the schema cannot know: what this machine can run."""
    try:
        resolve_backend(request.attention_backend)
    except ValueError as error:
        raise RestoreError(INVALID_INPUT, f"attention_backend: {error}") from None
    gpus = torch.cuda.device_count()
    if request.sp_size > 1 and torch.cuda.is_available() and gpus < request.sp_size:
        raise RestoreError(INVALID_INPUT, f"sp_size {request.sp_size} needs {request.sp_size} GPUs; this worker "
                                          f"sees {gpus}: send sp_size {gpus} or less (a divisor of the heads)")


def initialize(request, job) -> dict:
    check_model_options(request)
    model = HOLDER.ensure(request.model_type, request.model_variant, request.attention_backend, request.sp_size)
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
    """One restored item, encoded in the job's folder; `delivered`/`compared` are set by delivery."""

    kind: str
    width: int
    height: int
    output: OutputFile
    comparison: OutputFile | None
    info: dict = field(default_factory=dict)
    delivered: Delivered | None = None
    compared: Delivered | None = None


def _source(item: InputItem, timings: dict, keep_index: int, kept: list) -> Iterator[np.ndarray]:
    """The item's frames, decoded as they are asked for (the time it takes goes to timings["decode"]);
    a copy of frame `keep_index` is appended to `kept`."""
    frames = iter([item.image.rgb]) if item.kind == "image" else iter_frames(item.path, item.video, field=item.field)
    try:
        for index in itertools.count():
            started = time.perf_counter()
            frame = next(frames, None)
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
            if frame is None:
                return
            if index == keep_index:
                kept.append(frame.copy())
            yield frame
    finally:
        if hasattr(frames, "close"):
            frames.close()  # stops the decoder when a failed attempt leaves early


def _run_plan(model, request, item: InputItem, plan: memory_plan.MemoryPlan, guess: memory_plan.Estimate,
              resolution: tuple[int, int], workdir: Path, progress: Progress, timings: dict):
    """Restore and encode one item under `plan`, frames streaming from the decoder through the model into
    the encoder. Returns (output file, comparison file or None)."""
    model.pipeline.apply_plan(plan)
    out_h, out_w = preprocess.output_size(item.height, item.width, *resolution)
    middle, before, after = item.frame_count // 2, [], None
    encoding = False  # whether the "encode" phase was reported since the model's last phase

    def on_phase(name: str) -> None:
        nonlocal encoding
        progress.phase(name)
        encoding = False
        memory_plan.check_simulated(guess, name)

    progress.phase("decode")

    restored = chunking.restore_clip(
        model.pipeline, _source(item, timings, middle, before), item.frame_count, chunk_frames=plan.chunk_frames,
        overlap=plan.chunk_overlap, res_h=resolution[0], res_w=resolution[1], seed=request.seed,
        cfg_scale=request.cfg_scale, cfg_rescale=request.cfg_rescale, sample_steps=request.sample_steps,
        color_fix=request.color_fix, timings=timings, on_phase=on_phase,
        on_chunk=lambda index, chunk: memory_plan.trim_host_memory())
    if item.kind == "image":
        (after,) = restored
        progress.phase("encode")
        started = time.perf_counter()
        output = write_restored_image(request, item, after, workdir)
        timings["encode"] = time.perf_counter() - started
        progress.advance(1)
    else:
        writer, output = video_writer(request, item, workdir, out_w, out_h)
        with writer:
            for index, frame in enumerate(restored):
                if not encoding:
                    progress.phase("encode")
                    encoding = True
                started = time.perf_counter()
                writer.write(frame)
                if index == middle:
                    after = frame.copy()
                timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - started
                progress.advance(1)
            started = time.perf_counter()
        timings["encode"] += time.perf_counter() - started  # flushing the encoder, muxing the audio
    comparison = write_comparison(before[0], after, item.index, workdir) if request.compare else None
    return output, comparison


def _out_of_memory(run) -> tuple[object, str | None]:
    """(run(), None), or (None, the first line of the error) after a CUDA out-of-memory error. Only the text
    leaves: the exception and its traceback, which hold the failed attempt's tensors, die here."""
    try:
        return run(), None
    except torch.OutOfMemoryError as error:
        return None, str(error).strip().splitlines()[0][:300]


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def restore_item(model, request, item: InputItem, workdir: Path, progress: Progress) -> ItemResult:
    """Plan, restore with retries on CUDA out-of-memory (each with a smaller plan), encode into workdir."""
    timings = {}
    resolution = target_resolution(request, item.height, item.width)
    out_h, out_w = preprocess.output_size(item.height, item.width, *resolution)
    clip = (item.frame_count, (item.height, item.width), (out_h, out_w))
    footprint = memory_plan.Footprint.of(model.pipeline)
    wishes = memory_plan.Wishes.of(request)
    budget = memory_plan.available_memory(model.pipeline)
    plan, guess = memory_plan.choose(footprint, budget, *clip, wishes)
    retries, frames_before = [], progress.frames_done
    while True:
        files, failure = _out_of_memory(
            lambda: _run_plan(model, request, item, plan, guess, resolution, workdir, progress, timings))
        if failure is None:
            break
        _free_device_memory()  # the failed attempt's tensors are unreachable now
        log.warning("out of memory with plan %s: %s", plan, failure)
        retries.append({"plan": plan.describe(), "estimated_peak_bytes": guess.peak, "error": failure})
        progress.frames_done = frames_before  # the item starts over
        budget = memory_plan.available_memory(model.pipeline)
        retry = memory_plan.smaller(guess, footprint, budget, *clip, wishes)
        if retry is None or len(retries) > memory_plan.MAX_RETRIES:
            raise RestoreError(OUT_OF_MEMORY, memory_plan.out_of_memory_message(
                footprint, budget, guess, *clip, wishes, on_gpu=model.pipeline.device.type == "cuda"))
        plan, guess = retry
    output, comparison = files
    chunks = len(chunking.plan_chunks(item.frame_count, plan.chunk_frames, plan.chunk_overlap))
    info = {"input_resolution": f"{item.width}x{item.height}", "frames": item.frame_count,
            "plan": {**plan.describe(), "chunks": chunks, "estimated_peak_bytes": guess.peak,
                     "memory_budget_bytes": budget, "fits": guess.peak <= budget},
            "retries": retries,
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()}}
    if item.fps is not None:
        info["fps"] = str(item.fps)
    return ItemResult(item.kind, out_w, out_h, output, comparison, info)


def _deliver(request, result: ItemResult, job_id: str, progress: Progress) -> ItemResult:
    progress.phase("deliver")
    started = time.perf_counter()
    result.delivered = deliver_output(request, result.output, job_id)
    if result.comparison is not None:
        result.compared = deliver_output(request, result.comparison, job_id)
    result.info["timings"]["deliver"] = round(time.perf_counter() - started, 4)
    return result


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
        answer["compare"] = [r.compared.value for r in results]
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
    check_model_options(request)
    started = time.perf_counter()
    job_id = str(job.get("id", "local"))
    with tempfile.TemporaryDirectory(prefix="seedvr-job-") as tmp:
        workdir = Path(tmp)
        items = gather_inputs(request, workdir)
        for item in items:  # every output size is checked before the model is touched
            target_resolution(request, item.height, item.width)
        progress = Progress(sum(item.frame_count for item in items), runpod_sink(job))
        progress.phase("load_model")

        def run_items():
            with HOLDER.use(request.model_type, request.model_variant, request.attention_backend,
                            request.sp_size) as model:
                return model, [_deliver(request, restore_item(model, request, item, workdir, progress), job_id,
                                        progress) for item in items]

        done, failure = _out_of_memory(run_items)  # an item's own retries are spent, or loading failed
        if failure is not None:
            _free_device_memory()
            log.warning("CUDA out of memory outside the memory plan: %s", failure)
            raise RestoreError(OUT_OF_MEMORY, "the GPU ran out of memory for this input; lower res_h/res_w, send "
                                              "a shorter clip or use seedvr2_3b")
        model, results = done
    return _answer(request, model, results, time.perf_counter() - started)
