"""Prompt tokenisation for the two text encoders, with the HuggingFace ``tokenizers`` library.

EditMGT tokenises every prompt twice, each time with ``truncation=True, padding="max_length"`` and
the special tokens added (``tokenize_prompt`` in the official ``dataset_utils.py``):

- CLIP (``CLIPTokenizer`` from ``tokenizer/``): 77 ids ``<|startoftext|> ... <|endoftext|>`` padded
  with the tokenizer's own pad token on its own padding side (the laion ViT-H-14 tokenizer: its
  end-of-text token, on the right);
- Gemma (``AutoTokenizer`` from ``llm_encoder/``, i.e. ``GemmaTokenizerFast``): 256 ids ``<bos> ...``
  padded with ``<pad>`` (id 0) on the LEFT, the Gemma tokenizer's padding side.

Truncation keeps the special tokens: an over-long CLIP prompt still ends with ``<|endoftext|>``.

The CLIP tokenizer is built from ``vocab.json`` + ``merges.txt`` (the files the official slow
``CLIPTokenizer`` reads) the way transformers converts it to a fast tokenizer: NFC, whitespace runs
to one space, lowercase, CLIP's word split, byte-level BPE with a ``</w>`` end-of-word suffix. A
folder with only ``tokenizer.json`` is loaded from that file. (The slow tokenizer cleans text with
ftfy or BERT's basic tokenizer instead of NFC; the two agree on ordinary text.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

CLIP_MAX_LENGTH = 77
GEMMA_MAX_LENGTH = 256

# The slow CLIPTokenizer reads at most this many merges (after the "#version" header line).
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_WORD_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Tokenizer classes that pad on the left by default and rebuild their bos/eos template from
# add_bos_token / add_eos_token (transformers class behaviour where tokenizer_config.json is silent).
_GEMMA_LIKE = ("GemmaTokenizer", "GemmaTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tokenizer's outputs are cut and padded to a fixed length."""

    max_length: int
    pad_id: int
    pad_token: str
    padding_side: str = "right"
    truncation_side: str = "right"

    def __post_init__(self):
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {getattr(self, name)!r}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _token_text(value) -> str | None:
    """A special token as tokenizer configs store it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


def read_tokenizer_config(directory: str) -> dict:
    """``tokenizer_config.json`` with ``special_tokens_map.json`` applied on top (as transformers loads them)."""
    cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
    for key, value in _read_json(os.path.join(directory, "special_tokens_map.json")).items():
        if value:
            cfg[key] = value
    return cfg


def _token_id(tok, token: str, what: str, directory: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"{directory}: {what} {token!r} is not in the vocabulary")
    return int(i)


def _clip_from_vocab(directory: str, cfg: Mapping):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as fh:
        lines = fh.read().strip().split("\n")[1:CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines if line]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{directory}/merges.txt: malformed merge line(s) {bad[:3]}")
    bos = _token_text(cfg.get("bos_token")) or "<|startoftext|>"
    eos = _token_text(cfg.get("eos_token")) or "<|endoftext|>"
    unk = _token_text(cfg.get("unk_token")) or "<|endoftext|>"
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # <|startoftext|> ... <|endoftext|> (RobertaProcessing takes sep first, then cls).
    tok.post_processor = processors.RobertaProcessing((eos, _token_id(tok, eos, "eos_token", directory)),
                                                      (bos, _token_id(tok, bos, "bos_token", directory)),
                                                      trim_offsets=False, add_prefix_space=False)
    # Special tokens are never split or lowercased (transformers registers them as added tokens).
    specials = {bos, eos, unk, _token_text(cfg.get("pad_token")) or eos}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials)])
    return tok


def _apply_bos_eos_template(tok, cfg: Mapping, directory: str) -> None:
    """What ``GemmaTokenizerFast.update_post_processor`` does: ``add_bos_token`` / ``add_eos_token``
    from the config decide the template, whatever ``tokenizer.json`` holds."""
    from tokenizers import processors

    add_bos = bool(cfg.get("add_bos_token", True))
    add_eos = bool(cfg.get("add_eos_token", False))
    bos = _token_text(cfg.get("bos_token")) or "<bos>"
    eos = _token_text(cfg.get("eos_token")) or "<eos>"

    def template(seq: str, type_id: int) -> list[str]:
        return ([f"{bos}:{type_id}"] if add_bos else []) + [f"{seq}:{type_id}"] + \
            ([f"{eos}:{type_id}"] if add_eos else [])

    special = ([(bos, _token_id(tok, bos, "bos_token", directory))] if add_bos else []) + \
        ([(eos, _token_id(tok, eos, "eos_token", directory))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=" ".join(template("$A", 0)),
                                                       pair=" ".join(template("$A", 0) + template("$B", 1)),
                                                       special_tokens=special)


def _configure(tok, layout: Layout):
    tok.no_truncation()
    tok.no_padding()
    tok.enable_truncation(layout.max_length, direction=layout.truncation_side)
    tok.enable_padding(direction=layout.padding_side, pad_id=layout.pad_id, pad_token=layout.pad_token,
                       length=layout.max_length)
    return tok


def _layout(tok, cfg: Mapping, directory: str, max_length: int, default_pad: str | None,
            default_side: str) -> Layout:
    pad = _token_text(cfg.get("pad_token")) or default_pad
    if pad is None:
        raise ValueError(f"{directory}: no pad_token in tokenizer_config.json / special_tokens_map.json")
    return Layout(max_length=max_length, pad_id=_token_id(tok, pad, "pad_token", directory), pad_token=pad,
                  padding_side=cfg.get("padding_side") or default_side,
                  truncation_side=cfg.get("truncation_side") or "right")


def load_clip_tokenizer(directory: str | os.PathLike, max_length: int = CLIP_MAX_LENGTH):
    """The CLIP tokenizer of a release's ``tokenizer/`` folder, cut/padded to ``max_length``.

    Returns ``(tokenizers.Tokenizer, Layout)``.
    """
    from tokenizers import Tokenizer

    directory = os.fspath(directory)
    cfg = read_tokenizer_config(directory)
    if all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
        tok = _clip_from_vocab(directory, cfg)
    elif os.path.isfile(os.path.join(directory, "tokenizer.json")):
        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    else:
        raise FileNotFoundError(f"{directory}: no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    # CLIPTokenizer's own default pad token is its end-of-text token.
    eos = _token_text(cfg.get("eos_token")) or "<|endoftext|>"
    layout = _layout(tok, cfg, directory, max_length, eos, "right")
    return _configure(tok, layout), layout


def load_gemma_tokenizer(directory: str | os.PathLike, max_length: int = GEMMA_MAX_LENGTH):
    """The Gemma tokenizer of a release's ``llm_encoder/`` folder (``tokenizer.json`` +
    ``tokenizer_config.json``), cut/padded to ``max_length``. Returns ``(tokenizers.Tokenizer, Layout)``."""
    from tokenizers import Tokenizer

    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no tokenizer.json")
    cfg = read_tokenizer_config(directory)
    tok = Tokenizer.from_file(path)
    cls = cfg.get("tokenizer_class")
    if cls in _GEMMA_LIKE or "add_bos_token" in cfg or "add_eos_token" in cfg:
        _apply_bos_eos_template(tok, cfg, directory)
    # Without a tokenizer_class, AutoTokenizer picks GemmaTokenizerFast from the model type.
    side = "left" if cls is None or cls in _GEMMA_LIKE else "right"
    layout = _layout(tok, cfg, directory, max_length, "<pad>", side)
    return _configure(tok, layout), layout


class PromptTokenizer:
    """Both EditMGT tokenisations of a batch of prompts.

    ``PromptTokenizer.from_dirs(release/"tokenizer", release/"llm_encoder")(["make it snowy"])`` ->
    ``{"clip_ids": [1, 77] int32, "gemma_ids": [1, 256] int32}``.
    """

    def __init__(self, clip, clip_layout: Layout, gemma, gemma_layout: Layout):
        self.clip, self.clip_layout = clip, clip_layout
        self.gemma, self.gemma_layout = gemma, gemma_layout

    @classmethod
    def from_dirs(cls, clip_dir: str | os.PathLike, gemma_dir: str | os.PathLike, *,
                  clip_max_length: int = CLIP_MAX_LENGTH,
                  gemma_max_length: int = GEMMA_MAX_LENGTH) -> "PromptTokenizer":
        return cls(*load_clip_tokenizer(clip_dir, clip_max_length), *load_gemma_tokenizer(gemma_dir, gemma_max_length))

    @classmethod
    def from_folder(cls, root: str | os.PathLike, **kwargs) -> "PromptTokenizer":
        """From a release folder (``tokenizer/``, ``llm_encoder/``) or a converted checkpoint
        (``tokenizer/``, ``llm_tokenizer/``)."""
        root = os.fspath(root)

        def first(names):
            for n in names:
                if os.path.isdir(os.path.join(root, n)):
                    return os.path.join(root, n)
            raise FileNotFoundError(f"{root}: none of the tokenizer folders {list(names)}")

        return cls.from_dirs(first(("tokenizer", "text_encoder")), first(("llm_tokenizer", "llm_encoder")), **kwargs)

    @staticmethod
    def _check(prompts: str | Sequence[str], allow_empty: bool) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
            if not allow_empty and not p.strip():
                raise ValueError(f"prompt {i} is empty or whitespace only (pass allow_empty=True for the "
                                 f"unconditional prompt)")
        return prompts

    @staticmethod
    def _ids(tok, prompts: list[str]) -> np.ndarray:
        return np.asarray([e.ids for e in tok.encode_batch(prompts, add_special_tokens=True)], dtype=np.int32)

    def truncated(self, prompts: Sequence[str]) -> list[tuple[str, ...]]:
        """For each prompt, the tokenizers (``"CLIP"``, ``"Gemma"``) that cut it to their length."""
        cut = [[] for _ in prompts]
        for name, tok in (("CLIP", self.clip), ("Gemma", self.gemma)):
            for i, e in enumerate(tok.encode_batch(list(prompts), add_special_tokens=True)):
                if e.overflowing:
                    cut[i].append(name)
        return [tuple(c) for c in cut]

    def __call__(self, prompts: str | Sequence[str], *, allow_empty: bool = False) -> dict[str, np.ndarray]:
        """``prompts`` (B strings) -> ``{"clip_ids": [B, 77] int32, "gemma_ids": [B, 256] int32}``.

        An empty or whitespace-only prompt raises ``ValueError`` naming its index unless
        ``allow_empty`` (the pipeline's negative prompt is the empty string).
        """
        prompts = self._check(prompts, allow_empty)
        return {"clip_ids": self._ids(self.clip, prompts), "gemma_ids": self._ids(self.gemma, prompts)}


__all__ = ["CLIP_MAX_LENGTH", "GEMMA_MAX_LENGTH", "Layout", "PromptTokenizer", "load_clip_tokenizer",
           "load_gemma_tokenizer", "read_tokenizer_config"]
