"""Starts a worker script of this folder as the 2 processes of a multi-host run."""

import pathlib
import sys

import pytest

import jaxembed.multihost

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4


def run_workers(script, *args, timeout=240, **kwargs):
    """Runs `python tests/multihost/<script> *args` as the 2 processes; a failed or timed-out
    launch fails the test with every process's output."""
    command = [sys.executable, str(HERE / script), *map(str, args)]
    try:
        return jaxembed.multihost.launch(
            command,
            NUM_PROCESSES,
            devices_per_process=DEVICES_PER_PROCESS,
            timeout=timeout,
            cwd=ROOT,
            **kwargs,
        )
    except jaxembed.multihost.LaunchError as error:
        pytest.fail(str(error), pytrace=False)
