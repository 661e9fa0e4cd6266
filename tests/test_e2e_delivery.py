"""End to end through the runpod local API: several items, URL input, S3 delivery, output options, progress.

Real servers on loopback: the worker, an HTTP server holding the inputs, a moto S3 server, and a receiver
for the progress updates runpod posts to RUNPOD_WEBHOOK_POST_OUTPUT.
"""

import base64
import io
import json
import threading
import time
from fractions import Fraction
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from conftest import S3_BUCKET
from media_factory import make_image, make_video
from PIL import Image
from worker_server import WorkerServer, make_job_tmp, tiny_environment

from seedvr.io.media.payload import sniff_media
from seedvr.io.media.video import probe_video

pytestmark = pytest.mark.slow  # servers, rank processes or subprocesses: not in the fast lane


class ProgressReceiver(ThreadingHTTPServer):
    """Collects the progress updates the worker posts, as {job id: [update, ...]}."""

    def __init__(self):
        self.updates: dict[str, list[dict]] = {}
        receiver = self

        class Handler(SimpleHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job_id = parse_qs(urlparse(self.path).query)["id"][0]
                receiver.updates.setdefault(job_id, []).append(json.loads(body)["output"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="module")
def file_server(media_dir):
    """Serves media_dir over HTTP on 127.0.0.1."""
    handler = lambda *args: SimpleHTTPRequestHandler(*args, directory=str(media_dir))  # noqa: E731
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def progress():
    receiver = ProgressReceiver()
    yield receiver
    receiver.shutdown()


@pytest.fixture(scope="module")
def server(tiny_dir, s3_endpoint, progress, tmp_path_factory):
    env = tiny_environment(tiny_dir, make_job_tmp())
    env.update(
        SEEDVR_ALLOW_PRIVATE_URLS="1",  # the input server is on loopback
        BUCKET_ENDPOINT_URL=f"{s3_endpoint}/{S3_BUCKET}", BUCKET_ACCESS_KEY_ID="key", BUCKET_SECRET_ACCESS_KEY="secret",
        RUNPOD_WEBHOOK_POST_OUTPUT=f"http://127.0.0.1:{progress.server_address[1]}/progress?id=$ID",
    )
    worker = WorkerServer(env, tmp_path_factory.mktemp("log") / "worker.log")
    yield worker
    worker.stop()


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def completed(answer: dict) -> dict:
    assert answer["status"] == "COMPLETED", answer
    return answer["output"]


def test_a_list_of_items_is_restored_in_order(server, media_dir):
    image, _, _ = make_image(media_dir, "rgba_png")
    video = make_video(media_dir, "mp4_silent")
    output = completed(server.runsync({"action": "restore", "media": [b64(image), b64(video), b64(image)],
                                       "res_h": 64, "res_w": 96}))
    assert output["media_type"] == "mixed" and output["media_types"] == ["image", "video", "image"]
    assert len(output["media"]) == 3 and "videos" not in output
    assert output["media"][0] == output["media"][2]  # same input, same seed
    restored_video = base64.b64decode(output["media"][1])
    assert sniff_media(restored_video).mime == "video/mp4"
    assert [item["frames"] for item in output["processing_info"]["items"]] == [1, probe_video(video).frame_count, 1]


def test_media_url_from_a_real_http_server(server, media_dir, file_server, tmp_path):
    video = make_video(media_dir, "mp4_aac")
    output = completed(server.runsync({"action": "restore", "media_url": f"{file_server}/{video.name}",
                                       "res_h": 64, "res_w": 96}))
    restored = tmp_path / "out.mp4"
    restored.write_bytes(base64.b64decode(output["media"][0]))
    info = probe_video(restored)
    assert info.frame_count == probe_video(video).frame_count and info.fps == Fraction(30000, 1001)
    assert info.has_audio


def test_media_url_errors_name_the_field(server, file_server):
    answer = server.runsync({"action": "restore", "media_url": f"{file_server}/missing.mp4"})
    assert answer["status"] == "FAILED" and answer["error"].startswith("INVALID_INPUT: media_url")
    assert "404" in answer["error"]


def test_url_delivery_uploads_to_the_bucket(server, media_dir, tmp_path):
    video = make_video(media_dir, "mp4_silent")
    output = completed(server.runsync({"action": "restore", "media": b64(video), "res_h": 64, "res_w": 96,
                                       "output_delivery": "url", "compare": True}))
    assert output["media"] == [None]
    url = output["media_urls"][0]
    assert S3_BUCKET in url
    restored = tmp_path / "out.mp4"
    restored.write_bytes(requests.get(url, timeout=10).content)
    assert probe_video(restored).frame_count == probe_video(video).frame_count
    compare = Image.open(io.BytesIO(requests.get(output["compare"][0], timeout=10).content))
    width, height = map(int, output["resolution"].split("x"))
    assert compare.height == height and compare.width > 2 * width


def test_data_uri_compare_and_image_format(server, media_dir):
    image, _, _ = make_image(media_dir, "jpeg")
    output = completed(server.runsync({"action": "restore", "media": b64(image), "res_h": 64, "res_w": 96,
                                       "format": "jpeg", "quality": 80, "return_data_uri": True, "compare": True}))
    prefix = "data:image/jpeg;base64,"
    assert output["media"][0].startswith(prefix)
    restored = Image.open(io.BytesIO(base64.b64decode(output["media"][0][len(prefix):])))
    assert restored.format == "JPEG" and output["resolution"] == f"{restored.width}x{restored.height}"
    assert output["compare"][0].startswith("data:image/png;base64,")


@pytest.mark.parametrize("codec,container,mime", [("vp9", None, "video/webm"), ("h265", "mkv", "video/x-matroska")])
def test_video_codec_and_container(server, media_dir, tmp_path, codec, container, mime):
    video = make_video(media_dir, "mp4_aac")
    request = {"action": "restore", "media": b64(video), "res_h": 64, "res_w": 96, "codec": codec, "crf": 30}
    if container:
        request["container"] = container
    output = completed(server.runsync(request))
    data = base64.b64decode(output["media"][0])
    assert sniff_media(data).mime == mime
    path = tmp_path / "out"
    path.write_bytes(data)
    info = probe_video(path)
    assert info.codec == {"vp9": "vp9", "h265": "hevc"}[codec]
    assert info.frame_count == probe_video(video).frame_count and info.has_audio


def test_scale_sets_the_area_from_the_input(server, media_dir):
    image, rgb, _ = make_image(media_dir, "png_16bit")
    height, width = rgb.shape[:2]
    output = completed(server.runsync({"action": "restore", "media": b64(image), "scale": 2}))
    out_w, out_h = map(int, output["resolution"].split("x"))
    # the area is 4x the input's, less the crop to multiples of 16
    assert out_h % 16 == 0 and out_w % 16 == 0
    assert 0.6 * 4 * height * width <= out_h * out_w <= 4 * height * width


def test_progress_updates_reach_the_webhook(server, media_dir, progress):
    video = make_video(media_dir, "mp4_silent")
    answer = server.runsync({"action": "restore", "media": b64(video), "res_h": 64, "res_w": 96})
    completed(answer)
    deadline = time.monotonic() + 10  # runpod posts each update from its own thread: let the last ones land
    while time.monotonic() < deadline and progress.updates.get(answer["id"], [{}])[-1].get("phase") != "deliver":
        time.sleep(0.1)
    updates = progress.updates.get(answer["id"], [])
    phases = [update["phase"] for update in updates]
    for phase in ("load_model", "decode", "vae_encode", "dit", "vae_decode", "encode", "deliver"):
        assert phase in phases, phases
    frames = probe_video(video).frame_count
    assert all(update["frames_total"] == frames for update in updates)
    assert updates[-1]["percent"] == 100.0 and updates[-1]["frames_done"] == frames
