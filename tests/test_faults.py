"""Faults injected for real (gloo ranks of the tiny models on the CPU, a tmpfs TMPDIR): a rank killed or
stopped, idle or mid-job, costs no job; twice in one item is WORKER_FAULT; a full disk is NO_SPACE."""

import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import psutil
import pytest
from media_factory import ffmpeg_children, make_image, pattern_frames, write_video
from PIL import Image
from worker_server import WorkerServer, make_job_tmp, tiny_environment, tiny_paths

from seedvr.errors import CANCELLED, NO_SPACE, WORKER_FAULT, RestoreError
from seedvr.serving import jobs
from seedvr.serving.cancel import CancelToken
from seedvr.serving.model_holder import ModelHolder
from seedvr.serving.schema import RestoreRequest, parse_request

pytestmark = pytest.mark.slow  # rank processes, stalls and a tmpfs worker


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def clip_b64(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, pattern_frames(9, 64, 48), Fraction(25))
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture
def holder(tiny_dir, monkeypatch):
    for name, value in tiny_paths(tiny_dir).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
    held = ModelHolder()
    yield held
    held.release()


def request(clip: str) -> RestoreRequest:
    parsed = parse_request({"action": "restore", "media": clip, "sp_size": 2, "res_h": 48, "res_w": 64, "crf": 0})
    assert isinstance(parsed, RestoreRequest)
    return parsed


def rank_pids(holder: ModelHolder) -> list[int]:
    assert holder.current is not None
    return holder.current.restorer.pids  # type: ignore[attr-defined]  # the group's own diagnostics


def restore(holder: ModelHolder, clip: str, on_update=None) -> dict:
    return jobs.restore(request(clip), jobs.JobContext("fault-test", on_update), holder)


def test_a_rank_killed_while_idle_costs_no_job(holder, clip_b64):
    first = restore(holder, clip_b64)
    pids = rank_pids(holder)
    os.kill(pids[1], signal.SIGKILL)
    while running(pids[1]):
        time.sleep(0.01)
    answer = restore(holder, clip_b64)  # the dead rank is found before the job; the group is rebuilt
    assert answer["success"] and answer["processing_info"]["retries"] == []
    assert not set(rank_pids(holder)) & set(pids)
    assert answer["media"][0] and first["media"][0]


def test_a_rank_killed_mid_job_is_healed_by_one_retry(holder, clip_b64):
    restore(holder, clip_b64)  # the group is up
    killed: list[int] = []

    def kill_in_the_dit(update: dict) -> None:
        if update["phase"] == "dit" and not killed:
            killed.append(rank_pids(holder)[1])
            os.kill(killed[0], signal.SIGKILL)

    started = time.monotonic()
    answer = restore(holder, clip_b64, kill_in_the_dit)
    print(f"killed mid-job: answered in {time.monotonic() - started:.1f} s")
    assert answer["success"] and killed
    (fault,) = answer["processing_info"]["retries"]
    assert "rank 1" in fault["worker_fault"] and "exit code -9" in fault["worker_fault"], fault
    assert not running(killed[0])


def test_a_fault_in_the_retry_too_is_worker_fault_and_the_next_job_succeeds(holder, clip_b64):
    restore(holder, clip_b64)
    killed: list[int] = []

    def kill_every_attempt(update: dict) -> None:
        if update["phase"] == "dit":
            pid = rank_pids(holder)[1]
            if pid not in killed:
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(RestoreError) as caught:
        restore(holder, clip_b64, kill_every_attempt)
    assert caught.value.code == WORKER_FAULT and "send the job again" in caught.value.message
    assert len(killed) == 2
    assert restore(holder, clip_b64)["success"]


@pytest.mark.parametrize("when", ["idle", "mid-job"])
def test_a_stopped_rank_is_detected_torn_down_and_the_job_retried(holder, clip_b64, monkeypatch, when):
    stall_s = 20 if when == "mid-job" else 6
    monkeypatch.setenv("SEEDVR_SP_STALL_S", str(stall_s))
    restore(holder, clip_b64)  # a group that reads the stall limit
    stopped: list[int] = []

    def stop_in_the_dit(update: dict) -> None:
        if update["phase"] == "dit" and not stopped:
            stopped.append(rank_pids(holder)[1])
            os.kill(stopped[0], signal.SIGSTOP)

    if when == "idle":
        stopped.append(rank_pids(holder)[1])
        os.kill(stopped[0], signal.SIGSTOP)
    started = time.monotonic()
    answer = restore(holder, clip_b64, stop_in_the_dit if when == "mid-job" else None)
    elapsed = time.monotonic() - started
    print(f"rank stopped {when}, SEEDVR_SP_STALL_S={stall_s}: answered in {elapsed:.1f} s")
    assert answer["success"] and elapsed < 150
    (fault,) = answer["processing_info"]["retries"]
    assert f"made no progress for {stall_s} s" in fault["worker_fault"]
    assert not running(stopped[0])  # SIGKILL ends a stopped process
    assert restore(holder, clip_b64)["success"]  # the next job too


@pytest.fixture
def full_tmp():
    """A 3 MB tmpfs to serve as the worker's TMPDIR (CI runs as root; elsewhere mounting is refused)."""
    folder = make_job_tmp()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:200]}): needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def job_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("seedvr-job-"))


def test_a_full_temporary_disk_is_no_space_and_the_next_job_runs(tiny_dir, full_tmp, tmp_path):
    worker = WorkerServer(tiny_environment(tiny_dir, full_tmp), tmp_path / "worker.log")
    try:
        noise = tmp_path / "noise.png"  # a real image of more bytes than the disk holds
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(noise)
        assert noise.stat().st_size > 3 * 1024**2
        answer = worker.runsync({"action": "restore", "media": base64.b64encode(noise.read_bytes()).decode()})
        assert answer["status"] == "FAILED" and answer["error"].startswith(f"{NO_SPACE}: "), answer
        assert str(full_tmp) in answer["error"] and "MB free" in answer["error"]
        assert job_files(full_tmp) == []

        clip = tmp_path / "clip.mp4"
        write_video(clip, pattern_frames(5, 64, 48), Fraction(25))  # 5 frames in: a few kB
        big_out = {"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(), "res_h": 624,
                   "res_w": 832, "crf": 0}  # noise at 832x624, lossless: about 4 MB out
        answer = worker.runsync(big_out)
        assert answer["status"] == "FAILED" and answer["error"].startswith(f"{NO_SPACE}: "), answer
        assert "encoding the restored video" in answer["error"]
        assert job_files(full_tmp) == []

        image, _, _ = make_image(tmp_path, "jpeg")
        answer = worker.runsync({"action": "restore", "media": base64.b64encode(image.read_bytes()).decode(),
                                 "res_h": 64, "res_w": 96})
        assert answer["status"] == "COMPLETED", answer
        assert job_files(full_tmp) == []
        health = worker.runsync({"action": "health"})["output"]
        assert health["disk"]["temporary"]["path"] == str(full_tmp)
        assert health["disk"]["temporary"]["total_bytes"] <= 4 * 1024**2
    finally:
        worker.stop()


def test_no_rank_outlives_a_killed_worker(tiny_dir, tmp_path):
    script = ("import handler, json, sys, time\n"
              "print(json.dumps(handler.serve({'id': 'i', 'input': {'action': 'initialize', 'sp_size': 2}})), flush=True)\n"
              "import seedvr\n"
              "print(json.dumps(handler.HOLDER.current.restorer.pids), flush=True)\n"
              "time.sleep(600)\n")
    env = {**os.environ, **tiny_paths(tiny_dir)}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent, env=env,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        pids = [int(pid) for pid in process.stdout.readline().strip("[]\n").split(",")]
        assert all(running(pid) for pid in pids)
        process.kill()
        process.wait(10)
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in pids)
    finally:
        process.kill()


@pytest.mark.parametrize("sp_size", [1, 2])
def test_a_cancelled_job_stops_its_work_and_leaves_nothing(holder, tmp_path, monkeypatch, sp_size):
    """The token cancelled from another thread mid-job (what the async handler does on RunPod's stop): the job
    ends with CANCELLED at once, its decoder and encoder are gone, its folder removed; the next job runs."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clip = tmp_path / "long.mp4"
    write_video(clip, pattern_frames(60, 64, 48), Fraction(25))
    job = parse_request({"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(), "res_h": 48,
                         "res_w": 64, "sp_size": sp_size, "chunk_frames": 9, "chunk_overlap": 1})
    assert isinstance(job, RestoreRequest)
    token = CancelToken()
    seen: list[str] = []

    def cancel_in_the_second_chunk(update: dict) -> None:
        seen.append(update["phase"])
        if seen.count("dit") == 2:
            threading.Thread(target=token.cancel, args=("stopped by the test",)).start()

    started = time.monotonic()
    with pytest.raises(RestoreError) as caught:
        jobs.restore(job, jobs.JobContext("cancel-test", cancel_in_the_second_chunk, token), holder)
    print(f"sp_size {sp_size}: stopped {time.monotonic() - started:.1f} s after the start")
    assert caught.value.code == CANCELLED and "stopped by the test" in caught.value.message
    assert ffmpeg_children() == []
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith("seedvr-job-")] == []
    assert seen.count("dit") < 7  # 60 frames in 9-frame chunks: it did not run to the end
    again = parse_request({"action": "restore", "media": base64.b64encode(clip.read_bytes()).decode(), "res_h": 48,
                           "res_w": 64, "sp_size": sp_size})
    assert isinstance(again, RestoreRequest)
    assert jobs.restore(again, jobs.JobContext("after"), holder)["success"]


def test_a_dead_rank_is_seen_even_when_something_else_reaps_children(holder, clip_b64):
    """With SIGCHLD ignored (some library in the process did that during the full suite), the kernel reaps the
    killed rank itself and multiprocessing's is_alive() keeps answering True: the group asks the system."""
    restore(holder, clip_b64)
    pids = rank_pids(holder)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        os.kill(pids[1], signal.SIGKILL)
        while running(pids[1]):
            time.sleep(0.01)
        answer = restore(holder, clip_b64)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert answer["success"] and answer["processing_info"]["retries"] == []
