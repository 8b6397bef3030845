"""Helpers shared by the benchmark scripts of this folder.

Round-robin timing, quartile summaries and ratios of timing samples, the run metadata
of `--json`, process counters (load average, CPU seconds, minor page faults), and the report:
the header lines, plain-text tables, ratio texts, verdict lines and the JSON file. The scripts
are run as `python benchmarks/bench_X.py`, which puts this folder first on `sys.path`, so they
import this module as `common`.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax

K = TypeVar("K")

# The libraries whose versions `run_metadata` records, in this order (those importable).
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "keras", "jaxembed")
# Units of `quartile_summary` and `scaled_samples`: the factor from seconds.
UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


# ----------------------------------------------------------------------------- process counters


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    """1, 5 and 15 minute load averages: other processes competing for the CPU cores."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------- timing


def time_round_robin(
    calls: Mapping[K, Callable[[], Any]], rounds: int, *, settle_s: float = 0.0
) -> tuple[dict[K, list[float]], dict[K, list[int]]]:
    """Per-call seconds (and minor page faults) of each zero-argument call, `rounds` samples
    each; every round calls each once, the first one called rotating each round, so that drift
    on a noisy machine hits all of them alike. A sample is one call + `block_until_ready`.

    `settle_s`: a pause before every call, not timed. XLA:CPU returns a call's large temp
    buffers to the OS after the call has returned, and the call timed next pays for it."""
    samples: dict[K, list[float]] = {key: [] for key in calls}
    faults: dict[K, list[int]] = {key: [] for key in calls}
    items = list(calls.items())
    for r in range(rounds):
        shift = r % len(items)
        for key, call in items[shift:] + items[:shift]:
            if settle_s:
                time.sleep(settle_s)
            faults_before = minor_faults()
            start = time.perf_counter()
            jax.block_until_ready(call())
            samples[key].append(time.perf_counter() - start)
            faults[key].append(minor_faults() - faults_before)
    return samples, faults


def quartile_summary(times: Sequence[float], unit: str) -> dict[str, float]:
    """Median, quartiles and minimum of seconds, in `unit` (a key of UNITS), and the count;
    a single sample stands for all three quartiles."""
    scale = UNITS[unit]
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else list(times) * 3
    return {
        f"median_{unit}": statistics.median(times) * scale,
        f"p25_{unit}": q1 * scale,
        f"p75_{unit}": q3 * scale,
        f"min_{unit}": min(times) * scale,
        "n": len(times),
    }


def ratio_of_medians(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(num) / statistics.median(den)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num/den, both timed in the same round: cancels slow drift."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def ratios(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """num/den as the ratio of medians and as the median of per-round ratios."""
    return {"of_medians": ratio_of_medians(num, den), "paired": paired_ratio(num, den)}


def format_ratio(ratio: Mapping[str, float]) -> str:
    """A `ratios` result as text: `2.51x (paired 2.47x)`."""
    return f"{ratio['of_medians']:.2f}x (paired {ratio['paired']:.2f}x)"


def scaled_samples(
    samples: Mapping[str, Mapping[str, Sequence[float]]], unit: str
) -> dict[str, dict[str, list[float]]]:
    """{section: {name: seconds}} in `unit` (a key of UNITS), for the JSON output."""
    scale = UNITS[unit]
    return {
        section: {name: [t * scale for t in times] for name, times in by_name.items()}
        for section, by_name in samples.items()
    }


# ----------------------------------------------------------------------------- compiled code


def memory_bytes(compiled: Any, names: Iterable[str]) -> dict[str, int]:
    """`{name: compiled.memory_analysis().<name>_size_in_bytes}` for a compiled function."""
    analysis = compiled.memory_analysis()
    return {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in names}


# ----------------------------------------------------------------------------- report


def library_versions(libraries: Sequence[str]) -> dict[str, str]:
    """`{name: __version__}` of those of `libraries` that are importable, in their order."""
    versions = {}
    for name in libraries:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            continue
    return versions


def header_lines(
    meta: Mapping[str, Any], libraries: Sequence[str], *, devices: str = "", load: str = ""
) -> list[str]:
    """The two lines a script's output starts with, from its `run_metadata`: the device (with
    `devices`, a note on their count), the CPU cores and the `load` average at start if given;
    then the versions of `libraries` (Keras's with its backend) and Python."""
    device = (
        f"device: {meta['device_platform']} / {meta['device_kind']} "
        f"(x{meta['device_count']}{devices}), {meta['cpu_count']} CPU cores visible"
    )
    if load:
        device += f", load average {load} at start"
    backend = f" (backend {sys.modules['keras'].backend.backend()})" if "keras" in meta else ""
    versions = [
        f"{name} {meta[name]}{backend if name == 'keras' else ''}"
        for name in libraries
        if name in meta
    ]
    return [device, ", ".join([*versions, f"python {meta['python']}"])]


def format_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any] | str]) -> str:
    """A plain-text table: the header, a rule as wide as it, then a line per row.

    `columns` are (title, format spec) pairs, e.g. `("median ms", ">10")`; each cell is
    formatted with its column's spec (format it to text first for a precision: `f"{x:.2f}"`)
    and the cells are joined by single spaces. A row shorter than the columns leaves the last
    ones out; a row given as one string is a line of its own (a variant that failed, say).
    """
    header = " ".join(f"{title:{spec}}" for title, spec in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        cells = zip(row, (spec for _, spec in columns), strict=False)
        lines.append(" ".join(f"{cell:{spec}}" for cell, spec in cells))
    return "\n".join(lines)


def verdict_lines(checks: Sequence[tuple[bool, str]]) -> list[str]:
    """A `[PASS]`/`[FAIL]` line per (ok, text) check, then the VERDICT line."""
    lines = [f"[{'PASS' if ok else 'FAIL'}] {text}" for ok, text in checks]
    missed = sum(not ok for ok, _ in checks)
    lines.append(
        "VERDICT: "
        + ("all targets met" if not missed else f"{missed} of {len(checks)} targets missed")
    )
    return lines


def run_metadata(libraries: Sequence[str] = LIBRARIES, **extra: Any) -> dict[str, Any]:
    """Date, device, host and the versions of those of `libraries` that are importable,
    then `extra`."""
    device = jax.devices()[0]
    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    meta.update(library_versions(libraries))
    meta.update(extra)
    return meta


def parse_with_quick(parser: Any, quick: Mapping[str, Any], argv: Sequence[str]) -> Any:
    """`parser.parse_args(argv)` with `--quick` (and `--json`) added: `--quick` sets the
    arguments named in `quick` to its values, a small smoke run."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run: " + ", ".join(f"{k} {v}" for k, v in quick.items()),
    )
    parser.add_argument("--json", help="also write the figures and samples to this file")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def start_run(args: Any, recorded: Sequence[str]) -> dict[str, Any]:
    """The run's metadata (the `recorded` arguments of `args`, the load average at start),
    printed as the header every script begins with."""
    meta = run_metadata(
        **{name: getattr(args, name) for name in recorded},
        load_average_start=load_average(),
    )
    print("\n".join(header_lines(meta, LIBRARIES, load=meta["load_average_start"])))
    return meta


def finish_run(meta: dict[str, Any], started: float) -> None:
    """Records the load average at the end in `meta` and prints the total time since
    `started` (a `time.perf_counter()` reading)."""
    meta["load_average_end"] = end_load = load_average()
    print(f"\ntotal {time.perf_counter() - started:.1f} s; load average {end_load} at end")


def mib(n: float) -> str:
    """`n` bytes in MiB, two decimals."""
    return f"{n / 2**20:.2f} MiB"


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON to `path` and says so."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
