"""The shipped default model (checkpoints/editmgt-synthetic-64): it loads with no path, its held-out
edits succeed at a rate the previous models (0 of 28, then 5 of 28) fail, its weights predict held-out
target tokens far above chance, region hold keeps the image outside the edit region near the VQ
reconstruction ceiling (and better than without hold), and the README's main command runs and
recolours the circle it names.

The quality targets it misses (edit success 70%, colour 85%, edit-region IoU 0.5, leakage 35 dB with
its default settings) are reported in the README from `python -m infer.evaluate`, not asserted here."""

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
LOCAL = ("add", "remove", "replace", "color", "motion change")   # edits with a small mask


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
    assert editor.default_size == 64 and editor.pixel_granularity == 4
    assert editor.sampler_config().timestep_convention == "mask_fraction"


# Held-out edits judged by edit success (editmgt_jax.evaluation.metrics.edit_success): colour edits
# and a mix of the other six categories (categories cycle with the index in synthetic_edits).
N_COLOR, N_MIXED = 14, 14
# The previous default models: 0 of 42 (21 + 21 of the same kind, these included), then 5 of these
# 28 (1 colour, 4 mixed). Measured with the shipped weights and defaults: see the assertion's note.
SUCCESS_OVERALL = 0.4
SUCCESS_COLOR = 0.5


def _subset():
    from editmgt_jax.data.crispedit import EDIT_CATEGORIES

    color = EDIT_CATEGORIES.index("color")
    n = len(EDIT_CATEGORIES)
    col = [color + n * k for k in range(N_COLOR)]
    mixed = [i for i in range(n * N_MIXED) if i % n != color][:N_MIXED]
    return col, mixed


@pytest.mark.slow
def test_held_out_edits_succeed(editor):
    """Some edits happen: inside the ground-truth region the output is closer to the target than half
    the source's distance (the model shipped before this one, which returned its VQ reconstruction
    of the source, scores 0)."""
    col, mixed = _subset()
    examples = [generate_example(i, split="test", resolution=128, seed=0) for i in col + mixed]
    res = editor.edit([e["source_image"] for e in examples], [e["instruction"] for e in examples], seed=0)
    ok = []
    for e, out in zip(examples, res.images):
        size = out.shape[:2]
        tgt = np.asarray(Image.fromarray(e["target_image"]).resize(size[::-1], Image.BILINEAR))
        src = np.asarray(Image.fromarray(e["source_image"]).resize(size[::-1], Image.BILINEAR))
        mask = np.asarray(Image.fromarray(e["edit_mask"].astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 127
        ok.append(metrics.edit_success(out, tgt, src, mask))
    color_rate = float(np.mean([v for v in ok[:len(col)] if v is not None]))
    mixed_rate = float(np.mean([v for v in ok[len(col):] if v is not None]))
    overall = float(np.mean([v for v in ok if v is not None]))
    assert overall >= SUCCESS_OVERALL, (overall, color_rate, mixed_rate)
    assert color_rate >= SUCCESS_COLOR, (overall, color_rate, mixed_rate)


def test_predicts_held_out_target_tokens(editor, items):
    """Half of each held-out target's tokens masked: the transformer, given the source tokens and the
    instruction, gets many of them right (chance: 1/1000)."""
    vq = nnx.merge(editor.graphdefs["vq"], editor.states["vq"])
    tr = nnx.merge(editor.graphdefs["transformer"], editor.states["transformer"])
    src = np.stack([editor.prepare(e["source_image"]) for e in items]).astype(np.float32) / 255.0
    tgt = np.stack([editor.prepare(e["target_image"]) for e in items]).astype(np.float32) / 255.0
    src_ids, tgt_ids = vq.encode_ids(jnp.asarray(src)), vq.encode_ids(jnp.asarray(tgt))
    k = tr.cfg.codebook_size
    masked = np.random.default_rng(0).random(tgt_ids.shape) < 0.5
    ids = jnp.where(masked, k, tgt_ids)
    states, pooled = editor.text.encode([e["instruction"] for e in items])
    micro = jnp.tile(jnp.asarray([[64.0, 64.0, 0.0, 0.0, 6.0]]), (N, 1))
    t = jnp.mean(ids == k, axis=(1, 2)).astype(jnp.float32)
    logits, _ = tr(ids, src_ids, jnp.asarray(states), jnp.asarray(pooled), micro, t)
    pred = np.asarray(jnp.argmax(logits, -1))
    acc = float(np.mean(pred[masked] == np.asarray(tgt_ids)[masked]))
    assert acc > 0.15, acc
    # the source tokens help (measured 0.385 with the reference stream vs 0.354 without: the model
    # has learned to use the source only a little; README, Evaluation)
    logits_noref, _ = tr(ids, None, jnp.asarray(states), jnp.asarray(pooled), micro, t)
    acc_noref = float(np.mean(np.asarray(jnp.argmax(logits_noref, -1))[masked] == np.asarray(tgt_ids)[masked]))
    assert acc > acc_noref + 0.01, (acc, acc_noref)


def test_region_hold_keeps_the_rest_of_the_image(editor, items):
    local = [e for e in items if e["category"] in LOCAL]
    sources = [e["source_image"] for e in local]
    texts = [e["instruction"] for e in local]
    held = editor.edit(sources, texts, seed=0, hold_threshold=0.3)    # region hold on
    free = editor.edit(sources, texts, seed=0)                        # the model's defaults: no hold
    recon = editor.reconstruct(list(held.sources))
    size = held.raw_images.shape[1]
    outside = [np.asarray(Image.fromarray(e["edit_mask"]).resize((size, size), Image.NEAREST)) <= 127
               for e in local]

    def leak(images):
        return np.mean([metrics.psnr(images[i], held.sources[i], region=outside[i]) for i in range(len(local))])

    ceiling, with_hold, without = leak(recon), leak(held.raw_images), leak(free.raw_images)
    # measured: 20.1 dB with hold at lambda 0.3, 24.0 dB ceiling (the model's attention map finds the
    # edit only roughly, README ablation "hold=on"), far above the ~15 dB without hold
    assert with_hold > ceiling - 5.0, (with_hold, ceiling)
    assert with_hold > without + 0.5, (with_hold, without)


def test_readme_main_command(tmp_path, cli):
    out = tmp_path / "edited.png"
    proc = cli("infer.edit", "--image", os.path.join(REPO, "examples", "shapes.png"),
               "--instruction", "paint the orange circle at the top cyan", "--save-heatmap", "--out", out)
    assert proc.returncode == 0, proc.stderr
    # the input's own size (the model works at 64 px)
    assert Image.open(out).size == Image.open(os.path.join(REPO, "examples", "shapes.png")).size == (128, 128)
    assert Image.open(tmp_path / "edited_heatmap.png").size == (128, 128)
    # the edit: the orange circle comes back cyan (edit success against the held-out target)
    example = generate_example(9, split="test", resolution=128, seed=0)
    assert example["instruction"] == "paint the orange circle at the top cyan"
    edited = np.asarray(Image.open(out).convert("RGB"))
    assert metrics.edit_success(edited, example["target_image"], example["source_image"],
                                np.asarray(example["edit_mask"]) > 0)
