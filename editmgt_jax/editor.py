"""The public editing API: load a checkpoint once, edit many images.

    from editmgt_jax.editor import Editor
    editor = Editor.load("ckpt/editmgt-1024")            # or Editor.load() for the shipped model
    result = editor.edit([img1, img2], ["make the sky pink", "remove the cat"])
    result.images        # each [H, W, 3] uint8 at its input's own size: the source with the edit blended in
    result.raw_images    # each [h, w, 3] uint8: the model's output at the working size
    result.region_maps   # each [H, W] float32 in [0, 1]: where the edit was blended in
    result.heatmaps      # [B, gh, gw] float32 consolidated edit-region scores (when consolidation is on)

The model works on an aspect-preserving resize of each input to a multiple of its grid (the long
side at the working size, ``imageio.fit_to_grid``); the edited pixels are upsampled and blended into
the original source through a feathered region map (``editmgt_jax.composite``), so every pixel
outside the region is the source's own. ``composite="none"`` returns the raw model output instead.

Everything per edit is one compiled program (VQ encode -> region-hold sampling loop -> VQ decode),
compiled once per (working image shape, batch size, sampler settings) and cached; a batch of
images of different sizes runs one program per working shape, and the compositing runs per image
on the host. Parameters enter as jit arguments (graphdef/state split), replicated over the mesh;
the batch is sharded over its ``data`` axis (``Editor.load(..., mesh_shape={"data": 8})``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax import checkpoints, composite as compositing, imageio, parallel
from editmgt_jax.convert.registry import COMPONENTS
from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC, micro_conditions
from editmgt_jax.sampling.region_hold import TIMESTEP_CONVENTIONS, SamplerConfig, sample

# The official demo's negative prompt (owned by the checkpoint conventions; kept here for imports).
RELEASE_NEGATIVE_PROMPT = checkpoints.RELEASE_NEGATIVE_PROMPT

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "checkpoints", "editmgt-synthetic-64")


class EditError(ValueError):
    """Bad input to an edit (empty instruction, mismatched lengths, unusable mask); names the item."""


@dataclasses.dataclass
class EditResult:
    """What ``Editor.edit`` returns. Per-image fields are one ``[B, ...]`` array when every image of
    the batch has the same shape there, else a list of per-image arrays (inputs of different sizes)."""

    images: np.ndarray | list       # [B, H, W, 3] uint8 edited images: at each input's own size, the
                                    # source with the edit blended in; the raw output with composite='none'
    sources: np.ndarray | list      # [B, h, w, 3] uint8 sources as the model saw them (working size)
    tokens: np.ndarray | list       # [B, h', w'] int32 final token ids
    source_tokens: np.ndarray | list  # [B, h', w'] int32 token ids of the sources
    heatmaps: np.ndarray | list | None  # [B, gh, gw] float32 consolidated edit-region score, or None
    raw_images: np.ndarray | list | None = None   # [B, h, w, 3] uint8 the model's output (working size)
    region_maps: np.ndarray | list | None = None  # [B, H, W] float32 in [0, 1]: the blend weight of the
                                                  # model output (input size); None with composite='none'
    originals: np.ndarray | list | None = None    # [B, H, W, 3] uint8 the inputs at their own size
    placements: list | None = None  # per image: composite.Placement (working image <-> input pixels)
    composite: str = "changed"      # the region rule used: 'changed', 'map' or 'none'


def _stack(arrays: list):
    """One array when the shapes agree, else the list (images of different sizes)."""
    if any(a is None for a in arrays):
        return None
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else list(arrays)


def _check_instructions(instructions: Sequence[str]) -> list[str]:
    out = []
    for i, t in enumerate(instructions):
        if not isinstance(t, str):
            raise EditError(f"instruction {i}: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise EditError(f"instruction {i}: empty instruction")
        out.append(t.strip())
    return out


def _spans(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, nums = [], sorted(set(numbers))
    for x in nums:
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out)


class StepProgress:
    """Host side of the sampling loop's per-step callback: a progress bar over the steps.

    The compiled loop calls it once per step (``jax.debug.callback``: a host call per step, no
    change to the loop's arithmetic). The bar appears only once the remaining steps are expected to
    take more than ``after_s`` seconds, so short edits print nothing.
    """

    def __init__(self, after_s: float = 3.0, stream=None):
        self.after_s = after_s
        self.stream = stream
        self._lock = threading.Lock()
        self.start(0)

    def start(self, steps: int, desc: str = "sampling") -> None:
        with self._lock:
            self.steps, self.desc, self.calls, self.t0, self.bar = steps, desc, 0, None, None

    def __call__(self, *_operands) -> None:
        with self._lock:
            self.calls += 1
            done = self.calls - 1                 # called as each step begins
            now = time.monotonic()
            if self.t0 is None:
                self.t0 = now
            elif self.bar is None and self.steps and done < self.steps:
                remaining = (now - self.t0) / done * (self.steps - done)
                if remaining > self.after_s:
                    from tqdm import tqdm

                    self.bar = tqdm(total=self.steps, initial=done, desc=self.desc, unit="step", leave=False,
                                    file=self.stream or sys.stderr)
            if self.bar is not None:
                self.bar.update(min(done, self.steps) - self.bar.n)

    def finish(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.update(self.steps - self.bar.n)
                self.bar.close()
                self.bar = None


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
        # How this model must be driven (mask id, timestep convention, micro-conditions, negative
        # prompt, recommended sampler settings): the checkpoint's conventions record, the one source.
        try:
            self.conventions = checkpoints.read_conventions(self.doc)
        except checkpoints.CheckpointError as e:
            raise checkpoints.CheckpointError(f"{path}: {e}") from None
        conv = self.conventions
        self.defaults = {**conv.sampler_settings(), "resolution": conv.resolution,
                         "negative_prompt": conv.negative_prompt, "aesthetic_score": conv.aesthetic_score,
                         **dict(defaults or {})}
        if self.defaults["timestep_convention"] not in TIMESTEP_CONVENTIONS:
            raise checkpoints.CheckpointError(
                f"{path}: timestep_convention={self.defaults['timestep_convention']!r}; expected one of "
                f"{TIMESTEP_CONVENTIONS}")
        self._programs: dict = {}
        self.progress = StepProgress()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, mesh_shape: Mapping[str, int] | None = None,
             dtype=jnp.float32) -> "Editor":
        """Load a model checkpoint folder (as written by the converter or exported by training).

        ``dtype``: ``jnp.float32`` (default; parity with the official float32 pipeline) or
        ``jnp.bfloat16`` for accelerators: parameters are stored in bf16 and the matmuls run in bf16,
        while normalisation statistics, attention softmax, RoPE, timestep sinusoids and the logits
        stay float32 as in the official bf16 pipeline, and the sampler's probabilities are float32.
        """
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
        return cls(doc, {k: modules[k] for k in ("vq", "transformer")}, text, mesh=mesh, path=path)

    # ------------------------------------------------------------------ geometry
    @property
    def pixel_granularity(self) -> int:
        """Image sides must be multiples of this: VQ factor times the transformer's down-sampling."""
        return self.vq_cfg.downsample_factor * (2 if self.tr_cfg.downsample else 1)

    @property
    def default_size(self) -> int:
        return int(self.defaults.get("resolution", 1024))

    def prepare(self, image, *, size: int | None = None, policy: str = "fit", name: str | None = None) -> np.ndarray:
        """Path / bytes / PIL image / array -> ``[H, W, 3] uint8`` at a size the grid takes
        (``policy``: 'fit' keeps the aspect ratio, 'crop' takes the centre square; ``imageio``)."""
        arr = self.load_rgb(image, name=name)
        return imageio.fit_to_grid(arr, size or self.default_size, self.pixel_granularity, policy)

    @staticmethod
    def load_rgb(image, *, name: str | None = None) -> np.ndarray:
        """Path / bytes / PIL image / array -> ``[H, W, 3] uint8`` at its own size."""
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
        return arr

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
        cfg = SamplerConfig(**base)
        n = self.tr_cfg.num_blocks
        bad = [b for b in cfg.consolidation_blocks if b >= n]
        if bad:
            raise EditError(f"consolidation_blocks {_spans(bad)} out of range: this model's blocks are 0-{n - 1} "
                            f"({self.tr_cfg.num_layers} dual-stream, then single-stream)")
        return cfg

    def edit(self, images, instructions: Sequence[str] | str, *, seed: int = 0, masks=None,
             negative_prompt: str | None = None, size: int | None = None, policy: str = "fit",
             composite: str | None = None, feather: float | None = None, progress: bool = False,
             **sampler_overrides) -> EditResult:
        """Edit a batch. ``images``: a list (or one) of paths / PIL images / ``[H, W, 3]`` arrays, of
        any sizes; ``instructions``: one per image. ``masks``: optional ``[H, W]`` bool arrays (True =
        may change; at the input's or the working size) for inpainting mode. Sampler settings
        (``steps``, ``guidance_scale``, ``reference_strength``, ``hold_threshold``,
        ``consolidation_blocks``, ``greedy``, ...) override the checkpoint's.

        The model edits each image at ``size`` (default: the checkpoint's) under ``policy`` ('fit':
        long side at ``size``, aspect kept; 'crop': the centre square). ``composite`` says which
        pixels of the input take the model's output (``editmgt_jax.composite``): 'changed' (the tokens
        that changed, dilated by one token), 'map' (the edit-region map, which needs consolidation),
        or 'none' (``images`` are then the raw model output at the working size); default: the
        checkpoint's ``composite`` sampler default, else 'changed'. ``feather``: width of the soft
        seam in input pixels (default: a quarter of a token, at least 3 px).
        ``progress``: show a bar over the sampling steps (on stderr) when they take more than a few
        seconds (``StepProgress``)."""
        if isinstance(instructions, str):
            instructions = [instructions]
        if not isinstance(images, (list, tuple)):
            images = [images]
        instructions = _check_instructions(instructions)
        if len(images) != len(instructions):
            raise EditError(f"{len(images)} image(s) but {len(instructions)} instruction(s)")
        if masks is not None and len(masks) != len(images):
            raise EditError(f"{len(images)} image(s) but {len(masks)} mask(s)")
        if composite is None:
            composite = str(self.defaults.get("composite", "changed"))
        if composite not in compositing.MODES:
            raise EditError(f"composite={composite!r}: choose from {compositing.MODES}")
        if feather is not None and not feather >= 0:
            raise EditError(f"feather={feather!r}: expected a width in pixels >= 0")
        cfg = self.sampler_config(**sampler_overrides)
        if composite == "map" and not cfg.captures:
            raise EditError("composite='map' needs the edit-region map: give consolidation_blocks")
        size = size or self.default_size
        gran = self.pixel_granularity
        originals = [self.load_rgb(im, name=f"image {i}") for i, im in enumerate(images)]
        placements = [compositing.placement(o.shape[0], o.shape[1], size, gran, policy) for o in originals]
        srcs = [imageio.fit_to_grid(o, size, gran, policy) for o in originals]
        neg = negative_prompt if negative_prompt is not None else self.defaults.get("negative_prompt", "")
        txt, pooled = self.text.encode(instructions)
        ntxt, npooled = self.text.encode([neg] * len(instructions), allow_empty=True)
        keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), len(srcs))))
        f = self.vq_cfg.downsample_factor
        # one compiled program per working shape; results go back to the callers' order
        outs: list = [None] * len(srcs)
        groups: dict[tuple, list[int]] = {}
        for i, s_ in enumerate(srcs):
            groups.setdefault(s_.shape, []).append(i)
        for shape, idx in groups.items():
            src = np.stack([srcs[i] for i in idx])
            gh, gw = shape[0] // f, shape[1] // f
            inpaint = None
            if masks is not None:
                inpaint = np.stack([self._mask_to_grid(self._mask_to_work(masks[i], originals[i], size, policy),
                                                       shape[:2], (gh, gw), i) for i in idx])
            micro = np.tile(micro_conditions(shape[1], shape[0],
                                             aesthetic=float(self.defaults.get("aesthetic_score", DEFAULT_AESTHETIC))),
                            (len(idx), 1))
            self.progress.start(cfg.steps)
            try:
                out = self._run(cfg, src, txt[idx], pooled[idx], ntxt[idx], npooled[idx], micro, keys[idx],
                                inpaint, progress)
            finally:
                self.progress.finish()
            for k, i in enumerate(idx):
                outs[i] = {name: v[k] for name, v in out.items()}
        raw = [o["image"] for o in outs]
        heat = [o.get("heatmap") for o in outs]
        region_maps = finals = None
        if composite == "none":
            finals = raw
        else:
            region_maps, finals = [], []
            threshold = cfg.hold_threshold if cfg.holds else 0.5
            for i, o in enumerate(outs):
                if composite == "changed":
                    tok_mask = compositing.changed_tokens(o["tokens"], o["ref_ids"])
                else:
                    tok_mask = compositing.map_tokens(o["heatmap"], o["tokens"].shape, threshold)
                region = compositing.region_map(tok_mask, placements[i], feather)
                region_maps.append(region)
                finals.append(compositing.blend(originals[i], raw[i], region, placements[i]))
        return EditResult(images=_stack(finals), sources=_stack(srcs), tokens=_stack([o["tokens"] for o in outs]),
                          source_tokens=_stack([o["ref_ids"] for o in outs]), heatmaps=_stack(heat),
                          raw_images=_stack(raw), region_maps=None if region_maps is None else _stack(region_maps),
                          originals=_stack(originals), placements=placements, composite=composite)

    def reconstruct(self, images, *, size: int | None = None, policy: str = "fit") -> np.ndarray:
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

    def _mask_to_work(self, mask, original, size, policy) -> np.ndarray:
        """A mask at the input's size goes through the image's own resize (crop included); other
        sizes are left to ``_mask_to_grid``."""
        m = np.asarray(mask)
        m = m[..., 0] if m.ndim == 3 else m
        if m.shape != original.shape[:2]:
            return m
        rgb = np.repeat(((m > 0) * 255).astype(np.uint8)[..., None], 3, axis=-1)
        return imageio.fit_to_grid(rgb, size, self.pixel_granularity, policy)[..., 0] > 127

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

    def _on_step(self, *operands) -> None:
        self.progress(*operands)   # looked up per call: ``self.progress`` may be replaced

    def _run(self, cfg, src, txt, pooled, ntxt, npooled, micro, keys, inpaint, progress=False):
        """``keys``: ``[b, 2] uint32`` raw PRNG keys, one per image (so an image's draw does not depend on
        the other images of the call or on padding)."""
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b = len(src)
        pad = (-b) % n_dev
        arrays = [src, txt, pooled, ntxt, npooled, micro] + ([inpaint] if inpaint is not None else [])
        if pad:
            arrays = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in arrays]
            keys = np.concatenate([keys, np.repeat(keys[-1:], pad, axis=0)])
        key = jax.device_put(keys, parallel.replicated(self.mesh))
        sig = (cfg, tuple(a.shape for a in arrays), inpaint is not None, progress)
        prog = self._programs.get(sig)
        if prog is None:
            prog = self._programs[sig] = self._compile(cfg, arrays, inpaint is not None, progress)
        batch_sh = [parallel.batch_sharding(self.mesh, a.ndim) for a in arrays]
        placed = [jax.device_put(np.asarray(a), s) for a, s in zip(arrays, batch_sh)]
        out = prog(self.states, key, *placed)
        return {k: np.asarray(v)[:b] for k, v in out.items()}

    def _compile(self, cfg: SamplerConfig, arrays, has_mask: bool, progress: bool = False):
        graphdefs = self.graphdefs
        on_step = self._on_step
        mask_id = cfg.mask_token_id          # the checkpoint's conventions (sampler_config)
        n_codes = self.vq_cfg.num_vq_embeddings

        def program(states, key, src, txt, pooled, ntxt, npooled, micro, *maybe_mask):
            vq = nnx.merge(graphdefs["vq"], states["vq"])
            tr = nnx.merge(graphdefs["transformer"], states["transformer"])
            pixels = src.astype(jnp.float32) / 255.0
            ref_ids = vq.encode_ids(pixels)
            model_fn = tr
            if progress:
                def model_fn(ids, *args, **kwargs):   # one host call per step, as the step begins
                    jax.debug.callback(on_step, args[-1])
                    return tr(ids, *args, **kwargs)
            res = sample(model_fn, ref_ids, txt, pooled, ntxt, npooled, cfg, key=key, micro_conds=micro,
                         inpaint_mask=maybe_mask[0] if maybe_mask else None)
            tokens = res["tokens"]
            # leftover mask ids (and anything outside the codebook) decode as code 0, as the official
            # pipeline's decode does
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
    """Build component ``name`` from its config and restore its parameters from ``path``.

    ``dtype`` is both the parameter and the compute dtype (stored float32 parameters are cast on
    restore); float32 statistics and softmax are the modules' own business. See
    :func:`editmgt_jax.checkpoints.load_module`.
    """
    return checkpoints.load_module(path, name, cfg_dict, dtype=dtype)


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
        gd, self._state = nnx.split(encoder)
        self._fn = jax.jit(lambda st, ids: nnx.merge(gd, st)(ids))

    def encode(self, prompts: Sequence[str], allow_empty: bool = False):
        if not allow_empty:
            _check_instructions(prompts)
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


def make_text_side(path: str, doc: Mapping, modules: Mapping):
    comps = doc.get("components", {})
    if checkpoints.SMALL_TEXT in comps:
        return SmallTextSide(modules[checkpoints.SMALL_TEXT], checkpoints.word_tokenizer(path))
    if "clip" in comps and "gemma" in comps:
        return ReleaseTextSide(modules["clip"], modules["gemma"], release_tokenizer(path))
    raise checkpoints.CheckpointError(f"{path}: checkpoint has no text encoder (clip + gemma, or small_text)")


RELEASE_TOKENIZER_DIRS = checkpoints.TOKENIZER_DIRS
release_tokenizer = checkpoints.release_tokenizer
