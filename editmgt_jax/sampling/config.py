"""Sampler settings: one record, with the compiled and the traced views derived from it.

- :class:`SamplerSettings`: every setting by its name, each declared once with its default, its
  check and (for the tunable ones) its command-line flag (:func:`setting`). The checkpoint
  conventions nest a partial record (the model's recommendations), the config files spell it as
  ``editor.sampler_defaults``, ``Editor.edit`` takes its fields as keywords and the command-line
  flags are generated from it (``infer.flags``). Validation happens here, once, when a record is
  built.
- :class:`SamplerConfig` (``settings.static()``): the static choices, hashable; one compiled loop per
  configuration and input shape. It carries the :class:`ModelFacts` (mask id, timestep convention,
  score grid, default micro-conditions: how the model must be driven, from the checkpoint's
  conventions) and the two structural switches a numeric setting implies: classifier-free guidance
  on (``guided``: the model runs on twice the batch) and the reference-strength bias on
  (``reference_bias``: a strength of 1 is no bias term at all).
- :class:`Knobs` (``settings.knobs()``): the numeric settings, traced arguments of the compiled loop
  (guidance scale, reference strength, hold threshold lambda, keep-source probability, the
  temperature of each step): a sweep over them compiles once.

``settings.split()`` gives ``(SamplerConfig, Knobs)``. The views are not validated again: they are
only ever built from a validated record.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import numpy as np
from flax import struct

from editmgt_jax import composite as composite_modes
from editmgt_jax.models.attention import CAPTURE_MODES
from editmgt_jax.models.embeddings import DEFAULT_AESTHETIC
from editmgt_jax.sampling import schedule

TIMESTEP_CONVENTIONS = ("step_index", "mask_fraction")
# Which pixels of the input take the model's output (``editmgt_jax.composite``).
COMPOSITE_MODES = composite_modes.MODES

# What a setting is: traced by the loop, compiled into it, applied on the host around it, or a fact of
# the model (from the checkpoint's conventions; no flag: a model is driven as it was trained).
KNOB, STATIC, HOST, MODEL = "knob", "static", "host", "model"


# ------------------------------------------------------------------------------ checks
def _number(lo: float, inclusive: bool = True, *, integer: bool = False, hi: float | None = None):
    """A check: a finite number ``>= lo`` (``> lo`` unless ``inclusive``; ``<= hi``); an integer."""
    def check(name: str, value):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, (bool, str)) or (integer and not number.is_integer()):
            raise ValueError(f"{name}={value!r}: must be {'an integer' if integer else 'a number'}")
        if hi is not None and np.isfinite(number) and number > hi:
            raise ValueError(f"{name}={value!r}: a probability, in [{lo:g}, {hi:g}]")
        if not np.isfinite(number) or number < lo or (number == lo and not inclusive):
            raise ValueError(f"{name}={value!r}: must be {'an integer' if integer else 'finite and'} "
                             f"{'>=' if inclusive else '>'} {lo:g}")
        return int(number) if integer else float(number)
    return check


def _one_of(choices: tuple[str, ...]):
    def check(name: str, value):
        if value not in choices:
            raise ValueError(f"{name}={value!r}: must be one of {choices}")
        return value
    return check


def _flag(name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r}: must be True or False")
    return bool(value)


def _blocks(name: str, value):
    blocks = tuple(int(b) for b in value)
    if min(blocks, default=0) < 0:
        raise ValueError(f"{name}={blocks}: block indices are >= 0")
    return blocks


def _micro_conds(name: str, value):
    micro = tuple(float(m) for m in value)
    if len(micro) != 5:
        raise ValueError(f"{name}={micro}: needs 5 values (width, height, crop_top, crop_left, aesthetic)")
    if not np.all(np.isfinite(micro)):
        raise ValueError(f"{name}={micro}: must be finite")
    return micro


def _optional(check: Callable):
    return lambda name, value: None if value is None else check(name, value)


def _grid(name: str, value):
    grid = tuple(int(g) for g in value)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{name}={value!r}: expected (h, w) >= 1")
    return grid


def parse_blocks(text: str) -> tuple[int, ...]:
    """'28-36', '2,3,4', '2+3' or '' -> block indices."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in re.split(r"[,+]", text))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"{part!r}: expected block indices like '28-36' or '2,3,4'")
        out += list(range(int(m[1]), int(m[2] or m[1]) + 1))
    return tuple(out)


def setting(default, kind: str, check: Callable, *, flags: tuple[str, ...] = (), help: str = "",
            parse: Callable | None = None, metavar: str | None = None, choices: tuple | None = None):
    """A :class:`SamplerSettings` field: its one default, its one check and, unless it is a model
    fact, its command-line flag spellings (the first is the one messages name; the second, where
    there is one, the older spelling kept for compatibility) and the parser of the flag's text."""
    if (kind == MODEL) != (not flags):
        raise ValueError("every tunable setting has a flag and a model fact none")
    return dataclasses.field(default=default, metadata=dict(kind=kind, check=check, flags=flags, help=help,
                                                            parse=parse, metavar=metavar, choices=choices))


# ------------------------------------------------------------------------------ the record
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Every sampler setting by name, validated; ``split()`` makes the static config and the knobs.

    The defaults are the official demo's (36 steps, guidance 6, reference strength 1.1, temperature
    2 -> 0; region hold off); a checkpoint's conventions record recommends its own
    (``Conventions.settings``). ``guidance_scale <= 1`` turns guidance off and
    ``reference_strength == 1`` the reference bias.
    """

    steps: int = setting(36, STATIC, _number(1, integer=True), flags=("--steps",), parse=int,
                         help="decoding steps (release demo: 36)")
    guidance_scale: float = setting(6.0, KNOB, _number(0.0), flags=("--guidance", "--guidance-scale"),
                                    parse=float, help="classifier-free guidance scale (1 = off)")
    reference_strength: float = setting(1.1, KNOB, _number(0.0, inclusive=False),
                                        flags=("--strength", "--reference-strength"), parse=float,
                                        help="reference strength: >1 pulls attention to the source (1 = off)")
    hold_threshold: float = setting(0.0, KNOB, _number(0.0), flags=("--hold-threshold",), parse=float,
                                    help="region-hold lambda (0 = off)")
    keep_source: float = setting(0.0, KNOB, _number(0.0, hi=1.0), flags=("--keep-source",), parse=float,
                                 metavar="P", help="keep a cell's source token when the model gives it at "
                                                   "least probability P (0 = off)")
    consolidation_blocks: tuple[int, ...] = setting(
        (), STATIC, _blocks, flags=("--consolidation-blocks",), parse=parse_blocks, metavar="LIST",
        help="blocks whose attention forms the edit-region map, e.g. '28-36' or '2,3,4' (global indices: "
             "dual-stream blocks first, then single-stream)")
    capture_mode: str = setting("official", STATIC, _one_of(CAPTURE_MODES), flags=("--capture-mode",),
                                choices=CAPTURE_MODES,
                                help="how the captured attention is computed ('official': the reference's "
                                     "recomputation over [text, image] tokens)")
    greedy: bool = setting(False, STATIC, _flag, flags=("--greedy",),
                           help="deterministic decoding (argmax, no Gumbel noise)")
    freeze_held: bool = setting(False, STATIC, _flag, flags=("--freeze-held",),
                                help="held positions become final at once (never re-masked)")
    temperature_start: float = setting(2.0, KNOB, _number(0.0), flags=("--temperature-start",), parse=float,
                                       help="Gumbel-noise temperature of the first step")
    temperature_end: float = setting(0.0, KNOB, _number(0.0), flags=("--temperature-end",), parse=float,
                                     help="Gumbel-noise temperature of the last step")
    composite: str = setting("changed", HOST, _one_of(COMPOSITE_MODES), flags=("--composite",),
                             choices=COMPOSITE_MODES,
                             help="which pixels of the input take the edit: changed (tokens the edit "
                                  "changed, grown by one token), pixels (within those, the pixels whose "
                                  "decode moved from the source's decode), map (the edit-region map; needs "
                                  "consolidation) or none (the raw model output at the working size)")
    capture_words: bool = setting(False, HOST, _flag, flags=("--capture-words",),
                                  help="the edit-region map reads the text rows of the instruction's words "
                                       "only, not the padding (needs consolidation; the caller passes those "
                                       "rows to the loop: Editor does, from its text side)")
    micro_conds: tuple[float, ...] = setting((1024.0, 1024.0, 0.0, 0.0, DEFAULT_AESTHETIC), MODEL, _micro_conds)
    mask_token_id: int | None = setting(None, MODEL, _optional(_number(0, integer=True)))
    score_grid: tuple[int, int] | None = setting(None, MODEL, _optional(_grid))
    timestep_convention: str = setting("step_index", MODEL, _one_of(TIMESTEP_CONVENTIONS))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        if self.hold_threshold > 0 and not self.consolidation_blocks:
            raise ValueError("region hold (hold_threshold > 0) needs consolidation_blocks")
        if self.composite == "map" and not self.consolidation_blocks:
            raise ValueError("composite='map' needs the edit-region map: give consolidation_blocks")

    @classmethod
    def fields(cls, *kinds: str) -> tuple[dataclasses.Field, ...]:
        """The fields of ``kinds`` (all when none is named)."""
        return tuple(f for f in dataclasses.fields(cls) if not kinds or f.metadata["kind"] in kinds)

    @classmethod
    def tunable(cls) -> tuple[str, ...]:
        """Names of the settings a user or a checkpoint may choose (each has a flag)."""
        return tuple(f.name for f in cls.fields(KNOB, STATIC, HOST))

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

    def static(self, *, record: bool = False, record_logits: bool = False) -> "SamplerConfig":
        """The static half; raises ``ValueError`` when ``mask_token_id`` is not set."""
        if self.mask_token_id is None:
            raise ValueError("mask_token_id is not set: take it from the model checkpoint's conventions "
                             "(editmgt_jax.checkpoints.read_conventions(CKPT).settings(); "
                             "Editor.sampler_config() does)")
        facts = ModelFacts(self.mask_token_id, self.timestep_convention, self.score_grid, self.micro_conds)
        return SamplerConfig(model=facts, steps=self.steps, consolidation_blocks=self.consolidation_blocks,
                             capture_mode=self.capture_mode, greedy=self.greedy, freeze_held=self.freeze_held,
                             guided=self.uses_cfg, reference_bias=self.reference_strength != 1.0,
                             record=record, record_logits=record_logits)

    def knobs(self) -> "Knobs":
        """The traced half."""
        f32 = np.float32
        return Knobs(guidance_scale=f32(self.guidance_scale), reference_strength=f32(self.reference_strength),
                     hold_threshold=f32(self.hold_threshold), keep_source=f32(self.keep_source),
                     temperatures=schedule.temperature_schedule(self.steps, self.temperature_start,
                                                                self.temperature_end))

    def split(self, *, record: bool = False, record_logits: bool = False) -> tuple["SamplerConfig", "Knobs"]:
        """``(SamplerConfig, Knobs)``: the static choices and the traced numbers."""
        return self.static(record=record, record_logits=record_logits), self.knobs()


# ------------------------------------------------------------------------------ the views
@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """How the model is driven (the :data:`MODEL` settings of a record).

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
    timestep_convention: str
    score_grid: tuple[int, int] | None
    micro_conds: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static choices of the compiled loop (hashable: one configuration and input shape compile once).

    Attributes:
      model: the :class:`ModelFacts`.
      steps: number of decoding steps.
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
    steps: int
    consolidation_blocks: tuple[int, ...]
    capture_mode: str
    greedy: bool
    freeze_held: bool
    guided: bool
    reference_bias: bool
    record: bool = False
    record_logits: bool = False

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
