"""`jaxembed.multihost`: processes that join, and launches that fail fast and say why.

Each case runs a few lines of Python as the processes (`python -c`): two JAX processes that
join and run a collective across each other; one that dies while the other waits for it in a
collective; one killed by a signal; a coordinator nobody runs; a process that hangs (and one
that ignores SIGTERM); and the command line. A failed launch must end well within its timeout
(or at it, for a hang) with a `LaunchError` naming the process and holding every output.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import jaxembed.multihost
from jaxembed.multihost import LaunchError, launch

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

# Joins, then builds one global array from each process's rank and sums it over every device
# of both processes: a real cross-process collective (gloo over localhost).
JOIN_AND_SUM = """
import jax, jax.numpy as jnp, numpy as np
import jaxembed.multihost
jaxembed.multihost.initialize()
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("x",))
sharding = NamedSharding(mesh, P("x"))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(sharding, local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("rank", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count(),
      "local", jax.local_device_count(), "sum", float(total))
"""

# Process 1 fails after joining; process 0 waits for it in a barrier that never completes.
ONE_FAILS = """
import jax
import jaxembed.multihost
from jax.experimental import multihost_utils
jaxembed.multihost.initialize()
if jax.process_index() == 1:
    print("process 1 failing", flush=True)
    raise RuntimeError("a bug in process 1")
print("process 0 waiting", flush=True)
multihost_utils.sync_global_devices("never reached by process 1")
"""


def python(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def failure(command, *args, **kwargs):
    """(the LaunchError, seconds the launch took)."""
    start = time.monotonic()
    with pytest.raises(LaunchError) as raised:
        launch(command, *args, **kwargs)
    return raised.value, time.monotonic() - start


def test_two_processes_join_into_one_8_device_program():
    results = launch(python(JOIN_AND_SUM), 2, devices_per_process=4, timeout=120)
    lines = [r.output.strip().splitlines()[-1] for r in results]
    # 4 devices hold 1.0 and 4 hold 2.0: the sum needs both processes' data.
    assert lines == [
        "rank 0 of 2 devices 8 local 4 sum 12.0",
        "rank 1 of 2 devices 8 local 4 sum 12.0",
    ]
    assert [r.process_id for r in results] == [0, 1]
    assert [r.returncode for r in results] == [0, 0]


def test_a_process_that_raises_stops_the_launch_at_once():
    error, seconds = failure(python(ONE_FAILS), 2, timeout=120)
    message = str(error)
    assert message.startswith("multi-process launch failed: process 1 failed (exit code 1)")
    assert "stopped processes [0], still running" in message  # it was waiting for process 1
    # Without initialize's exit_on_error, process 1 would wait in JAX's shutdown barrier and
    # process 0 fail first, at gloo's timeout (about 30 s on this machine).
    assert seconds < 25, "the launch did not fail fast"
    # Every process's output is in the message, and in the results.
    assert "RuntimeError: a bug in process 1" in message and "process 0 waiting" in message
    assert [r.returncode for r in error.results] == [None, 1]
    assert "RuntimeError: a bug in process 1" in error.results[1].output


def test_a_process_that_exits_with_an_error_code_is_named():
    code = "import os, sys; sys.exit(int(os.environ['JAXEMBED_PROCESS_ID']) * 7)"
    error, _ = failure(python(code), 2, devices_per_process=None, timeout=60)
    assert "process 1 failed (exit code 7)" in str(error)


def test_a_process_killed_by_a_signal_is_named():
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    error, _ = failure(python(code), 1, devices_per_process=None, timeout=60)
    assert "process 0 failed (killed by SIGKILL)" in str(error)
    assert error.results[0].returncode == -signal.SIGKILL


def test_an_unreachable_coordinator_fails_within_the_timeout():
    # The only process claims rank 1 of 2: the coordinator (rank 0's job) never starts.
    code = """
    import os, jaxembed.multihost
    os.environ["JAXEMBED_NUM_PROCESSES"], os.environ["JAXEMBED_PROCESS_ID"] = "2", "1"
    jaxembed.multihost.initialize(initialization_timeout=3)
    print("joined")
    """
    error, seconds = failure(python(code), 1, timeout=90)
    message = str(error)
    assert "process 0 failed" in message
    assert "could not reach the coordinator at 127.0.0.1:" in message
    assert "joined" not in message
    assert seconds < 90


def test_a_hang_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(jaxembed.multihost, "_GRACE_SECONDS", 1.0)
    # Rank 0 never joins, so rank 1 waits for the coordinator; rank 0 sleeps on, ignoring
    # SIGTERM, so the launcher must escalate to SIGKILL. Both write their pids first.
    code = f"""
    import os, signal, time
    rank = os.environ["JAXEMBED_PROCESS_ID"]
    open(os.path.join({str(tmp_path)!r}, rank), "w").write(str(os.getpid()))
    print("started", rank, flush=True)
    if rank == "0":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
    import jaxembed.multihost
    jaxembed.multihost.initialize(initialization_timeout=600)
    """
    error, seconds = failure(python(code), 2, timeout=8)
    message = str(error)
    assert "timed out after 8 s: processes [0, 1] were still running" in message
    assert "started 0" in message and "started 1" in message
    assert [r.returncode for r in error.results] == [None, None]
    assert seconds < 8 + 1 + 10  # the timeout, the grace before SIGKILL, slack
    for rank in "01":  # nothing is left behind
        pid = int((tmp_path / rank).read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_echo_prefixes_each_line_with_its_process(capsys):
    code = "import os; print('hello from', os.environ['JAXEMBED_PROCESS_ID'])"
    launch(python(code), 2, devices_per_process=None, timeout=60, echo=sys.stdout)
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == ["[process 0] hello from 0", "[process 1] hello from 1"]


def test_each_launch_has_its_own_coordinator_port():
    code = "import os; print(os.environ['JAX_COORDINATOR_ADDRESS'])"
    first, second = (
        launch(python(code), 2, devices_per_process=None, timeout=60) for _ in range(2)
    )
    addresses = [r.output.strip() for r in (*first, *second)]
    assert addresses[0] == addresses[1] and addresses[2] == addresses[3]
    assert addresses[0].startswith("127.0.0.1:")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "jaxembed.multihost", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_command_line_runs_and_prefixes():
    result = run_cli("-n", "2", "--", *python(JOIN_AND_SUM))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[process 0] rank 0 of 2 devices 8 local 4 sum 12.0" in result.stdout
    assert "[process 1] rank 1 of 2 devices 8 local 4 sum 12.0" in result.stdout


def test_command_line_failure_exits_nonzero_with_the_message():
    result = run_cli("-n", "2", "--timeout", "60", "--", *python(ONE_FAILS))
    assert result.returncode == 1
    assert "process 1 failed (exit code 1)" in result.stderr
    assert "--- process 0 (stopped while running), output" in result.stderr


def test_local_rows_follows_the_devices_of_each_process():
    # Three meshes over the same 8 devices: "data" across the processes (each holds half of
    # the batch), "data" within each (each holds all of it), and devices interleaved so that
    # a process's rows are not contiguous (refused, saying how to order them).
    code = """
    import jax, numpy as np
    import jaxembed.multihost
    jaxembed.multihost.initialize()
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = np.array(jax.devices())  # process 0's 4, then process 1's
    def rows(grid):
        sharding = NamedSharding(Mesh(grid, ("data", "model")), P("data", None))
        try:
            return jaxembed.multihost.local_rows(sharding, (16, 3))
        except ValueError as error:
            assert "order the mesh's devices so each host's are adjacent" in str(error)
            return str(error).split(" of dimension")[0]
    interleaved = devices.reshape(2, 4).T.reshape(8, 1)
    print(jax.process_index(), rows(devices.reshape(2, 4)), rows(devices.reshape(2, 4).T),
          rows(interleaved), sep=" | ")
    """
    results = launch(python(code), 2, timeout=120)
    refused = "this process's devices hold non-contiguous parts {}"
    spans = [[(start, start + 2) for start in range(rank * 2, 16, 4)] for rank in (0, 1)]
    assert [r.output.strip().splitlines()[-1].split(" | ") for r in results] == [
        ["0", "slice(0, 8, None)", "slice(0, 16, None)", refused.format(spans[0])],
        ["1", "slice(8, 16, None)", "slice(0, 16, None)", refused.format(spans[1])],
    ]
