"""Classic upscalers (seedvr.engine.upscaler) and fallback_upscaler (seedvr.serving.fallback).

The models are random-weight ones of two architectures, built with spandrel's own classes and saved as released
files are: ESRGAN (RRDBNet 4x, the original ESRGAN .pth key layout `model.0.weight`, `model.1.sub.0.RDB1...`) and
Real-ESRGAN Compact (SRVGGNetCompact 2x, `body.N` keys, .safetensors). spandrel's ModelLoader reads them back
and detects the architecture and the scale from the keys alone. The handler runs on a copy of the tiny SeedVR2
installation with ckpts/upscalers/ added.
"""

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import make_image, make_video
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from worker_server import WorkerServer, make_job_tmp, tiny_environment, tiny_paths

from seedvr.engine import memory_plan
from seedvr.engine import upscaler as upscaler_module
from seedvr.engine.restorer import RestoreInterrupted
from seedvr.engine.sizing import SizeWishes, item_size
from seedvr.engine.upscaler import Upscaler, available_upscalers, load_upscaler
from seedvr.errors import INVALID_INPUT, MODEL_NOT_AVAILABLE, CheckpointError, RestoreError
from seedvr.io.media.video import probe_video, read_frames
from seedvr.serving.model_holder import ModelHolder
from seedvr.serving.schema import parse_request
from seedvr.serving.specs import ModelChoice
from seedvr.tools.tiny import randomise

ESRGAN_NAME, COMPACT_NAME = "4x-tiny-esrgan", "2x-tiny-compact"
CPU = torch.device("cpu")


def build_networks() -> dict[str, torch.nn.Module]:
    networks = {ESRGAN_NAME: ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4).eval(),
                COMPACT_NAME: Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()}
    generator = torch.Generator().manual_seed(0)
    for network in networks.values():
        randomise(network, generator)  # weights of a scale that carries the input through (the default init does not)
    return networks


def write_upscalers(folder: Path, networks: dict[str, torch.nn.Module]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(networks[ESRGAN_NAME].state_dict(), folder / f"{ESRGAN_NAME}.pth")
    save_file(networks[COMPACT_NAME].state_dict(), folder / f"{COMPACT_NAME}.safetensors")


@pytest.fixture(scope="module")
def networks() -> dict[str, torch.nn.Module]:
    return build_networks()


@pytest.fixture(scope="module")
def upscaler_files(tmp_path_factory, networks) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    write_upscalers(folder, networks)
    return folder


def loaded(upscaler_files: Path, name: str, tile_side: int = upscaler_module.DEFAULT_TILE_SIDE) -> Upscaler:
    upscaler = load_upscaler(name, available_upscalers(upscaler_files)[name], CPU)
    upscaler.default_tile_side = upscaler.tile_side = tile_side
    return upscaler


def frames_of(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def network_output(network: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    """The saved network itself on the frames: uint8 (f, s·H, s·W, 3), no resize."""
    with torch.no_grad():
        images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        out = torch.cat([network(image[None]) for image in images]).clamp(0, 1)
    return out.permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).numpy()


# Loading and running, in this process
@pytest.mark.parametrize("name, architecture, scale", [(ESRGAN_NAME, "ESRGAN", 4), (COMPACT_NAME, "RealESRGAN Compact", 2)],
                         ids=["esrgan-pth", "compact-safetensors"])
def test_spandrel_detects_the_architecture_and_runs_the_saved_weights(upscaler_files, networks, name, architecture,
                                                                      scale):
    upscaler = loaded(upscaler_files, name)
    assert (upscaler.architecture, upscaler.scale, upscaler.dtype) == (architecture, scale, torch.float32)
    frames = frames_of(2, 16, 24)
    # res_h x res_w = the network's own output area, a multiple of 16: no resize, no crop
    restored = upscaler.restore(frames, res_h=16 * scale, res_w=24 * scale).numpy()
    expected = network_output(networks[name], frames)
    assert restored.shape == (2, 16 * scale, 24 * scale, 3)
    assert restored.std() > 5 and np.abs(restored[0].astype(int) - restored[1]).mean() > 1  # not a constant
    np.testing.assert_array_equal(restored, expected)


def test_the_output_is_resized_to_the_item_size_seedvr2_would_give(upscaler_files):
    upscaler = loaded(upscaler_files, ESRGAN_NAME)
    frames = frames_of(1, 30, 50)
    for wishes in (SizeWishes(100, 140), SizeWishes(scale=1.5), SizeWishes(res_h=400, res_w=400)):
        size = item_size(wishes, 30, 50, 3840 * 2160)
        restored = upscaler.restore(frames, res_h=size.res_h, res_w=size.res_w)
        assert restored.shape == (1, size.height, size.width, 3), wishes


def test_tiles_with_enough_context_give_the_whole_frame_result(upscaler_files, monkeypatch):
    frames = frames_of(1, 40, 56)
    whole = loaded(upscaler_files, COMPACT_NAME).restore(frames, res_h=80, res_w=112).numpy().astype(int)
    tiled = loaded(upscaler_files, COMPACT_NAME, tile_side=16)  # 3 x 4 tiles, each with 32 px of context
    assert np.abs(tiled.restore(frames, res_h=80, res_w=112).numpy() - whole).max() <= 1
    monkeypatch.setattr(upscaler_module, "TILE_CONTEXT", 0)  # the guard: tiles did run, and context matters
    assert np.abs(tiled.restore(frames, res_h=80, res_w=112).numpy() - whole).max() > 10


def test_out_of_memory_in_a_frame_halves_the_tile_side_until_it_fits(upscaler_files):
    """A simulated device: the network raises a genuine torch.OutOfMemoryError on inputs over `limit` pixels."""
    frames = frames_of(1, 300, 300)
    whole = loaded(upscaler_files, COMPACT_NAME).restore(frames, res_h=600, res_w=600).numpy().astype(int)
    upscaler = loaded(upscaler_files, COMPACT_NAME)
    limit = 200 * 200

    def device(module: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
        if inputs[0].shape[-2] * inputs[0].shape[-1] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = upscaler.descriptor.model.register_forward_pre_hook(device)
    restored = upscaler.restore(frames, res_h=600, res_w=600).numpy()
    assert upscaler.tile_side == 128  # 512 (the frame whole), 256 (tiles of 288 px with context), 128 fits
    assert np.abs(restored - whole).max() <= 1
    upscaler.apply_plan(memory_plan.MemoryPlan(None, 0, None, memory_plan.CONV_MAX_BYTES, None, False))
    assert upscaler.tile_side == upscaler_module.DEFAULT_TILE_SIDE  # a new item starts over
    limit = 50 * 50  # less than the smallest tile with its context
    with pytest.raises(torch.OutOfMemoryError):
        upscaler.restore(frames, res_h=600, res_w=600)
    hook.remove()


def test_interrupt_stops_the_restore_in_flight_and_not_the_next(upscaler_files):
    upscaler = loaded(upscaler_files, COMPACT_NAME, tile_side=16)
    frames = frames_of(2, 40, 40)
    with pytest.raises(RestoreInterrupted):
        upscaler.restore(frames, res_h=80, res_w=80, on_phase=lambda phase: upscaler.interrupt())
    assert upscaler.restore(frames, res_h=80, res_w=80).shape == (2, 80, 80, 3)


def test_the_folder_lists_models_by_name_and_refuses_what_spandrel_cannot_run(tmp_path, networks):
    write_upscalers(tmp_path, networks)
    torch.save(networks[COMPACT_NAME].state_dict(), tmp_path / f"{COMPACT_NAME}.pth")  # both formats: safetensors
    (tmp_path / "notes.txt").write_text("not a model")
    torch.save({"weight": torch.ones(3, 3)}, tmp_path / "unknown.pth")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x08\x00\x00")
    found = available_upscalers(tmp_path)
    assert sorted(found) == [COMPACT_NAME, ESRGAN_NAME, "truncated", "unknown"]
    assert found[COMPACT_NAME].suffix == ".safetensors"
    for name in ("unknown", "truncated"):
        with pytest.raises(CheckpointError) as caught:
            load_upscaler(name, found[name], CPU)
        assert caught.value.code == MODEL_NOT_AVAILABLE
        assert str(found[name]) in caught.value.message and "not a model spandrel can load" in caught.value.message
    assert available_upscalers(tmp_path / "absent") == {}


# Requests
@pytest.fixture
def upscaler_env(tmp_path, networks, monkeypatch):
    write_upscalers(tmp_path / "upscalers", networks)
    monkeypatch.setenv("SEEDVR_CKPT_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("fields, problem", [
    ({"model_type": "upscaler", "upscaler": "4x-nope"},
     f"upscaler '4x-nope' is not present; the upscalers present are {COMPACT_NAME}, {ESRGAN_NAME}"),
    ({"fallback_upscaler": "2x-tiny-compat"},
     f"fallback_upscaler '2x-tiny-compat' is not present; the upscalers present are {COMPACT_NAME}, {ESRGAN_NAME}"),
    ({"model_type": "upscaler"}, "model_type 'upscaler' needs `upscaler`, the name of the upscaler to run: one of "
                                 f"{COMPACT_NAME}, {ESRGAN_NAME}"),
    ({"upscaler": ESRGAN_NAME}, "upscaler is read with model_type 'upscaler' only, got model_type null"),
    ({"model_type": "upscaler", "upscaler": ESRGAN_NAME, "fallback_upscaler": COMPACT_NAME},
     "fallback_upscaler backs SeedVR2 up; model_type 'upscaler' has nothing to fall back from"),
    ({"model_type": "upscaler", "upscaler": ESRGAN_NAME, "chunk_frames": 9, "cfg_scale": 2.0, "seed": 3},
     "chunk_frames, cfg_scale apply to SeedVR2 only, not to model_type 'upscaler': leave them out"),
], ids=["unknown-upscaler", "unknown-fallback", "no-name", "name-without-type", "fallback-of-upscaler",
        "seedvr2-fields"])
def test_upscaler_fields_are_checked_before_any_work(upscaler_env, fields, problem):
    with pytest.raises(RestoreError) as caught:
        parse_request({"action": "restore", "media": "eA==", **fields})
    assert caught.value.code == INVALID_INPUT
    assert problem in caught.value.message


def test_an_upscaler_is_never_the_warm_model_for_a_request_that_names_none(upscaler_env):
    holder = ModelHolder()
    spec = holder.resolve(ModelChoice(model_type="upscaler", upscaler=COMPACT_NAME))
    assert (spec.model_type, spec.variant, spec.sp_size) == ("upscaler", COMPACT_NAME, 1)
    holder.ensure(spec)
    assert holder.describe()["model_variant"] == COMPACT_NAME
    assert holder.resolve(ModelChoice()).model_type == "seedvr2_3b"
    holder.release()


# Through the handler
@pytest.fixture(scope="module")
def upscaler_install(tiny_dir, tmp_path_factory, networks) -> Path:
    """A copy of the tiny installation with ckpts/upscalers/ (a copy: tests here remove SeedVR2 files)."""
    root = tmp_path_factory.mktemp("tiny-upscalers") / "install"
    shutil.copytree(tiny_dir, root)
    write_upscalers(root / "ckpts" / "upscalers", networks)
    return root


@pytest.fixture(scope="module")
def serve(upscaler_install):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in tiny_paths(upscaler_install).items():
            patch.setenv(name, value)
        patch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
        import handler

        yield lambda job_input: handler.serve({"id": "upscaler-test", "input": job_input})
        handler.HOLDER.release()


def decoded_image(answer: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["media"][0])))


@pytest.mark.slow
def test_an_image_through_the_handler_keeps_its_alpha_and_gets_the_network_frames(serve, upscaler_install, tmp_path):
    assert serve({"action": "health"})["upscalers"] == [COMPACT_NAME, ESRGAN_NAME]
    path, rgb, alpha = make_image(tmp_path, "rgba_png")  # 64x48
    media = base64.b64encode(path.read_bytes()).decode()
    answer = serve({"action": "restore", "media": media, "model_type": "upscaler", "upscaler": ESRGAN_NAME,
                    "scale": 2})
    assert "error" not in answer, answer
    assert (answer["model_type"], answer["model_variant"], answer["resolution"]) == ("upscaler", ESRGAN_NAME, "128x96")
    info = answer["processing_info"]
    assert info["upscaler"] == ESRGAN_NAME and "seed" not in info and "upscale" in info["timings"]
    image = decoded_image(answer)
    assert image.mode == "RGBA" and image.size == (128, 96)
    expected = loaded(upscaler_install / "ckpts" / "upscalers", ESRGAN_NAME).restore(rgb[None], res_h=96, res_w=128)
    np.testing.assert_array_equal(np.asarray(image)[..., :3], expected[0].numpy())  # PNG: lossless


@pytest.mark.slow
def test_a_video_through_the_handler_keeps_its_frames_rate_and_audio(serve, upscaler_install, tmp_path):
    clip = make_video(tmp_path, "mp4_aac")  # 9 frames of 64x48 at 30000/1001, AAC
    source = probe_video(clip)
    answer = serve({"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(),
                    "model_type": "upscaler", "upscaler": COMPACT_NAME, "scale": 2, "crf": 0, "pix_fmt": "yuv444p"})
    assert "error" not in answer, answer
    out = tmp_path / "out.mp4"
    out.write_bytes(base64.b64decode(answer["media"][0]))
    video = probe_video(out)
    assert (video.width, video.height, video.frame_count) == (128, 96, 9)
    assert video.fps == source.fps and video.audio_codec == "aac"
    restored = read_frames(out, video).astype(int)
    upscaler = loaded(upscaler_install / "ckpts" / "upscalers", COMPACT_NAME)
    expected = upscaler.restore(read_frames(clip, source), res_h=96, res_w=128).numpy().astype(int)
    assert np.abs(restored - expected).mean() < 1  # lossless yuv444p: RGB -> YUV -> RGB rounding only
    assert np.abs(restored - expected[::-1]).mean() > 10  # the guard: the frames are in order and distinct


@pytest.mark.slow
def test_an_item_no_plan_fits_falls_back_to_the_upscaler_and_says_why(serve, upscaler_install, tmp_path, monkeypatch):
    """Two items at scale 1: 64x48 fits SeedVR2's simulated device, 128x96 fits none of its plans."""
    import handler

    small, rgb, _ = make_image(tmp_path, "rgba_png")
    large = tmp_path / "large.png"
    Image.fromarray(np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)).save(large)
    media = [base64.b64encode(path.read_bytes()).decode() for path in (small, large)]
    request = {"action": "restore", "media": media, "scale": 1}
    assert "error" not in serve({"action": "initialize", "model_type": "seedvr2_3b"})
    footprint = handler.HOLDER.current.restorer.footprint()

    def least_peak(size: tuple[int, int]) -> int:
        return min(memory_plan.estimate(plan, footprint, 1, size, size).peak
                   for plan in memory_plan.candidates(1, size, memory_plan.Wishes()))

    budget = least_peak((96, 128)) - 1
    assert least_peak((48, 64)) <= budget
    monkeypatch.setenv("SEEDVR_TEST_MEMORY_BUDGET_BYTES", str(budget))

    answer = serve({**request, "fallback_upscaler": COMPACT_NAME})
    assert "error" not in answer, answer
    first, second = answer["processing_info"]["items"]
    assert "fallback" not in first and first["plan"]["fits"]  # SeedVR2 restored it
    fallback = second["fallback"]
    assert (fallback["upscaler"], fallback["instead_of"]) == (COMPACT_NAME, "seedvr2_3b")
    assert fallback["reason"].startswith("OUT_OF_MEMORY: a 128x96 output of 1 frame does not fit")
    assert answer["resolutions"] == ["64x48", "128x96"]
    assert (answer["model_type"], answer["model_variant"]) == ("upscaler", COMPACT_NAME)  # the last item's
    upscaler = loaded(upscaler_install / "ckpts" / "upscalers", COMPACT_NAME)
    expected = upscaler.restore(np.asarray(Image.open(large))[None], res_h=96, res_w=128)[0].numpy()
    restored = Image.open(io.BytesIO(base64.b64decode(answer["media"][1])))
    np.testing.assert_array_equal(np.asarray(restored), expected)

    assert serve(request)["error"].startswith("OUT_OF_MEMORY: ")  # the same job without a fallback


@pytest.mark.slow
def test_missing_seedvr2_weights_fall_back_to_the_upscaler(serve, upscaler_install, tmp_path):
    (upscaler_install / "ckpts" / "seedvr2_ema_7b_sharp.pth").unlink()  # this module's own copy
    path, _, _ = make_image(tmp_path, "rgba_png")
    request = {"action": "restore", "media": base64.b64encode(path.read_bytes()).decode(), "res_h": 48, "res_w": 64,
               "model_type": "seedvr2_7b", "model_variant": "sharp"}
    answer = serve({**request, "fallback_upscaler": ESRGAN_NAME})
    assert "error" not in answer, answer
    fallback = answer["processing_info"]["fallback"]
    assert fallback["reason"].startswith("MODEL_NOT_AVAILABLE: ") and "seedvr2_ema_7b_sharp" in fallback["reason"]
    assert (fallback["upscaler"], fallback["instead_of"], answer["resolution"]) == (ESRGAN_NAME, "seedvr2_7b", "64x48")
    assert serve(request)["error"].startswith("MODEL_NOT_AVAILABLE: ")


@pytest.mark.slow
def test_an_upscaler_and_a_fallback_through_the_local_api(tiny_dir, networks, tmp_path):
    """The runpod SDK's local API server (`python handler.py --rp_serve_api`): an upscaler request, then a 7B-sharp
    request whose weights are missing, finished by the fallback upscaler."""
    install = tmp_path / "install"
    shutil.copytree(tiny_dir, install)
    write_upscalers(install / "ckpts" / "upscalers", networks)
    (install / "ckpts" / "seedvr2_ema_7b_sharp.pth").unlink()
    job_tmp = make_job_tmp()
    worker = WorkerServer(tiny_environment(install, job_tmp), tmp_path / "worker.log")
    try:
        path, _, _ = make_image(tmp_path, "rgba_png")
        media = base64.b64encode(path.read_bytes()).decode()
        answer = worker.runsync({"action": "restore", "media": media, "model_type": "upscaler",
                                 "upscaler": COMPACT_NAME, "res_h": 96, "res_w": 128})
        assert answer["status"] == "COMPLETED", answer
        output = answer["output"]
        assert (output["model_type"], output["model_variant"], output["resolution"]) == ("upscaler", COMPACT_NAME,
                                                                                        "128x96")
        assert decoded_image(output).mode == "RGBA"
        answer = worker.runsync({"action": "restore", "media": media, "model_type": "seedvr2_7b",
                                 "model_variant": "sharp", "res_h": 48, "res_w": 64,
                                 "fallback_upscaler": ESRGAN_NAME})
        assert answer["status"] == "COMPLETED", answer
        fallback = answer["output"]["processing_info"]["fallback"]
        assert fallback["upscaler"] == ESRGAN_NAME and fallback["reason"].startswith("MODEL_NOT_AVAILABLE: ")
        assert worker.runsync({"action": "health"})["output"]["upscalers"] == [COMPACT_NAME, ESRGAN_NAME]
    finally:
        worker.stop()
        shutil.rmtree(job_tmp, ignore_errors=True)
