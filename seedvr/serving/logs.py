"""Every log line of a job carries its job id.

    with job_logging(job_id):     # the handler, around one job
        log.info("...")           # "... job=abc123 ..." from any module, thread pools included via copy_context

`install()` adds the filter to the root logger's handlers; records outside a job say `job=-`.
"""

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("seedvr_job_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s job=%(job_id)s: %(message)s"


class JobIdFilter(logging.Filter):
    """Puts the current job's id on every record (as `job_id`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = JOB_ID.get()
        return True


def install(level: int) -> None:
    """Configure the root logger (forcefully: runpod's upload module configures it at import) with job ids."""
    logging.basicConfig(level=level, force=True, format=FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobIdFilter())


@contextmanager
def job_logging(job_id: str) -> Iterator[None]:
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)
