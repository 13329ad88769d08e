"""Initialising the editor's token embedding and logits head from what each code looks like.

A freshly initialised transformer knows nothing about its ids: that code 17 is a red patch and code
803 a blue one is learned only where an instruction's words must meet the image (a colour named in
the text, a cell of that colour in the source), a few percent of the grid of a few of the edits.
With ``editor.code_embedding_init = "vq_patches"`` the trainer starts instead from the frozen
tokenizer's own picture of every code: each code is decoded on a small constant grid (the centre
patch, ``p x p x 3`` pixels for a ``p``-pixel token), centred and scaled over the codebook, and a fixed
random projection of it becomes

* the code's row of the token embedding (``embed.embeddings``; the mask row and any rows past the
  codebook keep their random initialisation), and
* the code's column of the logits head (``mlm_layer.conv2``),

each at the scale of the default initialisation. Codes that look alike start alike, so what is
learned for one red patch carries over to the others. Only the initial values change: the
architecture, the checkpoint layout and the official parity are those of the release.
"""

from __future__ import annotations

import jax
import numpy as np

CODE_INITS = ("", "vq_patches")


def code_patches(vq, codebook_size: int, *, grid: int = 3, chunk: int = 256) -> np.ndarray:
    """``[codebook_size, p*p*3] float32``: the centre token of a ``grid x grid`` grid of each code,
    decoded by ``vq`` (an ``editmgt_jax.models.vq.VQModel``; ``p`` its down-sampling factor). The
    centre is surrounded by its own code, so a decoder with a receptive field wider than one token
    sees a constant grid."""
    if grid < 1 or grid % 2 == 0:
        raise ValueError(f"grid={grid}: an odd number of tokens, so there is a centre one")
    decode = jax.jit(lambda ids: vq.decode_ids(ids))
    rows = []
    chunk = min(chunk, codebook_size)
    for lo in range(0, codebook_size, chunk):
        ids = np.arange(lo, lo + chunk, dtype=np.int32) % codebook_size     # one shape: one compile
        pix = np.asarray(decode(np.broadcast_to(ids[:, None, None], (chunk, grid, grid))), np.float32)
        p = pix.shape[1] // grid
        c = grid // 2
        rows.append(pix[:, c * p:(c + 1) * p, c * p:(c + 1) * p, :].reshape(chunk, -1))
    return np.concatenate(rows)[:codebook_size]


def _projected(features: np.ndarray, dim: int, std: float, seed: int) -> np.ndarray:
    """``[K, dim]``: centred, scaled ``features`` times a fixed Gaussian ``[F, dim]`` projection,
    rescaled to entry standard deviation ``std``."""
    f = features - features.mean(0, keepdims=True)
    f = f / max(float(f.std()), 1e-8)
    proj = np.random.default_rng(seed).standard_normal((f.shape[1], dim)) / np.sqrt(f.shape[1])
    out = f @ proj
    return (out * (std / max(float(out.std()), 1e-8))).astype(np.float32)


def init_from_code_patches(params: dict, patches: np.ndarray, *, seed: int = 0) -> dict:
    """``params`` (the trainable pure dict, with ``transformer``) with the code rows of the token
    embedding and the code columns of the logits head replaced by projections of ``patches``
    (``code_patches``), each at the standard deviation of the values it replaces. Returns a new
    dict of host arrays; the input is not modified."""
    tr = params["transformer"]
    table = np.asarray(tr["embed"]["embeddings"]["embedding"], np.float32)
    kernel = np.asarray(tr["mlm_layer"]["conv2"]["kernel"], np.float32)
    k = patches.shape[0]
    if kernel.shape[-1] != k or table.shape[0] < k:
        raise ValueError(f"{k} code patches for a transformer with {kernel.shape[-1]} logits and "
                         f"{table.shape[0]} embedding rows (editor.transformer.codebook_size must be "
                         "the tokenizer's number of codes)")
    table = table.copy()
    table[:k] = _projected(patches, table.shape[1], float(table[:k].std()), seed)
    kernel = kernel.copy()
    kernel[0, 0] = _projected(patches, kernel.shape[2], float(kernel.std()), seed + 1).T
    out = jax.tree.map(np.asarray, params)
    out["transformer"]["embed"]["embeddings"]["embedding"] = table.astype(
        np.asarray(tr["embed"]["embeddings"]["embedding"]).dtype)
    out["transformer"]["mlm_layer"]["conv2"]["kernel"] = kernel.astype(
        np.asarray(tr["mlm_layer"]["conv2"]["kernel"]).dtype)
    return out


def initial_params(config, program, vq_program, vq_arrays) -> dict | None:
    """The editor's initial parameters under ``editor.code_embedding_init`` (None: the random
    initialisation stands). ``vq_program``/``vq_arrays``: the frozen tokenizer the trainer loaded."""
    how = str(config.editor.code_embedding_init)
    if how not in CODE_INITS:
        raise ValueError(f"editor.code_embedding_init={how!r}: choose from {CODE_INITS}")
    if not how:
        return None
    if vq_program is None:
        raise ValueError("editor.code_embedding_init='vq_patches' needs the tokenizer: set "
                         "editor.vq_checkpoint")
    params, _ = program.model.init(int(config.seed))
    codebook = params["transformer"]["mlm_layer"]["conv2"]["kernel"].shape[-1]
    vq = vq_program.merge(*vq_arrays)
    patches = code_patches(vq, codebook)
    return init_from_code_patches(jax.device_get(params), patches, seed=int(config.seed))


__all__ = ["CODE_INITS", "code_patches", "init_from_code_patches", "initial_params"]
