"""The sampler flags shared by the command-line tools (``infer.edit``, ``infer.evaluate``): one
definition of ``--steps``, ``--guidance``, ``--strength``, ``--hold-threshold``,
``--consolidation-blocks`` and ``--greedy``, and their translation into ``Editor`` sampler keywords.
"""

from __future__ import annotations

import argparse
import re


def parse_blocks(text: str) -> tuple[int, ...]:
    """'28-36', '2,3,4', '2+3' or '' -> block indices."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in re.split(r"[,+]", text))):
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def add_sampler_flags(group: argparse._ActionsContainer) -> None:
    """Add the sampler flags to a parser or argument group (every default None: the checkpoint's)."""
    group.add_argument("--steps", type=int, help="decoding steps (release demo: 36)")
    group.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    group.add_argument("--strength", type=float, help="reference strength: >1 pulls attention to the source")
    group.add_argument("--hold-threshold", type=float, help="region-hold lambda (0 = off)")
    group.add_argument("--consolidation-blocks", type=parse_blocks, metavar="LIST",
                       help="blocks whose attention forms the edit-region map, e.g. '28-36' or '2,3,4'")
    group.add_argument("--greedy", action="store_true",
                       help="deterministic decoding (argmax, no Gumbel noise)")


def sampler_overrides(args) -> dict:
    """The sampler flags of parsed ``args`` as ``Editor.edit`` / ``Editor.sampler_config`` keywords
    (None = the checkpoint's default)."""
    return dict(steps=args.steps, guidance_scale=args.guidance, reference_strength=args.strength,
                hold_threshold=args.hold_threshold, consolidation_blocks=args.consolidation_blocks,
                greedy=True if args.greedy else None)
