"""Multi-host JAX on one machine: N local processes joined by `jax.distributed`.

TPU pods and GPU clusters run one JAX process per host; `jax.distributed.initialize` joins
them and the global mesh then spans devices no single process can address. JAX's CPU backend
runs exactly that on one machine: each process simulates CPU devices
(`--xla_force_host_platform_device_count`) and the processes exchange data through gloo
collectives over localhost. This module is the plumbing for it, used by jaxembed's own
multi-process tests and its sharded example, and meant for testing yours:

* `launch(command, num_processes)` starts the processes, with a free coordinator port in their
  environment, streams or collects each one's output, stops them all as soon as one fails,
  enforces a timeout, and raises `LaunchError` with every process's output on failure.
* `initialize()`, called first thing in each process, joins it to the others: it reads what
  `launch` put in the environment (or takes the arguments of `jax.distributed.initialize`),
  and on CPU-only processes makes sure the CPU collectives are gloo, which cross-process CPU
  programs need.
* `python -m jaxembed.multihost --num-processes 2 -- python train.py` does the same from a
  shell, each line of output prefixed with its process.

On a real cluster none of it is needed: run one process per host and call
`jax.distributed.initialize()` (on Cloud TPU and SLURM it finds everything by itself), or
`initialize(coordinator_address, num_processes, process_id)` with the first host's address.

Example:
    >>> import sys, jaxembed.multihost
    >>> done = jaxembed.multihost.launch(
    ...     [sys.executable, "-c", "import os; print(os.environ['JAXEMBED_PROCESS_ID'])"],
    ...     num_processes=2, devices_per_process=None)
    >>> [p.output.strip() for p in done]
    ['0', '1']
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import jax

from jaxembed import _checks

__all__ = [
    "LaunchError",
    "ProcessResult",
    "free_port",
    "initialize",
    "launch",
    "local_rows",
    "main",
]

# JAX reads the coordinator from JAX_COORDINATOR_ADDRESS itself; the count and the rank are
# jaxembed's names, since JAX's auto-detection only knows cluster managers' variables.
COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAXEMBED_NUM_PROCESSES"
PROCESS_ID = "JAXEMBED_PROCESS_ID"

_POLL_SECONDS = 0.05
_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping the others
_OUTPUT_TAIL = 6000  # characters of each process's output in a LaunchError's message


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """One launched process: its rank, exit code (None: stopped by the launcher while still
    running) and everything it printed (stdout and stderr, interleaved).

    Example:
        >>> ProcessResult(process_id=1, returncode=0, output="done\\n").returncode
        0
    """

    process_id: int
    returncode: int | None
    output: str


class LaunchError(RuntimeError):
    """The processes did not all finish cleanly: one exited with an error, or the timeout
    passed. `results` holds every process's `ProcessResult`; the message names what went
    wrong and ends with the tail of each process's output.

    Example:
        >>> import sys, jaxembed.multihost
        >>> try:
        ...     jaxembed.multihost.launch([sys.executable, "-c", "raise SystemExit(3)"],
        ...                               num_processes=1, devices_per_process=None)
        ... except jaxembed.multihost.LaunchError as error:
        ...     print(error.results[0].returncode)
        3
    """

    def __init__(self, message: str, results: Sequence[ProcessResult]):
        self.results = tuple(results)
        outputs = "".join(
            f"\n--- process {r.process_id} ({_describe(r.returncode)}), output"
            f"{' (tail)' if len(r.output) > _OUTPUT_TAIL else ''}:\n"
            f"{r.output[-_OUTPUT_TAIL:].rstrip() or '(none)'}\n"
            for r in self.results
        )
        super().__init__(message + "\n" + outputs)


def _describe(returncode: int | None) -> str:
    if returncode is None:
        return "stopped while running"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for the coordinator (the OS picks it).

    Example:
        >>> 0 < free_port() < 2**16
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _environment(
    base: Mapping[str, str], coordinator: str, count: int, rank: int, devices: int | None
) -> dict[str, str]:
    env = {**base, COORDINATOR_ADDRESS: coordinator, NUM_PROCESSES: str(count)}
    env[PROCESS_ID] = str(rank)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed, not at exit
    if devices is not None:
        # Appended: flags already set still apply, and XLA lets the last one win.
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{base.get('XLA_FLAGS', '')} {flag}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


class _Reader(threading.Thread):
    """Collects one process's output lines, echoing them with a prefix if asked."""

    def __init__(self, rank: int, stream, echo, lock: threading.Lock):
        super().__init__(daemon=True)
        self.rank, self.stream, self.echo, self.lock = rank, stream, echo, lock
        self.lines: list[str] = []

    def run(self) -> None:
        for line in iter(self.stream.readline, ""):
            self.lines.append(line)
            if self.echo is not None:
                with self.lock:
                    self.echo.write(f"[process {self.rank}] {line}")
                    self.echo.flush()
        self.stream.close()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to every process group still running, SIGKILL to those that ignore it."""
    running = [p for p in processes if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_SECONDS
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)  # the group: a shell's children too
    except ProcessLookupError:
        pass


def launch(
    command: Sequence[str],
    num_processes: int = 2,
    *,
    devices_per_process: int | None = 4,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo=None,
) -> list[ProcessResult]:
    """Runs `command` as `num_processes` local processes of one multi-host JAX program.

    Each process gets, in its environment, the coordinator's address (`127.0.0.1` and a free
    port, as `JAX_COORDINATOR_ADDRESS`), the process count (`JAXEMBED_NUM_PROCESSES`) and its
    rank (`JAXEMBED_PROCESS_ID`), which `initialize()` reads; with `devices_per_process`, also
    `JAX_PLATFORMS=cpu` and that many simulated CPU devices (`XLA_FLAGS`). Each process runs
    in its own process group, so that stopping it stops whatever it started.

    The launch fails fast: as soon as one process exits with an error, the others (which
    would otherwise wait for it in a collective) are stopped and `LaunchError` is raised; so
    it is when `timeout` passes with processes still running (a coordinator nobody reaches,
    a deadlock).

    Args:
        command: the program and its arguments, e.g. `[sys.executable, "train.py"]`; every
            process runs the same command.
        num_processes: how many processes (hosts) to simulate.
        devices_per_process: simulated CPU devices per process; None leaves the platform and
            `XLA_FLAGS` to `env`.
        timeout: seconds for the whole run.
        env: the environment of every process (default: this process's), to which the
            variables above are added.
        cwd: the processes' working directory.
        echo: a text stream (e.g. `sys.stdout`) to which each line is written as it comes,
            prefixed with `[process i]` and a space; None collects quietly.

    Returns:
        One `ProcessResult` per process, by rank; every `returncode` is 0.

    Raises:
        LaunchError: a process exited with a non-zero code or was killed by a signal, or the
            timeout passed; the message names the process(es) and holds all outputs.
        ValueError: an empty `command`, a count or device count that is not a positive
            integer, or a timeout that is not a finite positive number.

    Example:
        >>> import sys, jaxembed.multihost
        >>> code = "import os; print(os.environ['XLA_FLAGS'].split()[-1])"
        >>> done = jaxembed.multihost.launch([sys.executable, "-c", code], 2)
        >>> [p.output.strip() for p in done]  # see initialize() for a JAX program
        ['--xla_force_host_platform_device_count=4', '--xla_force_host_platform_device_count=4']
    """
    if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
        raise ValueError(
            f"command must be a non-empty sequence of strings (the program and its "
            f"arguments), got {command!r}"
        )
    num_processes = _checks.positive_int("num_processes", num_processes)
    if devices_per_process is not None:
        devices_per_process = _checks.positive_int("devices_per_process", devices_per_process)
    timeout = _checks.positive_number("timeout", timeout)

    coordinator = f"127.0.0.1:{free_port()}"
    base = dict(os.environ if env is None else env)
    lock = threading.Lock()
    processes, readers = [], []
    try:
        for rank in range(num_processes):
            process = subprocess.Popen(
                list(command),
                env=_environment(base, coordinator, num_processes, rank, devices_per_process),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            processes.append(process)
            readers.append(_Reader(rank, process.stdout, echo, lock))
            readers[-1].start()
        failure = _wait(processes, timeout)
    finally:
        _stop(processes)  # a no-op when all have exited; also on KeyboardInterrupt
        for reader in readers:
            reader.join()
    stopped = set(failure.running) if failure is not None else set()
    results = [
        ProcessResult(rank, None if rank in stopped else p.returncode, "".join(r.lines))
        for rank, (p, r) in enumerate(zip(processes, readers, strict=True))
    ]
    if failure is not None:
        outputs = [r.output for r in results]
        raise LaunchError(failure.message(coordinator, timeout, outputs), results)
    return results


@dataclasses.dataclass
class _Failure:
    failed: list[tuple[int, int]]  # (rank, returncode) of the processes that failed first
    running: list[int]  # ranks still running when the launch gave up (then stopped)

    def message(self, coordinator: str, timeout: float, outputs: Sequence[str]) -> str:
        if self.failed:
            what = ", ".join(
                f"process {r} failed ({_describe(c)}){_hint(outputs[r], coordinator)}"
                for r, c in self.failed
            )
            tail = f"; stopped processes {self.running}, still running" if self.running else ""
            return f"multi-process launch failed: {what}{tail} (coordinator {coordinator})"
        return (
            f"multi-process launch timed out after {timeout:g} s: processes {self.running} "
            f"were still running and were stopped (coordinator {coordinator}; a process that "
            f"never reached jax.distributed.initialize, or a collective some process left, "
            f"makes the others wait)"
        )


# What JAX's distributed runtime prints when it aborts a process, and what it means.
_HINTS = (
    ("RegisterTask", "could not reach the coordinator at {} within its initialization timeout"),
    ("another task died", "its coordination service reported another process dead"),
)


def _hint(output: str, coordinator: str) -> str:
    for marker, meaning in _HINTS:
        if marker in output:
            return ": " + meaning.format(coordinator)
    return ""


def _wait(processes: Sequence[subprocess.Popen], timeout: float) -> _Failure | None:
    """Polls until all exit cleanly (None), one fails, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in processes]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        running = [rank for rank, code in enumerate(codes) if code is None]
        if failed or (running and time.monotonic() > deadline):
            return _Failure(failed, running)
        if not running:
            return None
        time.sleep(_POLL_SECONDS)


def _cpu_only() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return {p.strip().lower() for p in platforms.split(",")} == {"cpu"}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 120,
    exit_on_error: bool = True,
) -> None:
    """Joins this process to the others of a multi-host run: `jax.distributed.initialize`.

    Call it first, before anything asks JAX for devices. Arguments left None come from the
    environment `launch` sets (`JAX_COORDINATOR_ADDRESS`, `JAXEMBED_NUM_PROCESSES`,
    `JAXEMBED_PROCESS_ID`); where those are unset too, JAX detects the cluster itself (Cloud
    TPU, SLURM, Open MPI, Kubernetes). When JAX is restricted to the CPU (`JAX_PLATFORMS=cpu`,
    which `launch` sets with simulated devices), the CPU collectives are set to gloo: the
    default in recent JAX, but without them a CPU program spanning processes cannot run.

    Args:
        coordinator_address: `host:port` of process 0, which runs the coordinator service.
        num_processes: how many processes take part.
        process_id: this process's rank, in `[0, num_processes)`.
        initialization_timeout: seconds to keep trying to reach the coordinator and the other
            processes before raising (JAX's default is 300).
        exit_on_error: an uncaught exception ends this process at once, exit code 1, after
            its traceback is printed. Otherwise Python's exit runs JAX's shutdown barrier,
            which waits (up to minutes) for the other processes while they wait for this one
            in their next collective: the launch would end only at a timeout, blaming
            whichever process gave up first. `sys.exit` still exits normally.

    Raises:
        ValueError: `JAXEMBED_NUM_PROCESSES` or `JAXEMBED_PROCESS_ID` not an integer; and
            what `jax.distributed.initialize` raises (no coordinator within the timeout, an
            already initialized process, a rank outside `[0, num_processes)`).

    Example:
        >>> import sys, jaxembed.multihost
        >>> code = ("import jaxembed.multihost as m, jax; m.initialize(); "
        ...         "print(jax.process_index(), jax.process_count(), jax.device_count())")
        >>> done = jaxembed.multihost.launch([sys.executable, "-c", code], 2)
        >>> [p.output.split()[-3:] for p in done]  # 2 processes x 4 simulated devices
        [['0', '2', '8'], ['1', '2', '8']]
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ADDRESS)
    if num_processes is None:
        num_processes = _int_from_env(NUM_PROCESSES)
    if process_id is None:
        process_id = _int_from_env(PROCESS_ID)
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if exit_on_error and not getattr(sys.excepthook, "_exits", False):
        sys.excepthook = _exit_after(sys.excepthook)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )


def _exit_after(excepthook):
    """`excepthook`, then an immediate exit: no atexit handlers, no shutdown barrier."""

    def hook(kind, value, traceback):
        excepthook(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    hook._exits = True  # installed once, however often initialize is called
    return hook


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def local_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int], dim: int = 0) -> slice:
    """The range of dimension `dim` of a `global_shape` array that this process's devices hold
    under `sharding`: the part of a global batch this host loads, e.g. for
    `jax.make_array_from_process_local_data(sharding, batch[rows], global_shape)`.

    On a `(data, model)` mesh whose "data" rows are hosts, each host holds `1 / hosts` of the
    batch; where every host's devices span all of "data" (the vocabulary split across hosts
    instead), each holds all of it.

    Args:
        sharding: the global array's sharding.
        global_shape: the global array's shape.
        dim: the dimension split between hosts (the batch).

    Returns:
        `slice(start, stop)` with `0 <= start < stop <= global_shape[dim]`.

    Raises:
        ValueError: this process's devices hold no part of the array, or parts of `dim` that
            are not contiguous (a device order that interleaves hosts).

    Example:
        >>> import jax, jaxembed.multihost
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> jaxembed.multihost.local_rows(NamedSharding(mesh, P("data")), (8, 16))
        slice(0, 8, None)
    """
    shape = tuple(global_shape)
    if not 0 <= dim < len(shape):
        raise ValueError(f"dim must index global_shape {shape}, got {dim!r}")
    indices = sharding.addressable_devices_indices_map(shape).values()
    spans = sorted({_span(index[dim], shape[dim]) for index in indices})
    if not spans:
        raise ValueError(f"this process (rank {jax.process_index()}) holds no part of {sharding}")
    if any(a[1] < b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(
            f"this process's devices hold non-contiguous parts {spans} of dimension {dim} "
            f"under {sharding}: order the mesh's devices so each host's are adjacent"
        )
    return slice(spans[0][0], max(stop for _, stop in spans))


def _span(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `python -m jaxembed.multihost [-n N] [--devices-per-process D]
    [--timeout S] -- COMMAND...`; prints each process's lines prefixed with its rank, and
    returns 0, or 1 after printing the `LaunchError` to stderr.

    Example:
        >>> import sys, jaxembed.multihost
        >>> jaxembed.multihost.main(["-n", "1", "--devices-per-process", "0", "--",
        ...                          sys.executable, "-c", "print('hello')"])
        [process 0] hello
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m jaxembed.multihost",
        description="Run COMMAND as N local processes of one multi-host JAX program "
        "(each calls jaxembed.multihost.initialize()).",
    )
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=4,
        help="simulated CPU devices per process; 0 leaves JAX_PLATFORMS and XLA_FLAGS alone",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the run")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the program")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        launch(
            command,
            args.num_processes,
            devices_per_process=args.devices_per_process or None,
            timeout=args.timeout,
            echo=sys.stdout,
        )
    except (LaunchError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
