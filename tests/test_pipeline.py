"""The restore pipeline on the tiny golden models: stages, RNG, CFG calls, shapes, options."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from seedvr.engine.checkpoint import load_strict, read_state_dict
from seedvr.engine.pipeline import SeedVR2
from seedvr.engine.preprocess import output_size
from seedvr.engine.restorer import Sampling
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.vae import VideoAutoencoder

STAGE_ATOL = 1e-4


class CountingDiT:
    """Remembers the text length and timestep of every call of the real DiT (a forward pre-hook)."""

    def __init__(self, dit: nn.Module):
        self.calls = []
        dit.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, inputs):
        self.calls.append((int(inputs["txt_shape"][0, 0]), float(inputs["timestep"][0])))


@pytest.fixture(scope="module")
def tiny(golden):
    def model(case, cls):
        meta = json.loads((golden / case / "meta.json").read_text())
        weights = golden / case / "weights.safetensors"
        return load_strict(cls(**meta["config"]["kwargs"]).eval(), read_state_dict(weights), weights)

    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    dit = model("dit3b_tiny", NaDiT3B)
    pipeline = SeedVR2(dit, model("vae_tiny", VideoAutoencoder), text["pos"], text["neg"], device="cpu")
    return pipeline, CountingDiT(dit)


@pytest.fixture(scope="module")
def image_run(golden):
    meta = json.loads((golden / "pipeline_tiny" / "meta.json").read_text())
    return meta["runs"]["image_cfg1_steps1"], load_file(golden / "pipeline_tiny" / "image_cfg1_steps1.safetensors")


def restore_image(pipeline, run, **overrides):
    settings, tensors = run
    injected = {name: overrides.pop(name) for name in ("eps", "noise") if name in overrides}
    sampling = Sampling(**({"seed": settings["seed"]} | overrides))
    stages = {}
    out = pipeline.restore(tensors["frames_uint8"].permute(0, 2, 3, 1), res_h=settings["res_h"],
                           res_w=settings["res_w"], sampling=sampling, stages=stages, **injected)
    return out, stages


def assert_stages_match(stages, tensors):
    compared = 0
    for name, expected in tensors.items():
        if name not in stages or expected.dtype == torch.uint8:
            continue
        ours = stages[name].reshape(expected.shape)
        error = (ours.double() - expected.double()).abs().max().item()
        assert error <= STAGE_ATOL, f"{name}: max abs error {error:.3e}"
        compared += 1
    assert compared >= 15


def test_seeded_run_reproduces_the_official_draws_and_stages(tiny, image_run):
    pipeline, _ = tiny
    out, stages = restore_image(pipeline, image_run)
    tensors = image_run[1]
    assert torch.equal(stages["eps_posterior"], tensors["eps_posterior"])  # bit-exact CPU RNG replay
    assert torch.equal(stages["noise"], tensors["noise"])
    assert_stages_match(stages, tensors)
    off = (out.int() - tensors["final_uint8"].int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() <= 1e-3
    assert torch.equal(out, stages["final_uint8"].to(torch.uint8))


def test_injected_eps_and_noise_replace_the_draws(tiny, image_run):
    pipeline, _ = tiny
    tensors = image_run[1]
    _, stages = restore_image(pipeline, image_run, seed=1, eps=tensors["eps_posterior"], noise=tensors["noise"])
    assert_stages_match(stages, tensors)
    _, other = restore_image(pipeline, image_run, seed=1)
    assert not torch.equal(other["noise"], tensors["noise"])  # seed 1 alone draws something else


def test_same_seed_same_frames_other_seed_differs(tiny, image_run):
    pipeline, _ = tiny
    first, _ = restore_image(pipeline, image_run, seed=5)
    again, _ = restore_image(pipeline, image_run, seed=5)
    other, _ = restore_image(pipeline, image_run, seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("cfg_scale, steps, expected", [
    (1.0, 1, [(11, 1000.0)]),
    (1.0, 2, [(11, 1000.0), (11, 500.0)]),
    (2.0, 1, [(11, 1000.0), (13, 1000.0)]),
], ids=["one_step", "two_steps", "cfg"])
def test_dit_calls_per_step_and_guidance(tiny, image_run, cfg_scale, steps, expected):
    pipeline, dit = tiny
    dit.calls.clear()
    restore_image(pipeline, image_run, cfg_scale=cfg_scale, sample_steps=steps)
    assert dit.calls == expected  # (text tokens: 11 positive, 13 negative; timestep)


def test_keeps_frame_count_and_predicted_size(tiny):
    pipeline, _ = tiny
    frames = np.random.default_rng(0).integers(0, 256, (2, 20, 28, 3), dtype=np.uint8)
    timings, stages = {}, {}
    pipeline.restore(frames[:1], res_h=40, res_w=56, stages=stages)  # a reused dict is overwritten
    out = pipeline.restore(frames, res_h=40, res_w=56, timings=timings, stages=stages)
    assert out.dtype == torch.uint8 and out.device.type == "cpu"
    assert out.shape == (2, *output_size(20, 28, 40, 56), 3)
    assert stages["vae_encode_input"].shape[1] == 5  # padded to 4n+1, then trimmed back
    assert stages["decoded"].shape[1] == 5 and stages["color_corrected"].shape[0] == 2
    assert set(timings) == {"preprocess", "vae_encode", "dit", "vae_decode", "postprocess"}
    assert all(seconds >= 0 for seconds in timings.values())


def test_color_fix_options(tiny, image_run):
    pipeline, _ = tiny
    unfixed, stages = restore_image(pipeline, image_run, color_fix="none")
    assert torch.equal(stages["color_corrected"], stages["colorfix_content"])
    adain, _ = restore_image(pipeline, image_run, color_fix="adain")
    wavelet, _ = restore_image(pipeline, image_run)
    assert not torch.equal(unfixed, adain) and not torch.equal(unfixed, wavelet) and not torch.equal(adain, wavelet)
    with pytest.raises(ValueError, match="unknown color_fix"):
        restore_image(pipeline, image_run, color_fix="auto")


def test_rejects_bad_settings(tiny, image_run):
    pipeline, _ = tiny
    with pytest.raises(ValueError, match="injected noise must have shape"):
        restore_image(pipeline, image_run, noise=torch.zeros(1, 4, 8, 15))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        SeedVR2(pipeline.dit, pipeline.vae, pipeline.pos_emb, pipeline.neg_emb, device="cpu", dtype=torch.float16)
