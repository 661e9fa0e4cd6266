"""The causal video VAE against the official goldens (vae_tiny) and its own invariants:
temporal slicing and H-splitting are exact, the model is causal in time, bf16 runs."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import seedvr.models.causal_conv as causal_conv
from seedvr.models.causal_conv import CausalConv3d, FrameGroupNorm, TemporalCache
from seedvr.models.vae import VideoAutoencoder

ATOL = 1e-4


@pytest.fixture(scope="module")
def vae_golden(golden):
    return golden / "vae_tiny"


@pytest.fixture(scope="module")
def meta(vae_golden):
    return json.loads((vae_golden / "meta.json").read_text())


@pytest.fixture(scope="module")
def kwargs(meta):
    return meta["config"]["kwargs"]


@pytest.fixture(scope="module")
def vae(kwargs, vae_golden):
    model = VideoAutoencoder(**kwargs).eval()
    model.load_state_dict(load_file(vae_golden / "weights.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def clip17():
    """17 frames: the encoder sees chunks of 5, 4, 4, 4 frames, the decoder 2, 1, 1, 1 latents."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 17, 32, 48, generator=generator) * 2 - 1


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", ["case_video", "case_image"])
def test_encode_matches_golden_posterior_and_latent(vae, vae_golden, meta, case):
    golden = load_file(vae_golden / f"{case}.safetensors")
    scaling = meta["config"]["runner_vae_config"]["scaling_factor"]
    with torch.no_grad():
        mean, logvar = vae.encode(golden["video"][None])
    std = torch.exp(0.5 * logvar)
    assert mean.shape == golden["posterior_mean"].shape
    assert _max_err(mean, golden["posterior_mean"]) < ATOL
    assert _max_err(logvar, golden["posterior_logvar"]) < ATOL
    assert _max_err(std, golden["posterior_std"]) < ATOL
    cond_latent = (mean + std * golden["eps"])[0].permute(1, 2, 3, 0) * scaling  # (T', h, w, 16)
    assert _max_err(cond_latent, golden["cond_latent"]) < ATOL


@pytest.mark.parametrize("case", ["case_video", "case_image"])
def test_decode_matches_golden(vae, vae_golden, meta, case):
    golden = load_file(vae_golden / f"{case}.safetensors")
    scaling = meta["config"]["runner_vae_config"]["scaling_factor"]
    z = (golden["cond_latent"] / scaling).permute(3, 0, 1, 2)[None]  # (1, 16, T', h, w)
    with torch.no_grad():
        decoded = vae.decode(z)[0]
    expected = golden["decoded"]
    if expected.ndim == 3:  # single image: the golden squeezes the time axis
        assert decoded.shape[1] == 1
        decoded = decoded[:, 0]
    assert decoded.shape == expected.shape
    assert _max_err(decoded, expected) < ATOL


def test_temporal_slicing_equals_one_pass_encode(vae, clip17):
    with torch.no_grad():
        vae.temporal_chunk = None
        whole_mean, whole_logvar = vae.encode(clip17)
        vae.temporal_chunk = 4
        sliced_mean, sliced_logvar = vae.encode(clip17)
    assert sliced_mean.shape == (1, 16, 5, 4, 6)
    assert _max_err(sliced_mean, whole_mean) < 1e-5
    assert _max_err(sliced_logvar, whole_logvar) < 1e-5


def test_temporal_slicing_equals_one_pass_decode(vae, clip17):
    z = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vae.temporal_chunk = None
        whole = vae.decode(z)
        vae.temporal_chunk = 4
        sliced = vae.decode(z)
    assert sliced.shape == (1, 3, 17, 32, 48)
    assert _max_err(sliced, whole) < 2e-5


def test_conv_split_along_height_equals_unsplit(vae, clip17):
    clip = clip17[:, :, :5]
    with torch.no_grad():
        mean, _ = vae.encode(clip)
        decoded = vae.decode(mean)
        vae.conv_max_bytes = 2000  # every conv splits into several row pieces
        try:
            split_mean, _ = vae.encode(clip)
            split_decoded = vae.decode(mean)
        finally:
            vae.conv_max_bytes = causal_conv.GIB // 2
    assert _max_err(split_mean, mean) < 1e-5
    assert _max_err(split_decoded, decoded) < 2e-5


def test_first_latent_frame_sees_only_the_first_frame(vae, clip17):
    with torch.no_grad():
        clip_mean, _ = vae.encode(clip17)
        image_mean, _ = vae.encode(clip17[:, :, :1])
        clip_decoded = vae.decode(clip_mean)
        image_decoded = vae.decode(clip_mean[:, :, :1])
    assert image_mean.shape[2] == 1 and image_decoded.shape[2] == 1
    assert _max_err(image_mean, clip_mean[:, :, :1]) < 1e-5
    assert _max_err(image_decoded, clip_decoded[:, :, :1]) < 2e-5


def test_bfloat16_model_runs_close_to_float32(kwargs, vae_golden):
    golden = load_file(vae_golden / "case_video.safetensors")
    model = VideoAutoencoder(**kwargs).eval()
    model.load_state_dict(load_file(vae_golden / "weights.safetensors"), strict=True)
    model.to(torch.bfloat16)
    with torch.no_grad():
        mean, logvar = model.encode(golden["video"][None])
        decoded = model.decode(golden["posterior_mean"])
    assert mean.dtype == logvar.dtype == decoded.dtype == torch.bfloat16
    model.float()
    with torch.no_grad():
        expected_decoded = model.decode(golden["posterior_mean"])

    def relative_error(ours, reference):
        return ((ours.float() - reference).norm() / reference.norm()).item()

    assert relative_error(mean, golden["posterior_mean"]) < 0.06  # measured 0.027 (bf16 CPU)
    assert relative_error(decoded, expected_decoded) < 0.08  # measured 0.036


def test_causal_conv_replicates_first_frame_and_zero_pads_space():
    conv = CausalConv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 5, 6)
    padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    expected = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    assert _max_err(conv(x), expected) < 1e-6


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        (3, 1, 1),  # resnet conv
        ((3, 3, 3), (2, 2, 2), (1, 0, 0)),  # space-time downsample
        ((1, 3, 3), (1, 2, 2), 0),  # space-only downsample
    ],
)
def test_causal_conv_chunks_and_row_pieces_equal_one_pass(kernel, stride, padding):
    conv = CausalConv3d(3, 4, kernel, stride=stride, padding=padding)
    x = torch.randn(1, 3, 9, 11, 7)
    whole = conv(x)
    cache = TemporalCache()
    chunks = []
    for piece in x.split([4, 3, 2], dim=2):  # uneven on purpose: the carry must follow the stride
        chunks.append(conv(piece, cache))
        cache.next_chunk()
    assert _max_err(torch.cat(chunks, dim=2), whole) < 1e-5
    conv.max_input_bytes = 500
    assert _max_err(conv(x), whole) < 1e-5


def test_frame_group_norm_normalises_each_frame_alone(monkeypatch):
    norm = FrameGroupNorm(2, 4, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 4, 5, 3, 3) * 3 + 1
    expected = torch.stack([F.group_norm(x[:, :, t], 2, norm.weight, norm.bias, 1e-6) for t in range(5)], dim=2)
    assert _max_err(norm(x), expected) < 1e-5
    monkeypatch.setattr(causal_conv, "NORM_CHUNK_BYTES", 1)  # one frame at a time
    assert _max_err(norm(x), expected) < 1e-5
    x_bf16 = x.bfloat16()
    in_fp32 = torch.stack(
        [F.group_norm(x_bf16[:, :, t].float(), 2, norm.weight, norm.bias, 1e-6) for t in range(5)], dim=2
    )
    assert torch.equal(norm(x_bf16), in_fp32.bfloat16())  # stats in fp32, one rounding at the end


def test_rejects_inputs_it_cannot_encode(vae):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 1, 20, 16))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        vae.encode(torch.zeros(3, 1, 16, 16))
    vae.temporal_chunk = 3
    try:
        with pytest.raises(ValueError, match="temporal_chunk"):
            vae.encode(torch.zeros(1, 3, 9, 16, 16))
    finally:
        vae.temporal_chunk = 4


@pytest.mark.parametrize(
    "override, message",
    [
        ({"inflation_mode": "tail"}, "inflation_mode"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownEncoderBlock2D"] * 4}, "down_block_types"),
        ({"spatial_downsample_factor": 16}, "spatial_downsample_factor"),
        ({"temporal_downsample_factor": 2}, "temporal_downsample_factor"),
        ({"norm_num_groups": 5}, "divide"),
    ],
)
def test_rejects_configurations_it_does_not_implement(kwargs, override, message):
    with pytest.raises(ValueError, match=message):
        VideoAutoencoder(**{**kwargs, **override})
