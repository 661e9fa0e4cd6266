"""Restoration strength (`cond_noise_scale`): SeedVR2's resolution-dependent timestep shift at its anchor
points, the condition mix on the tiny golden models, scale 0 as the official path bit for bit, and the
position-keyed aug noise of chunked runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seedvr.engine import diffusion
from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.engine.chunking import plan_chunks, positional_aug_noise, positional_noise, restore_clip
from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.restorer import Sampling, latent_shape
from seedvr.engine.sizing import ItemSize
from seedvr.io.delivery import Delivered
from seedvr.io.outputs import OutputFile
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.vae import VideoAutoencoder
from seedvr.serving.answer import ItemResult, restore_answer
from seedvr.serving.model_holder import LoadedModel, ModelSpec
from seedvr.serving.schema import parse_request
from seedvr.serving.specs import restore_spec

T = 1000.0
HALF = Sampling(seed=666, cond_noise_scale=0.5)


def shift_from_anchors(pixels: float, anchors) -> float:
    """The line through the two anchors, written out in float64 (not read from diffusion.py)."""
    (x1, y1), (x2, y2) = anchors
    return y1 + (y2 - y1) * (pixels - x1) / (x2 - x1)


def shifted(t: float, shift: float) -> float:
    u = t / T
    return T * shift * u / (1 + (shift - 1) * u)


IMAGE = ((256 * 256, 1.0), (1024 * 1024, 3.2))
VIDEO = ((256 * 256 * 37, 1.0), (1280 * 720 * 145, 5.0))


# ---- The shift and the transform (seedvr.engine.diffusion)

@pytest.mark.parametrize("frames, height, width, shift", [
    (1, 256, 256, 1.0),  # image fit, lower anchor: 256^2 px
    (1, 1024, 1024, 3.2),  # image fit, upper anchor: 1024^2 px
    (37, 256, 256, 1.0),  # video fit, lower anchor: 256^2 px x 37 frames (10 latent frames)
    (145, 720, 1280, 5.0),  # video fit, upper anchor: 720p x 145 frames (37 latent frames)
], ids=["image_low", "image_high", "video_low", "video_high"])
def test_shift_passes_through_the_anchors_of_its_fit(frames, height, width, shift):
    measured = diffusion.resolution_shift(frames, height, width)
    assert measured.dtype == torch.float32 and measured.item() == pytest.approx(shift, abs=1e-6)
    t = diffusion.timestep_transform(torch.tensor([500.0]), measured)
    assert t.item() == pytest.approx(shifted(500.0, shift), abs=1e-3)


def test_images_take_the_image_fit_and_clips_the_video_fit():
    image = diffusion.resolution_shift(1, 1024, 1024).item()
    clip = diffusion.resolution_shift(5, 1024, 1024).item()  # 2 latent frames: 5 pixel frames
    assert image == pytest.approx(3.2, abs=1e-6)
    assert clip == pytest.approx(shift_from_anchors(1024 * 1024 * 5, VIDEO), rel=1e-6)
    assert clip < image  # 5 frames of 1 Mpx lie below the video fit's 37-frame anchor
    long_clip = diffusion.resolution_shift(121, 720, 1280).item()
    assert long_clip == pytest.approx(shift_from_anchors(1280 * 720 * 121, VIDEO), rel=1e-6)
    assert long_clip > diffusion.resolution_shift(21, 720, 1280).item() > 1.0  # more frames, more shift


@pytest.mark.parametrize("shift", [0.93, 1.0, 2.26, 3.2, 5.0, 17.1])
def test_transform_keeps_both_ends_and_shifts_towards_T_above_one(shift):
    shift_t = torch.tensor(shift)
    ends = diffusion.timestep_transform(torch.tensor([0.0, T]), shift_t)
    assert ends[0].item() == 0.0 and ends[1].item() == pytest.approx(T, rel=1e-6)
    middle = diffusion.timestep_transform(torch.tensor([100.0, 500.0, 900.0]), shift_t)
    expected = [shifted(t, shift) for t in (100.0, 500.0, 900.0)]
    assert middle.tolist() == pytest.approx(expected, rel=1e-5)
    if shift != 1.0:
        assert ((middle > torch.tensor([100.0, 500.0, 900.0])) == (shift > 1.0)).all()


@pytest.mark.parametrize("scale", [0.0, 0.1, 0.5, 1.0])
def test_condition_timestep_at_720p_121_frames(scale):
    shift = shift_from_anchors(1280 * 720 * 121, VIDEO)  # about 4.33
    measured = diffusion.condition_timestep(scale, 121, 720, 1280)
    assert measured.shape == (1,) and measured.item() == pytest.approx(shifted(T * scale, shift), abs=1e-3)


# ---- The mix in the pipeline (tiny golden models)

@pytest.fixture(scope="module")
def pipeline(golden):
    def model(case, cls):
        meta = json.loads((golden / case / "meta.json").read_text())
        weights = golden / case / "weights.safetensors"
        return load_strict(cls(**meta["config"]["kwargs"]).eval(), read_state_dict(weights), weights)

    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    return SeedVR2(model("dit3b_tiny", NaDiT3B), model("vae_tiny", VideoAutoencoder), text["pos"], text["neg"],
                   device="cpu")


@pytest.fixture(scope="module")
def image(golden):
    """The golden image run's input: one 36x52 frame restored at the 48x64 area."""
    return load_file(golden / "pipeline_tiny" / "image_cfg1_steps1.safetensors")["frames_uint8"].permute(0, 2, 3, 1)


def restore(pipeline, frames, sampling, **options):
    stages = {}
    out = pipeline.restore(frames, res_h=48, res_w=64, sampling=sampling, stages=stages, **options)
    return out, stages


@pytest.fixture(scope="module")
def plain(pipeline, image):
    return restore(pipeline, image, Sampling(seed=666))


@pytest.fixture(scope="module")
def half(pipeline, image):
    return restore(pipeline, image, HALF)


def test_aug_noise_is_the_third_official_draw(half):
    """Official order from one seeded generator: posterior eps (contiguous), then x_T noise and aug noise, each
    drawn like the channels-last view of the channels-first latent."""
    _, stages = half
    generator = torch.Generator().manual_seed(666)
    latent = stages["posterior_mean"]  # (1, 16, t, h, w)
    torch.randn(latent.shape, generator=generator)
    draws = [torch.empty(latent.shape[1:]).permute(1, 2, 3, 0).normal_(generator=generator) for _ in range(2)]
    assert torch.equal(stages["noise"], draws[0]) and torch.equal(stages["aug_noise"], draws[1])


def test_condition_is_the_lerp_towards_the_aug_noise_at_the_shifted_level(half):
    _, stages = half
    cond_latent, aug, condition = stages["cond_latent"], stages["aug_noise"], stages["condition"]
    t, h, w = cond_latent.shape[:3]
    level = shifted(T * 0.5, shift_from_anchors(8 * h * 8 * w, IMAGE)) / T  # an image: the image fit (32x64 px)
    assert stages["cond_noise_timestep"].item() / T == pytest.approx(level, abs=1e-6)
    expected = (1 - level) * cond_latent.double() + level * aug.double()
    assert (condition[..., :16].double() - expected).abs().max().item() <= 2e-6
    assert torch.equal(condition[..., 16], torch.ones(t, h, w))  # the mask channel stays 1
    assert (condition[..., :16] - cond_latent).abs().max().item() > 0.1  # the mix did move the condition


def test_scale_zero_is_the_official_path_bit_for_bit(pipeline, image, plain, half):
    out, stages = plain
    assert Sampling().cond_noise_scale == 0.0
    assert stages["cond_noise_timestep"].item() == 0.0
    # The DiT's input is [x_T | cond latent | 1] built from the clean latent, exactly: then so is its output,
    # and everything after it.
    cond_latent = stages["cond_latent"].flatten(0, 2)
    unmixed = torch.cat([stages["noise"].flatten(0, 2), cond_latent, torch.ones_like(cond_latent[:, :1])], dim=-1)
    assert torch.equal(stages["dit0_vid"], unmixed)
    # Whatever the aug noise holds, at 0 it cannot reach the output; at 0.5 it does.
    loud = torch.full_like(stages["aug_noise"], 1e4)
    assert torch.equal(restore(pipeline, image, Sampling(seed=666), aug_noise=loud)[0], out)
    assert not torch.equal(restore(pipeline, image, HALF, aug_noise=loud)[0], half[0])
    assert not torch.equal(half[0], out)


def test_scale_outside_zero_to_one_is_refused(pipeline, image):
    for scale in (-0.1, 1.5):
        with pytest.raises(ValueError, match="cond_noise_scale must be between 0.0 and 1.0"):
            pipeline.restore(image, res_h=48, res_w=64, sampling=Sampling(cond_noise_scale=scale))


# ---- Chunked runs: position-keyed aug noise, the whole clip's level

class Recorder:
    """A Restorer's restore and latent_shape that gives the frames back and records each call's options."""

    def __init__(self):
        self.calls = []

    def latent_shape(self, frames, height, width):
        return latent_shape(frames, height, width, 8, 16)

    def restore(self, frames, **options):
        self.calls.append(options)
        return torch.from_numpy(np.ascontiguousarray(frames))


def test_aug_noise_is_keyed_by_the_position_in_the_clip():
    # chunks 16 frames apart: latent frame j of the later one encodes up to frame 16 + 4j, as latent j + 4 of
    # the earlier one does
    early, late = positional_aug_noise(5, 0, 9, 3, 4, 16), positional_aug_noise(5, 16, 9, 3, 4, 16)
    assert early.shape == (9, 3, 4, 16) and torch.equal(early[4:], late[:5])
    assert not torch.equal(early, positional_aug_noise(6, 0, 9, 3, 4, 16))
    eps, noise = positional_noise(5, 0, 9, 3, 4, 16)
    assert not torch.equal(early, noise) and not torch.equal(early[0], eps[0, :, 0].permute(1, 2, 0))
    assert abs(float(early.std()) - 1.0) < 0.1


@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_every_chunk_gets_its_positional_aug_noise_and_the_whole_clips_level(scale):
    recorder = Recorder()
    clip = np.random.default_rng(0).integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    out = list(restore_clip(recorder, iter(clip), 30, ItemSize(48, 64, 48, 64), chunk_frames=13, overlap=5,
                            sampling=Sampling(seed=9, cond_noise_scale=scale)))
    assert len(out) == 30
    chunks = plan_chunks(30, 13, 5)
    assert len(recorder.calls) == len(chunks) == 4
    for call, chunk in zip(recorder.calls, chunks):
        assert call["clip_latent_frames"] == 9  # 30 frames -> 33 padded -> 9 latent frames, for every chunk
        if scale:
            grid = recorder.latent_shape(chunk.frames, 48, 64)
            expected = positional_aug_noise(9, chunk.start, grid.frames, grid.height, grid.width, grid.channels)
            assert torch.equal(call["aug_noise"], expected)
        else:
            assert call["aug_noise"] is None  # multiplied by 0: the restorer's own draw stands in


def test_a_chunk_is_noised_at_the_whole_clips_level(pipeline, image, half):
    """A one-frame last chunk of a 29-frame clip (8 latent frames): the video fit at 29 frames, not the image
    fit its single frame alone would take."""
    out, chunk = restore(pipeline, image, HALF, clip_latent_frames=8)
    alone = half[1]
    pixels = 8 * chunk["cond_latent"].shape[1] * 8 * chunk["cond_latent"].shape[2]
    assert alone["cond_noise_timestep"].item() == pytest.approx(
        shifted(T * 0.5, shift_from_anchors(pixels, IMAGE)), abs=1e-3)
    assert chunk["cond_noise_timestep"].item() == pytest.approx(
        shifted(T * 0.5, shift_from_anchors(pixels * 29, VIDEO)), abs=1e-3)
    assert torch.equal(chunk["aug_noise"], alone["aug_noise"]) and torch.equal(chunk["cond_latent"],
                                                                               alone["cond_latent"])
    assert not torch.equal(out, half[0])


def test_a_chunk_as_long_as_the_clip_is_exactly_the_whole_clip_pass_at_half_strength(pipeline, image, plain, half):
    streamed = np.stack(list(restore_clip(pipeline, iter(image.numpy()), 1, ItemSize(48, 64, 48, 64),
                                          chunk_frames=5, overlap=4, sampling=HALF)))
    assert np.array_equal(streamed, half[0].numpy())
    assert not np.array_equal(streamed, plain[0].numpy())


# ---- The request field

def test_request_field_reaches_sampling_and_the_answer(pipeline):
    spec = restore_spec(parse_request({"action": "restore", "media": "aGVsbG8=", "cond_noise_scale": 0.25}))
    assert spec.sampling.cond_noise_scale == 0.25
    assert restore_spec(parse_request({"action": "restore", "media": "aGVsbG8="})).sampling.cond_noise_scale == 0.0
    model = LoadedModel(ModelSpec("seedvr2_3b", "normal", 1, "sdpa"), pipeline)
    result = ItemResult("image", 64, 32, OutputFile(Path("out.png"), "image/png"), None, {"timings": {}},
                        Delivered("base64", "aGVsbG8=", 5))
    answer = restore_answer(spec, model, [result], 1.0)
    assert answer["processing_info"]["cond_noise_scale"] == 0.25
