"""End to end: the real runpod local API server running handler.py on the tiny random-weight installation.

Requests are POSTed to /runsync exactly as curl would send them.
"""

import base64
import io
import time
from fractions import Fraction

import numpy as np
import pytest
from media_factory import make_audio_only, make_image, make_video, pattern_frames, write_video
from PIL import Image
from worker_server import WorkerServer, make_job_tmp, tiny_environment

from seedvr.io.media.video import iter_frames, probe_video, read_frames

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane


@pytest.fixture(scope="session")
def job_tmp():
    return make_job_tmp()


@pytest.fixture(scope="session")
def server(tiny_dir, job_tmp, tmp_path_factory):
    worker = WorkerServer(tiny_environment(tiny_dir, job_tmp), tmp_path_factory.mktemp("log") / "worker.log")
    # what the worker process itself keeps in the temporary folder (diffusers' import makes a torch cache there)
    worker.startup_files = set(job_tmp.iterdir())
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def output_file(answer: dict, tmp_path, name: str):
    assert answer["status"] == "COMPLETED", answer
    path = tmp_path / name
    path.write_bytes(base64.b64decode(answer["output"]["media"][0]))
    return path


def test_health_is_fast_and_loads_nothing(server):
    started = time.perf_counter()
    answer = server.runsync({"action": "health"})
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    output = answer["output"]
    assert output["status"] == "healthy"
    assert output["model_initialized"] is False
    assert output["cuda_available"] is False and output["gpu_memory"] == 0
    assert "sdpa" in output["attention_backends"]
    assert output["weights"] and all(output["weights"].values())


def test_initialize_3b(server):
    output = server.runsync({"action": "initialize", "model_type": "seedvr2_3b"})["output"]
    assert output["ready"] is True
    assert output["message"] == "Model seedvr2_3b (normal) initialized successfully"
    assert (output["model_type"], output["model_variant"], output["sp_size"]) == ("seedvr2_3b", "normal", 1)
    assert output["random_weights"] is True
    health = server.runsync({"action": "health"})["output"]
    assert health["model_initialized"] is True and health["model_type"] == "seedvr2_3b"


def test_restore_rgba_png_keeps_alpha(server, media_dir, tmp_path):
    path, _, alpha = make_image(media_dir, "rgba_png")
    answer = server.runsync({"action": "restore", "media": b64(path), "res_h": 96, "res_w": 128})
    output = answer["output"]
    assert output["success"] is True and output["media_type"] == "image"
    assert "videos" not in output
    restored = Image.open(output_file(answer, tmp_path, "out.png"))
    assert restored.format == "PNG" and restored.mode == "RGBA"
    assert output["resolution"] == f"{restored.width}x{restored.height}"
    assert restored.width % 16 == 0 and restored.height % 16 == 0
    # the alpha plane is the input's, resized to the output size
    resized_alpha = np.asarray(Image.fromarray(alpha).resize(restored.size, Image.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(restored)[..., 3].astype(np.int16) - resized_alpha).max() <= 2
    info = output["processing_info"]
    assert (info["seed"], info["cfg_scale"], info["sample_steps"], info["sequence_parallel_size"]) == (666, 1.0, 1, 1)
    assert {"decode", "vae_encode", "dit", "vae_decode", "encode", "total"} <= set(info["timings"])


def _restore_video(server, path, tmp_path, **options):
    answer = server.runsync({"action": "restore", "media": b64(path), **options})
    assert answer["status"] == "COMPLETED", answer
    out = output_file(answer, tmp_path, "out.mp4")
    return answer["output"], probe_video(out), out


def test_restore_video_with_audio_keeps_frames_rate_and_audio(server, media_dir, tmp_path):
    source = make_video(media_dir, "mp4_aac")
    source_info = probe_video(source)
    output, info, _ = _restore_video(server, source, tmp_path, res_h=96, res_w=128, seed=7)
    assert output["media_type"] == "video" and output["videos"] == output["media"]
    assert info.frame_count == source_info.frame_count
    assert info.fps == source_info.fps == Fraction(30000, 1001)
    assert info.has_audio and info.audio_codec == source_info.audio_codec == "aac"
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert output["resolution"] == f"{info.width}x{info.height}"
    assert output["processing_info"]["seed"] == 7


@pytest.mark.parametrize("case", ["mp4_silent", "webm_vp9_opus", "gif"])
def test_restore_other_videos(server, media_dir, tmp_path, case):
    source = make_video(media_dir, case)
    source_info = probe_video(source)
    output, info, _ = _restore_video(server, source, tmp_path, res_h=64, res_w=96)
    assert info.frame_count == source_info.frame_count
    assert info.fps == source_info.fps
    assert info.has_audio == source_info.has_audio


def test_legacy_video_field_and_7b_switch(server, media_dir, tmp_path):
    source = make_video(media_dir, "mp4_silent")
    answer = server.runsync({"action": "restore", "video": b64(source), "res_h": 64, "res_w": 96,
                             "model_type": "seedvr2_7b", "model_variant": "sharp"})
    output = answer["output"]
    assert (output["model_type"], output["model_variant"], output["media_type"]) == ("seedvr2_7b", "sharp", "video")
    assert probe_video(output_file(answer, tmp_path, "out.mp4")).frame_count == probe_video(source).frame_count
    health = server.runsync({"action": "health"})["output"]
    assert (health["model_type"], health["model_variant"]) == ("seedvr2_7b", "sharp")


def test_same_seed_same_output_other_seed_differs(server, media_dir, tmp_path):
    path, _, _ = make_image(media_dir, "jpeg")
    request = {"action": "restore", "image": b64(path), "res_h": 64, "res_w": 96, "model_type": "seedvr2_3b"}
    first = server.runsync(request)["output"]["media"][0]
    again = server.runsync(request)["output"]["media"][0]
    other = server.runsync({**request, "seed": 1})["output"]["media"][0]
    assert first == again
    assert first != other


def test_three_second_480p_clip_with_audio(server, tmp_path):
    """The issue's acceptance check: 3 s of 480p at 30000/1001 fps with AAC audio."""
    fps = Fraction(30000, 1001)
    frames = pattern_frames(90, 854, 480)
    source = tmp_path / "480p.mp4"
    write_video(source, frames, fps, ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20"),
                ("-c:a", "aac"), audio_seconds=3.0)
    # a small output keeps the tiny model's CPU time down; the input is the full 480p clip
    output, info, restored = _restore_video(server, source, tmp_path, res_h=120, res_w=214)
    source_info = probe_video(source)
    assert info.frame_count == source_info.frame_count == 90
    assert info.fps == fps
    assert info.has_audio and info.audio_codec == "aac"
    assert sum(1 for _ in iter_frames(restored, info)) == 90


BAD_INPUTS = [
    # (request input, expected code, text the message must contain)
    ({}, "INVALID_INPUT", "action"),
    ({"action": "fly"}, "INVALID_INPUT", "restore"),
    ({"action": "health", "verbose": True}, "INVALID_INPUT", "verbose"),
    ({"action": "restore"}, "INVALID_INPUT", "media"),
    ({"action": "restore", "media": "QUJD", "video": "QUJD"}, "INVALID_INPUT", "video"),
    ({"action": "restore", "media": 123}, "INVALID_INPUT", "media"),
    ({"action": "restore", "media": ""}, "INVALID_INPUT", "media"),
    ({"action": "restore", "media": "!!!not base64!!!"}, "INVALID_INPUT", "media"),
    ({"action": "restore", "media": base64.b64encode(bytes(range(256)) * 8).decode()}, "UNSUPPORTED_MEDIA", ""),
    ({"action": "restore", "media": base64.b64encode(b"hello, this is text\n" * 20).decode()},
     "UNSUPPORTED_MEDIA", ""),
    ({"action": "restore", "media": "QUJD", "media_type": "audio"}, "INVALID_INPUT", "media_type"),
    ({"action": "restore", "media": "QUJD", "res_h": "720"}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "res_h": 0}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "res_h": -5}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "res_w": 100000}, "INVALID_INPUT", "res_w"),
    ({"action": "restore", "media": "QUJD", "res_h": True}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "res_h": 8192, "res_w": 8192}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "seed": -1}, "INVALID_INPUT", "seed"),
    ({"action": "restore", "media": "QUJD", "seed": 1.5}, "INVALID_INPUT", "seed"),
    ({"action": "restore", "media": "QUJD", "cfg_scale": 100}, "INVALID_INPUT", "cfg_scale"),
    ({"action": "restore", "media": "QUJD", "cfg_scale": "high"}, "INVALID_INPUT", "cfg_scale"),
    ({"action": "restore", "media": "QUJD", "cfg_rescale": 2}, "INVALID_INPUT", "cfg_rescale"),
    ({"action": "restore", "media": "QUJD", "sample_steps": 0}, "INVALID_INPUT", "sample_steps"),
    ({"action": "restore", "media": "QUJD", "sample_steps": 1.5}, "INVALID_INPUT", "sample_steps"),
    ({"action": "restore", "media": "QUJD", "model_type": "seedvr3"}, "INVALID_INPUT", "model_type"),
    ({"action": "restore", "media": "QUJD", "model_type": "seedvr2_3b", "model_variant": "sharp"},
     "INVALID_INPUT", "sharp"),
    ({"action": "restore", "media": "QUJD", "model_variant": "blurry"}, "INVALID_INPUT", "model_variant"),
    ({"action": "restore", "media": "QUJD", "model_type": "seedvr2_3b", "sp_size": 3}, "INVALID_INPUT", "sp_size"),
    ({"action": "restore", "media": "QUJD", "sp_size": 0}, "INVALID_INPUT", "sp_size"),
    ({"action": "restore", "media": "QUJD", "res_height": 720}, "INVALID_INPUT", "res_h"),
    ({"action": "restore", "media": "QUJD", "color_fix": "magic"}, "INVALID_INPUT", "color_fix"),
    ({"action": "restore", "media": "QUJD", "attention_backend": "xformers"}, "INVALID_INPUT", "attention_backend"),
    ({"action": "initialize", "model_type": "seedvr2_7b", "sp_size": 5}, "INVALID_INPUT", "sp_size"),
    ({"action": "restore", "media": "A" * 1_000_000 + "!"}, "INVALID_INPUT", "media"),
]


def _media_bad_inputs(media_dir):
    video = make_video(media_dir, "mp4_silent")
    png, _, _ = make_image(media_dir, "rgba_png")
    truncated = video.read_bytes()[: len(video.read_bytes()) // 3]
    corrupt_png = png.read_bytes()[:64] + bytes(200)
    return [
        ({"action": "restore", "media": b64(video), "media_type": "image"}, "INVALID_INPUT", "media_type"),
        ({"action": "restore", "image": b64(video)}, "INVALID_INPUT", "media_type"),
        ({"action": "restore", "media": base64.b64encode(truncated).decode()}, "INVALID_INPUT", "media"),
        ({"action": "restore", "media": b64(make_audio_only(media_dir))}, "UNSUPPORTED_MEDIA", ""),
        ({"action": "restore", "media": b64(png), "res_h": 16, "res_w": 16}, "INVALID_INPUT", "16"),
        ({"action": "restore", "media": b64(png), "attention_backend": "flash"}, "INVALID_INPUT", "flash"),
        ({"action": "restore", "media": base64.b64encode(corrupt_png).decode()}, "INVALID_INPUT", "media"),
    ]


def test_bad_inputs_get_clear_errors_and_the_worker_keeps_serving(server, media_dir, job_tmp):
    cases = BAD_INPUTS + _media_bad_inputs(media_dir)
    assert len(cases) >= 30
    for job_input, code, needle in cases:
        answer = server.runsync(job_input)
        assert answer["status"] == "FAILED", (job_input if len(str(job_input)) < 300 else "big", answer)
        error = answer["error"]
        assert isinstance(error, str) and error.startswith(f"{code}: "), (code, error)
        assert needle in error, (needle, error)
        assert len(error) < 600 and "Traceback" not in error
    assert set(job_tmp.iterdir()) == server.startup_files
    # the next valid request succeeds
    path, _, _ = make_image(media_dir, "jpeg")
    answer = server.runsync({"action": "restore", "media": b64(path), "res_h": 64, "res_w": 96})
    assert answer["status"] == "COMPLETED"
    assert set(job_tmp.iterdir()) == server.startup_files


def test_sequence_parallel_over_two_ranks_equals_one_process(server, media_dir, tmp_path):
    """sp_size 2 on CPU (gloo ranks). Pipeline-level equality is exact (tests/test_sequence_parallel.py); here
    a lossless PNG must match exactly, and a video after H.264, which turns rare ±1 differences of the float
    reduction order into small local ones, nearly."""
    image, _, _ = make_image(media_dir, "rgba_png")
    video = make_video(media_dir, "mp4_aac")
    request = {"action": "restore", "res_h": 64, "res_w": 96, "model_type": "seedvr2_3b"}
    single = server.runsync({**request, "media": [b64(image), b64(video)]})["output"]
    parallel = server.runsync({**request, "media": [b64(image), b64(video)], "sp_size": 2})["output"]
    assert parallel["processing_info"]["sequence_parallel_size"] == 2
    assert parallel["media"][0] == single["media"][0]
    frames = []
    for name, answer in (("single", single), ("parallel", parallel)):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(base64.b64decode(answer["media"][1]))
        frames.append(read_frames(path, probe_video(path)).astype(np.int16))
    difference = np.abs(frames[0] - frames[1])
    assert frames[0].shape == frames[1].shape
    assert difference.mean() < 0.05 and (difference > 1).mean() < 0.01


def test_malformed_json_body_does_not_kill_the_worker(server):
    response = server.post_raw(b'{"input": {"action": "health"')
    assert response.status_code in (400, 422)
    assert server.runsync({"action": "health"})["output"]["status"] == "healthy"


def test_data_uri_and_urlsafe_unpadded_base64(server, media_dir, tmp_path):
    path, _, _ = make_image(media_dir, "webp")
    raw = path.read_bytes()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    wrapped = "\n".join(urlsafe[i:i + 76] for i in range(0, len(urlsafe), 76))
    for media in ("data:image/webp;base64," + b64(path), wrapped):
        answer = server.runsync({"action": "restore", "media": media, "res_h": 64, "res_w": 96})
        assert answer["status"] == "COMPLETED", answer
        assert Image.open(io.BytesIO(base64.b64decode(answer["output"]["media"][0]))).format == "PNG"
