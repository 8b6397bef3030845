"""Runs the multi-device suite (tests/multidevice) in a separate process with 8 CPU devices.

XLA fixes the device count when JAX's backend starts, and this process has started it with
one device, hence the subprocess.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_multidevice_suite_passes_on_8_simulated_devices():
    env = {
        **os.environ,
        # Appended, so flags the user set (dumps, ...) still apply.
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
        "JAXEMBED_MULTIDEVICE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "multidevice"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout
