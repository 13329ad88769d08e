"""Ablation runs of an evaluation: the ``--ablations`` list, block presets and the runs they expand to.

LIST is comma-separated; each item is GROUP or GROUP=V1/V2/... (groups and their default values in
``DEFAULT_VALUES``; ``all`` = every group, ``none`` = no ablations). Every run is the base sampler
settings plus one change.
"""

from __future__ import annotations

import dataclasses
import math

from editmgt_jax.sampling.config import parse_blocks

DEFAULT_VALUES = {
    "hold": ("on", "off"),
    "blocks": ("none", "early", "late", "all"),
    "lambda": ("0.1", "0.2", "0.3", "0.5"),
    "steps": ("8", "16", "36"),
    "cfg": ("1", "3", "6", "9"),
    "inpaint": ("gt",),
    "composite": ("changed", "pixels", "map", "none"),
    "keep": ("0", "0.1", "0.3"),
}
GROUP_ALIASES = {"consolidation": "blocks", "region-hold": "hold", "guidance": "cfg", "lam": "lambda"}
FALLBACK_LAMBDA = 0.3


class UsageError(ValueError):
    """A bad command-line value; the message names the flag."""


@dataclasses.dataclass
class RunSpec:
    """One sampler configuration to evaluate."""

    name: str
    group: str
    overrides: dict
    inpaint: bool = False
    note: str = ""


def parse_ablations(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """'hold,lambda=0.1/0.3,steps' -> [('hold', ('on', 'off')), ('lambda', ('0.1', '0.3')), ...]."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        group, sep, vals = item.partition("=")
        group = GROUP_ALIASES.get(group.strip().lower(), group.strip().lower())
        if group == "none":
            continue
        if group == "all":
            if sep:
                raise UsageError(f"--ablations: 'all' takes no values (got {item!r})")
            out += list(DEFAULT_VALUES.items())
            continue
        if group not in DEFAULT_VALUES:
            raise UsageError(f"--ablations: unknown group {group!r} in {item!r}; groups: "
                             f"{', '.join(DEFAULT_VALUES)}, all, none")
        values = tuple(v.strip() for v in vals.split("/") if v.strip()) if sep else DEFAULT_VALUES[group]
        if not values:
            raise UsageError(f"--ablations: {item!r} lists no values")
        out.append((group, values))
    return out


def block_presets(num_blocks: int) -> dict[str, tuple[int, ...]]:
    """'early' / 'late' = the first / last third of all blocks (at least one), 'all', 'none'."""
    third = max(1, round(num_blocks / 3))
    return {"none": (), "early": tuple(range(third)), "late": tuple(range(num_blocks - third, num_blocks)),
            "all": tuple(range(num_blocks))}


def expand_runs(groups, base_cfg, presets: dict[str, tuple[int, ...]]) -> list[RunSpec]:
    """The ablation runs of ``groups`` (from `parse_ablations`) around the base sampler config."""
    blocks = tuple(base_cfg.consolidation_blocks) or presets["late"]
    lam = base_cfg.hold_threshold if base_cfg.hold_threshold > 0 else FALLBACK_LAMBDA
    runs: list[RunSpec] = []

    def num(group, v, kind):
        try:
            x = kind(v)
        except ValueError:
            raise UsageError(f"--ablations: {group}={v!r} is not a {kind.__name__}") from None
        if (kind is int and x < 1) or (kind is float and (x < 0 or not math.isfinite(x))):
            raise UsageError(f"--ablations: {group}={v!r} is out of range")
        return x

    for group, values in groups:
        for v in values:
            name = f"{group}={v}"
            if group == "hold":
                if v not in ("on", "off"):
                    raise UsageError(f"--ablations: hold takes on/off, got {v!r}")
                runs.append(RunSpec(name, group, {"consolidation_blocks": blocks,
                                                  "hold_threshold": lam if v == "on" else 0.0}))
            elif group == "blocks":
                if v in presets:
                    chosen = presets[v]
                else:
                    try:
                        chosen = parse_blocks(v.replace("+", ","))
                    except ValueError:
                        raise UsageError(f"--ablations: blocks={v!r}: use none/early/late/all or a list "
                                         f"such as 2-4") from None
                bad = [b for b in chosen if not 0 <= b < len(presets["all"])]
                if bad:
                    raise UsageError(f"--ablations: blocks={v!r}: block(s) {bad} outside 0..{len(presets['all']) - 1}")
                runs.append(RunSpec(name, group, {"consolidation_blocks": chosen,
                                                  "hold_threshold": lam if chosen else 0.0},
                                    note=f"blocks {list(chosen)}" if v in presets else ""))
            elif group == "lambda":
                x = num(group, v, float)
                runs.append(RunSpec(name, group, {"consolidation_blocks": blocks, "hold_threshold": x}))
            elif group == "steps":
                runs.append(RunSpec(name, group, {"steps": num(group, v, int)}))
            elif group == "cfg":
                runs.append(RunSpec(name, group, {"guidance_scale": num(group, v, float)}))
            elif group == "keep":
                x = num(group, v, float)
                if not 0 <= x <= 1:
                    raise UsageError(f"--ablations: keep={v!r}: a probability in [0, 1]")
                runs.append(RunSpec(name, group, {"keep_source": x}))
            elif group == "composite":
                if v not in ("changed", "pixels", "map", "none"):
                    raise UsageError(f"--ablations: composite takes changed/pixels/map/none, got {v!r}")
                over = {"composite": v}
                if v == "map" and not base_cfg.captures:
                    over.update(consolidation_blocks=blocks)
                runs.append(RunSpec(name, group, over))
            elif group == "inpaint":
                if v != "gt":
                    raise UsageError(f"--ablations: inpaint takes 'gt' (the ground-truth mask), got {v!r}")
                runs.append(RunSpec(name, group, {}, inpaint=True, note="ground-truth mask; items without one skipped"))
    return runs
