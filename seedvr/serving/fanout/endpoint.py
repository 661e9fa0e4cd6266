"""This endpoint's own job API, as RunPod serves it, for the jobs a coordinator starts:

    POST {base}/run               {"input": {...}}  -> {"id": ..., "status": "IN_QUEUE"}
    GET  {base}/status/{job id}                     -> {"id", "status", "output"?, "error"?}
    POST {base}/cancel/{job id}

`base` is SEEDVR_ENDPOINT_URL, else https://api.runpod.ai/v2/$RUNPOD_ENDPOINT_ID (RunPod sets RUNPOD_ENDPOINT_ID
on its workers). Every request carries `Authorization: Bearer $RUNPOD_API_KEY`, a key the operator gives the
endpoint as a secret (RunPod gives a worker no key that can start jobs). The key stays in this module's session:
it is in no log line, no error and no answer, and `repr` leaves it out.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any

import requests

from seedvr import settings
from seedvr.errors import INVALID_INPUT, RestoreError

log = logging.getLogger(__name__)

RUNPOD_API = "https://api.runpod.ai/v2"
API_KEY_VARIABLE = "RUNPOD_API_KEY"
ENDPOINT_ID_VARIABLE = "RUNPOD_ENDPOINT_ID"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")  # RunPod's final job states


class EndpointError(Exception):
    """A request to the endpoint's API failed; the text names the route and why, never the key."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class JobStatus:
    """A job as /status reports it: its state (IN_QUEUE, IN_PROGRESS or one of FINISHED), its output (a progress
    update while it runs, the answer once COMPLETED) and its error (FAILED)."""

    state: str
    output: Any = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class Endpoint:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy or .netrc from the environment gets to see the key
        self._session.headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url!r})"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "Endpoint":
        """The endpoint this worker serves; INVALID_INPUT naming what to set when the key or the endpoint is unknown."""
        environ = dict(os.environ) if environ is None else environ
        key = environ.get(API_KEY_VARIABLE, "").strip()
        base = settings.current().endpoint_url
        endpoint_id = environ.get(ENDPOINT_ID_VARIABLE, "").strip()
        if base is None and endpoint_id:
            base = f"{RUNPOD_API}/{endpoint_id}"
        missing = [name for name, value in ((API_KEY_VARIABLE, key), (f"SEEDVR_ENDPOINT_URL or {ENDPOINT_ID_VARIABLE}",
                                                                      base)) if not value]
        if missing or base is None:
            raise RestoreError(INVALID_INPUT, f"workers > 1 starts jobs on this endpoint, but the worker lacks "
                                              f"{' and '.join(missing)}: add the endpoint's API key as the secret "
                                              f"{API_KEY_VARIABLE}, or send workers 1")
        return cls(base, key)

    def run(self, job_input: dict) -> str:
        """Queue a job; its id."""
        answer = self._request("POST", "/run", {"input": job_input})
        job_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise EndpointError("POST /run answered without a job id")
        return job_id

    def status(self, job_id: str) -> JobStatus:
        answer = self._request("GET", f"/status/{job_id}")
        if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
            raise EndpointError(f"GET /status/{job_id} answered without a status")
        error = answer.get("error")
        return JobStatus(answer["status"], answer.get("output"), None if error is None else str(error))

    def cancel(self, job_id: str) -> None:
        self._request("POST", f"/cancel/{job_id}")

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, route: str, body: dict | None = None) -> Any:
        try:
            response = self._session.request(method, self.base_url + route, json=body,
                                             timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except requests.RequestException as error:
            raise EndpointError(f"{method} {route} failed: {type(error).__name__}") from None
        if response.status_code != 200:
            raise EndpointError(f"{method} {route} answered HTTP {response.status_code}", response.status_code)
        try:
            return response.json()
        except ValueError:
            raise EndpointError(f"{method} {route} answered something that is not JSON") from None
