"""The multi-process suite, its own pytest invocation:

    pytest tests/multihost

(a plain `pytest` leaves this folder out: see `collect_ignore` in tests/conftest.py). Each
test module starts its worker scripts as 2 local processes x 4 simulated CPU devices, joined
by `jax.distributed` (`jaxembed.multihost.launch`), a global 2 x 4 mesh with real
cross-process collectives (gloo over localhost). This pytest process keeps its single CPU
device and computes the single-process references from the same global data.

`workers.run_workers` starts a worker script as the processes; the launcher's own behaviour
(failures, timeouts, output) is tested in test_launcher.py.
"""
