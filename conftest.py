"""Test-session setup that has to happen before anything imports jax."""

import os

# Eight simulated CPU devices let the data-parallel and sharding tests run in
# the normal suite on any machine. XLA reads this flag once, when its CPU
# backend starts, so it must be in place before the first jax computation.
# Flags the user already set are kept.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_xla_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICE_COUNT_FLAG not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} {_DEVICE_COUNT_FLAG}=8".strip()
