"""End to end in production mode: `python handler.py` (no flags) polling a job API, as RunPod runs it.

runpod-python switches to its production loop when RUNPOD_WEBHOOK_GET_JOB is set: it long-polls the job-take
URL for jobs, posts answers and progress to RUNPOD_WEBHOOK_POST_OUTPUT, long-polls the per-job stop channel
(the job-take URL with /job-take/ replaced by /job-stop/) and pings RUNPOD_WEBHOOK_PING. `JobApi` below is a
small real HTTP server speaking those routes on loopback:

    GET  /job-take/<worker>?gpu=test&job_in_progress=0|1   the next queued job {"id", "input"}, else 204 (held ~0.5 s)
    POST /job-done/<worker>?id=<job>&isStream=false        {"output": ...} / {"error": ...}, or a progress
                                                            update {"status": "IN_PROGRESS", "output": {...}}
    GET  /job-stop/<worker>?gpu=test                       long-poll: {"jobsToStop": [ids]} once the test stops a
                                                            job, else 204 after ~2 s
    GET  /ping/<worker>                                    200

The environment differs from a RunPod machine in two ways only: runpod's automatic system checks are off
(RUNPOD_SKIP_AUTO_SYSTEM_CHECKS: they want 4 GB of free memory, 10 % free disk and a TCP connection to
8.8.8.8:53, and a machine without network would make the worker exit 1 before its first job) and there is no
GPU (RUNPOD_SKIP_GPU_CHECK). The worker's own fitness checks (seedvr.serving.fitness) still run, through runpod.

The long job (`long_restore_input`): 96 frames of 320x240 restored at 320x240 by the tiny random-weight model,
in chunks of 9 frames. Measured on 2 CPU cores when this test was written (`MEASURE_LONG_JOB=1 pytest -s -k
really`): 107.7 s unstopped, in 12 chunks whose phases (preprocess, vae_encode, dit, vae_decode, postprocess,
encode) last at most about 5.5 s each, with its ffmpeg decoder and encoder running throughout. So a stop
honoured within 20 s is meaningful. The stop is tested twice: between chunks, and inside one long phase
(unchunked at 640x480 the same clip takes about 315 s with single phases of 70-170 s on these CPUs), where the
model's own interruption (a check at every DiT block and VAE convolution) has to stop it.

SIGTERM stops the running job as RunPod's own stop does: its task is cancelled, so no answer is posted.
"""

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from media_factory import make_image, pattern_frames, write_video
from PIL import Image
from worker_server import REPO_ROOT, tiny_environment

pytestmark = pytest.mark.slow  # a worker process polling a job API: not in the fast lane

WORKER_ID = "test-worker"
TAKE_HOLD_S = 0.5  # an empty job-take answers 204 after this long
STOP_HOLD_S = 2.0  # an idle stop long-poll answers 204 after this long
START_TIMEOUT_S = 120.0  # the worker's first job-take (imports, fitness checks)
MODEL_PHASES = {"preprocess", "vae_encode", "dit", "vae_decode", "postprocess"}
STOP_ANSWER_S = 20.0  # a stopped job frees the worker for the next one within this
SIGTERM_EXIT_S = 30.0  # SIGTERM during a job: the worker exits within this

LONG_FRAMES, LONG_WIDTH, LONG_HEIGHT = 96, 320, 240
LONG_RES_H, LONG_RES_W = 240, 320
LONG_CHUNK_FRAMES = 9


# ----------------------------------------------------------------------------- the job API


class JobApi:
    """RunPod's job API for one worker, on 127.0.0.1 (a port of its own), in a thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[dict] = deque()
        self._stops: list[str] = []
        self.taken: dict[str, float] = {}  # job id -> when it was handed out (time.monotonic())
        self.progress: dict[str, list[tuple[float, dict]]] = {}  # job id -> (when, progress output), in order
        self.results: dict[str, tuple[float, dict]] = {}  # job id -> (when, final body)
        self.extra_results: list[tuple[str, dict]] = []  # a second final answer for a job (must not happen)
        self.takes = 0  # job-take requests seen
        self.stop_polls = 0  # stop-channel requests seen
        self.pings = 0
        self.bad_requests: list[str] = []  # routes the worker should never call
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="job-api", daemon=True)
        self._thread.start()

    # --- what the test does

    def environment(self) -> dict[str, str]:
        root = f"http://127.0.0.1:{self.port}"
        return {"RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID?gpu=test",
                "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID?id=$ID",
                "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID",
                "RUNPOD_POD_ID": WORKER_ID,
                "RUNPOD_AI_API_KEY": "test-key",  # RunPod sets it; without it runpod sends no pings
                "RUNPOD_PING_INTERVAL": "2000",
                "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
                "RUNPOD_SKIP_GPU_CHECK": "true"}

    def queue(self, job_id: str, job_input: dict) -> None:
        with self._cond:
            self._queue.append({"id": job_id, "input": job_input})
            self._cond.notify_all()

    def stop(self, job_id: str) -> None:
        """Ask the worker to stop a job: the next (or the waiting) stop long-poll answers with it."""
        with self._cond:
            self._stops.append(job_id)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float, worker: "Worker | None" = None,
             what: str = "") -> bool:
        """Wait until predicate() (checked under the lock) holds; False after `timeout` s or if the worker
        process exited."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or (worker is not None and worker.process.poll() is not None):
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the routes

    def _take(self) -> dict | None:
        deadline = time.monotonic() + TAKE_HOLD_S
        with self._cond:
            self.takes += 1
            self._cond.notify_all()
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            job = self._queue.popleft()
            self.taken[job["id"]] = time.monotonic()
            self._cond.notify_all()
            return job

    def _stop_poll(self) -> list[str]:
        deadline = time.monotonic() + STOP_HOLD_S
        with self._cond:
            self.stop_polls += 1
            self._cond.notify_all()
            while not self._stops:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            stops, self._stops = self._stops, []
            return stops

    def _done(self, job_id: str, body: dict) -> None:
        now = time.monotonic()
        with self._cond:
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append((now, body.get("output") or {}))
            elif job_id in self.results:
                self.extra_results.append((job_id, body))
            else:
                self.results[job_id] = (now, body)
            self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
                pass

            def _answer(self, status: int, payload: dict | None = None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (the base class's name)
                path = urllib.parse.urlsplit(self.path).path
                if path.startswith("/job-take/"):
                    job = api._take()
                    self._answer(204) if job is None else self._answer(200, job)
                elif path.startswith("/job-stop/"):
                    stops = api._stop_poll()
                    self._answer(200, {"jobsToStop": stops}) if stops else self._answer(204)
                elif path.startswith("/ping/"):
                    with api._cond:
                        api.pings += 1
                    self._answer(200, {})
                else:
                    api.bad_requests.append(f"GET {self.path}")
                    self._answer(404, {})

            def do_POST(self) -> None:  # noqa: N802
                parts = urllib.parse.urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if not parts.path.startswith("/job-done/"):
                    api.bad_requests.append(f"POST {self.path}")
                    self._answer(404, {})
                    return
                job_id = urllib.parse.parse_qs(parts.query).get("id", [""])[0]
                try:
                    body = json.loads(raw)
                except ValueError:  # form-encoded after all
                    body = json.loads(urllib.parse.unquote_plus(raw))
                api._done(job_id, body)
                self._answer(200, {})

        return Handler


# ----------------------------------------------------------------------------- the worker


class Worker:
    """`python handler.py` in production mode, its output in a log file."""

    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "handler.py"], cwd=REPO_ROOT, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ffmpeg_children(self) -> list[psutil.Process]:
        found = []
        for child in self.children():
            try:
                if "ffmpeg" in child.name() or any("ffmpeg" in part for part in child.cmdline()[:1]):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def kill(self) -> None:
        """End the worker and every process under it (by pid), then close the log."""
        children = self.children()
        if self.process.poll() is None:
            self.process.kill()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)
        psutil.wait_procs(children, timeout=10)
        self._log.close()


@pytest.fixture
def job_tmp(tmp_path: Path) -> Path:
    """The worker's TMPDIR: its jobs' folders (seedvr-job-*) are made there."""
    folder = tmp_path / "worker-tmp"
    folder.mkdir()
    return folder


@pytest.fixture
def production(tiny_dir: Path, job_tmp: Path, tmp_path: Path) -> Iterator[tuple[JobApi, "Worker"]]:
    """(job API, worker) with the worker polling the API; both are ended after the test."""
    api = JobApi()
    env = {name: value for name, value in tiny_environment(tiny_dir, job_tmp).items()
           if not name.startswith("RUNPOD_")}  # nothing of the test runner's own RunPod settings
    worker = Worker({**env, **api.environment()}, tmp_path / "worker.log")
    try:
        if not api.wait(lambda: api.takes > 0, START_TIMEOUT_S, worker):
            pytest.fail(f"the worker never asked for a job (exit code {worker.process.poll()}):\n{worker.tail()}")
        yield api, worker
    finally:
        worker.kill()
        api.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def long_restore_input(directory: Path, one_long_phase: bool = False) -> dict:
    path = write_video(directory / "long.mp4", pattern_frames(LONG_FRAMES, LONG_WIDTH, LONG_HEIGHT), Fraction(30))
    if one_long_phase:  # one chunk at twice the size: phases of minutes on a CPU
        return {"action": "restore", "media": b64(path), "res_h": 2 * LONG_RES_H, "res_w": 2 * LONG_RES_W}
    return {"action": "restore", "media": b64(path), "res_h": LONG_RES_H, "res_w": LONG_RES_W,
            "chunk_frames": LONG_CHUNK_FRAMES}


def running(process: psutil.Process) -> bool:
    """Whether a process still runs (a zombie does not)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def job_folders(job_tmp: Path) -> list[Path]:
    return sorted(job_tmp.glob("seedvr-job-*"))


def wait_for_model_phase(api: JobApi, worker: Worker, job_id: str, timeout: float = 120.0) -> dict:
    """The first progress update of `job_id` that names a model phase."""
    def model_phase() -> bool:
        return any(update.get("phase") in MODEL_PHASES for _, update in api.progress.get(job_id, []))

    if not api.wait(model_phase, timeout, worker):
        pytest.fail(f"no model phase in the progress of {job_id} after {timeout} s: "
                    f"{api.progress.get(job_id)}, answer {api.results.get(job_id)}\n{worker.tail()}")
    return next(update for _, update in api.progress[job_id] if update.get("phase") in MODEL_PHASES)


# ----------------------------------------------------------------------------- the tests


def test_jobs_are_taken_and_answered(production: tuple[JobApi, "Worker"], tmp_path: Path) -> None:
    api, worker = production
    image, _, _ = make_image(tmp_path, "jpeg")
    api.queue("job-health", {"action": "health"})
    api.queue("job-restore", {"action": "restore", "media": b64(image), "res_h": 64, "res_w": 96})

    answered = api.wait(lambda: {"job-health", "job-restore"} <= set(api.results), 180.0, worker)
    assert answered, f"answers {list(api.results)} (exit code {worker.process.poll()}):\n{worker.tail()}"

    health = api.results["job-health"][1]
    assert "error" not in health, health
    assert health["output"]["status"] == "healthy"
    assert health["output"]["cuda_available"] is False

    restore = api.results["job-restore"][1]
    assert "error" not in restore, restore
    output = restore["output"]
    assert output["success"] is True and output["media_type"] == "image"
    picture = Image.open(io.BytesIO(base64.b64decode(output["media"][0])))
    picture.load()
    assert output["resolution"] == f"{picture.width}x{picture.height}"
    assert picture.width % 16 == 0 and picture.height % 16 == 0

    # progress went through the same URL while the restore ran: decode, the model's phases, encode
    phases = [update["phase"] for _, update in api.progress.get("job-restore", [])]
    assert phases, f"no progress posted for the restore:\n{worker.tail()}"
    assert {"decode", "dit", "encode"} <= set(phases), phases
    for _, update in api.progress["job-restore"]:
        assert {"phase", "frames_done", "frames_total", "percent", "eta_s"} <= set(update), update
    assert not api.progress.get("job-health"), "health reports no progress"
    assert not api.extra_results and not api.bad_requests, (api.extra_results, api.bad_requests)
    assert api.pings > 0, "the worker pings the API (runpod's heartbeat process)"
    assert worker.process.poll() is None, "the worker keeps serving"


@pytest.mark.parametrize("where", ["between-chunks", "inside-a-long-phase"])
def test_stop_signal_frees_the_worker(production: tuple[JobApi, "Worker"], job_tmp: Path, tmp_path: Path,
                                      where: str) -> None:
    api, worker = production
    api.queue("job-long", long_restore_input(tmp_path, one_long_phase=where == "inside-a-long-phase"))
    first = wait_for_model_phase(api, worker, "job-long")
    assert job_folders(job_tmp), "the running job works in its own folder"
    ffmpegs = worker.ffmpeg_children()  # the job's decoder and encoder
    assert ffmpegs, f"the running job has no ffmpeg process: {[child.name() for child in worker.children()]}"

    stop_sent = time.monotonic()
    api.stop("job-long")
    api.queue("job-after", {"action": "health"})
    answered = api.wait(lambda: "job-after" in api.results, STOP_ANSWER_S + 40.0, worker)
    elapsed = (api.results["job-after"][0] if answered else time.monotonic()) - stop_sent
    print(f"\nstop {where}: next job answered {elapsed:.1f} s after the signal (first model phase seen: {first})")
    assert answered, f"no answer to the job queued after the stop:\n{worker.tail()}"
    assert elapsed < STOP_ANSWER_S, f"the worker was busy for {elapsed:.1f} s after the stop:\n{worker.tail()}"
    assert api.results["job-after"][1]["output"]["status"] == "healthy"

    time.sleep(1.0)  # a final answer posted late would show here
    assert "job-long" not in api.results, f"a stopped job is never answered: {api.results['job-long']}"
    assert api.progress["job-long"][-1][1].get("phase") != "deliver", "the job was stopped before its end"
    # its ffmpeg processes ended and its folder was removed; the worker serves on
    _, alive = psutil.wait_procs(ffmpegs, timeout=5.0)
    assert not alive, f"the stopped job's ffmpeg processes still run: {[child.pid for child in alive]}"
    assert not worker.ffmpeg_children(), [child.cmdline() for child in worker.ffmpeg_children()]
    assert not job_folders(job_tmp), job_folders(job_tmp)
    assert worker.process.poll() is None
    assert "job stopped by RunPod" in worker.tail(200_000)
    assert not api.extra_results and not api.bad_requests, (api.extra_results, api.bad_requests)


def test_sigterm_during_a_job_exits_cleanly(production: tuple[JobApi, "Worker"], job_tmp: Path,
                                            tmp_path: Path) -> None:
    api, worker = production
    api.queue("job-long", long_restore_input(tmp_path))
    wait_for_model_phase(api, worker, "job-long")
    children = worker.children()
    child_pids = [child.pid for child in children]

    sent = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    try:
        code = worker.process.wait(timeout=SIGTERM_EXIT_S + 30.0)
    except subprocess.TimeoutExpired:
        code = None
    elapsed = time.monotonic() - sent
    print(f"\nSIGTERM -> worker exited with {code}: {elapsed:.1f} s (children before: {child_pids})")
    assert code is not None, f"the worker did not exit within {SIGTERM_EXIT_S + 30.0} s of SIGTERM:\n{worker.tail()}"
    assert code == 0, f"exit code {code}:\n{worker.tail()}"
    assert elapsed < SIGTERM_EXIT_S, f"exiting took {elapsed:.1f} s:\n{worker.tail()}"

    _, alive = psutil.wait_procs(children, timeout=5.0)
    survivors = [process.pid for process in alive if running(process)]
    assert not survivors, f"children left running after the worker exited: {survivors}"
    assert "job-long" not in api.results, f"a job stopped by SIGTERM is never answered: {api.results['job-long']}"
    assert not job_folders(job_tmp), job_folders(job_tmp)
