"""The training loop's parts: periodic hooks with their own periods, the typed frozen-encoder record,
and a loop that leaves what differs by task to the task (the full runs: tests/test_train_loop.py)."""

import ast
import pathlib

import numpy as np

from editmgt_jax.training.hooks import Hook
from editmgt_jax.training.tasks import EditorTask, FrozenEncoders, FrozenModule, VQTask

REPO = pathlib.Path(__file__).parent.parent


def _never(*a):
    raise AssertionError("not run by due()")


def test_each_hook_is_due_on_its_own_period():
    steps = range(1, 13)
    ckpt = Hook("checkpoint", 5, _never, at_end=True)
    ev = Hook("eval", 4, _never)
    off = Hook("edit_eval", 0, _never, at_end=True)
    samples = Hook("samples", 6, _never, at_end=True, single_process=True)
    assert [s for s in steps if ckpt.due(s, 12, 1)] == [5, 10, 12]
    assert [s for s in steps if ev.due(s, 12, 1)] == [4, 8, 12]          # no extra run at the end
    assert [s for s in range(1, 12) if ev.due(s, 11, 1)] == [4, 8]
    assert [s for s in range(1, 12) if ckpt.due(s, 11, 1)] == [5, 10, 11]
    assert not any(off.due(s, 12, 1) for s in steps)                       # 0 = never, not even at the end
    assert [s for s in steps if samples.due(s, 12, 1)] == [6, 12]
    assert not any(samples.due(s, 12, 2) for s in steps)                   # single-process work on a pod


def test_the_frozen_record_gives_the_step_its_programs_and_arrays():
    vq = FrozenModule(program="vq program", arrays=("vq params", "vq rest"))
    text = FrozenModule(program="text program", arrays=("text params", {}))
    uncond = (np.zeros((1, 3, 4), np.float32), np.zeros((1, 2), np.float32))
    frozen = FrozenEncoders(vq=vq, vq_config={"num_vq_embeddings": 8}, text=text, text_checkpoint="ckpt",
                            uncond=uncond)
    assert frozen.programs() == {"text": "text program", "vq": "vq program"}
    arrays = frozen.step_arrays()
    assert set(arrays) == {"text", "vq", "uncond"} and arrays["vq"] == ("vq params", "vq rest")
    assert arrays["uncond"] is uncond
    # pre-tokenised data without a tokenizer, no dropout: nothing frozen
    assert FrozenEncoders().programs() == {} and FrozenEncoders().step_arrays() == {}
    assert FrozenEncoders(uncond=uncond).step_arrays() == {"uncond": uncond}


def test_the_step_inputs_are_the_rest_and_the_frozen_arrays():
    vq = FrozenModule(program="p", arrays=("params", "rest"))
    task = EditorTask(config=None, program=None, tokenizer=None, frozen=FrozenEncoders(vq=vq))
    task.rest = {"rng": 1}
    assert task.step_inputs() == {"rest": {"rng": 1}, "frozen": {"vq": ("params", "rest")}}
    assert VQTask(None, None, None, FrozenEncoders()).periodic() == []


def test_the_loop_does_not_branch_on_the_task():
    """What differs by task lives in editmgt_jax.training.tasks; the loop only names the task in
    its plots' titles and the export's metadata."""
    tree = ast.parse((REPO / "editmgt_jax" / "training" / "loop.py").read_text())
    loop = [n for n in tree.body if getattr(n, "name", None) in ("_train", "StepRunner", "StepRecorder")]
    assert len(loop) == 3
    compares = [ast.unparse(c) for n in loop for c in ast.walk(n) if isinstance(c, (ast.Compare, ast.Subscript))]
    assert not [c for c in compares if "task" in c or "frozen" in c], compares
