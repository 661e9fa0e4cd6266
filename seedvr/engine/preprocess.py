"""Frames to model input and back: the official SeedVR2 input transform.

    uint8 (f, H, W, 3) -> /255 -> area resize -> clamp [0, 1] -> centre crop to multiples of 16
                       -> (x - 0.5) / 0.5 -> (3, f, Hc, Wc) float32 in [-1, 1]

then padding to 4n+1 frames for the causal VAE, and after restoration the conversion back to uint8.
Shapes: f = frames, H W = input size, Hr Wr = resized, Hc Wc = cropped (the output size).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

CROP_MULTIPLE = 16  # the VAE halves the size 3 times and the DiT patches 2x2 latents: 8 * 2
VAE_TEMPORAL_STRIDE = 4  # the causal VAE maps 4n+1 frames to n+1 latent frames


def resized_size(height: int, width: int, res_h: int, res_w: int) -> tuple[int, int]:
    """Size after the area resize: same aspect ratio, area about res_h * res_w (up- or downscaling)."""
    # The official transform receives resolution = sqrt(res_h * res_w) and squares it again; the float
    # round trip is kept because round() below can flip on the last bit.
    resolution = (res_h * res_w) ** 0.5
    max_area = resolution**2
    scale = math.sqrt(max_area / (height * width))
    return round(height * scale), round(width * scale)


def output_size(height: int, width: int, res_h: int, res_w: int) -> tuple[int, int]:
    """The (Hc, Wc) that `preprocess` and the restored frames will have, computed without pixels."""
    resized_h, resized_w = resized_size(height, width, res_h, res_w)
    return resized_h - resized_h % CROP_MULTIPLE, resized_w - resized_w % CROP_MULTIPLE


def area_resize(frames: torch.Tensor, res_h: int, res_w: int) -> torch.Tensor:
    """(f, 3, H, W) float -> (f, 3, Hr, Wr): antialiased bicubic (Keys a = -0.5); no-op at equal size."""
    height, width = frames.shape[-2:]
    size = resized_size(height, width, res_h, res_w)
    if size == (height, width):
        return frames
    return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)


def center_crop(frames: torch.Tensor, multiple: int = CROP_MULTIPLE) -> torch.Tensor:
    """(..., H, W) -> (..., H - H % multiple, W - W % multiple), offsets rounded half to even."""
    height, width = frames.shape[-2:]
    crop_h, crop_w = height - height % multiple, width - width % multiple
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return frames[..., top : top + crop_h, left : left + crop_w]


def preprocess(frames: torch.Tensor | np.ndarray, res_h: int, res_w: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (f, H, W, 3) frames (torch or numpy) -> (3, f, Hc, Wc) float32 in [-1, 1] on `device`."""
    if not isinstance(frames, torch.Tensor):
        frames = torch.from_numpy(np.ascontiguousarray(frames))  # also takes views with negative strides
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 frames of shape (f, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    crop_h, crop_w = output_size(height, width, res_h, res_w)
    if crop_h == 0 or crop_w == 0:
        raise ValueError(
            f"a {height}x{width} input at res {res_h}x{res_w} resizes to less than {CROP_MULTIPLE} px on one side"
        )
    video = frames.to(device).permute(0, 3, 1, 2) / 255.0  # (f, 3, H, W) float32
    video = area_resize(video, res_h, res_w).clamp(0.0, 1.0)
    video = (center_crop(video) - 0.5) / 0.5
    return video.transpose(0, 1).contiguous()  # (3, f, Hc, Wc)


def padded_frame_count(num_frames: int, sp: int = 1) -> int:
    """Frames after `pad_frames`: 1 stays 1, else the next 4*sp*k + 1 (at least 4*sp + 1)."""
    if num_frames == 1:
        return 1
    chunk = VAE_TEMPORAL_STRIDE * sp
    return max(chunk, math.ceil((num_frames - 1) / chunk) * chunk) + 1


def pad_frames(video: torch.Tensor, sp: int = 1) -> torch.Tensor:
    """(c, f, H, W) -> (c, f_pad, H, W) by repeating the last frame; sp = sequence-parallel size."""
    missing = padded_frame_count(video.shape[1], sp) - video.shape[1]
    if missing == 0:
        return video
    return torch.cat([video, video[:, -1:].expand(-1, missing, -1, -1)], dim=1)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(f, 3, H, W) in [-1, 1] -> (f, H, W, 3) uint8, in the official order (in the input's dtype)."""
    pixels = frames.permute(0, 2, 3, 1).clip(-1, 1)
    return pixels.mul(0.5).add_(0.5).mul_(255).round_().to(torch.uint8)
