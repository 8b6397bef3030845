"""8 simulated CPU devices for the multi-device suite, its own pytest invocation:

    pytest tests/multidevice

(a plain `pytest` leaves this folder out: see `collect_ignore` in tests/conftest.py). XLA reads
the device count once, when JAX's CPU backend starts; pytest loads this file before it imports
any test module, so nothing has asked JAX for a device yet.
"""

import os

import jax

DEVICE_COUNT = 8

# Appended, so that flags already set (dumps, ...) still apply; a later flag wins in XLA.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={DEVICE_COUNT}"]
).strip()
if not os.environ.get("JAX_PLATFORMS"):
    # The simulated devices are CPU devices, even where an accelerator would be the default.
    jax.config.update("jax_platforms", "cpu")
