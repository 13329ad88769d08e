"""The text side of a loaded model: instructions -> ``(states [B, L, D], pooled [B, P])`` numpy.

``ReleaseTextSide`` (CLIP + Gemma-2, the release's) or ``SmallTextSide`` (a small jointly-trained
encoder with a word-level tokenizer, the shipped model); ``make_text_side`` picks the checkpoint's.
Instructions the model reads only in part raise an ``InstructionWarning`` once per message.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax import checkpoints
from editmgt_jax.edit_inputs import check_instructions


class ReleaseTextSide:
    """CLIP pooled vector + Gemma-2 penultimate hidden states, tokenised from the checkpoint's files.

    The encoding is ``editmgt_jax.models.text.release.ReleaseTextEncoder``, the module the trainer
    runs frozen inside its step (``editor.text.kind = "release"``).
    """

    def __init__(self, clip, gemma, tokenizer):
        from editmgt_jax.models.text.release import ReleaseTextEncoder

        self.tokenizer = tokenizer
        self._warned: set[str] = set()
        gd, self._state = nnx.split(ReleaseTextEncoder(clip, gemma))
        self._fn = jax.jit(lambda st, clip_ids, gemma_ids: nnx.merge(gd, st)(clip_ids, gemma_ids))

    def encode_ids(self, clip_ids, gemma_ids):
        """Token ids (``PromptTokenizer`` output) -> ``(states [B, L, D], pooled [B, P])`` numpy."""
        states, pooled = self._fn(self._state, jnp.asarray(clip_ids), jnp.asarray(gemma_ids))
        return np.asarray(states), np.asarray(pooled)

    def encode(self, prompts: Sequence[str], allow_empty: bool = False):
        ids = self.tokenizer(list(prompts), allow_empty=allow_empty)
        for i, cut in enumerate(self.tokenizer.truncated(list(prompts))):
            if cut:
                _warn_text(f"instruction {i} is longer than the {' and '.join(cut)} tokenizer takes; "
                           f"the end is cut off: {prompts[i]!r}", self._warned)
        return self.encode_ids(ids["clip_ids"], ids["gemma_ids"])

    def query_positions(self, prompt: str, query: str) -> list[int]:
        """The official ``find_query_token_positions`` (``src/local_utils.py``) with the release's two
        tokenizers: positions in the CLIP tokenisation of ``prompt`` (77 tokens, start-of-text at 0)
        of the first run of tokens equal to ``query``'s, special tokens and ``</w>`` left out of the
        comparison, lower-cased. The official pipeline uses these CLIP positions as the rows of the
        transformer's text sequence (the Gemma-2 states), and so does this."""
        clip = self.tokenizer.clip

        def clean(text):
            toks = clip.encode(text).tokens
            return [(i, t.lower().replace("</w>", "")) for i, t in enumerate(toks)
                    if t not in ("<|startoftext|>", "<|endoftext|>", "<pad>", "</w>", "!")
                    and not t.startswith("<|") and t.strip()]

        return _first_run(clean(prompt), [t for _, t in clean(query)])


def _first_run(full: list[tuple[int, str]], query: list[str]) -> list[int]:
    """Positions of the first run of ``query`` in ``full`` (``(position, token)`` pairs), or []."""
    n = len(query)
    for i in range(len(full) - n + 1) if n else ():
        if [t for _, t in full[i:i + n]] == query:
            return [p for p, _ in full[i:i + n]]
    return []


def query_row_weights(text_side, prompts: Sequence[str], query_words, length: int) -> np.ndarray:
    """``[B, length] float32``: 1 on the text rows of each prompt's query words, 0 elsewhere (the
    word query of the edit-region map). ``query_words``: one string for every prompt or one per
    prompt. Raises ``EditError`` naming the prompt whose words are not found."""
    from editmgt_jax.edit_inputs import EditError

    if isinstance(query_words, str):
        query_words = [query_words] * len(prompts)
    query_words = list(query_words)
    if len(query_words) != len(prompts):
        raise EditError(f"{len(prompts)} instruction(s) but {len(query_words)} query_words")
    out = np.zeros((len(prompts), length), np.float32)
    for i, (p, q) in enumerate(zip(prompts, query_words)):
        if not isinstance(q, str) or not q.strip():
            raise EditError(f"query_words {i}: empty; give words of instruction {i} ({p!r})")
        pos = [j for j in text_side.query_positions(p, q) if j < length]
        if not pos:
            raise EditError(f"query_words {i}: {q!r} does not occur in instruction {i} ({p!r}) as the model's "
                            f"tokenizer reads it")
        out[i, pos] = 1.0
    return out


class InstructionWarning(UserWarning):
    """An instruction the model reads only in part (unknown words, cut to the maximum length)."""


def _warn_text(message: str, seen: set) -> None:
    """Warn once per distinct message and text side (each set of unread words is named once)."""
    if message not in seen:
        seen.add(message)
        warnings.warn(message, InstructionWarning, stacklevel=4)


class SmallTextSide:
    """A small jointly-trained text encoder with a word-level tokenizer (the shipped model)."""

    def __init__(self, encoder, tokenizer):
        self.tokenizer = tokenizer
        self._warned: set[str] = set()
        self._graphdef, self._state = gd, _ = nnx.split(encoder)
        self._fn = jax.jit(lambda st, ids: nnx.merge(gd, st)(ids))

    def word_rows(self, prompts: Sequence[str]) -> np.ndarray:
        """``[B, L] float32``: 1 on the text rows of each prompt's words, 0 on padding."""
        ids = self.tokenizer(list(prompts))
        ids = ids["ids"] if isinstance(ids, Mapping) else ids
        return (np.asarray(ids) != self.tokenizer.pad_id if hasattr(self.tokenizer, "pad_id")
                else np.asarray(ids) != 0).astype(np.float32)

    def set_module(self, encoder) -> None:
        """Swap in new parameters of the same encoder structure (the compiled encoder stays valid)."""
        graphdef, state = nnx.split(encoder)
        if graphdef != self._graphdef:
            raise ValueError("set_module: the text encoder has another structure than the loaded one")
        self._state = state

    def encode(self, prompts: Sequence[str], allow_empty: bool = False):
        if not allow_empty:
            check_instructions(prompts)
        from editmgt_jax.models.text.word_tokenizer import split_words

        for i, p in enumerate(prompts):
            words = split_words(p)
            unknown = sorted({w for w in words if w not in self.tokenizer.ids})
            if unknown:
                _warn_text(f"instruction {i}: words outside the model's vocabulary carry no meaning and are "
                           f"read as unknown: {', '.join(unknown)}", self._warned)
            if len(words) > self.tokenizer.max_length:
                _warn_text(f"instruction {i}: {len(words)} words, the model reads the first "
                           f"{self.tokenizer.max_length}; dropped: {' '.join(words[self.tokenizer.max_length:])}",
                           self._warned)
        ids = self.tokenizer(list(prompts))
        ids = ids["ids"] if isinstance(ids, Mapping) else ids
        states, pooled = self._fn(self._state, jnp.asarray(ids))
        return np.asarray(states), np.asarray(pooled)

    def query_positions(self, prompt: str, query: str) -> list[int]:
        """Word positions of the first run of ``query``'s words in ``prompt`` (the text rows of the
        small encoder are its words)."""
        from editmgt_jax.models.text.word_tokenizer import split_words

        return _first_run(list(enumerate(split_words(prompt))), split_words(query))


def make_text_side(path: str, doc: Mapping, modules: Mapping):
    comps = doc.get("components", {})
    if checkpoints.SMALL_TEXT in comps:
        return SmallTextSide(modules[checkpoints.SMALL_TEXT], checkpoints.word_tokenizer(path))
    if "clip" in comps and "gemma" in comps:
        return ReleaseTextSide(modules["clip"], modules["gemma"], checkpoints.release_tokenizer(path))
    raise checkpoints.CheckpointError(f"{path}: checkpoint has no text encoder (clip + gemma, or small_text)")
