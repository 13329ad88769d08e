"""Export to the official release layout: official -> ours -> official is bit-identical on both
reference fixtures, configs included; what cannot be exported is refused with the field named."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from safetensors import safe_open

from editmgt_jax import checkpoints
from editmgt_jax.convert import ConversionError, Rule, convert_release
from editmgt_jax.convert.core import TensorSource, conv, linear
from editmgt_jax.convert.export import LAYOUT, OFFICIAL_CONFIGS, export_official, export_tensors, invert_rules
from editmgt_jax.tools.tiny_release import make_release

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = FIXTURES.parent.parent
# Our component -> the fixture's file prefix (weights and config of the official model).
PREFIX = {"transformer": "transformer", "vq": "vqvae", "clip": "clip_text", "gemma": "gemma2"}


def _quiet(_msg):
    pass


def _tensors(path) -> dict[str, np.ndarray]:
    src = TensorSource.from_dir(path) if os.path.isdir(path) else TensorSource([path])
    return {k: src[k] for k in src}


def _assert_bit_identical(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), f"{what}: key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k, a[k].dtype, b[k].dtype)
        assert a[k].tobytes() == b[k].tobytes(), f"{what}: {k} differs"


_DONE: dict[str, tuple] = {}


def _round_trip(name, tmp_path_factory):
    """fixture folder -> release layout -> our checkpoint -> exported release (once per fixture)."""
    if name not in _DONE:
        fixture = FIXTURES / name
        root = tmp_path_factory.mktemp(name)
        release = make_release(str(fixture), str(root / "release"))
        ckpt = convert_release(release, str(root / "ckpt"), log=_quiet)
        out = export_official(ckpt, str(root / "exported"), log=_quiet)
        _DONE[name] = fixture, pathlib.Path(release), pathlib.Path(ckpt), pathlib.Path(out)
    return _DONE[name]


@pytest.fixture(scope="module", params=["editmgt-tiny-v1", "editmgt-tiny-v2"])
def round_trip(request, tmp_path_factory):
    return _round_trip(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def v2_round_trip(tmp_path_factory):
    return _round_trip("editmgt-tiny-v2", tmp_path_factory)


def test_round_trip_is_bit_identical(round_trip):
    fixture, release, _, out = round_trip
    for name, (folder, stem, _) in LAYOUT.items():
        weights = out / folder / f"{stem}.safetensors"
        assert weights.is_file(), weights
        _assert_bit_identical(_tensors(fixture / f"{PREFIX[name]}.safetensors"), _tensors(weights), name)
        with open(fixture / f"{PREFIX[name]}_config.json") as fh:
            want = json.load(fh)
        with open(out / folder / "config.json") as fh:
            assert json.load(fh) == want, name
        with safe_open(str(weights), "np") as h:
            assert h.metadata() == {"format": "pt"}    # what torch's save_pretrained writes
    # Tokenizers and the scheduler config: where the official code reads them.
    for sub in ("tokenizer", "llm_encoder"):
        for f in os.listdir(release / sub):
            if f != "config.json" and not f.endswith(".safetensors"):
                assert (release / sub / f).read_bytes() == (out / sub / f).read_bytes(), (sub, f)
    with open(release / "scheduler" / "scheduler_config.json") as a, open(out / "scheduler" / "scheduler_config.json") as b:
        assert json.load(a) == json.load(b)


def test_configs_without_the_recorded_release_configs(round_trip, tmp_path):
    """A checkpoint without the release's configs (one trained here) gets them built from its own
    config and the official release's values for the fields it does not model: on both fixtures
    that is exactly the official config."""
    fixture, _, ckpt, _ = round_trip
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    doc = checkpoints.read_config(copy)
    assert set(doc[OFFICIAL_CONFIGS]) == {"transformer", "vq", "clip", "gemma", "scheduler"}
    del doc[OFFICIAL_CONFIGS]
    with open(copy / "config.json", "w") as fh:
        json.dump(doc, fh)
    out = export_official(str(copy), str(tmp_path / "exported"), components=["transformer", "vq"], log=_quiet)
    assert sorted(os.listdir(out)) == ["editmgt", "llm_encoder", "scheduler", "tokenizer", "vqvae"]
    for name in ("transformer", "vq"):
        folder = LAYOUT[name][0]
        with open(fixture / f"{PREFIX[name]}_config.json") as a, open(pathlib.Path(out) / folder / "config.json") as b:
            assert json.load(b) == json.load(a), name
    # ... and for the text encoders too.
    out2 = export_official(str(copy), str(tmp_path / "exported2"), components=["clip", "gemma"], log=_quiet)
    for name in ("clip", "gemma"):
        folder = LAYOUT[name][0]
        with open(fixture / f"{PREFIX[name]}_config.json") as a, open(pathlib.Path(out2) / folder / "config.json") as b:
            assert json.load(b) == json.load(a), name


def test_sharded_export_converts_back(v2_round_trip, tmp_path):
    """Over the shard size the weights are split as save_pretrained splits them (shards + index);
    the converter reads that folder back to the same parameters."""
    fixture, _, ckpt, _ = v2_round_trip
    out = pathlib.Path(export_official(str(ckpt), str(tmp_path / "sharded"), components=["transformer"],
                                       max_shard_bytes=100_000, log=_quiet))
    files = sorted(os.listdir(out / "editmgt"))
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("diffusion_pytorch_model-")]
    assert len(shards) >= 2 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    with open(out / "editmgt" / "diffusion_pytorch_model.safetensors.index.json") as fh:
        index = json.load(fh)
    assert sorted(set(index["weight_map"].values())) == shards
    _assert_bit_identical(_tensors(fixture / "transformer.safetensors"), _tensors(out / "editmgt"), "sharded")


def test_refuses_what_has_no_official_form(tmp_path, cli):
    """The shipped default model (FSQ patch-encoder VQ, RoPE theta 16, small text encoder): one line
    naming the fields, exit status 2, nothing written."""
    r = cli("editmgt_jax.convert", "--to-official", REPO / "checkpoints" / "editmgt-synthetic-64", tmp_path / "out")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: ") and "rope_theta=16.0" in err, err
    assert not (tmp_path / "out").exists()
    r = cli("editmgt_jax.convert", "--to-official", REPO / "checkpoints" / "editmgt-synthetic-64", tmp_path / "out",
            "--components", "vq")
    assert r.returncode == 2 and "quantizer='fsq'" in r.stderr and "encoder='patch'" in r.stderr, r.stderr


def test_output_folder_is_protected(v2_round_trip, tmp_path):
    _, _, ckpt, _ = v2_round_trip
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        export_official(str(ckpt), str(taken), log=_quiet)
    with pytest.raises(ConversionError, match="notes.txt"):
        export_official(str(ckpt), str(taken), overwrite=True, log=_quiet)
    assert (taken / "notes.txt").read_text() == "mine"
    # An earlier export is replaced with --overwrite.
    first = export_official(str(ckpt), str(tmp_path / "exp"), components=["vq"], log=_quiet)
    export_official(str(ckpt), first, components=["clip"], overwrite=True, log=_quiet)
    assert sorted(os.listdir(first)) == ["llm_encoder", "scheduler", "text_encoder", "tokenizer"]


def test_inverse_rules():
    rules = [Rule(r"blocks\.(\d+)\.(to_q|to_k)\.weight", r"blocks/\1/attn/\2/kernel", linear),
             Rule(r"conv\.weight", "conv/kernel", conv), Rule(r"buffer", None)]
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.arange(24, dtype=np.float32).reshape(4, 3, 2, 1)      # torch [out, in, kh, kw]
    params = {"blocks": {"7": {"attn": {"to_k": {"kernel": w.T}}}}, "conv": {"kernel": k.transpose(2, 3, 1, 0)}}
    out = export_tensors(params, rules)
    assert sorted(out) == ["blocks.7.to_k.weight", "conv.weight"]
    np.testing.assert_array_equal(out["blocks.7.to_k.weight"], w)
    np.testing.assert_array_equal(out["conv.weight"], k)
    with pytest.raises(ConversionError, match="no rule maps.*extra/kernel"):
        export_tensors({**params, "extra": {"kernel": w}}, rules)
    with pytest.raises(ConversionError, match="cannot be inverted"):
        invert_rules([Rule(r"a.*\.weight", "a/kernel")])


def test_lora_fine_tune_exports_merged(v2_round_trip, tmp_path):
    """A checkpoint whose transformer carries LoRA adapters is exported with them merged at scale 1:
    torch ``W + alpha / r * (A @ B)^T`` on the adapted layers, every other tensor as before."""
    import shutil

    from editmgt_jax.models.lora import LoRAConfig

    fixture, _, ckpt, _ = v2_round_trip
    lora_ckpt = tmp_path / "lora"
    shutil.copytree(ckpt, lora_ckpt)
    params = checkpoints.load_component(lora_ckpt, "transformer")
    rng = np.random.default_rng(0)
    adapters = {}
    for blk, attn in params["transformer_blocks"].items():
        kernel = np.asarray(attn["attn"]["to_q"]["kernel"])
        a = rng.normal(size=(kernel.shape[0], 2)).astype(np.float32)
        b = rng.normal(size=(2, kernel.shape[1])).astype(np.float32)
        attn["attn"]["to_q"]["lora"] = {"lora_a": a, "lora_b": b}
        adapters[f"transformer_blocks.{blk}.attn.to_q.weight"] = (a @ b).T
    shutil.rmtree(checkpoints.params_dir(lora_ckpt, "transformer"))
    checkpoints.save_component(str(lora_ckpt), "transformer", params)
    doc = checkpoints.read_config(lora_ckpt)
    doc["lora"] = LoRAConfig(rank=2, alpha=6.0, targets=("to_q",)).to_dict()
    with open(lora_ckpt / "config.json", "w") as fh:
        json.dump(doc, fh)
    out = pathlib.Path(export_official(str(lora_ckpt), str(tmp_path / "exp"), components=["transformer"], log=_quiet))
    got = _tensors(out / "editmgt" / "diffusion_pytorch_model.safetensors")
    want = _tensors(fixture / "transformer.safetensors")
    assert sorted(got) == sorted(want) and len(adapters) == 2
    for k in want:
        if k in adapters:
            np.testing.assert_allclose(got[k], want[k] + 3.0 * adapters[k], rtol=1e-5, atol=1e-6)
        else:
            assert got[k].tobytes() == want[k].tobytes(), k
