"""Colour fix against the official golden and against a direct numpy re-computation of the blur."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seedvr.engine.colorfix import color_fix, wavelet_blur, wavelet_decomposition


@pytest.fixture(scope="module")
def colorfix_case(golden):
    return load_file(golden / "colorfix" / "case.safetensors")


@pytest.mark.parametrize("suffix", ["", "_small"], ids=["3x3x40x56", "1x3x12x20_smaller_than_dilation"])
def test_wavelet_matches_official_color_fix(colorfix_case, suffix):
    content, style, expected = (colorfix_case[name + suffix] for name in ("content", "style", "output"))
    ours = color_fix(content, style, "wavelet")
    error = (ours - expected).abs().max().item()
    print(f"colorfix{suffix}: max abs error {error:.3e}")
    assert error <= 1e-6
    assert (expected - content).abs().max() > 0.05  # the fix changes something


def numpy_blur(image: np.ndarray, dilation: int) -> np.ndarray:
    """Independent blur: edge padding, then the 9 dilated taps of [1,2,1]^T[1,2,1]/16 summed explicitly."""
    padded = np.pad(image.astype(np.float64), ((0, 0), (0, 0), (dilation, dilation), (dilation, dilation)), mode="edge")
    height, width = image.shape[-2:]
    taps = np.array([1.0, 2.0, 1.0])
    out = np.zeros(image.shape)
    for i in range(3):
        for j in range(3):
            out += taps[i] * taps[j] / 16 * padded[..., i * dilation : i * dilation + height, j * dilation : j * dilation + width]
    return out


@pytest.mark.parametrize("dilation", [1, 2, 4, 16])
def test_wavelet_blur_equals_direct_dilated_sum(dilation):
    image = torch.randn(2, 3, 9, 13, generator=torch.Generator().manual_seed(dilation))
    ours = wavelet_blur(image, dilation).double().numpy()
    assert np.abs(ours - numpy_blur(image.numpy(), dilation)).max() < 1e-6


def test_wavelet_decomposition_sums_back_to_the_image():
    image = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    high, low = wavelet_decomposition(image)
    assert (high + low - image).abs().max() < 1e-5
    assert low.std() < image.std() / 2  # the lowest band is smooth


def test_wavelet_with_content_as_style_returns_the_content():
    image = torch.randn(1, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    assert (color_fix(image, image, "wavelet") - image).abs().max() < 1e-5


def test_bf16_content_branch_promotes_to_float32(colorfix_case):
    content, style = colorfix_case["content"], colorfix_case["style"]
    ours = color_fix(content.bfloat16(), style, "wavelet")
    assert ours.dtype == torch.float32
    assert (ours - colorfix_case["output"]).abs().max() < 0.05  # bf16 rounding only


def test_adain_gives_content_the_style_statistics():
    generator = torch.Generator().manual_seed(3)
    content = torch.randn(2, 3, 16, 16, generator=generator) * 0.3 + 0.2
    style = torch.randn(2, 3, 16, 16, generator=generator) * 0.6 - 0.1
    ours = color_fix(content, style, "adain")
    assert torch.allclose(ours.mean(dim=(2, 3)), style.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(ours.std(dim=(2, 3)), style.std(dim=(2, 3)), atol=1e-3)
    # the content's structure is kept: per channel, a positive affine map of it
    correlation = torch.corrcoef(torch.stack([ours[0, 0].flatten(), content[0, 0].flatten()]))[0, 1]
    assert correlation > 0.9999


def test_none_returns_content_and_unknown_method_raises():
    content, style = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert color_fix(content, style, "none") is content
    with pytest.raises(ValueError, match="wavelet, adain, none"):
        color_fix(content, style, "histogram")
    with pytest.raises(ValueError, match="same shape"):
        color_fix(content, style[:, :, :4], "wavelet")
