"""The multi-process suite, its own pytest invocation:

    pytest tests/multihost

(a plain `pytest` leaves this folder out: see `collect_ignore` in tests/conftest.py). Each
test module starts its worker scripts as 2 local processes x 4 simulated CPU devices, joined
by `jax.distributed` (`jaxembed.multihost.launch`), a global 2 x 4 mesh with real
cross-process collectives (gloo over localhost). This pytest process keeps its single CPU
device and computes the single-process references from the same global data.
"""

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
