"""One segment of a job spread over workers, restored here into a lossless file.

The coordinator restores its own segment with `restore_segment_frames`; each other segment is an ordinary restore
job whose `segment` field names its chunks (`restore_segment`, run by whichever worker of the endpoint takes it):

    fetch the source (media_url: the client's URL or the coordinator's upload) -> check its SHA-256
    -> decode the segment's frames by frame number -> restore its chunks (their true fades, the clip's noise)
    -> FFV1 RGB file -> upload to the bucket at the recipe's key -> answer {"segment": {"key", "chunks", "frames"}}

The request carries everything pinned by the coordinator (model, chunk_frames, chunk_overlap, VAE tiling, the
deinterlacing it found), so both sides compute the same recipe and the same key (seedvr.serving.fanout.recipe).
"""

import gc
import logging
import tempfile
import time
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from seedvr import settings
from seedvr.engine import memory_plan
from seedvr.engine.chunking import Chunk, plan_chunks, restore_clip
from seedvr.engine.restorer import RestoreInterrupted
from seedvr.engine.segments import Segment, segment_chunks, segment_of
from seedvr.engine.sizing import ItemSize
from seedvr.errors import INVALID_INPUT, OUT_OF_MEMORY, RestoreError
from seedvr.io.inputs import InputItem, gather_inputs
from seedvr.io.media.lossless import EXTENSION, MIME, LosslessWriter
from seedvr.io.media.video import FrameRange, VideoInfo, iter_frames
from seedvr.io.segment_store import SegmentStore
from seedvr.serving.cancel import CancelToken
from seedvr.serving.fanout.recipe import Clip, file_sha256, recipe_digest, segment_key
from seedvr.serving.jobs import READ_AHEAD_FRAMES, JobContext, sizes_of
from seedvr.serving.model_holder import LoadedModel, ModelHolder
from seedvr.serving.overlap import read_ahead
from seedvr.serving.progress import Progress
from seedvr.serving.schema import RestoreRequest
from seedvr.serving.specs import RestoreSpec, restore_spec

log = logging.getLogger(__name__)


def one_video(items: list[InputItem], why: str) -> InputItem:
    """The request's only item, which must be a video (INVALID_INPUT naming `why` otherwise)."""
    if len(items) != 1 or items[0].video is None:
        what = f"{len(items)} items" if len(items) != 1 else "an image"
        raise RestoreError(INVALID_INPUT, f"{why} takes one video, got {what}: send workers 1")
    return items[0]


def part_of(video: VideoInfo, first: int, count: int, video_frames: int) -> VideoInfo:
    """The probed video read as its frames [first, first + count), by frame number."""
    fps = Fraction(video.fps)
    part = FrameRange(first, count, float(first / fps), float(count / fps), video_frames)
    return replace(video, frame_count=count, frame_times=None, part=part)


def _frames(item: InputItem, video: VideoInfo, cancel: CancelToken) -> Generator[np.ndarray, None, None]:
    frames = iter_frames(item.path, video, field=item.field)
    try:
        for frame in frames:
            cancel.check()
            yield frame
    finally:
        frames.close()


def restore_segment_frames(model: LoadedModel, spec: RestoreSpec, item: InputItem, size: ItemSize, clip: Clip,
                           chunks: list[Chunk], segment: Segment, path: Path, progress: Progress, cancel: CancelToken,
                           timings: dict[str, float], check: Callable[[], None] = lambda: None) -> None:
    """Restore the segment's chunks of the clip's plan into a lossless file at `path`; `check` runs between chunks
    (the coordinator's: a segment job that failed for good stops it). OUT_OF_MEMORY when the GPU is too small
    for the pinned chunking: a segment cannot take a smaller plan, its frames would differ from its neighbours'."""
    assert item.video is not None, "a segment is part of a video"
    restorer = model.restorer
    budget = memory_plan.available_memory(restorer)
    plan, guess = memory_plan.choose(restorer.footprint(), budget, segment.frames, (item.height, item.width),
                                     (size.height, size.width), spec.memory)
    restorer.apply_plan(plan)
    first = clip.first + segment.start
    video = part_of(item.video, first, segment.frames, clip.video_frames)

    def on_phase(name: str) -> None:
        cancel.check()
        progress.phase(name)
        memory_plan.check_simulated(guess, name)

    def on_chunk(index: int, chunk: Chunk) -> None:
        cancel.check()
        check()
        memory_plan.trim_host_memory()

    failure = None
    try:
        decoding = read_ahead(_frames(item, video, cancel), READ_AHEAD_FRAMES)
        with closing(decoding) as decoded, LosslessWriter(path, size.width, size.height) as writer:
            restored = restore_clip(restorer, decoded, segment.frames, size, sampling=spec.sampling, timings=timings,
                                    on_phase=on_phase, on_chunk=on_chunk, first_frame=first,
                                    video_frames=clip.video_frames, chunks=segment_chunks(chunks, segment))
            for frame in restored:
                cancel.check()
                writer.write(frame)
                progress.advance(1)
    except torch.OutOfMemoryError as error:  # only its text leaves: its traceback holds the attempt's tensors
        failure = str(error).strip().splitlines()[0][:300]
    if failure is not None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("CUDA out of memory in segment %s: %s", segment.describe(), failure)
        raise RestoreError(OUT_OF_MEMORY, f"the GPU ran out of memory restoring frames {segment.start}-{segment.stop} "
                                          f"in chunks of {spec.memory.chunk_frames} frames; send a smaller "
                                          "chunk_frames, lower res_h/res_w, or use seedvr2_3b")


def restore_segment(request: RestoreRequest, context: JobContext, holder: ModelHolder) -> dict:
    """A segment job (a restore request with `segment`): see the module docstring."""
    spec = restore_spec(request)
    order = spec.fanout.segment
    memory = spec.memory
    assert order is not None and memory.chunk_frames is not None and memory.chunk_overlap is not None, "the schema"
    bucket = settings.current().bucket
    if bucket is None:
        raise RestoreError(INVALID_INPUT, "a segment job stores its frames in the bucket, and this worker has none: "
                                          f"set {', '.join(settings.BUCKET_VARIABLES)}")
    model_spec = holder.resolve(spec.model)
    cancel = context.cancel
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="seedvr-segment-") as tmp:
        workdir = Path(tmp)
        try:
            item = one_video(gather_inputs(spec.media, workdir), "a segment job")
            assert item.video is not None
            source = file_sha256(item.path)
            if source != order.source_sha256:
                raise RestoreError(INVALID_INPUT, f"the source's bytes are not the coordinator's (SHA-256 {source[:12]}… "
                                                  f"for {order.source_sha256[:12]}…): the media changed between two "
                                                  "downloads; send the job again")
            clip = Clip(order.clip_first, order.clip_frames, item.frame_count)
            if clip.first + clip.frames > clip.video_frames:
                raise RestoreError(INVALID_INPUT, f"segment: the clip's frames {clip.first}-{clip.first + clip.frames} "
                                                  f"are past the end of the video ({clip.video_frames} frames)")
            size = sizes_of(spec, [item])[0]
            chunks = plan_chunks(order.clip_frames, memory.chunk_frames, memory.chunk_overlap)
            segment = segment_of(chunks, order.first_chunk, order.last_chunk)
            progress = Progress(segment.frames, context.progress_sink)
            store = SegmentStore(bucket)
            cancel.check()
            progress.phase("load_model")
            with holder.use(model_spec) as model:
                cancel.on_cancel(model.restorer.interrupt)
                key = segment_key(recipe_digest(source, model, spec, size, item.video, clip), segment)
                path = workdir / f"segment{EXTENSION}"
                restore_segment_frames(model, spec, item, size, clip, chunks, segment, path, progress, cancel, timings)
            progress.phase("upload")
            uploaded = time.perf_counter()
            store.put(key, path, MIME)
            timings["upload"] = time.perf_counter() - uploaded
        except RestoreInterrupted:
            cancel.check()  # the interruption came from the job's cancellation: CANCELLED
            raise
    timings["total"] = time.perf_counter() - started
    answer = {"success": True, "media_type": "video", "model_type": model.model_type, "model_variant": model.variant,
              "segment": {"key": key, **segment.describe()},
              "processing_info": {"resolution": size.describe(), "timings": {name: round(seconds, 4)
                                                                             for name, seconds in timings.items()}}}
    if model.random_weights:
        answer["random_weights"] = True
    return answer
