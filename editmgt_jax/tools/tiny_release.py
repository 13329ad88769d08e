"""Lay out a reference-fixture folder as an official release folder, tokenizers included.

  python -m editmgt_jax.tools.tiny_release tests/fixtures/editmgt-tiny-v2 /tmp/tiny-release
  python -m editmgt_jax.convert --official /tmp/tiny-release --out /tmp/tiny-ckpt
  python -m infer.edit --checkpoint /tmp/tiny-ckpt --image photo.png --instruction "make it red"

A fixture folder holds weights and configs but no tokenizer files. This tool writes small
tokenizers that fit the fixture's text encoders (their vocabularies are tiny): a CLIP-style
byte-level BPE (``vocab.json`` + ``merges.txt``, start/end-of-text as the two largest ids, as in the
laion CLIP vocabulary, so the legacy ``argmax(ids)`` pooling finds the end-of-text token) and a
Gemma-style BPE ``tokenizer.json`` (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, left padding), and the
release's ``scheduler/scheduler_config.json`` naming the mask token id: the fixture's own
``mask_token_id`` (``cases.npz``) or ``vocab_size - 1``, or ``--mask-token-id`` (any id in
``[codebook_size, vocab_size)``, to lay out a release whose scheduler names another vocabulary row).
The result exercises the whole release path: converter, conventions, tokenisation, text encoders,
sampler, CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

WORDS = ("a an the of in on to and with make turn change remove add replace put move into it its this that "
         "red green blue yellow orange purple pink white black gray brown color colour background sky "
         "cat dog man woman person face hat hair shirt tree house car circle square triangle star shape "
         "left right top bottom center big small style painting photo image more less bright dark").split()


def byte_alphabet() -> list[str]:
    """The 256 byte symbols of byte-level BPE, printable bytes first (CLIP's vocabulary order)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer_files(vocab_size: int) -> dict[str, str]:
    """vocab.json / merges.txt / configs of a CLIP-style BPE with exactly ``vocab_size`` ids."""
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"CLIP vocabulary of {vocab_size} ids is too small for the byte alphabet (514)")
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    budget = vocab_size - 2 - len(vocab)
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            new = cur + p
            if new not in seen and len(merges) < budget:
                merges.append((cur, p))
                seen.add(new)
                vocab.append(new)
            cur = new
    # Fill the rest with unused placeholder entries so the special ids sit at the top.
    k = 0
    while len(vocab) < vocab_size - 2:
        vocab.append(f"<|unused{k}|>")
        k += 1
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                             "do_lower_case": True, **special}),
    }


def gemma_tokenizer_files(vocab_size: int) -> dict[str, str]:
    """tokenizer.json / tokenizer_config.json of a Gemma-style BPE with at most ``vocab_size`` ids."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                        "0123456789.,;:!?'\"-()\u2581"))
    corpus = [" " + " ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
           "padding_side": "left"}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(cfg)}


LAYOUT = {  # fixture prefix -> (release folder, weights file name)
    "vqvae": ("vqvae", "diffusion_pytorch_model.safetensors"),
    "transformer": ("editmgt", "diffusion_pytorch_model.safetensors"),
    "clip_text": ("text_encoder", "model.safetensors"),
    "gemma2": ("llm_encoder", "model.safetensors"),
}


def scheduler_config(fixture_dir: str, mask_token_id: int | None = None) -> dict:
    """The release's ``scheduler/scheduler_config.json`` for a fixture folder."""
    if mask_token_id is None:
        npz = os.path.join(fixture_dir, "cases.npz")
        if os.path.isfile(npz):
            import numpy as np

            with np.load(npz) as z:
                if "mask_token_id" in z.files:
                    mask_token_id = int(z["mask_token_id"])
    if mask_token_id is None:
        with open(os.path.join(fixture_dir, "transformer_config.json")) as fh:
            mask_token_id = int(json.load(fh)["vocab_size"]) - 1
    return {"_class_name": "Scheduler", "mask_token_id": int(mask_token_id), "masking_schedule": "cosine"}


def make_release(fixture_dir: str, out_dir: str, *, mask_token_id: int | None = None) -> str:
    """Write the release layout of ``fixture_dir`` (weights copied) to ``out_dir``."""
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{out_dir}: {'is a file' if parent == os.path.abspath(out_dir) else f'{parent} is a file'}"
                         ", not a folder")
    for prefix, (folder, weights) in LAYOUT.items():
        cfg = os.path.join(fixture_dir, f"{prefix}_config.json")
        st = os.path.join(fixture_dir, f"{prefix}.safetensors")
        if not (os.path.isfile(cfg) and os.path.isfile(st)):
            raise FileNotFoundError(f"{fixture_dir}: missing {prefix}_config.json or {prefix}.safetensors")
        d = os.path.join(out_dir, folder)
        os.makedirs(d, exist_ok=True)
        shutil.copy2(cfg, os.path.join(d, "config.json"))
        shutil.copy2(st, os.path.join(d, weights))
    with open(os.path.join(fixture_dir, "clip_text_config.json")) as fh:
        clip_vocab = json.load(fh)["vocab_size"]
    with open(os.path.join(fixture_dir, "gemma2_config.json")) as fh:
        gemma_vocab = json.load(fh)["vocab_size"]
    write_tokenizers(out_dir, clip_vocab, gemma_vocab)
    write_scheduler_config(out_dir, scheduler_config(fixture_dir, mask_token_id))
    return out_dir


def write_tokenizers(release_dir: str, clip_vocab: int, gemma_vocab: int) -> None:
    """A release's tokenizer files: ``tokenizer/`` (CLIP) and ``llm_encoder/`` (Gemma-2) for these
    vocabulary sizes."""
    for folder, files in (("tokenizer", clip_tokenizer_files(clip_vocab)),
                          ("llm_encoder", gemma_tokenizer_files(gemma_vocab))):
        os.makedirs(os.path.join(release_dir, folder), exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(release_dir, folder, name), "w") as fh:
                fh.write(text)


def write_scheduler_config(release_dir: str, doc: dict) -> None:
    """A release's ``scheduler/scheduler_config.json``."""
    os.makedirs(os.path.join(release_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(release_dir, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump(doc, fh, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m editmgt_jax.tools.tiny_release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture_dir")
    p.add_argument("out_dir")
    p.add_argument("--mask-token-id", type=int, default=None, metavar="ID",
                   help="mask id the scheduler config names (default: the fixture's, else vocab_size - 1)")
    args = p.parse_args(argv)
    try:
        print(make_release(args.fixture_dir, args.out_dir, mask_token_id=args.mask_token_id))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
