"""Evaluation harness: metrics on hand-made cases, evaluation-set loaders, runs and the `infer.evaluate` CLI."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from editmgt_jax.editor import EditResult
from editmgt_jax.evaluation import datasets, metrics
from editmgt_jax.sampling.config import SamplerSettings
from editmgt_jax.evaluation import ablations, runner

RNG = np.random.default_rng(0)


def rand_image(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------ fidelity metrics
def test_psnr_and_l1_of_a_constant_offset():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 10  # MSE 100 -> 10 log10(255^2 / 100) = 20 log10(25.5)
    assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(25.5), abs=1e-12)
    assert metrics.mse(a, b) == pytest.approx(100.0)
    assert metrics.l1(a, a + 51) == pytest.approx(0.2)
    # floats in [0, 1] with data_range 1 give the same numbers
    assert metrics.psnr(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(20 * math.log10(25.5))
    assert metrics.l1(a / 255.0, (a + 51) / 255.0, data_range=1.0) == pytest.approx(0.2)


def test_psnr_of_identical_images_is_capped():
    a = rand_image()
    assert metrics.psnr(a, a) == metrics.PSNR_CAP_DB == 100.0
    assert metrics.psnr_from_mse(1e-30) == 100.0
    assert metrics.psnr(a, a, cap=60.0) == 60.0


def test_masked_metrics_ignore_changed_pixels():
    a = rand_image(seed=1)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 4:30] = True
    b = a.copy()
    b[mask] = 255 - b[mask]
    assert metrics.psnr(a, b, region=~mask) == 100.0
    assert metrics.l1(a, b, region=~mask) == 0.0
    inside = np.mean((a[mask].astype(float) - b[mask].astype(float)) ** 2)
    assert metrics.psnr(a, b, region=mask) == pytest.approx(10 * math.log10(255**2 / inside))
    assert metrics.psnr(a, b) < metrics.psnr(a, b, region=mask) + 10 * math.log10(32 * 32 / mask.sum()) + 1e-9
    # an empty region is undefined, not zero
    assert metrics.psnr(a, b, region=np.zeros((32, 32), bool)) is None
    assert metrics.l1(a, b, region=np.zeros((32, 32), bool)) is None
    with pytest.raises(ValueError, match="region"):
        metrics.l1(a, b, region=np.zeros((16, 16), bool))


def test_ssim_identical_is_one_and_matches_skimage():
    from skimage.metrics import structural_similarity

    a = rand_image(40, 52, seed=2)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    noise = np.random.default_rng(3).integers(-40, 41, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ref = structural_similarity(a, b, data_range=255, channel_axis=-1, **kw)
    assert metrics.ssim(a, b) == pytest.approx(ref, abs=1e-10)
    ref1 = structural_similarity(a / 255.0, b / 255.0, data_range=1.0, channel_axis=-1, **kw)
    assert metrics.ssim(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(ref1, abs=1e-10)
    g = a[..., 0]
    assert metrics.ssim(g, b[..., 0]) == pytest.approx(structural_similarity(g, b[..., 0], data_range=255, **kw),
                                                       abs=1e-10)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:8, :8], b[:8, :8])


# ------------------------------------------------------------------------------ map metrics
def test_iou_of_known_masks():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True  # 16 pixels
    b[2:6, 0:4] = True  # 16 pixels, 8 shared
    assert metrics.mask_iou(a, b) == pytest.approx(8 / 24)
    assert metrics.mask_iou(a, a) == 1.0
    assert metrics.mask_iou(a, ~a) == 0.0
    assert metrics.mask_iou(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) == 1.0


def test_threshold_rules():
    s = np.arange(16, dtype=float).reshape(4, 4)
    top = metrics.top_fraction_mask(s, 0.25)
    assert top.sum() == 4 and set(s[top]) == {12, 13, 14, 15}
    assert metrics.top_fraction_mask(np.ones((4, 4)), 0.25).all()  # ties at the cut are all kept
    assert not metrics.top_fraction_mask(s, 0.0).any()
    assert metrics.top_fraction_mask(s, 0.01).sum() == 1  # at least one pixel for a non-empty mask
    assert (metrics.threshold_mask(s, 10) == (s >= 10)).all()


def test_auroc_perfect_constant_inverted_and_ties():
    mask = np.array([[1, 1, 0, 0]], bool)
    assert metrics.auroc(np.array([[0.9, 0.8, 0.2, 0.1]]), mask) == 1.0
    assert metrics.auroc(np.full((1, 4), 0.3), mask) == 0.5
    assert metrics.auroc(np.array([[0.1, 0.2, 0.8, 0.9]]), mask) == 0.0
    # positives {1, .5}, negatives {.5, 0}: pairs 1>.5, 1>0, .5=.5 (half), .5>0 -> 3.5 / 4
    assert metrics.auroc(np.array([1.0, 0.5, 0.5, 0.0]), np.array([1, 1, 0, 0], bool)) == 0.875
    assert metrics.auroc(np.ones(4), np.zeros(4, bool)) is None
    assert metrics.auroc(np.ones(4), np.ones(4, bool)) is None
    # agrees with the pairwise definition on random data with many ties
    r = np.random.default_rng(4)
    s, m = r.integers(0, 5, 300).astype(float), r.random(300) < 0.3
    pairs = (s[m][:, None] > s[~m][None, :]) + 0.5 * (s[m][:, None] == s[~m][None, :])
    assert metrics.auroc(s, m) == pytest.approx(pairs.mean(), abs=1e-12)


def test_upsample_scores():
    s = np.array([[0.0, 1.0], [2.0, 3.0]])
    near = metrics.upsample_scores(s, (4, 6), mode="nearest")
    assert near.shape == (4, 6) and (near[:2, :3] == 0).all() and (near[2:, 3:] == 3).all()
    lin = metrics.upsample_scores(np.array([[0.0, 1.0]]), (1, 4))
    np.testing.assert_allclose(lin[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(metrics.upsample_scores(np.full((3, 3), 0.7), (9, 12)), 0.7)
    with pytest.raises(ValueError, match="nearest"):
        metrics.upsample_scores(s, (4, 4), mode="cubic")


def test_map_metrics_of_a_perfect_token_map():
    mask = np.zeros((64, 64), bool)
    mask[16:48, 0:32] = True  # token cells (1..2, 0..1) of a 4x4 grid at 16 px
    score = np.zeros((4, 4))
    score[1:3, 0:2] = 1.0
    got = metrics.map_metrics(score, mask, threshold=0.5, upsample="nearest")
    assert got == {"iou_topk": 1.0, "iou_fixed": 1.0, "auroc": 1.0}
    inv = metrics.map_metrics(1.0 - score, mask, threshold=0.5, upsample="nearest")
    assert inv["auroc"] == 0.0 and inv["iou_fixed"] == 0.0
    assert metrics.map_metrics(score, np.ones((64, 64), bool), threshold=0.5)["auroc"] is None


def test_edit_metrics_and_aggregate():
    src = rand_image(seed=5)
    mask = np.zeros((32, 32), bool)
    mask[:16] = True
    tgt = src.copy()
    tgt[mask] = 0
    rec = src ^ np.uint8(4)  # every value off by exactly 4
    row = metrics.edit_metrics(tgt, tgt, src, recon=rec, mask=mask)
    assert row["psnr"] == 100.0 and row["l1"] == 0.0 and row["ssim"] == pytest.approx(1.0)
    assert row["leak_psnr_src"] == 100.0 and row["leak_l1_src"] == 0.0
    assert row["leak_psnr_rec"] == pytest.approx(10 * math.log10(255**2 / 16))
    assert row["leak_l1_rec"] == pytest.approx(4 / 255)
    none = metrics.edit_metrics(tgt, tgt, src)
    assert none["leak_psnr_src"] is None and none["psnr_in"] is None
    agg = metrics.aggregate([{"a": 1.0, "b": None}, {"a": 3.0, "b": 2.0}, {"a": 10.0}], ["a", "b", "c"])
    assert agg == {"a": {"mean": 14 / 3, "median": 3.0, "n": 3}, "b": {"mean": 2.0, "median": 2.0, "n": 1},
                   "c": {"mean": None, "median": None, "n": 0}}


# ------------------------------------------------------------------------------ evaluation sets
def _save(path, arr):
    Image.fromarray(arr).save(path)


def make_folder_layout(root, n=3, with_mask=(True, False, True)):
    for i in range(n):
        d = root / f"edit{i}"
        d.mkdir(parents=True)
        src = rand_image(24, 24, seed=10 + i)
        _save(d / "source.png", src)
        _save(d / ("output.jpg" if i == 1 else "target.png"), 255 - src)
        (d / "instruction.txt").write_text(f"  make it odd {i}\n")
        if with_mask[i]:
            m = np.zeros((24, 24), np.uint8)
            m[:12] = 255
            _save(d / "mask.png", m)
        if i == 0:
            (d / "category.txt").write_text("color\n")
    (root / "notes").mkdir()  # folders without a source image are ignored


def test_folder_layout_is_detected_and_read(tmp_path):
    root = tmp_path / "bench"
    make_folder_layout(root)
    for spec in (f"folder:{root}", str(root)):
        s = datasets.open_eval_set(spec)
        assert isinstance(s, datasets.FolderSet) and len(s) == 3
    it = s[0]
    assert it.id == "edit0" and it.instruction == "make it odd 0" and it.category == "color"
    assert it.source.shape == (24, 24, 3) and it.source.dtype == np.uint8
    assert it.mask.dtype == bool and it.mask[:12].all() and not it.mask[12:].any()
    assert s[1].mask is None and s[1].category == "unknown" and s[1].target.shape == (24, 24, 3)


def test_manifest_layout_is_detected_and_read(tmp_path):
    root = tmp_path / "bench"
    make_folder_layout(root)
    lines = [json.dumps({"source": "edit0/source.png", "target": "edit0/target.png", "instruction": "a",
                         "mask": "edit0/mask.png", "category": "add", "id": "x"}),
             "", "# a comment",
             json.dumps({"input": str(root / "edit2" / "source.png"), "output": "edit2/target.png",
                         "instruction": "b"})]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for spec in (f"folder:{root}", str(root), str(root / "manifest.jsonl")):
        s = datasets.open_eval_set(spec)
        assert isinstance(s, datasets.ManifestSet) and len(s) == 2
    assert [s[0].id, s[0].category, s[1].id, s[1].category] == ["x", "add", "source", "unknown"]
    assert s[0].mask[:12].all() and s[1].mask is None


@pytest.mark.parametrize("case, message", [
    ("no_target", "edit1: has a source image but no target"),
    ("no_instruction", "instruction.txt: instruction file not found"),
    ("empty_instruction", "instruction.txt: instruction is empty"),
])
def test_folder_layout_errors_name_the_file(tmp_path, case, message):
    root = tmp_path / "bench"
    make_folder_layout(root)
    if case == "no_target":
        os.remove(root / "edit1" / "output.jpg")
    elif case == "no_instruction":
        os.remove(root / "edit1" / "instruction.txt")
    else:
        (root / "edit1" / "instruction.txt").write_text("  \n")
    with pytest.raises(datasets.EvalDataError, match=message):
        datasets.open_eval_set(f"folder:{root}")


def test_corrupt_images_are_named(tmp_path):
    root = tmp_path / "bench"
    make_folder_layout(root)
    (root / "edit0" / "target.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "edit2" / "mask.png").write_bytes(b"garbage")
    s = datasets.open_eval_set(f"folder:{root}")
    with pytest.raises(datasets.EvalDataError, match=r"edit0/target\.png"):
        s[0]
    with pytest.raises(datasets.EvalDataError, match=r"edit2/mask\.png: mask is not a readable image"):
        s[2]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"manifest\.jsonl:2: not valid JSON"),
    ('{"source": "a.png", "instruction": "x"}', r"manifest\.jsonl:2: missing field 'target'"),
    ('{"source": "a.png", "target": "b.png"}', r"manifest\.jsonl:2: missing or empty field 'instruction'"),
    ('["a.png"]', r"manifest\.jsonl:2: expected a JSON object"),
])
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"source": "a.png", "target": "b.png", "instruction": "x"})
    (tmp_path / "manifest.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(datasets.EvalDataError, match=message):
        datasets.open_eval_set(str(tmp_path / "manifest.jsonl"))


def test_manifest_missing_image_is_named_on_read(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"source": "nope.png", "target": "b.png", "instruction": "x"}))
    s = datasets.open_eval_set(f"folder:{tmp_path / 'm.jsonl'}")
    with pytest.raises(datasets.EvalDataError, match=r"m\.jsonl:1: .*nope\.png: source image not found"):
        s[0]


def test_spec_errors(tmp_path):
    with pytest.raises(datasets.EvalDataError, match="unknown kind 'bogus'"):
        datasets.open_eval_set("bogus:/nowhere")
    with pytest.raises(datasets.EvalDataError, match="synthetic_edits: not found; build it"):
        datasets.open_eval_set(f"synthetic_edits:{tmp_path}")
    with pytest.raises(datasets.EvalDataError, match="no evaluation items found"):
        datasets.open_eval_set(f"folder:{tmp_path}")


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory, cli):
    """synthetic_edits with 2 train / 4 held-out examples at 64 px."""
    data_dir = tmp_path_factory.mktemp("tfds")
    proc = cli("train.build_dataset", "synthetic_edits", "--data-dir", data_dir, "--num-examples", "2",
               "--num-test", "4", "--resolution", "64")
    assert proc.returncode == 0, proc.stderr
    return data_dir


def test_synthetic_split_is_read_with_exact_masks(syn_dir):
    from editmgt_jax.data.synthetic_edits import generate_example

    s = datasets.open_eval_set(f"synthetic_edits:{syn_dir}")
    assert isinstance(s, datasets.TFDSSet) and s.split == "test" and len(s) == 4
    refs = [generate_example(j, split="test", resolution=64, seed=0) for j in range(4)]
    matched = set()
    for i in range(4):  # TFDS stores examples in its own (hashed) order: match them by content
        it = s[i]
        j = next(j for j, r in enumerate(refs) if np.array_equal(r["source_image"], it.source))
        matched.add(j)
        assert it.id == f"test/{i}" and it.category == refs[j]["category"]
        assert it.instruction == refs[j]["instruction"]
        np.testing.assert_array_equal(it.target, refs[j]["target_image"])
        np.testing.assert_array_equal(it.mask, refs[j]["edit_mask"])
    assert matched == {0, 1, 2, 3}
    assert len(datasets.open_eval_set(f"synthetic_edits:{syn_dir}:train")) == 2
    assert len(datasets.open_eval_set(str(syn_dir))) == 4  # detected
    built = datasets.open_eval_set(f"synthetic_edits:{syn_dir}").dataset_dir
    assert len(datasets.open_eval_set(f"tfds:{built}:train")) == 2
    with pytest.raises(datasets.EvalDataError, match="no split 'validation'"):
        datasets.open_eval_set(f"synthetic_edits:{syn_dir}:validation")


def test_several_builds_must_be_named(syn_dir, tmp_path, cli):
    import shutil

    d = tmp_path / "tfds"
    shutil.copytree(syn_dir, d)
    proc = cli("train.build_dataset", "synthetic_edits", "--data-dir", d, "--num-examples", "1",
               "--num-test", "1", "--resolution", "32")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(datasets.EvalDataError, match="several builds .*choose one with synthetic_edits/CONFIG"):
        datasets.open_eval_set(f"synthetic_edits:{d}")
    assert len(datasets.open_eval_set(f"synthetic_edits/r32_n1_t1_s0:{d}")) == 1


# ------------------------------------------------------------------------------ ablation plan
def test_ablation_plan():
    presets = ablations.block_presets(42)
    assert presets["early"] == tuple(range(14)) and presets["late"] == tuple(range(28, 42))
    assert ablations.block_presets(5) == {"none": (), "early": (0, 1), "late": (3, 4), "all": (0, 1, 2, 3, 4)}
    groups = ablations.parse_ablations("hold, lambda=0.1/0.4 ,consolidation=none/late/1-2,inpaint")
    assert groups == [("hold", ("on", "off")), ("lambda", ("0.1", "0.4")),
                      ("blocks", ("none", "late", "1-2")), ("inpaint", ("gt",))]
    runs = ablations.expand_runs(groups, SamplerSettings(), ablations.block_presets(5))  # base: no hold, no blocks
    by = {r.name: r for r in runs}
    assert by["hold=on"].overrides == {"consolidation_blocks": (3, 4), "hold_threshold": ablations.FALLBACK_LAMBDA}
    assert by["hold=off"].overrides == {"consolidation_blocks": (3, 4), "hold_threshold": 0.0}
    assert by["lambda=0.4"].overrides["hold_threshold"] == 0.4
    assert by["blocks=none"].overrides == {"consolidation_blocks": (), "hold_threshold": 0.0}
    assert by["blocks=1-2"].overrides["consolidation_blocks"] == (1, 2)
    assert by["inpaint=gt"].inpaint
    assert [n for n, _ in ablations.parse_ablations("all")] == list(ablations.DEFAULT_VALUES)
    assert ablations.parse_ablations("none") == []
    for bad, msg in (("holdx", "unknown group 'holdx'"), ("steps=0", "out of range"), ("cfg=x", "not a float"),
                     ("hold=maybe", "on/off"), ("blocks=9", "outside 0..4")):
        with pytest.raises(ablations.UsageError, match=msg):
            ablations.expand_runs(ablations.parse_ablations(bad), SamplerSettings(), ablations.block_presets(5))


# ------------------------------------------------------------------------------ harness, fake editor
class FakeEditor:
    """Knows each source's target and mask. With region hold on it returns the target exactly and a
    perfect token map; with hold off it also flips bit 3 of every pixel outside the mask (an error of
    exactly 8). Its 'VQ reconstruction' flips bit 2 (an error of exactly 4)."""

    path = "fake-checkpoint"
    default_size = 32
    pixel_granularity = 16

    class tr_cfg:  # noqa: N801
        num_blocks = 6

    def __init__(self, lookup):
        self.lookup = lookup
        self.calls = []

    def prepare(self, image, *, size=None, policy="crop", name=None):
        from editmgt_jax import imageio

        return imageio.fit_to_grid(np.asarray(image), size or self.default_size, self.pixel_granularity, policy)

    def sampler_config(self, **kw):
        return SamplerSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None})

    def reconstruct(self, images, *, size=None, policy="crop"):
        return np.stack([np.asarray(im) ^ np.uint8(4) for im in images])

    def edit(self, images, instructions, *, seed, masks=None, size=None, policy="crop", negative_prompt=None, **kw):
        cfg = self.sampler_config(**kw)
        self.calls.append({"n": len(images), "seed": seed, "masks": masks is not None, "hold": cfg.holds})
        outs, heats = [], []
        for im in images:
            tgt, mask = self.lookup[np.asarray(im).tobytes()]
            out = tgt.copy()
            if not cfg.holds:
                out[~mask] ^= np.uint8(8)
            outs.append(out)
            heats.append(mask.reshape(2, 16, 2, 16).mean(axis=(1, 3)))
        heat = np.stack(heats).astype(np.float32) if cfg.captures else None
        return EditResult(images=np.stack(outs), sources=np.stack(images), tokens=None, source_tokens=None,
                          heatmaps=heat)


def test_harness_with_a_fake_editor(tmp_path):
    root = tmp_path / "bench"
    lookup, lines = {}, []
    for i in range(6):
        src = rand_image(seed=20 + i)
        mask = np.zeros((32, 32), bool)
        mask[(i % 2) * 16:(i % 2) * 16 + 16, 0:16] = True  # one token cell of the 2x2 map
        tgt = src.copy()
        tgt[mask] = 255 - tgt[mask]
        d = root / f"e{i}"
        d.mkdir(parents=True)
        _save(d / "s.png", src)
        _save(d / "t.png", tgt)
        rec = {"source": f"e{i}/s.png", "target": f"e{i}/t.png", "instruction": f"edit {i}",
               "category": "odd" if i % 2 else "even", "id": f"e{i}"}
        if i != 5:  # item e5 has no mask
            _save(d / "m.png", mask.astype(np.uint8) * 255)
            rec["mask"] = f"e{i}/m.png"
        lines.append(json.dumps(rec))
        lookup[src.tobytes()] = (tgt, mask)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    fake = FakeEditor(lookup)
    out = tmp_path / "out"
    options = runner.EvalOptions(data=str(root), out=str(out), batch_size=4, seed=7,
                                 sampler=dict(consolidation_blocks=(4, 5), hold_threshold=0.5),
                                 ablations="hold,inpaint", heatmap_upsample="nearest")
    report = runner.evaluate(options, editor=fake)

    # batches of 4 (the short last one padded), seeds 7 and 8 in every run; inpainting skips e5
    assert [c["n"] for c in fake.calls] == [4, 4, 4, 4, 4, 4]  # base, hold=off, inpaint (hold=on reused)
    assert [c["seed"] for c in fake.calls] == [7, 8, 7, 8, 7, 8]
    runs = report["runs"]
    assert list(runs) == ["base", "hold=on", "hold=off", "inpaint=gt"]
    assert runs["hold=on"]["same_as"] == "base" and runs["base"]["seeds"] == [7, 8]
    assert runs["inpaint=gt"]["n_items"] == 5 and runs["inpaint=gt"]["inpaint"]

    m = runs["base"]["metrics"]
    assert m["psnr"] == {"mean": 100.0, "median": 100.0, "n": 6} and m["l1"]["mean"] == 0.0
    # every edit returns its target: all succeed, cleanly; the identity baseline fails every one
    assert m["edit_success"] == {"mean": 1.0, "median": 1.0, "n": 5}
    assert m["clean_success"]["mean"] == 1.0 and m["kept_outside"]["mean"] == 1.0
    assert report["baselines"]["identity"]["metrics"]["edit_success"] == {"mean": 0.0, "median": 0.0, "n": 5}
    assert report["baselines"]["identity"]["metrics"]["clean_success"]["mean"] == 0.0
    assert m["leak_psnr_src"] == {"mean": 100.0, "median": 100.0, "n": 5}
    assert m["leak_psnr_rec"]["mean"] == pytest.approx(10 * math.log10(255**2 / 16))
    assert m["iou_topk"] == {"mean": 1.0, "median": 1.0, "n": 5} and m["auroc"]["mean"] == 1.0
    assert m["iou_fixed"]["mean"] == 1.0 and runs["base"]["iou_threshold"] == 0.5
    off = runs["hold=off"]["metrics"]
    assert off["leak_psnr_src"]["mean"] == pytest.approx(10 * math.log10(255**2 / 64))
    assert off["leak_l1_src"]["mean"] == pytest.approx(8 / 255)
    assert runs["base"]["per_category"]["odd"]["n_items"] == 3
    ident = report["baselines"]["identity"]["metrics"]
    assert ident["leak_psnr_src"] == {"mean": 100.0, "median": 100.0, "n": 5}
    vq = report["baselines"]["vq_reconstruction"]["metrics"]
    assert vq["leak_psnr_src"]["mean"] == pytest.approx(10 * math.log10(255**2 / 16))
    assert runs["base"]["timing"]["edits_per_s"] > 0

    assert report == json.loads((out / "report.json").read_text())
    per_item = [json.loads(x) for x in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(per_item) == 6 * 4 + 5  # identity, vq, base, hold=off: 6 each; inpainting: 5
    md = (out / "report.md").read_text()
    for needle in ("| identity (source) |", "| hold=off |", "## Ablations", "grids/even.png", "grids/ablations.png"):
        assert needle in md
    assert (out / "grids" / "odd.png").is_file()


def test_bad_options_are_named(tmp_path):
    with pytest.raises(datasets.EvalDataError, match="no evaluation items found"):
        runner.evaluate(runner.EvalOptions(data=f"folder:{tmp_path}", out=str(tmp_path / "o")))
    with pytest.raises(ablations.UsageError, match="unknown group 'nope'"):
        runner.evaluate(runner.EvalOptions(data="x", out="o", ablations="nope"))
    with pytest.raises(ablations.UsageError, match="--batch-size must be >= 1"):
        runner.evaluate(runner.EvalOptions(data="x", out="o", batch_size=0))


def test_options_match_the_command_line():
    import argparse

    from infer.flags import add_sampler_flags, sampler_overrides

    p = argparse.ArgumentParser()
    add_sampler_flags(p)
    args = p.parse_args(["--steps", "3", "--consolidation-blocks", "2-4,7", "--greedy"])
    assert sampler_overrides(args) == dict(steps=3, consolidation_blocks=(2, 3, 4, 7), greedy=True)
    assert sampler_overrides(p.parse_args(["--no-greedy"])) == dict(greedy=False)
    # old and new spellings set the settings field of the same name
    for flags in (["--guidance", "2", "--strength", "1.3"], ["--guidance-scale", "2", "--reference-strength", "1.3"]):
        over = sampler_overrides(p.parse_args(flags + ["--hold-threshold", "0.2"]))
        assert (over["guidance_scale"], over["reference_strength"], over["hold_threshold"]) == (2.0, 1.3, 0.2)
    # every other flag of the command is an EvalOptions field (the sampler flags go to its ``sampler``)
    from infer.evaluate import build_parser

    every = vars(build_parser().parse_args(["--data", "d", "--out", "o"]))
    assert set(every) - set(vars(args)) <= {f.name for f in dataclasses.fields(runner.EvalOptions)}


def test_cli_errors_exit_2(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "infer.evaluate", "--data", f"folder:{tmp_path}", "--out",
                           str(tmp_path / "o"), "--ablations", "nope"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --ablations: unknown group 'nope' in 'nope'; groups: hold, blocks, lambda, steps, cfg, inpaint, composite, keep, "
        "all, none")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_evaluate_end_to_end_on_the_tiny_model(tiny_dir, syn_dir, tmp_path):
    from editmgt_jax.convert import convert_release
    from editmgt_jax.tools.tiny_release import make_release

    release = make_release(str(tiny_dir), str(tmp_path / "release"))
    convert_release(release, str(tmp_path / "ckpt"))
    out = tmp_path / "eval"
    runner.evaluate(runner.EvalOptions(checkpoint=str(tmp_path / "ckpt"), data=f"synthetic_edits:{syn_dir}",
                                       out=str(out), size=64, batch_size=4, ablations="hold",
                                       sampler=dict(steps=2, consolidation_blocks=(2, 3, 4), hold_threshold=0.3)))
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["num_evaluated"] == 4 and report["data"]["split"] == "test"
    assert set(report["runs"]) == {"base", "hold=on", "hold=off"}
    assert report["runs"]["hold=on"]["same_as"] == "base"
    for name in ("base", "hold=off"):
        run = report["runs"][name]
        assert run["seeds"] == [0] and run["timing"]["edits_per_s"] > 0
        assert set(run["metrics"]) == set(runner.METRIC_KEYS)
        for k in ("l1", "psnr", "ssim"):
            assert run["metrics"][k]["n"] == 4 and run["metrics"][k]["mean"] is not None
        if run["has_heatmap"]:
            assert run["metrics"]["auroc"]["n"] > 0
        assert set(run["per_category"]) <= set(report["data"]["categories"])
    ident = report["baselines"]["identity"]["metrics"]
    assert ident["leak_psnr_src"]["mean"] == 100.0 and ident["leak_l1_src"]["mean"] == 0.0
    vq = report["baselines"]["vq_reconstruction"]["metrics"]
    assert vq["leak_psnr_rec"]["mean"] == 100.0
    assert vq["leak_psnr_src"]["mean"] < 100.0
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| VQ reconstruction |" in md
    for c in report["data"]["categories"]:
        assert f"### {c}" in md
    pngs = sorted(p.name for p in (out / "grids").iterdir())
    assert "ablations.png" in pngs and len(pngs) == len(report["data"]["categories"]) + 1
