"""Test setup: 8 host CPU devices for sharding tests, full-precision matmuls for parity."""

import os

# The test models are tiny: compiling dominates running them. CPU code generation at LLVM level 0
# with XLA's classic elemental emitters compiles a train step about 3x faster than the defaults, and
# computes the same numbers (the parity tests compare with the official outputs under these flags).
# Processes the tests start inherit the flags (tests/train_fixtures.py for the trainer's).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Until the run's own cache folder is set (the fixture below), nothing goes to a persistent cache,
# never the user's (tests/test_compile_cache.py runs it in its own folders).
os.environ["EDITMGT_COMPILATION_CACHE"] = "off"

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "editmgt-tiny-v1"


# The test files that take longest (measured on two cores), longest first. They start first: with
# ``-n 2 --dist loadfile`` (setup.cfg) each file runs on one worker, and the short files that
# come after them fill in, so that both workers finish at about the same time.
LONGEST_FIRST = ("test_train_loop", "test_release_conventions", "test_editor", "test_check_reference",
                 "test_training", "test_accelerator_check", "test_multihost", "test_checkpoint",
                 "test_failures", "test_demo_browser", "test_vq", "test_packaging",
                 "test_release_text_training", "test_hub", "test_default_model", "test_bench_sampler",
                 "test_evaluation")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))     # stable: in-file order kept


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache of this run's own, empty at its start (one per pytest-xdist
    worker, under the run's temporary folder): a program compiled again in this process (a second
    ``Editor.load`` of a checkpoint, a resumed ``train``) or in a command the tests start
    (``infer.edit``, ``train.main``: the environment names the folder) is read back, not compiled
    again, as it is for a user, whose cache is on by default (editmgt_jax.compile_cache). Nothing
    compiled by an earlier run is ever used."""
    from editmgt_jax import compile_cache

    path = str(tmp_path_factory.mktemp("xla-cache"))
    os.environ[compile_cache.ENV_VAR] = path
    assert compile_cache.enable() == path
    yield path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> dict:
    """The trainer tests' data (tests/train_fixtures.py), built once per worker and only read:
    synthetic edits at 32 px as images (TFDS, ``data_dir``) and pre-tokenised (``tokens_dir``)."""
    import train_fixtures

    root = tmp_path_factory.mktemp("train-data")
    data_dir = train_fixtures.build_images(str(root / "tfds"))
    return {"data_dir": data_dir, "tokens_dir": train_fixtures.build_tokens(data_dir, str(root / "tokens"))}


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
