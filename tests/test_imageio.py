"""Reading unusual image files and the resize policy."""

import numpy as np
import pytest
from PIL import Image

from editmgt_jax.imageio import ImageError, fit_to_grid, heatmap_overlay, load_image, target_size


def _save(tmp_path, name, im):
    p = tmp_path / name
    im.save(p)
    return p


def test_modes_become_rgb8(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = load_image(_save(tmp_path, "g.png", Image.fromarray(g, "L")))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], g)
    # 16-bit grayscale is scaled, not clipped.
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    out16 = load_image(_save(tmp_path, "g16.png", Image.fromarray(g16)))
    np.testing.assert_array_equal(out16[..., 1], np.round(g16 * 255.0 / 65535.0).astype(np.uint8))
    # RGBA: transparent pixels become white, opaque keep their colour.
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255
    out_a = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out_a[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out_a[3, 3], [255, 255, 255])


def test_bad_files_name_the_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt"):
        load_image(p)
    good = _save(tmp_path, "x.png", Image.fromarray(np.zeros((32, 32, 3), np.uint8)))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_resize_policies():
    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    assert fit_to_grid(img, 128, 32, "crop").shape == (128, 128, 3)
    assert target_size(300, 500, 128, 32, "fit") == (64, 128)
    assert fit_to_grid(img, 128, 32, "fit").shape == (64, 128, 3)
    # Extreme aspect ratios keep at least one granule per side.
    assert target_size(10, 1000, 128, 32, "fit") == (32, 128)
    with pytest.raises(ValueError, match="multiple"):
        target_size(10, 10, 100, 32)
    with pytest.raises(ValueError, match="policy"):
        target_size(10, 10, 128, 32, "stretch")
    # Centre crop of an already-square image of the right size is the identity.
    sq = img[:128, :128]
    np.testing.assert_array_equal(fit_to_grid(sq, 128, 32, "crop"), sq)


def test_heatmap_overlay_shape_and_ordering():
    img = np.full((16, 16, 3), 128, np.uint8)
    score = np.zeros((4, 4))
    score[0, 0] = 1.0
    out = heatmap_overlay(img, score)
    assert out.shape == (16, 16, 3)
    assert out[0, 0, 0] > out[15, 15, 0]  # hot corner is redder
