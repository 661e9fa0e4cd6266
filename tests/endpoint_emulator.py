"""RunPod's endpoint job API on 127.0.0.1, handing each job to one of a few local worker servers.

The three routes a coordinator uses (seedvr.serving.fanout.endpoint), as RunPod answers them:

    POST /run              {"input": {...}}  -> {"id", "status": "IN_QUEUE"}
    GET  /status/<id>                        -> {"id", "status", "output"?, "error"?}; 404 for a job it lost
    POST /cancel/<id>                        -> {"id", "status": "CANCELLED"}

Every request must carry `Authorization: Bearer <key>` (401 otherwise). Jobs wait in one queue; each worker server
(`python handler.py --rp_serve_api`, tests/worker_server.py) takes one at a time through its /runsync, as a RunPod
worker takes one job at a time. A job cancelled while it runs is reported CANCELLED at once (the local server has no
way to stop it: it runs on, and its answer is dropped). A server taken away (`remove_server`) finishes nothing more:
a job it was running when its process died ends FAILED, as a job whose worker dies does on RunPod.

For the tests: `submit` queues a job from Python (optionally for one server), `fail_next` makes the next segment jobs
fail or vanish without running, and the record of every job (its input, the server that ran it, when) stays in
`jobs`.
"""

import itertools
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

RUNSYNC_TIMEOUT_S = 600


class EndpointEmulator:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.jobs: dict[str, dict] = {}
        self.cancelled: list[str] = []  # ids cancelled through POST /cancel
        self.refused = 0  # requests without the right key
        self._queue: deque[str] = deque()
        self._failures: deque[str] = deque()  # "failed" | "lost", for the next segment jobs submitted
        self._servers: dict[str, str] = {}  # name -> root URL of a worker server taking jobs
        self._busy: set[str] = set()  # servers inside a /runsync call
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    # --- what a test does

    def add_server(self, name: str, url: str) -> None:
        with self._cond:
            self._servers[name] = url
        threading.Thread(target=self._dispatch, args=(name, url), name=f"dispatch-{name}", daemon=True).start()

    def remove_server(self, name: str) -> None:
        """The server takes no more jobs (call it before killing its process)."""
        with self._cond:
            self._servers.pop(name, None)
            self._cond.notify_all()

    def submit(self, job_input: dict, server: str | None = None) -> str:
        return self._queue_job(job_input, server)

    def fail_next(self, *kinds: str) -> None:
        """The next segment jobs end as given, without running: "failed" (FAILED) or "lost" (/status 404)."""
        with self._cond:
            self._failures.extend(kinds)

    def wait(self, job_id: str, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.jobs[job_id]["status"] in ("IN_QUEUE", "IN_PROGRESS"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {self.jobs[job_id]['status']} after {timeout} s")
                self._cond.wait(min(left, 0.5))
            return dict(self.jobs[job_id])

    def wait_idle(self, timeout: float = 300.0) -> None:
        """Until no job is queued and no server runs one (a cancelled job included: its server runs it on)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"still busy: {sorted(self._busy)}, {len(self._queue)} queued")
                self._cond.wait(0.2)

    def segment_jobs(self) -> list[dict]:
        with self._cond:
            return [dict(job, id=job_id) for job_id, job in self.jobs.items() if "segment" in job["input"]]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._servers.clear()
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # --- the routes

    def _queue_job(self, job_input: dict, server: str | None = None) -> str:
        with self._cond:
            job_id = f"job-{next(self._ids)}"
            job = {"input": job_input, "status": "IN_QUEUE", "server": None, "pin": server, "output": None,
                   "error": None, "submitted": time.monotonic(), "started": None, "finished": None}
            self.jobs[job_id] = job
            if "segment" in job_input and self._failures:
                job["status"] = {"failed": "FAILED", "lost": "LOST"}[self._failures.popleft()]
                job["error"] = "INTERNAL: the test failed this job"
                job["finished"] = time.monotonic()
            else:
                self._queue.append(job_id)
            self._cond.notify_all()
        return job_id

    def _status(self, job_id: str) -> tuple[int, dict]:
        with self._cond:
            job = self.jobs.get(job_id)
            if job is None or job["status"] == "LOST":
                return 404, {"error": "job not found"}
            answer = {"id": job_id, "status": job["status"]}
            if job["output"] is not None:
                answer["output"] = job["output"]
            if job["error"] is not None:
                answer["error"] = job["error"]
            return 200, answer

    def _cancel(self, job_id: str) -> tuple[int, dict]:
        with self._cond:
            job = self.jobs.get(job_id)
            if job is None or job["status"] == "LOST":
                return 404, {"error": "job not found"}
            self.cancelled.append(job_id)
            if job["status"] in ("IN_QUEUE", "IN_PROGRESS"):
                job["status"], job["finished"] = "CANCELLED", time.monotonic()
                if job_id in self._queue:
                    self._queue.remove(job_id)
                self._cond.notify_all()
            return 200, {"id": job_id, "status": job["status"]}

    def _dispatch(self, name: str, url: str) -> None:
        """One worker server: the next queued job it may take, through its /runsync, one at a time."""
        while True:
            with self._cond:
                job_id = None
                while job_id is None:
                    if self._closed or self._servers.get(name) != url:
                        return
                    job_id = next((queued for queued in self._queue if self.jobs[queued]["pin"] in (None, name)),
                                  None)
                    if job_id is None:
                        self._cond.wait(0.2)
                self._queue.remove(job_id)
                job = self.jobs[job_id]
                job.update(status="IN_PROGRESS", server=name, started=time.monotonic())
                self._busy.add(name)
                self._cond.notify_all()
            try:
                response = requests.post(f"{url}/runsync", json={"input": job["input"]}, timeout=RUNSYNC_TIMEOUT_S)
                body = response.json()
                outcome = ("COMPLETED", body.get("output"), None) if body.get("status") == "COMPLETED" else \
                    ("FAILED", None, str(body.get("error")))
            except (requests.RequestException, ValueError) as error:
                outcome = ("FAILED", None, f"the worker was lost: {type(error).__name__}")
            with self._cond:
                if job["status"] == "IN_PROGRESS":
                    job.update(status=outcome[0], output=outcome[1], error=outcome[2], finished=time.monotonic())
                self._busy.discard(name)
                self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {emulator.api_key}":
                    return True
                with emulator._cond:
                    emulator.refused += 1
                self._answer(401, {"error": "Unauthorized"})
                return False

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorised():
                    return
                if self.path == "/run" and isinstance(body.get("input"), dict):
                    self._answer(200, {"id": emulator._queue_job(body["input"]), "status": "IN_QUEUE"})
                elif self.path.startswith("/cancel/"):
                    self._answer(*emulator._cancel(self.path.removeprefix("/cancel/")))
                else:
                    self._answer(404, {"error": f"no route {self.path}"})

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path.startswith("/status/"):
                    self._answer(*emulator._status(self.path.removeprefix("/status/")))
                else:
                    self._answer(404, {"error": f"no route {self.path}"})

        return Handler


class ProgressLog:
    """Receives the progress updates runpod posts to RUNPOD_WEBHOOK_POST_OUTPUT (`webhook`), as {job id: [output]}."""

    def __init__(self) -> None:
        self.updates: dict[str, list] = {}
        log = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                job_id = self.path.split("id=", 1)[-1]
                log.updates.setdefault(job_id, []).append(body.get("output"))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.webhook = f"http://127.0.0.1:{self.server.server_address[1]}/progress?id=$ID"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
