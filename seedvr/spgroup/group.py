"""The driver of a sequence-parallel group: `sp_size` long-lived rank processes holding the model.

    group = SequenceParallelGroup("seedvr2_3b", "normal", sp_size=4)   # starts the ranks, loads the model
    out = group.restore(frames, res_h=720, res_w=1280)                # as SeedVR2.restore
    group.close()

The group is a `seedvr.engine.restorer.Restorer`, exactly as the single-process pipeline: chunking, the
memory plan and the model holder use it without knowing it spans processes.

Failure handling. The driver never blocks on a rank without also watching every rank's process and its
progress: a rank that dies, a rank whose heartbeats show no progress for `stall_s` seconds (a stopped
process, a hung collective: the setting SEEDVR_SP_STALL_S), or a job that fails on some ranks while the
others stay stuck in a collective (waited for `error_grace_s`), makes the job raise `SequenceParallelError`
(WORKER_FAULT) at once; the group is then torn down (every process killed and joined) and started afresh by
the next call, so the caller may retry. An error that every rank raised alike (a bad request) leaves the
group as it is. `interrupt()` (another thread: a cancelled job) tears it down the same way. Rank processes
are daemons, end when their pipe closes or the driver's process dies (see rank.py), and `close()` runs at
interpreter exit: no rank outlives the driver.
"""

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import psutil
import torch

from seedvr import settings
from seedvr.engine.memory_plan import Footprint, MemoryPlan
from seedvr.engine.restorer import Frames, LatentShape, Sampling, latent_shape
from seedvr.errors import WorkerFault
from seedvr.spgroup import wire
from seedvr.spgroup.rank import RankContext, RankSpec, rank_main

log = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # a rank asked to stop gets this long before it is terminated


class SequenceParallelError(WorkerFault):
    """The group failed as a whole (a rank died or hung); it is restarted on the next call."""


@dataclass
class _Rank:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class SequenceParallelGroup:
    """`sp_size` processes that restore one request together (SEEDVR2_SPEC 5).

    device_kind: "cuda" (rank r on GPU r, NCCL) or "cpu" (gloo); default: cuda when available.
    start_timeout_s: for starting the ranks and loading the model. job_timeout_s: per job (None: no limit;
    dead and stalled ranks are detected either way). error_grace_s: how long the other ranks may take to
    finish after one failed before the group is torn down. stall_s: how long a rank may go without progress
    in a job (default: the setting SEEDVR_SP_STALL_S); also the ranks' own collective timeout.
    """

    def __init__(self, model_type: str, variant: str = "normal", sp_size: int = 2, attention_backend: str = "auto",
                 device_kind: str | None = None, *, start_timeout_s: float = 1800.0, job_timeout_s: float | None = None,
                 error_grace_s: float = 10.0, stall_s: float | None = None):
        device_kind = device_kind or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_kind not in ("cuda", "cpu"):
            raise ValueError(f"device_kind must be 'cuda' or 'cpu', got {device_kind!r}")
        if sp_size < 1:
            raise ValueError(f"sp_size must be at least 1, got {sp_size}")
        if device_kind == "cuda" and torch.cuda.device_count() < sp_size:
            raise ValueError(f"sp_size {sp_size} needs {sp_size} GPUs; {torch.cuda.device_count()} visible")
        self.model_type, self.variant, self.sp_size = model_type, variant, sp_size
        self._attention_backend, self.device_kind = attention_backend, device_kind
        self.start_timeout_s, self.job_timeout_s = start_timeout_s, job_timeout_s
        self.error_grace_s = error_grace_s
        self.stall_s = settings.current().sp_stall_s if stall_s is None else stall_s
        self._interrupted = False  # set by interrupt(): the job in flight was cancelled
        self._compiled = False
        self._job_lock = threading.Lock()  # one job at a time
        self._state_lock = threading.RLock()  # guards starting and tearing down
        self._ranks: list[_Rank] = []
        self._store_dir: str | None = None
        self._closed = False
        self._job_ids = itertools.count(1)
        self.model_info: dict = {}  # rank 0's {device, dtype, random_weights} and every rank's device
        self._device, self._dtype = torch.device("cpu"), torch.float32  # rank 0's, set by _start
        self._measurement: _Measurement | None = None  # measured on first use
        _LIVE_GROUPS.add(self)
        self._start()

    # Public API

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def devices(self) -> tuple[str, ...]:
        """Every rank's device, as each rank reported it after loading."""
        return tuple(self.model_info["devices"])

    @property
    def random_weights(self) -> bool:
        return bool(self.model_info["random_weights"])

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    def restore(self, frames: Frames, *, res_h: int, res_w: int, sampling: Sampling = Sampling(),
                eps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                aug_noise: torch.Tensor | None = None, clip_latent_frames: int | None = None,
                timings: dict[str, float] | None = None, stages: dict[str, torch.Tensor] | None = None,
                on_phase: Callable[[str], None] | None = None) -> torch.Tensor:
        """As `SeedVR2.restore`: uint8 (f, H, W, 3) frames -> restored uint8 (f, Hc, Wc, 3), run by every rank."""
        array = np.ascontiguousarray(frames.numpy() if isinstance(frames, torch.Tensor) else frames)
        options = dict(res_h=res_h, res_w=res_w, sampling=sampling, eps=eps, noise=noise, aug_noise=aug_noise,
                       clip_latent_frames=clip_latent_frames)
        body = (array, wire.pack(options), stages is not None, on_phase is not None)
        restored, rank_timings, rank_stages = self._job("restore", body, on_phase)[0]
        if timings is not None:
            timings.update(rank_timings)
        if stages is not None:
            stages.clear()
            stages.update(rank_stages)
        return restored

    def call(self, fn: Callable[..., Any], *args: Any) -> list:
        """fn(context: worker.RankContext, *args) on every rank at once -> each rank's result, in rank order.

        fn must be importable by name (a module-level function). For diagnostics and tests.
        """
        return self._job("call", (fn, args))

    def footprint(self) -> Footprint:
        """The memory plan's view of the model, measured once on rank 0."""
        return self._measured().footprint

    def resident_weight_bytes(self) -> int:
        """Bytes of weights one rank holds on its device."""
        return self._measured().resident_weight_bytes

    def latent_shape(self, frames: int, height: int, width: int) -> LatentShape:
        measured = self._measured()
        return latent_shape(frames, height, width, measured.spatial_factor, measured.latent_channels)

    def _measured(self) -> "_Measurement":
        if self._measurement is None:  # not in _start: a restart happens inside _job, which holds its lock
            self._measurement = self.call(_measure_model)[0]
        return self._measurement

    @property
    def compiled(self) -> bool:
        return self._compiled

    def set_compiled(self, enabled: bool) -> None:
        if enabled != self._compiled:
            self.call(_set_compiled, enabled)
            self._compiled = enabled

    def set_attention_backend(self, name: str) -> None:
        if name != self._attention_backend:
            self.call(_set_attention_backend, name)
            self._attention_backend = name

    def apply_plan(self, plan: MemoryPlan) -> None:
        """`SeedVR2.apply_plan(plan)` on every rank."""
        self.call(_apply_plan, plan)

    def alive(self) -> bool:
        with self._state_lock:
            return not self._closed and bool(self._ranks) and all(_running(r) for r in self._ranks)

    @property
    def pids(self) -> list[int]:
        return [rank.process.pid for rank in self._ranks if rank.process.pid is not None]

    def close(self) -> None:
        """Stop every rank and wait for its process to end (idempotent)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            for rank in self._ranks:
                try:
                    wire.send(rank.conn, ("stop", None, None))
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_WAIT_S
            for rank in self._ranks:
                rank.process.join(max(0.0, deadline - time.monotonic()))
            self._teardown()
        _LIVE_GROUPS.discard(self)

    def __del__(self) -> None:
        try:  # a group dropped without close(): do not leave its processes behind
            self._teardown()
        except Exception:
            pass

    def __enter__(self) -> "SequenceParallelGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Starting, jobs, tearing down

    def _start(self) -> None:
        with self._state_lock:
            context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; a fresh interpreter per rank
            self._store_dir = tempfile.mkdtemp(prefix="seedvr-sp-")
            spec = RankSpec(self.model_type, self.variant, self.sp_size, self._attention_backend, self.device_kind,
                            str(Path(self._store_dir) / "store"), self.stall_s, self._compiled)
            for index in range(self.sp_size):
                ours, theirs = context.Pipe()
                process = context.Process(target=rank_main, args=(index, spec, theirs), daemon=True,
                                          name=f"seedvr-sp-rank{index}")
                process.start()
                theirs.close()
                self._ranks.append(_Rank(index, process, ours))
        log.info("sequence parallel: starting %d ranks for %s (%s) on %s", self.sp_size, self.model_type,
                 self.variant, self.device_kind)
        facts = self._collect(None, deadline=time.monotonic() + self.start_timeout_s)
        self.model_info = {**facts[0], "devices": [rank_facts["device"] for rank_facts in facts]}
        self._device, self._dtype = torch.device(facts[0]["device"]), getattr(torch, facts[0]["dtype"])

    def _job(self, kind: str, body: Any, on_phase: Callable[[str], None] | None = None) -> list:
        with self._job_lock:
            if self._closed:
                raise SequenceParallelError("the sequence-parallel group was closed")
            self._interrupted = False
            if not self.alive():
                log.warning("sequence parallel: group is down, restarting it")
                self._teardown()
                self._start()
            job_id = next(self._job_ids)
            message = wire.encode((kind, job_id, body))  # once, however many ranks read it
            try:
                for rank in list(self._ranks):
                    rank.conn.send_bytes(message)
            except OSError:
                self._teardown()
                raise SequenceParallelError("a sequence-parallel rank went away before the job started; "
                                            "the group restarts on the next job") from None
            deadline = None if self.job_timeout_s is None else time.monotonic() + self.job_timeout_s
            return [wire.unpack(result) for result in self._collect(job_id, on_phase, deadline)]

    def _collect(self, job_id: int | None, on_phase: Callable[[str], None] | None = None,
                 deadline: float | None = None) -> list:
        """Wait for every rank's answer to `job_id` (None: the start-up answers), watching every process."""
        answers: dict[int, object] = {}
        errors: dict[int, wire.RemoteError] = {}
        grace_end = None
        ranks = list(self._ranks)
        started = time.monotonic()
        progress = {rank.index: (-1, started) for rank in ranks}  # (last progress reported, when it changed)
        while len(answers) + len(errors) < len(ranks):
            pending = [r for r in ranks if r.index not in answers and r.index not in errors]
            stall_end = min(progress[r.index][1] for r in pending) + self.stall_s if job_id is not None else None
            ends = [end for end in (deadline, grace_end, stall_end) if end is not None]
            timeout = max(0.0, min(ends) - time.monotonic()) if ends else None
            ready = multiprocessing.connection.wait([r.conn for r in pending] + [r.process.sentinel for r in ranks],
                                                    timeout)
            now = time.monotonic()
            if self._interrupted:
                self._fail(job_id, errors, None, "interrupted: the job was cancelled", kill=True)
            if stall_end is not None:
                stalled = [r.index for r in pending if now - progress[r.index][1] > self.stall_s]
                if stalled:
                    self._fail(job_id, errors, stalled[0], f"rank {stalled[0]} made no progress for {self.stall_s:g} s "
                                                           "(hung or stopped; SEEDVR_SP_STALL_S)", kill=True)
            if not ready and (deadline is not None and now >= deadline or grace_end is not None and now >= grace_end):
                self._fail(job_id, errors, None, "did not finish in time" if not errors else
                           f"the other ranks stayed busy {self.error_grace_s:g} s after rank {min(errors)} failed")
            for rank in pending:
                if rank.conn not in ready:
                    continue
                try:
                    kind, answer_id, body = wire.receive(rank.conn)
                except (EOFError, OSError):
                    self._fail(job_id, errors, rank.index, _gone(rank))
                if kind == "beat":
                    if answer_id == job_id and body != progress[rank.index][0]:
                        progress[rank.index] = (body, now)
                elif kind == "phase":
                    progress[rank.index] = (progress[rank.index][0], now)
                    _report_phase(on_phase, body)
                elif answer_id == job_id and kind in ("done", "ready"):
                    answers[rank.index] = body
                elif answer_id == job_id and kind in ("error", "failed"):
                    errors[rank.index] = body
                    grace_end = grace_end or time.monotonic() + self.error_grace_s
            for rank in ranks:
                if rank.process.sentinel in ready:
                    self._fail(job_id, errors, rank.index, _gone(rank))
        if errors:
            first = errors[min(errors)]
            if job_id is None or len(errors) < len(ranks) or not all(first.same_as(e) for e in errors.values()):
                self._fail(job_id, errors, None, "the ranks failed differently")  # they may be out of step
            log.debug("sequence parallel: every rank failed alike:\n%s", first.traceback)
            raise first.rebuild(min(errors))
        return [answers[index] for index in range(len(ranks))]

    def _fail(self, job_id: int | None, errors: dict[int, wire.RemoteError], culprit: int | None,
              what: str, kill: bool = False) -> NoReturn:
        """Tear the group down and raise. A rank that left or stalled (`culprit`) is the cause, unless it reported
        its own error first; without one, the first rank error is. An error the request caused (a RestoreError,
        an out-of-memory, a ValueError) is raised as such; anything else is a WorkerFault, worth one retry."""
        self._teardown(kill=kill)
        source = culprit if culprit is not None else min(errors, default=None)
        if source is not None and source in errors and errors[source].kind != "other":
            log.warning("sequence parallel: rank %d failed (%s); group torn down:\n%s", source, what,
                        errors[source].traceback)
            raise errors[source].rebuild(source)
        if source is not None and source in errors:
            log.warning("sequence parallel: rank %d failed (%s); group torn down:\n%s", source, what,
                        errors[source].traceback)
            what = f"rank {source} failed: {errors[source].type_name}: {errors[source].message[:200]}"
        stage = "while starting" if job_id is None else "during the job"
        log.warning("sequence parallel: group failed %s: %s; torn down", stage, what)
        raise SequenceParallelError(f"sequence-parallel group failed {stage}: {what}; it restarts on the next call")

    def interrupt(self) -> None:
        """From another thread: stop the job in flight now (its ranks are killed; the group restarts on the
        next call). The interrupted call raises SequenceParallelError."""
        self._interrupted = True
        self._teardown(kill=True)

    def _teardown(self, kill: bool = False) -> None:
        """Stop and join every rank process (SIGTERM, SIGKILL after 5 s; at once with `kill`, which also ends a
        stopped process); remove the rendezvous files (idempotent)."""
        with self._state_lock:
            ranks, self._ranks = self._ranks, []
            for rank in ranks:
                if rank.process.is_alive():
                    rank.process.kill() if kill else rank.process.terminate()
            for rank in ranks:
                rank.process.join(5.0)
                if rank.process.is_alive():
                    rank.process.kill()
                    rank.process.join()
                rank.conn.close()
            if self._store_dir is not None:
                shutil.rmtree(self._store_dir, ignore_errors=True)
                self._store_dir = None


def _running(rank: _Rank) -> bool:
    """Whether a rank's process runs. Asked of the system too: `is_alive()` alone says True for a child that
    something else reaped (its waitpid then fails), and a zombie has exited."""
    if not rank.process.is_alive() or rank.process.pid is None:
        return False
    try:
        return psutil.Process(rank.process.pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _gone(rank: _Rank) -> str:
    """Why a rank's pipe or process ended."""
    rank.process.join(1.0)
    if rank.process.exitcode is None:
        return f"rank {rank.index} closed its pipe"
    return f"rank {rank.index} exited (exit code {rank.process.exitcode})"


def _report_phase(on_phase: Callable[[str], None] | None, name: str) -> None:
    if on_phase is None:
        return
    try:
        on_phase(name)
    except Exception:  # progress reporting must not break the job
        log.warning("sequence parallel: on_phase(%r) failed", name, exc_info=True)


@dataclass(frozen=True)
class _Measurement:
    """What the driver asks rank 0 once about the model it holds."""

    footprint: Footprint
    resident_weight_bytes: int
    spatial_factor: int  # the VAE's spatial downsampling
    latent_channels: int


def _measure_model(context: RankContext) -> _Measurement:
    pipeline = context.pipeline
    return _Measurement(pipeline.footprint(), pipeline.resident_weight_bytes(), pipeline.vae.spatial_downsample_factor,
                        pipeline.vae.latent_channels)


def _apply_plan(context: RankContext, plan: MemoryPlan) -> None:
    context.pipeline.apply_plan(plan)


def _set_compiled(context: RankContext, enabled: bool) -> None:
    context.pipeline.set_compiled(enabled)


def _set_attention_backend(context: RankContext, name: str) -> None:
    context.pipeline.set_attention_backend(name)


_LIVE_GROUPS: "weakref.WeakSet[SequenceParallelGroup]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for group in list(_LIVE_GROUPS):
        group.close()
