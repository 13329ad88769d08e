"""The edit comes back at the input's own size, with every pixel outside the region map the source's.

Unit checks of ``editmgt_jax.composite`` (placement, token masks, the feathered map, the strip-wise
blend), then the shipped default model on non-square inputs through ``Editor.edit`` and the CLI."""


import os

import numpy as np
import pytest
from PIL import Image

from editmgt_jax import composite
from editmgt_jax.editor import EditError, Editor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "examples", "shapes.png")
TEXT = "paint the orange circle at the top cyan"


# ----------------------------------------------------------------------------- the module
def test_placement_follows_the_resize_policies():
    fit = composite.placement(400, 600, 64, 4, "fit")
    assert fit.work_hw == (44, 64) and fit.box == (0.0, 0.0, 600.0, 400.0) and fit.pixel_range == (0, 400, 0, 600)
    crop = composite.placement(400, 600, 64, 4, "crop")
    assert crop.work_hw == (64, 64) and crop.box == (100.0, 0.0, 500.0, 400.0)
    assert composite.placement(1200, 900, 1024, 32, "fit").work_hw == (1024, 768)   # the release grid


def test_token_masks():
    tok = np.zeros((5, 6), np.int32)
    src = tok.copy()
    tok[2, 3] = 7
    m = composite.changed_tokens(tok, src)
    assert m.sum() == 9 and m[1:4, 2:5].all()                   # one token, dilated to 3x3
    assert not composite.changed_tokens(src, src).any()
    heat = np.zeros((2, 3), np.float32)
    heat[1, 2] = 0.9                                             # half-resolution map: covers ids 2..3 x 4..5
    hm = composite.map_tokens(heat, (4, 6), threshold=0.5, dilation=0)
    assert hm.sum() == 4 and hm[2:, 4:].all()


def test_changed_pixels_takes_only_the_pixels_whose_decode_moved():
    """A hand-made 4x4-token grid of 4 px tokens: one token changed; its decode moved on a 3x3 pixel
    patch, the neighbouring token's decode by a little (reconstruction noise) and, far away, a lot
    (outside the dilated token, so not taken)."""
    src_tok = np.zeros((4, 4), np.int32)
    tok = src_tok.copy()
    tok[1, 1] = 7
    src_raw = np.full((16, 16, 3), 100, np.uint8)
    raw = src_raw.copy()
    raw[5:8, 5:8] = [200, 100, 100]          # the edit, inside token (1, 1)
    raw[4:12, 9] = 110                        # neighbour token (1, 2)/(2, 2): 10/255 < 0.15, kept
    raw[14, 14] = 250                         # token (3, 3): outside the dilated change, kept
    got = composite.changed_pixels(tok, src_tok, raw, src_raw)
    want = np.zeros((16, 16), bool)
    want[5:8, 5:8] = True
    np.testing.assert_array_equal(got, want)
    # a larger move of the neighbour counts (it is within one token of the change)
    raw[4:12, 9] = 160
    got = composite.changed_pixels(tok, src_tok, raw, src_raw)
    assert got[4:12, 9].all() and got.sum() == 9 + 8
    with pytest.raises(ValueError, match="token grid"):
        composite.changed_pixels(tok, src_tok, raw[:15], src_raw[:15])


def test_region_map_is_feathered_around_the_dilated_tokens():
    pl = composite.placement(400, 600, 64, 4, "fit")            # 11x16 ids, a token is ~36x37.5 px
    mask = np.zeros((11, 16), bool)
    mask[3:6, 4:7] = True
    feather = 8.0
    m = composite.region_map(mask, pl, feather)
    assert m.shape == (400, 600) and m.dtype == np.float32 and m.min() == 0.0 and m.max() == 1.0
    y0, y1 = 3 * 400 / 11, 6 * 400 / 11
    x0, x1 = 4 * 600 / 16, 7 * 600 / 16
    yy, xx = np.mgrid[:400, :600] + 0.5
    inner = (yy > y0 + feather / 2) & (yy < y1 - feather / 2) & (xx > x0 + feather / 2) & (xx < x1 - feather / 2)
    outer = (yy < y0 - feather / 2) | (yy > y1 + feather / 2) | (xx < x0 - feather / 2) | (xx > x1 + feather / 2)
    assert (m[inner] == 1.0).all() and (m[outer] == 0.0).all()
    ramp = m[int(y0 + y1) // 2, int(x0 - feather / 2):int(x0 + feather / 2) + 1]
    assert np.all(np.diff(ramp) > 0)                            # a monotone seam, not a step


def test_blend_keeps_the_source_exactly_outside_and_is_strip_invariant(monkeypatch):
    rng = np.random.default_rng(0)
    pl = composite.placement(400, 600, 64, 4, "fit")
    raw = rng.integers(0, 256, (44, 64, 3), np.uint8)
    original = rng.integers(0, 256, (400, 600, 3), np.uint8)
    mask = np.zeros((11, 16), bool)
    mask[2:5, 10:14] = True
    m = composite.region_map(mask, pl)
    out = composite.blend(original, raw, m, pl)
    up = composite.upsample(raw, pl)
    assert out.shape == (400, 600, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[m == 0], original[m == 0])
    np.testing.assert_array_equal(out[m == 1], up[m == 1])
    mid = (m > 0) & (m < 1)
    lo = np.minimum(original, up)[mid].astype(int)
    hi = np.maximum(original, up)[mid].astype(int)
    assert mid.any() and np.all((out[mid] >= lo) & (out[mid] <= hi))
    # The bicubic upsampling is the one of a whole-image resize (up to float rounding).
    whole = np.stack([np.asarray(Image.fromarray(raw[..., c].astype(np.float32), "F").resize((600, 400), Image.BICUBIC))
                      for c in range(3)], -1)
    assert np.abs(up.astype(float) - np.clip(whole, 0, 255)).max() <= 0.5 + 1e-3
    # Large photos go strip by strip: small strips give the same map and the same exactness.
    monkeypatch.setattr(composite, "STRIP_PIXELS", 600 * 7)
    m_small = composite.region_map(mask, pl)
    np.testing.assert_allclose(m_small, m, rtol=0, atol=1e-6)      # float32 rounding of the ramps only
    np.testing.assert_array_equal(m_small == 0, m == 0)
    np.testing.assert_array_equal(m_small == 1, m == 1)
    out_small = composite.blend(original, raw, m_small, pl)
    np.testing.assert_array_equal(out_small[m == 0], original[m == 0])
    np.testing.assert_array_equal(out_small[m == 1], composite.upsample(raw, pl)[m == 1])
    assert np.abs(out_small.astype(int) - out.astype(int)).max() <= 1


def test_crop_policy_keeps_everything_outside_the_crop_box():
    pl = composite.placement(400, 600, 64, 4, "crop")
    m = composite.region_map(np.ones((16, 16), bool), pl)
    assert (m[:, :100] == 0).all() and (m[:, 500:] == 0).all() and (m[:, 100:500] == 1).all()
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (400, 600, 3), np.uint8)
    out = composite.blend(original, rng.integers(0, 256, (64, 64, 3), np.uint8), m, pl)
    np.testing.assert_array_equal(out[:, :100], original[:, :100])


# ----------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def editor():
    return Editor.load()


@pytest.fixture(scope="module")
def wide():
    """A 600x400 photo-sized, non-square input of the synthetic world."""
    return np.asarray(Image.open(SHAPES).convert("RGB").resize((600, 400), Image.BICUBIC))


@pytest.fixture(scope="module")
def mixed(editor, wide):
    """One call, two sizes (600x400 and 128x128): two working shapes, two compiled programs.
    Region hold off, so tokens change and the region map is not empty; an inpainting mask over the
    left part keeps the right part's tokens the source's, so the map is not full either. The
    'changed' composite (the shipped model recommends 'pixels', tested below)."""
    return editor.edit([wide, SHAPES], [TEXT, TEXT], hold_threshold=0.0, seed=1, composite="changed",
                       masks=[_left_part(wide.shape), _left_part((128, 128))])


def _left_part(shape):
    """``[H, W] bool``: True (may change) on the left 40% of the columns."""
    m = np.zeros(shape[:2], bool)
    m[:, : int(0.4 * shape[1])] = True
    return m


def test_output_has_the_input_size_and_the_source_outside_the_map(editor, wide, mixed):
    assert isinstance(mixed.images, list)                       # different sizes: per-image arrays
    assert [im.shape for im in mixed.images] == [(400, 600, 3), (128, 128, 3)]
    assert [r.shape for r in mixed.raw_images] == [(40, 64, 3), (64, 64, 3)]
    assert [r.shape for r in mixed.region_maps] == [(400, 600), (128, 128)]
    for i in range(2):
        img, m, pl = mixed.images[i], mixed.region_maps[i], mixed.placements[i]
        original = mixed.originals[i]
        assert m.dtype == np.float32 and m.min() == 0.0 and m.max() == 1.0
        np.testing.assert_array_equal(img[m == 0], original[m == 0])
        np.testing.assert_array_equal(img[m == 1], composite.upsample(mixed.raw_images[i], pl)[m == 1])
        # the map is the changed tokens, dilated by one, brought to the input's size
        expect = composite.region_map(composite.changed_tokens(mixed.tokens[i], mixed.source_tokens[i]), pl)
        np.testing.assert_array_equal(m, expect)
    np.testing.assert_array_equal(mixed.originals[0], wide)
    # an image of a mixed batch gets what it gets alone (its own PRNG stream, its own program)
    alone = editor.edit(wide, TEXT, hold_threshold=0.0, seed=1, composite="changed", masks=[_left_part(wide.shape)])
    np.testing.assert_array_equal(alone.tokens[0], mixed.tokens[0])
    np.testing.assert_array_equal(alone.images[0], mixed.images[0])


def test_modes_none_and_map(editor, wide, mixed):
    raw = editor.edit(wide, TEXT, hold_threshold=0.0, seed=1, composite="none", masks=[_left_part(wide.shape)])
    assert raw.images.shape == (1, 40, 64, 3) and raw.region_maps is None
    np.testing.assert_array_equal(raw.images[0], mixed.raw_images[0])
    by_map = editor.edit(wide, TEXT, hold_threshold=0.0, seed=1, composite="map")
    cfg = editor.sampler_config()
    tok = composite.map_tokens(by_map.heatmaps[0], by_map.tokens[0].shape, 0.5)
    np.testing.assert_array_equal(by_map.region_maps[0], composite.region_map(tok, by_map.placements[0]))
    m = by_map.region_maps[0]
    np.testing.assert_array_equal(by_map.images[0][m == 0], wide[m == 0])
    assert cfg.captures
    # 'pixels': the changed tokens' pixels whose decode moved from the source's decode
    by_px = editor.edit(wide, TEXT, hold_threshold=0.0, seed=1, composite="pixels")
    np.testing.assert_array_equal(by_px.tokens, by_map.tokens)
    rec = editor.reconstruct(wide)[0]
    px = composite.changed_pixels(by_px.tokens[0], by_px.source_tokens[0], by_px.raw_images[0], rec)
    np.testing.assert_array_equal(by_px.region_maps[0], composite.region_map(px, by_px.placements[0]))
    m = by_px.region_maps[0]
    np.testing.assert_array_equal(by_px.images[0][m == 0], wide[m == 0])
    with pytest.raises(EditError, match="composite="):
        editor.edit(wide, TEXT, composite="everything")
    with pytest.raises(EditError, match="consolidation_blocks"):
        editor.edit(wide, TEXT, composite="map", consolidation_blocks=(), hold_threshold=0.0)


def test_cli_no_composite_writes_the_raw_output(tmp_path, wide, cli):
    """The composited CLI output at the input's size: test_default_model's README command."""
    src = tmp_path / "wide.png"
    Image.fromarray(wide).save(src)
    raw = tmp_path / "raw.png"
    proc = cli("infer.edit", "--image", src, "--instruction", TEXT, "--no-composite", "--save-heatmap", "--out", raw)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(raw).size == (64, 40)                                  # the working size
    assert Image.open(tmp_path / "raw_heatmap.png").size == (600, 400)      # over the input
