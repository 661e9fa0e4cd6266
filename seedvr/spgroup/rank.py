"""One rank of a sequence-parallel group: a process of its own with the whole model on its own device.

The driver (`seedvr.spgroup.group`) starts `rank_main` in every rank's process and talks to it over a
pipe. Messages are (kind, job_id, body):

    driver -> rank:  ("restore", id, (frames, options, want_stages, want_phases))   run SeedVR2.restore
                     (options: res_h, res_w, sampling, eps, noise, packed by seedvr.spgroup.wire)
                     ("call", id, (fn, args))                                      run fn(context, *args)
                     ("stop", None, None)                                          leave
    rank -> driver:  ("ready", None, model facts) | ("failed", None, RemoteError)  after loading
                     ("beat", id, progress)                                        every HEARTBEAT_S in a job
                     ("phase", id, name)                                           rank 0, when asked
                     ("done", id, packed result) | ("error", id, RemoteError)      after each job

While a job runs, a thread of every rank sends a heartbeat with its progress: the number of DiT blocks and
VAE convolutions it has entered (forward pre-hooks, so the models know nothing of it). A rank whose progress
stands still is hung (a stopped process, a wedged collective or driver call): the driver's stall watchdog
tears the group down. The collectives' own timeout is the same stall limit, so a hung collective raises too.

Every rank runs the same pipeline code on the same request; the DiT and the VAE split their work over the
group (seedvr.distributed.comm). Only rank 0's result goes back. A rank leaves when its pipe closes or its
parent process dies, so it never outlives the driver.
"""

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from seedvr.distributed.comm import SequenceParallel
from seedvr.engine import loader
from seedvr.engine.pipeline import SeedVR2
from seedvr.spgroup import wire

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # between two progress reports of a rank in a job


@dataclass(frozen=True)
class RankSpec:
    """What every rank of one group needs to start."""

    model_type: str
    variant: str
    size: int
    attention_backend: str
    device_kind: str  # "cuda" (NCCL, device = rank) or "cpu" (gloo)
    store_path: str  # torch.distributed FileStore of this incarnation of the group
    collective_timeout_s: float
    compiled: bool = False  # torch.compile the DiT blocks (a rebuilt group compiles again)


@dataclass
class RankContext:
    """What a job sees on one rank."""

    rank: int
    sp: SequenceParallel
    pipeline: SeedVR2  # runs its DiT and VAE sequence parallel over `sp`


class Reporter:
    """The rank's side of the pipe: sends from the job's thread and the heartbeat thread, one at a time, and
    counts the progress the heartbeats carry."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.progress = 0  # DiT blocks and VAE convolutions entered so far
        self.job_id: int | None = None  # the job in progress, None between jobs
        self._lock = threading.Lock()

    def send(self, message: wire.Message) -> None:
        with self._lock:
            wire.send(self.conn, message)

    def count(self) -> None:
        self.progress += 1

    def beat_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            job_id = self.job_id
            if job_id is not None:
                try:
                    self.send(("beat", job_id, self.progress))
                except OSError:  # the driver is gone; the parent watch ends this process
                    return


def rank_main(rank: int, spec: RankSpec, conn: Connection) -> None:
    """Entry point of a rank's process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the driver; it stops us
    _exit_with_parent()
    try:
        context = _join_and_load(rank, spec)
    except BaseException as error:  # reported, then this process ends
        wire.send(conn, ("failed", None, wire.RemoteError.describe(error)))
        return
    pipeline = context.pipeline
    wire.send(conn, ("ready", None, {"device": str(pipeline.device),
                                     "dtype": str(pipeline.dtype).removeprefix("torch."),
                                     "random_weights": pipeline.random_weights}))
    reporter = Reporter(conn)
    context.pipeline.on_step(reporter.count)  # every DiT block and VAE convolution entered
    threading.Thread(target=reporter.beat_forever, name="heartbeat", daemon=True).start()
    try:
        _serve(context, reporter)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up; the interpreter's own teardown of torch takes seconds


def _exit_with_parent() -> None:
    """End this process as soon as the driver's process is gone, whatever this one is blocked in."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _join_and_load(rank: int, spec: RankSpec) -> RankContext:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks share one host
    timeout = timedelta(seconds=spec.collective_timeout_s)
    store = dist.FileStore(spec.store_path, spec.size)
    if spec.device_kind == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=spec.size, timeout=timeout,
                                device_id=device)
        meta_group = dist.new_group(backend="gloo", timeout=timeout)
        assert isinstance(meta_group, dist.ProcessGroup), "every rank is a member of the group of all ranks"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // spec.size))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.size, timeout=timeout)
        meta_group = None
    sp = SequenceParallel(meta_group=meta_group)

    pipeline = loader.load_pipeline(spec.model_type, spec.variant, device=device,
                                    attention_backend=spec.attention_backend, sp=sp)
    heads = pipeline.dit.heads
    if heads % spec.size:
        raise ValueError(f"sp_size {spec.size} must divide the DiT's {heads} attention heads")
    pipeline.set_compiled(spec.compiled)
    dist.barrier()  # every rank is loaded and every communicator is up
    return RankContext(rank, sp, pipeline)


def _serve(context: RankContext, reporter: Reporter) -> None:
    while True:
        try:
            kind, job_id, body = wire.receive(reporter.conn)
        except (EOFError, OSError):  # the driver is gone
            return
        if kind == "stop":
            return
        reporter.job_id = job_id
        try:
            if kind == "restore":
                result = _restore(context, body, lambda name: reporter.send(("phase", job_id, name)))  # noqa: B023
            elif kind == "call":
                fn, args = body
                result = fn(context, *args)
            else:
                raise ValueError(f"unknown job kind {kind!r}")
            answer: wire.Message = ("done", job_id, wire.pack(result))
        except Exception as error:
            log.debug("rank %d: job %s failed", context.rank, job_id, exc_info=True)  # the driver logs it
            answer = ("error", job_id, wire.RemoteError.describe(error))
        reporter.job_id = None
        reporter.send(answer)


def _restore(context: RankContext, body: tuple, send_phase: Callable[[str], None]
             ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor] | None] | None:
    """Rank 0: (uint8 frames, timings, stages or None); other ranks: None."""
    frames, options, want_stages, want_phases = body
    lead = context.rank == 0
    timings: dict[str, float] = {}
    stages: dict[str, torch.Tensor] | None = {} if want_stages and lead else None
    if want_phases and lead:
        options["on_phase"] = send_phase
    restored = context.pipeline.restore(torch.from_numpy(frames), timings=timings, stages=stages,
                                        **wire.unpack(options))
    return (restored, timings, stages) if lead else None
