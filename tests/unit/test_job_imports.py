"""Importing a job module reads no file and connects nowhere: each job's register(app, settings) and
the worker's start do that. A broken ALERT_RULES still stops the worker at start with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.ports import free_port
from tests.support.workers import FAUST, REPO_ROOT, environment_with

JOBS = ["metrics", "logs", "recommendations", "migration", "dead_letters"]

# Imports `app` first, as `faust -A app` does (app/__init__.py imports every job and calls its
# register()), then the job module; prints what the imports opened under DATA_DIR or at ALERT_RULES,
# and every connection they tried.
WATCH_IMPORT = """
import json, os, sys
data_dir, rules = os.environ["DATA_DIR"], os.environ["ALERT_RULES"]
touched = []

def watch(event, args):
    if event == "socket.connect":
        touched.append(f"connect {args[1]!r}")
    elif event in ("open", "os.listdir", "os.scandir", "os.mkdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path == rules or path.startswith(data_dir):
            touched.append(f"{event} {path}")

sys.addaudithook(watch)
import app
import agents.{job}
print(json.dumps(touched))
"""


def broken_environment(tmp_path) -> dict:
    (tmp_path / "data" / "recommendations").mkdir(parents=True)  # as a worker that ran before left it
    return environment_with(
        ALERT_RULES=str(tmp_path / "missing-rules.yaml"),
        ELASTICSEARCH_URL=f"http://127.0.0.1:{free_port()}",  # nobody listens there
        DATA_DIR=str(tmp_path / "data"),
        STORE="memory://",
    )


@pytest.mark.parametrize("job", JOBS)
def test_importing_a_job_module_reads_no_file_connects_nowhere_and_raises_nothing(tmp_path, job):
    result = subprocess.run(
        [sys.executable, "-c", WATCH_IMPORT.replace("{job}", job)],
        cwd=REPO_ROOT,
        env=broken_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_a_worker_with_a_missing_rules_file_stops_at_start_with_one_line(tmp_path):
    env = {**broken_environment(tmp_path), "WEB_PORT": str(free_port())}
    result = subprocess.run(
        [str(FAUST), "-A", "app", "worker", "-l", "info"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"invalid configuration: ALERT_RULES: alert rules file {tmp_path / 'missing-rules.yaml'}: cannot read it: No such file or directory"
    ]
