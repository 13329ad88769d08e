"""The release's conventions travel from the release folder into every consumer.

Fixture editmgt-tiny-v2 has, like the release, a vocabulary larger than the codebook + 1 (codebook
96, vocab 112, mask id 111): an implementation that takes the mask id from the logits width (96)
passes the transformer, VQ and text checks but not the pipeline.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from editmgt_jax import checkpoints
from editmgt_jax.convert import convert_release
from editmgt_jax.editor import Editor
from editmgt_jax.sampling.config import SamplerSettings
from editmgt_jax.sampling.region_hold import sample
from editmgt_jax.tools.tiny_release import make_release

V2 = pathlib.Path(__file__).parent / "fixtures" / "editmgt-tiny-v2"
CODEBOOK, VOCAB = 96, 112
SCHEDULER_ID = 105   # a scheduler naming a row that is neither vocab_size - 1 nor the logits width


@pytest.fixture(scope="module")
def v2_cases() -> dict:
    with np.load(V2 / "cases.npz") as z:
        return {k: z[k] for k in z.files}


def _convert(root, name, **release_kw):
    release = make_release(str(V2), str(root / f"{name}-release"), **release_kw)
    return pathlib.Path(convert_release(release, str(root / f"{name}-ckpt"), log=lambda _: None))


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    """editmgt-tiny-v2 laid out as a release (scheduler config naming 111) and converted."""
    return _convert(tmp_path_factory.mktemp("v2"), "v2")


@pytest.fixture(scope="module")
def other_id_ckpt(tmp_path_factory):
    """The same release with a scheduler config naming mask id 105."""
    return _convert(tmp_path_factory.mktemp("v2-105"), "v2-105", mask_token_id=SCHEDULER_ID)


class FixtureText:
    """The text side replaced by the fixture's recorded encodings (instruction and negative prompt)."""

    def __init__(self, cases):
        self.cond = (cases["d_encoder_hidden_states"], cases["d_prompt_embeds"])
        self.neg = (cases["d_negative_encoder_hidden_states"], cases["d_negative_prompt_embeds"])

    def encode(self, prompts, allow_empty=False):
        return self.neg if allow_empty else self.cond


def _fixture_edit(editor, cases, **over):
    """Editor.edit of the fixture's source image with the fixture's case-d settings."""
    editor.text = FixtureText(cases)
    settings = dict(steps=int(cases["d_num_inference_steps"]), guidance_scale=float(cases["d_guidance_scale"]),
                    reference_strength=float(cases["d_reference_strength"]),
                    hold_threshold=float(cases["d_local_guidance"]),
                    consolidation_blocks=tuple(int(b) for b in cases["d_attention_blocks"]), greedy=True)
    settings.update(over)
    src = np.asarray(Image.open(V2 / "source.png").convert("RGB"))
    return editor.edit([src], ["recorded"], size=src.shape[0], **settings)


# ----------------------------------------------------------------------------- conventions record
def test_converter_reads_the_mask_id_from_the_scheduler_config(v2_ckpt, other_id_ckpt, tmp_path):
    conv = checkpoints.read_conventions(v2_ckpt)
    assert conv.mask_token_id == VOCAB - 1 and conv.source == os.path.join("scheduler", "scheduler_config.json")
    assert conv.timestep_convention == "step_index" and conv.aesthetic_score == 6.0
    assert conv.negative_prompt == checkpoints.RELEASE_NEGATIVE_PROMPT
    assert conv.sampler["steps"] == 36 and conv.sampler["guidance_scale"] == 6.0
    assert checkpoints.read_conventions(other_id_ckpt).mask_token_id == SCHEDULER_ID
    # without a scheduler config: vocab_size - 1, never the logits width
    release = make_release(str(V2), str(tmp_path / "rel"))
    shutil.rmtree(os.path.join(release, "scheduler"))
    ckpt = convert_release(release, str(tmp_path / "ckpt"), components=["vq", "transformer"], log=lambda _: None)
    conv = checkpoints.read_conventions(ckpt)
    assert conv.mask_token_id == VOCAB - 1 != CODEBOOK and "vocab_size - 1" in conv.source


def test_a_scheduler_mask_id_inside_the_codebook_is_refused(tmp_path):
    from editmgt_jax.convert import ConversionError

    release = make_release(str(V2), str(tmp_path / "rel"), mask_token_id=CODEBOOK - 1)
    with pytest.raises(ConversionError, match=r"scheduler_config.json.*mask_token_id 95.*codebook_size 96"):
        convert_release(release, str(tmp_path / "ckpt"), log=lambda _: None)
    assert not os.path.exists(tmp_path / "ckpt")      # nothing written
    with open(os.path.join(release, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump({"masking_schedule": "cosine"}, fh)
    with pytest.raises(ConversionError, match="scheduler_config.json: no 'mask_token_id'"):
        convert_release(release, str(tmp_path / "ckpt"), log=lambda _: None)


def test_checkpoint_without_the_record_loads_with_the_config_mask_id(other_id_ckpt, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(other_id_ckpt, old)
    doc = json.loads((old / "config.json").read_text())
    del doc["conventions"]
    (old / "config.json").write_text(json.dumps(doc))
    editor = Editor.load(old)
    assert editor.conventions.mask_token_id == VOCAB - 1
    assert "without a conventions record" in editor.conventions.source
    assert editor.sampler_config().mask_token_id == VOCAB - 1
    assert editor.sampler_config().timestep_convention == "step_index"


def test_sampler_needs_a_mask_id():
    with pytest.raises(ValueError, match="mask_token_id is not set"):
        SamplerSettings(steps=2, guidance_scale=1.0, greedy=True).split()


# ----------------------------------------------------------------------------- consumers
def test_edit_starts_from_the_mask_id_the_scheduler_names(other_id_ckpt, v2_cases):
    """The Editor's sampler settings carry 105, and the converted transformer's first call sees
    only 105 on the target grid (the reference grid carries the source's codes)."""
    editor = Editor.load(other_id_ckpt)
    cfg = editor.sampler_config(steps=2, guidance_scale=1.0, greedy=True)
    assert cfg.mask_token_id == SCHEDULER_ID
    from flax import nnx

    model = nnx.merge(editor.graphdefs["transformer"], editor.states["transformer"])
    seen = []

    def spy(ids, *args, **kw):
        seen.append(ids)
        return model(ids, *args, **kw)

    ref = jnp.asarray(v2_cases["d_ref_ids"][:, :8, :8])
    rec = sample(spy, *cfg.split(record=True), ref, v2_cases["d_encoder_hidden_states"], v2_cases["d_prompt_embeds"])
    assert np.all(np.asarray(rec["tokens_before"][0]) == SCHEDULER_ID)
    assert np.all(np.asarray(rec["tokens"]) < CODEBOOK)


def test_editor_reproduces_the_official_pipeline_with_a_larger_vocabulary(v2_ckpt, v2_cases):
    """Converted release -> Editor.edit (VQ encode, region-hold sampling, decode) gives the official
    pipeline's final tokens exactly: fails when the mask id is the logits width."""
    res = _fixture_edit(Editor.load(v2_ckpt), v2_cases)
    np.testing.assert_array_equal(res.source_tokens, v2_cases["d_ref_ids"])
    np.testing.assert_array_equal(res.tokens, v2_cases["d_final_tokens"])


def test_editor_decodes_leftover_mask_ids_to_code_zero(v2_ckpt, monkeypatch):
    """Whatever the sampler leaves as the mask id (111) decodes as code 0, as the official decode."""
    from flax import nnx

    from editmgt_jax.sampling import program

    editor = Editor.load(v2_ckpt)
    planted = np.arange(16).reshape(1, 4, 4) % CODEBOOK
    planted[0, 1:3, 1:3] = VOCAB - 1

    def fake_sample(*args, **kwargs):
        return {"tokens": jnp.asarray(planted, jnp.int32)}

    monkeypatch.setattr(program, "sample", fake_sample)   # the loop inside the one edit program
    editor.text = FixtureText({"d_encoder_hidden_states": np.zeros((1, 5, 48), np.float32),
                               "d_prompt_embeds": np.zeros((1, 20), np.float32),
                               "d_negative_encoder_hidden_states": np.zeros((1, 5, 48), np.float32),
                               "d_negative_prompt_embeds": np.zeros((1, 20), np.float32)})
    res = editor.edit([np.zeros((64, 64, 3), np.uint8)], ["x"], size=64, steps=1)
    vq = nnx.merge(editor.graphdefs["vq"], editor.states["vq"])
    want = np.where(planted == VOCAB - 1, 0, planted)
    img = np.asarray(jnp.round(jnp.clip(vq.decode_ids(jnp.asarray(want)), 0, 1) * 255).astype(jnp.uint8))
    np.testing.assert_array_equal(res.tokens, planted)
    # one level of rounding slack: the decode inside the edit program is fused differently
    np.testing.assert_allclose(res.images.astype(int), img.astype(int), atol=1)
    assert np.mean(res.images == img) > 0.99


def test_training_masks_with_the_conventions_mask_id(other_id_ckpt, v2_ckpt):
    """Fine-tuning a converted release masks targets with its mask id; from scratch vocab_size - 1."""
    from configs import editor_tiny
    from editmgt_jax.models.transformer import TransformerConfig
    from editmgt_jax.training.step import loss_from_config

    c = editor_tiny.get_config()
    with open(V2 / "transformer_config.json") as fh:
        c.editor.transformer = TransformerConfig.from_official(json.load(fh)).to_dict()
    c.editor.text = {"kind": "precomputed"}
    c.editor.cond_dropout = 0.0
    c.init_from = ""
    assert loss_from_config(c).mask_id == VOCAB - 1
    c.init_from = str(other_id_ckpt)
    loss = loss_from_config(c)
    assert loss.mask_id == SCHEDULER_ID

    seen = {}

    class Spy:
        def transformer(self, ids, ref, states, pooled, micro, t, **capture):
            seen["ids"] = ids
            return jnp.zeros(ids.shape + (CODEBOOK,)), None

    rng = np.random.default_rng(0)
    tgt = rng.integers(0, CODEBOOK, (3, 8, 8)).astype(np.int32)
    batch = {"source_ids": tgt[::-1].copy(), "target_ids": tgt, "text_states": np.zeros((3, 5, 48), np.float32),
             "pooled": np.zeros((3, 20), np.float32), "micro_conds": np.zeros((3, 5), np.float32)}
    loss(Spy(), {}, batch, jax.random.key(0))
    ids = np.asarray(seen["ids"])
    masked = ids != tgt
    assert masked.any() and np.all(ids[masked] == SCHEDULER_ID)


@pytest.mark.slow
def test_check_reference_on_the_converted_release(v2_ckpt, capsys):
    """check_reference --checkpoint: the converted release (scheduler config included) against the
    fixture's pipeline case."""
    from editmgt_jax.tools import check_reference as cr

    assert cr.main([str(V2), "--checkpoint", str(v2_ckpt), "--cases", "d"]) == 0
    out = capsys.readouterr().out
    assert "PASS  mask_token_id" in out and "scheduler_config.json" in out


# ----------------------------------------------------------------------------- bf16
def test_bfloat16_editor(v2_ckpt, v2_cases):
    """Editor.load(dtype=bfloat16): bf16 parameters, a bf16 forward with float32 logits, and an edit
    that agrees with the float32 one on most tokens; the float32 path stays exact."""
    f32 = Editor.load(v2_ckpt)
    bf16 = Editor.load(v2_ckpt, dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(bf16.states)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(f32.states)} == {jnp.dtype(jnp.float32)}
    free = dict(hold_threshold=0.0, consolidation_blocks=())
    a = _fixture_edit(f32, v2_cases, **free)
    b = _fixture_edit(bf16, v2_cases, **free)
    np.testing.assert_array_equal(a.tokens, v2_cases["d_final_tokens_lambda0"])   # float32: exact
    src_agree = float(np.mean(a.source_tokens == b.source_tokens))
    agree = float(np.mean(a.tokens == b.tokens))
    print(f"bf16 vs fp32: source tokens {src_agree:.4f}, edited tokens {agree:.4f}")
    assert src_agree >= 0.95 and agree >= 0.7     # measured: 0.982 and 0.796


def test_a_component_converted_in_parts_loads_as_the_whole(v2_ckpt, tmp_path, monkeypatch):
    """Components over two parts' worth are converted and written one part at a time (the converter
    then holds one part, not the whole component); the checkpoint reads back to the same
    parameters, sharded or not, and a damaged part is a one-line CheckpointError."""
    from editmgt_jax.checkpoints import io as ckpt_io

    # 200 kB: the transformer in 4 parts and the VQ in 3 (each part re-reads the component's
    # tensors, so a smaller size only repeats the same path); CLIP and Gemma in 2, written whole
    monkeypatch.setattr(ckpt_io, "PART_BYTES", 200_000)
    monkeypatch.setattr(checkpoints, "PART_BYTES", 200_000)
    parted = _convert(tmp_path, "parted")
    names = {}
    for comp in ("transformer", "vq"):
        with open(parted / "params" / comp / "parts.json") as fh:
            names[comp] = json.load(fh)["parts"]
        assert len(names[comp]) > 2, (comp, names[comp])
    names = names["transformer"]
    whole, split = Editor.load(v2_ckpt), Editor.load(parted)
    for comp in ("transformer", "vq"):
        a = jax.tree.leaves(whole.states[comp])
        b = jax.tree.leaves(split.states[comp])
        assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    loaded = checkpoints.load_component(str(parted), "transformer")    # no abstract: merged parts
    assert sorted(checkpoints.io._flat(loaded)) == sorted(checkpoints.io._flat(whole.states["transformer"].to_pure_dict()))
    shutil.rmtree(parted / "params" / "transformer" / names[1])
    with pytest.raises(checkpoints.CheckpointError, match=names[1]):
        Editor.load(parted)
