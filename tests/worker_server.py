"""Run the real worker (`python handler.py --rp_serve_api`) on a free port for end-to-end tests."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_paths(tiny_dir: Path) -> dict:
    """The three variables that point the worker at an installation written by `python -m seedvr.tiny`."""
    return {"SEEDVR_CONFIG_DIR": str(tiny_dir), "SEEDVR_CKPT_DIR": str(tiny_dir / "ckpts"),
            "SEEDVR_EMBEDDINGS_DIR": str(tiny_dir / "embeddings")}


def tiny_environment(tiny_dir: Path, job_tmp: Path) -> dict:
    """A worker process's environment: the tiny installation, and its own temporary folder (checked by tests)."""
    return {**os.environ, **tiny_paths(tiny_dir), "TMPDIR": str(job_tmp), "PYTHONUNBUFFERED": "1"}


class WorkerServer:
    """The local API server of the runpod SDK, serving handler.py."""

    def __init__(self, env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                requests.get(f"{self.url}/docs", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError("worker did not start listening in time")

    def runsync(self, job_input, timeout: float = 300.0) -> dict:
        """POST /runsync exactly as curl does, returning the JSON answer."""
        response = requests.post(f"{self.url}/runsync", json={"input": job_input}, timeout=timeout)
        assert response.status_code == 200, response.text[:500]
        return response.json()

    def post_raw(self, body: bytes, timeout: float = 60.0) -> requests.Response:
        return requests.post(f"{self.url}/runsync", data=body, headers={"Content-Type": "application/json"},
                             timeout=timeout)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def make_job_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="seedvr-test-jobs-"))
