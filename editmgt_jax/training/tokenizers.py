"""Instruction tokenizers of the editor's text side: the small encoder's word tokenizer and the
release checkpoint's CLIP + Gemma-2 tokenizers (``editor.text.kind = "release"``)."""

from __future__ import annotations

import os

import numpy as np


class ReleaseInstructionTokenizer:
    """Instructions -> ``{"clip_ids": [B, 77], "gemma_ids": [B, 256]}`` int32 with the tokenizers of
    a checkpoint's ``tokenizer/`` and ``llm_tokenizer/`` (the pipeline stores them as
    ``instruction_clip_ids`` / ``instruction_gemma_ids``). An empty instruction is tokenised as the
    empty prompt (the unconditional text) rather than stopping the run."""

    def __init__(self, checkpoint: str):
        from editmgt_jax.checkpoints import release_tokenizer

        self.checkpoint = checkpoint
        self.prompt = release_tokenizer(checkpoint)

    def __call__(self, texts) -> dict[str, np.ndarray]:
        return self.prompt(list(texts), allow_empty=True)


def make_tokenizer(config):
    if config.task != "editor" or config.editor.text.kind not in ("small", "release"):
        return None
    if config.editor.text.kind == "release":
        return ReleaseInstructionTokenizer(release_text_checkpoint(config)[0])
    from editmgt_jax.data.synthetic_edits import SYNTHETIC_VOCAB
    from editmgt_jax.models.text.word_tokenizer import WordTokenizer

    tok = WordTokenizer(SYNTHETIC_VOCAB, max_length=int(config.editor.text.max_length))
    if tok.vocab_size > int(config.editor.text.vocab_size):
        raise ValueError(f"editor.text.vocab_size={config.editor.text.vocab_size} is smaller than "
                         f"the tokenizer's {tok.vocab_size} ids")
    return tok


def release_text_checkpoint(config) -> tuple[str, str]:
    """``(folder, field)``: the model checkpoint whose CLIP + Gemma-2 encoders and tokenizers form
    the ``editor.text.kind = "release"`` text side (``editor.text.checkpoint``, default
    ``init_from``), checked for its ``clip`` / ``gemma`` components and tokenizer folders. ``field``
    names the config field it came from, for error messages."""
    from editmgt_jax import checkpoints

    path = config.editor.text.get("checkpoint", "") or ""
    field = f"editor.text.checkpoint={path!r}"
    if not path:
        path = config.get("init_from", "") or ""
        field = f"init_from={path!r} (editor.text.checkpoint is empty)"
    if not path:
        raise ValueError("editor.text.kind='release' needs editor.text.checkpoint (default: init_from): "
                         "a model checkpoint folder with 'clip' and 'gemma' components and tokenizer/ + "
                         "llm_tokenizer/ folders (python -m editmgt_jax.convert --official RELEASE "
                         "--out CKPT); both fields are empty")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        doc = checkpoints.read_config(path)
    except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(f"{field}: {e}") from e
    missing = [n for n in ("clip", "gemma") if n not in doc.get("components", {})]
    if missing:
        raise checkpoints.CheckpointError(
            f"{field}: the checkpoint has no {' / '.join(repr(m) for m in missing)} component(s) "
            f"(it has {sorted(doc.get('components', {}))}); editor.text.kind='release' needs the "
            "release's CLIP and Gemma-2 text encoders: convert the release with its text_encoder/ "
            "and llm_encoder/ folders, or point editor.text.checkpoint at such a checkpoint")
    absent = [d for d in checkpoints.TOKENIZER_DIRS if not os.path.isdir(os.path.join(path, d))]
    if absent:
        raise checkpoints.CheckpointError(
            f"{field}: no {' / '.join(d + '/' for d in absent)} tokenizer folder(s) in {path} (the "
            "converter copies them from the release's tokenizer/ and llm_encoder/ folders)")
    return path, field
