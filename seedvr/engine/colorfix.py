"""Colour correction of restored frames against the (preprocessed) input frames.

All methods take content and style as (f, c, H, W) in [-1, 1] and work frame by frame.
- wavelet: the content's high frequencies plus the style's lowest band (the reference behaviour).
- adain: per frame and channel, the content's mean/std replaced by the style's.
- none: the content unchanged.
"""

import torch
import torch.nn.functional as F

METHODS = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5  # dilations 1, 2, 4, 8, 16
ADAIN_EPS = 1e-5  # added to the variance


def wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """(f, c, H, W) -> same: depthwise 3x3 [1,2,1]^T[1,2,1]/16 blur, dilated, on replicate-padded input."""
    channels = image.shape[1]
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device)
    kernel = (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decomposition(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (sum of the band-pass levels, lowest band); their sum is the image."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Content detail on the style's colours; each branch runs in its own dtype, the sum promotes."""
    content_high, _ = wavelet_decomposition(content)
    _, style_low = wavelet_decomposition(style)
    return content_high + style_low


def _channel_mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = image.flatten(2)  # (f, c, H*W)
    mean = pixels.mean(dim=2)[..., None, None]
    std = (pixels.var(dim=2) + ADAIN_EPS).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per frame and channel: normalise the content, then give it the style's mean and std (in float32)."""
    content, style = content.float(), style.float()
    content_mean, content_std = _channel_mean_std(content)
    style_mean, style_std = _channel_mean_std(style)
    return (content - content_mean) / content_std * style_std + style_mean


def color_fix(content: torch.Tensor, style: torch.Tensor, method: str) -> torch.Tensor:
    """Correct `content` (f, c, H, W) towards `style` (same shape) with one of METHODS."""
    if content.shape != style.shape:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} must have the same shape")
    match method:
        case "wavelet":
            return wavelet_color_fix(content, style)
        case "adain":
            return adain_color_fix(content, style)
        case "none":
            return content
        case _:
            raise ValueError(f"unknown colour fix {method!r}; must be one of {', '.join(METHODS)}")
