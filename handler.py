"""RunPod serverless entry point: routes `input.action` to one function each.

    python handler.py                                   # runs test_input.json once
    python handler.py --rp_serve_api --rp_api_port 8000 # local API server (/run, /runsync)

Every failure is answered as {"error": "<CODE>: <message>"}; the traceback goes
to the log only, and the worker keeps serving.
"""

import logging
import os

import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger

from seedvr import actions
from seedvr.errors import INTERNAL, RestoreError
from seedvr.schema import parse_request

DEBUG = os.environ.get("RUNPOD_DEBUG") == "1"
# force: runpod's upload module configures the root logger when it is imported
logging.basicConfig(level=logging.DEBUG if DEBUG else logging.INFO, force=True,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
if DEBUG:
    RunPodLogger().set_level("DEBUG")
log = logging.getLogger("seedvr.handler")

ACTIONS = {
    "health": actions.health,
    "initialize": actions.initialize,
    "restore": actions.restore,
}


def handler(job: dict) -> dict:
    job_id = job.get("id", "?")
    try:
        request = parse_request(job.get("input"))
        return ACTIONS[request.action](request, job)
    except RestoreError as error:
        log.warning("job %s failed: %s", job_id, error)
        return {"error": str(error)}
    except Exception:
        log.exception("job %s failed with an unexpected error", job_id)
        return {"error": f"{INTERNAL}: the worker hit an unexpected error; details are in the worker log (job {job_id})"}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
