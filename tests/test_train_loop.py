"""The training loop end to end on real (small) data: both tasks learn, outputs are written, a
non-finite step is named, and the frozen tokenizer inside the step equals pre-tokenised ids.

XLA programs are compiled with ``xla_backend_optimization_level=0`` (tiny models: compilation
dominates).
"""

import json
import os

import jax
import numpy as np
import pytest

import train_fixtures
from configs import editor_tiny, vq_tiny
from editmgt_jax.parallel import DEFAULT_RULES, make_mesh
from editmgt_jax.training.state import TrainProgram
from editmgt_jax.training.step import global_batch, loss_from_config, make_steps

FAST = {"xla_backend_optimization_level": 0}
RES = train_fixtures.RES


@pytest.fixture(scope="module")
def data(train_data) -> dict:
    """Synthetic edits at 32 px as images (TFDS) and pre-tokenised (8x8 ids)."""
    return train_data


def small_editor_config(**text):
    c = editor_tiny.get_config()
    c.editor.transformer.num_single_layers = 0
    c.editor.text.update(text)
    c.optim.update(learning_rate=1e-3, schedule="constant", warmup_steps=0)
    return c


def data_config(c, data, steps, batch_size=8, tokens=False):
    c.data.name = train_fixtures.DATA_NAME
    c.data.data_dir = data["data_dir"]
    c.data.tokens_dir = data["tokens_dir"] if tokens else ""
    c.data.resolution = RES
    c.editor.image_size = RES
    c.train.batch_size = batch_size
    c.train.num_steps = steps
    c.train.checkpoint_every = steps
    c.train.log_every = 5
    c.train.export = False
    c.train.loss_plot = False
    return c


def test_pixels_in_step_and_pretokenised_ids_give_the_same_loss():
    """The frozen VQ inside the step and ids computed beforehand (pre-tokenisation) are one loss."""
    from editmgt_jax.training.state import vq_config
    from editmgt_jax.training.frozen import load_frozen_vq

    c = small_editor_config()
    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    program = TrainProgram.create(c, mesh)
    state, rest = program.init_state(0, compiler_options=FAST)
    vq_prog, vq_arrays, _ = load_frozen_vq(c, mesh, DEFAULT_RULES, FAST)
    rng = np.random.RandomState(2)
    pix = dict(source=rng.randint(0, 256, (4, RES, RES, 3)).astype(np.uint8),
               target=rng.randint(0, 256, (4, RES, RES, 3)).astype(np.uint8),
               instruction_ids=rng.randint(0, 118, (4, 24)).astype(np.int32),
               index=np.arange(4, dtype=np.int32))
    vq = vq_prog.merge(*vq_arrays)
    ids = dict(source_ids=np.asarray(vq.encode_ids(pix["source"] / np.float32(255))),
               target_ids=np.asarray(vq.encode_ids(pix["target"] / np.float32(255))),
               instruction_ids=pix["instruction_ids"], index=pix["index"])
    grid = RES // vq_config(c).downsample_factor
    assert ids["target_ids"].shape == (4, grid, grid)
    key = jax.random.key_data(jax.random.key(5))
    loss_fn = loss_from_config(c)
    with_vq = make_steps(program, loss_fn, {"vq": vq_prog}, pix, {"rest": rest, "frozen": {"vq": vq_arrays}},
                         compiler_options=FAST)
    m1 = with_vq.eval(state.params, global_batch(pix, mesh), {"rest": rest, "frozen": {"vq": vq_arrays}}, key)
    pre = make_steps(program, loss_fn, {}, ids, {"rest": rest, "frozen": {}}, compiler_options=FAST)
    m2 = pre.eval(state.params, global_batch(ids, mesh), {"rest": rest, "frozen": {}}, key)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)


# ------------------------------------------------------------------------------- real training


def test_both_tasks_reduce_their_loss(data, tmp_path):
    """VQ on images (f32, with a sample grid and an exported tokenizer), then the editor on
    pre-tokenised edits with bf16 compute, its frozen tokenizer the one just trained, exported as a
    model checkpoint that Editor.load reads."""
    from editmgt_jax.editor import Editor
    from editmgt_jax.training.loop import train

    vq = data_config(vq_tiny.get_config(), data, steps=30, batch_size=8)
    vq.train.update(export=True, sample_every=30, num_samples=2, eval_every=30, eval_batches=1,
                    loss_plot=True)
    res = train(vq, str(tmp_path / "vq"), compiler_options=FAST, progress=False)
    l = [res.losses[s] for s in sorted(res.losses)]
    assert np.mean(l[-5:]) < 0.7 * np.mean(l[:5]), l          # measured 0.45
    evals = [json.loads(x) for x in open(tmp_path / "vq" / "metrics.jsonl") if "eval_loss" in x]
    assert len(evals) == 1 and evals[0]["step"] == 30 and np.isfinite(evals[0]["eval_loss"])
    assert os.path.exists(tmp_path / "vq" / "samples" / "step_30.png")
    assert os.path.exists(tmp_path / "vq" / "loss.png")

    ed = data_config(small_editor_config(), data, steps=40, batch_size=8, tokens=True)
    ed.optim.learning_rate = 2e-3
    ed.editor.vq_checkpoint = res.model_dir
    ed.editor.sampler_defaults = dict(steps=5, consolidation_blocks=(0,), hold_threshold=0.25)
    ed.train.update(export=True, sample_every=40, num_samples=2, sample_steps=4, edit_eval_every=40,
                    edit_eval_per_category=1)
    res = train(ed, str(tmp_path / "editor"), compiler_options=FAST, progress=False)
    l = [res.losses[s] for s in sorted(res.losses)]
    # Deterministic given the code; measured 0.74 (last 5 / first 5 steps), the margin absorbs
    # float differences between CPUs.
    assert np.mean(l[-5:]) < 0.85 * np.mean(l[:5]), l
    rows = [json.loads(x) for x in open(tmp_path / "editor" / "metrics.jsonl")]
    edit_evals = [r for r in rows if "eval_clean_success" in r]       # held-out edits
    assert [r["step"] for r in edit_evals] == [40]
    assert 0.0 <= edit_evals[0]["eval_clean_success"] <= edit_evals[0]["eval_inside_success"] <= 1.0
    # The trainer's held-out numbers come from the program users run: the exported model, loaded
    # and driven by Editor.edit on the same items, gives the same numbers and the same tokens.
    from editmgt_jax.training import edit_eval

    items = edit_eval.load_items(ed, 1)
    exported = Editor.load(res.model_dir)
    again = edit_eval.evaluate_editor(exported, items)
    logged = {k[len("eval_"):]: v for k, v in edit_evals[0].items() if k.startswith("eval_")}
    assert set(again) == set(logged)
    for k, v in again.items():
        assert v == pytest.approx(logged[k], nan_ok=True, abs=1e-9), k
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert os.listdir(tmp_path / "editor" / "tensorboard")
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "editor" / "samples" / "step_40.png"))
    assert grid.shape == (2 * RES, 3 * RES, 3)          # source | target | edit, two held-out items
    editor = Editor.load(res.model_dir)
    # the model card: how it was trained and the last held-out evaluation
    card = open(os.path.join(res.model_dir, "README.md")).read()
    assert "task `editor`, 40 steps" in card and "batch 8" in card
    assert f"| eval_clean_success | {edit_evals[0]['eval_clean_success']:.4g} |" in card
    # one conventions record holds the settings; the older top-level fields are no longer written
    assert editor.doc["conventions"]["timestep_convention"] == "mask_fraction"
    assert "sampler_defaults" not in editor.doc and "timestep_convention" not in editor.doc
    assert editor.sampler_config().timestep_convention == "mask_fraction"   # what edits feed
    scfg = editor.sampler_config()                 # the config's recommended settings ship with it
    assert (scfg.steps, scfg.consolidation_blocks, scfg.hold_threshold) == (5, (0,), 0.25)
    assert editor.sampler_config(steps=3).steps == 3
    assert editor.pixel_granularity == 8
    # Rerunning the finished run with a new recommendation re-exports without training.
    ed.editor.sampler_defaults = dict(steps=7, consolidation_blocks=(0,), hold_threshold=0.0)
    again = train(ed, str(tmp_path / "editor"), compiler_options=FAST, progress=False)
    assert again.losses == {}
    scfg = Editor.load(again.model_dir).sampler_config()
    assert (scfg.steps, scfg.hold_threshold) == (7, 0.0)


def test_nonfinite_loss_names_the_step(data, tmp_path):
    from editmgt_jax.training.loop import NonFiniteLossError, train

    c = data_config(vq_tiny.get_config(), data, steps=20, batch_size=4)
    c.optim.update(learning_rate=1e30, grad_clip=0.0, schedule="constant", warmup_steps=0)
    with pytest.raises(NonFiniteLossError) as err:
        train(c, str(tmp_path / "nan"), compiler_options=FAST, progress=False)
    e = err.value
    rows = [json.loads(x) for x in open(tmp_path / "nan" / "metrics.jsonl")]
    first_bad = next(r["step"] for r in rows if not all(np.isfinite(v) for v in r.values()))
    assert e.step == first_bad and 1 < e.step <= 20
    assert f"step {e.step}" in str(e) and f"batch #{e.step - 1}" in str(e)
    assert e.example_ids is not None and len(e.example_ids) == 4
    assert os.path.exists(e.dump)


# ---------------------------------------------------------------------------- when things go wrong


def test_damaged_checkpoint_fallback_export_on_rerun_lock_and_metrics(data, tmp_path, capsys):
    """A run into a locked workdir stops naming the holder; a damaged newest checkpoint is skipped
    (named, kept aside) and the resumed steps repeat the lost ones exactly, each once in
    metrics.jsonl; a run killed after its last checkpoint but before the export exports on rerun."""
    from editmgt_jax import checkpoints
    from editmgt_jax.training.loop import train
    from editmgt_jax.training.workdir import WorkdirBusyError, WorkdirLock

    c = data_config(vq_tiny.get_config(), data, steps=6, batch_size=4)
    c.train.update(checkpoint_every=2, keep_checkpoints=5, export=True)
    wd = tmp_path / "run"
    wd.mkdir()
    with WorkdirLock(str(wd)):
        with pytest.raises(WorkdirBusyError, match=f"is in use by pid {os.getpid()}"):
            train(c, str(wd), compiler_options=FAST, progress=False)
    first = train(c, str(wd), compiler_options=FAST, progress=False)
    assert sorted(first.losses) == [1, 2, 3, 4, 5, 6]
    assert checkpoints.read_config(wd / "model")["training"]["step"] == 6

    # Killed between the last checkpoint and the export: the rerun only exports.
    import shutil

    shutil.rmtree(wd / "model")
    again = train(c, str(wd), compiler_options=FAST, progress=False)
    assert again.losses == {} and again.model_dir and checkpoints.read_config(wd / "model")["training"]["step"] == 6

    # The newest checkpoint damaged: resume from step 4, say so, keep the damaged one aside.
    state_dir = wd / "checkpoints" / "6" / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:40])
    capsys.readouterr()
    resumed = train(c, str(wd), compiler_options=FAST, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint step 6 skipped: it cannot be read back" in err and "resuming from step 4" in err
    assert sorted(resumed.losses) == [5, 6]
    assert [resumed.losses[s] for s in (5, 6)] == [first.losses[s] for s in (5, 6)]   # exact resume
    assert any(p.name.startswith("damaged-6-") for p in (wd / "checkpoints").iterdir())
    rows = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]                          # each step once
    assert [r["loss"] for r in rows][4:] == [first.losses[5], first.losses[6]]


def test_metrics_readers_pass_over_cut_lines_and_keep_the_last_of_a_step(tmp_path):
    from editmgt_jax.training.metrics_log import latest_evaluation, read_losses

    assert read_losses(str(tmp_path)) == {} and latest_evaluation(str(tmp_path)) is None
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n'
        '{"step": 2, "loss": 1.5, "eval_clean_success": 0.1}\n'
        '[1, 2]\n'
        '{"loss": 9.0}\n'
        '{"step": 2, "loss": 1.25}\n'            # step 2 again after a resume: the last one counts
        '{"step": 3, "eval_clean_success": 0.3, "eval_name": "x"}\n'
        '{"step": 4, "loss": 1.')                # cut short by a kill
    assert read_losses(str(tmp_path)) == {1: 2.0, 2: 1.25}
    assert latest_evaluation(str(tmp_path)) == {"step": 3, "metrics": {"eval_clean_success": 0.3}}
