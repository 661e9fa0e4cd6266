"""One job, top to bottom: initialize, or restore = validate -> gather -> size -> plan/retry -> restore ->
encode -> deliver -> answer.

Everything that can be checked without the model (the request, the model it resolves to, every item's bytes,
every output size) is checked before the model is touched; each job works in its own temporary folder,
removed on every path. No stage calls back into an earlier one.
"""

import gc
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from seedvr import settings
from seedvr.engine import chunking, memory_plan
from seedvr.engine.restorer import RestoreInterrupted
from seedvr.engine.sizing import ItemSize, item_size
from seedvr.errors import OUT_OF_MEMORY, RestoreError, WorkerFault
from seedvr.io.delivery import InlineBudget
from seedvr.io.inputs import InputItem, gather_inputs
from seedvr.io.media.hardware_decode import decoder_name
from seedvr.io.media.video import iter_frames
from seedvr.io.outputs import OutputFile, deliver_output, video_writer, write_comparison, write_restored_image
from seedvr.serving import interpolation
from seedvr.serving.answer import ItemResult, initialize_answer, restore_answer, result_copies
from seedvr.serving.cancel import CancelToken
from seedvr.serving.early_warnings import early_warnings
from seedvr.serving.fallback import JobModels, fallback_spec
from seedvr.serving.model_holder import LoadedModel, ModelHolder
from seedvr.serving.overlap import WriteBehind, read_ahead
from seedvr.serving.progress import Progress, ProgressSink
from seedvr.serving.schema import InitializeRequest, RestoreRequest
from seedvr.serving.specs import RestoreSpec, model_choice, restore_spec
from seedvr.serving.stream import Emit, result_event

log = logging.getLogger(__name__)

T = TypeVar("T")


READ_AHEAD_FRAMES = 16  # decoded frames waiting for the model (host memory: 16 input frames)
WRITE_BEHIND_FRAMES = 16  # restored frames waiting for the encoder
MAX_WORKER_FAULT_RETRIES = 1  # an item whose worker process died or hung is retried once on a rebuilt group


@dataclass(frozen=True)
class JobContext:
    """Who asked: the job's id (for object keys and logs), where its progress goes, and the token that stops it."""

    job_id: str = "local"
    progress_sink: ProgressSink | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    events: Emit | None = None  # streamed results (SEEDVR_STREAMING): each item's as it is delivered


def initialize(request: InitializeRequest, holder: ModelHolder) -> dict:
    model = holder.ensure(holder.resolve(model_choice(request)))
    return initialize_answer(model)


def sizes_of(spec: RestoreSpec, items: list[InputItem]) -> list[ItemSize]:
    """Every item's output size, computed once (INVALID_INPUT for one that is too small)."""
    max_area = settings.current().max_output_area
    return [item_size(spec.size, item.height, item.width, max_area) for item in items]


def restore(request: RestoreRequest, context: JobContext, holder: ModelHolder) -> dict:
    spec = restore_spec(request)
    model_spec = holder.resolve(spec.model)  # a bad model choice fails before any download or decode
    models = JobModels(holder, model_spec, fallback_spec(holder, spec), context.cancel)
    started = time.perf_counter()
    cancel = context.cancel
    with tempfile.TemporaryDirectory(prefix="seedvr-job-") as tmp:
        workdir = Path(tmp)
        try:
            items = gather_inputs(spec.media, workdir)
            sizes = sizes_of(spec, items)
            interpolation.check(spec.interpolation, items)  # a video to apply it to; RIFE's weights when asked
            warnings = early_warnings(spec, items, sizes)  # sent with every progress update, and answered
            progress = Progress(sum(item.frame_count for item in items), context.progress_sink, warnings)
            inline_budget = InlineBudget.from_settings(result_copies([item.kind for item in items]))
            cancel.check()
            progress.phase("load_model")

            def run_items() -> tuple[LoadedModel, list[ItemResult]]:
                with holder.exclusive():  # the job's model (and its fallback upscaler, in turn) stay put
                    results = []
                    for item, size in zip(items, sizes):
                        cancel.check()
                        result = models.restore(progress, partial(restore_item, spec=spec, item=item, size=size,
                                                                  workdir=workdir, progress=progress, cancel=cancel))
                        results.append(deliver(spec, result, context.job_id, progress, inline_budget))
                        if context.events is not None:
                            context.events(result_event(item.index, results[-1]))
                    return models.answering, results

            done, failure = _out_of_memory(run_items)  # an item's own retries are spent, or loading failed
        except RestoreInterrupted:
            cancel.check()  # the interruption came from the job's cancellation: CANCELLED
            raise
        if done is None:
            _free_device_memory()
            log.warning("CUDA out of memory outside the memory plan: %s", failure)
            raise RestoreError(OUT_OF_MEMORY, "the GPU ran out of memory for this input; lower res_h/res_w, send "
                                              "a shorter clip or use seedvr2_3b")
        model, results = done
    return restore_answer(spec, model, results, time.perf_counter() - started, warnings)


def _decoded(item: InputItem) -> Generator[np.ndarray, None, None]:
    """uint8 (H, W, 3) frames of an item: the decoded image, or the video's frames streamed from ffmpeg."""
    if item.image is not None:
        yield item.image.rgb
        return
    assert item.video is not None, "an item is an image or a probed video"
    yield from iter_frames(item.path, item.video, field=item.field)


def _source(item: InputItem, timings: dict[str, float], keep_index: int, kept: list[np.ndarray],
            cancel: CancelToken) -> Generator[np.ndarray, None, None]:
    """The item's frames, decoded as they are asked for (the time it takes goes to timings["decode"]);
    a copy of frame `keep_index` is appended to `kept`. Stops the decoder when the job is cancelled."""
    frames = _decoded(item)
    try:
        for index in itertools.count():
            cancel.check()
            started = time.perf_counter()
            frame = next(frames, None)
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
            if frame is None:
                return
            if index == keep_index:
                kept.append(frame.copy())
            yield frame
    finally:
        frames.close()  # stops the decoder when a failed attempt leaves early


def _run_plan(model: LoadedModel, spec: RestoreSpec, item: InputItem, size: ItemSize, plan: memory_plan.MemoryPlan,
              guess: memory_plan.Estimate, workdir: Path, progress: Progress, timings: dict[str, float],
              cancel: CancelToken) -> tuple[OutputFile, OutputFile | None]:
    """Restore and encode one item under `plan`, frames streaming from the decoder through the model into
    the encoder. Returns (output file, comparison file or None)."""
    restorer = model.restorer
    restorer.apply_plan(plan)
    middle = item.frame_count // 2
    before: list[np.ndarray] = []
    after: np.ndarray | None = None
    encoding = False  # whether the "encode" phase was reported since the model's last phase

    def on_phase(name: str) -> None:
        nonlocal encoding
        cancel.check()
        progress.phase(name)
        encoding = False
        memory_plan.check_simulated(guess, name)

    progress.phase("decode")

    def on_chunk(index: int, chunk: chunking.Chunk) -> None:
        cancel.check()
        memory_plan.trim_host_memory()

    # Decoding runs ahead of the model and encoding behind it, each in a thread of its own (seedvr.serving.overlap).
    decoding = read_ahead(_source(item, timings, middle, before, cancel), READ_AHEAD_FRAMES)
    with closing(decoding) as decoded:  # the decoder ends on every path
        restored = chunking.restore_clip(
            restorer, decoded, item.frame_count, size,
            chunk_frames=plan.chunk_frames, overlap=plan.chunk_overlap, sampling=spec.sampling, timings=timings,
            on_phase=on_phase, on_chunk=on_chunk,
            first_frame=part.first if (part := item.video and item.video.part) else 0,
            video_frames=part.total if part else None)
        if item.kind == "image":
            (after,) = restored
            progress.phase("encode")
            started = time.perf_counter()
            output = write_restored_image(spec.image, item, after, workdir)
            timings["encode"] = time.perf_counter() - started
            progress.advance(1)
        else:
            retiming = interpolation.retiming_of(spec.interpolation, item)  # the frames and rate to write
            writer, output = video_writer(spec.video, item, workdir, size.width, size.height, retiming)
            written = 0

            def encode(frame: np.ndarray) -> None:
                nonlocal encoding, written
                if not encoding:
                    progress.phase("encode")
                    encoding = True
                started = time.perf_counter()
                writer.write(frame)
                timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - started
                written += 1  # progress counts source frames, whatever the interpolation adds
                progress.advance(retiming.source_frames_done(written) - retiming.source_frames_done(written - 1))

            def keep_middle(frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
                nonlocal after
                for index, frame in enumerate(frames):
                    if index == middle:
                        after = frame.copy()  # the comparison shows the middle restored frame
                    yield frame

            frames = interpolation.interpolated(spec.interpolation, retiming, keep_middle(restored), restorer.device,
                                                timings)
            with writer, closing(frames):  # an interpolation in flight (its ffmpeg) ends on every path
                with WriteBehind(encode, WRITE_BEHIND_FRAMES) as behind:
                    for frame in frames:
                        cancel.check()
                        behind.put(frame)
                started = time.perf_counter()
            timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - started  # flush, mux audio
    assert after is not None, "the middle frame was restored"
    comparison = write_comparison(before[0], after, item, workdir) if spec.compare else None
    return output, comparison


def _out_of_memory(run: Callable[[], T]) -> tuple[T | None, str | None]:
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


def restore_item(model: LoadedModel, spec: RestoreSpec, item: InputItem, size: ItemSize, workdir: Path,
                 progress: Progress, cancel: CancelToken) -> ItemResult:
    """Plan, restore and encode one item into workdir. Retries: a smaller plan after each CUDA out-of-memory;
    the same item once more after a worker fault (a rank died or hung: its group is rebuilt). A second fault
    fails the job with WORKER_FAULT, which says that sending it again may succeed."""
    retries: list[dict] = []
    frames_before = progress.frames_done
    faults = 0
    while True:
        try:
            return _restore_planned(model, spec, item, size, workdir, progress, cancel, retries)
        except WorkerFault as fault:
            cancel.check()  # a cancelled job's interrupted group is not a fault
            if faults == MAX_WORKER_FAULT_RETRIES:
                raise WorkerFault(f"{fault.message}; it failed again on a rebuilt group: send the job again") from None
            faults += 1
            log.warning("worker fault, retrying the item on a rebuilt group: %s", fault.message)
            retries.append({"worker_fault": fault.message})
            progress.frames_done = frames_before  # the item starts over


def _restore_planned(model: LoadedModel, spec: RestoreSpec, item: InputItem, size: ItemSize, workdir: Path,
                     progress: Progress, cancel: CancelToken, retries: list[dict]) -> ItemResult:
    """Plan, restore with retries on CUDA out-of-memory (each with a smaller plan), encode into workdir."""
    timings: dict[str, float] = {}
    restorer = model.restorer
    clip = (item.frame_count, (item.height, item.width), (size.height, size.width))
    footprint = restorer.footprint()
    wishes = spec.memory
    budget = memory_plan.available_memory(restorer)
    plan, guess = memory_plan.choose(footprint, budget, *clip, wishes)
    frames_before = progress.frames_done
    while True:
        files, failure = _out_of_memory(
            lambda: _run_plan(model, spec, item, size, plan, guess, workdir, progress, timings,  # noqa: B023 (run now)
                              cancel))
        if files is not None:
            break
        _free_device_memory()  # the failed attempt's tensors are unreachable now
        log.warning("out of memory with plan %s: %s", plan, failure)
        retries.append({"plan": plan.describe(), "estimated_peak_bytes": guess.peak, "error": failure})
        progress.frames_done = frames_before  # the item starts over
        budget = memory_plan.available_memory(restorer)
        retry = memory_plan.smaller(guess, footprint, budget, *clip, wishes)
        if retry is None or sum("plan" in entry for entry in retries) > memory_plan.MAX_RETRIES:
            raise RestoreError(OUT_OF_MEMORY, memory_plan.out_of_memory_message(
                footprint, budget, guess, *clip, wishes, on_gpu=restorer.device.type == "cuda"))
        plan, guess = retry
    output, comparison = files
    chunks = len(chunking.plan_chunks(item.frame_count, plan.chunk_frames, plan.chunk_overlap))
    info = {"input_resolution": f"{item.width}x{item.height}", "frames": item.frame_count,
            "plan": {**plan.describe(), "chunks": chunks, "estimated_peak_bytes": guess.peak,
                     "memory_budget_bytes": budget, "fits": guess.peak <= budget},
            "retries": retries,
            "timings": {name: round(seconds, 4) for name, seconds in timings.items()}}
    if item.video is not None:
        info.update(item.video.describe())
        if spec.interpolation.active:
            info["interpolation"] = interpolation.describe(spec.interpolation, item)
        info["decoder"] = decoder_name(item.video.codec)
    if output.encoder is not None:
        info["encoder"] = output.encoder
    return ItemResult(item.kind, size.width, size.height, output, comparison, info)


def deliver(spec: RestoreSpec, result: ItemResult, job_id: str, progress: Progress,
            inline_budget: InlineBudget) -> ItemResult:
    """The item's result and before/after picture, inline while they fit the answer's budget, else uploaded."""
    progress.phase("deliver")
    started = time.perf_counter()
    result.delivered = deliver_output(spec.delivery, result.output, job_id, inline_budget,
                                      copies=inline_budget.result_copies)
    if result.comparison is not None:
        result.compared = deliver_output(spec.delivery, result.comparison, job_id, inline_budget)
    result.info["timings"]["deliver"] = round(time.perf_counter() - started, 4)
    return result
