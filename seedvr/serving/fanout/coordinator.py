"""One restore job spread over several workers of its own endpoint (`workers` > 1): the coordinator.

    validate (a bucket and the endpoint's API key, before any work) -> gather and probe the one video
    -> memory plan and chunk plan of the whole clip (the single run's) -> segments of whole chunks
    -> segments a failed run left in the bucket (resume) -> the source where the other workers can read it (the
       client's media_url, else an upload) -> one ordinary restore job per other segment on this endpoint, while
       this worker restores one itself, then any whose job is still queued
    -> merge the segments in order, cross-faded as the single run cross-fades its chunks, into one encode with the
       requested options and the source's audio -> deliver -> delete the intermediates

The frames are the single run's bit for bit, given the same chunk_frames / chunk_overlap (why: seedvr.engine.segments):
the plan's chunking, VAE tiling and the deinterlacing found here are pinned in every segment job, and the noise
follows the video's frame numbers. A clip the plan restores in one pass (one chunk) is not split: it runs here, as
with workers 1. Host memory holds one chunk and one overlap, whatever the clip's length; the disk holds the source,
this worker's segments and the one being merged.

When the job fails or this worker dies, the finished segments stay in the bucket (24 h): the same job sent again,
to any worker, reuses them (`resume`, processing_info.segments_reused). When it succeeds they are deleted.
"""

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np

from seedvr import settings
from seedvr.engine import memory_plan
from seedvr.engine.chunking import Chunk, plan_chunks
from seedvr.engine.restorer import RestoreInterrupted
from seedvr.engine.segments import Segment, merge_segments, plan_segments, segment_problem
from seedvr.engine.sizing import ItemSize
from seedvr.errors import INVALID_INPUT, RestoreError
from seedvr.io.delivery import InlineBudget
from seedvr.io.inputs import InputItem, gather_inputs
from seedvr.io.media.hardware_decode import decoder_name
from seedvr.io.media.lossless import EXTENSION, MIME, read_lossless
from seedvr.io.media.video import read_frames
from seedvr.io.outputs import video_writer, write_comparison
from seedvr.io.segment_store import SegmentStore
from seedvr.serving import interpolation
from seedvr.serving.answer import ItemResult, restore_answer, result_copies
from seedvr.serving.early_warnings import early_warnings
from seedvr.serving.fanout.dispatch import SegmentJobs, SegmentState
from seedvr.serving.fanout.endpoint import Endpoint
from seedvr.serving.fanout.order import SegmentOrder
from seedvr.serving.fanout.progress import FanOutProgress, LocalSegmentProgress
from seedvr.serving.fanout.recipe import Clip, clip_of, file_sha256, recipe_digest, segment_key, source_key
from seedvr.serving.fanout.segment_job import one_video, restore_segment_frames
from seedvr.serving.jobs import JobContext, deliver, restore_item, sizes_of
from seedvr.serving.model_holder import LoadedModel, ModelHolder
from seedvr.serving.progress import Progress
from seedvr.serving.schema import RestoreRequest
from seedvr.serving.specs import RestoreSpec, restore_spec
from seedvr.serving.stream import result_event

log = logging.getLogger(__name__)


def restore_across_workers(request: RestoreRequest, context: JobContext, holder: ModelHolder) -> dict:
    spec = restore_spec(request)
    bucket = settings.current().bucket
    if bucket is None:
        raise RestoreError(INVALID_INPUT, f"workers {spec.fanout.workers} passes segments between workers through the "
                                          f"bucket, and this worker has none: set {', '.join(settings.BUCKET_VARIABLES)}"
                                          ", or send workers 1")
    endpoint = Endpoint.from_environment()  # INVALID_INPUT without the key or the endpoint, before any work
    model_spec = holder.resolve(spec.model)
    started = time.perf_counter()
    cancel = context.cancel
    try:
        with tempfile.TemporaryDirectory(prefix="seedvr-job-") as tmp:
            workdir = Path(tmp)
            try:
                item = one_video(gather_inputs(spec.media, workdir), f"workers {spec.fanout.workers}")
                size = sizes_of(spec, [item])[0]
                interpolation.check(spec.interpolation, [item])  # applied here, after the merge
                warnings = early_warnings(spec, [item], [size])
                budget = InlineBudget.from_settings(result_copies(["video"]))
                cancel.check()
                with holder.use(model_spec) as model:
                    cancel.on_cancel(model.restorer.interrupt)
                    fanout = FanOut(spec, context, model, item, size, workdir, SegmentStore(bucket), endpoint,
                                    warnings)
                    result = fanout.restore()
                    result = deliver(fanout.spec, result, context.job_id, fanout.progress, budget)
                    if context.events is not None:
                        context.events(result_event(0, result))
                fanout.remove_intermediates()
            except RestoreInterrupted:
                cancel.check()  # the interruption came from the job's cancellation: CANCELLED
                raise
    finally:
        endpoint.close()
    return restore_answer(spec, model, [result], time.perf_counter() - started, warnings)


def pinned(spec: RestoreSpec, plan: memory_plan.MemoryPlan, item: InputItem) -> RestoreSpec:
    """The spec every segment runs with: the plan's chunking and VAE tiling, the deinterlacing found here."""
    assert item.video is not None, "a video"
    memory = replace(spec.memory, chunk_frames=plan.chunk_frames, chunk_overlap=plan.chunk_overlap,
                     vae_tiling=plan.vae_tile is not None, vae_tile_size=plan.vae_tile)
    found = item.video.deinterlace
    media = replace(spec.media, deinterlace="off" if found is None else "on",
                    deinterlace_rate=spec.media.deinterlace_rate if found is None else found.rate)
    return replace(spec, memory=memory, media=media)


def segment_input(spec: RestoreSpec, model: LoadedModel, order: SegmentOrder, source_url: str) -> dict:
    """An ordinary restore request for one segment: every choice that decides pixels, pinned."""
    size, sampling, memory = spec.size, spec.sampling, spec.memory
    width, height = size.max_resolution
    job_input: dict = {
        "action": "restore", "media_url": source_url, "media_type": "video",
        "model_type": model.model_type, "model_variant": model.variant, "sp_size": model.sp_size,
        "attention_backend": model.spec.attention_backend, "compile": model.spec.compile,
        **({"scale": size.scale} if size.scale is not None else {"res_h": size.res_h, "res_w": size.res_w}),
        "max_resolution": f"{width}x{height}",
        "seed": sampling.seed, "cfg_scale": sampling.cfg_scale, "cfg_rescale": sampling.cfg_rescale,
        "sample_steps": sampling.sample_steps, "color_fix": sampling.color_fix,
        "cond_noise_scale": sampling.cond_noise_scale,
        "deinterlace": spec.media.deinterlace, "deinterlace_rate": spec.media.deinterlace_rate,
        "chunk_frames": memory.chunk_frames, "chunk_overlap": memory.chunk_overlap, "vae_tiling": memory.vae_tiling,
        "segment": order.as_fields(),
    }
    if memory.vae_tile_size is not None:
        job_input["vae_tile_size"] = memory.vae_tile_size
    if memory.dit_offload is not None:
        job_input["dit_offload"] = memory.dit_offload
    return job_input


class FanOut:
    """One fanned-out item: `restore()` gives its encoded result, `remove_intermediates()` cleans the bucket."""

    def __init__(self, spec: RestoreSpec, context: JobContext, model: LoadedModel, item: InputItem, size: ItemSize,
                 workdir: Path, store: SegmentStore, endpoint: Endpoint, warnings: list[str]) -> None:
        assert item.video is not None, "a video"
        self.spec, self.context, self.model, self.item, self.size = spec, context, model, item, size
        self.workdir, self.store, self.endpoint, self.warnings = workdir, store, endpoint, warnings
        self.cancel = context.cancel
        self.clip: Clip = clip_of(item.video)
        self.timings: dict[str, float] = {}
        self.states: list[SegmentState] = []
        self.keys: list[str] = []  # the intermediates this job owns, deleted once it succeeds
        self.progress: Progress = Progress(item.frame_count, context.progress_sink, warnings)

    def restore(self) -> ItemResult:
        restorer = self.model.restorer
        budget = memory_plan.available_memory(restorer)
        plan, guess = memory_plan.choose(restorer.footprint(), budget, self.clip.frames, (self.item.height,
                                         self.item.width), (self.size.height, self.size.width), self.spec.memory)
        chunks = plan_chunks(self.clip.frames, plan.chunk_frames, plan.chunk_overlap)
        plan_info = {**plan.describe(), "chunks": len(chunks), "estimated_peak_bytes": guess.peak,
                     "memory_budget_bytes": budget, "fits": guess.peak <= budget}
        if len(chunks) == 1:
            return self._alone()
        problem = segment_problem(plan.chunk_frames, plan.chunk_overlap)
        if problem:
            raise RestoreError(INVALID_INPUT, problem)
        self.spec = pinned(self.spec, plan, self.item)
        segments = plan_segments(chunks, self.spec.fanout.workers)
        self.store.expire()
        assert self.item.video is not None
        source = file_sha256(self.item.path)
        digest = recipe_digest(source, self.model, self.spec, self.size, self.item.video, self.clip)
        self.states = [SegmentState(segment, segment_key(digest, segment)) for segment in segments]
        uploads_source = self.spec.media.field != "media_url"
        self.keys = [state.key for state in self.states] + ([source_key(digest, self.item.path)] if uploads_source else [])
        for state in self.states:
            if self.spec.fanout.resume and self.store.fresh(state.key):
                state.state = "reused"
                log.info("segment %d: reusing %s from the bucket", state.segment.index, state.key)
        fanout = FanOutProgress(self.states, self.context.progress_sink, self.warnings)
        self.progress = fanout.progress
        pending = [state for state in self.states if state.state == "pending"]
        for state in pending[:1]:
            state.state = "local"  # the coordinator's own
        jobs = SegmentJobs(self.endpoint, self.store, self.states,
                           lambda segment: segment_input(self.spec, self.model, self._order(segment, source),
                                                         source_url),
                           lambda state: self._changed(fanout, state))
        for state in self.states:
            if state.state == "reused":
                self._changed(fanout, state)
        try:
            source_url = self._source_url(digest) if len(pending) > 1 else ""
            if len(pending) > 1:
                jobs.start()
            local = pending[0] if pending else None
            while local is not None:
                self._restore_here(local, chunks, fanout, jobs)
                local = jobs.take_back()
            result = self._merge(chunks, fanout, jobs)
        finally:
            jobs.stop()
        result.info.update({"plan": plan_info, "workers": self.spec.fanout.workers,
                            "segments": [state.describe() for state in self.states],
                            "segments_reused": sum(state.state == "reused" for state in self.states)})
        return result

    def remove_intermediates(self) -> None:
        if self.keys:
            self.store.delete(self.keys)
            log.info("deleted the job's %d intermediates from the bucket", len(self.keys))

    def _alone(self) -> ItemResult:
        """A clip of one chunk: restored here as with workers 1 (there is nothing to split)."""
        log.info("the clip is one chunk: restoring it here, not split")
        started = time.perf_counter()
        result = restore_item(self.model, self.spec, self.item, self.size, self.workdir, self.progress, self.cancel)
        alone = {"index": 0, "chunks": [0, 0], "frames": [0, self.clip.frames], "state": "done",
                 "job_id": self.context.job_id, "attempts": 1, "seconds": round(time.perf_counter() - started, 3)}
        result.info.update({"workers": 1, "segments": [alone], "segments_reused": 0})
        return result

    def _order(self, segment: Segment, source: str) -> SegmentOrder:
        return SegmentOrder(self.clip.first, self.clip.frames, segment.first_chunk, segment.last_chunk, source)

    def _source_url(self, digest: str) -> str:
        """Where the segment jobs read the source: the client's media_url, else the source uploaded to the bucket."""
        if self.spec.media.field == "media_url":
            return self.spec.media.values[0]
        started = time.perf_counter()
        key = source_key(digest, self.item.path)  # in self.keys: a dead run's upload is removed too
        if not self.store.fresh(key):
            self.store.put(key, self.item.path, "application/octet-stream")
        self.timings["upload_source"] = time.perf_counter() - started
        return self.store.url(key)

    def _changed(self, fanout: FanOutProgress, state: SegmentState) -> None:
        fanout.changed()
        if self.context.events is not None and state.state in ("done", "reused"):
            self.context.events({"event": "segment", **state.describe(), "url": self.store.url(state.key)})

    def _local_path(self, state: SegmentState) -> Path:
        return self.workdir / f"segment-{state.segment.index}{EXTENSION}"

    def _restore_here(self, state: SegmentState, chunks: list[Chunk], fanout: FanOutProgress, jobs: SegmentJobs) -> None:
        """Restore a segment on this worker, and store it in the bucket (a later run may reuse it)."""
        started = time.perf_counter()
        state.job_id, state.attempts, state.frames_done = self.context.job_id, state.attempts + 1, 0
        path = self._local_path(state)
        restore_segment_frames(self.model, self.spec, self.item, self.size, self.clip, chunks, state.segment, path,
                               LocalSegmentProgress(fanout, state), self.cancel, self.timings, jobs.check)
        uploaded = time.perf_counter()
        self.store.put(state.key, path, MIME)
        self.timings["upload_segments"] = self.timings.get("upload_segments", 0.0) + time.perf_counter() - uploaded
        state.seconds = time.perf_counter() - started
        state.state = "done"
        self._changed(fanout, state)

    def _segments(self, jobs: SegmentJobs) -> Iterator[tuple[Segment, Iterator[np.ndarray]]]:
        """Each segment's frames in order: this worker's from its disk, the others' fetched from the bucket once
        their job is done; a file is removed once merged."""
        for state in self.states:
            path = self._local_path(state)
            if not path.exists():
                waited = time.perf_counter()
                jobs.wait(state, self.cancel)
                fetched = time.perf_counter()
                self.timings["wait"] = self.timings.get("wait", 0.0) + fetched - waited
                self.store.fetch(state.key, path)
                self.timings["fetch"] = self.timings.get("fetch", 0.0) + time.perf_counter() - fetched
            yield state.segment, read_lossless(path, self.size.width, self.size.height, state.segment.frames,
                                               f"segment {state.segment.index}")
            path.unlink()

    def _merge(self, chunks: list[Chunk], fanout: FanOutProgress, jobs: SegmentJobs) -> ItemResult:
        """Cross-fade the segments into the one encode (interpolated when asked, the source's audio, the requested
        options)."""
        fanout.phase("merge")
        item, size, spec = self.item, self.size, self.spec
        middle = self.clip.frames // 2
        after: np.ndarray | None = None

        def merged() -> Iterator[np.ndarray]:
            nonlocal after
            for index, frame in enumerate(merge_segments(self._segments(jobs), chunks)):
                self.cancel.check()
                if index == middle:
                    after = frame.copy()  # the comparison shows the middle restored frame
                fanout.merged_frames(index + 1)
                yield frame

        retiming = interpolation.retiming_of(spec.interpolation, item)
        writer, output = video_writer(spec.video, item, self.workdir, size.width, size.height, retiming)
        frames = interpolation.interpolated(spec.interpolation, retiming, merged(), self.model.restorer.device,
                                            self.timings)
        started = time.perf_counter()
        with writer, closing(frames):
            for frame in frames:
                writer.write(frame)
        self.timings["merge"] = time.perf_counter() - started - self.timings.get("wait", 0.0) \
            - self.timings.get("fetch", 0.0)
        assert after is not None and item.video is not None, "the middle frame was merged"
        comparison = None
        if self.spec.compare:
            comparison = write_comparison(read_frames(item.path, item.video, middle, 1)[0], after, item, self.workdir)
        info = {"input_resolution": f"{item.width}x{item.height}", "frames": item.frame_count, "retries": [],
                "timings": {name: round(seconds, 4) for name, seconds in self.timings.items()},
                **item.video.describe(), "decoder": decoder_name(item.video.codec)}
        if spec.interpolation.active:
            info["interpolation"] = interpolation.describe(spec.interpolation, item)
        if output.encoder is not None:
            info["encoder"] = output.encoder
        return ItemResult(item.kind, size.width, size.height, output, comparison, info)
