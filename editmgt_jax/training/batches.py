"""Pipeline batches for the trainer: the Grain pipeline config of a training config, and the host-side
preparation of a pipeline batch into the fields the step reads (``editmgt_jax.training.step``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from editmgt_jax.models.embeddings import micro_conditions


def pipeline_config(config, split: str, process_count: int):
    """The Grain pipeline config for ``split`` (pre-tokenised data: ``data.tokens_dir`` for the
    training split, ``data.eval_tokens_dir`` (default: the same) for the evaluation split)."""
    from editmgt_jax.data import pipeline

    d = config.data
    tokens_dir = d.tokens_dir
    if tokens_dir and split != d.split:
        tokens_dir = d.get("eval_tokens_dir", "") or tokens_dir
    global_bs = int(config.train.batch_size)
    if global_bs % process_count:
        raise ValueError(f"train.batch_size={global_bs} does not split over {process_count} processes")
    spec = pipeline.DatasetSpec(
        name="" if tokens_dir else d.name, split=split,
        data_dir=os.path.expanduser(d.data_dir) if d.data_dir else None,
        tokens_dir=os.path.expanduser(tokens_dir) if tokens_dir else None)
    return pipeline.PipelineConfig(
        datasets=(spec,), batch_size=global_bs // process_count, resolution=int(d.resolution),
        crop=d.crop, seed=int(d.seed), shuffle=bool(d.shuffle), worker_count=int(d.worker_count),
        read_threads=int(d.read_threads), read_buffer_size=int(d.read_buffer_size), with_ids=True)


def prepare_batch(raw: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Pipeline batch -> the fields the step reads (see ``editmgt_jax.training.step``)."""
    out: dict[str, np.ndarray] = {}
    if config.task == "vq":
        # The tokenizer learns from both images of every edit pair.
        if "target" not in raw:
            raise KeyError("vq training needs image batches (data.tokens_dir must be empty)")
        out["image"] = np.concatenate([raw["source"], raw["target"]], axis=0)
        return out
    if "target_ids" in raw:
        out["source_ids"] = raw["source_ids"].astype(np.int32)
        out["target_ids"] = raw["target_ids"].astype(np.int32)
    else:
        out["source"], out["target"] = raw["source"], raw["target"]
    kind = config.editor.text.kind
    if kind == "small":
        out["instruction_ids"] = raw["instruction_ids"].astype(np.int32)
    elif kind == "release":
        if "instruction_clip_ids" not in raw:
            raise KeyError("editor.text.kind='release' needs batches tokenised by "
                           "ReleaseInstructionTokenizer (instruction_clip_ids / instruction_gemma_ids)")
        out["clip_ids"] = raw["instruction_clip_ids"].astype(np.int32)
        out["gemma_ids"] = raw["instruction_gemma_ids"].astype(np.int32)
    else:
        out["text_states"], out["pooled"] = raw["text_states"], raw["pooled"]
    if "original_size" in raw and "crop_top_left" in raw:
        h, w = raw["original_size"][:, 0], raw["original_size"][:, 1]
        top, left = raw["crop_top_left"][:, 0], raw["crop_top_left"][:, 1]
        aesthetic = float(config.editor.aesthetic)
        out["micro_conds"] = micro_conditions(w, h, top, left, aesthetic)
    if "index" in raw:
        # Example identity (dataset position): masks and dropout are drawn per example id, so any
        # split of the batch over devices or hosts sees the same randomness.
        ds = raw.get("dataset_id", np.zeros_like(raw["index"]))
        out["index"] = (raw["index"].astype(np.int64) * 8 + ds).astype(np.int32)
    return out


def example_ids(raw: Mapping[str, np.ndarray]):
    return np.asarray(raw["index"]) if "index" in raw else None


def tokens_per_example(config, batch, frozen_programs) -> int:
    """Token positions per example (editor: target tokens; vq: latent positions of both images)."""
    if config.task == "editor":
        if "target_ids" in batch:
            return int(np.prod(batch["target_ids"].shape[1:3]))
        f = 2 ** (len(config.vq.model.block_out_channels) - 1)
        r = batch["target"].shape[1]
        return (r // f) ** 2
    f = 2 ** (len(config.vq.model.block_out_channels) - 1)
    r = batch["image"].shape[1]
    return 2 * (r // f) ** 2
