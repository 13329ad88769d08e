"""The public editing API: load a checkpoint once, edit many images.

    from editmgt_jax.editor import Editor
    editor = Editor.load("ckpt/editmgt-1024")            # or Editor.load() for the shipped model
    result = editor.edit([img1, img2], ["make the sky pink", "remove the cat"])
    result.images        # [B, H, W, 3] uint8
    result.heatmaps      # [B, gh, gw] float32 consolidated edit-region scores (when consolidation is on)

Everything per edit is one compiled program (VQ encode -> region-hold sampling loop -> VQ decode),
compiled once per (image shape, batch size, sampler settings) and cached. Parameters enter as jit
arguments (graphdef/state split), replicated over the mesh; the batch is sharded over its
``data`` axis (``Editor.load(..., mesh_shape={"data": 8})``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax import checkpoints, imageio, parallel
from editmgt_jax.convert.registry import COMPONENTS
from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC, micro_conditions
from editmgt_jax.sampling.region_hold import TIMESTEP_CONVENTIONS, SamplerConfig, sample

# Defaults of the official demo for the released 1024 px model.
RELEASE_NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, "
                           "text, jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "checkpoints", "editmgt-synthetic-64")


class EditError(ValueError):
    """Bad input to an edit (empty instruction, mismatched lengths, unusable mask); names the item."""


@dataclasses.dataclass
class EditResult:
    images: np.ndarray              # [B, H, W, 3] uint8 edited images
    sources: np.ndarray             # [B, H, W, 3] uint8 sources as the model saw them (after resizing)
    tokens: np.ndarray              # [B, h, w] int32 final token ids
    source_tokens: np.ndarray       # [B, h, w] int32 token ids of the sources
    heatmaps: np.ndarray | None     # [B, gh, gw] float32 consolidated edit-region score, or None


def _check_instructions(instructions: Sequence[str]) -> list[str]:
    out = []
    for i, t in enumerate(instructions):
        if not isinstance(t, str):
            raise EditError(f"instruction {i}: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise EditError(f"instruction {i}: empty instruction")
        out.append(t.strip())
    return out


class Editor:
    """A loaded model: VQ tokenizer, transformer and text side, plus compiled edit programs."""

    def __init__(self, doc: Mapping, modules: Mapping[str, nnx.Module], text, *, mesh=None,
                 defaults: Mapping | None = None, path: str | None = None):
        self.doc = dict(doc)
        self.path = path
        self.mesh = mesh or parallel.make_mesh({"data": 1}, jax.devices()[:1])
        self.text = text
        self.graphdefs, states = {}, {}
        for name, m in modules.items():
            self.graphdefs[name], states[name] = nnx.split(m)
        rep = parallel.replicated(self.mesh)
        self.states = jax.device_put(states, rep)
        self.vq_cfg = modules["vq"].cfg
        self.tr_cfg = modules["transformer"].cfg
        self.defaults = dict(defaults or {})
        # The timestep the transformer was trained for (see SamplerConfig.timestep_convention).
        convention = self.defaults.get("timestep_convention", self.doc.get("timestep_convention",
                                                                           "step_index"))
        if convention not in TIMESTEP_CONVENTIONS:
            raise checkpoints.CheckpointError(
                f"{path}: config.json timestep_convention={convention!r}; expected one of "
                f"{TIMESTEP_CONVENTIONS}")
        self.defaults["timestep_convention"] = convention
        self._programs: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, mesh_shape: Mapping[str, int] | None = None,
             dtype=jnp.float32) -> "Editor":
        """Load a model checkpoint folder (as written by the converter or exported by training)."""
        if path is None:
            path = DEFAULT_CHECKPOINT
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise checkpoints.CheckpointError(
                    f"no checkpoint given and no default model at {path}; pass a model checkpoint "
                    f"(python -m editmgt_jax.convert --official RELEASE --out CKPT, or a training run's "
                    f"WORKDIR/model)")
        path = os.fspath(path)
        doc = checkpoints.read_config(path)
        comps = doc.get("components", {})
        for need in ("vq", "transformer"):
            if need not in comps:
                raise checkpoints.CheckpointError(f"{path}: checkpoint has no {need!r} component")
        modules = {}
        for name, cfg_dict in comps.items():
            if name not in COMPONENTS and name != "small_text":
                continue
            modules[name] = load_module(path, name, cfg_dict, dtype=dtype)
        text = make_text_side(path, doc, modules)
        mesh = parallel.make_mesh(mesh_shape) if mesh_shape else None
        return cls(doc, {k: modules[k] for k in ("vq", "transformer")}, text, mesh=mesh,
                   defaults=doc.get("sampler_defaults", {}), path=path)

    # ------------------------------------------------------------------ geometry
    @property
    def pixel_granularity(self) -> int:
        """Image sides must be multiples of this: VQ factor times the transformer's down-sampling."""
        return self.vq_cfg.downsample_factor * (2 if self.tr_cfg.downsample else 1)

    @property
    def default_size(self) -> int:
        return int(self.defaults.get("resolution", 1024))

    def prepare(self, image, *, size: int | None = None, policy: str = "crop", name: str | None = None) -> np.ndarray:
        """Path / bytes / PIL image / array -> ``[H, W, 3] uint8`` at a size the grid takes."""
        if isinstance(image, (str, os.PathLike)):
            arr = imageio.load_image(image, name=f"{name} ({os.fspath(image)})" if name else None)
        elif isinstance(image, (bytes, bytearray)):
            arr = imageio.load_image(image, name=name)
        elif hasattr(image, "mode") and hasattr(image, "size"):
            arr = imageio.to_rgb8(image, name or "<PIL image>")
        else:
            arr = np.asarray(image)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
                raise EditError(f"{name or 'image'}: expected [H, W, 3] array, got shape {arr.shape}")
            if arr.dtype != np.uint8:
                if np.issubdtype(arr.dtype, np.floating):
                    arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
                else:
                    arr = np.clip(arr, 0, 255).astype(np.uint8)
            arr = arr[..., :3]
        return imageio.fit_to_grid(arr, size or self.default_size, self.pixel_granularity, policy)

    # ------------------------------------------------------------------ editing
    def sampler_config(self, **overrides) -> SamplerConfig:
        known = {f.name for f in dataclasses.fields(SamplerConfig)}
        base = {k: v for k, v in self.defaults.items() if k in known}
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in known:
                raise EditError(f"unknown sampler setting {k!r}; known: {sorted(known)}")
            base[k] = tuple(v) if isinstance(v, list) else v
        return SamplerConfig(**base)

    def edit(self, images, instructions: Sequence[str] | str, *, seed: int = 0, masks=None,
             negative_prompt: str | None = None, size: int | None = None, policy: str = "crop",
             **sampler_overrides) -> EditResult:
        """Edit a batch. ``images``: a list (or one) of paths / PIL images / ``[H, W, 3]`` arrays;
        ``instructions``: one per image. ``masks``: optional ``[H, W]`` bool arrays (True = may change)
        for inpainting mode. Sampler settings (``steps``, ``guidance_scale``, ``reference_strength``,
        ``hold_threshold``, ``consolidation_blocks``, ``greedy``, ...) override the checkpoint's."""
        if isinstance(instructions, str):
            instructions = [instructions]
        if not isinstance(images, (list, tuple)):
            images = [images]
        instructions = _check_instructions(instructions)
        if len(images) != len(instructions):
            raise EditError(f"{len(images)} image(s) but {len(instructions)} instruction(s)")
        if masks is not None and len(masks) != len(images):
            raise EditError(f"{len(images)} image(s) but {len(masks)} mask(s)")
        cfg = self.sampler_config(**sampler_overrides)
        srcs = [self.prepare(im, size=size, policy=policy, name=f"image {i}") for i, im in enumerate(images)]
        shapes = {s.shape for s in srcs}
        if len(shapes) > 1:
            raise EditError(f"images of one batch must share a size after resizing, got {sorted(shapes)}; "
                            f"use policy='crop' or edit them in separate calls")
        src = np.stack(srcs)
        neg = negative_prompt if negative_prompt is not None else self.defaults.get("negative_prompt", "")
        txt, pooled = self.text.encode(instructions)
        ntxt, npooled = self.text.encode([neg] * len(instructions), allow_empty=True)
        gh, gw = src.shape[1] // self.vq_cfg.downsample_factor, src.shape[2] // self.vq_cfg.downsample_factor
        inpaint = None
        if masks is not None:
            inpaint = np.stack([self._mask_to_grid(m, src.shape[1:3], (gh, gw), i) for i, m in enumerate(masks)])
        micro = np.tile(micro_conditions(src.shape[2], src.shape[1],
                                         aesthetic=float(self.defaults.get("aesthetic_score", DEFAULT_AESTHETIC))),
                        (len(src), 1))
        key = jax.random.key(seed)
        out = self._run(cfg, src, txt, pooled, ntxt, npooled, micro, key, inpaint)
        return EditResult(images=out["image"], sources=src, tokens=out["tokens"], source_tokens=out["ref_ids"],
                          heatmaps=out.get("heatmap"))

    def reconstruct(self, images, *, size: int | None = None, policy: str = "crop") -> np.ndarray:
        """VQ round trip of the sources (encode, then decode the same ids): ``[B, H, W, 3] uint8``.

        The image an edit that keeps every source token decodes to: the ceiling for how close an
        edit can stay to the source outside the edited region. Images are prepared as in ``edit``.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        srcs = [self.prepare(im, size=size, policy=policy, name=f"image {i}") for i, im in enumerate(images)]
        if len({s.shape for s in srcs}) > 1:
            raise EditError(f"images of one batch must share a size after resizing, got "
                            f"{sorted({s.shape for s in srcs})}")
        src = np.stack(srcs)
        sig = ("reconstruct", src.shape)
        prog = self._programs.get(sig)
        if prog is None:
            graphdef = self.graphdefs["vq"]

            def program(state, pixels):
                vq = nnx.merge(graphdef, state)
                ids = vq.encode_ids(pixels.astype(jnp.float32) / 255.0)
                return jnp.round(jnp.clip(vq.decode_ids(ids), 0.0, 1.0) * 255.0).astype(jnp.uint8)

            prog = self._programs[sig] = jax.jit(program)
        return np.asarray(prog(self.states["vq"], src))

    @staticmethod
    def _mask_to_grid(mask, hw, grid, i) -> np.ndarray:
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m[..., 0]
        if m.shape != tuple(hw):
            from PIL import Image

            m = np.asarray(Image.fromarray((m > 0).astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST))
        m = m > 0
        fy, fx = hw[0] // grid[0], hw[1] // grid[1]
        g = m.reshape(grid[0], fy, grid[1], fx).any(axis=(1, 3))
        if not g.any():
            raise EditError(f"mask {i}: selects no pixels")
        return g

    def _run(self, cfg, src, txt, pooled, ntxt, npooled, micro, key, inpaint):
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b = len(src)
        pad = (-b) % n_dev
        arrays = [src, txt, pooled, ntxt, npooled, micro] + ([inpaint] if inpaint is not None else [])
        if pad:
            arrays = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in arrays]
        sig = (cfg, tuple(a.shape for a in arrays), inpaint is not None)
        prog = self._programs.get(sig)
        if prog is None:
            prog = self._programs[sig] = self._compile(cfg, arrays, inpaint is not None)
        batch_sh = [parallel.batch_sharding(self.mesh, a.ndim) for a in arrays]
        placed = [jax.device_put(np.asarray(a), s) for a, s in zip(arrays, batch_sh)]
        out = prog(self.states, key, *placed)
        return {k: np.asarray(v)[:b] for k, v in out.items()}

    def _compile(self, cfg: SamplerConfig, arrays, has_mask: bool):
        graphdefs = self.graphdefs
        mask_id = self.tr_cfg.vocab_size - 1
        n_codes = self.vq_cfg.num_vq_embeddings

        def program(states, key, src, txt, pooled, ntxt, npooled, micro, *maybe_mask):
            vq = nnx.merge(graphdefs["vq"], states["vq"])
            tr = nnx.merge(graphdefs["transformer"], states["transformer"])
            pixels = src.astype(jnp.float32) / 255.0
            ref_ids = vq.encode_ids(pixels)
            res = sample(tr, ref_ids, txt, pooled, ntxt, npooled, cfg, key=key, micro_conds=micro,
                         inpaint_mask=maybe_mask[0] if maybe_mask else None)
            tokens = res["tokens"]
            safe = jnp.where((tokens >= n_codes) | (tokens == mask_id), 0, tokens)
            img = jnp.clip(vq.decode_ids(safe), 0.0, 1.0)
            out = {"image": jnp.round(img * 255.0).astype(jnp.uint8), "tokens": tokens, "ref_ids": ref_ids}
            if res.get("heatmap") is not None:
                out["heatmap"] = res["heatmap"]
            return out

        rep = parallel.replicated(self.mesh)
        in_sh = (rep, rep) + tuple(parallel.batch_sharding(self.mesh, a.ndim) for a in arrays)
        return jax.jit(program, in_shardings=in_sh)


# ---------------------------------------------------------------------- components
def load_module(path: str, name: str, cfg_dict: Mapping, *, dtype=jnp.float32) -> nnx.Module:
    """Build component ``name`` from its config and restore its parameters from ``path``."""
    if name == "small_text":
        from editmgt_jax.models.text.small import SmallTextConfig, SmallTextEncoder

        cfg = SmallTextConfig.from_dict(cfg_dict)
        abstract = nnx.eval_shape(lambda: SmallTextEncoder(cfg, rngs=nnx.Rngs(0)))
    else:
        comp = COMPONENTS[name]
        config_cls, model_cls = comp.classes()
        try:
            cfg = config_cls.from_dict(cfg_dict)
        except (TypeError, ValueError, KeyError) as e:
            raise checkpoints.CheckpointError(f"{path}: config of component {name!r} is not valid: {e}") from e
        abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    params = checkpoints.load_component(path, name, state.to_pure_dict())
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


class ReleaseTextSide:
    """CLIP pooled vector + Gemma-2 penultimate hidden states, tokenised from the checkpoint's files.

    The encoding is ``editmgt_jax.models.text.release.ReleaseTextEncoder``, the module the trainer
    runs frozen inside its step (``editor.text.kind = "release"``).
    """

    def __init__(self, clip, gemma, tokenizer):
        from editmgt_jax.models.text.release import ReleaseTextEncoder

        self.tokenizer = tokenizer
        gd, self._state = nnx.split(ReleaseTextEncoder(clip, gemma))
        self._fn = jax.jit(lambda st, clip_ids, gemma_ids: nnx.merge(gd, st)(clip_ids, gemma_ids))

    def encode_ids(self, clip_ids, gemma_ids):
        """Token ids (``PromptTokenizer`` output) -> ``(states [B, L, D], pooled [B, P])`` numpy."""
        states, pooled = self._fn(self._state, jnp.asarray(clip_ids), jnp.asarray(gemma_ids))
        return np.asarray(states), np.asarray(pooled)

    def encode(self, prompts: Sequence[str], allow_empty: bool = False):
        ids = self.tokenizer(list(prompts), allow_empty=allow_empty)
        return self.encode_ids(ids["clip_ids"], ids["gemma_ids"])


class SmallTextSide:
    """A small jointly-trained text encoder with a word-level tokenizer (the shipped model)."""

    def __init__(self, encoder, tokenizer):
        self.tokenizer = tokenizer
        gd, self._state = nnx.split(encoder)
        self._fn = jax.jit(lambda st, ids: nnx.merge(gd, st)(ids))

    def encode(self, prompts: Sequence[str], allow_empty: bool = False):
        if not allow_empty:
            _check_instructions(prompts)
        ids = self.tokenizer(list(prompts))
        ids = ids["ids"] if isinstance(ids, Mapping) else ids
        states, pooled = self._fn(self._state, jnp.asarray(ids))
        return np.asarray(states), np.asarray(pooled)


def make_text_side(path: str, doc: Mapping, modules: Mapping):
    comps = doc.get("components", {})
    if "small_text" in comps:
        from editmgt_jax.models.text.word_tokenizer import WordTokenizer

        tok = WordTokenizer.load(os.path.join(path, "vocab.txt"))
        return SmallTextSide(modules["small_text"], tok)
    if "clip" in comps and "gemma" in comps:
        return ReleaseTextSide(modules["clip"], modules["gemma"], release_tokenizer(path))
    raise checkpoints.CheckpointError(f"{path}: checkpoint has no text encoder (clip + gemma, or small_text)")


RELEASE_TOKENIZER_DIRS = ("tokenizer", "llm_tokenizer")


def release_tokenizer(path: str):
    """The ``PromptTokenizer`` of a checkpoint with ``clip`` + ``gemma`` components (its
    ``tokenizer/`` and ``llm_tokenizer/`` folders)."""
    from editmgt_jax.models.text.tokenize import PromptTokenizer

    tok_dir, llm_dir = (os.path.join(path, d) for d in RELEASE_TOKENIZER_DIRS)
    if not (os.path.isdir(tok_dir) and os.path.isdir(llm_dir)):
        raise checkpoints.CheckpointError(
            f"{path}: the text encoders need tokenizer files in tokenizer/ and llm_tokenizer/ "
            f"(the converter copies them from the release's tokenizer/ and llm_encoder/ folders)")
    return PromptTokenizer.from_dirs(tok_dir, llm_dir)
