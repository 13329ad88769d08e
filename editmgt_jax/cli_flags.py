"""The sampler flags shared by the command-line tools (``infer.edit``, ``infer.evaluate``): one
definition of ``--steps``, ``--guidance-scale`` (also ``--guidance``), ``--reference-strength`` (also
``--strength``), ``--hold-threshold``, ``--consolidation-blocks`` and ``--greedy``. Each flag's
attribute is the ``SamplerSettings`` field of the same name, so the parsed flags are ``Editor.edit``
sampler keywords as they stand.
"""

from __future__ import annotations

import argparse
import re


def parse_blocks(text: str) -> tuple[int, ...]:
    """'28-36', '2,3,4', '2+3' or '' -> block indices."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in re.split(r"[,+]", text))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f"{part!r}: expected block indices like '28-36' or '2,3,4'")
        out += list(range(int(m[1]), int(m[2] or m[1]) + 1))
    return tuple(out)


# The flags of the numeric sampler settings (SamplerSettings field = argparse attribute -> flag
# spellings, the first one named in messages).
SAMPLER_FLAGS = {"steps": ("--steps",), "guidance_scale": ("--guidance", "--guidance-scale"),
                 "reference_strength": ("--strength", "--reference-strength"),
                 "hold_threshold": ("--hold-threshold",), "keep_source": ("--keep-source",)}
# Every sampler flag's attribute: the SamplerSettings fields the tools set.
SAMPLER_FIELDS = ("steps", "guidance_scale", "reference_strength", "hold_threshold", "keep_source",
                  "consolidation_blocks", "greedy")


def check_sampler_flags(args) -> None:
    """Numeric sampler flags out of range -> ``ValueError`` naming the flag, before anything loads
    (the ranges are ``SamplerSettings``'s: ``sampling.config.check_setting``)."""
    from editmgt_jax.sampling.config import check_setting

    for name, (flag, *_aliases) in SAMPLER_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                check_setting(name, value)
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {str(e).split(': ', 1)[-1]}") from None


def add_sampler_flags(group: argparse._ActionsContainer) -> None:
    """Add the sampler flags to a parser or argument group (every default None: the checkpoint's)."""
    group.add_argument("--steps", type=int, help="decoding steps (release demo: 36)")
    group.add_argument(*SAMPLER_FLAGS["guidance_scale"], dest="guidance_scale", type=float,
                       help="classifier-free guidance scale (1 = off)")
    group.add_argument(*SAMPLER_FLAGS["reference_strength"], dest="reference_strength", type=float,
                       help="reference strength: >1 pulls attention to the source (1 = off)")
    group.add_argument("--hold-threshold", type=float, help="region-hold lambda (0 = off)")
    group.add_argument("--keep-source", type=float, metavar="P",
                       help="keep a cell's source token when the model gives it at least probability P "
                            "(0 = off; the default model's own setting otherwise)")
    group.add_argument("--consolidation-blocks", type=parse_blocks, metavar="LIST",
                       help="blocks whose attention forms the edit-region map, e.g. '28-36' or '2,3,4'")
    group.add_argument("--greedy", action="store_true",
                       help="deterministic decoding (argmax, no Gumbel noise)")


def sampler_overrides(args) -> dict:
    """The sampler flags of parsed ``args`` as ``Editor.edit`` / ``Editor.sampler_config`` keywords
    (None = the checkpoint's default; ``--greedy`` absent is None too)."""
    over = {name: getattr(args, name) for name in SAMPLER_FIELDS}
    over["greedy"] = True if args.greedy else None
    return over
