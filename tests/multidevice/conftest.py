"""Runs only in its own process (tests/test_sharding.py starts it) with 8 simulated devices:
XLA reads the device count once, when JAX's CPU backend starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
