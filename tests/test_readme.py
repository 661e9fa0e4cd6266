"""The README's promises: its field tables, its two set-up commands, and `python handler.py` on test_input.json."""

import json
import re
import subprocess
import sys

import pytest
from worker_server import REPO_ROOT, make_job_tmp, tiny_environment

from seedvr.serving.schema import describe, parse_request

README = (REPO_ROOT / "README.md").read_text()


def test_field_tables_equal_the_schema():
    block = README.split("<!-- fields:begin -->\n", 1)[1].split("<!-- fields:end -->", 1)[0]
    assert block.strip() == describe().strip()


def test_the_test_command_is_the_one_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert f'pip install torch==2.13.0 -e ".[test]" && {command}' in README
    assert ci.strip().splitlines()[-1] == command


def test_json_examples_are_valid_requests():
    examples = [example for example in re.findall(r"-d '(\{\"input\": \{.*?\}\})'", README) if "$(" not in example]
    assert len(examples) >= 8
    for example in examples:
        parse_request(json.loads(example)["input"])


def test_test_input_is_a_valid_restore_request():
    request = parse_request(json.loads((REPO_ROOT / "test_input.json").read_text())["input"])
    assert request.action == "restore" and request.media_values


@pytest.mark.slow
def test_python_handler_runs_test_input_json(tiny_dir):
    """The README's first command, with the tiny installation it writes."""
    result = subprocess.run([sys.executable, "handler.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=tiny_environment(tiny_dir, make_job_tmp()), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Job local_test completed successfully." in result.stdout + result.stderr
