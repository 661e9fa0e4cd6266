"""Shared test fixtures: where the reference data lives."""

import os
from pathlib import Path

import pytest

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
