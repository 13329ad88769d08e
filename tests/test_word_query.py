"""The word query (official ``local_query_text``): the chosen words' text rows alone are the query of
the edit-region map. Parity comes from the official definition (``src/local_utils.py``): token
positions by ``find_query_token_positions`` (the CLIP tokenisation with two tokenizers, first exact
run, special tokens left out, lower-cased), then ``attn[:, :, positions, :]`` averaged over heads and
those rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from editmgt_jax.edit_inputs import EditError
from editmgt_jax.models.attention import Segments, attention
from editmgt_jax.text_side import ReleaseTextSide, SmallTextSide, query_row_weights


def _official_local_map(q, k, seg, positions):
    """numpy: the text rows' softmax over [text, image] keys (what the official processor records as
    ``text_to_image``), rows ``positions`` taken, mean over heads and those rows -> [B, image]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bhqd,bhkd->bhqk", q[:, :, :seg.text], k[:, :, :seg.reference_start]) / math.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    text_to_image = p[..., seg.text:]
    return np.stack([text_to_image[b][:, pos].mean(axis=(0, 1)) for b, pos in enumerate(positions)])


@pytest.mark.parametrize("impl", ["xla", "naive"])
def test_capture_with_query_rows_is_the_official_local_map(impl):
    seg = Segments(text=7, image=9, reference=9)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, seg.total, 8)), jnp.float32) for _ in range(3))
    positions = [[2, 3], [5]]
    w = np.zeros((2, seg.text), np.float32)
    for b, pos in enumerate(positions):
        w[b, pos] = 1.0
    plain_out, plain = attention(q, k, v, seg, jnp.log(1.1), capture_mode="official", implementation=impl)
    out, score = jax.jit(lambda q, k, v: attention(q, k, v, seg, jnp.log(1.1), capture_mode="official",
                                                   implementation=impl, capture_rows=jnp.asarray(w)))(q, k, v)
    np.testing.assert_allclose(np.asarray(score), _official_local_map(q, k, seg, positions), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain_out), rtol=1e-5, atol=1e-6)   # attention unchanged
    # All rows weighted alike: the default capture (mean over every text row).
    _, uniform = attention(q, k, v, seg, jnp.log(1.1), capture_mode="official", implementation=impl,
                           capture_rows=jnp.ones((2, seg.text), jnp.float32))
    np.testing.assert_allclose(np.asarray(uniform), np.asarray(plain), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k, v, seg, None, capture_mode="official", implementation=impl,
                  capture_rows=jnp.ones((3, seg.text), jnp.float32))


@pytest.fixture(scope="module")
def release_side(tmp_path_factory):
    from editmgt_jax.models.text.tokenize import PromptTokenizer
    from editmgt_jax.tools.tiny_release import make_release

    release = make_release("tests/fixtures/editmgt-tiny-v1", str(tmp_path_factory.mktemp("rel") / "release"))
    side = object.__new__(ReleaseTextSide)     # the tokenizers only; no encoders needed here
    side.tokenizer = PromptTokenizer.from_folder(release)
    return side


def test_query_positions_follow_the_official_search(release_side):
    clip = release_side.tokenizer.clip
    prompt = "Make the ORANGE circle blue and the orange circle small"
    toks = clip.encode(prompt).tokens
    assert toks[0] == "<|startoftext|>" and len(toks) == 77
    # The tiny vocabulary splits "orange" into pieces: the query is the run of all its pieces and
    # "circle", the first run only, positions in the 77-token CLIP sequence, case folded.
    assert toks[3:8] == ["or", "an", "g", "e</w>", "circle</w>"]
    want = [3, 4, 5, 6, 7]
    assert release_side.query_positions(prompt, "orange Circle") == want
    assert release_side.query_positions(prompt, "circle orange") == []          # not a run of the prompt
    w = query_row_weights(release_side, [prompt, "make the circle red"], ["orange circle", "circle"], 256)
    assert w.shape == (2, 256) and np.flatnonzero(w[0]).tolist() == want
    assert np.flatnonzero(w[1]).tolist() == [3]
    with pytest.raises(EditError, match=r"query_words 0: 'purple star' does not occur in instruction 0"):
        query_row_weights(release_side, [prompt], "purple star", 256)


def test_small_encoder_rows_are_its_words():
    side = object.__new__(SmallTextSide)
    assert side.query_positions("turn the red circle blue", "red circle") == [2, 3]
    assert side.query_positions("turn the red circle blue", "blue circle") == []


def test_editor_word_query_changes_only_the_map():
    """On the shipped model: the map follows the query rows (it differs from the all-rows map),
    the edit without region hold does not change, and a word not in the instruction is one error."""
    from editmgt_jax.editor import Editor

    ed = Editor.load()
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (255, 128, 0)
    kw = dict(steps=4, seed=0, hold_threshold=0.0, composite="none")
    base = ed.edit([img], ["turn the orange square blue"], **kw)
    q = ed.edit([img], ["turn the orange square blue"], query_words="square", **kw)
    assert np.isfinite(q.heatmaps).all() and not np.allclose(q.heatmaps, base.heatmaps)
    np.testing.assert_array_equal(q.tokens, base.tokens)
    with pytest.raises(EditError, match="'circle' does not occur"):
        ed.edit([img], ["turn the orange square blue"], query_words="circle", **kw)
