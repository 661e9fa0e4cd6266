"""RunPod serverless entry point: routes `input.action` to one function each.

    python handler.py                                   # runs test_input.json once, results in ./outputs/<job id>/
    python handler.py --rp_serve_api --rp_api_port 8000 # local API server (/run, /runsync)

The settings and the machine are checked before the first job (seedvr.serving.fitness): a bad setting
stops the worker at start. With SEEDVR_STREAMING=1 the handler is a generator (`stream_handler`): each job's progress
and results come as stream events before its answer. A restore with `workers` > 1 coordinates a job spread over this
endpoint's workers; one with `segment` is such a job's part (seedvr.serving.fanout). Every failure of a job is
answered as {"error": "<CODE>: <message>"}; the traceback goes to the log only, and the worker keeps serving.
"""

import asyncio
import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger

from seedvr import settings
from seedvr.engine import cuda_setup
from seedvr.errors import INTERNAL, RestoreError, is_no_space, no_space
from seedvr.io.media.payload import decode_base64, sniff_media
from seedvr.serving import fitness, jobs, stream
from seedvr.serving.cancel import CancelToken
from seedvr.serving.fanout import coordinator, segment_job
from seedvr.serving.health import health
from seedvr.serving.logs import install, job_logging
from seedvr.serving.model_holder import ModelHolder
from seedvr.serving.progress import runpod_sink
from seedvr.serving.schema import InitializeRequest, Request, RestoreRequest, parse_request
from seedvr.serving.shutdown import STOP_GRACE_S, Shutdown

cuda_setup.set_allocator_defaults()  # before anything touches CUDA: expandable segments unless the user chose
DEBUG = os.environ.get("RUNPOD_DEBUG") == "1"
install(logging.DEBUG if DEBUG else logging.INFO)
if DEBUG:
    RunPodLogger().set_level("DEBUG")
log = logging.getLogger("seedvr.handler")

LOCAL_OUTPUTS = Path("outputs")  # `python handler.py` (one test job): its results go to ./outputs/<job id>/
HOLDER = ModelHolder()  # the worker's one warm model
SHUTDOWN = Shutdown(HOLDER.release)  # the running jobs, and what SIGTERM does in production


def _health(request: Request, context: jobs.JobContext) -> dict:
    return health(HOLDER)


def _initialize(request: Request, context: jobs.JobContext) -> dict:
    assert isinstance(request, InitializeRequest)
    return jobs.initialize(request, HOLDER)


def _restore(request: Request, context: jobs.JobContext) -> dict:
    assert isinstance(request, RestoreRequest)
    if request.segment is not None:  # one segment of a job spread over workers (seedvr.serving.fanout)
        return segment_job.restore_segment(request, context, HOLDER)
    if request.workers > 1:
        return coordinator.restore_across_workers(request, context, HOLDER)
    return jobs.restore(request, context, HOLDER)


ACTIONS: dict[str, Callable[[Request, jobs.JobContext], dict]] = {
    "health": _health,
    "initialize": _initialize,
    "restore": _restore,
}


def serve(job: dict, cancel: CancelToken | None = None, emit: stream.Emit | None = None) -> dict:
    """One job, synchronously: its answer, or {"error": "<CODE>: <message>"} (the traceback goes to the log).
    emit: where a streamed job's events go (its progress and each result, seedvr.serving.stream)."""
    job_id = str(job.get("id", "local"))
    sink = runpod_sink(job) if emit is None else stream.progress_events(runpod_sink(job), emit)
    context = jobs.JobContext(job_id, sink, cancel or CancelToken(), emit)
    with job_logging(job_id):
        try:
            request = parse_request(job.get("input"))
            return ACTIONS[request.action](request, context)
        except RestoreError as error:
            log.warning("job failed: %s", error)
            return {"error": str(error)}
        except settings.SettingsError as error:
            log.error("job failed on a setting: %s", error)
            return {"error": f"{INTERNAL}: the worker is misconfigured: {error}"}
        except Exception as error:
            if is_no_space(error):  # ENOSPC anywhere in the job: its files are gone, say which disk is full
                full = no_space(Path(tempfile.gettempdir()), "the job's files did not fit")
                log.warning("job failed: %s", full)
                return {"error": str(full)}
            log.exception("job failed with an unexpected error")
            return {"error": f"{INTERNAL}: the worker hit an unexpected error; details are in the worker log "
                             f"(job {job_id})"}


async def handler(job: dict) -> dict:
    """The runpod handler: `serve` in a thread, so that runpod's stop (its per-job stop channel, /cancel, an
    execution timeout) reaches the job. A stopped job's token is cancelled: the work stops at its next check
    (between frames, chunks and phases; a sequence-parallel group is interrupted at once), its ffmpeg processes
    end and its files are removed; then the CancelledError goes on to runpod, as async handlers must."""
    SHUTDOWN.watch_sigterm()
    cancel = CancelToken()
    with job_logging(str(job.get("id", "local"))), SHUTDOWN.running(cancel) as stopped:

        def work() -> dict:
            try:
                return serve(job, cancel)
            finally:
                stopped.set()

        future = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            log.warning("job stopped by RunPod: cancelling its work")
            cancel.cancel("the job was stopped")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), STOP_GRACE_S)
            raise


async def stream_handler(job: dict) -> AsyncGenerator[dict, None]:
    """`handler` as a generator, the deployment with SEEDVR_STREAMING=1: the job's events as they come, then its
    answer (seedvr.serving.stream). Stopping works as for `handler`."""
    SHUTDOWN.watch_sigterm()
    cancel = CancelToken()
    with SHUTDOWN.running(cancel) as stopped:

        def work(emit: stream.Emit) -> dict:
            try:
                return serve(job, cancel, emit)
            finally:
                stopped.set()

        async for event in stream.streamed(work, lambda: cancel.cancel("the job was stopped"), STOP_GRACE_S):
            yield event


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


def runs_one_test_job(argv: list[str], environ: dict[str, str]) -> bool:
    """Whether runpod.serverless.start, given these arguments, runs one test job and exits (its local mode:
    test_input.json or --test_input) instead of serving: the SDK's own rule, from its own argument parser."""
    args, _ = runpod.serverless.parser.parse_known_args(argv)
    if args.rp_serve_api or int(environ.get("RUNPOD_REALTIME_PORT", "0")):
        return False
    return bool(args.test_input) or environ.get("RUNPOD_WEBHOOK_GET_JOB") is None


def write_results(answer: dict, folder: Path) -> dict:
    """The answer with every inline result (base64 or data URI in `media`, `videos`, `compare`) written to
    folder/restored<i>.<ext> and folder/compare<i>.png, and replaced by that file's path. URLs and null entries
    stay; the folder is made only when there is a file to write."""
    written: dict[str, list[str | None]] = {}
    for key, stem in (("media", "restored"), ("compare", "compare")):
        if not isinstance(answer.get(key), list):
            continue
        paths: list[str | None] = []
        for index, value in enumerate(answer[key]):
            if value is None:
                paths.append(None)
                continue
            data = decode_base64(value, f"{key}[{index}]")
            folder.mkdir(parents=True, exist_ok=True)
            path = (folder / f"{stem}{index}.{sniff_media(data).extension}").resolve()
            path.write_bytes(data)
            log.info("wrote the result to %s", path)
            paths.append(str(path))
        written[key] = paths
    if "videos" in answer and "media" in written:
        written["videos"] = written["media"]  # the legacy alias stays equal to media
    return {**answer, **written}


async def handler_writing_files(job: dict) -> dict:
    """`handler` for the local test job: its results are written to files under ./outputs/<job id>/ and the answer
    names those files instead of carrying the base64. Why a wrapper: the SDK's local mode (rp_local.run_local)
    only logs the answer ("Job result: ...", cut to 4 KB a line) and offers no hook for the output, so the console
    filled with base64 and the result itself was lost. Production and --rp_serve_api keep `handler` itself."""
    answer = await handler(job)
    if "error" in answer:
        return answer
    job_id = str(job.get("id", "local"))
    with job_logging(job_id):
        return write_results(answer, LOCAL_OUTPUTS / re.sub(r"[^A-Za-z0-9_-]", "_", job_id))  # no path from input


def main() -> None:
    if not runs_one_test_job(sys.argv[1:], dict(os.environ)):
        prepare()
        if settings.current().streaming:
            runpod.serverless.start({"handler": stream_handler, "return_aggregate_stream": True})
        else:
            runpod.serverless.start({"handler": handler})
        return
    if not DEBUG and not {"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"} & set(os.environ):
        RunPodLogger().set_level("INFO")  # the SDK's default, DEBUG, echoes the test job's input (its base64)
    prepare()
    runpod.serverless.start({"handler": handler_writing_files})


if __name__ == "__main__":
    main()
