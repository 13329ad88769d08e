"""editmgt-jax model checkpoint -> the official release layout (PyTorch / diffusers / transformers).

``python -m editmgt_jax.convert --to-official CKPT OUT`` writes the folders the official code loads
with ``from_pretrained(OUT, subfolder=...)``:

    OUT/editmgt/        config.json + diffusion_pytorch_model.safetensors   (Transformer2DModel)
    OUT/vqvae/          config.json + diffusion_pytorch_model.safetensors   (diffusers VQModel)
    OUT/text_encoder/   config.json + model.safetensors     (CLIPTextModelWithProjection; if present)
    OUT/llm_encoder/    config.json + model.safetensors + the Gemma-2 tokenizer files (if present)
    OUT/tokenizer/      the CLIP tokenizer files (if present)
    OUT/scheduler/      scheduler_config.json: the mask token id of the checkpoint's conventions

The key tables are the converter's (``editmgt_jax/convert/{transformer,vq,clip,gemma2}.py``) read
backwards: each rule's target becomes a pattern over our parameter paths and its source pattern a
template for the official key, and each layout transform is undone. Every exported key is converted
forward again and must land on the parameter it came from, so a table that cannot be read backwards
fails here instead of writing a wrong file. Tensors keep the checkpoint's dtype and values: official
-> ours -> official is bit-identical.

Configs: the converter records each official ``config.json`` in the checkpoint; the exporter writes it
back, with the fields our config models taken from the checkpoint's config. A checkpoint without the
record (trained here) gets the official fields from its config and the official release's values for
the fields it does not model (:data:`UNMODELLED`). Configs with no official equivalent (an FSQ or
patch-encoder VQ, RoPE theta other than 10000, the small text encoder) are refused with the field named.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping

import jax
import numpy as np

from editmgt_jax import checkpoints
from editmgt_jax.convert.core import ConversionError, Rule, conv, conv_transpose, identity, linear
from editmgt_jax.convert.registry import COMPONENTS, abstract_params
from editmgt_jax.folders import writing_folder

# Our component -> (official folder, weights file stem, library writing it). The official code
# loads the transformer from ``editmgt/`` (``src/editmgt.py``).
LAYOUT = {
    "transformer": ("editmgt", "diffusion_pytorch_model", "diffusers"),
    "vq": ("vqvae", "diffusion_pytorch_model", "diffusers"),
    "clip": ("text_encoder", "model", "transformers"),
    "gemma": ("llm_encoder", "model", "transformers"),
}
# Checkpoint tokenizer folder -> official folder (the official code reads the Gemma-2 tokenizer from
# ``llm_encoder/``).
TOKENIZER_LAYOUT = {"tokenizer": "tokenizer", "llm_tokenizer": "llm_encoder"}
# Shard sizes the libraries' ``save_pretrained`` default to (diffusers 10 GB, transformers 5 GB).
MAX_SHARD_BYTES = {"diffusers": 10 * 10**9, "transformers": 5 * 10**9}
# The official code's library versions (``requirements.txt``), written into configs made from scratch.
DIFFUSERS_VERSION = "0.32.1"
TRANSFORMERS_VERSION = "4.47.1"

# Fields of the official configs that our configs do not model: the values the official release
# uses, written when the checkpoint has no recorded official config.
UNMODELLED: dict[str, dict] = {
    "transformer": {"_class_name": "Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
                    "guidance_embeds": False, "in_channels": 64, "patch_size": 1},
    "vq": {"_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION, "force_upcast": True,
           "lookup_from_codebook": True, "norm_type": "group", "sample_size": 32, "scaling_factor": 0.18215},
    "clip": {"architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0,
             "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model",
             "pad_token_id": 1, "transformers_version": TRANSFORMERS_VERSION},
    "gemma": {"architectures": ["Gemma2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
              "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
              "initializer_range": 0.02, "max_position_embeddings": 8192, "model_type": "gemma2",
              "pad_token_id": 0, "transformers_version": TRANSFORMERS_VERSION, "use_cache": True},
    "scheduler": {"_class_name": "Scheduler", "_diffusers_version": DIFFUSERS_VERSION},
}
# Metadata key of config.json under which the converter records the official configs.
OFFICIAL_CONFIGS = "official_configs"


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- inverted key tables
_INVERSE = {identity: identity,
            linear: lambda k: np.ascontiguousarray(k.T),
            conv: lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)),
            conv_transpose: lambda k: np.ascontiguousarray(k.transpose(2, 3, 0, 1))}


def _parse_source(pattern: str) -> tuple[list, str]:
    """Split a rule's source regex into literal text and capturing groups: ``(pieces, where)``,
    pieces being ``str`` (literal) or ``int`` (group number); the groups' own patterns are returned
    in ``groups``. Only escaped or plain literal characters and non-nested groups are allowed."""
    pieces: list = []
    groups: list[str] = []
    i = 0
    lit = ""
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1]
            if nxt.isalnum():
                raise ConversionError(f"rule {pattern!r}: class {c}{nxt} outside a group cannot be inverted")
            lit += nxt
            i += 2
        elif c == "(":
            depth, j = 1, i + 1
            while depth:
                if pattern[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
            inner = pattern[i + 1:j - 1]
            if "(" in inner.replace("\\(", "") or inner.startswith("?"):
                raise ConversionError(f"rule {pattern!r}: nested or non-capturing group cannot be inverted")
            if lit:
                pieces.append(lit)
                lit = ""
            groups.append(inner)
            pieces.append(len(groups))
            i = j
        elif c in ".*+?[]{}|^$":
            raise ConversionError(f"rule {pattern!r}: {c!r} outside a group cannot be inverted")
        else:
            lit += c
            i += 1
    if lit:
        pieces.append(lit)
    return pieces, groups


class InverseRule:
    """One :class:`~editmgt_jax.convert.core.Rule` read backwards: our path -> official key."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.pieces, groups = _parse_source(rule.source)
        # The target template as a regex over our paths: literals escaped, \N -> the group's pattern.
        parts, seen, pos = [], set(), 0
        for m in re.finditer(r"\\(\d+)", rule.target):
            parts.append(re.escape(rule.target[pos:m.start()]))
            n = int(m.group(1))
            parts.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>{groups[n - 1]})")
            seen.add(n)
            pos = m.end()
        parts.append(re.escape(rule.target[pos:]))
        missing = set(range(1, len(groups) + 1)) - seen
        if missing:
            raise ConversionError(f"rule {rule.source!r} -> {rule.target!r}: group(s) {sorted(missing)} "
                                  f"do not appear in the target; the official key cannot be rebuilt")
        self.pattern = re.compile("".join(parts))
        if rule.transform not in _INVERSE:
            raise ConversionError(f"rule {rule.source!r}: no inverse for its layout transform")
        self.inverse = _INVERSE[rule.transform]

    def official_key(self, path: str) -> str | None:
        m = self.pattern.fullmatch(path)
        if m is None:
            return None
        return "".join(p if isinstance(p, str) else m.group(f"g{p}") for p in self.pieces)


def invert_rules(rules) -> list[InverseRule]:
    """The rules with a target (those reading official keys into our parameters), read backwards."""
    return [InverseRule(r) for r in rules if r.target is not None]


def _flat(tree, prefix=()) -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        p = prefix + (str(k),)
        if isinstance(v, Mapping):
            out.update(_flat(v, p))
        else:
            out["/".join(p)] = v
    return out


def export_tensors(params: Mapping, rules, *, component: str = "model") -> dict[str, np.ndarray]:
    """Our parameters (nested dicts of arrays) -> ``{official key: array}`` in the official layout.

    Raises :class:`ConversionError` naming every parameter no rule covers, every key two parameters
    would share, and every exported key the forward table would not read back onto its parameter."""
    inverse = invert_rules(rules)
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unmapped, twice, not_back = [], [], []
    for path, value in _flat(params).items():
        for inv in inverse:
            key = inv.official_key(path)
            if key is not None:
                break
        else:
            unmapped.append(path)
            continue
        back = next((t for t in (r.match(key) for r in rules) if t is not False), False)
        if back != path:
            not_back.append(f"{path} -> {key} -> {back}")
            continue
        if key in out:
            twice.append(f"{key} (from {origin[key]} and {path})")
            continue
        out[key] = inv.inverse(np.asarray(value))
        origin[key] = path
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} parameter(s) no rule maps to an official key: " + ", ".join(sorted(unmapped)))
    if twice:
        problems.append(f"{len(twice)} official key(s) produced twice: " + "; ".join(sorted(twice)))
    if not_back:
        problems.append(f"{len(not_back)} key(s) that would not convert back to their parameter: "
                        + "; ".join(sorted(not_back)))
    if problems:
        raise ConversionError(f"{component}: cannot export to the official layout:\n  - " + "\n  - ".join(problems))
    return out


# ----------------------------------------------------------------------------- configs
def _dtype_name(dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(np.dtype(dtype).name,
                                                                                      np.dtype(dtype).name)


def official_fields(name: str, cfg, *, torch_dtype: str = "float32") -> dict:
    """The official ``config.json`` fields that our config ``cfg`` of component ``name`` determines.
    Raises :class:`ConversionError` naming a value the official model cannot express."""
    bad = []
    if name == "transformer":
        if cfg.rope_theta != 10000.0:
            bad.append(f"rope_theta={cfg.rope_theta} (the official transformer fixes 10000)")
        if cfg.mlp_ratio != 4:
            bad.append(f"mlp_ratio={cfg.mlp_ratio} (the official transformer fixes 4)")
        out = {"attention_head_dim": cfg.attention_head_dim, "axes_dims_rope": list(cfg.axes_dims_rope),
               "codebook_size": cfg.codebook_size, "connector_type": cfg.connector_type,
               "downsample": cfg.downsample, "upsample": cfg.downsample,
               "joint_attention_dim": cfg.joint_attention_dim, "num_attention_heads": cfg.num_attention_heads,
               "num_layers": cfg.num_layers, "num_single_layers": cfg.num_single_layers,
               "pooled_projection_dim": cfg.pooled_projection_dim,
               "text_encoder_architecture": cfg.text_encoder_architecture, "vocab_size": cfg.vocab_size}
    elif name == "vq":
        if cfg.quantizer != "vq":
            bad.append(f"quantizer={cfg.quantizer!r} (diffusers' VQModel has a codebook, no FSQ)")
        if cfg.encoder != "conv":
            bad.append(f"encoder={cfg.encoder!r} (diffusers' VQModel has the convolutional encoder only)")
        n = len(cfg.block_out_channels)
        out = {"act_fn": cfg.act_fn, "block_out_channels": list(cfg.block_out_channels),
               "down_block_types": ["DownEncoderBlock2D"] * n, "in_channels": cfg.in_channels,
               "latent_channels": cfg.latent_channels, "layers_per_block": cfg.layers_per_block,
               "mid_block_add_attention": cfg.mid_block_add_attention, "norm_num_groups": cfg.norm_num_groups,
               "num_vq_embeddings": cfg.num_vq_embeddings, "out_channels": cfg.out_channels,
               "up_block_types": ["UpDecoderBlock2D"] * n, "vq_embed_dim": cfg.vq_embed_dim}
    elif name == "clip":
        out = {k: getattr(cfg, k) for k in ("eos_token_id", "hidden_act", "hidden_size", "intermediate_size",
                                            "layer_norm_eps", "max_position_embeddings", "num_attention_heads",
                                            "num_hidden_layers", "projection_dim", "vocab_size")}
        out["torch_dtype"] = torch_dtype
    elif name == "gemma":
        if cfg.num_layers_built != cfg.num_hidden_layers:
            bad.append(f"num_layers_used={cfg.num_layers_used} (the checkpoint lacks decoder layer "
                       f"{cfg.num_hidden_layers - 1} and the final norm that Gemma2ForCausalLM needs)")
        out = {k: getattr(cfg, k) for k in ("attention_bias", "attn_logit_softcapping", "head_dim",
                                            "hidden_activation", "hidden_size", "intermediate_size",
                                            "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                                            "query_pre_attn_scalar", "rms_norm_eps", "rope_theta",
                                            "sliding_window", "vocab_size")}
        if cfg.layer_types is not None:
            out["layer_types"] = list(cfg.layer_types)
        out["torch_dtype"] = torch_dtype
    else:
        raise ConversionError(f"component {name!r} has no official counterpart (the official model has "
                              f"transformer, vq, clip and gemma)")
    if bad:
        raise ConversionError(f"{name}: no official equivalent for " + "; ".join(bad))
    return out


def official_config(name: str, cfg, recorded: Mapping | None = None, *, torch_dtype: str = "float32") -> dict:
    """The official ``config.json`` of component ``name``: ``recorded`` (the release's own, kept by the
    converter) or :data:`UNMODELLED`, with every field our config models set from ``cfg``. A recorded
    value equal to ours (``16`` for ``16.0``) is kept as recorded."""
    out = dict(UNMODELLED[name]) if recorded is None else dict(recorded)
    for k, v in official_fields(name, cfg, torch_dtype=torch_dtype).items():
        if k not in out or out[k] != v or type(out[k]) is bool and type(v) is not bool:
            out[k] = v
    return out if recorded is not None else dict(sorted(out.items()))


# ----------------------------------------------------------------------------- writing
def _save_safetensors(folder: str, stem: str, library: str, tensors: dict[str, np.ndarray],
                      max_shard_bytes: int | None = None) -> list[str]:
    """Write ``tensors`` as ``stem.safetensors``, or as ``stem-0000i-of-0000n.safetensors`` shards with
    ``stem.safetensors.index.json`` when over the library's shard size (``save_pretrained``'s names)."""
    from safetensors.numpy import save_file

    limit = MAX_SHARD_BYTES[library] if max_shard_bytes is None else max_shard_bytes
    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for k, v in tensors.items():
        if shards[-1] and used + v.nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][k] = v
        used += v.nbytes
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        save_file(shards[0], os.path.join(folder, name), metadata={"format": "pt"})
        return [name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")
    return names


def _write_json(path: str, doc: Mapping) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.write("\n")


# What an exported folder may hold (so --overwrite never deletes anything else).
_EXPORT_ENTRIES = frozenset({*(f for f, _, _ in LAYOUT.values()), *TOKENIZER_LAYOUT.values(), "scheduler",
                             "README.md"})


def _check_out(out_dir: str, overwrite: bool) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ConversionError(f"{out_dir}: exists and is not a folder")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise ConversionError(f"{out_dir}: already exists (pass --overwrite)")
    foreign = sorted(set(os.listdir(out_dir)) - _EXPORT_ENTRIES)
    if foreign:
        raise ConversionError(f"{out_dir}: exists and holds {foreign[:5]}, which an export does not write; "
                              f"not replacing it, choose another folder")


def export_official(ckpt: str, out_dir: str, *, components=None, overwrite: bool = False,
                    max_shard_bytes: int | None = None, log: Callable[[str], None] = _log) -> str:
    """Write the model checkpoint ``ckpt`` as an official release folder at ``out_dir``.

    ``components``: a subset of ``transformer, vq, clip, gemma`` (default: those the checkpoint has;
    the transformer and the VQ are required then). Tokenizer folders and the scheduler config are
    written when the checkpoint has them. Written into a temporary sibling folder and renamed when
    complete: a failed export leaves ``out_dir`` as it was.
    """
    from editmgt_jax.checkpoints.layout import SMALL_TEXT

    ckpt = os.fspath(ckpt)
    try:
        doc = checkpoints.read_config(ckpt)
    except checkpoints.CheckpointError as e:
        raise ConversionError(str(e)) from None
    comps = doc.get("components", {})
    if components:
        unknown = [n for n in components if n not in LAYOUT]
        if unknown:
            raise ConversionError(f"unknown component(s) {unknown}; choose from {list(LAYOUT)}")
        absent = [n for n in components if n not in comps]
        if absent:
            raise ConversionError(f"{ckpt}: has no {absent} component(s) (it has {sorted(comps)})")
        names = list(components)
    else:
        absent = [n for n in ("transformer", "vq") if n not in comps]
        if absent:
            raise ConversionError(f"{ckpt}: has no {' or '.join(absent)} component; the official layout needs "
                                  f"both (or choose --components)")
        names = [n for n in LAYOUT if n in comps]
        if SMALL_TEXT in comps:
            log(f"[export] {SMALL_TEXT}: the small text encoder has no official counterpart, not exported")
    recorded = doc.get(OFFICIAL_CONFIGS) or {}
    cfgs = {}
    for n in names:   # every config checked before anything is written
        cfgs[n] = checkpoints.component_config(n, comps[n], ckpt)
        official_fields(n, cfgs[n])
    try:
        conventions = checkpoints.read_conventions(doc) if "transformer" in comps else None
    except checkpoints.CheckpointError as e:
        raise ConversionError(str(e)) from None
    if conventions is not None and conventions.timestep_convention != "step_index":
        log(f"[export] note: this transformer was trained with timestep convention "
            f"{conventions.timestep_convention!r}; the official pipeline passes the step index, so drive "
            f"it with this code or expect other outputs")
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out(out_dir, overwrite)
    with writing_folder(out_dir) as tmp:
        for n in names:
            folder, stem, library = LAYOUT[n]
            comp, cfg = COMPONENTS[n], cfgs[n]
            params = checkpoints.load_component(ckpt, n)
            lcfg = checkpoints.lora_of(ckpt) if n == "transformer" else None
            if lcfg is not None:   # a LoRA fine-tune: its adapters merged at scale 1
                from editmgt_jax.models.lora import merge_adapters

                params = jax.tree.map(np.asarray, merge_adapters(params, lcfg, 1.0))
                log(f"[export] transformer: LoRA adapters (rank {lcfg.rank}, alpha {lcfg.alpha:g}) merged at scale 1")
            _check_params(ckpt, n, params, abstract_params(comp, cfg))
            tensors = export_tensors(params, comp.rules(cfg), component=n)
            del params
            dtypes = {v.dtype for v in tensors.values()}
            torch_dtype = _dtype_name(dtypes.pop()) if len(dtypes) == 1 else "float32"
            os.makedirs(os.path.join(tmp, folder))
            files = _save_safetensors(os.path.join(tmp, folder), stem, library, tensors, max_shard_bytes)
            _write_json(os.path.join(tmp, folder, "config.json"),
                        official_config(n, cfg, recorded.get(n), torch_dtype=torch_dtype))
            count = sum(int(v.size) for v in tensors.values())
            del tensors
            log(f"[export] {n}: {folder}/ ({len(files)} file(s), {count:,} parameters)")
        for src, dest in TOKENIZER_LAYOUT.items():
            s = os.path.join(ckpt, src)
            if os.path.isdir(s):
                shutil.copytree(s, os.path.join(tmp, dest), dirs_exist_ok=True)
                log(f"[export] {src}/ -> {dest}/")
        if conventions is not None:
            sched = dict(recorded.get("scheduler") or UNMODELLED["scheduler"])
            sched.update(mask_token_id=conventions.mask_token_id, masking_schedule=conventions.masking_schedule)
            os.makedirs(os.path.join(tmp, "scheduler"), exist_ok=True)
            _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
            log(f"[export] scheduler/: mask token id {conventions.mask_token_id}")
    log(f"[export] wrote {out_dir}")
    return out_dir


def _check_params(ckpt: str, name: str, params: Mapping, abstract: Mapping) -> None:
    have = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
    want = {k: tuple(v.shape) for k, v in _flat(abstract).items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: stored {have[k]}, config expects {want[k]}" for k in sorted(set(have) & set(want))
                 if have[k] != want[k]]
    if problems:
        raise ConversionError(f"{ckpt}: component {name!r} does not match its config: " + "; ".join(problems[:12]))
