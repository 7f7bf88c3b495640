"""Test configuration: 8 host CPU devices so that pmap and sharding are always exercised.

XLA_FLAGS must be set before jax is first imported, hence at the top of conftest.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# Tests compile many small programs once each: compile time, not run time, dominates. LLVM's
# backend optimisation level 0 halves it (measured: 108 s -> 52 s for the model and train-step
# tests) without changing what XLA computes at the HLO level; float results may differ in the
# last bits from an optimised build, which every test's tolerance covers (bitwise comparisons
# compare two programs compiled the same way). ALIGNJAX_TEST_XLA_OPT=1 keeps the default.
_opt = "--xla_backend_optimization_level=0"
if os.environ.get("ALIGNJAX_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in (
    os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " " + _opt
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No network at run time: the hub clients of transformers / datasets must never be reached.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def x64():
    """Run the test body with float64 enabled."""
    with jax.enable_x64(True):
        yield
