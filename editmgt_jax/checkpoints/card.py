"""The model card of a checkpoint folder: ``CKPT/README.md``, written with its ``config.json``.

Every writer of a model checkpoint (the converter, the training export, ``add_components``) goes
through ``write_config``, which writes the card from what ``config.json`` records:

- what the model is: its components and their sizes, parameter counts, the working resolution;
- how it was made: converted from a release (the folder, the dtype) or trained here (task, steps,
  data, batch, optimizer, initialisation: the ``training`` record and its ``config``);
- its measured quality: the ``evaluation`` record (``metrics``, what they were measured on), when
  one was given; otherwise the card says it was not measured and how to measure it;
- the conventions it must be driven with (mask id, timestep, micro-conditions, negative prompt,
  sampler settings) and how to use it.

``python -m editmgt_jax.checkpoints.card CKPT [--evaluation REPORT.json]`` rewrites the card of an
existing checkpoint; with an ``infer.evaluate`` report, its main run's metrics become the
checkpoint's ``evaluation`` record first.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

CARD_FILE = "README.md"

# Metrics of an evaluation record, in the order and with the names the card prints them.
METRIC_NAMES = {
    "edit_success": "edit success", "eval_edit_success": "held-out edit success (sampled)",
    "changed_token_acc": "changed-token accuracy",
    "eval_changed_token_accuracy": "held-out changed-token accuracy (sampled)",
    "eval_changed_accuracy": "held-out changed-token accuracy (masked, one step)",
    "l1": "L1 vs target", "psnr": "PSNR vs target (dB)", "ssim": "SSIM vs target",
    "psnr_in": "PSNR vs target inside the edit region (dB)",
    "leak_l1_src": "leak L1 vs source (outside the edit region)", "leak_psnr_src": "leak PSNR vs source (dB)",
    "leak_l1_rec": "leak L1 vs the VQ reconstruction", "leak_psnr_rec": "leak PSNR vs the VQ reconstruction (dB)",
    "iou_topk": "IoU of the edit-region map (top-k)", "iou_fixed": "IoU of the edit-region map (fixed threshold)",
    "auroc": "AUROC of the edit-region map", "iou_changed": "IoU of changed tokens",
    "iou_changed_dilated": "IoU of changed tokens (dilated)",
    "eval_loss": "held-out loss", "eval_psnr": "held-out reconstruction PSNR (dB)",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _components(doc: Mapping, counts: Mapping[str, int]) -> list[str]:
    comps = doc.get("components", {})
    rows = ["| component | what | parameters |", "|---|---|---|"]
    for name, c in comps.items():
        if name == "transformer":
            width = c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0)
            what = (f"EditMGT transformer: {c.get('num_layers')} dual-stream + {c.get('num_single_layers')} "
                    f"single-stream blocks, width {width} ({c.get('num_attention_heads')} heads of "
                    f"{c.get('attention_head_dim')}), codebook {c.get('codebook_size')}, vocabulary "
                    f"{c.get('vocab_size')}, text width {c.get('joint_attention_dim')}")
        elif name == "vq":
            levels = c.get("fsq_levels")
            quant = (f"FSQ levels {_fmt(levels)}" if c.get("quantizer") == "fsq" and levels
                     else f"VQ codebook {c.get('num_vq_embeddings')} x {c.get('vq_embed_dim') or c.get('latent_channels')}")
            down = 2 ** (len(c.get("block_out_channels", [0])) - 1)
            what = (f"image tokenizer ({c.get('encoder', 'conv')} encoder, {quant}, {c.get('num_vq_embeddings')} "
                    f"codes), {down}x{down} pixels per token")
        elif name == "small_text":
            what = (f"small text encoder: {c.get('num_layers')} layers of width {c.get('width')}, "
                    f"{c.get('vocab_size')} words, up to {c.get('max_length')} words per instruction")
        elif name == "clip":
            what = f"CLIP text tower: {c.get('num_hidden_layers')} layers of width {c.get('hidden_size')} (pooled vector)"
        elif name == "gemma":
            what = (f"Gemma-2 language model as encoder: {c.get('num_hidden_layers')} layers of width "
                    f"{c.get('hidden_size')} (penultimate hidden states)")
        else:
            what = name
        n = counts.get(name)
        rows.append(f"| `{name}` | {what} | {'' if n is None else f'{n:,}'} |")
    return rows


def _training(doc: Mapping) -> list[str]:
    t = doc.get("training")
    if not isinstance(t, Mapping):
        return []
    cfg = t.get("config") if isinstance(t.get("config"), Mapping) else {}
    lines = [f"Trained with editmgt-jax (`python -m train.main`), task `{t.get('task', cfg.get('task', '?'))}`"
             + (f", {t['step']:,} steps" if isinstance(t.get("step"), int) else "") + "."]
    data, train, optim = cfg.get("data", {}), cfg.get("train", {}), cfg.get("optim", {})
    facts = []
    if data.get("name"):
        facts.append(f"data: `{data['name']}` split `{data.get('split', 'train')}` at {data.get('resolution')} px")
    if train.get("batch_size"):
        facts.append(f"batch {train['batch_size']}")
    if optim.get("learning_rate") is not None:
        facts.append(f"learning rate {optim['learning_rate']} ({optim.get('schedule', '')}, "
                     f"{optim.get('warmup_steps', 0)} warm-up steps, weight decay {optim.get('weight_decay')})")
    if cfg.get("init_from"):
        facts.append(f"initialised from `{cfg['init_from']}`")
    if t.get("timestep_convention"):
        facts.append(f"timestep convention in training: `{t['timestep_convention']}`")
    if t.get("text_kind") == "release":
        facts.append(f"frozen release text encoders from `{t.get('text_checkpoint')}`")
    lines += [f"- {f}" for f in facts]
    if cfg:
        lines.append("- the whole training config: `config.json`, key `training.config`")
    return lines


def _evaluation(doc: Mapping) -> list[str]:
    ev = doc.get("evaluation") or (doc.get("training") or {}).get("evaluation")
    metrics = ev.get("metrics") if isinstance(ev, Mapping) else None
    if not metrics:
        return ["Not measured when this card was written. `python -m infer.evaluate --checkpoint THIS_FOLDER "
                "--data ...` measures it (README, Evaluation), and `python -m editmgt_jax.checkpoints.card "
                "THIS_FOLDER --evaluation REPORT.json` records it here."]
    lines = []
    if ev.get("on"):
        lines.append(f"Measured on {ev['on']}" + (f" (`{ev['command']}`)" if ev.get("command") else "") + ":")
    lines += ["", "| metric | value |", "|---|---|"]
    order = [k for k in METRIC_NAMES if k in metrics] + [k for k in metrics if k not in METRIC_NAMES]
    for k in order:
        v = metrics[k]
        lines.append(f"| {METRIC_NAMES.get(k, k)} | {_fmt(v)} |")
    return lines


def _conventions(doc: Mapping) -> list[str]:
    from editmgt_jax.checkpoints.conventions import read_conventions
    from editmgt_jax.checkpoints.layout import CheckpointError

    if "transformer" not in doc.get("components", {}):
        return []
    try:
        conv = read_conventions(doc)
    except CheckpointError as e:
        return [f"The conventions record cannot be read: {e}"]
    rows = ["| convention | value |", "|---|---|",
            f"| mask token id | {conv.mask_token_id} (from {conv.source or 'the record'}) |",
            f"| timestep fed to the transformer | `{conv.timestep_convention}` |",
            f"| working resolution | {conv.resolution} px |",
            f"| micro-conditions | `[width, height, {_fmt(conv.crop_coords)}, {_fmt(conv.aesthetic_score)}]` |",
            f"| negative prompt | {('`' + conv.negative_prompt + '`') if conv.negative_prompt else '(empty)'} |",
            f"| re-masking schedule | {conv.masking_schedule} |"]
    for k, v in conv.sampler.items():
        rows.append(f"| sampler `{k}` | {_fmt(v)} |")
    return rows


def stored_arrays(path: str | os.PathLike, names) -> tuple[dict[str, int], set[str]]:
    """Parameters per component and the dtypes they are stored in, from the stored arrays' metadata
    (no array is read); components whose index cannot be read are left out."""
    from editmgt_jax.checkpoints import index

    counts, dtypes = {}, set()
    for name in names:
        try:
            n = 0
            for leaf in index._flat(index.component_shapes(path, name)).values():
                shape = getattr(leaf, "shape", None)
                if shape is not None:
                    size = 1
                    for d in shape:
                        size *= int(d)
                    n += size
                    if getattr(leaf, "dtype", None) is not None:
                        dtypes.add(str(leaf.dtype))
            counts[name] = n
        except Exception:  # noqa: BLE001  (a card never stops a checkpoint from being written)
            continue
    return counts, dtypes


def model_card(doc: Mapping, counts: Mapping[str, int] | None = None, *, dtypes=(),
               name: str | None = None) -> str:
    """The Markdown card of the checkpoint whose ``config.json`` is ``doc`` (``counts``: parameters
    per component; ``dtypes``: the dtypes its arrays are stored in)."""
    counts = counts or {}
    made = ("converted" if doc.get("source") and not doc.get("training") else
            "trained" if doc.get("training") else "unknown")
    title = name or "editmgt-jax model"
    lines = ["---", "library_name: editmgt-jax", "pipeline_tag: image-to-image",
             "tags: [image-editing, masked-generative-transformer, jax, flax]", "---", "",
             f"# {title}", "",
             "An editmgt-jax model checkpoint: EditMGT, instruction-based "
             "image editing with a masked generative transformer that holds the edit to the region the "
             "instruction is about, in JAX / Flax NNX. The folder is read by `editmgt_jax.editor.Editor.load` "
             "and `python -m infer.edit --checkpoint`.", "", "## What it is", ""]
    lines += _components(doc, counts)
    total = sum(counts.values())
    if total:
        lines += ["", f"{total:,} parameters in all."]
    lines += ["", "## How it was made", ""]
    if made == "converted":
        hub = doc.get("hub") or {}
        origin = (f"`hf:{hub['repo_id']}` (commit `{hub.get('commit')}`, snapshot `{doc['source']}`)"
                  if hub.get("repo_id") else f"folder `{doc['source']}`")
        lines.append(f"Converted without PyTorch from the official EditMGT release {origin} "
                     f"(`python -m editmgt_jax.convert --official RELEASE --out CKPT`); the weights are the "
                     f"release's" + (f", stored as {', '.join(sorted(dtypes))}" if dtypes else "")
                     + "; driven by the conventions below it reproduces the official pipeline.")
    elif made == "trained":
        lines += _training(doc)
    else:
        lines.append("Not recorded.")
    lines += ["", "## Measured quality", ""] + _evaluation(doc)
    conv = _conventions(doc)
    if conv:
        lines += ["", "## Conventions", "",
                  "How the model must be driven beyond its weights (`config.json`, key `conventions`; "
                  "`Editor` and `infer.edit` apply them):", ""] + conv
    lines += ["", "## Use", "", "```bash",
              "python -m infer.edit --checkpoint THIS_FOLDER --image photo.png --instruction \"make the sky pink\" "
              "--out edited.png", "```", "", "```python", "from editmgt_jax.editor import Editor",
              "editor = Editor.load(\"THIS_FOLDER\")",
              "result = editor.edit([\"photo.png\"], [\"make the sky pink\"])", "```", ""]
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, doc: Mapping | None = None) -> str:
    """Write ``path/README.md`` from ``doc`` (default: the folder's ``config.json``); returns its path."""
    from editmgt_jax.checkpoints.layout import read_config

    path = os.fspath(path)
    doc = read_config(path) if doc is None else doc
    counts, dtypes = stored_arrays(path, list(doc.get("components", {})))
    text = model_card(doc, counts, dtypes=dtypes)
    out = os.path.join(path, CARD_FILE)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, out)
    return out


def evaluation_from_report(report: Mapping, run: str = "base") -> dict:
    """The ``evaluation`` record of a checkpoint from an ``infer.evaluate`` report (its run ``run``)."""
    runs = report.get("runs", {})
    if run not in runs:
        raise ValueError(f"the report has no run {run!r} (runs: {sorted(runs)})")
    metrics = {k: v["mean"] for k, v in runs[run].get("metrics", {}).items()
               if isinstance(v, Mapping) and isinstance(v.get("mean"), (int, float))}
    data = report.get("data", {})
    n = data.get("num_evaluated")
    on = f"{n} edits of `{data.get('name')}`" if n else f"`{data.get('name')}`"
    settings = runs[run].get("sampler", {})
    if settings:
        on += (f", {settings.get('steps')} step(s), guidance {settings.get('guidance_scale')}, "
               f"seed {report.get('settings', {}).get('seed', 0)}")
    return {"metrics": metrics, "on": on, "report_created": report.get("created")}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m editmgt_jax.checkpoints.card",
                                description="(Re)write the README.md model card of a model checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--evaluation", metavar="REPORT.json",
                   help="an infer.evaluate report: its main run's metrics become the checkpoint's evaluation record")
    args = p.parse_args(argv)
    from editmgt_jax.checkpoints.layout import CheckpointError, dump_config, read_config

    try:
        doc = read_config(args.checkpoint)
        if args.evaluation:
            try:
                with open(args.evaluation) as fh:
                    doc["evaluation"] = evaluation_from_report(json.load(fh))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"--evaluation {args.evaluation}: {e}") from None
            dump_config(args.checkpoint, doc)
        print(write_model_card(args.checkpoint, doc))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
