"""The conventions record of a model checkpoint (``config.json`` key ``"conventions"``).

How a checkpoint must be driven beyond its weights (:class:`Conventions`): the mask token id, the
timestep the transformer was trained for, the micro-conditions (aesthetic score, crop), the negative
prompt, the working resolution and the recommended sampler settings. The converter reads it from the
release folder (:func:`release_conventions`), the exporter from the training config
(:func:`legacy_conventions`), and the sampler, Editor, trainer and parity checks take it from
:func:`read_conventions`. A checkpoint written before the record existed still loads: its conventions
are rebuilt from the older top-level fields, the mask id from the transformer config
(``vocab_size - 1``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from editmgt_jax.checkpoints.layout import CheckpointError, read_config
from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC
from editmgt_jax.sampling.config import TIMESTEP_CONVENTIONS, SamplerSettings

# The official demo's negative prompt for the released 1024 px model.
RELEASE_NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, "
                           "text, jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")
# The official demo's edit settings (``infer.py``: 36 steps, guidance 6, reference strength 1.1;
# the pipeline's temperature schedule (2, 0)): ``SamplerSettings``'s defaults. Region hold is off
# unless asked for.
RELEASE_SAMPLER = {k: getattr(SamplerSettings(), k) for k in
                   ("steps", "guidance_scale", "reference_strength", "temperature_start", "temperature_end")}
# The record's own fields: the rest of ``SamplerSettings`` is what a conventions record may recommend.
FACT_KEYS = ("mask_token_id", "timestep_convention", "micro_conds")
SAMPLER_KEYS = tuple(f.name for f in SamplerSettings.fields() if f.name not in FACT_KEYS)
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


@dataclasses.dataclass(frozen=True)
class Conventions:
    """How a model checkpoint must be driven, beyond its weights.

    Attributes:
      mask_token_id: the id of the mask token in the transformer's vocabulary. The release names it
        in ``scheduler/scheduler_config.json`` (8255 = ``vocab_size - 1``); it is never the logits
        width (the codebook size, an embedding row the release never trained as the mask).
      timestep_convention: what the transformer gets as its timestep: ``"step_index"`` (the release's
        sampler, ``steps - 1 - step``) or ``"mask_fraction"`` (models trained here).
      aesthetic_score: last micro-condition (the official pipeline's default 6).
      crop_coords: ``(crop_top, crop_left)`` micro-conditions (official default ``(0, 0)``).
      negative_prompt: the unconditional prompt for classifier-free guidance.
      resolution: working resolution in pixels.
      masking_schedule: the re-masking schedule (the release's scheduler: ``"cosine"``).
      sampler: recommended sampler settings (``SamplerSettings`` fields, see :data:`SAMPLER_KEYS`;
        the ones not named keep the record's defaults), validated with the record's own checks.
      source: where the mask id came from (a file, ``"transformer vocab_size - 1"``, ...).
    """

    mask_token_id: int
    timestep_convention: str = "step_index"
    aesthetic_score: float = DEFAULT_AESTHETIC
    crop_coords: tuple[float, float] = (0.0, 0.0)
    negative_prompt: str = ""
    resolution: int = 1024
    masking_schedule: str = "cosine"
    sampler: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, (int, np.integer)):
            raise CheckpointError(f"conventions: mask_token_id must be an integer, got {self.mask_token_id!r}")
        object.__setattr__(self, "mask_token_id", int(self.mask_token_id))
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise CheckpointError(f"conventions: timestep_convention={self.timestep_convention!r}; expected one "
                                  f"of {TIMESTEP_CONVENTIONS}")
        if self.masking_schedule != "cosine":
            raise CheckpointError(f"conventions: masking_schedule={self.masking_schedule!r}; only 'cosine' is "
                                  f"implemented")
        unknown = sorted(set(self.sampler) - set(SAMPLER_KEYS))
        if unknown:
            raise CheckpointError(f"conventions: unknown sampler setting(s) {unknown}; known: {list(SAMPLER_KEYS)}")
        object.__setattr__(self, "crop_coords", tuple(float(c) for c in self.crop_coords))
        object.__setattr__(self, "aesthetic_score", float(self.aesthetic_score))
        object.__setattr__(self, "resolution", int(self.resolution))
        object.__setattr__(self, "sampler", {k: tuple(v) if isinstance(v, list) else v
                                             for k, v in dict(self.sampler).items()})
        try:
            self.settings()
        except ValueError as e:
            raise CheckpointError(f"conventions: the recommended sampler settings: {e}") from None

    def check_vocabulary(self, vocab_size: int, codebook_size: int, where: str = "") -> "Conventions":
        """The mask id must be an embedding row outside the codebook: ``codebook <= id < vocab``."""
        if not codebook_size <= self.mask_token_id < vocab_size:
            raise CheckpointError(f"{where or 'conventions'}: mask_token_id {self.mask_token_id} "
                                  f"({self.source or 'conventions'}) must lie in [codebook_size "
                                  f"{codebook_size}, vocab_size {vocab_size})")
        return self

    def micro_conds(self, width: float, height: float) -> tuple[float, ...]:
        """``[width, height, crop_top, crop_left, aesthetic]`` as the official pipeline builds them."""
        return (float(width), float(height), *self.crop_coords, self.aesthetic_score)

    def settings(self, **overrides) -> SamplerSettings:
        """The ``SamplerSettings`` this model is driven with: the record's defaults, the recommended
        settings, then the non-None ``overrides``, with the mask id, the timestep convention and the
        micro-conditions at the working resolution (``ValueError`` naming a bad or unknown setting)."""
        unknown = sorted(set(overrides) - set(SAMPLER_KEYS))
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; known: {list(SAMPLER_KEYS)}")
        chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
        return SamplerSettings(**{**self.sampler, **chosen}, mask_token_id=self.mask_token_id,
                               timestep_convention=self.timestep_convention,
                               micro_conds=self.micro_conds(self.resolution, self.resolution))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_coords"] = list(self.crop_coords)
        d["sampler"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.sampler.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "Conventions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{where or 'conventions'}: unknown field(s) {unknown}")
        if "mask_token_id" not in d:
            raise CheckpointError(f"{where or 'conventions'}: no mask_token_id")
        try:
            return cls(**dict(d))
        except CheckpointError as e:
            raise CheckpointError(f"{where or 'conventions'}: {str(e).removeprefix('conventions: ')}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where or 'conventions'}: {e}") from None


def default_mask_token_id(transformer_config: Mapping) -> int:
    """The mask id when nothing names it: the last vocabulary row (``vocab_size - 1``), as the
    official training does; never the codebook size / logits width."""
    return int(transformer_config["vocab_size"]) - 1


def read_scheduler_mask_id(path: str) -> int | None:
    """``mask_token_id`` of a scheduler config file (``None`` if the file does not exist)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "mask_token_id" not in doc:
        raise CheckpointError(f"{path}: no 'mask_token_id' field")
    mid = doc["mask_token_id"]
    if isinstance(mid, bool) or not isinstance(mid, int):
        raise CheckpointError(f"{path}: mask_token_id must be an integer, got {mid!r}")
    schedule = doc.get("masking_schedule", "cosine")
    if schedule != "cosine":
        raise CheckpointError(f"{path}: masking_schedule={schedule!r}; only 'cosine' is implemented")
    return mid


def release_conventions(release_dir: str, transformer_config: Mapping, *,
                        scheduler_config: str | None = None) -> Conventions:
    """The conventions of an official release folder (or a reference-fixture folder).

    The mask id comes from ``scheduler/scheduler_config.json`` (or ``scheduler_config``, a path
    relative to ``release_dir``) when present, else ``vocab_size - 1`` of ``transformer_config``
    (our field names or the official ones: both spell it ``vocab_size``). The rest is the official
    pipeline's: step-index timesteps, aesthetic 6 and crop (0, 0), the demo's negative prompt and
    edit settings at 1024 px.
    """
    rel = scheduler_config or SCHEDULER_CONFIG
    f = os.path.join(release_dir, rel)
    mid = read_scheduler_mask_id(f)
    source = rel
    if mid is None:
        mid, source = default_mask_token_id(transformer_config), "transformer vocab_size - 1"
    conv = Conventions(mask_token_id=mid, timestep_convention="step_index", aesthetic_score=DEFAULT_AESTHETIC,
                       crop_coords=(0.0, 0.0), negative_prompt=RELEASE_NEGATIVE_PROMPT, resolution=1024,
                       sampler=dict(RELEASE_SAMPLER), source=source)
    return conv.check_vocabulary(int(transformer_config["vocab_size"]), int(transformer_config["codebook_size"]),
                                 f if os.path.isfile(f) else release_dir)


def legacy_conventions(doc: Mapping, *, mask_token_id: int | None = None,
                       source: str = "transformer vocab_size - 1 (checkpoint without a conventions record)"
                       ) -> Conventions:
    """Conventions from a checkpoint's older fields: ``timestep_convention`` and ``sampler_defaults``
    (resolution, micro_conds, negative_prompt, sampler settings), which are only ever read: a
    checkpoint written today holds the one ``conventions`` record. The mask id is ``mask_token_id``,
    else the transformer config's ``vocab_size - 1`` (what checkpoints written before the record
    existed were trained and converted with)."""
    tr = doc.get("components", {}).get("transformer")
    if tr is None:
        raise CheckpointError("checkpoint has no transformer component: no mask id to infer")
    sd = dict(doc.get("sampler_defaults") or {})
    micro = sd.get("micro_conds")
    aesthetic = float(micro[4]) if micro else float(sd.get("aesthetic_score", DEFAULT_AESTHETIC))
    crop = (float(micro[2]), float(micro[3])) if micro else (0.0, 0.0)
    convention = sd.get("timestep_convention", doc.get("timestep_convention", "step_index"))
    return Conventions(mask_token_id=default_mask_token_id(tr) if mask_token_id is None else mask_token_id,
                       timestep_convention=convention, aesthetic_score=aesthetic, crop_coords=crop,
                       negative_prompt=str(sd.get("negative_prompt", "")),
                       resolution=int(sd.get("resolution", 1024)),
                       sampler={k: v for k, v in sd.items() if k in SAMPLER_KEYS}, source=source)


def read_conventions(doc_or_path: Mapping | str | os.PathLike) -> Conventions:
    """The conventions of a model checkpoint (its ``config.json`` dict, or its folder)."""
    doc = doc_or_path if isinstance(doc_or_path, Mapping) else read_config(doc_or_path)
    where = "config.json conventions"
    conv = (Conventions.from_dict(doc["conventions"], where) if "conventions" in doc
            else legacy_conventions(doc))
    tr = doc.get("components", {}).get("transformer")
    if tr is not None:
        conv.check_vocabulary(int(tr["vocab_size"]), int(tr["codebook_size"]), where)
    return conv
