"""The fan-out fields of a restore request, their checks across fields, and the spec they become.

    workers   1-64: with more than one, the job becomes a coordinator (seedvr.serving.fanout.coordinator)
    resume    reuse the segments a failed or interrupted run of the same job left in the bucket
    segment   internal: what a coordinator asks of the restore job it starts for one segment

A segment job restores chunks first_chunk..last_chunk of the plan of a clip of `clip_frames` frames that starts
at video frame `clip_first`, chunked by the request's chunk_frames / chunk_overlap (both required), from a source
whose bytes hash to `source_sha256`. A client may send it (it is an ordinary field, and a segment job only writes
its lossless result into the bucket), but it is meant for coordinators; a segment job never fans out again.
"""

from dataclasses import asdict, dataclass

from seedvr.engine.chunking import plan_chunks
from seedvr.engine.segments import segment_problem
from seedvr.engine.upscaler import UPSCALER

MAX_WORKERS = 64
MAX_FRAMES = 10**9  # bound of a segment's frame and chunk numbers
SEGMENT_NUMBERS = ("clip_first", "clip_frames", "first_chunk", "last_chunk")
SEGMENT_MEMBERS = (*SEGMENT_NUMBERS, "source_sha256")


@dataclass(frozen=True)
class SegmentOrder:
    """Chunks first_chunk..last_chunk (inclusive) of the plan of the clip of `clip_frames` frames from video frame
    `clip_first`, restored from the source whose SHA-256 is `source_sha256`."""

    clip_first: int
    clip_frames: int
    first_chunk: int
    last_chunk: int
    source_sha256: str

    @classmethod
    def from_fields(cls, fields: dict) -> "SegmentOrder":
        return cls(**{name: fields[name] for name in SEGMENT_MEMBERS})

    def as_fields(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FanOutSpec:
    workers: int = 1
    resume: bool = True
    segment: SegmentOrder | None = None


# Rules (seedvr.serving.schema): each parameter is named after the field it reads.
def segment_never_fans_out(workers: int, segment: dict | None) -> str | None:
    if segment is not None and workers > 1:
        return f"a segment job never fans out again: send workers 1 with segment, got workers {workers}"
    return None


def segment_pins_its_chunks(segment: dict | None, chunk_frames: int | None, chunk_overlap: int | None,
                            start_time: float | None, duration: float | None) -> str | None:
    if segment is None:
        return None
    if chunk_frames is None or chunk_overlap is None:
        return "segment needs the clip's chunk_frames and chunk_overlap: a segment is whole chunks of its plan"
    if start_time is not None or duration is not None:
        return "segment names its frames itself (clip_first, clip_frames): send no start_time or duration with it"
    if chunk_frames % 4 != 1 or chunk_overlap >= chunk_frames:
        return None  # the chunk rules report it
    order = SegmentOrder.from_fields(segment)
    chunks = len(plan_chunks(order.clip_frames, chunk_frames, chunk_overlap))
    if not order.first_chunk <= order.last_chunk < chunks:
        return (f"segment chunks {order.first_chunk}..{order.last_chunk} are not in the plan of {order.clip_frames} "
                f"frames in chunks of {chunk_frames} overlapping by {chunk_overlap} ({chunks} chunks)")
    return segment_problem(chunk_frames, chunk_overlap)


def workers_split_one_video_exactly(workers: int, media: tuple | None, media_url: tuple | None, image: str | None,
                                    chunk_frames: int | None, chunk_overlap: int | None) -> str | None:
    if workers == 1:
        return None
    if image is not None:
        return f"workers {workers} spreads one video over several workers; an image is restored by one: send workers 1"
    items = len(media or media_url or ())
    if items > 1:
        return f"workers {workers} spreads one video over several workers; send one item, not {items}, or workers 1"
    return segment_problem(chunk_frames, chunk_overlap or 0)


def workers_run_seedvr2_alone(workers: int, model_type: str | None, fallback_upscaler: str | None = None) -> str | None:
    """A fan-out splits SeedVR2's chunk plan: a classic upscaler has none, and a fallback would change a segment's
    model behind the merge's back."""
    if workers > 1 and model_type == UPSCALER:
        return f"workers {workers} splits SeedVR2's chunk plan; an upscaler restores frame by frame: send workers 1"
    if workers > 1 and fallback_upscaler is not None:
        return (f"fallback_upscaler replaces SeedVR2 for a whole item on one worker; with workers {workers} drop it "
                "(a segment that does not fit fails the job with OUT_OF_MEMORY)")
    return None


RULES = (segment_never_fans_out, segment_pins_its_chunks, workers_split_one_video_exactly, workers_run_seedvr2_alone)
