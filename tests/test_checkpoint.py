"""Training checkpoints: exact resume after SIGKILL, no partial checkpoint ever restored, restore
onto another mesh, keep-N, async saves under donation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_fixtures
from configs import vq_tiny
from editmgt_jax.parallel import make_mesh
from editmgt_jax.training.checkpoint import TrainCheckpointer
from editmgt_jax.training.state import TrainProgram

FAST = {"xla_backend_optimization_level": 0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vq_config():
    c = vq_tiny.get_config()
    c.vq.model.block_out_channels = (8, 8)
    c.vq.model.norm_num_groups = 4
    c.vq.model.latent_channels = 4
    c.vq.model.num_vq_embeddings = 16
    return c


@pytest.fixture(scope="module")
def program_and_state():
    """A tiny VQ train state, initialised sharded on 8 devices over (data=2, fsdp=4)."""
    c = tiny_vq_config()
    mesh = make_mesh((2, 4, 1))
    program = TrainProgram.create(c, mesh, check_replication=False)
    state, _ = program.init_state(0, compiler_options=FAST)
    return c, program, state


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_restore_onto_a_different_mesh(program_and_state, tmp_path):
    c, program, state = program_and_state
    ck = TrainCheckpointer(tmp_path / "ck", keep=2)
    ck.save(3, state, c)
    ck.wait()
    for shape in [(1, 1, 1), (2, 2, 2), (1, 8, 1)]:
        mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        other = TrainProgram.create(c, mesh, check_replication=False)
        restored, saved_config = ck.restore(other.abstract_state)
        jax.tree.map(np.testing.assert_array_equal, _host(restored), _host(state))
        # arrays land with the target mesh's shardings
        for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(other.state_shardings)):
            assert a.sharding == s
    assert saved_config["task"] == "vq" and saved_config["optim"]["b2"] == 0.999
    ck.close()


@pytest.fixture
def steps_2_and_4(program_and_state, tmp_path):
    """A closed checkpoint folder holding steps 2 and 4 of the fixture's state (keep 5)."""
    c, _, state = program_and_state
    d = tmp_path / "ck"
    ck = TrainCheckpointer(d, keep=5)
    ck.save(2, state, c)
    ck.save(4, state, c)
    ck.close()
    return d


def test_partial_checkpoints_are_never_picked_up(program_and_state, steps_2_and_4):
    _, program, state = program_and_state
    d = steps_2_and_4
    # What a process killed mid-save leaves: a temporary directory of a newer step with part of
    # the files (here: a copy of step 4 with its state item cut short and no config).
    tmp = d / "6.orbax-checkpoint-tmp-1733000000000000"
    shutil.copytree(d / "4", tmp)
    shutil.rmtree(tmp / "config")
    for f in sorted((tmp / "state").rglob("*"))[-3:]:
        if f.is_file():
            f.write_bytes(f.read_bytes()[:7])
    ck = TrainCheckpointer(d, keep=5)
    assert ck.latest_step() == 4 and ck.all_steps() == [2, 4]
    restored, _ = ck.restore(program.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, _host(restored), _host(state))
    ck.close()
    assert not tmp.exists(), "leftover temporary checkpoint directories are cleaned up"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(program_and_state, steps_2_and_4, tmp_path):
    c, program, state = program_and_state
    d = steps_2_and_4
    biggest = max((p for p in (d / "4" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:50])
    ck = TrainCheckpointer(d, keep=5)
    step, restored, saved_config = ck.restore_latest(program.abstract_state)
    assert step == 2 and saved_config["task"] == "vq"
    jax.tree.map(np.testing.assert_array_equal, _host(restored), _host(state))
    assert [s for s, _ in ck.skipped] == [4] and ck.skipped[0][1]
    damaged = [p.name for p in d.iterdir() if p.name.startswith("damaged-4-")]
    assert len(damaged) == 1 and (d / damaged[0] / "state").is_dir()     # kept, out of the way
    assert ck.all_steps() == [2]
    ck.save(4, state, c)                                                  # the step can be written again
    ck.wait()
    assert ck.restore_latest(program.abstract_state)[0] == 4 and ck.skipped == []
    ck.close()
    empty = TrainCheckpointer(tmp_path / "none")
    assert empty.restore_latest(program.abstract_state) is None
    empty.close()


def test_keep_n_and_async_save_under_donation(program_and_state, tmp_path):
    c, program, state = program_and_state
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0,
                   in_shardings=(program.state_shardings,), out_shardings=program.state_shardings)
    state = jax.tree.map(lambda x: x + 0, state)    # a private copy: the fixture's state stays intact
    ck = TrainCheckpointer(tmp_path / "ck", keep=2)
    expected = {}
    for step in range(1, 6):
        expected[step] = _host(state)
        ck.save(step, state, c)
        state = bump(state)   # donates the buffers the background save was started from
    ck.close()
    assert ck.all_steps() == [4, 5]
    ck = TrainCheckpointer(tmp_path / "ck", keep=2)
    for step in (4, 5):
        restored, _ = ck.restore(program.abstract_state, step)
        jax.tree.map(np.testing.assert_array_equal, _host(restored), expected[step])
    ck.close()


# ---------------------------------------------------------------------------------- kill & resume


@pytest.fixture(scope="module")
def tokens_dir(train_data) -> str:
    return train_data["tokens_dir"]


def _command(workdir, tokens_dir, steps):
    return [sys.executable, "-m", "train.main", "--config", "configs/editor_tiny.py",
            "--workdir", str(workdir), *train_fixtures.token_flags(tokens_dir),
            "--config.train.batch_size=4", f"--config.train.num_steps={steps}",
            "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2",
            "--config.train.export=False", "--config.train.loss_plot=False",
            "--config.train.log_every=1", "--config.mesh.data=2"]


def _losses(workdir):
    from editmgt_jax.training.metrics_log import read_losses

    return read_losses(str(workdir))


@pytest.mark.multiprocess
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tokens_dir, tmp_path):
    steps = 30
    env = train_fixtures.subprocess_env(2, tmp_path / "jax_cache")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_command(ref_dir, tokens_dir, steps), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, steps + 1))

    proc = subprocess.Popen(_command(run_dir, tokens_dir, steps), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and max(_losses(run_dir) or [0]) < 8 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = _losses(run_dir)
    assert proc.returncode == -signal.SIGKILL
    assert 8 <= max(before) < steps, "the run was killed mid-training"
    ck = TrainCheckpointer(run_dir / "checkpoints")
    resume_from = ck.latest_step()
    ck.close()
    assert resume_from is not None and resume_from % 3 == 0 and resume_from <= max(before)

    lines_before = open(run_dir / "metrics.jsonl").read().splitlines()
    subprocess.run(_command(run_dir, tokens_dir, steps), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    lines = open(run_dir / "metrics.jsonl").read().splitlines()
    assert lines[:resume_from] == lines_before[:resume_from], "rows up to the checkpoint are kept"
    # The rows the killed run wrote after its checkpoint were replaced: every step appears once.
    assert [json.loads(x)["step"] for x in lines if x.strip()] == list(range(1, steps + 1))
    after = _losses(run_dir)
    assert after == reference, "bit-identical losses to the uninterrupted run"
    # the steps the killed run had done past its last checkpoint were redone identically
    for s, v in before.items():
        assert reference[s] == v


def test_fine_tuning_starts_from_a_converted_release(tmp_path):
    """init_from = a checkpoint converted from the official layout: the train state starts from
    exactly those weights (the tiny fixture model, frozen-encoder text states as inputs)."""
    from editmgt_jax import checkpoints
    from editmgt_jax.convert import convert_release
    from editmgt_jax.models.transformer import TransformerConfig
    from editmgt_jax.tools.tiny_release import make_release
    from editmgt_jax.training.frozen import load_init_params
    from configs import editor_tiny, tiny

    release = make_release(os.path.join(REPO, "tests", "fixtures", "editmgt-tiny-v1"), str(tmp_path / "rel"))
    ckpt = convert_release(release, str(tmp_path / "ckpt"), components=["transformer"], log=lambda _: None)
    c = editor_tiny.get_config()
    c.editor.transformer = TransformerConfig.from_official(tiny.get_config().model.transformer).to_dict()
    c.editor.text = {"kind": "precomputed"}
    c.editor.timestep_convention = "release"
    c.init_from = ckpt
    program = TrainProgram.create(c, make_mesh((2, 2, 2)))
    state, _ = program.init_state(0, params=load_init_params(c, program), compiler_options=FAST)
    converted = _by_path(checkpoints.load_component(ckpt, "transformer"))   # as stored on disk
    ours = _by_path(_host(state.params["transformer"]))
    assert sorted(ours) == sorted(converted)
    for k in ours:
        np.testing.assert_array_equal(ours[k], converted[k], err_msg=k)


def _by_path(tree) -> dict:
    """Leaves keyed by their path with every key as a string (list indices included)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in flat}
