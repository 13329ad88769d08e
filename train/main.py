"""Train the EditMGT editor or its VQ tokenizer: one CPU, one GPU or a pod, same code and config.

    python -m train.main --config configs/editor_tiny.py --workdir runs/editor_tiny \\
        [--config.FIELD=VALUE ...]

    # multi-host: one process per host (on TPU pods and SLURM, --distributed finds the arguments)
    python -m train.main --config ... --workdir ... --coordinator_address=HOST:PORT \\
        --num_processes=N --process_id=I

The task ('editor' or 'vq') comes from the config. The editor's text side is
``editor.text.kind``: "small" (a small encoder trained jointly), "precomputed" (text states in the
batch) or "release" (the frozen CLIP + Gemma-2 encoders of ``editor.text.checkpoint``, default
``init_from``, run inside the step on instructions tokenised by the checkpoint's tokenizers; see
configs/editor_release_finetune.py). The editor trains with the timestep convention
``editor.timestep_convention`` (default "mask_fraction": the transformer's timestep is the fraction
of masked target tokens; see editmgt_jax.training.losses), recorded in the exported model. The run
resumes from the newest complete checkpoint in WORKDIR/checkpoints (state, config and data
position), so re-running the same command after a pre-emption continues exactly where the last
checkpoint left off.

Outputs in WORKDIR:
    checkpoints/<step>/   Orbax checkpoints (editmgt_jax.training.checkpoint)
    metrics.jsonl         one JSON line per step (loss, accuracy, grad norm, LR, ...)
    tensorboard/          TensorBoard event files (train/*, eval/*, throughput)
    samples/step_N.png    sample grids (vq: input | reconstruction; editor: source | target | edit)
    loss.png              loss curve at the end
    model/                an inference checkpoint for ``Editor.load`` (editmgt_jax.checkpoints)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-host runs (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detected arguments "
                                 "(TPU pods, SLURM, ...).")


class NonFiniteLossError(RuntimeError):
    """A step produced a non-finite loss or gradient; ``step`` and ``batch`` say which."""

    def __init__(self, step: int, batch_position: int, example_ids, metrics: Mapping, dump: str | None):
        self.step = step
        self.batch_position = batch_position
        self.example_ids = example_ids
        self.metrics = dict(metrics)
        self.dump = dump
        ids = ", ".join(str(int(i)) for i in example_ids[:16]) if example_ids is not None else "n/a"
        super().__init__(
            f"non-finite loss or gradient at step {step} (loss={metrics.get('loss')}, "
            f"grad_norm={metrics.get('grad_norm')}): batch #{batch_position} of the data stream, "
            f"example ids [{ids}{', ...' if example_ids is not None and len(example_ids) > 16 else ''}]"
            + (f"; batch saved to {dump}" if dump else "")
            + ". The state was left at the last finite step (checkpoints are unaffected).")


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float]         # step -> loss, for the steps run by this call
    workdir: str
    model_dir: str | None


# ---------------------------------------------------------------------------------------------
# Data


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


class ReleaseInstructionTokenizer:
    """Instructions -> ``{"clip_ids": [B, 77], "gemma_ids": [B, 256]}`` int32 with the tokenizers of
    a checkpoint's ``tokenizer/`` and ``llm_tokenizer/`` (the pipeline stores them as
    ``instruction_clip_ids`` / ``instruction_gemma_ids``). An empty instruction is tokenised as the
    empty prompt (the unconditional text) rather than stopping the run."""

    def __init__(self, checkpoint: str):
        from editmgt_jax.editor import release_tokenizer

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
    from editmgt_jax.data.text import WordTokenizer

    tok = WordTokenizer(SYNTHETIC_VOCAB, max_length=int(config.editor.text.max_length))
    if tok.vocab_size > int(config.editor.text.vocab_size):
        raise ValueError(f"editor.text.vocab_size={config.editor.text.vocab_size} is smaller than "
                         f"the tokenizer's {tok.vocab_size} ids")
    return tok


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
        aes = np.full_like(h, 0, dtype=np.float32) + float(config.editor.get("aesthetic", 6.0))
        out["micro_conds"] = np.stack([w, h, top, left, aes], axis=1).astype(np.float32)
    if "index" in raw:
        # Example identity (dataset position): masks and dropout are drawn per example id, so any
        # split of the batch over devices or hosts sees the same randomness.
        ds = raw.get("dataset_id", np.zeros_like(raw["index"]))
        out["index"] = (raw["index"].astype(np.int64) * 8 + ds).astype(np.int32)
    return out


def _example_ids(raw: Mapping[str, np.ndarray]):
    return np.asarray(raw["index"]) if "index" in raw else None


# ---------------------------------------------------------------------------------------------
# Metrics output


class MetricWriter:
    """Per-step JSON lines + TensorBoard scalars (tensorboardX); only process 0 writes."""

    def __init__(self, workdir: str, active: bool):
        self.active = active
        self.jsonl = None
        self.tb = None
        if not active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        # A run killed mid-write can leave a partial last line; start a fresh one after it.
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                cut = fh.read(1) != b"\n"
            if cut:
                with open(path, "a") as fh:
                    fh.write("\n")
        self.jsonl = open(path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning("tensorboardX is not installed: TensorBoard event files are not written "
                            "(pip install tensorboardX); metrics.jsonl has every step")
        else:
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.active:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")

    def scalars(self, step: int, prefix: str, metrics: Mapping[str, float]) -> None:
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, tag: str, array: np.ndarray) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_losses(workdir: str, key: str = "loss") -> dict[int, float]:
    """step -> value from metrics.jsonl; a step logged twice (re-run after a resume) keeps the last."""
    out: dict[int, float] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue   # a line cut short by a kill
            if key in row:
                out[int(row["step"])] = float(row[key])
    return out


def plot_losses(losses: Mapping[int, float], path: str, title: str = "training loss") -> None:
    """A loss-curve PNG (raw values and a moving average) drawn with PIL."""
    from PIL import Image, ImageDraw

    steps = np.array(sorted(losses))
    if len(steps) < 2:
        return
    vals = np.array([losses[s] for s in steps])
    finite = np.isfinite(vals)
    steps, vals = steps[finite], vals[finite]
    if len(steps) < 2:
        return
    w, h, pad = 800, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = float(vals.min()), float(vals.max())
    hi = hi if hi > lo else lo + 1.0
    x = lambda s: pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line([(x(s), y(v)) for s, v in zip(steps, vals)], fill=(170, 190, 230), width=1)
    k = max(1, len(vals) // 50)
    smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
    d.line([(x(s), y(v)) for s, v in zip(steps[k - 1:], smooth)], fill=(20, 60, 200), width=2)
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.text((5, y(v) - 6), f"{v:.3g}", fill="black")
    d.text((pad, h - pad + 10), f"step {steps[0]}", fill="black")
    d.text((w - pad - 80, h - pad + 10), f"step {steps[-1]}", fill="black")
    d.text((pad, 20), f"{title} (moving average over {k})", fill="black")
    img.save(path)


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
    """Columns of ``[N, H, W, 3]`` images in [0, 1] (or uint8) -> one ``[N*H, C*W, 3] uint8`` grid."""
    cols = []
    for c in columns:
        c = np.asarray(c)
        if c.dtype != np.uint8:
            c = np.round(np.clip(np.nan_to_num(c.astype(np.float32)), 0, 1) * 255).astype(np.uint8)
        cols.append(np.concatenate(list(c), axis=0))
    return np.concatenate(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# Setup


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU hosts exchange collectives over gloo (the default CPU client has none across processes).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def load_frozen_vq(config, mesh, rules, compiler_options=None):
    """The editor's frozen tokenizer: (ModelProgram, (params, rest), VQConfig dict)."""
    import jax
    from editmgt_jax import checkpoints
    from editmgt_jax.models.vq import VQConfig
    from editmgt_jax.training.state import DTYPES, ModelProgram, _vq_model

    path = config.editor.get("vq_checkpoint", "")
    if path:
        doc = checkpoints.read_config(os.path.expanduser(path))
        if "vq" not in doc.get("components", {}):
            raise checkpoints.CheckpointError(f"{path}: no 'vq' component")
        vcfg = VQConfig.from_dict(doc["components"]["vq"])
    else:
        vcfg = VQConfig.from_dict(dict(config.vq.model))
    dtype = DTYPES[config.precision.compute_dtype]
    prog = ModelProgram.create(lambda rngs: _vq_model(vcfg, rngs, dtype), mesh, rules)
    if path:
        params = checkpoints.load_component(os.path.expanduser(path), "vq", prog.abstract_params,
                                            prog.param_shardings)
        rest = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), prog.abstract_rest)
        logging.info("frozen VQ tokenizer from %s", path)
    else:
        logging.warning("editor.vq_checkpoint is empty: the frozen VQ tokenizer is RANDOMLY "
                        "initialised (fine for smoke tests; train one with configs/vq_tiny.py)")
        params, rest = prog.init(int(config.seed) + 1000, compiler_options)
    return prog, (params, rest), vcfg.to_dict()


def load_uncond_text(config) -> dict:
    """The frozen encoders' encoding of the empty prompt, for condition dropout with precomputed
    text states: ``editor.uncond_text`` = an .npz with ``text_states`` [1, L, D], ``pooled`` [1, P]."""
    if float(config.editor.cond_dropout) <= 0:
        return {}
    path = config.editor.get("uncond_text", "")
    if not path:
        raise ValueError("editor.text.kind='precomputed' with cond_dropout > 0 needs "
                         "editor.uncond_text: an .npz with the empty prompt's text_states [1, L, D] "
                         "and pooled [1, P] from the same frozen encoders")
    with np.load(os.path.expanduser(path)) as z:
        return {"uncond": (np.asarray(z["text_states"], np.float32), np.asarray(z["pooled"], np.float32))}


def release_text_checkpoint(config) -> tuple[str, str]:
    """``(folder, field)``: the model checkpoint whose CLIP + Gemma-2 encoders and tokenizers form
    the ``editor.text.kind = "release"`` text side (``editor.text.checkpoint``, default
    ``init_from``), checked for its ``clip`` / ``gemma`` components and tokenizer folders. ``field``
    names the config field it came from, for error messages."""
    from editmgt_jax import checkpoints
    from editmgt_jax.editor import RELEASE_TOKENIZER_DIRS

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
    absent = [d for d in RELEASE_TOKENIZER_DIRS if not os.path.isdir(os.path.join(path, d))]
    if absent:
        raise checkpoints.CheckpointError(
            f"{field}: no {' / '.join(d + '/' for d in absent)} tokenizer folder(s) in {path} (the "
            "converter copies them from the release's tokenizer/ and llm_encoder/ folders)")
    return path, field


def load_frozen_text(config, mesh, rules, compiler_options=None):
    """The ``editor.text.kind = "release"`` text side, frozen: ``(ModelProgram of a
    ReleaseTextEncoder, (params, rest), uncond, checkpoint)``.

    The encoders' parameters (``clip`` and ``gemma`` components of the checkpoint) are restored
    directly sharded by the logical-axis ``rules`` on ``mesh``; they go in ``aux["frozen"]["text"]``,
    never in the train state. ``uncond`` = ``(text_states [1, L, D], pooled [1, P])`` float32: the
    same encoders' output for the empty prompt (condition dropout, and the sample grids' negative
    prompt), computed once here with the same module the step runs.
    """
    import jax
    from editmgt_jax import checkpoints
    from editmgt_jax.models.text.clip import CLIPTextConfig
    from editmgt_jax.models.text.gemma2 import Gemma2Config
    from editmgt_jax.parallel import replicated
    from editmgt_jax.training.state import DTYPES, ModelProgram, release_text_builder, transformer_config

    path, field = release_text_checkpoint(config)
    comps = checkpoints.read_config(path)["components"]
    try:
        clip_cfg = CLIPTextConfig.from_dict(comps["clip"])
        gemma_cfg = Gemma2Config.from_dict(comps["gemma"])
    except (TypeError, ValueError, KeyError) as e:
        raise checkpoints.CheckpointError(f"{field}: clip/gemma config is not valid: {e}") from e
    tcfg = transformer_config(config)
    if (gemma_cfg.hidden_size, clip_cfg.projection_dim) != (tcfg.joint_attention_dim,
                                                            tcfg.pooled_projection_dim):
        raise ValueError(
            f"{field}: the text encoders give states of width {gemma_cfg.hidden_size} (gemma) and "
            f"pooled vectors of {clip_cfg.projection_dim} (clip), but editor.transformer expects "
            f"joint_attention_dim={tcfg.joint_attention_dim}, "
            f"pooled_projection_dim={tcfg.pooled_projection_dim}")
    dtype = DTYPES[config.editor.text.get("compute_dtype", "float32")]
    prog = ModelProgram.create(release_text_builder(clip_cfg, gemma_cfg, dtype), mesh, rules)
    params = {name: checkpoints.load_component(path, name, prog.abstract_params[name],
                                               prog.param_shardings[name])
              for name in ("clip", "gemma")}
    rest = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), prog.abstract_rest),
                          prog.rest_shardings)
    logging.info("frozen CLIP + Gemma-2 text encoders from %s", path)

    ids = ReleaseInstructionTokenizer(path).prompt([""], allow_empty=True)
    rep = replicated(mesh)
    encode = jax.jit(lambda p, r, c, g: prog.merge(p, r)(c, g),
                     in_shardings=(prog.param_shardings, prog.rest_shardings, rep, rep),
                     out_shardings=(rep, rep), compiler_options=compiler_options)
    states, pooled = encode(params, rest, ids["clip_ids"], ids["gemma_ids"])
    uncond = (np.asarray(jax.device_get(states), np.float32),
              np.asarray(jax.device_get(pooled), np.float32))
    return prog, (params, rest), uncond, path


def add_release_text(model_dir: str, source: str) -> None:
    """Copy the ``clip`` and ``gemma`` components and the tokenizer folders of ``source`` into an
    exported model checkpoint, so ``Editor.load(model_dir)`` has the text side the editor was
    fine-tuned with (the encoders are frozen: the files are exactly what training used)."""
    import shutil

    from editmgt_jax import checkpoints
    from editmgt_jax.editor import RELEASE_TOKENIZER_DIRS

    src_comps = checkpoints.read_config(source)["components"]
    doc = checkpoints.read_config(model_dir)
    comps = dict(doc.pop("components"))
    for key in ("format", "version"):
        doc.pop(key, None)
    for name in ("clip", "gemma"):
        dst = os.path.join(model_dir, "params", name)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(source, "params", name), dst)
        comps[name] = src_comps[name]
    for d in RELEASE_TOKENIZER_DIRS:
        shutil.copytree(os.path.join(source, d), os.path.join(model_dir, d), dirs_exist_ok=True)
    checkpoints.write_config(model_dir, comps, doc)


def load_init_params(config, program):
    """Parameters to fine-tune from ``config.init_from`` (a model checkpoint folder)."""
    from editmgt_jax import checkpoints

    path = os.path.expanduser(config.init_from)
    abstract, shard = program.model.abstract_params, program.model.param_shardings
    if config.task == "vq":
        return checkpoints.load_component(path, "vq", abstract, shard)
    out = dict(abstract)
    out["transformer"] = checkpoints.load_component(path, "transformer", abstract["transformer"],
                                                    shard["transformer"])
    if abstract.get("text_encoder"):
        comps = checkpoints.read_config(path).get("components", {})
        if "small_text" not in comps:
            raise checkpoints.CheckpointError(f"{path}: no 'small_text' component to initialise the "
                                              "text encoder from (use editor.text.kind='release' or "
                                              "'precomputed')")
        out["text_encoder"] = checkpoints.load_component(path, "small_text", abstract["text_encoder"],
                                                         shard["text_encoder"])
    return out


def _check_resume_config(saved: Mapping | None, config) -> None:
    if not saved:
        return
    from editmgt_jax.training.checkpoint import config_to_json

    now = config_to_json(config)
    for key in ("task", "editor", "vq"):
        if key in saved and saved.get(key) != now.get(key):
            if key == "editor" and saved.get("task") == "vq":
                continue
            raise ValueError(f"the checkpoint in this workdir was trained with a different "
                             f"config.{key}: {saved.get(key)} != {now.get(key)}; use a new workdir")


# ---------------------------------------------------------------------------------------------
# Samples


class Sampler:
    """Periodic sample grids of the current parameters on a fixed evaluation batch.

    vq: input | reconstruction. editor: source | target | greedy sample edit (the instruction's
    edit decoded with the frozen tokenizer; pre-tokenised data shows the decoded tokens).
    """

    def __init__(self, config, program, aux, frozen_programs, eval_raw, mesh):
        import jax

        self.config = config
        self.program = program
        self.aux = aux
        self.frozen_programs = frozen_programs
        self.raw = {k: v[: int(config.train.num_samples)] for k, v in eval_raw.items()}
        self.mesh = mesh
        self.available = config.task == "vq" or ("vq" in aux["frozen"] and (
            config.editor.text.kind == "small" or "uncond" in aux["frozen"]))
        self._fn = None
        self._jax = jax

    def _build(self):
        import jax
        import jax.numpy as jnp

        from editmgt_jax.sampling.region_hold import SamplerConfig, sample
        from editmgt_jax.training.step import mask_token_id, to_unit_range

        cfg = self.config
        model_prog = self.program.model
        if cfg.task == "vq":
            def fn(params, aux, images):
                model = model_prog.merge(params, aux["rest"])
                return model(to_unit_range(images))[0]
            return jax.jit(fn)

        vq_prog = self.frozen_programs["vq"]
        text_prog = self.frozen_programs.get("text")
        guidance = 3.0 if float(cfg.editor.cond_dropout) > 0 else 1.0
        scfg = SamplerConfig(steps=int(cfg.train.sample_steps), guidance_scale=guidance,
                             reference_strength=1.0, greedy=True, mask_token_id=mask_token_id(cfg),
                             timestep_convention=("mask_fraction" if cfg.editor.timestep_convention
                                                  == "mask_fraction" else "step_index"))
        mask_id = model_prog.abstract_params["transformer"]["mlm_layer"]["conv2"]["kernel"].shape[-1]

        def fn(params, aux, batch):
            model = model_prog.merge(params, aux["rest"])
            vq = vq_prog.merge(*aux["frozen"]["vq"])
            src = batch["source_ids"] if "source_ids" in batch else vq.encode_ids(
                to_unit_range(batch["source"]))
            if model.text_encoder is not None:
                states, pooled = model.text_encoder(batch["instruction_ids"])
                empty = jnp.zeros((1, batch["instruction_ids"].shape[1]), jnp.int32)
                nstates, npooled = model.text_encoder(empty)
            elif text_prog is not None:    # the release's frozen encoders
                text = text_prog.merge(*aux["frozen"]["text"])
                states, pooled = text(batch["clip_ids"], batch["gemma_ids"])
                nstates, npooled = aux["frozen"]["uncond"]
            else:
                states, pooled = batch["text_states"], batch["pooled"]
                nstates, npooled = aux["frozen"]["uncond"]

            micro = batch.get("micro_conds")
            out = sample(model.transformer, src, states, pooled, nstates, npooled, scfg, micro_conds=micro)
            tokens = jnp.where(out["tokens"] >= mask_id, 0, out["tokens"])
            if "source" in batch:
                shown = (to_unit_range(batch["source"]), to_unit_range(batch["target"]))
            else:   # pre-tokenised data: show what the tokens decode to
                shown = (vq.decode_ids(batch["source_ids"]), vq.decode_ids(batch["target_ids"]))
            return shown + (vq.decode_ids(tokens),)
        return jax.jit(fn)

    def grid(self, params) -> np.ndarray | None:
        if not self.available:
            return None
        if self._fn is None:
            self._fn = self._build()
        batch = prepare_batch(self.raw, self.config)
        batch = {k: v for k, v in batch.items() if k != "index"}
        if self.config.task == "vq":
            images = batch["image"][: len(self.raw["target"])]
            recon = self._jax.device_get(self._fn(params, self.aux, images))
            return image_grid([images, recon])
        return image_grid(list(self._jax.device_get(self._fn(params, self.aux, batch))))


# ---------------------------------------------------------------------------------------------
# The loop


def train(config, workdir: str, *, compiler_options: Mapping[str, Any] | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; returns the losses of the steps run here."""
    import jax
    from tqdm import tqdm

    import editmgt_jax  # noqa: F401  (NNX sharding mode)
    from editmgt_jax.data.pipeline import make_dataset
    from editmgt_jax.parallel import make_mesh
    from editmgt_jax.training.checkpoint import TrainCheckpointer, export_model
    from editmgt_jax.training.state import TrainProgram, mesh_shape_from_config, rules_from_config
    from editmgt_jax.training.step import global_batch, loss_from_config, make_steps

    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    pidx, pcount = jax.process_index(), jax.process_count()
    lead = pidx == 0
    mesh = make_mesh(mesh_shape_from_config(config))
    rules = rules_from_config(config)
    program = TrainProgram.create(config, mesh, rules)
    if lead:
        logging.info("mesh %s, %.2f%% of parameter bytes replicated", dict(mesh.shape),
                     100 * program.model.replicated_fraction())

    aux: dict[str, Any] = {"frozen": {}}
    frozen_programs: dict[str, Any] = {}
    vq_cfg_dict = None
    text_checkpoint = None
    if config.task == "editor" and config.editor.text.kind == "release":
        # The release's frozen CLIP + Gemma-2, run in the step (first: a bad checkpoint fails fast).
        frozen_programs["text"], aux["frozen"]["text"], uncond, text_checkpoint = load_frozen_text(
            config, mesh, rules, compiler_options)
        aux["frozen"]["uncond"] = uncond
    needs_vq = config.task == "editor" and not config.data.tokens_dir
    if config.task == "editor" and (needs_vq or config.editor.get("vq_checkpoint", "")):
        frozen_programs["vq"], aux["frozen"]["vq"], vq_cfg_dict = load_frozen_vq(
            config, mesh, rules, compiler_options)
        codebook = program.model.abstract_params["transformer"]["mlm_layer"]["conv2"]["kernel"].shape[-1]
        if vq_cfg_dict["num_vq_embeddings"] != codebook:
            raise ValueError(f"the VQ tokenizer has {vq_cfg_dict['num_vq_embeddings']} codewords but "
                             f"the transformer predicts {codebook} (editor.transformer.codebook_size)")

    if config.task == "editor" and config.editor.text.kind == "precomputed":
        aux["frozen"].update(load_uncond_text(config))

    tokenizer = make_tokenizer(config)
    dataset = make_dataset(pipeline_config(config, config.data.split, pcount), tokenize=tokenizer,
                           shard_index=pidx, shard_count=pcount)
    it = iter(dataset)

    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                             keep=int(config.train.keep_checkpoints),
                             async_save=bool(config.train.async_checkpoints))
    start = ckpt.latest_step()
    if start is not None:
        state, saved_config = ckpt.restore(program.abstract_state, start, data_iterator=it)
        _check_resume_config(saved_config, config)
        rest = program.model.init(int(config.seed), compiler_options)[1] if jax.tree.leaves(
            program.model.abstract_rest) else {}
        if lead:
            logging.info("resumed from %s/%d", ckpt.directory, start)
    else:
        start = 0
        init = load_init_params(config, program) if config.init_from else None
        state, rest = program.init_state(int(config.seed), params=init,
                                         compiler_options=compiler_options)
    aux["rest"] = rest

    num_steps = int(config.train.num_steps)
    writer = MetricWriter(workdir, lead)
    losses: dict[int, float] = {}
    steps = None
    eval_raw = None
    sampler = None
    tokens_per_example = None
    pbar = tqdm(total=num_steps, initial=start, disable=not (progress and lead), unit="step",
                dynamic_ncols=True)
    window: list[dict] = []
    t_window = time.perf_counter()
    pending = None

    def eval_batches():
        ds = make_dataset(pipeline_config(config, config.data.eval_split, pcount), tokenize=tokenizer,
                          shard_index=pidx, shard_count=pcount)
        e_it = iter(ds)
        for _ in range(int(config.train.eval_batches)):
            yield next(e_it)

    def finish(item) -> None:
        nonlocal window, t_window
        step_no, metrics, position, raw = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite"):
            dump = None
            if lead:
                dump = os.path.join(workdir, f"nonfinite_batch_step{step_no}.npz")
                np.savez_compressed(dump, **raw)
            writer.step(step_no, m)
            raise NonFiniteLossError(step_no, position, _example_ids(raw), m, dump)
        losses[step_no] = m["loss"]
        writer.step(step_no, m)
        window.append(m)
        pbar.update(1)
        log_every = int(config.train.log_every)
        if step_no % log_every == 0 or step_no == num_steps:
            now = time.perf_counter()
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            dt = max(now - t_window, 1e-9)
            examples = len(window) * int(config.train.batch_size)
            mean["examples_per_s"] = examples / dt
            if tokens_per_example:
                mean["tokens_per_s"] = examples * tokens_per_example / dt
            writer.scalars(step_no, "train", mean)
            postfix = {"loss": f"{mean['loss']:.4f}"}
            if "tokens_per_s" in mean:
                postfix["tok/s"] = f"{mean['tokens_per_s']:.3g}"
            else:
                postfix["ex/s"] = f"{mean['examples_per_s']:.3g}"
            pbar.set_postfix(postfix)
            window, t_window = [], now

    try:
        for step in range(start, num_steps):
            position = int(it.get_state().get("next_index", step)) if hasattr(it, "get_state") else step
            raw = next(it)
            batch_host = prepare_batch(raw, config)
            batch = global_batch(batch_host, mesh, rules)
            if steps is None:
                steps = make_steps(program, loss_from_config(config), frozen_programs, batch, aux,
                                   rules=rules, gather_fsdp=bool(config.gather_fsdp),
                                   compiler_options=compiler_options)
                tokens_per_example = _tokens_per_example(config, batch, frozen_programs)
            state, metrics = steps.train(state, batch, aux)
            if pending is not None:
                finish(pending)
            pending = (step + 1, metrics, position, raw)
            step_no = step + 1
            if step_no % int(config.train.checkpoint_every) == 0 or step_no == num_steps:
                finish(pending)
                pending = None
                ckpt.save(step_no, state, config, it, force=step_no == num_steps)
            eval_every = int(config.train.eval_every)
            if eval_every and step_no % eval_every == 0:
                if pending is not None:
                    finish(pending)
                    pending = None
                key = jax.random.key_data(jax.random.key(int(config.seed) + 12345))
                rows = []
                for e_raw in eval_batches():
                    eb = global_batch(prepare_batch(e_raw, config), mesh, rules)
                    rows.append({k: float(v) for k, v in
                                 jax.device_get(steps.eval(state.params, eb, aux, key)).items()})
                ev = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                writer.scalars(step_no, "eval", ev)
                if lead:
                    writer.step(step_no, {f"eval_{k}": v for k, v in ev.items()})
            sample_every = int(config.train.sample_every)
            if sample_every and (step_no % sample_every == 0 or step_no == num_steps) and pcount == 1:
                if pending is not None:
                    finish(pending)
                    pending = None
                if sampler is None:
                    eval_raw = eval_raw or next(iter(make_dataset(
                        pipeline_config(config, config.data.eval_split, pcount), tokenize=tokenizer,
                        shard_index=pidx, shard_count=pcount)))
                    sampler = Sampler(config, program, aux, frozen_programs, eval_raw, mesh)
                grid = sampler.grid(state.params)
                if grid is not None and lead:
                    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                    from PIL import Image

                    Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step_no}.png"))
                    writer.image(step_no, "samples", grid)
        if pending is not None:
            finish(pending)
            pending = None
    finally:
        pbar.close()
        ckpt.close()
        writer.close()
        it.close() if hasattr(it, "close") else None

    model_dir = None
    final_step = max(start, num_steps)
    if lead and config.train.loss_plot:
        plot_losses(read_losses(workdir), os.path.join(workdir, "loss.png"),
                    f"{config.task} training loss")
    if config.train.export and num_steps > start:
        params = state.params
        vq_params = aux["frozen"]["vq"][0] if "vq" in aux["frozen"] else None
        if pcount > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
            vq_params = (multihost_utils.process_allgather(vq_params, tiled=True)
                         if vq_params is not None else None)
        if lead:
            training_meta = {"task": config.task, "step": final_step,
                             "timestep_convention": config.editor.get(
                                 "timestep_convention") if config.task == "editor" else None}
            if text_checkpoint is not None:
                training_meta.update(text_kind="release", text_checkpoint=text_checkpoint)
            model_dir = export_model(os.path.join(workdir, "model"), config, params,
                                     vq_params=vq_params, vq_config=vq_cfg_dict,
                                     tokenizer=tokenizer if text_checkpoint is None else None,
                                     overwrite=True, metadata={"training": training_meta})
            if text_checkpoint is not None:
                add_release_text(model_dir, text_checkpoint)
    return TrainResult(final_step=final_step, losses=losses, workdir=workdir, model_dir=model_dir)


def _tokens_per_example(config, batch, frozen_programs) -> int:
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


class _QuietOrbax:
    """Drop Orbax's per-save INFO chatter from the console (warnings and errors still show)."""

    def filter(self, record) -> bool:
        import logging as py_logging

        return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    import logging as py_logging

    py_logging.getLogger("absl").addFilter(_QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    _init_distributed()
    result = train(_CONFIG.value, _WORKDIR.value)
    import jax

    if jax.process_index() == 0:
        last = result.losses.get(result.final_step)
        print(f"done: step {result.final_step}" + (f", loss {last:.4f}" if last is not None else "")
              + (f", model in {result.model_dir}" if result.model_dir else ""))


if __name__ == "__main__":
    app.run(main)
