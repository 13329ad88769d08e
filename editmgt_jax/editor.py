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
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from editmgt_jax import checkpoints, compile_cache, composite as compositing, hub, imageio, parallel
from editmgt_jax.assets import DEFAULT_MODEL
from editmgt_jax.edit_inputs import (EditError, check_blocks, check_edit_call, check_resolution, check_working_sizes,
                                     load_rgb, mask_to_grid, mask_to_work)
from editmgt_jax.models.embeddings import micro_conditions
from editmgt_jax.models.registry import MODELS
from editmgt_jax.sampling import program
from editmgt_jax.sampling.config import Knobs, SamplerConfig, SamplerSettings
from editmgt_jax.step_progress import StepProgress
from editmgt_jax.text_side import make_text_side, query_row_weights

# The shipped default model: package data (editmgt_jax/assets), so any install of the package edits.
DEFAULT_CHECKPOINT = DEFAULT_MODEL


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
    composite: str = "changed"      # the region rule used: 'changed', 'pixels', 'map' or 'none'


def _image_keys(seed, n: int) -> np.ndarray:
    """``[n, 2] uint32`` raw PRNG keys, one per image: split from ``seed``, or with one seed per image
    (a sequence) each image's key is the one a call of that image alone with that seed draws, so an
    edit does not depend on the batch it ran in."""
    if isinstance(seed, (Sequence, np.ndarray)):
        if len(seed) != n:
            raise EditError(f"{n} image(s) but {len(seed)} seed(s)")
        return np.stack([np.asarray(jax.random.key_data(jax.random.split(jax.random.key(int(s)), 1)[0]))
                         for s in seed])
    return np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n)))


def _stack(arrays: list):
    """One array when the shapes agree, else the list (images of different sizes)."""
    if any(a is None for a in arrays):
        return None
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else list(arrays)


class Editor:
    """A loaded model: VQ tokenizer, transformer and text side, plus compiled edit programs."""

    DEFAULT_CHECKPOINT = DEFAULT_CHECKPOINT   # what ``Editor.load()`` loads

    def __init__(self, doc: Mapping, modules: Mapping[str, nnx.Module], text, *, mesh=None,
                 path: str | None = None):
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
        check_resolution(self.conventions.resolution, self.pixel_granularity, path)
        self.defaults = self.sampler_config()   # the settings an edit uses unless told otherwise
        self._programs: dict = {}
        self.progress = StepProgress()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, mesh_shape: Mapping[str, int] | None = None,
             dtype=jnp.float32, lora_scale: float = 1.0) -> "Editor":
        """Load a model checkpoint folder (as written by the converter or exported by training).

        ``dtype``: ``jnp.float32`` (default; parity with the official float32 pipeline) or
        ``jnp.bfloat16`` for accelerators: parameters are stored in bf16 and the matmuls run in bf16,
        while normalisation statistics, attention softmax, RoPE, timestep sinusoids and the logits
        stay float32 as in the official bf16 pipeline, and the sampler's probabilities are float32.
        ``lora_scale``: a LoRA fine-tune's adapters are merged into the transformer at this scale
        (``W + lora_scale * alpha / rank * A @ B``; 0 = the base model); other checkpoints ignore it.

        Compiled edit programs go to the persistent compilation cache (``editmgt_jax.compile_cache``;
        ``EDITMGT_COMPILATION_CACHE=off`` turns it off).
        """
        if not (isinstance(lora_scale, (int, float)) and np.isfinite(lora_scale)):
            raise EditError(f"lora_scale={lora_scale!r}: expected a finite number")
        compile_cache.enable()
        if hub.is_hub_spec(path):   # hf:ORG/NAME[@REVISION]: downloaded and converted once (editmgt_jax.hub)
            path = hub.resolve(path)
        if path is None:
            path = cls.DEFAULT_CHECKPOINT
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
            if name not in MODELS:
                continue
            modules[name] = checkpoints.load_module(path, name, cfg_dict, dtype=dtype, lora_scale=lora_scale)
        text = make_text_side(path, doc, modules)
        mesh = parallel.make_mesh(mesh_shape) if mesh_shape else None
        return cls(doc, {k: modules[k] for k in ("vq", "transformer")}, text, mesh=mesh, path=path)

    @classmethod
    def from_pretrained(cls, repo_id: str = hub.DEFAULT_REPO, *, revision: str | None = None,
                        cache_dir: str | None = None, **load_kwargs) -> "Editor":
        """Load a model by hub id (``"WeiChow/EditMGT"``, the official release, by default), as
        ``Editor.load("hf:ORG/NAME")`` does: the release is downloaded into the hub cache
        (``cache_dir``, default ``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` only the cache is read),
        converted once into ``editmgt_jax.hub.cache_root()`` and loaded from there. A local folder
        holding a model checkpoint is loaded as it is. ``load_kwargs``: ``mesh_shape``, ``dtype``."""
        if os.path.isdir(repo_id) and checkpoints.is_model_checkpoint(repo_id):
            return cls.load(repo_id, **load_kwargs)
        repo, rev = hub.parse_spec(repo_id)
        return cls.load(hub.checkpoint_folder(repo, revision or rev, cache_dir=cache_dir), **load_kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def pixel_granularity(self) -> int:
        """Image sides must be multiples of this: VQ factor times the transformer's down-sampling."""
        return self.vq_cfg.downsample_factor * (2 if self.tr_cfg.downsample else 1)

    @property
    def default_size(self) -> int:
        return self.conventions.resolution

    def prepare(self, image, *, size: int | None = None, policy: str = "fit", name: str | None = None) -> np.ndarray:
        """Path / bytes / PIL image / array -> ``[H, W, 3] uint8`` at a size the grid takes
        (``policy``: 'fit' keeps the aspect ratio, 'crop' takes the centre square; ``imageio``)."""
        arr = self.load_rgb(image, name=name)
        return imageio.fit_to_grid(arr, size or self.default_size, self.pixel_granularity, policy)

    load_rgb = staticmethod(load_rgb)

    # ------------------------------------------------------------------ editing
    def sampler_config(self, **overrides) -> SamplerSettings:
        """The checkpoint's sampler settings with ``overrides`` (None = the default) applied;
        ``EditError`` naming a setting this model cannot take."""
        try:
            settings = self.conventions.settings(**overrides)
        except ValueError as e:
            raise EditError(str(e)) from None
        return check_blocks(settings, num_blocks=self.tr_cfg.num_blocks, num_layers=self.tr_cfg.num_layers)

    def edit(self, images, instructions: Sequence[str] | str, *, seed: int | Sequence[int] = 0, masks=None,
             negative_prompt: str | None = None, size: int | None = None, policy: str = "fit",
             feather: float | None = None, progress: bool = False,
             query_words: str | Sequence[str] | None = None, **settings) -> EditResult:
        """Edit a batch. ``images``: a list (or one) of paths / PIL images / ``[H, W, 3]`` arrays, of
        any sizes; ``instructions``: one per image. ``masks``: optional ``[H, W]`` bool arrays (True =
        may change; at the input's or the working size) for inpainting mode. ``settings``: fields of
        ``SamplerSettings`` (``steps``, ``guidance_scale``, ``reference_strength``, ``hold_threshold``,
        ``consolidation_blocks``, ``greedy``, ``composite``, ...; None = the checkpoint's) override
        the checkpoint's recommended ones.

        The model edits each image at ``size`` (default: the checkpoint's) under ``policy`` ('fit':
        long side at ``size``, aspect kept; 'crop': the centre square). ``composite`` says which
        pixels of the input take the model's output (``editmgt_jax.composite``): 'changed' (the tokens
        that changed, dilated by one token), 'pixels' (within those, the pixels whose decode moved
        from the source's decode), 'map' (the edit-region map, which needs consolidation),
        or 'none' (``images`` are then the raw model output at the working size); default: the
        checkpoint's recommendation, else 'changed'. ``feather``: width of the soft
        seam in input pixels (default: a quarter of a token, at least 3 px).
        ``progress``: show a bar over the sampling steps (on stderr) when they take more than a few
        seconds (``StepProgress``). ``query_words``: words of the instruction (one string for all,
        or one per image) whose text rows alone are the query of the edit-region map (the official
        ``local_query_text``); needs ``consolidation_blocks``."""
        images, instructions = check_edit_call(images, instructions, seed, size, self.pixel_granularity)
        if len(images) != len(instructions):
            raise EditError(f"{len(images)} image(s) but {len(instructions)} instruction(s)")
        if masks is not None and len(masks) != len(images):
            raise EditError(f"{len(images)} image(s) but {len(masks)} mask(s)")
        if feather is not None and not feather >= 0:
            raise EditError(f"feather={feather!r}: expected a width in pixels >= 0")
        settings = self.sampler_config(**settings)
        cfg, knobs = settings.split()
        composite = settings.composite
        size = size or self.default_size
        gran = self.pixel_granularity
        originals = [self.load_rgb(im, name=f"image {i}") for i, im in enumerate(images)]
        placements = [compositing.placement(o.shape[0], o.shape[1], size, gran, policy) for o in originals]
        check_working_sizes(self.tr_cfg, self.vq_cfg, [o.shape[:2] for o in originals], size, gran, policy,
                            devices=self.mesh.shape["data"] * self.mesh.shape["fsdp"], device=self.mesh.devices.flat[0])
        srcs = [imageio.fit_to_grid(o, size, gran, policy) for o in originals]
        neg = negative_prompt if negative_prompt is not None else self.conventions.negative_prompt
        txt, pooled = self.text.encode(instructions)
        rows = None
        if query_words is not None:
            if not cfg.captures:
                raise EditError("query_words weights the edit-region map: give consolidation_blocks")
            rows = query_row_weights(self.text, instructions, query_words, txt.shape[1])
        elif settings.capture_words and cfg.captures:
            if not hasattr(self.text, "word_rows"):
                raise EditError("capture_words: this model's text side does not mark its word rows")
            rows = self.text.word_rows(instructions)
        ntxt, npooled = self.text.encode([neg] * len(instructions), allow_empty=True)
        keys = _image_keys(seed, len(srcs))
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
                inpaint = np.stack([mask_to_grid(mask_to_work(masks[i], originals[i], size, gran, policy),
                                                 shape[:2], (gh, gw), i) for i in idx])
            micro = np.tile(micro_conditions(shape[1], shape[0], *self.conventions.crop_coords,
                                             aesthetic=self.conventions.aesthetic_score), (len(idx), 1))
            self.progress.start(cfg.steps)
            try:
                out = self._run(cfg, knobs, src, txt[idx], pooled[idx], ntxt[idx], npooled[idx], micro, keys[idx],
                                inpaint, None if rows is None else rows[idx], progress)
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
            threshold = settings.hold_threshold if settings.holds else 0.5
            source_raw = self._source_decodes(srcs) if composite == "pixels" else None
            for i, o in enumerate(outs):
                if composite == "changed":
                    tok_mask = compositing.changed_tokens(o["tokens"], o["ref_ids"])
                elif composite == "pixels":
                    tok_mask = compositing.changed_pixels(o["tokens"], o["ref_ids"], raw[i], source_raw[i])
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
        return self._roundtrip(np.stack(srcs))["image"]

    def _source_decodes(self, srcs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The tokenizer's reconstruction of each working-size source (one program per shape)."""
        out: list = [None] * len(srcs)
        groups: dict[tuple, list[int]] = {}
        for i, s_ in enumerate(srcs):
            groups.setdefault(s_.shape, []).append(i)
        for idx in groups.values():
            rec = self._roundtrip(np.stack([srcs[i] for i in idx]))["image"]
            for k, i in enumerate(idx):
                out[i] = rec[k]
        return out

    def encode_ids(self, images) -> np.ndarray:
        """Token ids of images already at a working size the grid takes (``[B, H, W, 3]`` uint8, or a
        list of such arrays of one size): ``[B, h, w] int32``, the ids the edit program starts from."""
        return self._roundtrip(np.stack([np.asarray(im) for im in images]))["ids"]

    def _roundtrip(self, src: np.ndarray) -> dict:
        sig = ("roundtrip", src.shape)
        prog = self._programs.get(sig)
        if prog is None:
            graphdef = self.graphdefs["vq"]
            prog = self._programs[sig] = jax.jit(lambda state, px: program.roundtrip(nnx.merge(graphdef, state), px))
        return {k: np.asarray(v) for k, v in prog(self.states["vq"], src).items()}

    def set_states(self, modules: Mapping[str, nnx.Module]) -> None:
        """Swap in new parameters of the same structure (e.g. a training run's current ones): the
        compiled programs stay valid, since parameters are their arguments."""
        rep = parallel.replicated(self.mesh)
        for name, m in modules.items():
            if name == "text":
                self.text.set_module(m)
                continue
            graphdef, state = nnx.split(m)
            if graphdef != self.graphdefs[name]:
                raise ValueError(f"set_states: {name} has another structure than the loaded model")
            self.states[name] = jax.device_put(state, rep)

    def _on_step(self, *operands) -> None:
        self.progress(*operands)   # looked up per call: ``self.progress`` may be replaced

    def _run(self, cfg: SamplerConfig, knobs: Knobs, src, txt, pooled, ntxt, npooled, micro, keys, inpaint,
             rows=None, progress=False):
        """One compiled program per static ``cfg`` and input shapes; the ``knobs`` are its arguments.
        ``keys``: ``[b, 2] uint32`` raw PRNG keys, one per image (so an image's draw does not depend on
        the other images of the call or on padding)."""
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b = len(src)
        pad = (-b) % n_dev
        arrays = ([src, txt, pooled, ntxt, npooled, micro] + ([inpaint] if inpaint is not None else [])
                  + ([rows] if rows is not None else []))
        if pad:
            arrays = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in arrays]
            keys = np.concatenate([keys, np.repeat(keys[-1:], pad, axis=0)])
        key = jax.device_put(keys, parallel.replicated(self.mesh))
        sig = (cfg, tuple(a.shape for a in arrays), inpaint is not None, rows is not None, progress)
        prog = self._programs.get(sig)
        if prog is None:
            prog = self._programs[sig] = self._compile(cfg, arrays, inpaint is not None, progress, rows is not None)
        batch_sh = [parallel.batch_sharding(self.mesh, a.ndim) for a in arrays]
        placed = [jax.device_put(np.asarray(a), s) for a, s in zip(arrays, batch_sh)]
        out = prog(self.states, knobs, key, *placed)
        return {k: np.asarray(v)[:b] for k, v in out.items()}

    def _compile(self, cfg: SamplerConfig, arrays, has_mask: bool, progress: bool = False, has_rows: bool = False):
        graphdefs = self.graphdefs
        on_step = self._on_step if progress else None

        def run(states, knobs, key, src, txt, pooled, ntxt, npooled, micro, *optional):
            vq = nnx.merge(graphdefs["vq"], states["vq"])
            tr = nnx.merge(graphdefs["transformer"], states["transformer"])
            mask = optional[0] if has_mask else None
            rows = optional[-1] if has_rows else None
            return program.edit(vq, tr, cfg, knobs, key, src, txt, pooled, ntxt, npooled, micro, mask, rows,
                                on_step=on_step)

        rep = parallel.replicated(self.mesh)
        in_sh = (rep, rep, rep) + tuple(parallel.batch_sharding(self.mesh, a.ndim) for a in arrays)
        return jax.jit(run, in_shardings=in_sh)
