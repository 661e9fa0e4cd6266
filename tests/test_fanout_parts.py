"""The parts of a job spread over workers, each with the real thing behind it: the lossless intermediate (ffmpeg),
the segment store (a moto S3 server), the endpoint client and the segment-job watcher (RunPod's endpoint API
emulated on loopback, tests/endpoint_emulator.py), the request rules, and the merge's memory over a long clip."""

import asyncio
import subprocess
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import S3_BUCKET
from endpoint_emulator import EndpointEmulator
from media_factory import FFMPEG, pattern_frame

from seedvr import settings
from seedvr.engine.chunking import plan_chunks
from seedvr.engine.segments import merge_segments, plan_segments
from seedvr.errors import INTERNAL, INVALID_INPUT, WORKER_FAULT, RestoreError
from seedvr.io.media.lossless import LosslessWriter, read_lossless
from seedvr.io.media.video import probe_video, read_frames
from seedvr.io.media.writer import VideoWriter
from seedvr.io.segment_store import PREFIX, SegmentStore, place_of
from seedvr.serving import schema
from seedvr.serving.cancel import CancelToken
from seedvr.serving.fanout import coordinator, segment_job
from seedvr.serving.fanout.dispatch import SegmentJobs, SegmentState
from seedvr.serving.fanout.endpoint import Endpoint, EndpointError
from seedvr.serving.jobs import JobContext
from seedvr.serving.model_holder import ModelHolder
from seedvr.serving.stream import streamed

KEY = "rp-parts-0123456789abcdef"


def random_frames(count: int, height: int = 30, width: int = 34) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- the lossless intermediate

def test_the_lossless_intermediate_gives_back_every_rgb_frame_bit_for_bit(tmp_path):
    frames = random_frames(7)  # odd-free but not a multiple of 16, every value of every channel used
    with LosslessWriter(tmp_path / "segment.mkv", 34, 30) as writer:
        for frame in frames:
            writer.write(frame)
    np.testing.assert_array_equal(np.stack(list(read_lossless(tmp_path / "segment.mkv", 34, 30, 7))), frames)
    # what "lossless" H.264 in yuv420p would have done to the same frames: not the frames
    x264 = tmp_path / "qp0.mkv"
    subprocess.run([FFMPEG, "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "34x30", "-i", "pipe:0",
                    "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(x264)], input=frames.tobytes(),
                   check=True)
    assert not np.array_equal(read_frames(x264, probe_video(x264)), frames)


def test_an_intermediate_with_other_frames_than_announced_is_refused(tmp_path):
    with LosslessWriter(tmp_path / "segment.mkv", 34, 30) as writer:
        for frame in random_frames(3):
            writer.write(frame)
    with pytest.raises(RestoreError) as refused:
        list(read_lossless(tmp_path / "segment.mkv", 34, 30, 4, "segment 2"))
    assert refused.value.code == INTERNAL and "segment 2 holds 3 frames" in refused.value.message


# ----------------------------------------------------------------------------- the segment store

@pytest.fixture
def store(s3_endpoint):
    store = SegmentStore(settings.Bucket(f"{s3_endpoint}/{S3_BUCKET}", "key", "secret"))
    yield store
    store.delete([key for key, _ in store.keys()])


def test_the_store_keeps_a_job_s_objects_in_its_folder_and_drops_them_after_a_day(store, tmp_path, monkeypatch):
    source = tmp_path / "source.mp4"
    source.write_bytes(b"source bytes")
    store.put("digest/source.mp4", source, "video/mp4")
    store.put("other/segment-0-1.mkv", source, "video/x-matroska")
    assert store.fresh("digest/source.mp4") and not store.fresh("digest/segment-0-1.mkv")
    store.fetch("digest/source.mp4", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"source bytes"
    assert sorted(key for key, _ in store.keys()) == ["digest/source.mp4", "other/segment-0-1.mkv"]
    assert store.expire() == []  # both are seconds old
    monkeypatch.setattr("seedvr.io.segment_store.MAX_AGE_S", 0)  # now both are "older than a day"
    assert not store.fresh("digest/source.mp4")  # looked at: found too old, deleted
    assert store.expire() == ["other/segment-0-1.mkv"] and store.keys() == []


@pytest.mark.parametrize("url, place", [
    ("http://minio:9000/results", ("http://minio:9000", "results", f"{PREFIX}/", True)),
    ("https://s3.example.com/results/worker-a/", ("https://s3.example.com", "results", f"worker-a/{PREFIX}/", True)),
    ("https://results.nyc3.digitaloceanspaces.com", ("https://results.nyc3.digitaloceanspaces.com", PREFIX, "", False)),
], ids=["bucket-in-path", "bucket-and-folder", "bucket-in-host"])
def test_the_store_finds_its_bucket_in_the_endpoint_url_as_the_delivery_does(url, place):
    found = place_of(url)
    assert (found.endpoint_url, found.bucket, found.prefix, found.listable) == place


# ----------------------------------------------------------------------------- the endpoint and the segment jobs

@pytest.fixture
def emulator():
    emulator = EndpointEmulator(KEY)  # no worker server: jobs stay queued unless the test fails them
    yield emulator
    emulator.close()


def test_the_endpoint_client_speaks_runpod_s_routes_and_keeps_its_key_to_itself(emulator, caplog):
    endpoint = Endpoint(emulator.url, KEY)
    job_id = endpoint.run({"action": "health"})
    assert endpoint.status(job_id).state == "IN_QUEUE"
    endpoint.cancel(job_id)
    assert endpoint.status(job_id).state == "CANCELLED" and emulator.cancelled == [job_id]
    with pytest.raises(EndpointError) as refused:
        Endpoint(emulator.url, "wrong-" + KEY).status(job_id)
    assert refused.value.status_code == 401 and emulator.refused == 1
    with pytest.raises(EndpointError) as vanished:
        endpoint.status("job-999")
    assert vanished.value.status_code == 404
    shown = " ".join([str(refused.value), str(vanished.value), repr(endpoint), caplog.text])
    assert KEY not in shown


def test_the_endpoint_is_this_one_unless_seedvr_endpoint_url_says_otherwise(monkeypatch):
    monkeypatch.delenv("SEEDVR_ENDPOINT_URL", raising=False)
    endpoint = Endpoint.from_environment({"RUNPOD_API_KEY": KEY, "RUNPOD_ENDPOINT_ID": "abc123"})
    assert endpoint.base_url == "https://api.runpod.ai/v2/abc123" and KEY not in repr(endpoint)
    with pytest.raises(RestoreError) as missing:
        Endpoint.from_environment({"RUNPOD_ENDPOINT_ID": "abc123"})
    assert missing.value.code == INVALID_INPUT and "RUNPOD_API_KEY" in missing.value.message
    monkeypatch.setenv("SEEDVR_ENDPOINT_URL", "http://127.0.0.1:9/v2/local/")
    assert Endpoint.from_environment({"RUNPOD_API_KEY": KEY}).base_url == "http://127.0.0.1:9/v2/local"


def test_a_segment_whose_job_keeps_failing_fails_the_job_naming_it_after_three_tries(emulator, store):
    emulator.fail_next("failed", "lost", "failed")
    chunks = plan_chunks(61, 9, 2)
    states = [SegmentState(segment, f"digest/segment-{segment.first_chunk}-{segment.last_chunk}.mkv")
              for segment in plan_segments(chunks, 3)]
    states[0].state = "local"  # the coordinator's
    states[2].state = "reused"
    changes: list[str] = []
    jobs = SegmentJobs(Endpoint(emulator.url, KEY), store, states, lambda segment: {"segment": segment.index},
                       lambda state: changes.append(state.state), poll_s=0.02).start()
    try:
        with pytest.raises(RestoreError) as failed:
            jobs.wait(states[1], CancelToken())
    finally:
        jobs.stop()
    assert failed.value.code == WORKER_FAULT
    assert failed.value.message.startswith("segment 1 (frames 21-44) failed 3 times; the last: job job-3 ended FAILED")
    assert states[1].attempts == 3 and len(emulator.jobs) == 3 and changes.count("pending") == 2


# ----------------------------------------------------------------------------- the request and its checks

@pytest.mark.parametrize("fields, problem", [
    ({"workers": 2, "chunk_frames": 9, "chunk_overlap": 5}, "chunk_overlap 5 is more than half of chunk_frames 9"),
    ({"workers": 2, "media": ["a", "b"]}, "send one item, not 2"),
    ({"workers": 2, "image": "a", "media": None}, "an image is restored by one"),
    ({"workers": 2, "chunk_frames": 9, "chunk_overlap": 2, "segment": {
        "clip_first": 0, "clip_frames": 61, "first_chunk": 0, "last_chunk": 2, "source_sha256": "ab"}},
     "a segment job never fans out again"),
    ({"segment": {"clip_first": 0, "clip_frames": 61, "first_chunk": 0, "last_chunk": 2, "source_sha256": "ab"}},
     "segment needs the clip's chunk_frames and chunk_overlap"),
    ({"chunk_frames": 9, "chunk_overlap": 2, "segment": {
        "clip_first": 0, "clip_frames": 61, "first_chunk": 7, "last_chunk": 9, "source_sha256": "ab"}},
     "segment chunks 7..9 are not in the plan of 61 frames"),
    ({"workers": 65}, "workers must be an integer between 1 and 64"),
    ({"workers": 2, "fallback_upscaler": "x4"}, "fallback_upscaler replaces SeedVR2 for a whole item"),
], ids=["overlap-over-half", "two-items", "image", "segment-fans-out", "segment-unpinned", "segment-past-plan",
        "too-many", "fallback"])
def test_a_fan_out_the_worker_cannot_do_exactly_is_refused_naming_the_fix(fields, problem):
    job_input = {"action": "restore", "media": "a", **fields}
    job_input = {name: value for name, value in job_input.items() if value is not None}
    with pytest.raises(RestoreError) as refused:
        schema.parse_request(job_input)
    assert refused.value.code == INVALID_INPUT and problem in refused.value.message


def test_fan_out_fields_default_to_one_worker_reusing_what_a_failed_run_left():
    request = schema.parse_request({"action": "restore", "media": "a"})
    assert (request.workers, request.resume, request.segment) == (1, True, None)


def test_workers_without_a_bucket_or_a_key_are_refused_before_any_work(monkeypatch, s3_endpoint):
    for name in (*settings.BUCKET_VARIABLES, "RUNPOD_API_KEY", "SEEDVR_ENDPOINT_URL", "RUNPOD_ENDPOINT_ID"):
        monkeypatch.delenv(name, raising=False)
    request = schema.parse_request({"action": "restore", "media": "not even base64", "workers": 3})
    assert isinstance(request, schema.RestoreRequest)
    holder = ModelHolder()
    with pytest.raises(RestoreError) as no_bucket:
        coordinator.restore_across_workers(request, JobContext(), holder)
    assert no_bucket.value.code == INVALID_INPUT and "BUCKET_ENDPOINT_URL" in no_bucket.value.message
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", f"{s3_endpoint}/{S3_BUCKET}")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(RestoreError) as no_key:
        coordinator.restore_across_workers(request, JobContext(), holder)
    assert no_key.value.code == INVALID_INPUT and "RUNPOD_API_KEY" in no_key.value.message
    assert holder.current is None  # nothing was loaded, decoded or downloaded
    for name in settings.BUCKET_VARIABLES:
        monkeypatch.delenv(name)
    with pytest.raises(RestoreError) as segment_without_bucket:
        segment_job.restore_segment(schema.parse_request({  # type: ignore[arg-type]
            "action": "restore", "media": "a", "chunk_frames": 9, "chunk_overlap": 2, "segment": {
                "clip_first": 0, "clip_frames": 61, "first_chunk": 0, "last_chunk": 2, "source_sha256": "ab"}}),
            JobContext(), holder)
    assert segment_without_bucket.value.code == INVALID_INPUT


# ----------------------------------------------------------------------------- a long clip through the merge

LONG_FRAMES, LONG_WIDTH, LONG_HEIGHT = 1500, 64, 48


def test_the_merge_of_a_1500_frame_clip_streams_in_the_memory_of_a_few_frames(tmp_path):
    """The coordinator's side of a long job: three segment files (lossless, as the workers store them) merged into
    the final encode. Python's allocations (numpy's frames among them) are traced: the peak stays far below the clip
    (1500 frames of 64x48 RGB are 13.8 MB; its float32 blend would be 55 MB). What does grow with the length is the
    probes' packet lists (tens of bytes a frame), about 0.4 MB here."""
    chunks = plan_chunks(LONG_FRAMES, 33, 5)
    segments = plan_segments(chunks, 3)
    for segment in segments:  # every segment returns the clip's own frames: the merge must give back the clip
        with LosslessWriter(tmp_path / f"segment-{segment.index}.mkv", LONG_WIDTH, LONG_HEIGHT) as writer:
            for index in range(segment.start, segment.stop):
                writer.write(pattern_frame(index, LONG_WIDTH, LONG_HEIGHT))
    parts = ((segment, read_lossless(tmp_path / f"segment-{segment.index}.mkv", LONG_WIDTH, LONG_HEIGHT,
                                     segment.frames)) for segment in segments)
    mismatched = 0
    tracemalloc.start()
    try:
        with VideoWriter(tmp_path / "merged.mkv", LONG_WIDTH, LONG_HEIGHT, 25, codec="ffv1") as writer:
            for index, frame in enumerate(merge_segments(parts, chunks)):
                mismatched += not np.array_equal(frame, pattern_frame(index, LONG_WIDTH, LONG_HEIGHT))
                writer.write(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    clip_bytes = LONG_FRAMES * LONG_WIDTH * LONG_HEIGHT * 3
    assert mismatched == 0 and writer.frames_written == LONG_FRAMES
    assert peak < clip_bytes / 10, f"the merge peaked at {peak} traced bytes for a {clip_bytes}-byte clip"
    print(f"\nmerge of {LONG_FRAMES} frames: traced peak {peak / 1e3:.0f} kB (clip {clip_bytes / 1e6:.1f} MB)")


def test_a_segment_reads_its_frames_by_number_from_the_video(tmp_path):
    path = tmp_path / "source.mkv"
    with LosslessWriter(path, 32, 32) as writer:
        for index in range(30):
            writer.write(pattern_frame(index, 32, 32))
    video = probe_video(path)
    part = segment_job.part_of(video, 11, 7, video.frame_count)
    np.testing.assert_array_equal(read_frames(path, part), np.stack([pattern_frame(i, 32, 32) for i in range(11, 18)]))
    assert Path(path).exists()


# ----------------------------------------------------------------------------- settings and the streamed handler

def test_the_endpoint_url_and_streaming_are_settings_checked_at_start():
    with pytest.raises(settings.SettingsError, match="SEEDVR_ENDPOINT_URL must be an http"):
        settings.read({"SEEDVR_ENDPOINT_URL": "api.runpod.ai/v2/abc"})
    chosen = settings.read({"SEEDVR_ENDPOINT_URL": "https://api.runpod.ai/v2/abc/", "SEEDVR_STREAMING": "1"})
    assert (chosen.endpoint_url, chosen.streaming) == ("https://api.runpod.ai/v2/abc", True)
    assert settings.read({}).streaming is False and settings.read({}).endpoint_url is None


def test_a_streamed_job_gives_its_events_in_order_then_its_answer_and_a_stop_reaches_its_work():
    def work(emit, release=None):
        for index in range(3):
            emit({"event": "progress", "frames_done": index})
        if release is not None:
            release.wait(5)
        return {"success": True}

    async def collect():
        return [event async for event in streamed(work, lambda: None, 1.0)]

    assert asyncio.run(collect()) == [*({"event": "progress", "frames_done": i} for i in range(3)), {"success": True}]

    release, stopped = threading.Event(), []

    async def stop_midway():
        async def consume():
            async for event in streamed(lambda emit: work(emit, release), lambda: (stopped.append(1), release.set()),
                                        5.0):
                if event["frames_done"] == 2:
                    asyncio.current_task().cancel()  # what runpod does to a stopped job's task

        with pytest.raises(asyncio.CancelledError):
            await consume()

    asyncio.run(stop_midway())
    assert stopped == [1]
