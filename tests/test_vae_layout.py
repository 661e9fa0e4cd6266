"""The VAE's memory-format policy (issue 9, item 1), checked without a GPU: for a CUDA bf16 target every Conv3d
weight and every conv input is channels_last_3d, so PyTorch's cuDNN 9.8-9.14 rule (pytorch #163539, PR #163581)
never sends a VAE conv to slow_conv_dilated3d; on CPU float32 nothing changes. Plus the worker's CUDA settings."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from seedvr.engine import cuda_setup
from seedvr.engine.pipeline import SeedVR2
from seedvr.models.causal_conv import conv_memory_format
from seedvr.models.dit3b import NaDiT3B
from seedvr.models.vae import VideoAutoencoder

CL3D = torch.channels_last_3d
CONV_OPS = {torch.ops.aten.convolution.default, torch.ops.aten.conv3d.default}  # conv3d: under inference_mode
GOLDEN_ATOL = 1e-4  # the VAE parity tolerance (seedvr.tools.parity.VAE_ATOL)


@pytest.fixture(scope="module")
def vae_golden(golden):
    return golden / "vae_tiny"


def load_vae(vae_golden, dtype: torch.dtype = torch.float32) -> VideoAutoencoder:
    meta = json.loads((vae_golden / "meta.json").read_text())
    model = VideoAutoencoder(**meta["config"]["kwargs"]).eval()
    model.load_state_dict(load_file(vae_golden / "weights.safetensors"), strict=True)
    return model.to(dtype)


def clip(frames: int = 13) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, frames, 32, 48, generator=generator) * 2 - 1


class ConvInputs(TorchDispatchMode):
    """Every tensor convolution runs on: (input, weight) of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONV_OPS:
            self.calls.append((args[0], args[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device, dtype, expected", [
    ("cuda", torch.bfloat16, CL3D), ("cuda", torch.float16, CL3D), ("cuda:1", torch.bfloat16, CL3D),
    ("cuda", torch.float32, torch.contiguous_format), ("cpu", torch.bfloat16, torch.contiguous_format),
    ("cpu", torch.float32, torch.contiguous_format),
])
def test_channels_last_3d_exactly_for_half_precision_on_cuda(device, dtype, expected):
    assert conv_memory_format(device, dtype) == expected


@pytest.mark.parametrize("conv_max_bytes", [None, 4096], ids=["whole", "split-along-H"])
def test_a_vae_for_cuda_bf16_runs_every_conv_in_channels_last_3d(vae_golden, conv_max_bytes):
    vae = load_vae(vae_golden, torch.bfloat16)
    vae.memory_format = conv_memory_format("cuda", torch.bfloat16)  # what SeedVR2 sets on a CUDA device
    if conv_max_bytes is not None:
        vae.conv_max_bytes = conv_max_bytes
    convs = [module for module in vae.modules() if isinstance(module, torch.nn.Conv3d)]
    assert convs and all(conv.weight.is_contiguous(memory_format=CL3D) for conv in convs)
    kernels = [conv for conv in convs if max(conv.kernel_size) > 1]
    assert all(not conv.weight.is_contiguous() for conv in kernels)  # not merely ambiguous (the 1x1x1 ones are)

    seen: list[tuple[str, torch.Tensor]] = []  # what each conv module is called with, before its own padding
    hooks = [conv.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0])))
             for name, conv in vae.named_modules() if isinstance(conv, torch.nn.Conv3d)]
    calls = ConvInputs()
    try:
        with torch.no_grad(), calls:
            mean, _ = vae.encode(clip(13).to(torch.bfloat16))  # chunks of 5, 4, 4 frames: the first and later ones
            decoded = vae.decode(mean)
    finally:
        for hook in hooks:
            hook.remove()
    assert {name for name, _ in seen} == {name for name, module in vae.named_modules() if module in convs}
    not_cl3d = sorted({name for name, x in seen if not x.is_contiguous(memory_format=CL3D)})
    assert not_cl3d == [], f"convs fed NCDHW inputs (a layout copy before each on CUDA): {not_cl3d}"
    assert len(calls.calls) >= len(seen)
    assert all(x.is_contiguous(memory_format=CL3D) and w.is_contiguous(memory_format=CL3D) for x, w in calls.calls)
    assert mean.is_contiguous() and decoded.is_contiguous()  # NCDHW out: the pipeline draws its noise like it


def test_channels_last_3d_changes_layouts_not_values_in_float32(vae_golden):
    golden = load_file(vae_golden / "case_video.safetensors")
    vae = load_vae(vae_golden)
    with torch.no_grad():
        reference = vae.encode(golden["video"][None])[0], vae.decode(golden["cond_latent"].permute(3, 0, 1, 2)[None])
        vae.memory_format = CL3D
        channels_last = vae.encode(golden["video"][None])[0], vae.decode(golden["cond_latent"].permute(3, 0, 1, 2)[None])
        vae.memory_format = torch.contiguous_format
        back = vae.encode(golden["video"][None])[0], vae.decode(golden["cond_latent"].permute(3, 0, 1, 2)[None])
    for ours, theirs in zip(channels_last, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(channels_last[0], golden["posterior_mean"], rtol=0, atol=GOLDEN_ATOL)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(back, reference))  # the default path, bit for bit
    assert all(module.weight.is_contiguous() for module in vae.modules() if isinstance(module, torch.nn.Conv3d))


def test_other_memory_formats_are_refused(vae_golden):
    vae = load_vae(vae_golden)
    with pytest.raises(ValueError, match="VAE memory format must be one of"):
        vae.memory_format = torch.channels_last


def test_the_pipeline_sets_the_layout_for_its_device(vae_golden, golden):
    vae = load_vae(vae_golden)
    vae.memory_format = CL3D
    meta = json.loads((golden / "dit3b_tiny" / "meta.json").read_text())
    dit = NaDiT3B(**meta["config"]["kwargs"]).eval()
    text = load_file(golden / "pipeline_tiny" / "text_embeds.safetensors")
    SeedVR2(dit, vae, text["pos"], text["neg"], device="cpu", dtype=torch.float32)
    assert vae.memory_format == torch.contiguous_format


@pytest.mark.parametrize("environ, expected", [
    ({}, cuda_setup.EXPANDABLE_SEGMENTS),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512"),  # the user's choice stays
    ({"PYTORCH_CUDA_ALLOC_CONF": ""}, ""),  # set, even if empty: the user's
])
def test_allocator_defaults_respect_the_users_setting(environ, expected):
    changed = cuda_setup.set_allocator_defaults(environ)
    assert environ[cuda_setup.ALLOC_CONF_VARIABLE] == expected
    assert changed == (expected == cuda_setup.EXPANDABLE_SEGMENTS)


def test_allocator_defaults_go_to_the_process_environment(monkeypatch):
    monkeypatch.setenv(cuda_setup.ALLOC_CONF_VARIABLE, "restored after the test")
    monkeypatch.delenv(cuda_setup.ALLOC_CONF_VARIABLE)
    assert cuda_setup.set_allocator_defaults()
    assert os.environ[cuda_setup.ALLOC_CONF_VARIABLE] == "expandable_segments:True"


def test_cudnn_benchmark_is_switched_on(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda_setup.enable_cudnn_benchmark()
    assert torch.backends.cudnn.benchmark is True


def test_a_large_upscale_conv_is_computed_in_exact_pieces(monkeypatch):
    from seedvr.models import causal_conv
    from seedvr.models.vae_blocks import Upsample3D

    torch.manual_seed(0)
    upsample = Upsample3D(4, temporal=True).eval()
    x = torch.randn(1, 4, 3, 8, 6)
    with torch.no_grad():
        whole = upsample(x)
        calls = []
        real = torch.nn.Conv3d.forward
        monkeypatch.setattr(torch.nn.Conv3d, "forward", lambda self, *a: calls.append(self) or real(self, *a))
        upsample.max_output_bytes = 4 * 32 * 3 * 6  # a few rows of the upscale conv's output per piece
        pieces = upsample(x)
        assert sum(call is upsample.upscale_conv for call in calls) == 8  # one piece per row
        calls.clear()
        upsample.max_output_bytes = causal_conv.GIB
        monkeypatch.setattr(causal_conv, "MAX_CONV_ELEMENTS", 1000)  # the 2**31 bound, scaled down
        bounded = upsample(x)
        assert sum(call is upsample.upscale_conv for call in calls) > 1
    assert torch.equal(whole, pieces) and torch.equal(whole, bounded)


def test_a_conv_whose_output_would_pass_the_element_bound_is_split_exactly(monkeypatch):
    from seedvr.models import causal_conv
    from seedvr.models.causal_conv import CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(3, 8, 3, padding=1).eval()
    x = torch.randn(1, 3, 5, 16, 12)
    with torch.no_grad():
        whole = conv(x)
        seen = []
        real = torch.nn.functional.conv3d
        monkeypatch.setattr(causal_conv.F, "conv3d", lambda *a, **k: seen.append(1) or real(*a, **k))
        monkeypatch.setattr(causal_conv, "MAX_CONV_ELEMENTS", whole.numel() // 4)
        split = conv(x)
    assert len(seen) >= 4 and torch.equal(whole, split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_with_its_silu_gives_exactly_silu_of_the_norm(dtype):
    from seedvr.models.causal_conv import FrameGroupNorm

    torch.manual_seed(0)
    plain = FrameGroupNorm(4, 16, eps=1e-6)
    fused = FrameGroupNorm(4, 16, eps=1e-6, silu=True)
    with torch.no_grad():
        plain.weight.copy_(1 + 0.1 * torch.randn(16))
        plain.bias.copy_(0.1 * torch.randn(16))
        fused.load_state_dict(plain.state_dict())
        x = torch.randn(1, 16, 3, 8, 8).to(dtype)
        assert torch.equal(fused.to(dtype)(x), torch.nn.functional.silu(plain.to(dtype)(x)))
