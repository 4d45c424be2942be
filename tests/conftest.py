"""Every test sees 8 virtual CPU devices: set before jax initializes its backends."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, "conftest must run before jax initializes"
  return jax.devices()
