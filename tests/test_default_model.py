"""The shipped default model (editmgt_jax/assets/editmgt-synthetic-64): it loads with no path, its
default settings use region hold driven by EditMGT's own consolidated attention, that map finds the
edited objects on held-out edits (AUROC), its edits are clean (inside the edit closer to the target,
the rest of the picture kept) well above the previous models' rate, its weights predict held-out target
tokens far above chance, and the README's main command runs at the input's size and keeps the picture
outside the edit.

The quality targets it misses (clean success 80%, leakage 35 dB) are reported in the README from
`python -m infer.evaluate`, not asserted here."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from editmgt_jax.data.synthetic_edits import generate_example
from editmgt_jax.editor import DEFAULT_CHECKPOINT, Editor
from editmgt_jax.evaluation import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 14                  # two held-out edits of each of the seven categories


@pytest.fixture(scope="module")
def editor():
    return Editor.load()


@pytest.fixture(scope="module")
def items():
    return [generate_example(i, split="test", resolution=128, seed=0) for i in range(N)]


def test_the_shipped_model_is_the_default_and_small(editor):
    assert os.path.isfile(os.path.join(DEFAULT_CHECKPOINT, "config.json"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEFAULT_CHECKPOINT) for f in fs)
    assert size < 30 * 2 ** 20, size
    assert editor.default_size == 64 and editor.pixel_granularity == 8   # 4 px tokens, 2x2-pooled grid
    assert editor.sampler_config().timestep_convention == "mask_fraction"


# A fixed held-out subset: the first 42 edits of the test split (six of each category).
N_SUBSET = 42
# Measured with the shipped weights and defaults (README, Evaluation): clean success 0.190 (8 of 42),
# map AUROC 0.894, median leakage 24.3 dB outside the edit. The previous default model (three-stage
# recipe, 16x16 grid) with its own defaults: clean success 0.095 (4 of 42), median leakage 16.7 dB;
# the model before it (no region loss, no hold): map AUROC 0.45, median leakage 14.1 dB.
CLEAN_SUCCESS_FLOOR = 0.16      # 7 of 42
MAP_AUROC_FLOOR = 0.85
LEAK_FLOOR_DB = 21.0


@pytest.mark.slow
def test_region_map_finds_the_edit_and_hold_keeps_the_picture(editor):
    """The default settings hold the edit to the consolidated map's region; the map ranks the edited
    pixels above the rest (AUROC), the picture outside the edit stays closer to the source than the
    previous models' edits did, and the share of clean edits is above a floor both previous models
    fail."""
    scfg = editor.sampler_config()
    assert scfg.holds and scfg.hold_threshold > 0 and scfg.consolidation_blocks
    examples = [generate_example(i, split="test", resolution=128, seed=0) for i in range(N_SUBSET)]
    res = editor.edit([e["source_image"] for e in examples], [e["instruction"] for e in examples], seed=0)
    aurocs, leaks, clean = [], [], []
    for e, out, heat in zip(examples, res.images, res.heatmaps):
        mask = np.asarray(e["edit_mask"]) > 0
        c = metrics.clean_edit_success(out, e["target_image"], e["source_image"], mask)["clean"]
        if c is not None:
            clean.append(c)
        m = metrics.map_metrics(heat, mask, threshold=0.5)
        if m["auroc"] is not None:
            aurocs.append(m["auroc"])
        leak = metrics.psnr(out, e["source_image"], region=~mask)
        if leak is not None:
            leaks.append(leak)
    assert np.mean(aurocs) >= MAP_AUROC_FLOOR, np.mean(aurocs)
    assert np.median(leaks) >= LEAK_FLOOR_DB, np.median(leaks)
    assert len(clean) == N_SUBSET and np.mean(clean) >= CLEAN_SUCCESS_FLOOR, (np.mean(clean), len(clean))


def test_predicts_held_out_target_tokens(editor, items):
    """Half of each held-out target's tokens masked: the transformer, given the source tokens and the
    instruction, gets many of them right (chance: 1/1000)."""
    vq = nnx.merge(editor.graphdefs["vq"], editor.states["vq"])
    tr = nnx.merge(editor.graphdefs["transformer"], editor.states["transformer"])
    src = np.stack([editor.prepare(e["source_image"]) for e in items]).astype(np.float32) / 255.0
    tgt = np.stack([editor.prepare(e["target_image"]) for e in items]).astype(np.float32) / 255.0
    # each call compiled whole (op by op, every small operation of the models compiles on its own)
    encode_ids = nnx.jit(lambda m, x: m.encode_ids(x))
    forward = nnx.jit(lambda m, *args: m(*args))
    src_ids, tgt_ids = encode_ids(vq, jnp.asarray(src)), encode_ids(vq, jnp.asarray(tgt))
    k = tr.cfg.codebook_size
    masked = np.random.default_rng(0).random(tgt_ids.shape) < 0.5
    ids = jnp.where(masked, k, tgt_ids)
    states, pooled = editor.text.encode([e["instruction"] for e in items])
    micro = jnp.tile(jnp.asarray([[64.0, 64.0, 0.0, 0.0, 6.0]]), (N, 1))
    t = jnp.mean(ids == k, axis=(1, 2)).astype(jnp.float32)
    logits, _ = forward(tr, ids, src_ids, jnp.asarray(states), jnp.asarray(pooled), micro, t)
    pred = np.asarray(jnp.argmax(logits, -1))
    acc = float(np.mean(pred[masked] == np.asarray(tgt_ids)[masked]))
    assert acc > 0.15, acc
    # the source tokens help (measured 0.385 with the reference stream vs 0.354 without: the model
    # has learned to use the source only a little; README, Evaluation)
    logits_noref, _ = forward(tr, ids, None, jnp.asarray(states), jnp.asarray(pooled), micro, t)
    acc_noref = float(np.mean(np.asarray(jnp.argmax(logits_noref, -1))[masked] == np.asarray(tgt_ids)[masked]))
    assert acc > acc_noref + 0.01, (acc, acc_noref)


def test_readme_main_command(tmp_path, cli):
    out = tmp_path / "edited.png"
    proc = cli("infer.edit", "--image", os.path.join(REPO, "examples", "shapes.png"),
               "--instruction", "paint the orange circle at the top cyan", "--save-heatmap", "--out", out)
    assert proc.returncode == 0, proc.stderr
    # the input's own size (the model works at 64 px)
    assert Image.open(out).size == Image.open(os.path.join(REPO, "examples", "shapes.png")).size == (128, 128)
    assert Image.open(tmp_path / "edited_heatmap.png").size == (128, 128)
    # the picture outside the circle is kept: measured 55.7 dB against the source (the previous model:
    # 15.0 dB, all three shapes repainted). The circle itself is not recoloured: the model paints it
    # over with the background (README, Evaluation), so inside success is not asserted.
    example = generate_example(9, split="test", resolution=128, seed=0)
    assert example["instruction"] == "paint the orange circle at the top cyan"
    edited = np.asarray(Image.open(out).convert("RGB"))
    mask = np.asarray(example["edit_mask"]) > 0
    assert metrics.psnr(edited, example["source_image"], region=~mask) >= 30.0
