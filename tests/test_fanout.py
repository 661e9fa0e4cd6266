"""One restore job spread over the workers of its endpoint, end to end with real parts: three worker servers
(`python handler.py --rp_serve_api`, the tiny random-weight model), RunPod's endpoint API emulated on loopback
(tests/endpoint_emulator.py: /run, /status, /cancel, each job handed to a free worker server), and a moto S3 server
as the bucket. The fanned-out result must be the single worker's result bit for bit (decoded frames of a crf 0
encode, read as stored), whatever failed on the way.

Sizes keep it quick on two cores: 61 frames of 16x16 in chunks of 9 overlapping by 2 (9 chunks; 3 workers take 3
chunks each, the coordinator restoring one segment itself).
"""

import base64
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import S3_BUCKET
from endpoint_emulator import EndpointEmulator, ProgressLog
from media_factory import pattern_frames, write_video
from worker_server import WorkerServer, make_job_tmp, tiny_environment

from seedvr.io.media.video import probe_video, read_frames
from seedvr.io.segment_store import PREFIX

pytestmark = pytest.mark.slow  # worker servers and an endpoint: not in the fast lane

API_KEY = f"rp-test-{secrets.token_hex(12)}"  # must show up nowhere but in the Authorization header
FRAMES, SIDE, FPS = 61, 16, Fraction(25)
OPTIONS = {"res_h": SIDE, "res_w": SIDE, "chunk_frames": 9, "chunk_overlap": 2, "crf": 0}
STREAMING = "c"  # the server that runs with SEEDVR_STREAMING=1
JOB_TIMEOUT_S = 240.0


@dataclass
class Cluster:
    emulator: EndpointEmulator
    servers: dict[str, WorkerServer]
    progress: ProgressLog
    s3: object
    out: Path

    def run(self, job_input: dict, server: str | None = None) -> tuple[str, dict]:
        """Run a job through the endpoint; (its id, its answer: the last event of a streamed job)."""
        job_id = self.emulator.submit(job_input, server)
        job = self.emulator.wait(job_id, JOB_TIMEOUT_S)
        assert job["status"] == "COMPLETED", job
        output = job["output"]
        return job_id, output[-1] if isinstance(output, list) else output

    def intermediates(self) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{PREFIX}/")  # type: ignore[attr-defined]
        return [item["Key"] for item in listed.get("Contents", [])]

    def frames(self, answer: dict, name: str) -> np.ndarray:
        path = self.out / name
        path.write_bytes(base64.b64decode(answer["media"][0]))
        return read_frames(path, probe_video(path))  # deinterlace "off": the frames as stored


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """61 pattern frames of 16x16 at 25 fps with 2.44 s of AAC audio."""
    return write_video(tmp_path_factory.mktemp("fanout") / "clip.mp4", pattern_frames(FRAMES, SIDE, SIDE), FPS,
                       audio_args=("-c:a", "aac"))


@pytest.fixture(scope="module")
def cluster(tiny_dir, s3_endpoint, tmp_path_factory):
    emulator = EndpointEmulator(API_KEY)
    progress = ProgressLog()
    logs = tmp_path_factory.mktemp("fanout-logs")
    job_tmp = make_job_tmp()
    base = {**tiny_environment(tiny_dir, job_tmp),
            "BUCKET_ENDPOINT_URL": f"{s3_endpoint}/{S3_BUCKET}", "BUCKET_ACCESS_KEY_ID": "key",
            "BUCKET_SECRET_ACCESS_KEY": "secret", "SEEDVR_ENDPOINT_URL": emulator.url, "RUNPOD_API_KEY": API_KEY,
            "SEEDVR_ALLOW_PRIVATE_URLS": "1",  # the presigned source URL is on loopback
            "RUNPOD_WEBHOOK_POST_OUTPUT": progress.webhook,
            "OMP_NUM_THREADS": "1"}  # three workers share the two cores of CI: one thread each, no oversubscription

    def start(name: str) -> WorkerServer:
        env = {**base, "SEEDVR_STREAMING": "1"} if name == STREAMING else base
        return WorkerServer(env, logs / f"worker-{name}.log")

    with ThreadPoolExecutor(3) as pool:
        servers = dict(zip("abc", pool.map(start, "abc")))
    for name, server in servers.items():
        emulator.add_server(name, server.url)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x",
                      aws_secret_access_key="x")
    yield Cluster(emulator, servers, progress, s3, tmp_path_factory.mktemp("fanout-out"))
    emulator.close()
    progress.close()
    for server in servers.values():
        if server.process.poll() is None:
            server.stop()
    shutil.rmtree(job_tmp, ignore_errors=True)  # (the killed worker could not clean its own)
    for log in logs.iterdir():
        assert API_KEY not in log.read_text(errors="replace"), f"{log.name} shows the API key"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def single(cluster, clip):
    """The single-worker run (workers 1) on the streaming server: (its events and answer, its decoded frames)."""
    job_id = cluster.emulator.submit({"action": "restore", "media": b64(clip), **OPTIONS}, server=STREAMING)
    job = cluster.emulator.wait(job_id, JOB_TIMEOUT_S)
    assert job["status"] == "COMPLETED", job
    frames = cluster.frames(job["output"][-1], "single.mp4")
    assert frames.shape == (FRAMES, SIDE, SIDE, 3) and frames.std() > 5  # a real picture, not a constant
    return job["output"], frames


def test_a_streamed_job_yields_progress_then_its_result_then_the_usual_answer(single):
    events, _ = single
    answer = events[-1]
    assert answer["success"] is True and answer["processing_info"]["plan"]["chunks"] == 9
    kinds = [event.get("event") for event in events[:-1]]
    assert "progress" in kinds and kinds[-1] == "result"
    result = events[-2]
    assert result["item"] == 0 and result["media"] == answer["media"][0] and result["media_url"] is None
    assert any(event.get("phase") == "dit" for event in events if event.get("event") == "progress")


def test_three_workers_give_the_single_worker_frames_bit_for_bit(cluster, clip, single):
    started = time.monotonic()
    job_id = cluster.emulator.submit({"action": "restore", "media": b64(clip), "workers": 3, **OPTIONS},
                                     server=STREAMING)  # the coordinator streams its segments as they come
    events = cluster.emulator.wait(job_id, JOB_TIMEOUT_S)["output"]
    wall = time.monotonic() - started
    answer = events[-1]
    fanned = cluster.frames(answer, "fanned.mp4")
    np.testing.assert_array_equal(fanned, single[1])
    info = answer["processing_info"]
    segments = info["segments"]
    assert [segment["frames"] for segment in segments] == [[0, 23], [21, 44], [42, 61]]
    assert info["workers"] == 3 and info["segments_reused"] == 0 and info["plan"]["chunks"] == 9
    children = {job["id"]: job for job in cluster.emulator.segment_jobs()}
    ran_by = {children[segment["job_id"]]["server"] for segment in segments if segment["job_id"] in children}
    coordinator = cluster.emulator.jobs[job_id]["server"]
    assert len(ran_by | {coordinator}) >= 2 and all(segment["state"] == "done" for segment in segments)
    assert cluster.intermediates() == []  # the uploaded source and every segment are gone
    assert cluster.emulator.refused == 0 and API_KEY not in str(events)
    streamed = [event for event in events if event.get("event") == "segment"]
    assert sorted(event["index"] for event in streamed) == [0, 1, 2]
    assert all(event["url"].startswith("http") and event["state"] == "done" for event in streamed)
    assert events[-2]["event"] == "result" and events[-2]["media"] == answer["media"][0]
    updates = [update for updates in cluster.progress.updates.values() for update in updates
               if isinstance(update, dict) and "segments" in update]
    assert updates and updates[-1]["frames_total"] == sum(b - a for a, b in (s["frames"] for s in segments))
    print(f"\nfan-out of {FRAMES} frames over 3 workers: {wall:.1f} s; timings {info['timings']}")
    for segment in segments:
        print(f"  segment {segment['index']} frames {segment['frames']} job {segment['job_id']} "
              f"attempts {segment['attempts']} {segment['seconds']} s")


def test_a_failed_and_a_lost_segment_job_are_tried_again_and_the_frames_stay_the_same(cluster, clip, single):
    cluster.emulator.fail_next("failed", "lost")
    _, answer = cluster.run({"action": "restore", "media": b64(clip), "workers": 3, **OPTIONS})
    np.testing.assert_array_equal(cluster.frames(answer, "retried.mp4"), single[1])
    attempts = sorted(segment["attempts"] for segment in answer["processing_info"]["segments"])
    assert attempts[-2:] == [2, 2]  # each remote segment's first job failed or vanished
    assert cluster.intermediates() == []


def test_a_preview_is_fanned_out_inside_its_part(cluster, clip):
    part = {"action": "restore", "media": b64(clip), "start_time": 0.4, "duration": 1.6, **OPTIONS}  # frames 10..49
    _, alone = cluster.run(part)
    _, fanned = cluster.run({**part, "workers": 3, "compare": True})
    assert fanned["processing_info"]["range"] == {"first_frame": 10, "frames": 40, "start_time": 0.4, "duration": 1.6}
    assert fanned["compare"][0] and fanned["processing_info"]["segments"][-1]["frames"] == [28, 40]
    frames = cluster.frames(fanned, "part.mp4")
    assert len(frames) == 40
    np.testing.assert_array_equal(frames, cluster.frames(alone, "part-alone.mp4"))
    assert cluster.intermediates() == []


def test_a_clip_the_plan_restores_in_one_pass_is_not_split(cluster, clip):
    before = len(cluster.emulator.segment_jobs())
    whole = {"res_h": SIDE, "res_w": SIDE, "crf": 0}  # 61 frames fit one pass: the official whole-clip run
    _, answer = cluster.run({"action": "restore", "media": b64(clip), "workers": 3, **whole})
    info = answer["processing_info"]
    assert info["plan"]["chunks"] == 1 and info["workers"] == 1 and len(info["segments"]) == 1
    assert len(cluster.emulator.segment_jobs()) == before and cluster.intermediates() == []
    assert len(cluster.frames(answer, "one-pass.mp4")) == FRAMES


def after_segment_jobs_end(cluster: Cluster) -> list[str]:
    """Wait until no job is queued or running on any server, then remove and return the intermediates left."""
    cluster.emulator.wait_idle(JOB_TIMEOUT_S)
    leftovers = cluster.intermediates()
    if leftovers:
        cluster.s3.delete_objects(Bucket=S3_BUCKET, Delete={"Objects": [{"Key": key} for key in leftovers]})  # type: ignore[attr-defined]
    return leftovers


def test_cancelling_the_coordinator_cancels_its_segment_jobs(cluster, clip, tiny_handler, s3_endpoint, monkeypatch):
    from seedvr.serving.cancel import CancelToken

    for name, value in {"BUCKET_ENDPOINT_URL": f"{s3_endpoint}/{S3_BUCKET}", "BUCKET_ACCESS_KEY_ID": "key",
                        "BUCKET_SECRET_ACCESS_KEY": "secret", "SEEDVR_ENDPOINT_URL": cluster.emulator.url,
                        "RUNPOD_API_KEY": API_KEY, "SEEDVR_ALLOW_PRIVATE_URLS": "1"}.items():
        monkeypatch.setenv(name, value)
    before = {job["id"] for job in cluster.emulator.segment_jobs()}
    cancel, answer = CancelToken(), {}
    job = {"id": "coordinator-in-process", "input": {"action": "restore", "media": b64(clip), "workers": 3,
                                                      "seed": 7, **OPTIONS}}
    coordinator = threading.Thread(target=lambda: answer.update(tiny_handler(job, cancel)))
    coordinator.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(started := [j["id"] for j in cluster.emulator.segment_jobs() if j["id"] not in before]) < 2:
        assert time.monotonic() < deadline and coordinator.is_alive(), answer
        time.sleep(0.05)
    cancel.cancel("the job was stopped")  # what RunPod's /cancel or the execution timeout does to the handler
    coordinator.join(60)
    assert not coordinator.is_alive() and answer["error"].startswith("CANCELLED"), answer
    assert set(started) <= set(cluster.emulator.cancelled)
    assert all(cluster.emulator.jobs[job_id]["status"] in ("CANCELLED", "COMPLETED") for job_id in started)
    after_segment_jobs_end(cluster)  # a cancelled job's finished segments stay for a resume: clean them here


def test_a_new_coordinator_reuses_the_segments_of_one_that_died(cluster, clip, single):
    job = {"action": "restore", "media": b64(clip), "workers": 3, "seed": 666, **OPTIONS}
    first = cluster.emulator.submit(job)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any("/segment-" in key for key in cluster.intermediates()):
        assert time.monotonic() < deadline and cluster.emulator.jobs[first]["status"] == "IN_PROGRESS"
        time.sleep(0.05)
    name = cluster.emulator.jobs[first]["server"]
    cluster.emulator.remove_server(name)
    cluster.servers[name].process.kill()  # the coordinator dies with a segment in the bucket
    assert cluster.emulator.wait(first, 30)["status"] == "FAILED"
    _, answer = cluster.run(job)
    assert answer["processing_info"]["segments_reused"] >= 1
    np.testing.assert_array_equal(cluster.frames(answer, "resumed.mp4"), single[1])
    leftovers = after_segment_jobs_end(cluster)
    assert all("/segment-" in key for key in leftovers)  # only what a dead coordinator's straggler stored late
