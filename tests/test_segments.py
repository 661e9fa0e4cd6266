"""Segments of a chunk plan, restored apart and merged, give the single run's frames bit for bit: checked with a
stand-in restorer whose output depends on the chunk's frames and on its position-keyed noise (so a segment that
drew the wrong noise, or a merge that blended in another order, shows)."""

import numpy as np
import pytest
import torch

from seedvr.engine.chunking import plan_chunks, restore_clip
from seedvr.engine.restorer import Sampling, latent_shape
from seedvr.engine.segments import (
    merge_segments,
    plan_segments,
    segment_chunks,
    segment_problem,
)
from seedvr.engine.sizing import ItemSize

SIZE = ItemSize(16, 16, 16, 16)


class NoiseKeyed:
    """restore(): each frame scaled and shifted by an amount read from the chunk's eps (keyed by its position)."""

    def latent_shape(self, frames, height, width):
        return latent_shape(frames, height, width, 8, 4)

    def restore(self, frames, *, eps=None, **options):
        assert eps is not None, "a chunked restore passes its positional noise"
        shift = int(abs(eps.sum().item()) * 1000) % 97
        return torch.from_numpy((np.asarray(frames).astype(np.int64) * 3 + shift).clip(0, 255).astype(np.uint8))


def clip_of(frames: int) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 86, (frames, 16, 16, 3), dtype=np.uint8)


def single_run(clip, chunk_frames, overlap, first_frame=0, video_frames=None):
    return np.stack(list(restore_clip(NoiseKeyed(), iter(clip), len(clip), SIZE, chunk_frames=chunk_frames,
                                      overlap=overlap, sampling=Sampling(seed=7), first_frame=first_frame,
                                      video_frames=video_frames)))


def fanned_out(clip, chunk_frames, overlap, workers, first_frame=0, video_frames=None):
    chunks = plan_chunks(len(clip), chunk_frames, overlap)
    segments = plan_segments(chunks, workers)
    restored = {segment.index: list(restore_clip(
        NoiseKeyed(), iter(clip[segment.start:segment.stop]), segment.frames, SIZE, sampling=Sampling(seed=7),
        first_frame=first_frame + segment.start, video_frames=video_frames or len(clip),
        chunks=segment_chunks(chunks, segment))) for segment in segments}
    return np.stack(list(merge_segments(((s, iter(restored[s.index])) for s in segments), chunks))), segments


@pytest.mark.parametrize("frames, chunk_frames, overlap, workers", [
    (61, 9, 2, 3),    # the end-to-end test's layout
    (61, 9, 4, 3),    # overlap of exactly half a chunk: each frame still in at most two chunks
    (61, 9, 0, 4),    # no overlap: segments meet at chunk boundaries
    (100, 21, 5, 2),  # a short last chunk
    (64, 13, 1, 64),  # more workers than chunks: one chunk each
    (30, 9, 2, 1),    # one segment: the whole plan
], ids=["61-9-2", "half-overlap", "no-overlap", "short-last", "one-chunk-each", "one-worker"])
def test_segments_merged_give_the_single_run_bit_for_bit(frames, chunk_frames, overlap, workers):
    clip = clip_of(frames)
    single = single_run(clip, chunk_frames, overlap)
    merged, segments = fanned_out(clip, chunk_frames, overlap, workers)
    assert len(segments) == min(workers, len(plan_chunks(frames, chunk_frames, overlap)))
    assert merged.shape == single.shape
    np.testing.assert_array_equal(merged, single)
    shared = sum(segment.fade_out for segment in segments)  # frames the merge cross-fades
    assert (shared > 0) == (overlap > 0 and len(segments) > 1)


def test_a_part_of_a_video_fans_out_with_the_video_s_frame_numbers_as_its_single_run_does():
    clip = clip_of(40)
    single = single_run(clip, 9, 2, first_frame=17, video_frames=200)
    merged, _ = fanned_out(clip, 9, 2, 3, first_frame=17, video_frames=200)
    np.testing.assert_array_equal(merged, single)
    shifted, _ = fanned_out(clip, 9, 2, 3, first_frame=18, video_frames=200)
    assert not np.array_equal(shifted, single)  # the noise really follows the frame numbers


def test_segments_are_whole_consecutive_chunks_and_the_first_is_never_the_longest():
    chunks = plan_chunks(61, 9, 2)  # 9 chunks
    segments = plan_segments(chunks, 4)
    assert [(s.first_chunk, s.last_chunk) for s in segments] == [(0, 1), (2, 3), (4, 5), (6, 8)]
    assert segments[0].start == 0 and segments[-1].stop == 61
    for before, after in zip(segments, segments[1:]):
        assert before.stop - after.start == before.fade_out == after.fade_in == 2


def test_an_overlap_over_half_a_chunk_cannot_be_split_exactly():
    assert segment_problem(9, 4) is None and segment_problem(None, 0) is None
    assert "chunk_overlap <= 4" in segment_problem(9, 5)


def test_the_merge_refuses_a_missing_segment_or_a_short_one():
    clip = clip_of(30)
    chunks = plan_chunks(30, 9, 2)
    segments = plan_segments(chunks, 2)
    with pytest.raises(ValueError, match="starts at frame"):
        list(merge_segments([(segments[1], iter(clip[segments[1].start:segments[1].stop]))], chunks))
    with pytest.raises(ValueError, match="holds 3 frames"):
        list(merge_segments([(segments[0], iter(clip[:3]))], chunks))
    with pytest.raises(ValueError, match="the segments end at frame"):
        list(merge_segments([(segments[0], iter(clip[:segments[0].frames]))], chunks))
