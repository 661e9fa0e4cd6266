"""Streamed results, an opt-in deployment (SEEDVR_STREAMING=1): a job as a sequence of events, then its answer.

With the setting, handler.py registers a generator handler (and runpod's `return_aggregate_stream`). Each job
yields, in the order they happen:

    {"event": "progress", "phase", "frames_done", ...}    every progress update (seedvr.serving.progress)
    {"event": "segment", "index", "frames", "state", "job_id", "attempts", "seconds", "url"}
                                                          a job over several workers: each segment once its frames
                                                          are in the bucket (`url`: its lossless FFV1 intermediate,
                                                          presigned; deleted when the job succeeds)
    {"event": "result", "item", "media", "media_url", "resolution"}
                                                          each item once delivered (base64 or URL, as in the answer)

and last the usual answer, or {"error": "<CODE>: ..."}, which ends the job as failed. RunPod's /stream/{id} gives
the events as they come; /runsync and /status give the list of all of them. Without the setting nothing changes.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from seedvr.serving.answer import ItemResult
from seedvr.serving.progress import ProgressSink

log = logging.getLogger(__name__)

Emit = Callable[[dict], None]


def result_event(index: int, result: ItemResult) -> dict:
    delivered = result.delivered
    assert delivered is not None, "an item's event follows its delivery"
    return {"event": "result", "item": index, "media": delivered.value if delivered.kind == "base64" else None,
            "media_url": delivered.value if delivered.kind == "url" else None, "resolution": result.resolution}


def progress_events(sink: ProgressSink | None, emit: Emit) -> ProgressSink:
    """A progress sink that emits each update as an event, and still sends it to `sink` (RunPod's /status)."""

    def send(update: dict) -> None:
        emit({"event": "progress", **update})
        if sink is not None:
            sink(update)

    return send


async def streamed(work: Callable[[Emit], dict], stop: Callable[[], None],
                   grace_s: float) -> AsyncGenerator[dict, None]:
    """Run work(emit) in a thread: yield every event it emits as it comes, then what it returns. When the job is
    stopped (the task cancelled, or the stream closed), call `stop` and give the thread `grace_s` to end."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict] = asyncio.Queue()

    def emit(event: dict) -> None:  # from the job's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    future = asyncio.ensure_future(asyncio.to_thread(work, emit))
    try:
        while not future.done() or not events.empty():  # emits are queued before the thread's result is set
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        yield future.result()
    except (asyncio.CancelledError, GeneratorExit):
        if not future.done():  # (runpod also closes the stream after an error answer: nothing is left to stop)
            log.warning("streamed job stopped by RunPod: cancelling its work")
            stop()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(future), grace_s)
        raise
