"""Frame interpolation's parts: the RIFE network against its released file, the timing rule, the two methods'
frame streams (scene cuts included), the request's rules and the weights tool. The handler-level runs are in
tests/test_interpolation_e2e.py."""

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from media_factory import ffmpeg_children, make_image, pattern_frames, write_video
from rife_factory import random_ifnet, write_random_rife
from safetensors.torch import load_file, save_file

from seedvr.engine.interpolation import RifeInterpolator, load_rife
from seedvr.errors import INVALID_INPUT, MODEL_NOT_AVAILABLE, CheckpointError, RestoreError
from seedvr.io.inputs import MediaSpec, local_input
from seedvr.io.media.interpolation import Retiming, SceneCuts, motion_interpolated, rate_problem
from seedvr.io.media.video import FrameTimes
from seedvr.models.rife import RIFE_WEIGHTS, IFNet, pad_multiple
from seedvr.serving import interpolation
from seedvr.serving.interpolation import InterpolationSpec
from seedvr.serving.schema import parse_request
from seedvr.serving.specs import restore_spec
from seedvr.tools import weights

SMALL = {"block_widths": (16, 16, 8, 8), "head_width": 8, "feature_channels": 4}  # a fast IFNet for the streams
RED, BLUE = (220, 30, 30), (30, 30, 220)


def solid(colour: tuple[int, int, int], count: int) -> list[np.ndarray]:
    return [np.full((48, 64, 3), colour, dtype=np.uint8) for _ in range(count)]


def moving_square(count: int) -> list[np.ndarray]:
    """A white square moving 4 pixels a frame over grey: motion, and no scene cut (pattern frames change colour)."""
    frames = solid((90, 90, 90), count)
    for index, frame in enumerate(frames):
        frame[16:32, 4 * index:4 * index + 16] = 255
    return frames


def is_solid(frame: np.ndarray, colour: tuple[int, int, int], levels: int = 0) -> bool:
    return int(np.abs(frame.astype(np.int16) - np.array(colour, dtype=np.int16)).max()) <= levels


# ----------------------------------------------------------------------------- the network and its file

def test_the_released_layout_saves_to_the_published_file_byte_for_byte(tmp_path):
    """The mirror publishes 21,469,616 bytes for rife-flownet-4.13.2.safetensors. A safetensors file's size is its
    tensors' bytes plus a header naming every key and shape, so matching it to the byte pins the key names (the
    4.13 naming `encode.0.weight` would be 24 bytes short), the shapes and the float32 storage."""
    with torch.device("meta"):
        model = IFNet()
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert len(shapes) == 128 and sum(math.prod(shape) for shape in shapes.values()) == 5_364_312
    assert shapes["encode.cnn0.weight"] == (32, 3, 3, 3) and shapes["block0.conv0.0.0.weight"] == (96, 23, 3, 3)
    assert shapes["block3.lastconv.0.weight"] == (64, 24, 4, 4) and shapes["block1.convblock.7.beta"] == (1, 128, 1, 1)
    path = write_random_rife(tmp_path / RIFE_WEIGHTS.filename)
    assert path.stat().st_size == RIFE_WEIGHTS.size


def test_random_weights_in_the_released_layout_load_strictly_and_interpolate(tmp_path):
    path = write_random_rife(tmp_path / RIFE_WEIGHTS.filename, seed=3)
    model = load_rife(path, torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    stored = load_file(path)
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in stored.items())
    frames = moving_square(3)
    out = list(RifeInterpolator(model).frames(iter(frames), [Fraction(0), Fraction(1, 2), Fraction(1),
                                                             Fraction(3, 2), Fraction(2)], SceneCuts().between))
    assert [frame.shape for frame in out] == [(48, 64, 3)] * 5 and all(frame.dtype == np.uint8 for frame in out)
    assert out[0] is frames[0] and out[2] is frames[1] and out[4] is frames[2]  # whole positions: the frames
    for new in (out[1], out[3]):  # made by the model: none of the frames, and each from its own pair
        assert not any(np.array_equal(new, frame) for frame in frames)
    assert not np.array_equal(out[1], out[3])


def test_a_checkpoint_with_other_key_names_is_refused_naming_the_file_and_the_key(tmp_path):
    state = random_ifnet().state_dict()
    state["encode.0.weight"] = state.pop("encode.cnn0.weight")  # the Sequential naming of Practical-RIFE 4.13
    path = tmp_path / "renamed.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    with pytest.raises(CheckpointError) as raised:
        load_rife(path, torch.device("cpu"))
    assert raised.value.code == MODEL_NOT_AVAILABLE
    assert str(path) in raised.value.message and "encode.cnn0.weight" in raised.value.message


def test_ifnet_refuses_a_frame_it_cannot_divide_and_names_the_padding():
    model = random_ifnet(**SMALL)
    frame = torch.rand(1, 3, 48, 64)
    with pytest.raises(ValueError, match="divide by 32; got 48x64"):
        model(frame, frame, torch.tensor([0.5]))
    assert pad_multiple(0.5) == 64


# ----------------------------------------------------------------------------- the timing rule

@pytest.mark.parametrize("frames, factor, fps, count, out_fps", [
    (13, Fraction(2), Fraction(30000, 1001), 26, Fraction(60000, 1001)),  # 2N at 2
    (13, Fraction(5, 2), Fraction(24), 33, Fraction(60)),  # ceil(32.5)
    (8, Fraction(5, 4), Fraction(25), 10, Fraction(125, 4)),
    (1, Fraction(3), Fraction(30), 3, Fraction(90)),  # a single frame is held
    (10, Fraction(1), Fraction(24), 10, Fraction(24)),
], ids=["2x-ntsc", "2.5x-film", "1.25x", "one-frame", "off"])
def test_n_frames_become_ceil_f_n_at_f_times_the_rate_and_last_as_long(frames, factor, fps, count, out_fps):
    retiming = Retiming(factor, frames, fps)
    assert (retiming.output_frames, retiming.output_fps) == (count, out_fps)
    duration, out_duration = frames / fps, count / out_fps
    assert Fraction(0) <= out_duration - duration < 1 / out_fps  # within one output frame, never shorter
    positions = list(retiming.positions())
    assert positions[0] == 0 and positions == sorted(positions) and positions[-1] <= frames - 1
    for source in range(frames):  # decimating by f gives the source frames back
        if (source * factor).denominator == 1:
            assert positions[int(source * factor)] == source
    assert [retiming.source_frames_done(k) for k in (0, count)] == [0, frames]


def test_a_variable_rate_keeps_every_source_time_and_puts_new_frames_in_proportion():
    times = FrameTimes(Fraction(1, 1000), (0, 40, 100), 160)  # frames of 40, 60 and 60 ms
    doubled = Retiming(Fraction(2), 3, Fraction(3, 160) * 1000).frame_times(times)
    assert doubled is not None
    seconds = [float(start * doubled.time_base) for start in doubled.starts]
    assert seconds == pytest.approx([0.0, 0.02, 0.04, 0.07, 0.1, 0.13]) and float(doubled.end * doubled.time_base) == 0.16
    stretched = Retiming(Fraction(5, 2), 3, Fraction(3, 160) * 1000).frame_times(times)
    assert stretched is not None and len(stretched.starts) == 8
    assert list(stretched.starts) == sorted(set(stretched.starts))  # strictly increasing
    for source, start in enumerate(times.starts):  # source frame i is output frame i * 5/2 where that is whole
        if (source * Fraction(5, 2)).denominator == 1:
            assert stretched.starts[int(source * Fraction(5, 2))] * stretched.time_base == start * times.time_base
    assert stretched.end * stretched.time_base == Fraction(160, 1000)
    assert Retiming(Fraction(2), 3, Fraction(24)).frame_times(None) is None


def test_a_rate_that_the_output_cannot_hold_is_named():
    assert rate_problem(Fraction(30000, 1001), Fraction(5, 2), "media") is None
    assert rate_problem(Fraction(8000, 267), Fraction(101, 100), "media") is None
    problem = rate_problem(Fraction(13, 11), Fraction(101, 100), "media[1]")
    assert problem is not None and "interpolate_factor 1.01" in problem and "media[1]" in problem


# ----------------------------------------------------------------------------- the frame streams

def test_rife_frames_are_the_model_between_their_own_pair_across_batches():
    model = random_ifnet(seed=1, **SMALL)
    frames = moving_square(10)
    retiming = Retiming(Fraction(2), 10, Fraction(24))
    out = list(RifeInterpolator(model).frames(iter(frames), retiming.positions(), SceneCuts().between))
    assert len(out) == 20
    pad = (0, 0, 0, 64 - 48)

    def tensor(frame: np.ndarray) -> torch.Tensor:
        return F.pad(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255, pad, mode="replicate")

    for pair in range(9):  # the new frame 2i + 1 is IFNet at t = 1/2 between frames i and i + 1, alone
        with torch.inference_mode():
            alone = model(tensor(frames[pair]), tensor(frames[pair + 1]), torch.tensor([0.5]))[0, :, :48]
        expected = (alone.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        difference = np.abs(out[2 * pair + 1].astype(np.int16) - expected)
        assert difference.max() <= 1 and difference.mean() < 0.01, (pair, difference.max())
        assert out[2 * pair] is frames[pair]
    assert out[19] is frames[9]  # past the last frame: held


@pytest.mark.parametrize("method", ["rife", "mci"])
def test_a_hard_cut_between_two_colours_is_never_blended(method):
    frames = solid(RED, 6) + solid(BLUE, 6)
    retiming = Retiming(Fraction(4), 12, Fraction(30000, 1001))
    if method == "rife":
        out = list(RifeInterpolator(random_ifnet(**SMALL)).frames(iter(frames), retiming.positions(),
                                                                  SceneCuts().between))
        levels = 0
    else:
        out = list(motion_interpolated(iter(frames), retiming))
        levels = 2  # ffmpeg re-renders its frames
    colours = ["R" if is_solid(frame, RED, levels) else "B" if is_solid(frame, BLUE, levels) else "mix"
               for frame in out]
    # positions 5.25 and 5.5 (a tie: the earlier frame) repeat frame 5, 5.75 repeats frame 6
    assert "".join(colours) == "R" * 23 + "B" * 25, colours


def test_mci_keeps_the_source_frames_as_they_are_and_makes_new_ones_between():
    frames = moving_square(5)
    retiming = Retiming(Fraction(5, 2), 5, Fraction(24))
    timings: dict[str, float] = {}
    out = list(motion_interpolated(iter(frames), retiming, timings))
    assert len(out) == 13 and timings["interpolate"] > 0
    assert all(out[k] is frames[k * 2 // 5] for k in (0, 5, 10))
    assert all(not any(np.array_equal(out[k], frame) for frame in frames) for k in (1, 3, 6))  # new frames
    assert ffmpeg_children() == []


def test_mci_stops_ffmpeg_when_the_consumer_stops_early():
    stream = motion_interpolated(iter(list(pattern_frames(8))), Retiming(Fraction(2), 8, Fraction(24)))
    assert next(stream).shape == (48, 64, 3)
    assert ffmpeg_children()  # running
    stream.close()
    assert ffmpeg_children() == []


# ----------------------------------------------------------------------------- the request

def restore_input(**fields) -> dict:
    return {"action": "restore", "media": "AAAA", **fields}


@pytest.mark.parametrize("fields, found", [
    ({"interpolate_factor": 2.333}, "at most two decimals"),
    ({"interpolate_factor": 9}, "interpolate_factor must be a number between 1.0 and 8"),
    ({"interpolate_factor": 0.5}, "interpolate_factor must be a number between 1.0 and 8"),
    ({"interpolate_factor": "2"}, "interpolate_factor must be a number"),
    ({"interpolation": "rife"}, "interpolation 'rife' has no frames to make at interpolate_factor 1"),
    ({"interpolation": "dain", "interpolate_factor": 2}, "interpolation must be one of 'auto', 'rife', 'mci'"),
    ({"interpolate_factor": 2, "media_type": "image"}, "interpolate_factor applies to videos"),
], ids=["three-decimals", "above-8", "below-1", "a-string", "method-without-factor", "unknown-method",
        "forced-image"])
def test_a_bad_interpolation_request_is_refused_naming_the_field(fields, found):
    with pytest.raises(RestoreError) as raised:
        parse_request(restore_input(**fields))
    assert raised.value.code == INVALID_INPUT and found in raised.value.message, raised.value.message


def test_a_factor_is_read_as_the_decimal_written():
    spec = restore_spec(parse_request(restore_input(interpolate_factor=2.5, interpolation="mci"))).interpolation
    assert spec == InterpolationSpec(Fraction(5, 2), "mci") and spec.active
    assert not restore_spec(parse_request(restore_input())).interpolation.active
    assert InterpolationSpec.of(1.01, "auto").factor == Fraction(101, 100)


def test_check_refuses_images_and_rife_without_weights_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("SEEDVR_AUTO_DOWNLOAD", raising=False)
    image = local_input(make_image(tmp_path, "rgba_png")[0], MediaSpec("media", ()))
    video = local_input(write_video(tmp_path / "clip.mp4", pattern_frames(3), Fraction(24)), MediaSpec("media", ()))
    with pytest.raises(RestoreError) as raised:
        interpolation.check(InterpolationSpec(Fraction(2)), [image])
    assert raised.value.code == INVALID_INPUT and "interpolate_factor" in raised.value.message
    interpolation.check(InterpolationSpec(Fraction(2)), [image, video])  # a list: the video is interpolated
    interpolation.check(InterpolationSpec(Fraction(1)), [image])  # off: nothing to check
    assert interpolation.method_of(InterpolationSpec(Fraction(2))) == "mci"  # auto without weights
    with pytest.raises(RestoreError) as raised:
        interpolation.check(InterpolationSpec(Fraction(2), "rife"), [video])
    assert raised.value.code == MODEL_NOT_AVAILABLE
    assert "python -m seedvr.weights download --model rife" in raised.value.message
    path = write_random_rife(tmp_path / "empty" / RIFE_WEIGHTS.filename)
    interpolation.check(InterpolationSpec(Fraction(2), "rife"), [video])
    assert interpolation.method_of(InterpolationSpec(Fraction(2))) == "rife"  # auto with weights
    state = load_file(path)
    state["block4.lastconv.0.bias"] = state["block3.lastconv.0.bias"].clone()  # a file of another release
    save_file(state, path)
    for method in ("rife", "auto"):  # refused from the header, before any work (auto does not hide it)
        with pytest.raises(RestoreError) as raised:
            interpolation.check(InterpolationSpec(Fraction(2), method), [video])
        assert raised.value.code == MODEL_NOT_AVAILABLE and "unexpected block4.lastconv.0.bias" in raised.value.message


# ----------------------------------------------------------------------------- the weights tool

def test_verify_tells_random_weights_from_the_release_and_a_missing_file_from_both(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(tmp_path))
    assert weights.main(["verify", "--model", "rife"]) == 1
    assert "python -m seedvr.weights download --model rife" in capsys.readouterr().err
    write_random_rife(tmp_path / RIFE_WEIGHTS.filename)
    assert weights.main(["verify", "--model", "rife"]) == 1
    error = capsys.readouterr().err
    assert "has IFNet's keys and shapes but is not the released file" in error and RIFE_WEIGHTS.sha256 in error
    assert weights.main(["convert", "--model", "rife"]) == 1  # a Docker bake runs convert after download: it verifies
    assert RIFE_WEIGHTS.sha256 in capsys.readouterr().err
    assert os.listdir(tmp_path) == [RIFE_WEIGHTS.filename]
