"""Sampler settings: what is compiled in, what is traced, and the flat record users write.

- :class:`ModelFacts`: how the model must be driven (mask id, timestep convention, score grid,
  default micro-conditions); read from the model checkpoint's conventions, never tuned.
- :class:`SamplerConfig`: the static choices, hashable; one compiled loop per configuration and
  input shape. Steps, captured blocks, modes (greedy, frozen holds, per-step records) and the two
  structural switches a numeric setting implies: classifier-free guidance on (``guided``: the model
  runs on twice the batch) and the reference-strength bias on (``reference_bias``: a strength of 1
  is no bias term at all).
- :class:`Knobs`: the numeric settings, traced arguments of the compiled loop (guidance scale,
  reference strength, hold threshold lambda, the temperature of each step): a sweep over them
  compiles once.
- :class:`SamplerSettings`: the flat, validated record of every setting by its name, as the checkpoint
  conventions, the config files, ``Editor.edit`` keywords and the command-line flags spell them;
  ``settings.split()`` gives ``(SamplerConfig, Knobs)``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from editmgt_jax.sampling import schedule

TIMESTEP_CONVENTIONS = ("step_index", "mask_fraction")
CAPTURE_MODES = ("official", "model")

# Numeric settings: (lowest allowed value, whether the lowest value itself is allowed). Every one
# must also be finite; guidance_scale <= 1 means no guidance.
NUMERIC_RANGES = {"steps": (1, True), "guidance_scale": (0.0, True), "reference_strength": (0.0, False),
                  "hold_threshold": (0.0, True), "keep_source": (0.0, True), "temperature_start": (0.0, True),
                  "temperature_end": (0.0, True)}


def check_setting(name: str, value) -> None:
    """Raise ``ValueError("name=value: ...")`` unless ``value`` is allowed for numeric setting ``name``."""
    lo, inclusive = NUMERIC_RANGES[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, (bool, str)) or (name == "steps" and not number.is_integer()):
        raise ValueError(f"{name}={value!r}: must be {'an integer' if name == 'steps' else 'a number'}")
    if name == "keep_source" and np.isfinite(number) and number > 1:
        raise ValueError(f"{name}={value!r}: a probability, in [0, 1]")
    if not np.isfinite(number) or number < lo or (number == lo and not inclusive):
        raise ValueError(f"{name}={value!r}: must be {'an integer' if name == 'steps' else 'finite and'} "
                         f"{'>=' if inclusive else '>'} {lo:g}")


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """How the model is driven; the model checkpoint's conventions name every one.

    Attributes:
      mask_token_id: the mask id (the release: 8255, its scheduler config's); an embedding row
        outside the codebook, never the logits width.
      timestep_convention: ``"step_index"`` (the release's sampler: the integer ``steps - 1 - step``)
        or ``"mask_fraction"`` (models trained here, ``editmgt_jax.training.losses``: the fraction of
        still-masked tokens of each image before the step).
      score_grid: ``(h, w)`` of the captured scores; ``None`` infers it (the id grid, or half of it
        when the transformer downsamples by 2).
      micro_conds: ``[width, height, crop_top, crop_left, aesthetic]`` used when the caller passes none.
    """

    mask_token_id: int
    timestep_convention: str = "step_index"
    score_grid: tuple[int, int] | None = None
    micro_conds: tuple[float, ...] = (1024.0, 1024.0, 0.0, 0.0, 6.0)

    def __post_init__(self):
        object.__setattr__(self, "mask_token_id", int(self.mask_token_id))
        object.__setattr__(self, "micro_conds", tuple(float(m) for m in self.micro_conds))
        if self.score_grid is not None:
            object.__setattr__(self, "score_grid", tuple(int(g) for g in self.score_grid))
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention must be one of {TIMESTEP_CONVENTIONS}, "
                             f"got {self.timestep_convention!r}")
        if len(self.micro_conds) != 5:
            raise ValueError(f"micro_conds needs 5 values, got {self.micro_conds}")
        if not np.all(np.isfinite(self.micro_conds)):
            raise ValueError(f"micro_conds={self.micro_conds}: must be finite")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static choices of the compiled loop (hashable: one configuration and input shape compile once).

    Attributes:
      model: the :class:`ModelFacts`.
      steps: number of decoding steps (36 in the released demo).
      consolidation_blocks: global block indices whose attention is captured (dual-stream blocks
        first, then single-stream blocks numbered from the number of dual blocks); empty = off.
        Region hold needs these; the knob ``hold_threshold > 0`` switches it on.
      capture_mode: how the model computes the captured attention; 'official' is the reference's
        recomputation over [text, image] tokens only.
      greedy: argmax proposals and zero Gumbel noise (deterministic; what the parity fixtures use).
      freeze_held: False (reference): a held position carries the model's probability of the source
        token as its confidence, so it can be re-masked and is forced back to the source only while
        it stays masked and below lambda. True: held positions become known tokens at once, are never
        re-masked, and leave the schedule.
      guided: run the model on ``[uncond, cond]`` and combine with the ``guidance_scale`` knob.
      reference_bias: pass the ``reference_strength`` knob to the model; False passes a static 1
        (no bias term in the attention).
      record: also return per-step intermediates (``lax.scan`` outputs).
      record_logits: with ``record``, also the guidance-combined logits of every step.
    """

    model: ModelFacts
    steps: int = 36
    consolidation_blocks: tuple[int, ...] = ()
    capture_mode: str = "official"
    greedy: bool = False
    freeze_held: bool = False
    guided: bool = True
    reference_bias: bool = True
    record: bool = False
    record_logits: bool = False

    def __post_init__(self):
        object.__setattr__(self, "consolidation_blocks", tuple(int(b) for b in self.consolidation_blocks))
        check_setting("steps", self.steps)
        if min(self.consolidation_blocks, default=0) < 0:
            raise ValueError(f"consolidation_blocks={self.consolidation_blocks}: block indices are >= 0")
        if self.capture_mode not in CAPTURE_MODES:
            raise ValueError(f"capture_mode must be one of {CAPTURE_MODES}, got {self.capture_mode!r}")

    @property
    def captures(self) -> bool:
        return bool(self.consolidation_blocks)


@struct.dataclass
class Knobs:
    """Numeric settings, traced by the compiled loop (float32 arrays; a pytree).

    Attributes:
      guidance_scale: ``[]`` classifier-free guidance scale (used when ``SamplerConfig.guided``).
      reference_strength: ``[]`` passed to the model (``log(s)`` attention bias between the source
        and the other tokens; used when ``SamplerConfig.reference_bias``).
      hold_threshold: ``[]`` region-hold lambda on the upsampled edit score; 0 = no hold.
      keep_source: ``[]`` a still-masked position whose source token the model gives at least this
        probability takes the source token (``step.keep_mask``); 0 = off.
      temperatures: ``[steps]`` Gumbel-noise temperature of each step
        (``schedule.temperature_schedule``, computed on the host so it is the reference's float32).
    """

    guidance_scale: jax.Array
    reference_strength: jax.Array
    hold_threshold: jax.Array
    temperatures: jax.Array
    keep_source: jax.Array

    @classmethod
    def create(cls, steps: int, *, guidance_scale=6.0, reference_strength=1.1, hold_threshold=0.0,
               temperature_start=2.0, temperature_end=0.0, keep_source=0.0) -> "Knobs":
        f32 = np.float32
        return cls(guidance_scale=f32(guidance_scale), reference_strength=f32(reference_strength),
                   hold_threshold=f32(hold_threshold), keep_source=f32(keep_source),
                   temperatures=schedule.temperature_schedule(int(steps), temperature_start, temperature_end))


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Every sampler setting by name, validated; ``split()`` makes the static config and the knobs.

    The numeric fields are the :class:`Knobs` (``temperature_start`` / ``temperature_end`` give the
    linear temperature schedule); ``mask_token_id``, ``timestep_convention``, ``score_grid`` and
    ``micro_conds`` are the :class:`ModelFacts`; the rest are :class:`SamplerConfig` fields.
    ``guidance_scale <= 1`` turns guidance off and ``reference_strength == 1`` the reference bias.
    ``capture_words``: the edit-region map reads the text rows of the instruction's words only, not
    the padding (the caller passes those rows to the loop: ``Editor`` does, from its text side).
    """

    steps: int = 36
    guidance_scale: float = 6.0
    reference_strength: float = 1.1
    hold_threshold: float = 0.0
    keep_source: float = 0.0
    consolidation_blocks: tuple[int, ...] = ()
    capture_mode: str = "official"
    greedy: bool = False
    freeze_held: bool = False
    temperature_start: float = 2.0
    temperature_end: float = 0.0
    micro_conds: tuple[float, ...] = (1024.0, 1024.0, 0.0, 0.0, 6.0)
    mask_token_id: int | None = None
    score_grid: tuple[int, int] | None = None
    timestep_convention: str = "step_index"
    capture_words: bool = False

    def __post_init__(self):
        object.__setattr__(self, "consolidation_blocks", tuple(int(b) for b in self.consolidation_blocks))
        object.__setattr__(self, "micro_conds", tuple(float(m) for m in self.micro_conds))
        if self.score_grid is not None:
            object.__setattr__(self, "score_grid", tuple(int(g) for g in self.score_grid))
        for name in NUMERIC_RANGES:
            check_setting(name, getattr(self, name))
        if min(self.consolidation_blocks, default=0) < 0:
            raise ValueError(f"consolidation_blocks={self.consolidation_blocks}: block indices are >= 0")
        if not np.all(np.isfinite(self.micro_conds)):
            raise ValueError(f"micro_conds={self.micro_conds}: must be finite")
        if self.hold_threshold > 0 and not self.consolidation_blocks:
            raise ValueError("region hold (hold_threshold > 0) needs consolidation_blocks")
        if len(self.micro_conds) != 5:
            raise ValueError(f"micro_conds needs 5 values, got {self.micro_conds}")
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention must be one of {TIMESTEP_CONVENTIONS}, "
                             f"got {self.timestep_convention!r}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def captures(self) -> bool:
        return bool(self.consolidation_blocks)

    @property
    def holds(self) -> bool:
        return self.hold_threshold > 0 and self.captures

    def replace(self, **changes) -> "SamplerSettings":
        return dataclasses.replace(self, **changes)

    def static(self, *, record: bool = False, record_logits: bool = False) -> SamplerConfig:
        """The static half; raises ``ValueError`` when ``mask_token_id`` is not set."""
        if self.mask_token_id is None:
            raise ValueError("mask_token_id is not set: take it from the model checkpoint's conventions "
                             "(editmgt_jax.checkpoints.read_conventions(CKPT).mask_token_id; "
                             "Editor.sampler_config() does)")
        facts = ModelFacts(self.mask_token_id, self.timestep_convention, self.score_grid, self.micro_conds)
        return SamplerConfig(model=facts, steps=int(self.steps), consolidation_blocks=self.consolidation_blocks,
                             capture_mode=self.capture_mode, greedy=self.greedy, freeze_held=self.freeze_held,
                             guided=self.uses_cfg, reference_bias=self.reference_strength != 1.0,
                             record=record, record_logits=record_logits)

    def knobs(self) -> Knobs:
        """The traced half."""
        return Knobs.create(self.steps, guidance_scale=self.guidance_scale,
                            reference_strength=self.reference_strength, hold_threshold=self.hold_threshold,
                            keep_source=self.keep_source,
                            temperature_start=self.temperature_start, temperature_end=self.temperature_end)

    def split(self, *, record: bool = False, record_logits: bool = False) -> tuple[SamplerConfig, Knobs]:
        """``(SamplerConfig, Knobs)``: the static choices and the traced numbers."""
        return self.static(record=record, record_logits=record_logits), self.knobs()

