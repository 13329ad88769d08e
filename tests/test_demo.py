"""The web demo's handler without the page (editmgt_jax.demo): painted masks, the edit queue's
batching (concurrent requests -> one Editor.edit call, each request's own seed and result), progress
and per-request errors; with the shipped model, a batched request equals its edit alone."""

import os
import threading
import time
import types

import numpy as np
import pytest

from editmgt_jax.demo import EditQueue, EditSettings, consolidation_blocks, mask_from_layers
from editmgt_jax.edit_inputs import EditError, load_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mask_from_painted_layers():
    layer = np.zeros((40, 60, 4), np.uint8)
    layer[10:20, 5:15, 3] = 255                     # painted (alpha) in one layer
    m = mask_from_layers({"background": np.zeros((40, 60, 3), np.uint8), "layers": [layer]}, (40, 60))
    assert m.dtype == bool and m.sum() == 100 and m[10:20, 5:15].all()
    # a canvas of another size is mapped onto the image (nearest)
    m2 = mask_from_layers({"layers": [layer]}, (80, 120))
    assert m2.shape == (80, 120) and m2.sum() == 400 and m2[20:40, 10:30].all()
    # nothing painted, no layers, no editor value: no mask
    assert mask_from_layers({"layers": [np.zeros((40, 60, 4), np.uint8)]}, (40, 60)) is None
    assert mask_from_layers({"background": None, "layers": []}, (40, 60)) is None
    assert mask_from_layers(None, (40, 60)) is None
    assert mask_from_layers(np.pad(np.ones((2, 2)), 1), (4, 4)).sum() == 4


class FakeEditor:
    """What EditQueue uses of an Editor; records its calls and can be held mid-call."""

    default_size = 32
    load_rgb = staticmethod(load_rgb)

    def __init__(self, blocks=(0, 1)):
        self.defaults = {"steps": 3, "guidance_scale": 2.0, "reference_strength": 1.0, "hold_threshold": 0.0,
                         "consolidation_blocks": blocks}
        self.tr_cfg = types.SimpleNamespace(num_blocks=8)
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.progress = None

    def sampler_config(self, **over):
        s = {**self.defaults, **{k: v for k, v in over.items() if v is not None}}
        if s["steps"] < 1:
            raise EditError(f"steps={s['steps']}: must be >= 1")
        return types.SimpleNamespace(**s)

    def edit(self, images, instructions, *, masks=None, seed=0, progress=False, **over):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(dict(n=len(images), instructions=list(instructions), seed=seed, masks=masks, over=over))
        self.progress.start(over["steps"])
        for _ in range(over["steps"]):
            self.progress()
        self.progress.finish()
        if "fail" in instructions[0]:
            raise EditError("the model cannot take this")
        for i, text in enumerate(instructions):
            if "zzz" in text:
                import warnings

                warnings.warn(f"instruction {i}: words outside the model's vocabulary: zzz", UserWarning)
        imgs = [np.asarray(im) + np.uint8(s % 7) for im, s in zip(images, seed)]
        return types.SimpleNamespace(images=imgs, originals=[np.asarray(im) for im in images], heatmaps=None,
                                     region_maps=[np.ones(np.asarray(im).shape[:2], np.float32) for im in images],
                                     placements=[None] * len(images))


def _img(h, w, v=10):
    return np.full((h, w, 3), v, np.uint8)


def test_concurrent_requests_run_as_one_edit_call_with_their_own_seeds():
    ed = FakeEditor()
    q = EditQueue(ed, max_batch_size=4, max_wait_s=0.0)
    ed.gate.clear()                                       # the first request holds the worker ...
    first = q.submit(_img(20, 30), "make it red", seed=5)
    assert ed.entered.wait(10)
    rest = [q.submit(_img(20 + i, 30), f"edit {i}" + (" zzz" if i == 1 else ""), seed=i)
            for i in range(3)]                                    # ... while these queue
    time.sleep(0.05)
    assert all(t.status == (0.0, "queued") for t in rest)
    ed.gate.set()
    outs = [t.future.result(10) for t in [first] + rest]
    q.close()
    assert q.batches == [1, 3] and q.calls == 2
    assert ed.calls[1]["n"] == 3 and ed.calls[1]["seed"] == [0, 1, 2]
    assert ed.calls[1]["instructions"] == ["edit 0", "edit 1 zzz", "edit 2"]
    assert [o.notes for o in outs[1:]] == [[], ["words outside the model's vocabulary: zzz"], []]
    for i, o in enumerate(outs[1:]):
        assert o.image.shape == (20 + i, 30, 3) and o.batch_size == 3
        assert int(o.image[0, 0, 0]) == 10 + i           # its own seed
        before, after = o.before_after
        assert before.shape == after.shape == o.region_overlay.shape
    assert all(t.status == (1.0, "done") for t in rest)
    # the edit-region map is requested with the checkpoint's consolidation blocks
    assert ed.calls[0]["over"]["consolidation_blocks"] == (0, 1)


def test_different_settings_and_masks_split_the_batch_and_errors_stay_with_their_request():
    ed = FakeEditor()
    q = EditQueue(ed, max_batch_size=8, max_wait_s=0.0)
    d = q.default_settings()
    assert d == EditSettings(steps=3, guidance_scale=2.0, reference_strength=1.0, hold_threshold=0.0)
    four = EditSettings(4, 2.0, 1.0, 0.0)
    tickets = [
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "a", None, d, 0)),
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "b", np.ones((8, 8), bool), d, 1)),
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "c", None, four, 2)),
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "fail here", None, EditSettings(5, 2.0, 1.0, 0.0), 3)),
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "d", None, d, 4)),
        types.SimpleNamespace(t=q._ticket(_img(8, 8), "bad steps", None, EditSettings(0, 2.0, 1.0, 0.0), 5)),
    ]
    q.run_batch([x.t for x in tickets])
    q.close()
    assert q.batches == [6]
    calls = {tuple(c["instructions"]): c for c in ed.calls}
    assert set(calls) == {("a", "d"), ("b",), ("c",), ("fail here",)}   # the bad settings never reach edit
    assert calls[("b",)]["masks"] is not None and calls[("a", "d")]["masks"] is None
    assert calls[("c",)]["over"]["steps"] == 4
    assert tickets[0].t.future.result().batch_size == 6
    with pytest.raises(EditError, match="cannot take this"):
        tickets[3].t.future.result()
    with pytest.raises(EditError, match="steps=0"):
        tickets[5].t.future.result()
    assert tickets[4].t.future.result().image is not None


def test_bad_requests_are_refused_at_submit():
    q = EditQueue(FakeEditor(), max_batch_size=2)
    with pytest.raises(EditError, match="empty instruction"):
        q.submit(_img(8, 8), "   ")
    with pytest.raises(EditError, match="no image"):
        q.submit(None, "make it red")
    with pytest.raises(EditError, match="expected"):
        q.submit(np.zeros((4, 4, 7), np.uint8), "make it red")
    q.close()
    with pytest.raises(ValueError, match="max_batch_size"):
        EditQueue(FakeEditor(), max_batch_size=0)


def test_consolidation_blocks_default_to_the_last_quarter():
    assert consolidation_blocks(FakeEditor(blocks=())) == (6, 7)
    assert consolidation_blocks(FakeEditor(blocks=(1,))) == (1,)


def test_with_the_shipped_model_a_batched_request_is_its_edit_alone():
    from PIL import Image

    from editmgt_jax.editor import Editor

    ed = Editor.load()
    q = EditQueue(ed, max_batch_size=3, max_wait_s=5.0)
    src = np.asarray(Image.open(os.path.join(REPO, "examples", "shapes.png")).convert("RGB"))
    wide = np.ascontiguousarray(src[:, :96])                       # another size in the same batch
    instr = ["paint the orange circle at the top cyan", "make the background blue", "remove the circle"]
    tickets = [q.submit(src, instr[0], seed=3), q.submit(wide, instr[1], seed=4), q.submit(src, instr[2], seed=5)]
    outs = [t.future.result(900) for t in tickets]
    q.close()
    assert q.batches == [3] and q.calls == 1 and all(o.batch_size == 3 for o in outs)
    assert outs[0].image.shape == src.shape and outs[1].image.shape == wide.shape
    blocks = consolidation_blocks(ed)
    for o, im, text, seed in zip(outs, [src, wide, src], instr, [3, 4, 5]):
        alone = ed.edit([im], [text], seed=seed, consolidation_blocks=blocks)
        np.testing.assert_array_equal(o.image, alone.images[0])
        assert o.region_overlay.shape == im.shape
    assert not np.array_equal(outs[0].image, src)                   # it edited something


def test_the_page_starts_at_the_checkpoint_s_settings():
    pytest.importorskip("gradio", reason="gradio not installed (pip install -e .[demo])")
    from infer.app import build_app

    ed = FakeEditor()
    ed.path, ed.defaults["steps"], ed.defaults["guidance_scale"] = "fake", 12, 6.0
    q = EditQueue(ed)
    try:
        app = build_app(q)
        by_id = {getattr(b, "elem_id", None): b for b in app.blocks.values()}
        assert by_id["steps"].value == 12 and by_id["guidance"].value == 6.0
        assert by_id["strength"].value == 1.0 and by_id["hold"].value == 0.0 and by_id["seed"].value == 0
        assert not by_id["query"].visible            # this editor takes no word query
        assert {"image", "instruction", "mask", "edit", "edited", "before-after", "overlay"} <= set(by_id)
    finally:
        q.close()
