"""RunPod serverless entry point: routes `input.action` to one function each.

    python handler.py                                   # runs test_input.json once
    python handler.py --rp_serve_api --rp_api_port 8000 # local API server (/run, /runsync)

The settings and the machine are checked before the first job (seedvr.serving.fitness): a bad setting
stops the worker at start. Every failure of a job is answered as {"error": "<CODE>: <message>"}; the
traceback goes to the log only, and the worker keeps serving.
"""

import logging
import os
import sys
from collections.abc import Callable

import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger

from seedvr import settings
from seedvr.errors import INTERNAL, RestoreError
from seedvr.serving import fitness, jobs
from seedvr.serving.health import health
from seedvr.serving.logs import install, job_logging
from seedvr.serving.model_holder import ModelHolder
from seedvr.serving.progress import runpod_sink
from seedvr.serving.schema import InitializeRequest, Request, RestoreRequest, parse_request

DEBUG = os.environ.get("RUNPOD_DEBUG") == "1"
install(logging.DEBUG if DEBUG else logging.INFO)
if DEBUG:
    RunPodLogger().set_level("DEBUG")
log = logging.getLogger("seedvr.handler")

HOLDER = ModelHolder()  # the worker's one warm model


def _health(request: Request, job: dict) -> dict:
    return health(HOLDER)


def _initialize(request: Request, job: dict) -> dict:
    assert isinstance(request, InitializeRequest)
    return jobs.initialize(request, HOLDER)


def _restore(request: Request, job: dict) -> dict:
    assert isinstance(request, RestoreRequest)
    return jobs.restore(request, jobs.JobContext(str(job.get("id", "local")), runpod_sink(job)), HOLDER)


ACTIONS: dict[str, Callable[[Request, dict], dict]] = {
    "health": _health,
    "initialize": _initialize,
    "restore": _restore,
}


def handler(job: dict) -> dict:
    job_id = str(job.get("id", "local"))
    with job_logging(job_id):
        try:
            request = parse_request(job.get("input"))
            return ACTIONS[request.action](request, job)
        except RestoreError as error:
            log.warning("job failed: %s", error)
            return {"error": str(error)}
        except settings.SettingsError as error:
            log.error("job failed on a setting: %s", error)
            return {"error": f"{INTERNAL}: the worker is misconfigured: {error}"}
        except Exception:
            log.exception("job failed with an unexpected error")
            return {"error": f"{INTERNAL}: the worker hit an unexpected error; details are in the worker log "
                             f"(job {job_id})"}


def prepare() -> None:
    """Check the settings and the machine (exit 1 naming the problem), and register the same checks with runpod,
    which runs them again in production and marks a failing worker unhealthy instead of failing its jobs."""
    problems = fitness.problems()
    if problems:
        for problem in problems:
            log.error("the worker cannot start: %s", problem)
        sys.exit(1)
    for name in settings.unknown_variables(dict(os.environ)):
        log.warning("unknown setting %s is ignored", name)
    for check in fitness.CHECKS:
        runpod.serverless.register_fitness_check(check)


def main() -> None:
    prepare()
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
