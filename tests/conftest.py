"""Test setup: 8 host CPU devices for sharding tests, full-precision matmuls for parity."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile into no persistent cache (tests/test_compile_cache.py runs it in its own folders).
os.environ.setdefault("EDITMGT_COMPILATION_CACHE", "off")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "editmgt-tiny-v1"


@pytest.fixture(scope="session")
def tiny_dir() -> pathlib.Path:
    return TINY


@pytest.fixture(scope="session")
def cases() -> dict:
    with np.load(TINY / "cases.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def cli():
    """``cli(module, *args)``: run ``python -m module args`` from the repository root, as a user does;
    returns the ``CompletedProcess`` (text stdout / stderr). The command-line tools are tested
    through their processes; the library behind them is tested directly."""
    repo = FIXTURES.parent.parent

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=repo, capture_output=True,
                              text=True, env=dict(os.environ))
    return run
