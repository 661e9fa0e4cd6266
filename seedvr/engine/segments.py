"""A clip's chunks shared out among workers: segments of whole chunks, and their merge into the single run's frames.

A job spread over several workers (seedvr.serving.fanout) plans the chunks of its whole clip once
(seedvr.engine.chunking.plan_chunks) and gives each worker a segment: chunks C_a..C_b, clip frames
[C_a.start, C_b.stop). The worker restores exactly those chunks, with their true fades and the clip's noise
(`restore_clip(..., chunks=segment_chunks(chunks, segment))`):

    chunks     |====C0====|                          C_a..C_b of each segment, true fades
                      |====C1====|
                                |====C2====|
    segment 0  |====C0====C1=====|                   frames [C0.start, C1.stop)
    segment 1                   |====C2====|         frames [C2.start, C2.stop)
                                 ^^^ shared: C1's raw output in segment 0, C2's raw output in segment 1

- A frame no other segment holds comes out of its segment as the single run gives it (the same chunks, noise and
  cross-fade).
- A frame shared with a neighbouring segment (the overlap of C_b and C_b+1) is held by one chunk of each, so its
  segment gives back that chunk's raw output: the cross-fader returns rint(f32(raw)·f32(w) / f32(w)) = raw (the
  float32 rounding error is below 255·2⁻²², far from ½).

`merge_segments` then cross-fades the segments as the single run cross-fades the chunks: segment s enters the same
`CrossFader` with chunk_weights(C_a) on its fade-in frames, chunk_weights(C_b) on its fade-out frames and 1
elsewhere, so an overlap frame is f32(raw_b)·f32(w_b) + f32(raw_b+1)·f32(w_b+1) over f32(w_b + w_b+1), the single
run's arithmetic in its order: the same uint8 frame.

That needs every frame in at most two chunks, i.e. chunk_overlap <= chunk_frames / 2 (`segment_problem`): a frame
in three chunks would leave its segment already blended, which no merge can undo.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from seedvr.engine.chunking import Chunk, CrossFader, chunk_weights


@dataclass(frozen=True)
class Segment:
    """Chunks first_chunk..last_chunk (inclusive) of a clip's plan: clip frames [start, stop), of which the first
    `fade_in` are shared with the segment before and the last `fade_out` with the segment after."""

    index: int
    first_chunk: int
    last_chunk: int
    start: int
    stop: int
    fade_in: int
    fade_out: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    def describe(self) -> dict:
        return {"index": self.index, "chunks": [self.first_chunk, self.last_chunk], "frames": [self.start, self.stop]}


def segment_problem(chunk_frames: int | None, overlap: int) -> str | None:
    """Why a clip chunked this way cannot be split into exact segments, or None when it can."""
    if chunk_frames is not None and 2 * overlap > chunk_frames:
        return (f"chunk_overlap {overlap} is more than half of chunk_frames {chunk_frames}: a frame would lie in three "
                f"chunks, and segments restored apart could not be merged exactly; send chunk_overlap <= "
                f"{chunk_frames // 2}")
    return None


def plan_segments(chunks: Sequence[Chunk], workers: int) -> list[Segment]:
    """Up to `workers` segments of consecutive whole chunks, as even as the chunk count allows; when it does not
    divide, the later segments take one chunk more (the first is the coordinator's, who also merges)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    for before, after in zip(chunks, chunks[1:]):
        if after.start < before.start or after.start > before.stop:
            raise ValueError(f"the chunks [{before.start}, {before.stop}) and [{after.start}, {after.stop}) are not "
                             "a plan's consecutive chunks")
    count = min(workers, len(chunks))
    per, extra = divmod(len(chunks), count)
    segments, first = [], 0
    for index in range(count):
        last = first + per - 1 + (1 if index >= count - extra else 0)
        segments.append(segment_of(chunks, first, last, index))
        first = last + 1
    return segments


def segment_of(chunks: Sequence[Chunk], first_chunk: int, last_chunk: int, index: int = 0) -> Segment:
    """The segment of chunks first_chunk..last_chunk (inclusive) of a plan."""
    if not 0 <= first_chunk <= last_chunk < len(chunks):
        raise ValueError(f"chunks {first_chunk}..{last_chunk} are not in a plan of {len(chunks)} chunks")
    head, tail = chunks[first_chunk], chunks[last_chunk]
    return Segment(index, first_chunk, last_chunk, head.start, tail.stop, head.fade_in, tail.fade_out)


def segment_chunks(chunks: Sequence[Chunk], segment: Segment) -> list[Chunk]:
    """The segment's chunks with their true fades, frames counted from the segment's first frame."""
    return [Chunk(chunk.start - segment.start, chunk.stop - segment.start, chunk.fade_in, chunk.fade_out)
            for chunk in chunks[segment.first_chunk:segment.last_chunk + 1]]


def merge_weights(chunks: Sequence[Chunk], segment: Segment, fade: str = "hann") -> np.ndarray:
    """float64 (segment.frames,): the weights of the segment's frames in the merge, those its edge chunks have in
    the single run on the frames shared with the neighbouring segments, 1 elsewhere."""
    weights = np.ones(segment.frames)
    if segment.fade_in:
        weights[:segment.fade_in] = chunk_weights(chunks[segment.first_chunk], fade)[:segment.fade_in]
    if segment.fade_out:
        weights[segment.frames - segment.fade_out:] = chunk_weights(chunks[segment.last_chunk], fade)[-segment.fade_out:]
    return weights


def merge_segments(parts: Iterable[tuple[Segment, Iterable[np.ndarray]]], chunks: Sequence[Chunk],
                   fade: str = "hann") -> Iterator[np.ndarray]:
    """The clip's frames, in order, from its segments' restored frames (uint8 (Hc, Wc, 3)), given segment by segment
    in order and read one frame at a time: host memory holds the frames of one overlap, whatever the clip's length.
    ValueError when a segment is missing or holds another number of frames than it covers."""
    fader = CrossFader()
    expected = 0
    for segment, frames in parts:
        if segment.start != expected - segment.fade_in:
            raise ValueError(f"segment {segment.index} starts at frame {segment.start}; the merge expected the one "
                             f"whose shared frames start at {expected - segment.fade_in}")
        weights = merge_weights(chunks, segment, fade)
        next_start = segment.stop - segment.fade_out  # the next segment's first frame
        count = 0
        for frame in frames:
            if count == segment.frames:
                raise ValueError(f"segment {segment.index} holds more than its {segment.frames} frames")
            index = segment.start + count
            yield from fader.add(index, frame[None], weights[count:count + 1], min(index + 1, next_start))
            count += 1
        if count != segment.frames:
            raise ValueError(f"segment {segment.index} holds {count} frames, it covers {segment.frames}")
        expected = segment.stop
    if chunks and expected != chunks[-1].stop:
        raise ValueError(f"the segments end at frame {expected}, the clip at {chunks[-1].stop}")
