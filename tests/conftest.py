"""Shared test fixtures: the reference data, a tiny random-weight installation, an S3 server."""

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto import server as moto_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path | None:
    """../shared/reference next to the checkout, or SEEDVR_REFERENCE_DIR."""
    candidates = [os.environ.get("SEEDVR_REFERENCE_DIR"), REPO_ROOT.parent / "shared" / "reference",
                  Path("/work/shared/reference")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "golden").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def reference() -> Path:
    found = reference_dir()
    if found is None:
        pytest.skip("reference data not found: set SEEDVR_REFERENCE_DIR to shared/reference")
    return found


@pytest.fixture(scope="session")
def golden(reference) -> Path:
    return reference / "golden"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight installation written by `python -m seedvr.tiny` (the README's plumbing check)."""
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "seedvr.tiny", str(root)], cwd=REPO_ROOT, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def tiny_handler(tiny_dir):
    """`handler.serve` (the synchronous body of the handler) in this process, pointed at the tiny installation;
    the warm model is released after."""
    from worker_server import tiny_paths

    with pytest.MonkeyPatch.context() as patch:
        for name, value in tiny_paths(tiny_dir).items():
            patch.setenv(name, value)
        patch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
        import handler

        yield handler.serve
        handler.HOLDER.release()


S3_BUCKET = "seedvr-results"


@pytest.fixture(scope="session")
def s3_endpoint():
    """Root URL of a moto S3 server on loopback holding an empty bucket S3_BUCKET."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    root = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=root, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket=S3_BUCKET)
    yield root
    server.stop()
