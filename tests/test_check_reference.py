"""check_reference on the shipped fixture set: every case passes, and a wrong number fails."""

import shutil

import numpy as np
import pytest

from editmgt_jax.tools import check_reference as cr


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["editmgt-tiny-v1", "editmgt-tiny-v2"])
def test_fixture_set_passes_every_case(tiny_dir, fixture, capsys):
    """v1: vocabulary = codebook + 1 (mask id 64). v2: vocabulary 112 > codebook 96 + 1, mask id 111 as
    in the release; the mask id is read from the folder, as the converter reads a release."""
    results = cr.check_reference(str(tiny_dir.parent / fixture))
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    names = {r.name for r in results}
    # All four cases ran: transformer, VQ, text encoders, the step-by-step pipeline.
    for must in ("a_logits_ref_s11_rows", "a_logits_noref_argmax", "b_ids", "b_decoded", "c_clip_text_embeds",
                 "c_gemma_hidden_states_m2", "mask_token_id", "d_tokens_before", "d_tokens_after", "d_hold",
                 "d_score_upsampled", "d_final_tokens_lambda101", "d_final_image_crop"):
        assert must in names
    out = capsys.readouterr().out
    assert out.count("PASS") == len(results)
    assert f"mask token id {64 if fixture.endswith('v1') else 111} (from transformer vocab_size - 1)" in out


def test_perturbed_reference_fails_and_missing_parts_are_skipped(tiny_dir, tmp_path, capsys):
    # A folder with only the VQ and a corrupted expected output: case b must FAIL, others SKIP.
    d = tmp_path / "vq-only"
    d.mkdir()
    for f in ("vqvae_config.json", "vqvae.safetensors"):
        shutil.copy(tiny_dir / f, d / f)
    with np.load(tiny_dir / "cases.npz") as z:
        arrays = {k: z[k] for k in z.files if k.startswith("b_")}
    arrays["b_decoded"] = arrays["b_decoded"] + 1e-2
    np.savez(d / "cases.npz", **arrays)
    assert cr.main([str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  b_decoded" in out and "PASS  b_latents" in out and "PASS  b_ids" in out
    assert "SKIP  case a" in out and "SKIP  case c" in out and "SKIP  case d" in out


def test_folder_without_cases_is_an_error(tmp_path, capsys):
    assert cr.main([str(tmp_path)]) == 2
    assert "no cases.npz" in capsys.readouterr().err
