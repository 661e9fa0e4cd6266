"""The input transform against the official golden, and its pieces against independent computations."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seedvr.engine.preprocess import (
    area_resize,
    center_crop,
    output_size,
    pad_frames,
    padded_frame_count,
    preprocess,
    resized_size,
    to_uint8,
)


@pytest.fixture(scope="module")
def preprocess_case(golden):
    meta = json.loads((golden / "preprocess" / "meta.json").read_text())
    return meta["cases"], load_file(golden / "preprocess" / "case.safetensors")


@pytest.mark.parametrize("case", ["upscale_video", "downscale_video", "same_size_image"])
def test_preprocess_matches_official_transform(preprocess_case, case):
    cases, tensors = preprocess_case
    settings, expected = cases[case], tensors[f"{case}_out"]
    assert expected.std() > 0.1  # a real image, not a constant
    ours = preprocess(tensors[f"{case}_frames"].permute(0, 2, 3, 1), settings["res_h"], settings["res_w"])
    error = (ours - expected).abs().max().item()
    print(f"{case}: max abs error {error:.3e}")
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert error <= 1e-6


def test_preprocess_accepts_numpy_frames(preprocess_case):
    _, tensors = preprocess_case
    frames = tensors["upscale_video_frames"].permute(0, 2, 3, 1)
    assert torch.equal(preprocess(frames.numpy(), 64, 88), preprocess(frames, 64, 88))
    bgr = frames.flip(-1).numpy()
    assert torch.equal(preprocess(bgr[..., ::-1], 64, 88), preprocess(frames, 64, 88))  # negative strides


def test_resized_size_keeps_area_and_aspect():
    assert resized_size(40, 56, 64, 88) == (63, 89)  # README: 40x56 at 64x88 -> 63x89
    assert resized_size(720, 1280, 1280, 720) == (720, 1280)
    height, width = resized_size(480, 640, 720, 1280)
    assert abs(height * width - 720 * 1280) < height + width and abs(width / height - 640 / 480) < 0.01


@pytest.mark.parametrize("height, width, res_h, res_w", [(40, 56, 64, 88), (120, 100, 48, 64), (37, 91, 200, 120),
                                                         (1, 3, 50, 50), (300, 40, 64, 64)])
def test_output_size_predicts_preprocess_shape(height, width, res_h, res_w):
    frames = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8)
    assert preprocess(frames, res_h, res_w).shape[2:] == output_size(height, width, res_h, res_w)


def test_area_resize_returns_input_unchanged_at_same_size():
    frames = torch.rand(1, 3, 48, 64)
    assert area_resize(frames, 48, 64) is frames
    assert area_resize(frames, 96, 128).shape == (1, 3, 96, 128)


@pytest.mark.parametrize("height, top", [(48, 0), (49, 0), (50, 1), (51, 2), (52, 2), (53, 2), (63, 8)])
def test_center_crop_offset_rounds_half_to_even(height, top):
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, 32)
    cropped = center_crop(rows)
    assert cropped.shape == (height - height % 16, 32)
    assert cropped[0, 0].item() == top


@pytest.mark.parametrize("frames, sp, expected", [(1, 1, 1), (2, 1, 5), (4, 1, 5), (5, 1, 5), (6, 1, 9), (9, 1, 9),
                                                  (10, 1, 13), (2, 2, 9), (9, 2, 9), (10, 2, 17), (13, 4, 17)])
def test_padded_frame_count_is_next_4n_plus_1(frames, sp, expected):
    assert padded_frame_count(frames, sp) == expected


def test_pad_frames_repeats_the_last_frame():
    video = torch.rand(3, 6, 16, 16)
    padded = pad_frames(video)
    assert padded.shape == (3, 9, 16, 16)
    assert torch.equal(padded[:, :6], video)
    assert all(torch.equal(padded[:, i], video[:, 5]) for i in range(6, 9))
    single = torch.rand(3, 1, 16, 16)
    assert pad_frames(single) is single


def test_to_uint8_matches_numpy_and_official_order():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 3, 5, 7, generator=generator) * 0.7
    frames[0, 0, 0, :4] = torch.tensor([-3.0, -1.0, 0.0, 1.0])  # clipped, black, 127.5 (half to even), white
    expected = np.round((np.clip(frames.numpy(), -1, 1) * np.float32(0.5) + np.float32(0.5)) * np.float32(255))
    ours = to_uint8(frames)
    assert ours.dtype == torch.uint8 and ours.shape == (2, 5, 7, 3)
    assert np.array_equal(ours.numpy(), expected.astype(np.uint8).transpose(0, 2, 3, 1))
    assert ours[0, 0, :4, 0].tolist() == [0, 0, 128, 255]


def test_preprocess_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 16, 16, 3), 64, 64)
    with pytest.raises(ValueError, match=r"\(f, H, W, 3\)"):
        preprocess(torch.zeros(1, 16, 16, 4, dtype=torch.uint8), 64, 64)
    with pytest.raises(ValueError, match="less than 16"):
        preprocess(torch.zeros(1, 4, 400, 3, dtype=torch.uint8), 64, 64)
