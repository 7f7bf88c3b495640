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
# Test processes (the xdist workers, and the runs the tests start as subprocesses) compile many
# of the same programs: share them through JAX's persistent compilation cache. A cached
# executable is the one the compiler produced (the key covers the program, the flags and the
# jax version), so results are unchanged. Delete the directory to reclaim the space.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"alignjax-tests-jax-cache-{os.getuid()}"
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


# Tests that start processes or train whole runs take 10-60 s each: run them first, so that
# pytest-xdist spreads them over the workers instead of leaving one of them for the end.
_SLOW_FIRST = (
    "test_train_resume.py",
    "test_train_distributed.py",
    "test_train_distributed_online.py",
    "test_benchmark_train_step.py",
    "test_notebooks.py",
    "test_train_trainer.py",
    "test_train_parallel.py",
    "test_train_tasks.py",
    "test_package.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept
