"""Multi-host training for real: two processes joined by ``jax.distributed`` on a loopback
coordinator, each reading its own shard of the Grain pipeline, reproduce a one-process run."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def tokens_dir(train_data) -> str:
    return train_data["tokens_dir"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, tokens_dir, extra=()):
    return [sys.executable, "-m", "train.main", "--config", "configs/editor_tiny.py",
            "--workdir", str(workdir), *train_fixtures.token_flags(tokens_dir),
            "--config.train.batch_size=8", f"--config.train.num_steps={STEPS}",
            "--config.train.checkpoint_every=3", "--config.train.export=False",
            "--config.train.loss_plot=False", "--config.train.log_every=1",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", *extra]


@pytest.mark.multiprocess
def test_two_processes_match_one(tokens_dir, tmp_path):
    from editmgt_jax.training.metrics_log import read_losses

    # Two processes x 2 devices: one global (data=2, fsdp=2) mesh over 4 devices.
    port = _free_port()
    procs = [subprocess.Popen(
        _command(tmp_path / "two", tokens_dir, (f"--coordinator_address=127.0.0.1:{port}",
                                                 "--num_processes=2", f"--process_id={i}")),
        cwd=REPO, env=train_fixtures.subprocess_env(2), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outs[i][-3000:]}"
    # One process with the same 4-device mesh, reading the whole stream.
    single = subprocess.run(_command(tmp_path / "one", tokens_dir), cwd=REPO,
                            env=train_fixtures.subprocess_env(4), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    two, one = read_losses(str(tmp_path / "two")), read_losses(str(tmp_path / "one"))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    # both processes wrote their own data-iterator state into the shared checkpoint
    data_item = tmp_path / "two" / "checkpoints" / str(STEPS) / "data"
    assert len([f for f in os.listdir(data_item) if f.startswith("process_")]) == 2
