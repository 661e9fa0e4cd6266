"""Temporal chunks: layout, cross-fade weights, streaming order and the seed-derived noise, checked with
stand-in pipelines whose output is known (identity, a constant per chunk) and against the real one."""

import json
import math

import numpy as np
import pytest
import torch
from media_factory import closest_pattern_frame, pattern_frames
from safetensors.torch import load_file

from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.engine.chunking import CrossFader, chunk_weights, plan_chunks, positional_noise, restore_clip
from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.restorer import Sampling, latent_shape
from seedvr.engine.sizing import ItemSize
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.vae import VideoAutoencoder

LAYOUTS = [(1, 5, 1), (5, 5, 1), (6, 5, 1), (30, 9, 1), (100, 21, 5), (121, 121, 9), (122, 121, 9), (50, 9, 6),
           (40, 13, 12), (17, 5, 0), (250, 33, 5)]


class StandIn:
    """A Restorer's restore and latent_shape; `output(clip, call)` makes its frames. Records each call."""

    def __init__(self, output, latent_channels=16, factor=8):
        self.output = output
        self.calls = []
        self.latent_channels, self.factor = latent_channels, factor

    def latent_shape(self, frames, height, width):
        return latent_shape(frames, height, width, self.factor, self.latent_channels)

    def restore(self, frames, **options):
        self.calls.append({"frames": len(frames), **options})
        return torch.from_numpy(np.ascontiguousarray(self.output(np.asarray(frames), len(self.calls) - 1)))


def fit(height: int, width: int) -> ItemSize:
    """The size of frames restored at their own size (every test clip is a multiple of 16 on each side)."""
    return ItemSize(height, width, height, width)


def identity():
    return StandIn(lambda clip, call: clip)


def random_clip(count, height=16, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("frames, chunk, overlap", LAYOUTS)
def test_chunks_cover_the_clip_with_the_asked_overlap(frames, chunk, overlap):
    chunks = plan_chunks(frames, chunk, overlap)
    cover = np.zeros(frames, int)
    for item in chunks:
        cover[item.start:item.stop] += 1
        assert 0 < item.frames <= chunk
    assert cover.min() >= 1 and chunks[0].start == 0 and chunks[-1].stop == frames
    for before, after in zip(chunks, chunks[1:]):
        assert after.start - before.start == chunk - overlap  # a fixed step
        assert before.stop - after.start == overlap == before.fade_out == after.fade_in
    assert chunks[0].fade_in == 0 and chunks[-1].fade_out == 0
    if frames > chunk:  # no more chunks than needed: the one before the last does not reach the end
        assert len(chunks) == 1 + math.ceil((frames - chunk) / (chunk - overlap))


@pytest.mark.parametrize("chunk, overlap", [(4, 1), (8, 1), (3, 0), (9, 9), (9, -1)])
def test_bad_chunking_is_refused(chunk, overlap):
    with pytest.raises(ValueError):
        plan_chunks(100, chunk, overlap)


@pytest.mark.parametrize("fade", ["hann", "linear"])
@pytest.mark.parametrize("overlap", [1, 2, 5, 9])
def test_fade_weights_are_complementary(fade, overlap):
    first, second = plan_chunks(60, 21, overlap)[:2]
    outgoing = chunk_weights(first, fade)[first.frames - overlap:]
    incoming = chunk_weights(second, fade)[:overlap]
    np.testing.assert_allclose(outgoing + incoming, 1.0, atol=1e-12)
    x = np.arange(1, overlap + 1) / (overlap + 1)  # written from the definition of each shape
    np.testing.assert_allclose(incoming, np.sin(np.pi / 2 * x) ** 2 if fade == "hann" else x, atol=1e-12)
    assert np.all(chunk_weights(first, fade)[:first.frames - overlap] == 1.0)


@pytest.mark.parametrize("frames, chunk, overlap", LAYOUTS)
def test_identity_pipeline_gives_back_every_frame_in_order(frames, chunk, overlap):
    clip = random_clip(frames)
    stand_in = identity()
    out = list(restore_clip(stand_in, iter(clip), frames, fit(16, 32), chunk_frames=chunk, overlap=overlap,
                            sampling=Sampling(seed=3)))
    assert len(out) == frames
    assert np.array_equal(np.stack(out), clip)
    assert len(stand_in.calls) == len(plan_chunks(frames, chunk, overlap))


def test_overlap_frames_are_the_cross_fade_of_the_two_chunks():
    values = [40.0, 200.0, 90.0]  # chunk i outputs the constant values[i]
    stand_in = StandIn(lambda clip, call: np.full_like(clip, values[call]))
    chunks = plan_chunks(45, 21, 9)
    out = np.stack(list(restore_clip(stand_in, iter(random_clip(45)), 45, fit(16, 32), chunk_frames=21, overlap=9,
                                     sampling=Sampling(seed=0))))
    assert len(chunks) == 3
    for index, item in enumerate(chunks[1:], start=1):
        for j in range(item.fade_in):  # frame item.start + j: fading from chunk index-1 to chunk index
            w = math.sin(math.pi / 2 * (j + 1) / (item.fade_in + 1)) ** 2
            expected = round((1 - w) * values[index - 1] + w * values[index])
            assert np.all(out[item.start + j] == expected), (index, j)
    assert np.all(out[:chunks[1].start] == 40) and np.all(out[chunks[1].stop:] == 90)


def test_three_chunks_on_one_frame_blend_to_a_weighted_mean():
    # overlap 6 > step 3: frames lie in up to three chunks; an identity output must still come back exact
    clip = random_clip(20)
    out = list(restore_clip(identity(), iter(clip), 20, fit(16, 32), chunk_frames=9, overlap=6,
                            sampling=Sampling(seed=0)))
    assert np.array_equal(np.stack(out), clip)


def test_frames_stream_through_one_chunk_at_a_time():
    frames, chunk, overlap = 100, 21, 5
    pulled, emitted, marks = [], [], []

    def source():
        for index, frame in enumerate(random_clip(frames)):
            pulled.append(index)
            yield frame

    def before_chunk(index, item):
        marks.append((len(pulled), len(emitted)))

    for frame in restore_clip(identity(), source(), frames, fit(16, 32), chunk_frames=chunk, overlap=overlap,
                              sampling=Sampling(seed=0), on_chunk=before_chunk):
        emitted.append(frame)
    for item, (read, handed_on) in zip(plan_chunks(frames, chunk, overlap), marks):
        assert read == item.stop  # nothing is read before a chunk needs it
        assert handed_on == item.start  # what no later chunk touches was handed on before the next chunk
    assert len(emitted) == frames and len(pulled) == frames


def test_cross_fader_refuses_a_gap_and_a_frame_handed_out_twice():
    fader = CrossFader()
    frames = random_clip(4)
    assert len(fader.add(0, frames, np.ones(4), complete_before=4)) == 4
    with pytest.raises(ValueError):
        fader.add(2, frames, np.ones(4), complete_before=6)
    with pytest.raises(ValueError):
        fader.add(6, frames, np.ones(4), complete_before=10)


def test_noise_depends_on_the_position_in_the_clip_not_on_the_chunk():
    # chunks 16 frames apart: latent frame j of the later one encodes up to frame 16 + 4j, as latent j + 4 of
    # the earlier one does
    early, late = positional_noise(5, 0, 9, 3, 4, 16), positional_noise(5, 16, 9, 3, 4, 16)
    assert torch.equal(early[0][:, :, 4:], late[0][:, :, :5])
    assert torch.equal(early[1][4:], late[1][:5])
    other_seed = positional_noise(6, 0, 9, 3, 4, 16)
    assert not torch.equal(early[0], other_seed[0]) and not torch.equal(early[1], other_seed[1])
    assert not torch.equal(early[0][0, :, 0], early[1][0].permute(2, 0, 1))  # eps and noise differ
    assert abs(float(early[1].std()) - 1.0) < 0.1


def test_every_chunk_gets_the_positional_noise_and_the_whole_clip_the_official_draws():
    stand_in = identity()
    list(restore_clip(stand_in, iter(random_clip(30, 48, 64)), 30, fit(48, 64), chunk_frames=13, overlap=5,
                      sampling=Sampling(seed=9)))
    for call, item in zip(stand_in.calls, plan_chunks(30, 13, 5)):
        eps, noise = positional_noise(9, item.start, (call["frames"] - 1 + 3) // 4 + 1, 6, 8, 16)
        assert torch.equal(call["eps"], eps) and torch.equal(call["noise"], noise)
        assert call["sampling"] == Sampling(seed=9)
    whole = identity()
    list(restore_clip(whole, iter(random_clip(30, 48, 64)), 30, fit(48, 64), chunk_frames=33, overlap=5,
                      sampling=Sampling(seed=9)))
    assert len(whole.calls) == 1 and "eps" not in whole.calls[0] and "noise" not in whole.calls[0]


def test_a_source_with_another_frame_count_is_an_error():
    with pytest.raises(ValueError):
        list(restore_clip(identity(), iter(random_clip(12)), 10, fit(16, 32), chunk_frames=5, overlap=1,
                          sampling=Sampling(seed=0)))
    with pytest.raises(ValueError):
        list(restore_clip(identity(), iter(random_clip(8)), 10, fit(16, 32), chunk_frames=5, overlap=1,
                          sampling=Sampling(seed=0)))


# ---- The real pipeline (tiny golden models)

@pytest.fixture(scope="module")
def pipeline(golden):
    def model(case, cls):
        meta = json.loads((golden / case / "meta.json").read_text())
        weights = golden / case / "weights.safetensors"
        return load_strict(cls(**meta["config"]["kwargs"]).eval(), read_state_dict(weights), weights)

    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    return SeedVR2(model("dit3b_tiny", NaDiT3B), model("vae_tiny", VideoAutoencoder), text["pos"], text["neg"],
                   device="cpu")


@pytest.mark.parametrize("frames, chunk", [(9, 9), (7, 21), (1, 5)])
def test_a_chunk_as_long_as_the_clip_is_exactly_the_whole_clip_pass(pipeline, frames, chunk):
    clip = pattern_frames(frames, 64, 48)
    streamed = np.stack(list(restore_clip(pipeline, iter(clip), frames, fit(48, 64), chunk_frames=chunk, overlap=4,
                                          sampling=Sampling(seed=11))))
    whole = pipeline.restore(clip, res_h=48, res_w=64, sampling=Sampling(seed=11)).numpy()
    assert np.array_equal(streamed, whole)


def test_real_pipeline_keeps_count_and_order_through_chunks(pipeline):
    """The output of random weights is noise, but the wavelet colour fix carries each input frame's mean
    colour over: most output frames must be nearest to their own pattern colour, and none of that survives
    a shift by one frame."""
    frames = 30
    out = np.stack(list(restore_clip(pipeline, iter(pattern_frames(frames, 64, 48)), frames, fit(48, 64), chunk_frames=9,
                                     overlap=1, sampling=Sampling(seed=1))))
    assert out.shape == (frames, 48, 64, 3)
    palette = 16  # pattern colours repeat every 16 frames
    nearest = np.array([closest_pattern_frame(frame, palette)[0] for frame in out])
    own = np.arange(frames) % palette
    assert (nearest == own).mean() >= 0.8
    assert (nearest[1:] == own[:-1]).mean() <= 0.2 and (nearest[:-1] == own[1:]).mean() <= 0.2
