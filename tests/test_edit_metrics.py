"""Edit success and changed-token accuracy on hand-made cases."""

import numpy as np
import pytest

from editmgt_jax.evaluation import metrics


def test_edit_success_on_known_cases():
    src = np.zeros((8, 8, 3), np.uint8)
    tgt = src.copy()
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    tgt[mask] = (200, 0, 0)
    # Returning the source fails by construction; returning the target succeeds.
    assert metrics.edit_success(src, tgt, src, mask) is False
    assert metrics.edit_success(tgt, tgt, src, mask) is True
    # Distances are mean Euclidean RGB inside the mask: halfway (100 of 200) is not below half.
    half = src.copy()
    half[mask] = (100, 0, 0)
    assert metrics.edit_distances(half, tgt, src, mask) == pytest.approx((100.0, 200.0))
    assert metrics.edit_success(half, tgt, src, mask) is False
    near = src.copy()
    near[mask] = (120, 60, 0)   # distance sqrt(80^2 + 60^2) = 100: still not below half
    assert metrics.edit_success(near, tgt, src, mask) is False
    near[mask] = (130, 0, 0)    # 70 < 100
    assert metrics.edit_success(near, tgt, src, mask) is True
    # Pixels outside the mask do not count.
    noisy = tgt.copy()
    noisy[~mask] = 255
    assert metrics.edit_success(noisy, tgt, src, mask) is True
    # Undefined: empty mask, or nothing to change inside it.
    assert metrics.edit_success(tgt, tgt, src, np.zeros((8, 8), bool)) is None
    assert metrics.edit_success(src, src, src, mask) is None


def test_changed_token_accuracy():
    src = np.array([[1, 2, 3, 4]])
    tgt = np.array([[1, 5, 6, 4]])
    assert metrics.changed_token_accuracy(src, tgt, src) == 0.0        # copying the source
    assert metrics.changed_token_accuracy(tgt, tgt, src) == 1.0
    assert metrics.changed_token_accuracy(np.array([[9, 5, 3, 9]]), tgt, src) == 0.5  # unchanged positions ignored
    assert metrics.changed_token_counts(np.array([[9, 5, 3, 9]]), tgt, src) == (1, 2)
    assert metrics.changed_token_accuracy(src, src, src) is None
    with pytest.raises(ValueError, match="shape"):
        metrics.changed_token_accuracy(src[:, :2], tgt, src)


def test_clean_success_needs_the_edit_inside_and_the_source_outside():
    src = np.full((16, 16, 3), 40, np.uint8)
    tgt = src.copy()
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    tgt[mask] = 220
    ok = metrics.clean_edit_success(tgt, tgt, src, mask)
    assert ok == {"clean": True, "inside": True, "kept": True}
    assert metrics.clean_edit_success(src, tgt, src, mask) == {"clean": False, "inside": False, "kept": True}
    repainted = np.full_like(src, 220)                       # the edit everywhere: inside passes
    assert metrics.clean_edit_success(repainted, tgt, src, mask) == {"clean": False, "inside": True, "kept": False}
    slight = tgt.astype(int)
    slight[~mask] += 4                                       # 36 dB outside: kept
    assert metrics.clean_edit_success(slight.astype(np.uint8), tgt, src, mask)["clean"] is True
    slight[~mask] += 8                                       # 26.4 dB outside: not kept
    assert metrics.clean_edit_success(slight.astype(np.uint8), tgt, src, mask)["kept"] is False
    whole = np.ones((16, 16), bool)                          # nothing outside to judge
    whole[0, :3] = False                                     # 1% outside (< 5%): not judged
    assert metrics.clean_edit_success(repainted, repainted, src, whole) == {"clean": True, "inside": True,
                                                                              "kept": None}
    assert metrics.clean_edit_success(tgt, tgt, src, np.zeros((16, 16), bool))["clean"] is None


def test_training_edit_eval_scoring():
    from editmgt_jax.training import edit_eval

    assert edit_eval.balanced_indices(["a", "b", "a", "a", "b", "c"], 2) == [0, 1, 2, 4, 5]
    src = np.zeros((2, 8, 8, 3), np.uint8)
    tgt = src.copy()
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    tgt[:, :4] = 200
    items = [dict(source=src[i], target=tgt[i], mask=mask, category=c) for i, c in enumerate(["color", "add"])]
    repainted = np.full_like(tgt[1], 200)
    edits = [tgt[0], repainted]                  # the first edit is clean, the second repaints everything
    src_ids = np.array([[[1, 2], [3, 4]], [[1, 2], [3, 4]]])
    tgt_ids = np.array([[[5, 2], [3, 4]], [[6, 7], [3, 4]]])
    pred = np.array([[[5, 2], [3, 4]], [[1, 2], [3, 4]]])
    heat = np.array([[1.0, 0.0], [0.0, 0.0]])    # the map on the top-left cell; the mask is the top half
    rows = [edit_eval.item_scores(it, e, heat, p, s, t) for it, e, p, s, t in zip(items, edits, pred, src_ids, tgt_ids)]
    out = edit_eval.summarize(items, rows)
    assert out["clean_success"] == 0.5 and out["inside_success"] == 1.0 and out["kept_outside"] == 0.5
    assert out["clean_success/color"] == 1.0 and out["clean_success/add"] == 0.0
    assert out["inside_success/add"] == 1.0
    assert out["changed_token_accuracy"] == pytest.approx(1 / 3)
    assert out["leak_psnr_src"] == pytest.approx((100.0 + metrics.psnr(repainted, src[1], region=~mask)) / 2)
    assert 0.5 < out["map_auroc"] <= 1.0


def test_changed_region():
    src = np.zeros((4, 4), int)
    tok = src.copy()
    tok[1, 1] = 7
    r = metrics.changed_region(tok, src, (8, 8))
    assert r.sum() == 4 and r[2:4, 2:4].all()
    d = metrics.changed_region(tok, src, (8, 8), dilate=1)
    assert d.sum() == 36 and d[0:6, 0:6].all()
    assert not metrics.changed_region(src, src, (8, 8)).any()
    with pytest.raises(ValueError, match="multiple"):
        metrics.changed_region(tok, src, (6, 8))


def test_composite_ablation_runs():
    from editmgt_jax.evaluation import ablations
    from editmgt_jax.sampling.config import SamplerSettings

    runs = ablations.expand_runs(ablations.parse_ablations("composite"), SamplerSettings(),
                                 ablations.block_presets(4))
    assert [r.name for r in runs] == ["composite=changed", "composite=pixels", "composite=map", "composite=none"]
    assert runs[0].overrides == {"composite": "changed"}
    # the map needs consolidation: the 'late' preset is added when the base has none
    assert runs[1].overrides == {"composite": "pixels"}
    assert runs[2].overrides == {"composite": "map", "consolidation_blocks": (3,)}
    with pytest.raises(ablations.UsageError, match="composite"):
        ablations.expand_runs(ablations.parse_ablations("composite=mask"), SamplerSettings(),
                              ablations.block_presets(4))
